//! Reading the process's memory and threads from the OS.
//!
//! On Linux each reader is a pure parser of `/proc`'s text plus a thin I/O shell, so the parsers
//! are tested on text; Linux is the platform with an exact, resettable peak. macOS and Windows
//! answer through their APIs (`engine::ffi::os_memory`): the RSS now and a lifetime peak that
//! cannot be reset. Elsewhere the readers answer `None` and the traced figures stand alone.

use std::io;

/// Resident set size figures from `/proc/<pid>/status`, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusMemory {
    /// `VmRSS`: resident now.
    pub rss_bytes: Option<u64>,
    /// `VmHWM`: the resident high water mark since start or since the last reset.
    pub hwm_bytes: Option<u64>,
}

/// Parses the `VmRSS` and `VmHWM` lines (`VmHWM:\t  123456 kB`) of a status file.
pub fn parse_status(text: &str) -> StatusMemory {
    let mut memory = StatusMemory::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "VmRSS" => &mut memory.rss_bytes,
            "VmHWM" => &mut memory.hwm_bytes,
            _ => continue,
        };
        *slot = parse_kib_field(rest);
        // The two lines are neighbours, a third of the way in: the rest need no parsing.
        if memory.rss_bytes.is_some() && memory.hwm_bytes.is_some() {
            break;
        }
    }
    memory
}

fn parse_kib_field(rest: &str) -> Option<u64> {
    let mut words = rest.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

/// Parses the resident page count (second field) of `/proc/<pid>/statm` into bytes.
pub fn parse_statm(text: &str, page_size: u64) -> Option<u64> {
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(page_size)
}

/// Parses the numeric directory names of `/proc/self/task` (thread ids).
pub fn parse_task_ids<I: IntoIterator<Item = String>>(names: I) -> Vec<u64> {
    let mut ids: Vec<u64> = names.into_iter().filter_map(|n| n.parse().ok()).collect();
    ids.sort_unstable();
    ids
}

#[cfg(target_os = "linux")]
mod os {
    use super::*;
    use std::fs::{self, File};
    use std::io::Write;
    use std::sync::Mutex;

    /// This process's `status`, `statm` and `clear_refs`, kept open: a scope reads them a few
    /// times as it opens and closes, and an open, a stat and a close per read cost more than
    /// the read. Reopened after a fork (`/proc/self` was resolved for the old pid).
    struct OwnFiles {
        pid: u32,
        status: File,
        statm: File,
        clear_refs: Option<File>,
    }

    static OWN: Mutex<Option<OwnFiles>> = Mutex::new(None);

    fn with_own<R>(read: impl FnOnce(&mut OwnFiles) -> io::Result<R>) -> io::Result<R> {
        let pid = std::process::id();
        let open = || -> io::Result<OwnFiles> {
            Ok(OwnFiles {
                pid,
                status: File::open("/proc/self/status")?,
                statm: File::open("/proc/self/statm")?,
                clear_refs: None,
            })
        };
        // Never waits: when another thread has the files (the fallback sampler), or a fork
        // left the lock held in this child, this read opens its own.
        let mut own = match OWN.try_lock() {
            Ok(own) => own,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return read(&mut open()?),
        };
        let files = match own.take() {
            Some(files) if files.pid == pid => files,
            _ => open()?,
        };
        read(own.insert(files))
    }

    pub fn status_memory() -> Option<StatusMemory> {
        let text = with_own(|own| read_from_start(&mut own.status)).ok()?;
        Some(parse_status(&text))
    }

    pub fn resident_bytes() -> Option<u64> {
        let text = with_own(|own| read_from_start(&mut own.statm)).ok()?;
        parse_statm(&text, crate::engine::ffi::page_size())
    }

    /// Writing 5 to a process's `clear_refs` resets its VmHWM to the RSS now, without touching
    /// page tables (proc(5)).
    fn reset_mark(clear_refs: &mut File) -> io::Result<()> {
        clear_refs.write_all(b"5")
    }

    pub fn reset_peak_resident() -> io::Result<()> {
        with_own(|own| {
            let file = match &mut own.clear_refs {
                Some(file) => file,
                None => own
                    .clear_refs
                    .insert(File::options().write(true).open("/proc/self/clear_refs")?),
            };
            reset_mark(file)
        })
    }

    pub fn thread_ids() -> Option<Vec<u64>> {
        let entries = fs::read_dir("/proc/self/task").ok()?;
        let names = entries.filter_map(|entry| entry.ok()?.file_name().into_string().ok());
        Some(parse_task_ids(names))
    }

    pub fn lifetime_peak_resident() -> Option<u64> {
        None
    }

    pub fn descendants(pid: u32) -> Vec<u32> {
        walk_children(pid, children)
    }

    /// The process's `statm`, kept open: one read per sample; and, where this process may
    /// reset the other's high water mark, its `status` and `clear_refs`.
    pub struct Reader {
        statm: File,
        peaks: Option<(File, File)>,
    }

    impl Reader {
        pub fn open(pid: u32) -> Option<Reader> {
            let statm = File::open(format!("/proc/{pid}/statm")).ok()?;
            let status = File::open(format!("/proc/{pid}/status")).ok();
            let clear_refs = File::options()
                .write(true)
                .open(format!("/proc/{pid}/clear_refs"))
                .ok();
            Some(Reader {
                statm,
                peaks: status.zip(clear_refs),
            })
        }

        pub fn read(&mut self, _pid: u32) -> Option<u64> {
            let text = read_from_start(&mut self.statm).ok()?;
            parse_statm(&text, crate::engine::ffi::page_size())
        }

        /// The high water mark (`VmHWM`), then reset to the RSS now: the peak since the last
        /// call. None, for good, once the kernel refuses the reset; None for an exited process.
        pub fn read_peak(&mut self) -> Option<u64> {
            let (status, clear_refs) = self.peaks.as_mut()?;
            let hwm = parse_status(&read_from_start(status).ok()?).hwm_bytes?;
            if reset_mark(clear_refs).is_err() {
                self.peaks = None;
                return None;
            }
            Some(hwm)
        }
    }

    fn children(pid: u32) -> Vec<u32> {
        // Each thread lists the children it started (proc(5), CONFIG_PROC_CHILDREN).
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        let mut children: Vec<u32> = tasks
            .filter_map(|task| fs::read_to_string(task.ok()?.path().join("children")).ok())
            .flat_map(|text| {
                text.split_whitespace()
                    .filter_map(|id| id.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        children.sort_unstable();
        children.dedup();
        children
    }
}

#[cfg(target_os = "macos")]
mod os {
    use super::*;
    use crate::engine::ffi::os_memory;

    pub fn resident_bytes() -> Option<u64> {
        os_memory::resident_bytes_of(std::process::id())
    }

    pub fn lifetime_peak_resident() -> Option<u64> {
        os_memory::own_lifetime_peak()
    }

    pub fn descendants(pid: u32) -> Vec<u32> {
        walk_children(pid, os_memory::children)
    }

    /// macOS asks the kernel by pid each time: there is nothing to keep open.
    pub struct Reader;

    impl Reader {
        pub fn open(pid: u32) -> Option<Reader> {
            os_memory::resident_bytes_of(pid).map(|_| Reader)
        }

        pub fn read(&mut self, pid: u32) -> Option<u64> {
            os_memory::resident_bytes_of(pid)
        }
    }
}

#[cfg(windows)]
mod os {
    use super::*;
    use crate::engine::ffi::os_memory::{self, ProcessHandle};

    pub fn resident_bytes() -> Option<u64> {
        ProcessHandle::current().resident_bytes()
    }

    pub fn lifetime_peak_resident() -> Option<u64> {
        ProcessHandle::current().lifetime_peak()
    }

    pub fn descendants(pid: u32) -> Vec<u32> {
        // One snapshot of every process, walked from `pid`.
        let links = os_memory::parent_links();
        walk_children(pid, |parent| {
            links
                .iter()
                .filter(|&&(child, of)| of == parent && child != parent)
                .map(|&(child, _)| child)
                .collect()
        })
    }

    /// The process's handle, kept open: it also keeps the id from being reused.
    pub struct Reader(ProcessHandle);

    impl Reader {
        pub fn open(pid: u32) -> Option<Reader> {
            ProcessHandle::open(pid).map(Reader)
        }

        pub fn read(&mut self, _pid: u32) -> Option<u64> {
            self.0.resident_bytes()
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
mod os {
    use super::*;

    pub fn resident_bytes() -> Option<u64> {
        None
    }

    pub fn lifetime_peak_resident() -> Option<u64> {
        None
    }

    pub fn descendants(_pid: u32) -> Vec<u32> {
        Vec::new()
    }

    pub struct Reader;

    impl Reader {
        pub fn open(_pid: u32) -> Option<Reader> {
            None
        }

        pub fn read(&mut self, _pid: u32) -> Option<u64> {
            None
        }
    }
}

/// Every process below `pid`, found by asking `children` of each in turn.
#[cfg_attr(
    not(any(target_os = "linux", target_os = "macos", windows)),
    allow(dead_code)
)]
fn walk_children(pid: u32, mut children: impl FnMut(u32) -> Vec<u32>) -> Vec<u32> {
    let mut found = Vec::new();
    let mut next = vec![pid];
    while let Some(parent) = next.pop() {
        for child in children(parent) {
            if child != pid && !found.contains(&child) {
                found.push(child);
                next.push(child);
            }
        }
    }
    found
}

/// Whether this OS lets a process reset its RSS high water mark (Linux's `clear_refs`). Where
/// it does not, a window's peak is sampled.
pub const PEAK_RESETTABLE: bool = cfg!(target_os = "linux");

/// The RSS of one process, read again and again (`memgauge run`'s samples): on Linux its
/// `statm` kept open, on Windows its handle, on macOS its id.
pub struct ProcessResident {
    pid: u32,
    reader: os::Reader,
}

impl ProcessResident {
    /// None where the process is gone, may not be read, or the OS does not tell its RSS.
    pub fn open(pid: u32) -> Option<ProcessResident> {
        Some(ProcessResident {
            pid,
            reader: os::Reader::open(pid)?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The RSS now, in bytes; None (or 0, on Linux) once the process has exited.
    pub fn read(&mut self) -> Option<u64> {
        self.reader.read(self.pid)
    }

    /// The peak RSS since the previous call, the kernel's high water mark reset after each
    /// read (Linux, where this process may write the other's `clear_refs`); None where the OS
    /// keeps no resettable mark, the reset is refused, or the process has exited.
    pub fn read_peak(&mut self) -> Option<u64> {
        #[cfg(target_os = "linux")]
        return self.reader.read_peak();
        #[cfg(not(target_os = "linux"))]
        None
    }
}

/// This process's RSS high water mark since it started, where the OS keeps one that a reset
/// does not lower (macOS's `ru_maxrss`, Windows' peak working set; on Linux `clear_refs` lowers
/// it, so None).
pub fn lifetime_peak_resident() -> Option<u64> {
    os::lifetime_peak_resident()
}

/// `VmRSS` and `VmHWM` of this process, where the OS tells them (elsewhere than Linux, the RSS
/// now and the lifetime peak).
pub fn status_memory() -> Option<StatusMemory> {
    #[cfg(target_os = "linux")]
    return os::status_memory();
    #[cfg(not(target_os = "linux"))]
    Some(StatusMemory {
        rss_bytes: resident_bytes(),
        hwm_bytes: lifetime_peak_resident(),
    })
}

/// This process's resident set size now, from the cheap `statm` file (for sampling).
pub fn resident_bytes() -> Option<u64> {
    os::resident_bytes()
}

/// The whole text of a small file kept open (a /proc file), read again from its start: one
/// `pread` where there is one. A read that leaves room in the buffer has read to the end (a
/// /proc file fills what it is given).
pub fn read_from_start(file: &mut std::fs::File) -> io::Result<String> {
    let mut bytes = vec![0u8; 4096];
    let mut length = 0;
    #[cfg(not(unix))]
    {
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(0))?;
    }
    loop {
        #[cfg(unix)]
        let read = std::os::unix::fs::FileExt::read_at(file, &mut bytes[length..], length as u64)?;
        #[cfg(not(unix))]
        let read = std::io::Read::read(file, &mut bytes[length..])?;
        length += read;
        if length < bytes.len() {
            break;
        }
        bytes.resize(bytes.len() * 2, 0);
    }
    bytes.truncate(length);
    String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Resets this process's `VmHWM` to its current RSS. Refused in some containers, and by every
/// OS but Linux ([`PEAK_RESETTABLE`]).
pub fn reset_peak_resident() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    return os::reset_peak_resident();
    #[cfg(not(target_os = "linux"))]
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "only Linux lets a process reset its peak RSS (/proc/self/clear_refs)",
    ))
}

/// The OS ids of every thread of this process, sorted, where the OS lists them (`/proc`).
pub fn thread_ids() -> Option<Vec<u64>> {
    #[cfg(target_os = "linux")]
    return os::thread_ids();
    #[cfg(not(target_os = "linux"))]
    None
}

/// Every process `pid` started, and their children in turn, where the OS lists them.
pub fn descendants(pid: u32) -> Vec<u32> {
    os::descendants(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tpython3\nUmask:\t0022\nState:\tR (running)\n\
        VmPeak:\t  300000 kB\nVmSize:\t  290000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t   65432 kB\n\
        RssAnon:\t   40000 kB\nThreads:\t1\n";

    #[test]
    fn parses_rss_and_high_water_mark() {
        let memory = parse_status(STATUS);
        assert_eq!(memory.hwm_bytes, Some(123_456 * 1024));
        assert_eq!(memory.rss_bytes, Some(65_432 * 1024));
    }

    #[test]
    fn missing_or_malformed_fields_are_none() {
        assert_eq!(parse_status(""), StatusMemory::default());
        let memory = parse_status("VmHWM:\tlots kB\nVmRSS: 12 MB\n");
        assert_eq!(memory, StatusMemory::default());
    }

    #[test]
    fn parses_statm() {
        assert_eq!(
            parse_statm("72000 16000 3000 700 0 9000 0\n", 4096),
            Some(16000 * 4096)
        );
        assert_eq!(parse_statm("72000", 4096), None);
        assert_eq!(parse_statm("", 4096), None);
    }

    #[test]
    fn parses_task_ids_sorted() {
        let names = ["12", "7", "self", "100"].map(String::from);
        assert_eq!(parse_task_ids(names), vec![7, 12, 100]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        // Twice: the second read goes through the files kept open.
        for _ in 0..2 {
            let memory = status_memory().expect("/proc/self/status");
            let rss = memory.rss_bytes.expect("VmRSS");
            assert!(rss > 0 && memory.hwm_bytes.unwrap() >= rss);
            assert!(resident_bytes().unwrap() > 0);
            reset_peak_resident().expect("clear_refs");
        }
        assert!(thread_ids().unwrap().contains(&(std::process::id() as u64)));
    }
}
