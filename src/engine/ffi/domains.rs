//! CPython's three allocator domains (raw, mem, object): our hooks, installed over whatever
//! allocator was there, and taken out again when no scope is open.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::*};

use pyo3::ffi;
use pyo3::prelude::*;

use super::hooks::{traced_alloc, traced_free, traced_realloc};
use super::runtime::RUNTIME;

const RAW: usize = 0;
const DOMAINS: [ffi::PyMemAllocatorDomain; 3] = [
    ffi::PyMemAllocatorDomain::PYMEM_DOMAIN_RAW,
    ffi::PyMemAllocatorDomain::PYMEM_DOMAIN_MEM,
    ffi::PyMemAllocatorDomain::PYMEM_DOMAIN_OBJ,
];

pub(super) type MallocFn = extern "C" fn(*mut c_void, usize) -> *mut c_void;
pub(super) type CallocFn = extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
pub(super) type ReallocFn = extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void;
type FreeFn = extern "C" fn(*mut c_void, *mut c_void);

/// The allocator a hook wraps, in atomics so a hook racing a re-install reads whole values.
struct Original {
    ctx: AtomicPtr<c_void>,
    malloc: AtomicUsize,
    calloc: AtomicUsize,
    realloc: AtomicUsize,
    free: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const UNSET: Original = Original {
    ctx: AtomicPtr::new(std::ptr::null_mut()),
    malloc: AtomicUsize::new(0),
    calloc: AtomicUsize::new(0),
    realloc: AtomicUsize::new(0),
    free: AtomicUsize::new(0),
};

/// The allocators the hooks wrap, one per domain: part of the engine's runtime.
pub(super) struct Allocators {
    originals: [Original; 3],
    /// Whether our hooks are in a domain's allocator chain (possibly under someone else's).
    chained: [AtomicBool; 3],
}

impl Allocators {
    #[allow(clippy::declare_interior_mutable_const)]
    pub(super) const UNSET: Allocators = Allocators {
        originals: [UNSET, UNSET, UNSET],
        chained: [const { AtomicBool::new(false) }; 3],
    };
}

impl Original {
    fn store(&self, allocator: &ffi::PyMemAllocatorEx) {
        self.ctx.store(allocator.ctx, Relaxed);
        self.malloc
            .store(allocator.malloc.map_or(0, |f| f as usize), Relaxed);
        self.calloc
            .store(allocator.calloc.map_or(0, |f| f as usize), Relaxed);
        self.realloc
            .store(allocator.realloc.map_or(0, |f| f as usize), Relaxed);
        self.free
            .store(allocator.free.map_or(0, |f| f as usize), Relaxed);
    }

    fn load(&self) -> ffi::PyMemAllocatorEx {
        // SAFETY: the fields were stored from the fn pointers of a valid PyMemAllocatorEx
        // before any hook that reads them was installed; 0 maps back to None.
        unsafe {
            ffi::PyMemAllocatorEx {
                ctx: self.ctx.load(Relaxed),
                malloc: std::mem::transmute::<usize, Option<MallocFn>>(self.malloc.load(Relaxed)),
                calloc: std::mem::transmute::<usize, Option<CallocFn>>(self.calloc.load(Relaxed)),
                realloc: std::mem::transmute::<usize, Option<ReallocFn>>(
                    self.realloc.load(Relaxed),
                ),
                free: std::mem::transmute::<usize, Option<FreeFn>>(self.free.load(Relaxed)),
            }
        }
    }
}

impl Original {
    /// One function of the wrapped allocator, and its context: a hook loads only what it
    /// calls.
    ///
    /// # Safety
    /// `F` is the fn pointer type of the field `function` is, and our hook of this domain
    /// is installed: its allocator was stored, all four functions set
    /// ([`install_pymem_hooks`] installs no hook otherwise).
    #[inline(always)]
    unsafe fn get<F: Copy>(&self, function: &AtomicUsize) -> (*mut c_void, F) {
        let address = function.load(Relaxed);
        debug_assert_ne!(address, 0, "allocator function missing");
        // SAFETY: `address` was stored from a non-null fn pointer of type `F` (the
        // caller's promise); fn pointers and usize have the same size.
        (self.ctx.load(Relaxed), unsafe {
            std::mem::transmute_copy::<usize, F>(&address)
        })
    }
}

extern "C" fn hook_malloc<const D: usize>(_ctx: *mut c_void, size: usize) -> *mut c_void {
    let original = &RUNTIME.allocators.originals[D];
    // SAFETY: the malloc field holds a MallocFn, and this hook is installed.
    let (ctx, malloc) = unsafe { original.get::<MallocFn>(&original.malloc) };
    traced_alloc(size, D != RAW, || malloc(ctx, size))
}

extern "C" fn hook_calloc<const D: usize>(
    _ctx: *mut c_void,
    count: usize,
    size: usize,
) -> *mut c_void {
    let original = &RUNTIME.allocators.originals[D];
    // SAFETY: the calloc field holds a CallocFn, and this hook is installed.
    let (ctx, calloc) = unsafe { original.get::<CallocFn>(&original.calloc) };
    traced_alloc(count.saturating_mul(size), D != RAW, || {
        calloc(ctx, count, size)
    })
}

extern "C" fn hook_realloc<const D: usize>(
    _ctx: *mut c_void,
    old: *mut c_void,
    new_size: usize,
) -> *mut c_void {
    let original = &RUNTIME.allocators.originals[D];
    // SAFETY: the realloc field holds a ReallocFn, and this hook is installed.
    let (ctx, realloc) = unsafe { original.get::<ReallocFn>(&original.realloc) };
    traced_realloc(old, new_size, D != RAW, || realloc(ctx, old, new_size))
}

extern "C" fn hook_free<const D: usize>(_ctx: *mut c_void, address: *mut c_void) {
    // The wrapped free is looked up when called, after the block is forgotten: fewer values
    // live across the engine's work, fewer registers saved.
    traced_free(address, D != RAW, || {
        let original = &RUNTIME.allocators.originals[D];
        // SAFETY: the free field holds a FreeFn, and this hook is installed.
        let (ctx, free) = unsafe { original.get::<FreeFn>(&original.free) };
        free(ctx, address)
    })
}

fn hooks<const D: usize>(ctx: *mut c_void) -> ffi::PyMemAllocatorEx {
    ffi::PyMemAllocatorEx {
        ctx,
        malloc: Some(hook_malloc::<D>),
        calloc: Some(hook_calloc::<D>),
        realloc: Some(hook_realloc::<D>),
        free: Some(hook_free::<D>),
    }
}

fn our_hooks(domain: usize, ctx: *mut c_void) -> ffi::PyMemAllocatorEx {
    match domain {
        0 => hooks::<0>(ctx),
        1 => hooks::<1>(ctx),
        _ => hooks::<2>(ctx),
    }
}

fn current_allocator(domain: usize) -> ffi::PyMemAllocatorEx {
    let mut allocator = our_hooks(domain, std::ptr::null_mut());
    // SAFETY: PyMem_GetAllocator fills the struct we pass; the caller holds the GIL.
    unsafe { ffi::PyMem_GetAllocator(DOMAINS[domain], &mut allocator) };
    allocator
}

pub(super) fn install_pymem_hooks(_py: Python<'_>) {
    let allocators = &RUNTIME.allocators;
    let each = allocators.originals.iter().zip(&allocators.chained);
    for (domain, (original, chained)) in each.enumerate() {
        if chained.load(Relaxed) {
            continue;
        }
        let current = current_allocator(domain);
        let complete = current.malloc.is_some()
            && current.calloc.is_some()
            && current.realloc.is_some()
            && current.free.is_some();
        if !complete {
            // Not a valid allocator (the C API wants all four): leave the domain untraced
            // rather than wrap a hole.
            continue;
        }
        original.store(&current);
        let mut ours = our_hooks(domain, current.ctx);
        // SAFETY: the GIL is held; our hooks wrap the allocator that was installed, which
        // the C API allows after initialisation.
        unsafe { ffi::PyMem_SetAllocator(DOMAINS[domain], &mut ours) };
        chained.store(true, Relaxed);
    }
}

pub(super) fn uninstall_pymem_hooks(_py: Python<'_>) {
    let allocators = &RUNTIME.allocators;
    let each = allocators.originals.iter().zip(&allocators.chained);
    for (domain, (original, chained)) in each.enumerate() {
        let current = current_allocator(domain);
        let ours = our_hooks(domain, current.ctx);
        if current.malloc.map(|f| f as usize) != ours.malloc.map(|f| f as usize) {
            // Someone (tracemalloc, memray) wrapped ours: removing ours would remove theirs.
            // Ours stays in their chain and passes everything through while inactive.
            continue;
        }
        let mut original = original.load();
        // SAFETY: the GIL is held; this puts back exactly the allocator we wrapped.
        unsafe { ffi::PyMem_SetAllocator(DOMAINS[domain], &mut original) };
        chained.store(false, Relaxed);
    }
}
