//! Everything unsafe lives here: the CPython allocator hooks, the NumPy data-allocator patch, the
//! frame lookups that attribute an allocation to a line, and the few OS calls.
//!
//! The hooks wrap the allocators that were installed before them and feed [`Tracker`]. Rules
//! that keep them correct:
//! - A "busy" flag is held while a hook calls the original allocator, so nested calls
//!   (pymalloc hands requests over 512 bytes to the raw domain; a frame lookup through the
//!   public API may allocate a frame object) pass straight through: nothing is counted twice
//!   and the engine's own allocations are never counted. The thread that holds the GIL keeps
//!   it in a global that only the GIL holder touches; the raw domain and NumPy's allocator,
//!   also called without the GIL, keep it in a thread-local then.
//! - The engine belongs to the GIL holder and takes no lock; threads without the GIL queue
//!   their events for it. No borrow of the engine is alive while calling into Python, which
//!   may allocate.
//! - A block is forgotten before the original `free` runs, so another thread that receives the
//!   same address cannot have its record removed.
//! - The hooks read the original allocator from statics, not from `ctx`, and are installed with
//!   the original `ctx`: a reader that sees a half-written allocator struct still calls a
//!   consistent pair.

/// The size of a memory page, for turning page counts into bytes.
pub fn page_size() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions; it returns -1 on error, handled below.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if size > 0 {
            return size as u64;
        }
    }
    4096
}

/// The CPU time (user and system) this process has used, in seconds.
pub fn own_cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        // SAFETY: an all-zero rusage is a valid out value, and getrusage only writes to it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_SELF with a valid out pointer.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return None;
        }
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
    }
    #[cfg(not(unix))]
    None
}

/// The calling thread's id, from the kernel once per thread: the hooks ask whenever another
/// thread takes the GIL, which threads contending for a lock do hundreds of thousands of times
/// a second, and `gettid` is a system call.
#[cfg(target_os = "linux")]
mod linux_thread_id {
    use std::cell::Cell;
    use std::sync::Once;

    thread_local! {
        /// 0 until asked; forgotten in a forked child, whose thread has an id of its own.
        static ID: Cell<u64> = const { Cell::new(0) };
    }
    static FORGET_AFTER_FORK: Once = Once::new();

    extern "C" fn forget_in_child() {
        let _ = ID.try_with(|id| id.set(0));
    }

    pub(super) fn get() -> u64 {
        match ID.try_with(Cell::get) {
            Ok(0) => {}
            Ok(id) => return id,
            // The thread is being torn down: ask the kernel.
            // SAFETY: gettid takes no arguments and cannot fail.
            Err(_) => return unsafe { libc::syscall(libc::SYS_gettid) as u64 },
        }
        FORGET_AFTER_FORK.call_once(|| {
            // SAFETY: registers a handler that only writes this module's thread-local; a
            // failure (out of memory) leaves forked children with their parent's id for the
            // forking thread, as if the handler had not run.
            unsafe { libc::pthread_atfork(None, None, Some(forget_in_child)) };
        });
        // SAFETY: gettid takes no arguments and cannot fail.
        let id = unsafe { libc::syscall(libc::SYS_gettid) as u64 };
        let _ = ID.try_with(|cached| cached.set(id));
        id
    }

    #[cfg(test)]
    mod tests {
        fn kernel_id() -> u64 {
            // SAFETY: gettid takes no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_gettid) as u64 }
        }

        #[test]
        fn each_thread_and_a_forked_child_get_their_own_id() {
            assert_eq!(super::get(), kernel_id());
            assert_eq!(super::get(), kernel_id()); // cached
            let other = std::thread::spawn(|| (super::get(), kernel_id()))
                .join()
                .unwrap();
            assert_eq!(other.0, other.1);
            assert_ne!(other.0, super::get());
            // SAFETY: the child only makes system calls and leaves with _exit.
            let child = unsafe { libc::fork() };
            assert!(child >= 0, "fork failed");
            if child == 0 {
                let right = super::get() == kernel_id();
                // SAFETY: ends the child without running the parent's atexit handlers.
                unsafe { libc::_exit(if right { 0 } else { 1 }) };
            }
            let mut status = 0;
            // SAFETY: waits for the child just forked; `status` is a valid out pointer.
            unsafe { libc::waitpid(child, &mut status, 0) };
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{status}"
            );
        }
    }
}

/// The OS id of the calling thread: the value `threading.get_native_id()` returns.
pub fn current_thread_id() -> u64 {
    #[cfg(target_os = "linux")]
    {
        linux_thread_id::get()
    }
    #[cfg(target_os = "macos")]
    {
        let mut id: u64 = 0;
        // SAFETY: a null thread means the calling thread; `id` is a valid out pointer.
        unsafe { libc::pthread_threadid_np(0, &mut id) };
        id
    }
    #[cfg(windows)]
    {
        #[link(name = "kernel32")]
        extern "system" {
            fn GetCurrentThreadId() -> u32;
        }
        // SAFETY: GetCurrentThreadId takes no arguments and cannot fail.
        u64::from(unsafe { GetCurrentThreadId() })
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
    {
        thread_local!(static ANCHOR: u8 = const { 0 });
        ANCHOR.with(|anchor| anchor as *const u8 as u64)
    }
}

#[cfg(feature = "python")]
pub use python::*;

#[cfg(feature = "python")]
mod python {
    use std::cell::{Cell, UnsafeCell};
    use std::ffi::{c_char, c_int, c_void, CStr};
    use std::ops::{Deref, DerefMut};
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering::*};

    use pyo3::ffi;
    use pyo3::prelude::*;
    use pyo3::types::PyCapsule;

    use super::current_thread_id;
    use crate::tracker::{FastMap, Membership, ScopeMask, SiteId, Tracker, NATIVE_SITE};

    // ----- engine state -----

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
    enum RawSite {
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

    struct SiteTable {
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
        fn intern(&mut self, site: Option<RawSite>) -> SiteId {
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
        fn cached(&self, instruction: usize) -> Result<SiteId, usize> {
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

    #[derive(Default)]
    pub(crate) struct Engine {
        pub(crate) tracker: Tracker,
        sites: SiteTable,
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
    struct GilCell<T>(UnsafeCell<T>);

    // SAFETY: the value is only reached through `engine`, whose callers hold the GIL.
    unsafe impl<T: Send> Sync for GilCell<T> {}

    static ENGINE: GilCell<Option<Engine>> = GilCell(UnsafeCell::new(None));

    /// An event of a thread without the GIL, for the GIL holder to apply.
    enum Pending {
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
    static HAS_PENDING: AtomicBool = AtomicBool::new(false);
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
    static SITES: AtomicU8 = AtomicU8::new(SITES_NONE);
    const SITES_NONE: u8 = 0;
    const SITES_FRAMES: u8 = 1;
    const SITES_PUBLIC: u8 = 2;

    /// The engine, with the events queued by threads without the GIL applied.
    ///
    /// # Safety
    /// The caller holds the GIL and no other borrow of the engine is alive: the hooks run with
    /// [`GIL_BUSY`] set, so a hook nested in the engine's work passes through, and the other
    /// callers run untraced or do not allocate.
    #[inline(always)]
    unsafe fn engine() -> &'static mut Option<Engine> {
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
    fn queue(event: Pending) {
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
    static MAIN_INTERPRETER: AtomicPtr<ffi::PyInterpreterState> =
        AtomicPtr::new(std::ptr::null_mut());

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
    static GIL_THREAD: AtomicUsize = AtomicUsize::new(0);
    static GIL_MEMBERSHIP: AtomicU64 = AtomicU64::new(0);

    fn gil_thread_state() -> usize {
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
    enum Caller {
        GilHolder,
        WithoutGil,
    }

    /// The GIL holder's cached membership, as [`GIL_MEMBERSHIP`]'s bits, when it is this thread
    /// state's and no scope opened or closed since it was computed.
    ///
    /// `tstate`: [`gil_thread_state`], read once per hook.
    #[inline(always)]
    fn cached_membership(tstate: usize) -> Option<u64> {
        (tstate != 0 && GIL_THREAD.load(Relaxed) == tstate).then(|| GIL_MEMBERSHIP.load(Relaxed))
    }

    /// Set in [`GIL_MEMBERSHIP`] above the membership's bits when the GIL holder's allocations
    /// may take [`record_alloc_fast`]: the membership [`Membership::is_single`], and sites come
    /// from the frames. A scope opening or closing and a change of [`SITES`] clear the cache.
    const FAST: u64 = 1 << 40;

    /// Recomputes the GIL holder's membership (a scope opened or closed, or another thread).
    #[cold]
    #[inline(never)]
    fn refresh_membership(engine: &mut Engine, tstate: usize) -> Membership {
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
    fn enter<R>(
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

    /// The code object (borrowed) and instruction of the innermost Python frame of this thread.
    ///
    /// # Safety
    /// The caller holds the GIL, `tstate` is its thread state, and [`GIL_BUSY`] is set (the
    /// public API may allocate a frame object: that is the engine's, not counted).
    #[inline(always)]
    unsafe fn current_site(tstate: usize) -> Option<RawSite> {
        let mode = SITES.load(Relaxed);
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
    unsafe fn frame_code(frame: *mut ffi::PyFrameObject) -> *mut ffi::PyObject {
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
    unsafe fn public_site() -> Option<(*mut ffi::PyObject, c_int)> {
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

    /// Reading the interpreter's own frames (3.11 to 3.13), as profilers such as py-spy and
    /// memray do: the public API would make a frame object for every frame that allocates.
    ///
    /// The layouts are those of CPython's headers (`Include/cpython/pystate.h`,
    /// `Include/internal/pycore_frame.h`) for each version; only 3.11 runs here. Before first
    /// use they are checked against the public API on the caller's frame, and a mismatch keeps
    /// the public API.
    #[cfg(read_frames)]
    mod frames {
        use std::ffi::c_int;
        use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

        use pyo3::ffi;

        /// Where `PyThreadState` keeps the current frame: the `cframe` pointer, then the
        /// frame pointer inside `_PyCFrame` (3.11, 3.12); or the frame pointer itself (3.13).
        #[cfg(not(Py_3_12))]
        const PATH: (usize, Option<usize>) = (56, Some(8));
        #[cfg(all(Py_3_12, not(Py_3_13)))]
        const PATH: (usize, Option<usize>) = (56, Some(0));
        #[cfg(Py_3_13)]
        const PATH: (usize, Option<usize>) = (72, None);

        /// Offsets in `_PyInterpreterFrame` of the code object, the previous frame, the
        /// instruction pointer and the owner byte.
        #[cfg(not(Py_3_12))]
        const FRAME: (usize, usize, usize, usize) = (32, 48, 56, 69);
        #[cfg(Py_3_12)]
        const FRAME: (usize, usize, usize, usize) = (0, 8, 56, 70);
        /// Frames the interpreter pushes for C calls into it (3.12+), with no Python code.
        const OWNED_BY_CSTACK: u8 = 3;

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
                    if cfg!(not(Py_3_12)) || read::<u8>(frame, owner_at) != OWNED_BY_CSTACK {
                        let code: *mut ffi::PyObject = read(frame, code_at);
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
            let public = unsafe { super::public_site() };
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
    }

    #[inline(always)]
    fn record_alloc(caller: Caller, address: *mut c_void, size: usize) {
        if caller == Caller::WithoutGil {
            return queue(Pending::Alloc {
                address: address as usize,
                size,
                thread: current_thread_id(),
            });
        }
        let tstate = gil_thread_state();
        let cached = cached_membership(tstate);
        if let Some(bits) = cached {
            if bits as ScopeMask == 0 {
                return; // No open scope follows this thread.
            }
            #[cfg(read_frames)]
            // SAFETY: the caller holds the GIL, `tstate` is its thread state, and the cache
            // says the fast path applies.
            if bits & FAST != 0 && unsafe { record_alloc_fast(tstate, address, size, bits) } {
                return;
            }
        }
        record_alloc_slowly(tstate, cached, address, size);
    }

    /// [`record_alloc`] of the GIL holder when the cache says [`FAST`]: the common case of one
    /// scope, a site in the site cache and a block that fits a shadow word. Returns false,
    /// having recorded nothing, for [`record_alloc_slowly`] to do it all.
    ///
    /// # Safety
    /// The caller holds the GIL with its busy flag set, `tstate` is its thread state, and
    /// `bits` is its cached membership, with [`FAST`] set.
    #[cfg(read_frames)]
    #[inline(always)]
    unsafe fn record_alloc_fast(
        tstate: usize,
        address: *mut c_void,
        size: usize,
        bits: u64,
    ) -> bool {
        if HAS_PENDING.load(Relaxed) {
            return false; // Other threads' events go first.
        }
        // SAFETY: as the caller promises; [`FAST`] says the layouts were validated.
        let Some((_, instruction)) = (unsafe { frames::walk(tstate as *const u8) }) else {
            return false;
        };
        // SAFETY: the caller holds the GIL, and its busy flag keeps nested hooks out. A cached
        // membership was computed by the engine, which, once made, stays.
        let Some(engine) = (unsafe { &mut *ENGINE.0.get() }).as_mut() else {
            return false;
        };
        let Ok(site) = engine.sites.cached(instruction) else {
            return false;
        };
        let membership = Membership::from_bits(bits);
        engine
            .tracker
            .on_alloc_single(address as usize, size, site, membership)
    }

    /// [`record_alloc`] of the GIL holder, every case.
    #[inline(never)]
    fn record_alloc_slowly(tstate: usize, cached: Option<u64>, address: *mut c_void, size: usize) {
        // SAFETY: the caller holds the GIL and `tstate` is its thread state.
        let site = unsafe { current_site(tstate) };
        // SAFETY: the caller holds the GIL, and its busy flag keeps nested hooks out.
        let Some(engine) = (unsafe { engine() }) else {
            return;
        };
        let membership = match cached {
            Some(bits) => Membership::from_bits(bits),
            None => refresh_membership(engine, tstate),
        };
        let site = engine.sites.intern(site);
        engine
            .tracker
            .on_alloc_as(address as usize, size, site, membership);
    }

    #[inline(always)]
    fn forget(caller: Caller, address: *mut c_void) {
        if caller == Caller::WithoutGil {
            return queue(Pending::Free {
                address: address as usize,
            });
        }
        // SAFETY: the caller holds the GIL, and its busy flag keeps nested hooks out.
        if let Some(engine) = unsafe { engine() } {
            engine.tracker.on_free(address as usize);
        }
    }

    /// `gil_domain`: the hook is the mem or object domain's, always called with the GIL.
    #[inline(always)]
    fn traced_alloc(
        size: usize,
        gil_domain: bool,
        allocate: impl Fn() -> *mut c_void,
    ) -> *mut c_void {
        enter(
            gil_domain,
            |caller| {
                let address = allocate();
                if !address.is_null() {
                    record_alloc(caller, address, size);
                }
                address
            },
            &allocate,
        )
    }

    #[inline(always)]
    fn traced_realloc(
        old: *mut c_void,
        new_size: usize,
        gil_domain: bool,
        reallocate: impl Fn() -> *mut c_void,
    ) -> *mut c_void {
        enter(
            gil_domain,
            |caller| {
                // The old block is forgotten before the realloc frees it: another thread may
                // get its address at once.
                let old_block = match (old.is_null(), caller) {
                    (true, _) => None,
                    (false, Caller::GilHolder) => {
                        // SAFETY: the caller holds the GIL and its busy flag is set.
                        unsafe { engine() }
                            .as_mut()
                            .and_then(|engine| engine.tracker.take_block(old as usize))
                    }
                    (false, Caller::WithoutGil) => {
                        // Queued as a free: should the realloc fail (out of memory), the
                        // block stays forgotten, its bytes off the scopes that counted it.
                        forget(caller, old);
                        None
                    }
                };
                let address = reallocate();
                if !address.is_null() {
                    record_alloc(caller, address, new_size);
                } else if let (Some(block), true) = (old_block, new_size > 0) {
                    // The realloc failed and the old block is still there.
                    // SAFETY: as above (only the GIL holder takes a block).
                    if let Some(engine) = unsafe { engine() } {
                        engine.tracker.restore(old as usize, block);
                    }
                }
                address
            },
            &reallocate,
        )
    }

    #[inline(always)]
    fn traced_free(address: *mut c_void, gil_domain: bool, release: impl Fn()) {
        if !gil_domain && address as usize == GIL_THREAD.load(Relaxed) {
            // A thread state is freed here (a thread ended): a new thread may get its address.
            let _ = GIL_THREAD.compare_exchange(address as usize, 0, Relaxed, Relaxed);
        }
        if address.is_null() {
            return release();
        }
        if gil_domain {
            // The GIL holder forgets the block, then frees it outside the busy flag: the free
            // is a tail call, and the hook keeps fewer registers. (pymalloc hands a large
            // block's free to the raw domain, whose hook then finds nothing left to forget.)
            enter(gil_domain, |caller| forget(caller, address), || ());
            return release();
        }
        enter(
            gil_domain,
            |caller| {
                forget(caller, address);
                release();
            },
            &release,
        )
    }

    // ----- CPython's three allocator domains -----

    const RAW: usize = 0;
    const DOMAINS: [ffi::PyMemAllocatorDomain; 3] = [
        ffi::PyMemAllocatorDomain::PYMEM_DOMAIN_RAW,
        ffi::PyMemAllocatorDomain::PYMEM_DOMAIN_MEM,
        ffi::PyMemAllocatorDomain::PYMEM_DOMAIN_OBJ,
    ];

    type MallocFn = extern "C" fn(*mut c_void, usize) -> *mut c_void;
    type CallocFn = extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
    type ReallocFn = extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void;
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
    static ORIGINALS: [Original; 3] = [UNSET, UNSET, UNSET];
    /// Whether our hooks are in a domain's allocator chain (possibly under someone else's).
    static CHAINED: [AtomicBool; 3] = [const { AtomicBool::new(false) }; 3];

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
                    malloc: std::mem::transmute::<usize, Option<MallocFn>>(
                        self.malloc.load(Relaxed),
                    ),
                    calloc: std::mem::transmute::<usize, Option<CallocFn>>(
                        self.calloc.load(Relaxed),
                    ),
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
        let original = &ORIGINALS[D];
        // SAFETY: the malloc field holds a MallocFn, and this hook is installed.
        let (ctx, malloc) = unsafe { original.get::<MallocFn>(&original.malloc) };
        traced_alloc(size, D != RAW, || malloc(ctx, size))
    }

    extern "C" fn hook_calloc<const D: usize>(
        _ctx: *mut c_void,
        count: usize,
        size: usize,
    ) -> *mut c_void {
        let original = &ORIGINALS[D];
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
        let original = &ORIGINALS[D];
        // SAFETY: the realloc field holds a ReallocFn, and this hook is installed.
        let (ctx, realloc) = unsafe { original.get::<ReallocFn>(&original.realloc) };
        traced_realloc(old, new_size, D != RAW, || realloc(ctx, old, new_size))
    }

    extern "C" fn hook_free<const D: usize>(_ctx: *mut c_void, address: *mut c_void) {
        // The wrapped free is looked up when called, after the block is forgotten: fewer values
        // live across the engine's work, fewer registers saved.
        traced_free(address, D != RAW, || {
            let original = &ORIGINALS[D];
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

    fn install_pymem_hooks(_py: Python<'_>) {
        for domain in 0..DOMAINS.len() {
            if CHAINED[domain].load(Relaxed) {
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
            ORIGINALS[domain].store(&current);
            let mut ours = our_hooks(domain, current.ctx);
            // SAFETY: the GIL is held; our hooks wrap the allocator that was installed, which
            // the C API allows after initialisation.
            unsafe { ffi::PyMem_SetAllocator(DOMAINS[domain], &mut ours) };
            CHAINED[domain].store(true, Relaxed);
        }
    }

    fn uninstall_pymem_hooks(_py: Python<'_>) {
        for domain in 0..DOMAINS.len() {
            let current = current_allocator(domain);
            let ours = our_hooks(domain, current.ctx);
            if current.malloc.map(|f| f as usize) != ours.malloc.map(|f| f as usize) {
                // Someone (tracemalloc, memray) wrapped ours: removing ours would remove theirs.
                // Ours stays in their chain and passes everything through while inactive.
                continue;
            }
            let mut original = ORIGINALS[domain].load();
            // SAFETY: the GIL is held; this puts back exactly the allocator we wrapped.
            unsafe { ffi::PyMem_SetAllocator(DOMAINS[domain], &mut original) };
            CHAINED[domain].store(false, Relaxed);
        }
    }

    // ----- NumPy's array buffers (NEP 49) -----
    //
    // NumPy allocates array data with its own handler, not through CPython's domains. NEP 49 lets
    // a program install a handler, but the handler lives in a context variable: a thread started
    // inside a scope would still use the default one. So the default handler's functions are
    // wrapped in place instead (its struct is a writable global in NumPy), which covers every
    // thread and context. Arrays keep a reference to their handler and free through it, so a
    // buffer allocated while wrapped and freed after unwrapping simply goes straight to NumPy.

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

    static NUMPY_HANDLER: AtomicPtr<DataHandler> = AtomicPtr::new(std::ptr::null_mut());
    static NUMPY_ORIGINAL: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];

    fn numpy_original<F: Copy>(slot: usize) -> F {
        // SAFETY: slot `slot` holds the matching fn pointer of the default handler, stored in
        // `patch_numpy` before the wrappers were installed.
        unsafe { std::mem::transmute_copy::<usize, F>(&NUMPY_ORIGINAL[slot].load(Relaxed)) }
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

    extern "C" fn numpy_realloc(
        ctx: *mut c_void,
        old: *mut c_void,
        new_size: usize,
    ) -> *mut c_void {
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
        let (name, version) =
            unsafe { (CStr::from_ptr((*handler).name.as_ptr()), (*handler).version) };
        // Only NumPy's own default handler is a global we may write; a user's may be read-only.
        (name == c"default_allocator" && version == 1).then_some(handler)
    }

    fn patch_numpy(py: Python<'_>) {
        if !NUMPY_HANDLER.load(Relaxed).is_null() {
            return;
        }
        let Some(handler) = numpy_default_handler(py) else {
            return;
        };
        // SAFETY: `handler` is NumPy's writable global default handler; the GIL is held, and
        // pointer-sized stores are atomic, so an allocation on another thread sees either the
        // original function or the wrapper, both of which work.
        unsafe {
            let allocator = &mut (*handler).allocator;
            NUMPY_ORIGINAL[0].store(allocator.malloc.map_or(0, |f| f as usize), Relaxed);
            NUMPY_ORIGINAL[1].store(allocator.calloc.map_or(0, |f| f as usize), Relaxed);
            NUMPY_ORIGINAL[2].store(allocator.realloc.map_or(0, |f| f as usize), Relaxed);
            NUMPY_ORIGINAL[3].store(allocator.free.map_or(0, |f| f as usize), Relaxed);
            if NUMPY_ORIGINAL.iter().any(|f| f.load(Relaxed) == 0) {
                return;
            }
            allocator.malloc = Some(numpy_malloc);
            allocator.calloc = Some(numpy_calloc);
            allocator.realloc = Some(numpy_realloc);
            allocator.free = Some(numpy_free);
        }
        NUMPY_HANDLER.store(handler, Relaxed);
    }

    fn unpatch_numpy(_py: Python<'_>) {
        let handler = NUMPY_HANDLER.swap(std::ptr::null_mut(), Relaxed);
        if handler.is_null() {
            return;
        }
        // SAFETY: as in `patch_numpy`; this restores the functions saved there.
        unsafe {
            let allocator = &mut (*handler).allocator;
            allocator.malloc = Some(numpy_original(0));
            allocator.calloc = Some(numpy_original(1));
            allocator.realloc = Some(numpy_original(2));
            allocator.free = Some(numpy_original(3));
        }
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

    // ----- line events for the line profiler -----

    /// What a C trace function is told.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum TraceKind {
        Call,
        Line,
        Return,
    }

    /// A frame handed to the trace function, valid for the duration of the event.
    #[derive(Clone, Copy)]
    pub struct TraceFrame<'a> {
        frame: *mut ffi::PyFrameObject,
        _event: std::marker::PhantomData<&'a ()>,
    }

    impl TraceFrame<'_> {
        /// The frame's identity while it runs.
        pub fn key(&self) -> usize {
            self.frame as usize
        }

        /// The line the frame is at (set by the interpreter before a trace call).
        pub fn line(&self) -> i32 {
            // SAFETY: the frame is alive for the event and the GIL is held.
            unsafe { ffi::PyFrame_GetLineNumber(self.frame) }
        }

        /// The address of the frame's code object, a key for it while the frame runs.
        pub fn code(&self) -> usize {
            // SAFETY: the frame is alive for the event and the GIL is held.
            unsafe { frame_code(self.frame) as usize }
        }
    }

    /// The receiver of line events, with the object passed to `PyEval_SetTrace`.
    pub type TraceHandler = fn(Python<'_>, &Bound<'_, PyAny>, TraceKind, TraceFrame<'_>) -> ();

    static TRACE_HANDLER: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn trace_trampoline(
        obj: *mut ffi::PyObject,
        frame: *mut ffi::PyFrameObject,
        what: c_int,
        _arg: *mut ffi::PyObject,
    ) -> c_int {
        let kind = match what {
            ffi::PyTrace_CALL => TraceKind::Call,
            ffi::PyTrace_LINE => TraceKind::Line,
            ffi::PyTrace_RETURN => TraceKind::Return,
            _ => return 0,
        };
        let handler = TRACE_HANDLER.load(Relaxed);
        if handler == 0 || obj.is_null() || frame.is_null() {
            return 0;
        }
        // SAFETY: the interpreter calls trace functions with the GIL held, a live frame and
        // the object given to PyEval_SetTrace, which the tracer keeps alive while installed.
        unsafe {
            let py = Python::assume_attached();
            let obj = Borrowed::from_ptr(py, obj);
            let handler = std::mem::transmute::<usize, TraceHandler>(handler);
            let frame = TraceFrame {
                frame,
                _event: std::marker::PhantomData,
            };
            handler(py, &obj, kind, frame);
        }
        0
    }

    /// Sends this thread's line events to `handler`, with `obj`; `None` stops them.
    pub fn set_trace(
        _py: Python<'_>,
        target: Option<(&Bound<'_, PyAny>, TraceHandler)>,
        all_threads: bool,
    ) {
        if let Some((_, handler)) = target {
            TRACE_HANDLER.store(handler as usize, Relaxed);
        }
        let (func, obj): (Option<ffi::Py_tracefunc>, *mut ffi::PyObject) = match target {
            Some((obj, _)) => (Some(trace_trampoline), obj.as_ptr()),
            None => (None, std::ptr::null_mut()),
        };
        #[cfg(Py_3_12)]
        if all_threads {
            // SAFETY: the GIL is held; the interpreter takes its own reference to `obj`.
            unsafe { ffi::PyEval_SetTraceAllThreads(func, obj) };
            return;
        }
        let _ = all_threads;
        // SAFETY: the GIL is held; the interpreter takes its own reference to `obj`.
        unsafe { ffi::PyEval_SetTrace(func, obj) };
    }

    /// A key for the calling Python thread, cheaper than the OS thread id.
    pub fn python_thread_key(_py: Python<'_>) -> usize {
        // SAFETY: the GIL is held (the token says so), so there is a current thread state.
        unsafe { ffi::PyThreadState_Get() as usize }
    }

    /// Drops the site table once no scope is open (after the last scope located its sites).
    pub(crate) fn release_sites_if_idle(py: Python<'_>) {
        let sites = {
            // SAFETY: the token says the GIL is held; taking the table allocates nothing.
            match unsafe { engine() } {
                Some(engine) if engine.tracker.is_idle() => std::mem::take(&mut engine.sites),
                _ => return,
            }
        };
        // With the engine let go: dropping a code object frees memory, which calls the hooks.
        untraced(py, || {
            for (code, _) in sites.sites {
                // SAFETY: the GIL is held and the table owned this reference.
                unsafe { ffi::Py_DECREF(code.0) };
            }
        });
    }

    /// Whether NumPy's array buffers are traced right now.
    pub fn numpy_traced() -> bool {
        !NUMPY_HANDLER.load(Relaxed).is_null()
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
        let sites: Vec<Option<(*mut ffi::PyObject, c_int)>> = untraced(py, || {
            // SAFETY: the token says the GIL is held, and `untraced` keeps nested hooks out.
            let table = unsafe { engine() }
                .as_ref()
                .map(|engine| &engine.sites.sites);
            ids.iter()
                .map(|&id| {
                    let (code, offset) = table?.get((id as usize).checked_sub(1)?)?;
                    // SAFETY: the GIL is held; this reference is released below.
                    unsafe { ffi::Py_INCREF(code.0) };
                    Some((code.0, *offset))
                })
                .collect()
        });
        untraced(py, || {
            sites.into_iter().map(|site| locate(py, site)).collect()
        })
    }

    fn locate(py: Python<'_>, site: Option<(*mut ffi::PyObject, c_int)>) -> SiteLocation {
        let Some((code, offset)) = site else {
            return SiteLocation {
                file: "<native>".to_owned(),
                line: 0,
                function: "<no Python frame>".to_owned(),
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
}
