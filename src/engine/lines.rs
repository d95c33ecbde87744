//! The line profiler's engine: per line of the profiled functions, the net traced bytes it
//! added, the highest traced memory reached while it ran, how often it ran and the RSS after it.
//!
//! Line events come from a C trace function (`PyEval_SetTrace`, see [`crate::engine::ffi::set_trace`]);
//! events of code that is not profiled return at the first lookup. The traced figures come from
//! a scope that follows every thread: at each event of a profiled frame, the scope's high water
//! mark since the previous event is folded into every line still running (a caller's line runs
//! while its callee does), then restarted.

use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
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
    /// The frame's address, from the trace function; 0 from `sys.monitoring`, whose events
    /// name the code object only (they nest: the frame is the stack's top).
    frame: usize,
    /// The code object's address, and its index in [`LineState::codes`].
    code_address: usize,
    code: usize,
    line: Option<i32>,
    start_live: u64,
    max_live: u64,
}

impl FrameRecord {
    fn new(frame: usize, code_address: usize, code: usize, live: u64) -> Self {
        FrameRecord {
            frame,
            code_address,
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
    /// Where line events come from: asked for (`LineTracer(events=...)`), and in use.
    requested: Source,
    in_use: Option<Source>,
    /// The `sys.monitoring` tool id taken while enabled through it.
    #[cfg(Py_3_12)]
    tool: Option<u8>,
}

/// The source of line events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// `sys.monitoring` from 3.12, the trace function otherwise or when no tool id is free.
    Auto,
    Monitoring,
    Settrace,
}

impl Source {
    fn parse(text: &str) -> PyResult<Source> {
        match text {
            "auto" => Ok(Source::Auto),
            "sys.monitoring" => Ok(Source::Monitoring),
            "settrace" => Ok(Source::Settrace),
            other => Err(PyValueError::new_err(format!(
                "events={other:?}: use \"auto\", \"sys.monitoring\" (Python 3.12+) or \"settrace\""
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Source::Auto => "auto",
            Source::Monitoring => "sys.monitoring",
            Source::Settrace => "settrace",
        }
    }
}

/// One line event, from either source: the trace function (which gives the frame) or
/// `sys.monitoring` (which gives the code object and, for lines, the line).
struct Event {
    kind: TraceKind,
    /// The frame's address, or 0 when only the code object is known.
    frame: usize,
    code: usize,
}

impl LineState {
    /// `line`: the line the frame is at, asked only of line and resume events, given the code's
    /// first line (for an instruction that has none).
    fn on_event(&mut self, py: Python<'_>, event: Event, line: impl FnOnce(i32) -> i32) {
        let thread = ffi::python_thread_key(py);
        if self.stacks.first().map(|(key, _)| *key) != Some(thread) {
            self.switch_thread(thread);
        }
        // The record of the event's frame when it is the innermost: with a frame, the one of
        // that frame; from `sys.monitoring`, whose events nest, the top if it runs this code.
        let is_top = |record: &FrameRecord| {
            if event.frame != 0 {
                record.frame == event.frame
            } else {
                record.code_address == event.code
            }
        };
        // Most events are lines of the innermost profiled frame: no lookup of its code.
        let top = self.stacks[0].1.last();
        let code = match top {
            Some(record) if is_top(record) => record.code,
            _ => match self.index.get(&event.code) {
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
            Some(record) if is_top(record) => Some(stack.len() - 1),
            _ if event.frame == 0 => None,
            _ => stack.iter().rposition(|record| record.frame == event.frame),
        };
        match (event.kind, found) {
            (TraceKind::Call, _) => {
                stack.push(FrameRecord::new(event.frame, event.code, code, live));
                let code = &mut self.codes[code];
                let stats = code.line_mut(code.first_line);
                stats.occurrences += 1;
                stats.rss = stats.rss.max(rss);
            }
            (TraceKind::Resume, _) => {
                // A generator or coroutine goes on, inside the line it stopped at.
                let mut record = FrameRecord::new(event.frame, event.code, code, live);
                record.line = Some(line(self.codes[code].first_line));
                stack.push(record);
            }
            (TraceKind::Line, found) => {
                let index = found.unwrap_or_else(|| {
                    // Profiling started inside this frame: it begins here.
                    stack.push(FrameRecord::new(event.frame, event.code, code, live));
                    stack.len() - 1
                });
                let record = &mut stack[index];
                record.close_line(&mut self.codes, live, rss);
                record.line = Some(line(self.codes[code].first_line));
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

    /// The profiled code objects, for calls to `sys.monitoring` made with the state let go.
    fn code_refs(&self, py: Python<'_>) -> Vec<Py<PyCode>> {
        self.codes.iter().map(|c| c.code.clone_ref(py)).collect()
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
    let event = Event {
        kind,
        frame: frame.key(),
        code: frame.code(),
    };
    if tracer.get().on_event(py, event, |_| frame.line()) == Some(false) {
        // Disabled while this thread still had the trace function: take it off.
        ffi::set_trace(py, None, false);
    }
}

fn busy() -> PyErr {
    PyRuntimeError::new_err("the line profiler is in use")
}

impl LineTracer {
    /// Hands an event to the state; Some(false) when the tracer is disabled, None when the state
    /// is in use further up this thread.
    fn on_event(
        &self,
        py: Python<'_>,
        event: Event,
        line: impl FnOnce(i32) -> i32,
    ) -> Option<bool> {
        self.state.with(py, |state| {
            if state.scope.is_none() {
                return false;
            }
            state.on_event(py, event, line);
            true
        })
    }
}

#[pymethods]
impl LineTracer {
    /// `events`: where line events come from: "auto" (`sys.monitoring` from Python 3.12, unless
    /// every tool id is taken; the trace function otherwise), "sys.monitoring" or "settrace".
    #[new]
    #[pyo3(signature = (events = "auto"))]
    fn new(events: &str) -> PyResult<Self> {
        let requested = Source::parse(events)?;
        #[cfg(not(Py_3_12))]
        if requested == Source::Monitoring {
            return Err(PyValueError::new_err(
                "events=\"sys.monitoring\" needs Python 3.12 or later",
            ));
        }
        Ok(LineTracer {
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
                requested,
                in_use: None,
                #[cfg(Py_3_12)]
                tool: None,
            }),
        })
    }

    /// Where the line events come from while enabled ("sys.monitoring" or "settrace"), or came
    /// from when last enabled; None before.
    #[getter]
    fn line_events(&self, py: Python<'_>) -> PyResult<Option<&'static str>> {
        self.state
            .with(py, |state| state.in_use.map(Source::name))
            .ok_or_else(busy)
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
        let _tool = self
            .state
            .with(code.py(), |state| {
                if !state.index.contains_key(&key) {
                    state.index.insert(key, state.codes.len());
                    state
                        .codes
                        .push(CodeLines::new(code.clone().unbind(), first_line));
                }
                #[cfg(Py_3_12)]
                return state.tool;
                #[cfg(not(Py_3_12))]
                None::<u8>
            })
            .ok_or_else(busy)?;
        #[cfg(Py_3_12)]
        if let Some(tool) = _tool {
            // Enabled already: this code's events start now.
            monitoring::watch(
                code.py(),
                tool,
                std::slice::from_ref(&code.clone().unbind()),
            )?;
        }
        Ok(())
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
        let (_requested, _codes) = slf
            .get()
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
                Ok((state.requested, state.code_refs(py)))
            })
            .ok_or_else(busy)??;
        #[cfg(Py_3_12)]
        if _requested != Source::Settrace {
            match monitoring::start(slf, &_codes) {
                Ok(Some(tool)) => {
                    slf.get().state.with(py, |state| {
                        state.tool = Some(tool);
                        state.in_use = Some(Source::Monitoring);
                    });
                    return Ok(());
                }
                Ok(None) if _requested == Source::Auto => {} // Every tool id taken: settrace.
                Ok(None) => {
                    Self::abandon(slf);
                    return Err(PyRuntimeError::new_err(
                        "events=\"sys.monitoring\": every sys.monitoring tool id is taken \
                         (by debuggers, coverage, other profilers); use events=\"auto\" to fall \
                         back to the trace function",
                    ));
                }
                Err(error) => {
                    Self::abandon(slf);
                    return Err(error);
                }
            }
        }
        slf.get().state.with(py, |state| {
            state.in_use = Some(Source::Settrace);
        });
        ffi::set_trace(py, Some((slf.as_any(), handle)), true);
        Ok(())
    }

    /// Sends this thread's line events here: `threading.settrace` calls it in new threads
    /// (through `sys.monitoring` every thread has them already).
    #[pyo3(signature = (*_args))]
    fn thread_bootstrap(slf: &Bound<'_, Self>, _args: &Bound<'_, PyAny>) -> Option<Py<PyAny>> {
        let py = slf.py();
        let traced = slf.get().state.with(py, |state| {
            state.scope.is_some() && state.in_use == Some(Source::Settrace)
        });
        if traced == Some(true) {
            ffi::set_trace(py, Some((slf.as_any(), handle)), false);
        }
        None
    }

    /// Stops the line events and the figures; the statistics stay.
    fn disable(&self, py: Python<'_>) -> PyResult<()> {
        let (scope, _tool, _codes) = self
            .state
            .with(py, |state| {
                state.stacks.clear();
                #[cfg(Py_3_12)]
                let tool = state.tool.take();
                #[cfg(not(Py_3_12))]
                let tool = None::<u8>;
                (state.scope.take(), tool, state.code_refs(py))
            })
            .ok_or_else(busy)?;
        #[cfg(Py_3_12)]
        if let Some(tool) = _tool {
            monitoring::stop(py, tool, &_codes)?;
        }
        if _tool.is_none() {
            ffi::set_trace(py, None, true);
        }
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

impl LineTracer {
    /// Gives up an enable that could not start its line events: the scope closes.
    #[cfg(Py_3_12)]
    fn abandon(slf: &Bound<'_, Self>) {
        let py = slf.py();
        let scope = slf
            .get()
            .state
            .with(py, |state| state.scope.take())
            .flatten();
        if let Some(scope) = scope {
            scope.close(py);
        }
    }
}

/// An event from `sys.monitoring`, which names the code object: its frame is the top of the
/// thread's stack, since these events nest. `number`: the line of a line event, else the
/// instruction's offset.
#[cfg(Py_3_12)]
fn monitored(
    py: Python<'_>,
    tracer: &Bound<'_, PyAny>,
    kind: TraceKind,
    code: &Bound<'_, PyAny>,
    number: i32,
) {
    // Only ever bound to a LineTracer (see `monitoring::start`): a type comparison.
    let Ok(tracer) = tracer.cast::<LineTracer>() else {
        return;
    };
    let event = Event {
        kind,
        frame: 0,
        code: code.as_ptr() as usize,
    };
    let _ = tracer.get().on_event(py, event, |first_line| {
        match (kind, code.cast::<PyCode>()) {
            (TraceKind::Line, _) => number,
            // A resume: the line of the instruction it goes on at.
            (_, Ok(code)) => ffi::monitoring::code_line(code, number, first_line),
            (_, Err(_)) => first_line,
        }
    });
}

/// Line events through `sys.monitoring` (PEP 669), 3.12+: events of the profiled code objects
/// only (`set_local_events`), so code that is not profiled runs at full speed, where the trace
/// function is called for every frame (and, from 3.12, is itself built on `sys.monitoring`).
#[cfg(Py_3_12)]
mod monitoring {
    use pyo3::prelude::*;
    use pyo3::types::PyCode;

    use super::LineTracer;
    use crate::engine::ffi;

    /// The tool ids to try, the profilers' own first (`sys.monitoring.PROFILER_ID`), then those
    /// nobody reserves, then the debugger's and coverage's (taken only when they are free).
    const TOOL_IDS: [u8; 6] = [2, 3, 4, 0, 1, 5];
    const NAME: &str = "memgauge";

    /// The local events on every profiled code object, each with the index of its callback in
    /// [`ffi::monitoring::monitor_callbacks`]'s array.
    const LOCAL: [(&str, usize); 5] = [
        ("PY_START", 0),
        ("PY_RESUME", 1),
        ("LINE", 2),
        ("PY_RETURN", 3),
        ("PY_YIELD", 3),
    ];
    /// Events `sys.monitoring` has only for all code at once: the frame stops with an
    /// exception, or a generator goes on with one (`throw()`).
    const GLOBAL: [(&str, usize); 2] = [("PY_UNWIND", 3), ("PY_THROW", 1)];

    fn module(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        py.import("sys")?.getattr("monitoring")
    }

    fn mask(monitoring: &Bound<'_, PyAny>, events: &[(&str, usize)]) -> PyResult<i32> {
        let names = monitoring.getattr("events")?;
        events.iter().try_fold(0, |mask, (name, _)| {
            Ok(mask | names.getattr(*name)?.extract::<i32>()?)
        })
    }

    /// Takes a free tool id and starts the events; None when every id is taken.
    pub(super) fn start(
        tracer: &Bound<'_, LineTracer>,
        codes: &[Py<PyCode>],
    ) -> PyResult<Option<u8>> {
        let py = tracer.py();
        let monitoring = module(py)?;
        let mut free = None;
        for id in TOOL_IDS {
            if monitoring.call_method1("get_tool", (id,))?.is_none() {
                free = Some(id);
                break;
            }
        }
        let Some(tool) = free else {
            return Ok(None);
        };
        monitoring.call_method1("use_tool_id", (tool, NAME))?;
        let registered = (|| {
            let names = monitoring.getattr("events")?;
            let callbacks = ffi::monitoring::monitor_callbacks(tracer.as_any(), super::monitored)?;
            for (event, index) in LOCAL.iter().chain(&GLOBAL) {
                let callback = &callbacks[*index];
                monitoring.call_method1(
                    "register_callback",
                    (tool, names.getattr(*event)?, callback),
                )?;
            }
            monitoring.call_method1("set_events", (tool, mask(&monitoring, &GLOBAL)?))?;
            watch(py, tool, codes)
        })();
        if let Err(error) = registered {
            let _ = stop(py, tool, codes);
            return Err(error);
        }
        Ok(Some(tool))
    }

    /// Turns on the local events of `codes`.
    pub(super) fn watch(py: Python<'_>, tool: u8, codes: &[Py<PyCode>]) -> PyResult<()> {
        let monitoring = module(py)?;
        let local = mask(&monitoring, &LOCAL)?;
        for code in codes {
            monitoring.call_method1("set_local_events", (tool, code.bind(py), local))?;
        }
        Ok(())
    }

    /// Stops every event and gives the tool id back.
    pub(super) fn stop(py: Python<'_>, tool: u8, codes: &[Py<PyCode>]) -> PyResult<()> {
        let monitoring = module(py)?;
        let names = monitoring.getattr("events")?;
        for code in codes {
            monitoring.call_method1("set_local_events", (tool, code.bind(py), 0))?;
        }
        monitoring.call_method1("set_events", (tool, 0))?;
        for (event, _) in LOCAL.iter().chain(&GLOBAL) {
            monitoring.call_method1(
                "register_callback",
                (tool, names.getattr(*event)?, py.None()),
            )?;
        }
        monitoring.call_method1("free_tool_id", (tool,))?;
        Ok(())
    }
}
