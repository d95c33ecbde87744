//! Line events from `sys.monitoring` (PEP 669, 3.12+) for the line profiler: the callbacks are
//! C functions (`METH_FASTCALL` builtins bound to the tracer), which hand each event to Rust
//! with no argument parsing, as the trace function does for `sys.settrace`'s events.

use std::ffi::{c_char, c_long};
use std::sync::atomic::{AtomicUsize, Ordering::*};

use pyo3::ffi;
use pyo3::prelude::*;

use super::trace::TraceKind;

/// The receiver of `sys.monitoring` events: the tracer the callback is bound to, what happened,
/// the code object, and the event's number: the line for a line event, else the instruction's
/// byte offset.
pub type MonitorHandler = fn(Python<'_>, &Bound<'_, PyAny>, TraceKind, &Bound<'_, PyAny>, i32);

static MONITOR_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Hands one event to the handler: `args` are the code object and the number (then the return
/// value or the exception, unused).
///
/// # Safety
/// Called by CPython as a `METH_FASTCALL` function: the GIL is held, `args` holds `nargs` live
/// objects, and `slf` is the object the function was made with (a live tracer).
unsafe fn dispatch(
    slf: *mut ffi::PyObject,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kind: TraceKind,
) -> *mut ffi::PyObject {
    let handler = MONITOR_HANDLER.load(Relaxed);
    // SAFETY: as the caller promises.
    unsafe {
        if handler != 0 && nargs >= 2 && !slf.is_null() {
            let py = Python::assume_attached();
            let number: c_long = ffi::PyLong_AsLong(*args.add(1));
            if number == -1 && !ffi::PyErr_Occurred().is_null() {
                ffi::PyErr_Clear();
            } else {
                let handler = std::mem::transmute::<usize, MonitorHandler>(handler);
                let tracer = Borrowed::from_ptr(py, slf);
                let code = Borrowed::from_ptr(py, *args);
                handler(py, &tracer, kind, &code, number as i32);
            }
        }
        ffi::Py_IncRef(ffi::Py_None());
        ffi::Py_None()
    }
}

macro_rules! callback {
    ($name:ident, $kind:expr) => {
        unsafe extern "C" fn $name(
            slf: *mut ffi::PyObject,
            args: *mut *mut ffi::PyObject,
            nargs: ffi::Py_ssize_t,
        ) -> *mut ffi::PyObject {
            // SAFETY: CPython calls it as the METH_FASTCALL function it was made as.
            unsafe { dispatch(slf, args, nargs, $kind) }
        }
    };
}

callback!(on_start, TraceKind::Call);
callback!(on_resume, TraceKind::Resume);
callback!(on_line, TraceKind::Line);
callback!(on_return, TraceKind::Return);

/// A method table CPython only reads.
struct Definitions([ffi::PyMethodDef; 4]);

// SAFETY: the definitions are constant and never written, by us or by CPython.
unsafe impl Sync for Definitions {}

const fn definition(
    name: &'static std::ffi::CStr,
    function: ffi::PyCFunctionFast,
) -> ffi::PyMethodDef {
    ffi::PyMethodDef {
        ml_name: name.as_ptr() as *const c_char,
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFast: function,
        },
        ml_flags: ffi::METH_FASTCALL,
        ml_doc: std::ptr::null(),
    }
}

static DEFINITIONS: Definitions = Definitions([
    definition(c"memgauge_py_start", on_start),
    definition(c"memgauge_py_resume", on_resume),
    definition(c"memgauge_line", on_line),
    definition(c"memgauge_py_return", on_return),
]);

/// The callbacks, bound to `tracer`, that send its events to `handler`: for PY_START, for
/// PY_RESUME and PY_THROW (a generator goes on), for LINE, and for PY_RETURN, PY_YIELD and
/// PY_UNWIND (the frame stops), in that order.
pub fn monitor_callbacks<'py>(
    tracer: &Bound<'py, PyAny>,
    handler: MonitorHandler,
) -> PyResult<[Bound<'py, PyAny>; 4]> {
    MONITOR_HANDLER.store(handler as usize, Relaxed);
    let py = tracer.py();
    let make = |index: usize| {
        let definition = std::ptr::addr_of!(DEFINITIONS.0[index]).cast_mut();
        // SAFETY: the GIL is held; the definition is static, and CPython only reads it (the
        // pointer is mutable in the signature only). The function keeps a reference to the
        // tracer.
        unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyCFunction_NewEx(definition, tracer.as_ptr(), std::ptr::null_mut()),
            )
        }
    };
    Ok([make(0)?, make(1)?, make(2)?, make(3)?])
}

/// The line of the instruction at byte `offset` of `code` (the offsets `sys.monitoring` reports);
/// the first line when the instruction has none.
pub fn code_line(code: &Bound<'_, pyo3::types::PyCode>, offset: i32, first_line: i32) -> i32 {
    // SAFETY: a live code object (the GIL is held, as the bound reference says); the function
    // returns -1 for an offset out of range or an instruction without a line.
    let line = unsafe { ffi::PyCode_Addr2Line(code.as_ptr().cast(), offset) };
    if line > 0 {
        line
    } else {
        first_line
    }
}
