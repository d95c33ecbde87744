//! Reading the process's memory and threads from the OS.
//!
//! Each reader is a pure parser of the OS's text plus a thin I/O shell, so the parsers are tested
//! on text. Linux is the platform with exact figures; elsewhere the readers answer `None` and the
//! traced figures stand alone.

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

    pub fn reset_peak_resident() -> io::Result<()> {
        // Writing 5 resets VmHWM to the current RSS without touching page tables (proc(5)).
        with_own(|own| {
            let file = match &mut own.clear_refs {
                Some(file) => file,
                None => own
                    .clear_refs
                    .insert(File::options().write(true).open("/proc/self/clear_refs")?),
            };
            file.write_all(b"5")
        })
    }

    pub fn thread_ids() -> Option<Vec<u64>> {
        let entries = fs::read_dir("/proc/self/task").ok()?;
        let names = entries.filter_map(|entry| entry.ok()?.file_name().into_string().ok());
        Some(parse_task_ids(names))
    }

    pub fn children(pid: u32) -> Vec<u32> {
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

#[cfg(not(target_os = "linux"))]
mod os {
    use super::*;

    pub fn status_memory() -> Option<StatusMemory> {
        None
    }

    pub fn resident_bytes() -> Option<u64> {
        None
    }

    pub fn reset_peak_resident() -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "resetting the peak RSS needs Linux's /proc/self/clear_refs",
        ))
    }

    pub fn thread_ids() -> Option<Vec<u64>> {
        None
    }

    pub fn children(_pid: u32) -> Vec<u32> {
        Vec::new()
    }
}

/// `VmRSS` and `VmHWM` of this process, where the OS tells them.
pub fn status_memory() -> Option<StatusMemory> {
    os::status_memory()
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

/// Resets this process's `VmHWM` to its current RSS. Refused in some containers.
pub fn reset_peak_resident() -> io::Result<()> {
    os::reset_peak_resident()
}

/// The OS ids of every thread of this process, sorted, where the OS lists them.
pub fn thread_ids() -> Option<Vec<u64>> {
    os::thread_ids()
}

/// Every process `pid` started, and their children in turn, where the OS lists them.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut next = vec![pid];
    while let Some(parent) = next.pop() {
        for child in os::children(parent) {
            if !found.contains(&child) {
                found.push(child);
                next.push(child);
            }
        }
    }
    found
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
