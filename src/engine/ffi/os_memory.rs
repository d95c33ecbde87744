//! A process's resident memory where there is no `/proc`: macOS's libproc and Windows' process
//! status API. Linux reads text files instead (`engine::proc`, no unsafe needed).
//!
//! Neither OS lets a process reset its resident high water mark, so the figures here are the
//! RSS now and the lifetime peak; `engine::rss` samples for a window's peak and uses the
//! lifetime peak where it rose during the window (then it is exact).

#[cfg(target_os = "macos")]
pub use macos::*;
#[cfg(windows)]
pub use windows::*;

#[cfg(target_os = "macos")]
mod macos {
    use std::mem::{size_of, MaybeUninit};

    /// The resident size of process `pid` now (`proc_pidinfo(PROC_PIDTASKINFO)`), for this
    /// process and for any process of the same user.
    pub fn resident_bytes_of(pid: u32) -> Option<u64> {
        let mut info = MaybeUninit::<libc::proc_taskinfo>::zeroed();
        let size = size_of::<libc::proc_taskinfo>() as libc::c_int;
        // SAFETY: the buffer is a proc_taskinfo of the size given; proc_pidinfo writes at most
        // that many bytes and returns how many it wrote.
        let written = unsafe {
            libc::proc_pidinfo(
                pid as libc::c_int,
                libc::PROC_PIDTASKINFO,
                0,
                info.as_mut_ptr().cast(),
                size,
            )
        };
        if written != size {
            return None;
        }
        // SAFETY: proc_pidinfo filled the whole struct (checked above); all-zero was valid too.
        Some(unsafe { info.assume_init() }.pti_resident_size)
    }

    /// This process's resident high water mark since it started (`ru_maxrss`, in bytes on
    /// macOS). It cannot be reset.
    pub fn own_lifetime_peak() -> Option<u64> {
        let mut usage = MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: RUSAGE_SELF with a valid out pointer; getrusage only writes to it.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: getrusage succeeded and filled it (an all-zero rusage was valid anyway).
        let peak = unsafe { usage.assume_init() }.ru_maxrss;
        u64::try_from(peak).ok()
    }

    /// The processes `pid` started that are still running (`proc_listchildpids`).
    pub fn children(pid: u32) -> Vec<u32> {
        const MOST: usize = 4096;
        let mut ids = vec![0 as libc::pid_t; MOST];
        let bytes = (MOST * size_of::<libc::pid_t>()) as libc::c_int;
        // SAFETY: the buffer holds MOST pids, `bytes` long; the call writes at most that.
        let listed =
            unsafe { libc::proc_listchildpids(pid as libc::pid_t, ids.as_mut_ptr().cast(), bytes) };
        if listed <= 0 {
            return Vec::new();
        }
        // The return value is a count of pids on current macOS and was a count of bytes on
        // some older ones: the zeroed buffer makes either reading right.
        ids.truncate((listed as usize).min(MOST));
        ids.into_iter()
            .filter(|&id| id > 0)
            .map(|id| id as u32)
            .collect()
    }
}

#[cfg(windows)]
mod windows {
    use std::mem::{size_of, MaybeUninit};

    use windows_sys::Win32::Foundation::{CloseHandle, FILETIME, HANDLE, INVALID_HANDLE_VALUE};
    use windows_sys::Win32::System::Diagnostics::ToolHelp::{
        CreateToolhelp32Snapshot, Process32FirstW, Process32NextW, PROCESSENTRY32W,
        TH32CS_SNAPPROCESS,
    };
    use windows_sys::Win32::System::ProcessStatus::{
        GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS,
    };
    use windows_sys::Win32::System::Threading::{
        GetCurrentProcess, GetProcessTimes, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    };

    /// A process to read the working set of: this one, or another opened by id. An open
    /// handle keeps the process's id from being reused while it is read.
    pub struct ProcessHandle {
        handle: HANDLE,
        owned: bool,
    }

    // SAFETY: a process handle is a kernel object reference, usable from any thread.
    unsafe impl Send for ProcessHandle {}

    impl ProcessHandle {
        pub fn current() -> ProcessHandle {
            ProcessHandle {
                // SAFETY: no preconditions; returns a pseudo-handle that needs no closing.
                handle: unsafe { GetCurrentProcess() },
                owned: false,
            }
        }

        /// None when the process is gone or may not be queried.
        pub fn open(pid: u32) -> Option<ProcessHandle> {
            // SAFETY: no pointers; a null handle means failure.
            let handle = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
            (!handle.is_null()).then_some(ProcessHandle {
                handle,
                owned: true,
            })
        }

        fn counters(&self) -> Option<PROCESS_MEMORY_COUNTERS> {
            let mut counters = PROCESS_MEMORY_COUNTERS {
                cb: size_of::<PROCESS_MEMORY_COUNTERS>() as u32,
                ..Default::default()
            };
            // SAFETY: a valid handle and a counters struct whose size is given in `cb`.
            let ok = unsafe { GetProcessMemoryInfo(self.handle, &mut counters, counters.cb) };
            (ok != 0).then_some(counters)
        }

        /// The working set now, in bytes.
        pub fn resident_bytes(&self) -> Option<u64> {
            self.counters().map(|c| c.WorkingSetSize as u64)
        }

        /// The peak working set since the process started; it cannot be reset.
        pub fn lifetime_peak(&self) -> Option<u64> {
            self.counters().map(|c| c.PeakWorkingSetSize as u64)
        }

        /// The CPU time (user and kernel) the process has used, in seconds.
        pub fn cpu_seconds(&self) -> Option<f64> {
            let mut times = [FILETIME {
                dwLowDateTime: 0,
                dwHighDateTime: 0,
            }; 4];
            let [created, exited, kernel, user] = &mut times;
            // SAFETY: a valid handle and four FILETIME out values.
            let ok = unsafe { GetProcessTimes(self.handle, created, exited, kernel, user) };
            if ok == 0 {
                return None;
            }
            // FILETIMEs count 100 ns.
            let ticks =
                |t: &FILETIME| (u64::from(t.dwHighDateTime) << 32) | u64::from(t.dwLowDateTime);
            Some((ticks(kernel) + ticks(user)) as f64 / 1e7)
        }
    }

    impl Drop for ProcessHandle {
        fn drop(&mut self) {
            if self.owned {
                // SAFETY: a handle OpenProcess returned, closed once.
                unsafe { CloseHandle(self.handle) };
            }
        }
    }

    /// Every running process's (id, parent id), from one Toolhelp snapshot.
    pub fn parent_links() -> Vec<(u32, u32)> {
        // SAFETY: no pointers; INVALID_HANDLE_VALUE means failure.
        let snapshot = unsafe { CreateToolhelp32Snapshot(TH32CS_SNAPPROCESS, 0) };
        if snapshot == INVALID_HANDLE_VALUE {
            return Vec::new();
        }
        let mut links = Vec::new();
        let mut entry = MaybeUninit::<PROCESSENTRY32W>::zeroed();
        // SAFETY: an all-zero PROCESSENTRY32W is valid; dwSize must be set before the walk.
        unsafe { (*entry.as_mut_ptr()).dwSize = size_of::<PROCESSENTRY32W>() as u32 };
        // SAFETY: a valid snapshot and an entry whose dwSize is set; each call fills it.
        let mut more = unsafe { Process32FirstW(snapshot, entry.as_mut_ptr()) } != 0;
        while more {
            // SAFETY: the last call succeeded, so the entry is filled.
            let filled = unsafe { entry.assume_init_ref() };
            links.push((filled.th32ProcessID, filled.th32ParentProcessID));
            // SAFETY: as for Process32FirstW.
            more = unsafe { Process32NextW(snapshot, entry.as_mut_ptr()) } != 0;
        }
        // SAFETY: the snapshot handle, closed once.
        unsafe { CloseHandle(snapshot) };
        links
    }
}
