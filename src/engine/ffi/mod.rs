//! Everything unsafe in the crate lives here: the CPython allocator hooks, the NumPy
//! data-allocator patch, the frame lookups that attribute an allocation to a line, the cell the
//! line profiler keeps its state in (`gil_cell`), zeroed tables, and the few OS calls.
//!
//! The hooks wrap the allocators that were installed before them and feed [`Tracker`](crate::engine::tracker::Tracker). Rules
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
//!
//! By topic: `runtime` (all of the engine's state in one value, the one way to reach it, and
//! the interface the rest of the crate uses), `hooks` (what every allocator hook does),
//! `domains` (CPython's three allocator domains), `numpy` (NumPy's array buffers), `native` (the
//! malloc family, as C code calls it) and `got` (the loaded objects' GOT slots it is
//! interposed in), `sites` and
//! `frames` (which line allocated), `trace` and `monitoring` (line events for the line
//! profiler, from the trace function and from `sys.monitoring`), `os_memory` (a process's RSS
//! on macOS and Windows); here, the few other OS calls.

#[cfg(feature = "python")]
mod domains;
#[cfg(all(feature = "python", read_frames))]
mod frames;
#[cfg(feature = "python")]
mod gil_cell;
#[cfg(native_hooks)]
mod got;
#[cfg(feature = "python")]
mod hooks;
#[cfg(feature = "python")]
#[cfg_attr(not(Py_3_12), allow(dead_code))]
pub(crate) mod monitoring;
#[cfg(all(feature = "python", native_hooks))]
mod native;
#[cfg(feature = "python")]
mod numpy;
#[cfg(any(target_os = "macos", windows))]
pub mod os_memory;
#[cfg(feature = "python")]
mod runtime;
#[cfg(feature = "python")]
mod sites;
#[cfg(feature = "python")]
mod trace;

#[cfg(feature = "python")]
pub(crate) use gil_cell::GilRefCell;
#[cfg(feature = "python")]
pub use numpy::numpy_traced;
#[cfg(feature = "python")]
pub use runtime::{hold_native, native_slots, native_supported, native_traced};
#[cfg(feature = "python")]
pub use runtime::{site_lookup, untraced};
#[cfg(feature = "python")]
pub(crate) use runtime::{thread_state_checked, with_engine, with_tracker};
#[cfg(feature = "python")]
pub use sites::SiteLocation;
#[cfg(feature = "python")]
pub(crate) use sites::{locate_sites, release_sites_if_idle};
#[cfg(feature = "python")]
pub use trace::{python_thread_key, set_trace, TraceFrame, TraceHandler, TraceKind};

/// An array of `None`s in zeroed memory straight from the global allocator: the kernel maps its
/// pages only when they are written, so a large, sparse table costs only the pages it uses.
pub(crate) fn zeroed_nones<T, const N: usize>() -> Box<[Option<Box<T>>; N]> {
    let layout = std::alloc::Layout::new::<[Option<Box<T>>; N]>();
    assert!(layout.size() > 0, "an empty table needs no zeroed memory");
    // SAFETY: the layout is the array's, and not zero-sized. All-zero bytes are an array of
    // `None`s: `Option<Box<_>>` is guaranteed to represent `None` as the null pointer. The
    // memory comes from the global allocator with this layout, as `Box::from_raw` needs.
    unsafe {
        let memory = std::alloc::alloc_zeroed(layout);
        if memory.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(memory.cast())
    }
}

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
    #[cfg(windows)]
    return os_memory::ProcessHandle::current().cpu_seconds();
    #[cfg(not(any(unix, windows)))]
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
