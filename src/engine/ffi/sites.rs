//! Which line allocated: the site table the hooks intern allocation sites in (a code object and
//! an instruction), the lookup of the innermost Python frame, and resolving sites to
//! `file:line` when a scope reports.

use std::ffi::c_int;

use pyo3::ffi;
use pyo3::prelude::*;

#[cfg(read_frames)]
use super::frames;
#[cfg(read_frames)]
use super::runtime::SITES_FRAMES;
use super::runtime::{untraced, with_engine_if_any, RUNTIME, SITES_NONE};
use crate::engine::tracker::{FastMap, SiteId, NATIVE_SITE};

/// An allocation site before it is resolved to `file:line`: a code object (a strong
/// reference, so its address is not reused while the table holds it) and an offset, the
/// byte offset of the instruction (3.11+) or the line number (3.9, 3.10).
struct CodeRef(*mut ffi::PyObject);

// SAFETY: the pointer is only dereferenced (refcounts, attributes) with the GIL held.
unsafe impl Send for CodeRef {}

/// Where the innermost Python frame is, as the hooks find it: its code object (borrowed)
/// and either its instruction pointer (read from the frame) or the offset the public API
/// gives.
#[derive(Clone, Copy)]
pub(super) enum RawSite {
    /// An instruction pointer: an address inside the code object's bytecode (3.11+), so it
    /// alone tells code object and instruction apart while the code object lives.
    #[cfg_attr(not(read_frames), allow(dead_code))]
    Instruction(*mut ffi::PyObject, usize),
    Offset(*mut ffi::PyObject, c_int),
}

/// Entries in the direct-mapped cache in front of the site index, keyed by instruction
/// pointer: a program allocates from few sites at a time, and the cache answers most
/// lookups with one compare.
const SITE_CACHE: usize = 256;

pub(super) struct SiteTable {
    index: FastMap<(usize, c_int), SiteId>,
    /// (instruction pointer, site). Entries whose key is 0 are empty. An
    /// entry's code object is one of `sites`', which holds a reference to it: its bytecode
    /// stays where it is, and no other code object's can take its place.
    cache: [(usize, SiteId); SITE_CACHE],
    /// `sites[i - 1]` is site `i`; site 0 is "no Python frame".
    sites: Vec<(CodeRef, c_int)>,
}

impl Default for SiteTable {
    fn default() -> Self {
        SiteTable {
            index: FastMap::default(),
            cache: [(0, NATIVE_SITE); SITE_CACHE],
            sites: Vec::new(),
        }
    }
}

impl SiteTable {
    /// `site`'s code object is borrowed; the table takes a reference when it adds a site.
    #[inline(always)]
    pub(super) fn intern(&mut self, site: Option<RawSite>) -> SiteId {
        match site {
            None => NATIVE_SITE,
            Some(RawSite::Instruction(code, instruction)) => match self.cached(instruction) {
                Ok(id) => id,
                Err(slot) => self.intern_instruction(code, instruction, slot),
            },
            Some(RawSite::Offset(code, offset)) => self.intern_slowly(code, offset),
        }
    }

    /// The site of an instruction pointer, when the cache has it; else the cache slot
    /// it goes in.
    #[inline(always)]
    pub(super) fn cached(&self, instruction: usize) -> Result<SiteId, usize> {
        // Instructions are 2-byte aligned; the multiply's high bits index.
        let slot = ((instruction as u64 >> 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            >> (64 - SITE_CACHE.trailing_zeros())) as usize;
        // An empty entry's key is 0, which no instruction pointer is.
        let (key, id) = self.cache[slot];
        if key == instruction {
            Ok(id)
        } else {
            Err(slot)
        }
    }

    /// [`SiteTable::intern`] of an instruction pointer past the cache.
    #[cold]
    #[inline(never)]
    fn intern_instruction(
        &mut self,
        code: *mut ffi::PyObject,
        instruction: usize,
        slot: usize,
    ) -> SiteId {
        #[cfg(read_frames)]
        let offset = frames::offset(code, instruction);
        #[cfg(not(read_frames))]
        let offset = -1;
        let id = self.intern_slowly(code, offset);
        self.cache[slot] = (instruction, id);
        id
    }

    /// The site of `offset` in `code`: from the index, or a new one.
    #[cold]
    #[inline(never)]
    fn intern_slowly(&mut self, code: *mut ffi::PyObject, offset: c_int) -> SiteId {
        let key = (code as usize, offset);
        if let Some(&id) = self.index.get(&key) {
            return id;
        }
        // SAFETY: the GIL is held (there is a frame) and the frame holds the code object.
        unsafe { ffi::Py_INCREF(code) };
        self.sites.push((CodeRef(code), offset));
        let id = self.sites.len() as SiteId;
        self.index.insert(key, id);
        id
    }
}

/// The code object (borrowed) and instruction of the innermost Python frame of this thread.
///
/// # Safety
/// The caller holds the GIL, `tstate` is its thread state, and the busy flag is set (a claim) (the
/// public API may allocate a frame object: that is the engine's, not counted).
#[inline(always)]
pub(super) unsafe fn current_site(tstate: usize) -> Option<RawSite> {
    let mode = RUNTIME.site_mode();
    if mode == SITES_NONE || tstate == 0 {
        return None;
    }
    #[cfg(read_frames)]
    if mode == SITES_FRAMES {
        // SAFETY: the GIL is held and the layout was checked against the public API.
        let (code, instruction) = unsafe { frames::walk(tstate as *const u8) }?;
        return Some(RawSite::Instruction(code, instruction));
    }
    // SAFETY: the GIL is held.
    unsafe { public_site() }.map(|(code, offset)| RawSite::Offset(code, offset))
}

/// A frame's code object, borrowed from the frame.
///
/// # Safety
/// The GIL is held and `frame` is alive.
pub(super) unsafe fn frame_code(frame: *mut ffi::PyFrameObject) -> *mut ffi::PyObject {
    // SAFETY: as the caller promises. PyFrame_GetCode returns a new reference, dropped at
    // once: the frame holds another, so this never frees, and the code stays the frame's
    // while the frame lives.
    unsafe {
        let code = ffi::PyFrame_GetCode(frame).cast::<ffi::PyObject>();
        ffi::Py_DECREF(code);
        code
    }
}

/// [`current_site`] through the public API. Since 3.11 this makes a frame object for the
/// frame (an allocation, and a copy when the frame returns), which costs more than the rest
/// of a hook together in call-heavy code.
///
/// # Safety
/// The caller holds the GIL.
#[cold]
#[inline(never)]
pub(super) unsafe fn public_site() -> Option<(*mut ffi::PyObject, c_int)> {
    // SAFETY: the GIL is held. PyEval_GetFrame skips incomplete frames since 3.11.0
    // (gh-96975); it may create the frame object, an allocation that passes through as busy.
    let frame = unsafe { ffi::PyEval_GetFrame() };
    if frame.is_null() {
        return None;
    }
    // SAFETY: `frame` is a live frame object (borrowed), and the offset getters only read it.
    unsafe {
        let code = frame_code(frame);
        #[cfg(Py_3_11)]
        let offset = ffi::PyFrame_GetLasti(frame);
        #[cfg(not(Py_3_11))]
        let offset = ffi::PyFrame_GetLineNumber(frame);
        Some((code, offset))
    }
}

/// Drops the site table once no scope is open (after the last scope located its sites).
pub(crate) fn release_sites_if_idle(py: Python<'_>) {
    let sites = with_engine_if_any(py, |engine| {
        engine
            .tracker
            .is_idle()
            .then(|| std::mem::take(&mut engine.sites))
    });
    let Some(Some(sites)) = sites else {
        return;
    };
    // With the engine let go: dropping a code object frees memory, which calls the hooks.
    untraced(py, || {
        for (code, _) in sites.sites {
            // SAFETY: the GIL is held and the table owned this reference.
            unsafe { ffi::Py_DECREF(code.0) };
        }
    });
}

/// Where an allocation site is: file, line and function.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SiteLocation {
    pub file: String,
    pub line: u32,
    pub function: String,
}

/// Resolves site ids to `file:line` and function names.
pub(crate) fn locate_sites(py: Python<'_>, ids: &[SiteId]) -> Vec<SiteLocation> {
    // Copy the references out of the engine, then call Python with it let go.
    let sites: Vec<Option<(*mut ffi::PyObject, c_int)>> = with_engine_if_any(py, |engine| {
        ids.iter()
            .map(|&id| {
                let (code, offset) = engine.sites.sites.get((id as usize).checked_sub(1)?)?;
                // SAFETY: the GIL is held; this reference is released below.
                unsafe { ffi::Py_INCREF(code.0) };
                Some((code.0, *offset))
            })
            .collect()
    })
    .unwrap_or_else(|| vec![None; ids.len()]);
    untraced(py, || {
        sites.into_iter().map(|site| locate(py, site)).collect()
    })
}

fn locate(py: Python<'_>, site: Option<(*mut ffi::PyObject, c_int)>) -> SiteLocation {
    let Some((code, offset)) = site else {
        return SiteLocation {
            file: "<native>".to_owned(),
            line: 0,
            function: "<C code: no Python line>".to_owned(),
        };
    };
    // SAFETY: `code` is a strong reference taken in `locate_sites`; Bound takes it over.
    let code = unsafe { Bound::from_owned_ptr(py, code) };
    #[cfg(Py_3_11)]
    // SAFETY: a code object and a byte offset into it, with the GIL held.
    let line = unsafe { ffi::PyCode_Addr2Line(code.as_ptr().cast(), offset) };
    #[cfg(not(Py_3_11))]
    let line = offset;
    let text = |name: &str| code.getattr(name).and_then(|v| v.extract::<String>()).ok();
    // Instructions the compiler adds to a function's prologue have no line (-1): 3.11's
    // MAKE_CELL, which makes a cell for a closed-over local, is one. They belong to the
    // function: its `def` line.
    let line = u32::try_from(line)
        .ok()
        .filter(|&line| line > 0)
        .or_else(|| {
            code.getattr("co_firstlineno")
                .and_then(|v| v.extract::<u32>())
                .ok()
        });
    SiteLocation {
        file: text("co_filename").unwrap_or_else(|| "<unknown>".to_owned()),
        line: line.unwrap_or(0),
        function: text("co_qualname")
            .or_else(|| text("co_name"))
            .unwrap_or_else(|| "<unknown>".to_owned()),
    }
}
