//! A measurement scope: the traced figures of a stretch of Python code and what the process RSS
//! did over the same stretch, side by side.
//!
//! Traced bytes are exact and deterministic (what Python and NumPy asked for); RSS is what the
//! OS gave the process, native libraries included, and moves with the allocator's caching.

use std::time::Instant;

use pyo3::prelude::*;

use crate::engine::ffi::{self, SiteLocation};
use crate::engine::rss;
use crate::engine::tracker::{FastMap, SiteId, TrackerError};

/// A `file:line` and the bytes it held at the scope's peak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteBytes {
    pub location: SiteLocation,
    pub bytes: u64,
}

/// What a scope measured.
#[derive(Debug, Clone, Default)]
pub struct Measurement {
    pub peak_bytes: u64,
    pub leaked_bytes: u64,
    pub allocated_bytes: u64,
    pub allocations: u64,
    pub rss_peak_bytes: Option<u64>,
    pub rss_delta_bytes: Option<i64>,
    pub rss_sampled: bool,
    pub numpy_traced: bool,
    /// Whether the malloc family was traced (the scope, or one it is inside, asked for it, and
    /// the platform has it: [`crate::engine::ffi::native_supported`]).
    pub native_traced: bool,
    pub duration_s: f64,
    /// The lines that held the most at the peak, largest first.
    pub top_sites: Vec<SiteBytes>,
    /// The lines that still held the most at the end, largest first.
    pub leak_sites: Vec<SiteBytes>,
}

/// An open measurement. Close it with [`Scope::close`]; dropping it closes it too.
pub struct Scope {
    slot: Option<usize>,
    rss_window: Option<usize>,
    started: Instant,
    top_sites: usize,
}

/// The OS ids of the threads running now: the ones a new scope does not follow.
fn running_threads(py: Python<'_>) -> Vec<u64> {
    if let Some(ids) = crate::engine::proc::thread_ids() {
        return ids;
    }
    // Without /proc, Python's own list of threads is what there is.
    let python_ids = py
        .import("threading")
        .and_then(|threading| threading.call_method0("enumerate"))
        .and_then(|threads| {
            threads
                .try_iter()?
                .map(|thread| thread?.getattr("native_id")?.extract::<Option<u64>>())
                .collect::<PyResult<Vec<_>>>()
        })
        .unwrap_or_default();
    python_ids.into_iter().flatten().collect()
}

impl Scope {
    /// Opens a scope on the calling thread, reporting up to `top_sites` lines at the peak.
    /// `native`: the malloc family is traced too while the scope is open (see
    /// [`native_supported`]).
    pub fn open(py: Python<'_>, top_sites: usize, native: bool) -> Result<Scope, TrackerError> {
        Self::open_following(py, top_sites, running_threads(py), false, native)
    }

    /// Opens a scope measured apart: until it closes, the calling thread's allocations (and
    /// those of threads it starts) count in it and not in the scopes already open, which never
    /// see those blocks, their frees included. It reads no RSS: the enclosing scope's window
    /// stays undisturbed.
    pub fn open_apart(
        py: Python<'_>,
        top_sites: usize,
        native: bool,
    ) -> Result<Scope, TrackerError> {
        Self::open_following(py, top_sites, running_threads(py), true, native)
    }

    /// Opens a scope that follows every thread, the ones running now included.
    pub fn open_all_threads(py: Python<'_>, top_sites: usize) -> Result<Scope, TrackerError> {
        Self::open_following(py, top_sites, Vec::new(), false, false)
    }

    fn open_following(
        py: Python<'_>,
        top_sites: usize,
        threads_before: Vec<u64>,
        apart: bool,
        native: bool,
    ) -> Result<Scope, TrackerError> {
        // A free-threaded build re-enables the GIL when it imports the engine (the module says
        // it needs it), unless the user forced it off: then the hooks would race, so nothing opens.
        #[cfg(Py_GIL_DISABLED)]
        if !gil_enabled(py) {
            return Err(TrackerError::GilDisabled);
        }
        if !ffi::thread_state_checked(py) {
            return Err(TrackerError::ThreadStateLayout);
        }
        let opener = ffi::current_thread_id();
        let rss_window = if apart { None } else { rss::open_window() };
        let started = Instant::now();
        let slot = ffi::with_engine(py, |engine| {
            let slot = engine
                .tracker
                .open_scope_as(opener, threads_before, apart)?;
            engine.set_siteless(slot, top_sites == 0);
            engine.set_native(slot, native);
            Ok(slot)
        });
        let slot = match slot {
            Ok(slot) => slot,
            Err(error) => {
                if let Some(window) = rss_window {
                    rss::close_window(window);
                }
                return Err(error);
            }
        };
        Ok(Scope {
            slot: Some(slot),
            rss_window,
            started,
            top_sites,
        })
    }

    /// The tracker slot of the open scope.
    pub fn slot(&self) -> Option<usize> {
        self.slot
    }

    /// Closes the scope and returns its figures.
    pub fn close(mut self, py: Python<'_>) -> Measurement {
        self.finish(py)
    }

    fn finish(&mut self, py: Python<'_>) -> Measurement {
        let Some(slot) = self.slot.take() else {
            return Measurement::default();
        };
        let numpy_traced = ffi::numpy_traced();
        let native_traced = ffi::native_traced();
        let figures =
            ffi::with_engine(py, |engine| engine.tracker.close_scope(slot)).unwrap_or_default();
        let duration_s = self.started.elapsed().as_secs_f64();
        let rss = self
            .rss_window
            .take()
            .map(rss::close_window)
            .unwrap_or_default();

        let (top_sites, leak_sites) = if self.top_sites == 0 {
            (Vec::new(), Vec::new())
        } else {
            // Resolving a site calls Python: the two lists' sites are resolved together, once.
            let ids: Vec<SiteId> = leading(&figures.sites_at_peak)
                .chain(leading(&figures.sites_leaked))
                .map(|&(id, _)| id)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let located: FastMap<SiteId, SiteLocation> = ids
                .iter()
                .copied()
                .zip(ffi::locate_sites(py, &ids))
                .collect();
            (
                top_locations(&located, &figures.sites_at_peak, self.top_sites),
                top_locations(&located, &figures.sites_leaked, self.top_sites),
            )
        };
        ffi::release_sites_if_idle(py);

        Measurement {
            peak_bytes: figures.peak_bytes,
            leaked_bytes: figures.leaked_bytes,
            allocated_bytes: figures.allocated_bytes,
            allocations: figures.allocations,
            rss_peak_bytes: rss.peak_bytes,
            rss_delta_bytes: rss.delta_bytes,
            rss_sampled: rss.sampled,
            numpy_traced,
            native_traced,
            duration_s,
            top_sites,
            leak_sites,
        }
    }
}

/// Whether this free-threaded interpreter runs with the GIL now (`sys._is_gil_enabled()`).
#[cfg(Py_GIL_DISABLED)]
fn gil_enabled(py: Python<'_>) -> bool {
    py.import("sys")
        .and_then(|sys| sys.call_method0("_is_gil_enabled"))
        .and_then(|enabled| enabled.extract::<bool>())
        .unwrap_or(false)
}

/// The sites that decide the top lines: the largest few hundred.
fn leading(sites: &[(SiteId, u64)]) -> impl Iterator<Item = &(SiteId, u64)> {
    sites.iter().take(256)
}

/// The `limit` lines with the most bytes, sites on the same line merged.
fn top_locations(
    located: &FastMap<SiteId, SiteLocation>,
    sites: &[(SiteId, u64)],
    limit: usize,
) -> Vec<SiteBytes> {
    // FastMap, not std's SipHash: this runs as every test ends.
    let mut merged: FastMap<&SiteLocation, u64> = FastMap::default();
    for (id, bytes) in leading(sites) {
        if let Some(location) = located.get(id) {
            *merged.entry(location).or_default() += bytes;
        }
    }
    let mut top: Vec<SiteBytes> = merged
        .into_iter()
        .map(|(location, bytes)| SiteBytes {
            location: location.clone(),
            bytes,
        })
        .collect();
    top.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then_with(|| a.location.file.cmp(&b.location.file))
            .then(a.location.line.cmp(&b.location.line))
    });
    top.truncate(limit);
    top
}

impl Drop for Scope {
    fn drop(&mut self) {
        if self.slot.is_some() {
            Python::attach(|py| {
                self.finish(py);
            });
        }
    }
}
