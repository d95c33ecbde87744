//! The engine and who may touch it: the state the hooks feed (the tracker and the site table),
//! its owner (the thread that holds the GIL; threads without it queue their events), the hooks'
//! flags, and the interface the rest of the crate uses.

use std::cell::{Cell, UnsafeCell};
use std::ops::{Deref, DerefMut};
#[cfg(Py_3_12)]
use std::sync::atomic::AtomicPtr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::*};

use pyo3::ffi;
use pyo3::prelude::*;

use super::current_thread_id;
use super::domains::{install_pymem_hooks, uninstall_pymem_hooks};
#[cfg(read_frames)]
use super::frames;
use super::numpy::{patch_numpy, unpatch_numpy};
use super::sites::SiteTable;
use crate::engine::tracker::{Membership, ScopeMask, Tracker, NATIVE_SITE};

#[derive(Default)]
pub(crate) struct Engine {
    pub(crate) tracker: Tracker,
    pub(super) sites: SiteTable,
    /// Open scopes that report no sites (the line profiler's): while only they are open,
    /// the hooks skip the frame lookup.
    siteless: ScopeMask,
}

impl Engine {
    pub(crate) fn set_siteless(&mut self, slot: usize, siteless: bool) {
        let bit = 1 << slot;
        self.siteless = if siteless {
            self.siteless | bit
        } else {
            self.siteless & !bit
        };
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

// SAFETY: `value` is only reached through a guard, and one guard exists at a time.
unsafe impl<T: Send> Sync for SpinLock<T> {}

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

/// A fork copies the process with only the forking thread: had another thread held [`PENDING`]'s
/// lock at that moment (mid-push, the queue half-written), the child would spin on it forever at
/// its next use of the engine. Before a fork the forking thread takes the lock, so that no one is
/// inside the queue, and after it the parent and the child each let it go: the child's queue is
/// whole, and its events, about memory the child has a copy of, still hold.
#[cfg(unix)]
fn handle_forks() {
    extern "C" fn prepare() {
        std::mem::forget(PENDING.lock());
    }
    extern "C" fn after() {
        PENDING.locked.store(false, Release);
    }
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: the handlers touch only the lock, an atomic, and take no other lock.
        let status = unsafe { libc::pthread_atfork(Some(prepare), Some(after), Some(after)) };
        debug_assert_eq!(status, 0, "pthread_atfork");
    });
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

/// The engine belongs to whichever thread holds the GIL: the hooks of the mem and object
/// domains always run with it, and so does every call from Python. Threads without the GIL
/// (the raw domain and NumPy may be called so) never touch it: they queue their events in
/// [`PENDING`], which the GIL holder applies before its next use of the engine. So the
/// hooks' common case takes no lock.
///
/// The queue keeps the order that matters: a thread queues a free before the memory goes
/// back to the allocator, whose own locking orders that before any reuse of the address, so
/// the GIL holder sees [`HAS_PENDING`] before it records the address again.
pub(super) struct GilCell<T>(pub(super) UnsafeCell<T>);

// SAFETY: the value is only reached through `engine`, whose callers hold the GIL.
unsafe impl<T: Send> Sync for GilCell<T> {}

pub(super) static ENGINE: GilCell<Option<Engine>> = GilCell(UnsafeCell::new(None));

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

static PENDING: SpinLock<Vec<Pending>> = SpinLock {
    locked: AtomicBool::new(false),
    value: UnsafeCell::new(Vec::new()),
};
pub(super) static HAS_PENDING: AtomicBool = AtomicBool::new(false);
/// The hooks' state, the first thing every hook reads: [`ACTIVE`] and [`GIL_BUSY`]. Only
/// the thread that holds the GIL writes it, so a load and a store need no atomic
/// read-modify-write; threads without the GIL read only [`ACTIVE`].
static HOOKS: AtomicU8 = AtomicU8::new(0);
/// Set while a scope is open: the hooks do nothing else when it is clear.
const ACTIVE: u8 = 1;
/// Set while the GIL holder is inside a hook or the engine's own work: nested allocations
/// pass through. pymalloc hands requests over 512 bytes to the raw domain, whose hook sees
/// this flag and that it holds the GIL, and leaves the block to the outer hook.
const GIL_BUSY: u8 = 2;

/// How the hooks find allocation sites: [`SITES_NONE`] while no open scope reports sites,
/// else by reading the interpreter's frames ([`SITES_FRAMES`], once their layout checked
/// out) or through the public API.
pub(super) static SITES: AtomicU8 = AtomicU8::new(SITES_NONE);
pub(super) const SITES_NONE: u8 = 0;
pub(super) const SITES_FRAMES: u8 = 1;
const SITES_PUBLIC: u8 = 2;

/// The engine, with the events queued by threads without the GIL applied.
///
/// # Safety
/// The caller holds the GIL and no other borrow of the engine is alive: the hooks run with
/// [`GIL_BUSY`] set, so a hook nested in the engine's work passes through, and the other
/// callers run untraced or do not allocate.
#[inline(always)]
pub(super) unsafe fn engine() -> &'static mut Option<Engine> {
    // SAFETY: as the caller promises, this is the only borrow, made under the GIL.
    let engine = unsafe { &mut *ENGINE.0.get() };
    if HAS_PENDING.load(Relaxed) {
        apply_pending(engine);
    }
    engine
}

#[cold]
#[inline(never)]
fn apply_pending(engine: &mut Option<Engine>) {
    let events = {
        let mut queue = PENDING.lock();
        HAS_PENDING.store(false, Relaxed);
        std::mem::take(&mut *queue)
    };
    let Some(engine) = engine.as_mut() else {
        return;
    };
    for event in events {
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
}

/// Queues an event of a thread without the GIL.
#[cold]
#[inline(never)]
pub(super) fn queue(event: Pending) {
    let mut queue = PENDING.lock();
    queue.push(event);
    HAS_PENDING.store(true, Relaxed);
}

/// Whether this thread holds the main interpreter's GIL, which guards the engine.
///
/// Up to 3.11 the running thread state is the GIL holder's, a global: the thread holds the
/// GIL when that is its own. Unlike `PyGILState_Check`, this stays right once a
/// subinterpreter exists (3.11 turns that check off then and answers yes); a thread of
/// another interpreter counts as without the GIL, and queues.
#[cfg(not(Py_3_12))]
fn holds_gil() -> bool {
    // SAFETY: both only read the runtime's and this thread's state, without the GIL.
    unsafe {
        let running = ffi::compat::PyThreadState_GetUnchecked();
        !running.is_null() && running == ffi::PyGILState_GetThisThreadState()
    }
}

/// From 3.12 the running thread state is this thread's own while it holds a GIL, and an
/// interpreter may have a GIL of its own: the thread holds the engine's GIL when it runs
/// in the main interpreter.
#[cfg(Py_3_12)]
fn holds_gil() -> bool {
    // SAFETY: reads this thread's state; `interp` is the third field of `PyThreadState`
    // (`Include/cpython/pystate.h`, after `prev` and `next`) in every version since 3.9.
    unsafe {
        let running = ffi::compat::PyThreadState_GetUnchecked();
        !running.is_null()
            && *running.cast::<*mut ffi::PyInterpreterState>().add(2)
                == MAIN_INTERPRETER.load(Relaxed)
    }
}

/// The main interpreter, stored when the hooks are installed (3.12+: see [`holds_gil`]).
#[cfg(Py_3_12)]
static MAIN_INTERPRETER: AtomicPtr<ffi::PyInterpreterState> = AtomicPtr::new(std::ptr::null_mut());

/// Whether a hook of the mem or object domain, called with a GIL, holds the engine's: up
/// to 3.11 there is one GIL; from 3.12 a subinterpreter's own GIL does not count.
#[inline(always)]
fn gil_domain_holds_gil() -> bool {
    #[cfg(not(Py_3_12))]
    return true;
    #[cfg(Py_3_12)]
    return holds_gil();
}

// One thread at a time holds the GIL, so the hooks' state for it is global, read and
// written only by the GIL holder, which costs less than a thread-local (a `__tls_get_addr`
// call from a shared library). Hooks called without the GIL keep a thread-local.

/// The thread state whose [`Membership`] is cached, and the membership; a scope opening or
/// closing clears it. A thread state's memory is freed through the raw domain, whose hook clears
/// the cache if it was that thread's: a new thread given the same address recomputes.
/// (A thread started by `threading` never meets a stale entry, since its parent allocates
/// after making its thread state; a C thread entering Python through PyGILState_Ensure
/// makes its own and could.)
pub(super) static GIL_THREAD: AtomicUsize = AtomicUsize::new(0);
static GIL_MEMBERSHIP: AtomicU64 = AtomicU64::new(0);

pub(super) fn gil_thread_state() -> usize {
    // SAFETY: reads the current thread state; the GIL holder has one.
    unsafe { ffi::compat::PyThreadState_GetUnchecked() as usize }
}

thread_local! {
    /// Set while this thread, without the GIL, is inside a hook: nested allocations pass
    /// through.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Who runs a hook: the thread that holds the GIL, which records the event in the engine, or
/// a thread without it (a raw-domain or NumPy hook), which queues the event.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Caller {
    GilHolder,
    WithoutGil,
}

/// The GIL holder's cached membership, as [`GIL_MEMBERSHIP`]'s bits, when it is this thread
/// state's and no scope opened or closed since it was computed.
///
/// `tstate`: [`gil_thread_state`], read once per hook.
#[inline(always)]
pub(super) fn cached_membership(tstate: usize) -> Option<u64> {
    (tstate != 0 && GIL_THREAD.load(Relaxed) == tstate).then(|| GIL_MEMBERSHIP.load(Relaxed))
}

/// Set in [`GIL_MEMBERSHIP`] above the membership's bits when the GIL holder's allocations
/// may take [`record_alloc_fast`]: the membership [`Membership::is_single`], and sites come
/// from the frames. A scope opening or closing and a change of [`SITES`] clear the cache.
pub(super) const FAST: u64 = 1 << 40;

/// Recomputes the GIL holder's membership (a scope opened or closed, or another thread).
#[cold]
#[inline(never)]
pub(super) fn refresh_membership(engine: &mut Engine, tstate: usize) -> Membership {
    let mask = engine.tracker.membership(current_thread_id());
    let membership = engine.tracker.classify(mask);
    let fast = membership.is_single() && SITES.load(Relaxed) == SITES_FRAMES;
    GIL_MEMBERSHIP.store(membership.to_bits() | if fast { FAST } else { 0 }, Relaxed);
    GIL_THREAD.store(tstate, Relaxed);
    membership
}

/// Runs `traced` with the caller's busy flag set, or `untraced` when tracing is off, for a
/// nested call, or for a thread being torn down. `gil_domain`: the hook is the mem or
/// object domain's, always called with the GIL; other hooks find out.
#[inline(always)]
pub(super) fn enter<R>(
    gil_domain: bool,
    traced: impl FnOnce(Caller) -> R,
    untraced: impl FnOnce() -> R,
) -> R {
    let state = HOOKS.load(Relaxed);
    if state & ACTIVE == 0 {
        return untraced();
    }
    let holds_gil = if gil_domain {
        gil_domain_holds_gil()
    } else {
        holds_gil()
    };
    if holds_gil {
        if state & GIL_BUSY != 0 {
            return untraced();
        }
        HOOKS.store(ACTIVE | GIL_BUSY, Relaxed);
        let result = traced(Caller::GilHolder);
        // Nothing a hook runs opens or closes a scope: tracing is still on.
        HOOKS.store(ACTIVE, Relaxed);
        return result;
    }
    let busy = BUSY.try_with(|busy| busy.replace(true));
    if busy != Ok(false) {
        return untraced();
    }
    let result = traced(Caller::WithoutGil);
    let _ = BUSY.try_with(|busy| busy.set(false));
    result
}

/// Runs `f` with this thread's allocations untraced: for the engine's own work.
pub fn untraced<R>(_py: Python<'_>, f: impl FnOnce() -> R) -> R {
    let before = HOOKS.load(Relaxed);
    HOOKS.store(before | GIL_BUSY, Relaxed);
    let result = f();
    // `f` may have turned tracing on or off: only the busy flag is put back.
    HOOKS.store(HOOKS.load(Relaxed) & !GIL_BUSY | before & GIL_BUSY, Relaxed);
    result
}

// ----- the engine's interface -----

/// How the hooks find an allocation's line, decided when the first scope opens: by reading
/// the interpreter's frames (3.11 to 3.13 with the GIL, once their layout checked out
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
    untraced(py, || {
        #[cfg(read_frames)]
        // SAFETY: the token says the GIL is held.
        unsafe {
            frames::validate()
        };
        // The engine's borrow ends before the hooks are installed and NumPy is patched,
        // which may run Python code.
        let (result, idle) = {
            // SAFETY: the token says the GIL is held, and `untraced` keeps nested hooks out.
            let engine = unsafe { engine() }.get_or_insert_with(Engine::default);
            let result = f(engine);
            let idle = engine.tracker.is_idle();
            let sites = match (engine.wants_sites(), frames_validated()) {
                (false, _) => SITES_NONE,
                (true, true) => SITES_FRAMES,
                (true, false) => SITES_PUBLIC,
            };
            SITES.store(sites, Relaxed);
            // The GIL holder's cached membership is stale.
            GIL_THREAD.store(0, Relaxed);
            let state = HOOKS.load(Relaxed);
            HOOKS.store(
                if idle {
                    state & !ACTIVE
                } else {
                    state | ACTIVE
                },
                Release,
            );
            (result, idle)
        };
        if idle {
            uninstall_pymem_hooks(py);
            unpatch_numpy(py);
        } else {
            #[cfg(Py_3_12)]
            // SAFETY: the token says the GIL is held.
            MAIN_INTERPRETER.store(unsafe { ffi::PyInterpreterState_Main() }, Relaxed);
            #[cfg(unix)]
            handle_forks();
            install_pymem_hooks(py);
            patch_numpy(py);
        }
        result
    })
}

/// Runs `f` on the tracker, if there is one, without touching the hooks: for reading figures
/// of an open scope often (the line profiler does at every line). `f` must not allocate.
pub(crate) fn with_tracker<R>(_py: Python<'_>, f: impl FnOnce(&mut Tracker) -> R) -> Option<R> {
    // SAFETY: the token says the GIL is held; `f` does not allocate, so no hook runs.
    unsafe { engine() }
        .as_mut()
        .map(|engine| f(&mut engine.tracker))
}
