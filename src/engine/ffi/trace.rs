//! Line events for the line profiler: a C-level trace function that hands each event to Rust.

use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering::*};

use pyo3::ffi;
use pyo3::prelude::*;

use super::sites::frame_code;

/// What a C trace function is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceKind {
    Call,
    Line,
    Return,
    /// A generator or coroutine goes on (from `sys.monitoring` only: the trace function
    /// reports a call).
    Resume,
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
