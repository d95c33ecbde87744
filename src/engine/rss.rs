//! The process RSS over a stretch of time: at its start, at its end, and its high water mark.
//!
//! On Linux the high water mark is exact: the kernel keeps it (`VmHWM`) and lets a process reset
//! it (`/proc/self/clear_refs`, value 5). Where the reset is refused (some containers), on macOS
//! and Windows (which cannot reset it), or when `MEMGAUGE_RSS_SAMPLER=1` asks for it, a Rust
//! thread samples the RSS every millisecond instead, without the GIL, and the figure is marked
//! as sampled. There, a lifetime peak that rose since the sampler's last reset (macOS's
//! `ru_maxrss`, Windows' peak working set) was reached since then, so it is folded in too: a
//! window that sets a new record for the process gets its exact peak even between samples.
//! Nested windows share one process-wide mark: before every reset its value is folded into each
//! open window, so no window loses it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::proc;

/// Set to 1, makes the engine sample its RSS peaks instead of resetting the kernel's mark
/// (`memgauge run` sets it, since it resets the same mark after each of its samples).
pub const SAMPLE_RSS_ENV: &str = "MEMGAUGE_RSS_SAMPLER";

/// What the RSS did during one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RssFigures {
    /// The high water mark during the window minus the RSS at its start.
    pub peak_bytes: Option<u64>,
    /// The RSS at the end minus the RSS at the start.
    pub delta_bytes: Option<i64>,
    /// True when the mark came from sampling rather than from the kernel.
    pub sampled: bool,
}

const SAMPLE_INTERVAL: Duration = Duration::from_millis(1);

struct Sampler {
    peak: Arc<AtomicU64>,
    /// The OS's lifetime peak at the last reset, where it keeps one.
    lifetime_at_reset: Option<u64>,
    stop: Arc<AtomicBool>,
}

impl Sampler {
    fn start() -> Sampler {
        let peak = Arc::new(AtomicU64::new(proc::resident_bytes().unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
            // Not joined: stopping it must not wait out its sleep on every test's close (the
            // sampler is the source on macOS and Windows). It ends at its next wake-up.
            // Should the spawn fail, the peak stays the RSS at the start.
            let _ = std::thread::Builder::new()
                .name("memgauge-rss".to_owned())
                .spawn(move || {
                    while !stop.load(Relaxed) {
                        if let Some(rss) = proc::resident_bytes() {
                            peak.fetch_max(rss, Relaxed);
                        }
                        std::thread::sleep(SAMPLE_INTERVAL);
                    }
                });
        }
        Sampler {
            peak,
            lifetime_at_reset: proc::lifetime_peak_resident(),
            stop,
        }
    }

    /// The highest RSS seen since the last reset.
    fn peak(&self) -> u64 {
        with_lifetime_peak(
            self.peak.load(Relaxed),
            self.lifetime_at_reset,
            proc::lifetime_peak_resident(),
        )
    }

    fn reset(&mut self) {
        self.lifetime_at_reset = proc::lifetime_peak_resident();
        self.peak
            .store(proc::resident_bytes().unwrap_or(0), Relaxed);
    }

    fn stop(self) {
        self.stop.store(true, Relaxed);
    }
}

/// The peak since a reset: the sampled one, or the process's lifetime peak if that rose since
/// the reset (`before`): then it was reached after the reset, between two samples or not.
fn with_lifetime_peak(sampled: u64, before: Option<u64>, now: Option<u64>) -> u64 {
    match (before, now) {
        (Some(before), Some(now)) if now > before => sampled.max(now),
        _ => sampled,
    }
}

enum Source {
    Kernel,
    Sampler(Sampler),
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: u64,
    max_seen: u64,
}

/// The open windows and where their high water mark comes from.
#[derive(Default)]
pub struct RssMonitor {
    windows: Vec<Option<Window>>,
    source: Option<Source>,
    kernel_refused: bool,
    /// Whether the OS tells the RSS, found at the first window.
    available: Option<bool>,
}

impl RssMonitor {
    fn sampling_forced() -> bool {
        std::env::var_os(SAMPLE_RSS_ENV).is_some_and(|v| v == "1")
    }

    /// Reads the mark since the last reset and folds it into every open window; returns the
    /// RSS now when the same read told it (the kernel's status file does).
    fn fold_mark(&mut self) -> Option<u64> {
        let (peak, now) = match &self.source {
            Some(Source::Kernel) => {
                let memory = proc::status_memory().unwrap_or_default();
                (memory.hwm_bytes, memory.rss_bytes)
            }
            Some(Source::Sampler(sampler)) => (Some(sampler.peak()), None),
            None => (None, None),
        };
        if let Some(peak) = peak {
            for window in self.windows.iter_mut().flatten() {
                window.max_seen = window.max_seen.max(peak);
            }
        }
        now
    }

    /// Restarts the mark from the RSS now.
    fn reset_mark(&mut self) {
        match &mut self.source {
            Some(Source::Kernel) if proc::reset_peak_resident().is_err() => {
                self.kernel_refused = true;
                self.source = Some(Source::Sampler(Sampler::start()));
            }
            Some(Source::Kernel) => {}
            Some(Source::Sampler(sampler)) => sampler.reset(),
            None => {}
        }
    }

    fn ensure_source(&mut self) {
        if self.source.is_some() {
            return;
        }
        self.source = if Self::sampling_forced() || self.kernel_refused || !proc::PEAK_RESETTABLE {
            Some(Source::Sampler(Sampler::start()))
        } else {
            Some(Source::Kernel)
        };
    }

    /// Opens a window; None where the OS does not tell the RSS.
    ///
    /// A scope opens and closes one, around every test: with no other window open, opening
    /// costs one reset of the mark and one read of `statm`, and closing one read of `status`.
    pub fn open(&mut self) -> Option<usize> {
        if !*self
            .available
            .get_or_insert_with(|| proc::resident_bytes().is_some())
        {
            return None;
        }
        self.ensure_source();
        // The windows open now keep the mark so far before it restarts for the new one.
        if self.windows.iter().any(Option::is_some) {
            self.fold_mark();
        }
        self.reset_mark();
        let start = proc::resident_bytes()?;
        let window = Window {
            start,
            max_seen: start,
        };
        let id = match self.windows.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.windows.push(None);
                self.windows.len() - 1
            }
        };
        self.windows[id] = Some(window);
        Some(id)
    }

    /// Closes a window and returns its figures.
    pub fn close(&mut self, id: usize) -> RssFigures {
        // No reset: the windows still open keep the mark, and a new one resets it.
        let end = self.fold_mark().or_else(proc::resident_bytes);
        let sampled = matches!(self.source, Some(Source::Sampler(_)));
        let Some(window) = self.windows.get_mut(id).and_then(Option::take) else {
            return RssFigures::default();
        };
        let max_seen = window.max_seen.max(end.unwrap_or(0));
        if self.windows.iter().all(Option::is_none) {
            self.windows.clear();
            if let Some(Source::Sampler(sampler)) = self.source.take() {
                sampler.stop();
            }
        }
        RssFigures {
            peak_bytes: Some(max_seen.saturating_sub(window.start)),
            delta_bytes: end.map(|end| end as i64 - window.start as i64),
            sampled,
        }
    }
}

/// The process-wide monitor: the kernel's mark is one per process.
pub static MONITOR: Mutex<RssMonitor> = Mutex::new(RssMonitor {
    windows: Vec::new(),
    source: None,
    kernel_refused: false,
    available: None,
});

pub fn open_window() -> Option<usize> {
    MONITOR.lock().unwrap_or_else(|p| p.into_inner()).open()
}

pub fn close_window(id: usize) -> RssFigures {
    MONITOR.lock().unwrap_or_else(|p| p.into_inner()).close(id)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn touch(bytes: usize) -> Vec<u8> {
        let mut buffer = vec![0u8; bytes];
        for page in buffer.chunks_mut(4096) {
            page[0] = 1;
        }
        buffer
    }

    #[test]
    fn a_lifetime_peak_counts_only_when_it_rose_since_the_reset() {
        // A spike between samples that set a new record for the process.
        assert_eq!(with_lifetime_peak(10, Some(50), Some(80)), 80);
        // The record is older than the reset: it says nothing about the window.
        assert_eq!(with_lifetime_peak(10, Some(80), Some(80)), 10);
        // Sampled higher than a record that barely rose (RSS read between the two reads).
        assert_eq!(with_lifetime_peak(90, Some(50), Some(60)), 90);
        // No lifetime peak (Linux, where clear_refs lowers it).
        assert_eq!(with_lifetime_peak(10, None, None), 10);
    }

    /// One test, not two: the kernel's mark is per process and tests run in parallel threads.
    /// Those threads also free memory while a window is open, which lowers what the window
    /// sees above its start (58.7 MiB of a 64 MiB spike, once in CI): the spikes are checked at
    /// three quarters of their size, which a missed spike (a figure near 0) is far below.
    #[test]
    fn peaks_of_single_and_nested_windows() {
        let mut monitor = RssMonitor::default();
        let id = monitor.open().unwrap();
        drop(std::hint::black_box(touch(64 << 20)));
        let figures = monitor.close(id);
        let peak = figures.peak_bytes.unwrap();
        assert!(peak >= 48 << 20, "peak {peak}");
        assert!(figures.delta_bytes.unwrap() < 8 << 20, "{figures:?}");

        let outer = monitor.open().unwrap();
        drop(std::hint::black_box(touch(48 << 20)));
        let inner = monitor.open().unwrap();
        let inner_figures = monitor.close(inner);
        let outer_figures = monitor.close(outer);
        assert!(
            inner_figures.peak_bytes.unwrap() < 16 << 20,
            "{inner_figures:?}"
        );
        assert!(
            outer_figures.peak_bytes.unwrap() >= 36 << 20,
            "{outer_figures:?}"
        );
    }
}
