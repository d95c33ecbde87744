//! Reading the interpreter's own frames (3.11 to 3.15), as profilers such as py-spy and
//! memray do: the public API would make a frame object for every frame that allocates.
//!
//! The layouts are those of CPython's headers (`Include/cpython/pystate.h`,
//! `Include/internal/pycore_frame.h`) for each version, tested on 3.11 and (`make versions`)
//! 3.13 to 3.15; 3.12's only by GitHub CI. Before first use they are checked against the public API on
//! the caller's frame, and a mismatch keeps the public API (`site_lookup()` says which).

use std::ffi::c_int;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use pyo3::ffi;

/// Where `PyThreadState` keeps the current frame: the `cframe` pointer, then the
/// frame pointer inside `_PyCFrame` (3.11, 3.12); or the frame pointer itself (3.13 to 3.15).
#[cfg(not(Py_3_12))]
const PATH: (usize, Option<usize>) = (56, Some(8));
#[cfg(all(Py_3_12, not(Py_3_13)))]
const PATH: (usize, Option<usize>) = (56, Some(0));
#[cfg(Py_3_13)]
const PATH: (usize, Option<usize>) = (72, None);

/// Offsets in `_PyInterpreterFrame` of the code object, the previous frame, the
/// instruction pointer and the owner byte (3.14 and 3.15: `Include/internal/
/// pycore_interpframe_structs.h`, read with `offsetof` against Debian sid's headers).
#[cfg(not(Py_3_12))]
const FRAME: (usize, usize, usize, usize) = (32, 48, 56, 69);
#[cfg(all(Py_3_12, not(Py_3_14)))]
const FRAME: (usize, usize, usize, usize) = (0, 8, 56, 70);
#[cfg(Py_3_14)]
const FRAME: (usize, usize, usize, usize) = (0, 8, 56, 74);
/// Frames with no Python code of their own have an owner from this value up: 3.12 and 3.13's
/// `FRAME_OWNED_BY_CSTACK` (3), 3.14's `FRAME_OWNED_BY_INTERPRETER` (3) and `_CSTACK` (4), and
/// 3.15's `_INTERPRETER` (3), which the interpreter pushes for calls from C into it.
const OWNED_BY_INTERPRETER: u8 = 3;
/// From 3.14 the code field is a stack reference, a pointer with tag bits in its low two
/// (`Py_TAG_BITS`), which an object's alignment leaves free.
#[cfg(Py_3_14)]
const TAG_BITS: usize = 3;

/// 0 untested, -1 refused, else the offset of the bytecode in a code object, which
/// turns an instruction pointer into `PyFrame_GetLasti`'s byte offset.
static CODE_OFFSET: AtomicIsize = AtomicIsize::new(0);

/// Whether [`validate`] has run to a verdict.
pub(super) fn checked() -> bool {
    CODE_OFFSET.load(Relaxed) != 0
}

pub(super) fn validated() -> Option<isize> {
    let offset = CODE_OFFSET.load(Relaxed);
    (offset > 0).then_some(offset)
}

/// # Safety
/// The GIL is held and the layouts were validated (or are being).
unsafe fn read<T: Copy>(base: *const u8, offset: usize) -> T {
    // SAFETY: the caller's layout says `base + offset` holds a T.
    unsafe { base.add(offset).cast::<T>().read() }
}

/// Whether a frame's code field holds a code object. Up to 3.12 it always does, and
/// the type is not checked: the load of the code object's header was the hottest
/// instruction of `hook_malloc` in a time profile (`perf record -e cpu-clock`). From
/// 3.13 the field is `f_executable`, which may be another object.
///
/// # Safety
/// `code` is the code field of a live frame, and the GIL is held.
#[inline(always)]
unsafe fn is_code(code: *mut ffi::PyObject) -> bool {
    #[cfg(not(Py_3_13))]
    return !code.is_null();
    // SAFETY: a live frame's field is null or points to a live object.
    #[cfg(Py_3_13)]
    return !code.is_null() && unsafe { ffi::PyCode_Check(code) } != 0;
}

/// The code object and instruction pointer of the innermost frame with Python code.
///
/// # Safety
/// The GIL is held and the layouts are right for this interpreter.
#[inline(always)]
pub(super) unsafe fn walk(tstate: *const u8) -> Option<(*mut ffi::PyObject, usize)> {
    // SAFETY: `tstate` is the thread state of the GIL holder; the reads follow the
    // layouts of this version, and each pointer is checked before it is followed.
    unsafe {
        if tstate.is_null() {
            return None;
        }
        let mut frame: *const u8 = read(tstate, PATH.0);
        if let Some(inner) = PATH.1 {
            if frame.is_null() {
                return None;
            }
            frame = read(frame, inner);
        }
        let (code_at, previous_at, instr_at, owner_at) = FRAME;
        while !frame.is_null() {
            // Up to 3.11 every frame holds Python code: no frame is the C stack's.
            if cfg!(not(Py_3_12)) || read::<u8>(frame, owner_at) < OWNED_BY_INTERPRETER {
                let code: *mut ffi::PyObject = read(frame, code_at);
                #[cfg(Py_3_14)]
                let code = (code as usize & !TAG_BITS) as *mut ffi::PyObject;
                if is_code(code) {
                    return Some((code, read(frame, instr_at)));
                }
            }
            frame = read(frame, previous_at);
        }
        None
    }
}

/// `PyFrame_GetLasti`'s byte offset for an instruction pointer of `code`, once the
/// layouts are [`validated`] (-1 before).
pub(super) fn offset(code: *mut ffi::PyObject, instruction: usize) -> c_int {
    let Some(code_offset) = validated() else {
        return -1;
    };
    let lasti = instruction as isize - code as isize - code_offset;
    c_int::try_from(lasti).unwrap_or(-1)
}

/// Checks the layouts against the public API on the calling Python frame, once:
/// the same code object, and an instruction pointer that lands inside it.
///
/// # Safety
/// The GIL is held.
pub(super) unsafe fn validate() {
    if CODE_OFFSET.load(Relaxed) != 0 {
        return;
    }
    // SAFETY: the GIL is held.
    let public = unsafe { super::sites::public_site() };
    let Some((code, lasti)) = public else {
        return; // No Python frame to check against: try again next time.
    };
    // SAFETY: the GIL is held; a wrong layout is what this call finds out.
    let direct = unsafe { walk(ffi::compat::PyThreadState_GetUnchecked().cast()) };
    let offset = match direct {
        Some((direct_code, instr)) if direct_code == code => {
            instr as isize - code as isize - lasti as isize
        }
        _ => -1,
    };
    // The bytecode follows the code object's fixed fields: a few hundred bytes in.
    let plausible = (64..1024).contains(&offset) && offset % 2 == 0;
    CODE_OFFSET.store(if plausible { offset } else { -1 }, Relaxed);
}
