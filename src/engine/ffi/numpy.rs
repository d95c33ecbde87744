//! NumPy's array buffers (NEP 49).
//!
//! NumPy allocates array data with its own handler, not through CPython's domains. NEP 49 lets
//! a program install a handler, but the handler lives in a context variable: a thread started
//! inside a scope would still use the default one. So the default handler's functions are
//! wrapped in place instead (its struct is a writable global in NumPy), which covers every
//! thread and context. Arrays keep a reference to their handler and free through it, so a
//! buffer allocated while wrapped and freed after unwrapping simply goes straight to NumPy.

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::*};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

use super::domains::{CallocFn, MallocFn, ReallocFn};
use super::hooks::{traced_alloc, traced_free, traced_realloc};
use super::runtime::RUNTIME;

#[repr(C)]
struct DataAllocator {
    ctx: *mut c_void,
    malloc: Option<MallocFn>,
    calloc: Option<CallocFn>,
    realloc: Option<ReallocFn>,
    free: Option<extern "C" fn(*mut c_void, *mut c_void, usize)>,
}

#[repr(C)]
struct DataHandler {
    name: [c_char; 127],
    version: u8,
    allocator: DataAllocator,
}

/// `PyDataMem_GetHandler`'s slot in NumPy's C API table (numpy_api.py, since 1.22).
const GET_HANDLER_SLOT: usize = 305;

/// NumPy's default handler while its functions are wrapped, and the functions it had: part of
/// the engine's runtime.
pub(super) struct NumpyPatch {
    handler: AtomicPtr<DataHandler>,
    original: [AtomicUsize; 4],
}

impl NumpyPatch {
    #[allow(clippy::declare_interior_mutable_const)]
    pub(super) const UNSET: NumpyPatch = NumpyPatch {
        handler: AtomicPtr::new(std::ptr::null_mut()),
        original: [const { AtomicUsize::new(0) }; 4],
    };
}

fn numpy_original<F: Copy>(slot: usize) -> F {
    // SAFETY: slot `slot` holds the matching fn pointer of the default handler, stored in
    // `patch_numpy` before the wrappers were installed.
    unsafe { std::mem::transmute_copy::<usize, F>(&RUNTIME.numpy.original[slot].load(Relaxed)) }
}

extern "C" fn numpy_malloc(ctx: *mut c_void, size: usize) -> *mut c_void {
    let malloc: MallocFn = numpy_original(0);
    traced_alloc(size, false, || malloc(ctx, size))
}

extern "C" fn numpy_calloc(ctx: *mut c_void, count: usize, size: usize) -> *mut c_void {
    let calloc: CallocFn = numpy_original(1);
    traced_alloc(count.saturating_mul(size), false, || {
        calloc(ctx, count, size)
    })
}

extern "C" fn numpy_realloc(ctx: *mut c_void, old: *mut c_void, new_size: usize) -> *mut c_void {
    let realloc: ReallocFn = numpy_original(2);
    traced_realloc(old, new_size, false, || realloc(ctx, old, new_size))
}

extern "C" fn numpy_free(ctx: *mut c_void, address: *mut c_void, size: usize) {
    let free: extern "C" fn(*mut c_void, *mut c_void, usize) = numpy_original(3);
    traced_free(address, false, || free(ctx, address, size))
}

/// The default data handler of an imported NumPy ≥ 1.22, or None.
fn numpy_default_handler(py: Python<'_>) -> Option<*mut DataHandler> {
    let modules = py.import("sys").ok()?.getattr("modules").ok()?;
    let umath = [
        "numpy._core._multiarray_umath",
        "numpy.core._multiarray_umath",
    ]
    .iter()
    .find_map(|name| modules.get_item(name).ok())?;
    let api = umath.getattr("_ARRAY_API").ok()?;
    let api = api.cast::<PyCapsule>().ok()?;
    let table = api
        .pointer_checked(None)
        .ok()?
        .as_ptr()
        .cast::<*const c_void>();
    // Older NumPy has no handler API: its `get_handler_name` is the marker (1.22).
    umath.getattr("get_handler_name").ok()?;
    // SAFETY: NumPy's C API table is an array of at least GET_HANDLER_SLOT + 1 entries in
    // every NumPy that has `get_handler_name`; the slot is `PyObject *(*)(void)`.
    let get_handler: extern "C" fn() -> *mut ffi::PyObject =
        unsafe { std::mem::transmute(*table.add(GET_HANDLER_SLOT)) };
    let capsule = get_handler();
    if capsule.is_null() {
        // SAFETY: the GIL is held; clears the error PyDataMem_GetHandler set.
        unsafe { ffi::PyErr_Clear() };
        return None;
    }
    // SAFETY: `capsule` is a new reference to the "mem_handler" capsule.
    let handler = unsafe {
        let handler = ffi::PyCapsule_GetPointer(capsule, c"mem_handler".as_ptr());
        ffi::Py_DECREF(capsule);
        handler.cast::<DataHandler>()
    };
    if handler.is_null() {
        // SAFETY: the GIL is held.
        unsafe { ffi::PyErr_Clear() };
        return None;
    }
    // SAFETY: a "mem_handler" capsule points at a PyDataMem_Handler.
    let (name, version) = unsafe { (CStr::from_ptr((*handler).name.as_ptr()), (*handler).version) };
    // Only NumPy's own default handler is a global we may write; a user's may be read-only.
    (name == c"default_allocator" && version == 1).then_some(handler)
}

/// A function pointer slot of NumPy's handler as an atomic: NumPy calls the handler on threads
/// without the GIL, so it is read while we write it, and each write must be one store.
///
/// # Safety
/// `slot` points at a live, aligned `Option<fn>`, which has a pointer's layout (a null pointer
/// for `None`), as `AtomicUsize` has.
unsafe fn slot<'a, F>(slot: *mut Option<F>) -> &'a AtomicUsize {
    const { assert!(std::mem::size_of::<Option<F>>() == std::mem::size_of::<usize>()) };
    // SAFETY: as the caller promises.
    unsafe { AtomicUsize::from_ptr(slot.cast()) }
}

/// The handler's four function slots, in [`NumpyPatch`]'s's order, as atomics.
///
/// # Safety
/// `handler` is NumPy's live default handler (see [`numpy_default_handler`]).
unsafe fn slots<'a>(handler: *mut DataHandler) -> [&'a AtomicUsize; 4] {
    // SAFETY: as the caller promises; each field is an aligned `Option<fn>` (see `slot`).
    unsafe {
        let allocator = std::ptr::addr_of_mut!((*handler).allocator);
        [
            slot(std::ptr::addr_of_mut!((*allocator).malloc)),
            slot(std::ptr::addr_of_mut!((*allocator).calloc)),
            slot(std::ptr::addr_of_mut!((*allocator).realloc)),
            slot(std::ptr::addr_of_mut!((*allocator).free)),
        ]
    }
}

pub(super) fn patch_numpy(py: Python<'_>) {
    let patch = &RUNTIME.numpy;
    if !patch.handler.load(Relaxed).is_null() {
        return;
    }
    let Some(handler) = numpy_default_handler(py) else {
        return;
    };
    // SAFETY: `handler` is NumPy's live, writable default handler.
    let slots = unsafe { slots(handler) };
    for (original, slot) in patch.original.iter().zip(slots) {
        original.store(slot.load(Acquire), Relaxed);
    }
    if patch.original.iter().any(|f| f.load(Relaxed) == 0) {
        return;
    }
    let wrappers = [
        numpy_malloc as MallocFn as usize,
        numpy_calloc as CallocFn as usize,
        numpy_realloc as ReallocFn as usize,
        numpy_free as extern "C" fn(*mut c_void, *mut c_void, usize) as usize,
    ];
    for (slot, wrapper) in slots.into_iter().zip(wrappers) {
        slot.store(wrapper, Release);
    }
    patch.handler.store(handler, Relaxed);
}

pub(super) fn unpatch_numpy(_py: Python<'_>) {
    let patch = &RUNTIME.numpy;
    let handler = patch.handler.swap(std::ptr::null_mut(), Relaxed);
    if handler.is_null() {
        return;
    }
    // SAFETY: `handler` is the handler `patch_numpy` patched; the functions saved there go back.
    let slots = unsafe { slots(handler) };
    for (slot, original) in slots.into_iter().zip(&patch.original) {
        slot.store(original.load(Relaxed), Release);
    }
}

/// Whether NumPy's array buffers are traced right now.
pub fn numpy_traced() -> bool {
    !RUNTIME.numpy.handler.load(Relaxed).is_null()
}
