//! The engine's runtime: all of its process-wide state in one value, [`RUNTIME`], and the one
//! way to reach the engine, a [`Claim`].
//!
//! What the runtime holds: the engine (the tracker and the site table), the hooks' flags, how
//! sites are found, the GIL holder's cached membership, the queue of events from threads without
//! the GIL, the allocators the hooks wrap (CPython's domains and NumPy's handler), the malloc
//! family's hooks and the slots they are written into (native tracing), and the main
//! interpreter. Its policies live here too: who holds the engine's GIL, when the hooks go in and
//! come out, and what a fork does.
//!
//! # The soundness argument, once
//! The engine is only reached through a [`Claim`], and [`Runtime::claim`] is the one unsafe entry
//! point. A claim is made only by the thread that holds the engine's GIL (the main
//! interpreter's), and only while no other claim exists ([`CLAIMED`], written only by the GIL
//! holder, says whether one does). While a claim lives, [`BUSY`] is set, so an allocation made on
//! that thread (the engine's own, or the public API's frame objects) passes through the hooks
//! without claiming. So the `&mut Engine` a claim hands out has no other borrower. Should a
//! claim ever span a call that releases the GIL, the thread that takes it sees [`BUSY`] and
//! [`CLAIMED`] set: its hooks pass through and its claims are refused, so that is a missed
//! figure, never two borrowers. Threads without the GIL never claim: they queue their events,
//! which the next claim applies.

use std::cell::{Cell, UnsafeCell};
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
#[cfg(Py_3_12)]
use std::sync::atomic::AtomicPtr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::*};

use pyo3::ffi;
use pyo3::prelude::*;

use super::current_thread_id;
use super::domains::{install_pymem_hooks, uninstall_pymem_hooks, Allocators};
#[cfg(read_frames)]
use super::frames;
#[cfg(native_hooks)]
use super::native::NativePatch;
use super::numpy::{patch_numpy, unpatch_numpy, NumpyPatch};
use super::sites::SiteTable;
use crate::engine::tracker::{Membership, ScopeMask, Tracker, NATIVE_SITE};

#[derive(Default)]
pub(crate) struct Engine {
    pub(crate) tracker: Tracker,
    pub(super) sites: SiteTable,
    /// Open scopes that report no sites (the line profiler's): while only they are open,
    /// the hooks skip the frame lookup.
    siteless: ScopeMask,
    /// Open scopes that trace native allocations: while one is open, the malloc family's
    /// slots hold the hooks.
    native: ScopeMask,
    /// The queue's other buffer: swapped in when the queue is applied, so both keep their
    /// capacity and a thread's push rarely allocates.
    spare_events: Vec<Pending>,
}

/// `mask` with the scope `slot`'s bit set or cleared.
fn with_scope(mask: ScopeMask, slot: usize, set: bool) -> ScopeMask {
    let bit: ScopeMask = 1 << slot;
    if set {
        mask | bit
    } else {
        mask & !bit
    }
}

impl Engine {
    pub(crate) fn set_siteless(&mut self, slot: usize, siteless: bool) {
        self.siteless = with_scope(self.siteless, slot, siteless);
    }

    pub(crate) fn set_native(&mut self, slot: usize, native: bool) {
        self.native = with_scope(self.native, slot, native);
    }

    fn wants_native(&self) -> bool {
        self.tracker.open_mask() & self.native != 0
    }

    fn wants_sites(&self) -> bool {
        self.tracker.open_mask() & !self.siteless != 0
    }
}

/// A spin lock, for the queue of events from threads without the GIL: held for a push or a
/// swap, never across a call into Python.
struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

struct SpinGuard<'a, T>(&'a SpinLock<T>);

impl<T> SpinLock<T> {
    fn lock(&self) -> SpinGuard<'_, T> {
        let mut spins = 0u32;
        while self
            .locked
            .compare_exchange_weak(false, true, Acquire, Relaxed)
            .is_err()
        {
            while self.locked.load(Relaxed) {
                spins += 1;
                if spins < 100 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        SpinGuard(self)
    }
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.0.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *self.0.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.0.locked.store(false, Release);
    }
}

/// An event of a thread without the GIL, for the GIL holder to apply.
pub(super) enum Pending {
    Alloc {
        address: usize,
        size: usize,
        thread: u64,
    },
    Free {
        address: usize,
    },
}

/// [`Runtime::flags`]: set while a scope is open; the hooks do nothing else when it is clear.
const ACTIVE: u8 = 1;
/// Set while the GIL holder is inside a hook, a claim or [`untraced`]: its nested allocations
/// pass through. pymalloc hands requests over 512 bytes to the raw domain, whose hook sees this
/// flag and that it holds the GIL, and leaves the block to the outer hook.
const BUSY: u8 = 2;
/// Set while a [`Claim`] exists (always with [`BUSY`]).
const CLAIMED: u8 = 4;

/// How the hooks find allocation sites ([`Runtime::sites`]): not at all while no open scope
/// reports sites, else by reading the interpreter's frames (once their layout checked out) or
/// through the public API.
pub(super) const SITES_NONE: u8 = 0;
pub(super) const SITES_FRAMES: u8 = 1;
const SITES_PUBLIC: u8 = 2;

/// Set in [`Runtime::gil_membership`] above the membership's bits when the GIL holder's
/// allocations may take the hooks' fast path: the membership [`Membership::is_single`], and
/// sites come from the frames. A scope opening or closing and a change of the site lookup
/// clear the cache.
pub(super) const FAST: u64 = 1 << 40;

/// Whether the thread state's interpreter field is where [`Runtime::holds_gil`] reads it: not
/// checked yet, checked and found there, or found elsewhere.
const INTERP_UNCHECKED: u8 = 0;
const INTERP_FOUND: u8 = 1;
#[cfg_attr(not(Py_3_12), allow(dead_code))]
const INTERP_REFUSED: u8 = 2;

pub(super) struct Runtime {
    /// [`ACTIVE`], [`BUSY`] and [`CLAIMED`], the first thing every hook reads. Only the GIL
    /// holder writes them, so a load and a store need no atomic read-modify-write; threads
    /// without the GIL read only [`ACTIVE`].
    flags: AtomicU8,
    /// [`SITES_NONE`], [`SITES_FRAMES`] or [`SITES_PUBLIC`].
    sites: AtomicU8,
    /// The thread state whose membership is cached in [`Runtime::gil_membership`]; a scope
    /// opening or closing clears it. A thread state's memory is freed through the raw domain,
    /// whose hook clears the cache if it was that thread's: a new thread given the same address
    /// recomputes. (A thread started by `threading` never meets a stale entry, since its parent
    /// allocates after making its thread state; a C thread entering Python through
    /// PyGILState_Ensure makes its own and could.) One thread at a time holds the GIL, so this
    /// is global, which costs less than a thread-local (a `__tls_get_addr` call from a shared
    /// library).
    gil_thread: AtomicUsize,
    gil_membership: AtomicU64,
    /// The queue keeps the order that matters: a thread queues a free before the memory goes
    /// back to the allocator, whose own locking orders that before any reuse of the address, so
    /// the GIL holder sees [`Runtime::has_pending`] before it records the address again.
    pending: SpinLock<Vec<Pending>>,
    has_pending: AtomicBool,
    /// The main interpreter, stored when the hooks are installed (3.12+: see
    /// [`Runtime::holds_gil`]).
    #[cfg(Py_3_12)]
    main_interpreter: AtomicPtr<ffi::PyInterpreterState>,
    /// [`INTERP_UNCHECKED`], [`INTERP_FOUND`] or [`INTERP_REFUSED`].
    interp_field: AtomicU8,
    /// Reached only through a [`Claim`].
    engine: UnsafeCell<Option<Engine>>,
    /// The allocators CPython's domains had before the hooks went in.
    pub(super) allocators: Allocators,
    /// NumPy's default data handler, while its functions are wrapped.
    pub(super) numpy: NumpyPatch,
    /// The malloc family's hooks, and the slots they are written into.
    #[cfg(native_hooks)]
    pub(super) native: NativePatch,
}

/// Where the `dlopen` trampoline finds the runtime's fields.
#[cfg(native_hooks)]
pub(super) const HAS_PENDING_OFFSET: usize = std::mem::offset_of!(Runtime, has_pending);
#[cfg(native_hooks)]
pub(super) const NATIVE_OFFSET: usize = std::mem::offset_of!(Runtime, native);

// SAFETY: everything but `engine` is atomic (or a lock); `engine` is reached only through a
// claim, which one thread at a time holds (the module's argument).
unsafe impl Sync for Runtime {}

pub(super) static RUNTIME: Runtime = Runtime {
    flags: AtomicU8::new(0),
    sites: AtomicU8::new(SITES_NONE),
    gil_thread: AtomicUsize::new(0),
    gil_membership: AtomicU64::new(0),
    pending: SpinLock {
        locked: AtomicBool::new(false),
        value: UnsafeCell::new(Vec::new()),
    },
    has_pending: AtomicBool::new(false),
    #[cfg(Py_3_12)]
    main_interpreter: AtomicPtr::new(std::ptr::null_mut()),
    interp_field: AtomicU8::new(INTERP_UNCHECKED),
    engine: UnsafeCell::new(None),
    allocators: Allocators::UNSET,
    numpy: NumpyPatch::UNSET,
    #[cfg(native_hooks)]
    native: NativePatch::UNSET,
};

/// The GIL holder's claim on the engine (see the module's argument): while it lives, the
/// thread's allocations pass through the hooks, and no other claim exists.
pub(super) struct Claim {
    /// The flags before the claim: [`BUSY`] is set when the claim was made inside
    /// [`untraced`].
    before: u8,
    /// Whether the claim may turn tracing on or off ([`with_engine`]'s does), so that dropping
    /// it keeps [`ACTIVE`] as it is now; a hook's leaves it as it was.
    may_switch: bool,
    /// A claim belongs to the thread that holds the GIL.
    _not_send: PhantomData<*mut ()>,
}

impl Runtime {
    /// The one unsafe entry point: a claim on the engine, or None when one exists already.
    ///
    /// # Safety
    /// The calling thread holds the engine's GIL (the main interpreter's), and `flags` is what
    /// it just read of [`Runtime::flags`] (which only the GIL holder writes, so it is current).
    #[inline(always)]
    unsafe fn claim(&'static self, flags: u8, may_switch: bool) -> Option<Claim> {
        if flags & CLAIMED != 0 {
            return None;
        }
        self.flags.store(flags | BUSY | CLAIMED, Relaxed);
        Some(Claim {
            before: flags,
            may_switch,
            _not_send: PhantomData,
        })
    }

    /// A claim for code called from Python, whose token says it holds a GIL: the engine's,
    /// since the module can only be imported into the main interpreter (PyO3's modules refuse
    /// subinterpreters). Panics (a Python exception, not undefined behaviour) if a claim exists:
    /// a claim made further up this thread, which the engine's code never does.
    pub(super) fn claim_with_gil(&'static self, _py: Python<'_>) -> Claim {
        // SAFETY: as above, this thread holds the engine's GIL; the flags were just read.
        unsafe { self.claim(self.flags.load(Relaxed), true) }
            .expect("memgauge: the engine was claimed twice (a bug in memgauge)")
    }

    /// Runs `traced` with the caller's busy flag set, or `untraced` when tracing is off, for a
    /// nested call, or for a thread being torn down. `gil_domain`: the hook is the mem or
    /// object domain's, always called with the GIL; other hooks find out.
    #[inline(always)]
    pub(super) fn enter<R>(
        &'static self,
        gil_domain: bool,
        traced: impl FnOnce(Caller<'_>) -> R,
        untraced: impl FnOnce() -> R,
    ) -> R {
        let flags = self.flags.load(Relaxed);
        if flags & ACTIVE == 0 {
            return untraced();
        }
        let holds_gil = if gil_domain {
            self.gil_domain_holds_gil()
        } else {
            self.holds_gil()
        };
        if holds_gil {
            if flags & (BUSY | CLAIMED) != 0 {
                return untraced();
            }
            // The flags are exactly [`ACTIVE`] (set; the other two clear), which the
            // constant lets the compiler store as constants. Nothing a hook runs opens or
            // closes a scope.
            debug_assert_eq!(flags, ACTIVE);
            // SAFETY: this thread holds the engine's GIL (CPython calls the mem and object
            // domains with it; `holds_gil` checked for the others), and the flags are as said.
            let Some(mut claim) = (unsafe { self.claim(ACTIVE, false) }) else {
                return untraced(); // Not reached: checked above.
            };
            return traced(Caller::GilHolder(&mut claim));
        }
        let busy = BUSY_WITHOUT_GIL.try_with(|busy| busy.replace(true));
        if busy != Ok(false) {
            return untraced();
        }
        let result = traced(Caller::WithoutGil);
        let _ = BUSY_WITHOUT_GIL.try_with(|busy| busy.set(false));
        result
    }

    /// Runs `f` with this thread's allocations untraced: for the engine's own work.
    fn untraced<R>(&self, f: impl FnOnce() -> R) -> R {
        let before = self.flags.load(Relaxed);
        self.flags.store(before | BUSY, Relaxed);
        let result = f();
        // `f` may have turned tracing on or off: only the busy flag is put back.
        self.flags
            .store(self.flags.load(Relaxed) & !BUSY | before & BUSY, Relaxed);
        result
    }

    /// Queues an event of a thread without the GIL.
    #[cold]
    #[inline(never)]
    pub(super) fn queue(&self, event: Pending) {
        let mut queue = self.pending.lock();
        queue.push(event);
        self.has_pending.store(true, Relaxed);
    }

    /// The GIL holder's cached membership, as [`Runtime::gil_membership`]'s bits, when it is
    /// this thread state's and no scope opened or closed since it was computed.
    ///
    /// `tstate`: [`gil_thread_state`], read once per hook.
    #[inline(always)]
    pub(super) fn cached_membership(&self, tstate: usize) -> Option<u64> {
        (tstate != 0 && self.gil_thread.load(Relaxed) == tstate)
            .then(|| self.gil_membership.load(Relaxed))
    }

    /// A thread state's memory is being freed (a thread ended): a new thread may get its
    /// address, so a membership cached for it goes.
    #[inline(always)]
    pub(super) fn forget_thread_state(&self, address: usize) {
        if address == self.gil_thread.load(Relaxed) {
            let _ = self
                .gil_thread
                .compare_exchange(address, 0, Relaxed, Relaxed);
        }
    }

    /// How the hooks find sites now: [`SITES_NONE`], [`SITES_FRAMES`] or the public API.
    #[inline(always)]
    pub(super) fn site_mode(&self) -> u8 {
        self.sites.load(Relaxed)
    }

    /// Whether threads without the GIL queued events the engine has not seen.
    #[inline(always)]
    pub(super) fn has_pending(&self) -> bool {
        self.has_pending.load(Relaxed)
    }

    // ----- the GIL policy -----

    /// Whether this thread holds the main interpreter's GIL, which guards the engine.
    ///
    /// Up to 3.11 the running thread state is the GIL holder's, a global: the thread holds the
    /// GIL when that is its own. Unlike `PyGILState_Check`, this stays right once a
    /// subinterpreter exists (3.11 turns that check off then and answers yes); a thread of
    /// another interpreter counts as without the GIL, and queues.
    #[cfg(not(Py_3_12))]
    fn holds_gil(&self) -> bool {
        // SAFETY: both only read the runtime's and this thread's state, without the GIL.
        unsafe {
            let running = ffi::compat::PyThreadState_GetUnchecked();
            !running.is_null() && running == ffi::PyGILState_GetThisThreadState()
        }
    }

    /// From 3.12 the running thread state is this thread's own while it holds a GIL, and an
    /// interpreter may have a GIL of its own: the thread holds the engine's GIL when it runs in
    /// the main interpreter. The thread state's interpreter field is read in place, checked when
    /// the hooks went in ([`Runtime::check_interp_field`]); had the check failed, the hooks
    /// would not be in.
    #[cfg(Py_3_12)]
    fn holds_gil(&self) -> bool {
        // SAFETY: reads this thread's state; the field's offset was checked against
        // `PyThreadState_GetInterpreter` before the hooks were installed.
        unsafe {
            let running = ffi::compat::PyThreadState_GetUnchecked();
            !running.is_null()
                && *running
                    .cast::<*mut ffi::PyInterpreterState>()
                    .add(INTERP_FIELD)
                    == self.main_interpreter.load(Relaxed)
        }
    }

    /// Whether a hook of the mem or object domain, called with a GIL, holds the engine's: up
    /// to 3.11 there is one GIL; from 3.12 a subinterpreter's own GIL does not count.
    #[inline(always)]
    fn gil_domain_holds_gil(&self) -> bool {
        #[cfg(not(Py_3_12))]
        return true;
        #[cfg(Py_3_12)]
        return self.holds_gil();
    }

    /// Checks, on this thread's state, that the interpreter field sits where
    /// [`Runtime::holds_gil`] reads it (3.12+; checked on every version, the field has been
    /// there since 3.9), once. Returns whether it does, or does not matter (before 3.12).
    fn check_interp_field(&self, _py: Python<'_>) -> bool {
        let verdict = self.interp_field.load(Relaxed);
        if verdict != INTERP_UNCHECKED {
            return verdict == INTERP_FOUND;
        }
        // SAFETY: the token says this thread holds the GIL, so it has a thread state, alive
        // while we read it. The read is of the first words of `PyThreadState`, a struct far
        // larger than them in every version.
        let found = unsafe {
            let tstate = ffi::PyThreadState_Get();
            let interp = ffi::PyThreadState_GetInterpreter(tstate);
            !interp.is_null()
                && *tstate
                    .cast::<*mut ffi::PyInterpreterState>()
                    .add(INTERP_FIELD)
                    == interp
        };
        debug_assert!(found, "the thread state's interpreter field moved");
        #[cfg(Py_3_12)]
        if !found {
            self.interp_field.store(INTERP_REFUSED, Relaxed);
            return false;
        }
        self.interp_field.store(INTERP_FOUND, Relaxed);
        true
    }

    // ----- the hooks going in and out -----

    /// Installs the hooks (and, on Unix, the fork handlers) when a scope is open, and takes
    /// them out when none is. Called with the busy flag set and no claim, after
    /// [`thread_state_checked`] said yes.
    fn install_or_uninstall(&'static self, py: Python<'_>, idle: bool, native: bool) {
        #[cfg(native_hooks)]
        if (idle || !native) && !self.native.held() {
            self.native.uninstall();
        }
        #[cfg(not(native_hooks))]
        let _ = native;
        if idle {
            uninstall_pymem_hooks(py);
            unpatch_numpy(py);
            return;
        }
        #[cfg(Py_3_12)]
        // SAFETY: the token says the GIL is held.
        self.main_interpreter
            .store(unsafe { ffi::PyInterpreterState_Main() }, Relaxed);
        #[cfg(unix)]
        handle_forks();
        install_pymem_hooks(py);
        patch_numpy(py);
        #[cfg(native_hooks)]
        if native {
            self.native.install();
        }
    }

    // ----- fork -----

    /// In a forked child: had another thread of the parent been inside the queue as the process
    /// was copied, the child's queue is locked for good and may be half-written. Then it starts
    /// empty (the old one leaked, never touched): the events were the parent's threads', which
    /// the child does not have. Otherwise the queue is whole and its events still hold.
    ///
    /// Nothing happens before the fork: a lock held across it would be waited on by the other
    /// libraries' fork handlers (OpenBLAS joins its threads there, which free memory).
    #[cfg(unix)]
    fn after_fork_in_child(&self) {
        if self.pending.locked.load(Relaxed) {
            // SAFETY: the child has one thread, this one, and no one else can reach the queue.
            unsafe { std::ptr::write(self.pending.value.get(), Vec::new()) };
            self.pending.locked.store(false, Release);
        }
    }
}

/// Where `PyThreadState` keeps its interpreter: the third pointer, after `prev` and `next`
/// (`Include/cpython/pystate.h`), in every version since 3.9.
const INTERP_FIELD: usize = 2;

/// A fork copies the process with only the forking thread: had another thread held the
/// queue's lock at that moment (mid-push, the queue half-written), the child would spin on it
/// forever at its next use of the engine. See [`Runtime::after_fork_in_child`].
#[cfg(unix)]
fn handle_forks() {
    extern "C" fn in_child() {
        RUNTIME.after_fork_in_child();
    }
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: the handler touches only the queue, in a child with one thread.
        let status = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        debug_assert_eq!(status, 0, "pthread_atfork");
    });
}

impl Claim {
    /// The engine, with the events queued by threads without the GIL applied.
    #[inline(always)]
    pub(super) fn engine(&mut self) -> Option<&mut Engine> {
        // SAFETY: the claim is the engine's only borrower (the module's argument), and this
        // borrow is tied to the claim's.
        let engine = unsafe { &mut *RUNTIME.engine.get() };
        if RUNTIME.has_pending() {
            apply_pending(engine);
        }
        engine.as_mut()
    }

    /// The engine as it is, without applying queued events: for a hook's fast path, which
    /// checked [`Runtime::has_pending`] first.
    #[inline(always)]
    pub(super) fn engine_as_is(&mut self) -> Option<&mut Engine> {
        // SAFETY: as in `engine`.
        unsafe { &mut *RUNTIME.engine.get() }.as_mut()
    }

    /// The engine, made if there is none yet.
    fn engine_or_new(&mut self) -> &mut Engine {
        self.engine();
        // SAFETY: as in `engine`.
        unsafe { &mut *RUNTIME.engine.get() }.get_or_insert_with(Engine::default)
    }

    /// Recomputes the GIL holder's membership (a scope opened or closed, or another thread)
    /// and caches it.
    #[cold]
    #[inline(never)]
    pub(super) fn refresh_membership(&mut self, tstate: usize) -> Option<Membership> {
        let fast_sites = RUNTIME.sites.load(Relaxed) == SITES_FRAMES;
        let engine = self.engine()?;
        let mask = engine.tracker.membership(current_thread_id());
        let membership = engine.tracker.classify(mask);
        let fast = membership.is_single() && fast_sites;
        RUNTIME
            .gil_membership
            .store(membership.to_bits() | if fast { FAST } else { 0 }, Relaxed);
        RUNTIME.gil_thread.store(tstate, Relaxed);
        Some(membership)
    }
}

impl Drop for Claim {
    #[inline(always)]
    fn drop(&mut self) {
        // Only the GIL holder writes the flags. The busy flag goes back to what it was, and
        // [`ACTIVE`] too unless the claim may have turned tracing on or off.
        let active = if self.may_switch {
            RUNTIME.flags.load(Relaxed)
        } else {
            self.before
        } & ACTIVE;
        RUNTIME.flags.store(active | self.before & BUSY, Relaxed);
    }
}

#[cold]
#[inline(never)]
fn apply_pending(engine: &mut Option<Engine>) {
    let mut events = engine
        .as_mut()
        .map(|engine| std::mem::take(&mut engine.spare_events))
        .unwrap_or_default();
    {
        let mut queue = RUNTIME.pending.lock();
        RUNTIME.has_pending.store(false, Relaxed);
        std::mem::swap(&mut *queue, &mut events);
    }
    // The `dlopen` trampoline sets the flag too: the objects it loaded get the hooks, and the
    // flag stays while it may still be loading them.
    #[cfg(native_hooks)]
    if RUNTIME.native.refresh() {
        RUNTIME.has_pending.store(true, Relaxed);
    }
    let Some(engine) = engine.as_mut() else {
        return;
    };
    for event in events.drain(..) {
        match event {
            Pending::Alloc {
                address,
                size,
                thread,
            } => {
                let mask = engine.tracker.membership(thread);
                engine.tracker.on_alloc(address, size, NATIVE_SITE, mask);
            }
            Pending::Free { address } => engine.tracker.on_free(address),
        }
    }
    engine.spare_events = events;
}

/// The running thread state, for a hook of the GIL holder (which has one).
#[inline(always)]
pub(super) fn gil_thread_state() -> usize {
    // SAFETY: reads the current thread state.
    unsafe { ffi::compat::PyThreadState_GetUnchecked() as usize }
}

thread_local! {
    /// Set while this thread, without the GIL, is inside a hook: nested allocations pass
    /// through.
    static BUSY_WITHOUT_GIL: Cell<bool> = const { Cell::new(false) };
}

/// Who runs a hook: the thread that holds the GIL, with its claim on the engine, or a thread
/// without it (a raw-domain or NumPy hook), which queues its events.
pub(super) enum Caller<'a> {
    GilHolder(&'a mut Claim),
    WithoutGil,
}

// ----- the engine's interface -----

/// Runs `f` with this thread's allocations untraced: for the engine's own work.
pub fn untraced<R>(_py: Python<'_>, f: impl FnOnce() -> R) -> R {
    RUNTIME.untraced(f)
}

/// How the hooks find an allocation's line, decided when the first scope opens: by reading
/// the interpreter's frames (3.11 to 3.15 with the GIL, once their layout checked out
/// against the public API) or through the public API (other versions, or a layout that did
/// not check out).
pub fn site_lookup() -> &'static str {
    #[cfg(read_frames)]
    if !frames::checked() {
        return "unchecked";
    }
    if frames_validated() {
        "frames"
    } else {
        "public-api"
    }
}

/// Whether the hooks can tell which threads hold the engine's GIL: from 3.12 they read the
/// thread state's interpreter field, whose place is checked here when the first scope opens.
/// A scope does not open when it is not there (not seen: it has not moved since 3.9).
pub(crate) fn thread_state_checked(py: Python<'_>) -> bool {
    RUNTIME.check_interp_field(py)
}

/// Whether the hooks may read the interpreter's frames (their layout checked out).
fn frames_validated() -> bool {
    #[cfg(read_frames)]
    return frames::validated().is_some();
    #[cfg(not(read_frames))]
    return false;
}

/// Starts tracing if it is not running (installs the hooks) and runs `f` on the engine.
pub(crate) fn with_engine<R>(py: Python<'_>, f: impl FnOnce(&mut Engine) -> R) -> R {
    // All of it untraced: a scope that just opened must not count the engine's work, such
    // as patching NumPy (which looks the module up), nor the first scope more than the next.
    RUNTIME.untraced(|| {
        #[cfg(read_frames)]
        // SAFETY: the token says the GIL is held.
        unsafe {
            frames::validate()
        };
        // The claim ends before the hooks are installed and NumPy is patched, which may run
        // Python code.
        let (result, idle, native) = {
            let mut claim = RUNTIME.claim_with_gil(py);
            let engine = claim.engine_or_new();
            let result = f(engine);
            let idle = engine.tracker.is_idle();
            let native = engine.wants_native();
            let sites = match (engine.wants_sites(), frames_validated()) {
                (false, _) => SITES_NONE,
                (true, true) => SITES_FRAMES,
                (true, false) => SITES_PUBLIC,
            };
            RUNTIME.sites.store(sites, Relaxed);
            // The GIL holder's cached membership is stale.
            RUNTIME.gil_thread.store(0, Relaxed);
            let flags = RUNTIME.flags.load(Relaxed);
            RUNTIME.flags.store(
                if idle {
                    flags & !ACTIVE
                } else {
                    flags | ACTIVE
                },
                Release,
            );
            (result, idle, native)
        };
        RUNTIME.install_or_uninstall(py, idle, native);
        result
    })
}

/// Runs `f` on the tracker, if there is one, without touching the hooks: for reading figures
/// of an open scope often (the line profiler does at every line).
pub(crate) fn with_tracker<R>(py: Python<'_>, f: impl FnOnce(&mut Tracker) -> R) -> Option<R> {
    with_engine_if_any(py, |engine| f(&mut engine.tracker))
}

/// Runs `f` on the engine, if there is one, without touching the hooks: for the site table.
pub(super) fn with_engine_if_any<R>(py: Python<'_>, f: impl FnOnce(&mut Engine) -> R) -> Option<R> {
    let mut claim = RUNTIME.claim_with_gil(py);
    claim.engine().map(f)
}

/// Whether this build can trace native allocations: Linux on x86_64 (see `native`).
pub fn native_supported() -> bool {
    cfg!(native_hooks)
}

/// Whether the malloc family's slots hold the hooks now.
pub fn native_traced() -> bool {
    #[cfg(native_hooks)]
    return RUNTIME.native.installed();
    #[cfg(not(native_hooks))]
    return false;
}

/// Keeps the native hooks in while no scope is open (`hold`), or gives that back: for a
/// session of many native scopes, which then neither patch nor restore the slots each time.
/// Returns whether the hooks are in now.
pub fn hold_native(py: Python<'_>, hold: bool) -> bool {
    #[cfg(native_hooks)]
    {
        let held = RUNTIME.untraced(|| RUNTIME.native.hold(hold));
        if !held {
            // The runtime decides, as a scope closing does: out unless a native scope is open.
            with_engine(py, |_| ());
        }
        RUNTIME.native.installed()
    }
    #[cfg(not(native_hooks))]
    {
        let _ = (py, hold);
        false
    }
}

/// The loaded objects' slots for the interposed functions, walked now: how many there are and
/// how many hold a hook. For tests: after the last native scope, none does.
pub fn native_slots(py: Python<'_>) -> (usize, usize) {
    #[cfg(native_hooks)]
    return RUNTIME.untraced(|| {
        let _ = py;
        RUNTIME.native.slots_hold_hooks()
    });
    #[cfg(not(native_hooks))]
    {
        let _ = py;
        (0, 0)
    }
}
