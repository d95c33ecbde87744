//! The line profiler's engine: per line of the profiled functions, the net traced bytes it
//! added, the highest traced memory reached while it ran, how often it ran and the RSS after it.
//!
//! Line events come from a C trace function (`PyEval_SetTrace`, see [`crate::engine::ffi::set_trace`]);
//! events of code that is not profiled return at the first lookup. The traced figures come from
//! a scope that follows every thread: at each event of a profiled frame, the scope's high water
//! mark since the previous event is folded into every line still running (a caller's line runs
//! while its callee does), then restarted.

use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::PyCode;

use crate::engine::ffi::{self, GilRefCell, TraceFrame, TraceKind};
use crate::engine::scope::Scope;
use crate::engine::tracker::FastMap;

/// RSS is read again when the traced memory moved by [`RSS_MOVE`] since the last read, or after
/// [`RSS_EVERY`]: a read costs a few microseconds, more than a short line. The clock is looked
/// at every [`CLOCK_EVERY`] events only: reading it costs as much as the rest of an event.
const RSS_MOVE: u64 = 256 * 1024;
const RSS_EVERY: Duration = Duration::from_millis(1);
const CLOCK_EVERY: u32 = 16;

#[derive(Debug, Default, Clone, Copy)]
struct LineStats {
    increment: i64,
    peak: u64,
    rss: Option<u64>,
    occurrences: u64,
}

/// A profiled code object and the statistics of its lines, indexed by line number from `base`:
/// a line event indexes them without hashing.
struct CodeLines {
    code: Py<PyCode>,
    /// `co_firstlineno`, the `def` (or first decorator) line, which carries the calls.
    first_line: i32,
    /// The line of `lines[0]`: the first line, or a lower one should an event report one.
    base: i32,
    lines: Vec<LineStats>,
}

impl CodeLines {
    fn new(code: Py<PyCode>, first_line: i32) -> Self {
        CodeLines {
            code,
            first_line,
            base: first_line,
            lines: Vec::new(),
        }
    }

    fn line_mut(&mut self, line: i32) -> &mut LineStats {
        if line < self.base {
            self.rebase(line);
        }
        let offset = (line - self.base) as usize;
        if offset >= self.lines.len() {
            self.lines.resize(offset + 1, LineStats::default());
        }
        &mut self.lines[offset]
    }

    /// Makes room for lines from `line` up to the current base.
    #[cold]
    fn rebase(&mut self, line: i32) {
        let missing = (self.base - line) as usize;
        self.lines
            .splice(0..0, std::iter::repeat(LineStats::default()).take(missing));
        self.base = line;
    }

    /// Every line that ran, with its statistics.
    fn lines(&self) -> impl Iterator<Item = (i32, &LineStats)> {
        (self.base..)
            .zip(&self.lines)
            .filter(|(_, stats)| stats.occurrences > 0)
    }
}

/// A profiled frame that is running, and the line it is on.
struct FrameRecord {
    frame: usize,
    /// Index of its code in [`LineState::codes`].
    code: usize,
    line: Option<i32>,
    start_live: u64,
    max_live: u64,
}

impl FrameRecord {
    fn new(frame: usize, code: usize, live: u64) -> Self {
        FrameRecord {
            frame,
            code,
            line: None,
            start_live: live,
            max_live: live,
        }
    }

    /// Folds the line that ends at `live` into its statistics.
    fn close_line(&self, codes: &mut [CodeLines], live: u64, rss: Option<u64>) {
        let Some(line) = self.line else {
            return;
        };
        let stats = codes[self.code].line_mut(line);
        stats.increment += live as i64 - self.start_live as i64;
        stats.peak = stats
            .peak
            .max(self.max_live.saturating_sub(self.start_live));
        stats.rss = stats.rss.max(rss);
        stats.occurrences += 1;
    }
}

struct Rss {
    read_at: Option<Instant>,
    bytes: Option<u64>,
    live_at_read: u64,
    events: u32,
}

impl Rss {
    /// The RSS now, or at the last read when reading again would tell nothing new.
    fn now(&mut self, live: u64) -> Option<u64> {
        self.events = self.events.wrapping_add(1);
        let due = self.read_at.is_none()
            || live.abs_diff(self.live_at_read) >= RSS_MOVE
            || (self.events % CLOCK_EVERY == 0
                && self.read_at.is_some_and(|at| at.elapsed() >= RSS_EVERY));
        if due {
            self.bytes = crate::engine::proc::resident_bytes();
            self.read_at = Some(Instant::now());
            self.live_at_read = live;
        }
        self.bytes
    }
}

/// `(code, line, increment, peak, rss, occurrences)`.
type StatsRow<'py> = (Bound<'py, PyCode>, i32, i64, u64, Option<u64>, u64);

/// The Rust half of `memgauge.LineProfiler`.
#[pyclass(module = "memgauge._native", name = "LineTracer", frozen)]
pub struct LineTracer {
    state: GilRefCell<LineState>,
}

/// What the tracer knows: the profiled code, the running frames and the statistics.
struct LineState {
    /// Indexes into [`LineState::codes`] by code object address.
    index: FastMap<usize, usize>,
    codes: Vec<CodeLines>,
    /// The profiled frames running on each Python thread, innermost last; the thread of the
    /// latest event first.
    stacks: Vec<(usize, Vec<FrameRecord>)>,
    scope: Option<Scope>,
    rss: Rss,
}

impl LineState {
    fn on_event(&mut self, py: Python<'_>, kind: TraceKind, frame: TraceFrame<'_>) {
        let thread = ffi::python_thread_key(py);
        if self.stacks.first().map(|(key, _)| *key) != Some(thread) {
            self.switch_thread(thread);
        }
        // Most events are lines of the innermost profiled frame: no lookup of its code.
        let top = self.stacks[0].1.last();
        let code = match top {
            Some(record) if record.frame == frame.key() => record.code,
            _ => match self.index.get(&frame.code()) {
                Some(&code) => code,
                None => return,
            },
        };
        let Some(slot) = self.scope.as_ref().and_then(Scope::slot) else {
            return;
        };
        let Some((live, peak)) = ffi::with_tracker(py, |tracker| tracker.take_peak(slot)).flatten()
        else {
            return;
        };
        for (_, stack) in &mut self.stacks {
            for record in stack {
                record.max_live = record.max_live.max(peak);
            }
        }
        let rss = self.rss.now(live);
        let stack = &mut self.stacks[0].1;
        let found = match stack.last() {
            Some(record) if record.frame == frame.key() => Some(stack.len() - 1),
            _ => stack.iter().rposition(|record| record.frame == frame.key()),
        };
        match (kind, found) {
            (TraceKind::Call, _) => {
                stack.push(FrameRecord::new(frame.key(), code, live));
                let code = &mut self.codes[code];
                let stats = code.line_mut(code.first_line);
                stats.occurrences += 1;
                stats.rss = stats.rss.max(rss);
            }
            (TraceKind::Line, found) => {
                let index = found.unwrap_or_else(|| {
                    // Profiling started inside this frame: it begins here.
                    stack.push(FrameRecord::new(frame.key(), code, live));
                    stack.len() - 1
                });
                let record = &mut stack[index];
                record.close_line(&mut self.codes, live, rss);
                record.line = Some(frame.line());
                record.start_live = live;
                record.max_live = live;
            }
            (TraceKind::Return, Some(index)) => {
                stack[index].close_line(&mut self.codes, live, rss);
                stack.truncate(index);
            }
            (TraceKind::Return, None) => {}
        }
    }

    /// Puts the stack of `thread` first, making one for a thread new to the profiler.
    #[cold]
    fn switch_thread(&mut self, thread: usize) {
        match self.stacks.iter().position(|(key, _)| *key == thread) {
            Some(index) => self.stacks.swap(0, index),
            None => {
                self.stacks.push((thread, Vec::new()));
                let last = self.stacks.len() - 1;
                self.stacks.swap(0, last);
            }
        }
    }
}

fn handle(py: Python<'_>, tracer: &Bound<'_, PyAny>, kind: TraceKind, frame: TraceFrame<'_>) {
    // Only ever installed with a LineTracer (see `enable`): the check is a type comparison.
    let Ok(tracer) = tracer.cast::<LineTracer>() else {
        return;
    };
    let enabled = tracer.get().state.with(py, |state| {
        if state.scope.is_none() {
            return false;
        }
        state.on_event(py, kind, frame);
        true
    });
    if enabled == Some(false) {
        // Disabled while this thread still had the trace function: take it off.
        ffi::set_trace(py, None, false);
    }
}

fn busy() -> PyErr {
    PyRuntimeError::new_err("the line profiler is in use")
}

#[pymethods]
impl LineTracer {
    #[new]
    fn new() -> Self {
        LineTracer {
            state: GilRefCell::new(LineState {
                index: FastMap::default(),
                codes: Vec::new(),
                stacks: Vec::new(),
                scope: None,
                rss: Rss {
                    read_at: None,
                    bytes: None,
                    live_at_read: 0,
                    events: 0,
                },
            }),
        }
    }

    /// Profiles the lines of a code object.
    fn add_code(&self, code: &Bound<'_, PyAny>) -> PyResult<()> {
        let code = code.cast::<PyCode>().map_err(|_| {
            PyTypeError::new_err(format!(
                "memgauge profiles functions and code objects, not {}",
                code.get_type()
                    .name()
                    .map_or_else(|_| "?".into(), |n| n.to_string())
            ))
        })?;
        let first_line: i32 = code.getattr("co_firstlineno")?.extract()?;
        let key = code.as_ptr() as usize;
        self.state
            .with(code.py(), |state| {
                if !state.index.contains_key(&key) {
                    state.index.insert(key, state.codes.len());
                    state
                        .codes
                        .push(CodeLines::new(code.clone().unbind(), first_line));
                }
            })
            .ok_or_else(busy)
    }

    #[getter]
    fn enabled(&self, py: Python<'_>) -> PyResult<bool> {
        self.state
            .with(py, |state| state.scope.is_some())
            .ok_or_else(busy)
    }

    /// Starts the figures and line events on this thread (and, from 3.12, on every thread).
    fn enable(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        slf.get()
            .state
            .with(py, |state| {
                if state.scope.is_some() {
                    return Err(PyRuntimeError::new_err(
                        "the line profiler is already enabled",
                    ));
                }
                let scope = Scope::open_all_threads(py, 0)
                    .map_err(|error| PyRuntimeError::new_err(error.to_string()))?;
                state.scope = Some(scope);
                Ok(())
            })
            .ok_or_else(busy)??;
        ffi::set_trace(py, Some((slf.as_any(), handle)), true);
        Ok(())
    }

    /// Sends this thread's line events here: `threading.settrace` calls it in new threads.
    #[pyo3(signature = (*_args))]
    fn thread_bootstrap(slf: &Bound<'_, Self>, _args: &Bound<'_, PyAny>) -> Option<Py<PyAny>> {
        let py = slf.py();
        if slf.get().state.with(py, |state| state.scope.is_some()) == Some(true) {
            ffi::set_trace(py, Some((slf.as_any(), handle)), false);
        }
        None
    }

    /// Stops the line events and the figures; the statistics stay.
    fn disable(&self, py: Python<'_>) -> PyResult<()> {
        ffi::set_trace(py, None, true);
        let scope = self
            .state
            .with(py, |state| {
                state.stacks.clear();
                state.scope.take()
            })
            .ok_or_else(busy)?;
        // Closing calls Python (the sites, the hooks): with the state let go.
        if let Some(scope) = scope {
            scope.close(py);
        }
        Ok(())
    }

    /// `(code, line, increment, peak, rss, occurrences)` for every line that ran; the `def`
    /// line of a function carries its calls and the RSS at entry.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<StatsRow<'py>>> {
        self.state
            .with(py, |state| {
                let mut rows: Vec<_> = state
                    .codes
                    .iter()
                    .flat_map(|code| {
                        code.lines().map(|(line, stats)| {
                            (
                                code.code.bind(py).clone(),
                                line,
                                stats.increment,
                                stats.peak,
                                stats.rss,
                                stats.occurrences,
                            )
                        })
                    })
                    .collect();
                rows.sort_by_key(|row| (row.0.as_ptr() as usize, row.1));
                rows
            })
            .ok_or_else(busy)
    }
}
