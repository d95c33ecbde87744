//! The Python classes and functions of `memgauge._native`.

use std::path::PathBuf;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::{Map, Value};

use crate::engine::scope::{Measurement, Scope, SiteBytes};
use crate::model::error::Error;
use crate::model::{results, size};

/// A measurement scope: `with memgauge.measure() as m:`; the figures are read after the block.
#[pyclass(name = "Scope", module = "memgauge._native")]
pub struct PyScope {
    top_sites: usize,
    apart: bool,
    native: bool,
    open: Option<Scope>,
    result: Option<Measurement>,
}

impl PyScope {
    fn result(&self) -> PyResult<&Measurement> {
        self.result.as_ref().ok_or_else(|| {
            let state = if self.open.is_some() {
                "still open"
            } else {
                "not started"
            };
            PyRuntimeError::new_err(format!(
                "the measurement is {state}: read its figures after the `with` block (or stop())"
            ))
        })
    }
}

#[pymethods]
impl PyScope {
    /// `apart=True`: what this stretch allocates counts here and not in the scopes already
    /// open (the pytest plugin measures a test's first imports this way); it reads no RSS.
    /// `native=True`: what C code allocates with the malloc family counts too (Linux, x86_64).
    #[new]
    #[pyo3(signature = (top_sites = 10, *, apart = false, native = false))]
    fn new(top_sites: usize, apart: bool, native: bool) -> Self {
        PyScope {
            top_sites,
            apart,
            native,
            open: None,
            result: None,
        }
    }

    /// Opens the scope: from here on, allocations of this thread and of threads it starts count.
    fn start(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.open.is_some() {
            return Err(PyRuntimeError::new_err(
                "the measurement is already running",
            ));
        }
        self.result = None;
        let open = if self.apart {
            Scope::open_apart
        } else {
            Scope::open
        };
        let scope = open(py, self.top_sites, self.native)
            .map_err(|error| PyRuntimeError::new_err(error.to_string()))?;
        self.open = Some(scope);
        Ok(())
    }

    /// Closes the scope; the figures can be read afterwards.
    fn stop(&mut self, py: Python<'_>) -> PyResult<()> {
        let scope = self
            .open
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the measurement is not running"))?;
        self.result = Some(scope.close(py));
        Ok(())
    }

    fn __enter__<'py>(mut slf: PyRefMut<'py, Self>) -> PyResult<PyRefMut<'py, Self>> {
        let py = slf.py();
        slf.start(py)?;
        Ok(slf)
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&mut self, py: Python<'_>, _exc: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }

    /// Traced: the most memory allocated in the scope and alive at the same time.
    #[getter]
    fn peak_bytes(&self) -> PyResult<u64> {
        Ok(self.result()?.peak_bytes)
    }

    /// Traced: memory allocated in the scope and still alive at its end.
    #[getter]
    fn leaked_bytes(&self) -> PyResult<u64> {
        Ok(self.result()?.leaked_bytes)
    }

    /// Traced: every byte allocated in the scope, freed or not.
    #[getter]
    fn allocated_bytes(&self) -> PyResult<u64> {
        Ok(self.result()?.allocated_bytes)
    }

    /// Traced: the number of allocations in the scope.
    #[getter]
    fn allocations(&self) -> PyResult<u64> {
        Ok(self.result()?.allocations)
    }

    /// RSS: the process's high water mark during the scope above its RSS at the start.
    #[getter]
    fn rss_peak_bytes(&self) -> PyResult<Option<u64>> {
        Ok(self.result()?.rss_peak_bytes)
    }

    /// RSS: at the end minus at the start.
    #[getter]
    fn rss_delta_bytes(&self) -> PyResult<Option<i64>> {
        Ok(self.result()?.rss_delta_bytes)
    }

    /// True when the RSS peak was sampled (every 1 ms) rather than read from the kernel.
    #[getter]
    fn rss_sampled(&self) -> PyResult<bool> {
        Ok(self.result()?.rss_sampled)
    }

    /// True when NumPy's array buffers were traced.
    #[getter]
    fn numpy_traced(&self) -> PyResult<bool> {
        Ok(self.result()?.numpy_traced)
    }

    /// True when the malloc family was traced (asked for, and on Linux x86_64).
    #[getter]
    fn native_traced(&self) -> PyResult<bool> {
        Ok(self.result()?.native_traced)
    }

    #[getter]
    fn duration_s(&self) -> PyResult<f64> {
        Ok(self.result()?.duration_s)
    }

    /// The lines that held the most memory at the peak, largest first, as dicts with `file`,
    /// `line`, `function` and `bytes`.
    #[getter]
    fn top_sites<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        site_dicts(py, &self.result()?.top_sites)
    }

    /// The lines that still held the most memory when the scope closed (what `leaked_bytes`
    /// is made of), largest first, in the form of `top_sites`.
    #[getter]
    fn leak_sites<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        site_dicts(py, &self.result()?.leak_sites)
    }

    /// All figures as a dict, in the results file's keys.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let result = self.result()?;
        let dict = PyDict::new(py);
        dict.set_item("peak_bytes", result.peak_bytes)?;
        dict.set_item("leaked_bytes", result.leaked_bytes)?;
        dict.set_item("allocated_bytes", result.allocated_bytes)?;
        dict.set_item("allocations", result.allocations)?;
        dict.set_item("rss_peak_bytes", result.rss_peak_bytes)?;
        dict.set_item("rss_delta_bytes", result.rss_delta_bytes)?;
        dict.set_item("rss_sampled", result.rss_sampled)?;
        dict.set_item("duration_s", result.duration_s)?;
        dict.set_item("top_sites", self.top_sites(py)?)?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        match &self.result {
            Some(r) => format!(
                "<memgauge.Scope peak={} leaked={} allocated={} rss_peak={}>",
                size::format_size(r.peak_bytes),
                size::format_size(r.leaked_bytes),
                size::format_size(r.allocated_bytes),
                r.rss_peak_bytes.map_or("n/a".to_owned(), size::format_size),
            ),
            None if self.open.is_some() => "<memgauge.Scope running>".to_owned(),
            None => "<memgauge.Scope not started>".to_owned(),
        }
    }
}

fn site_dicts<'py>(py: Python<'py>, sites: &[SiteBytes]) -> PyResult<Vec<Bound<'py, PyDict>>> {
    sites
        .iter()
        .map(|site| {
            let dict = PyDict::new(py);
            dict.set_item("file", &site.location.file)?;
            dict.set_item("line", site.location.line)?;
            dict.set_item("function", &site.location.function)?;
            dict.set_item("bytes", site.bytes)?;
            Ok(dict)
        })
        .collect()
}

/// The results file of a pytest run, written as it goes: the plugin's one writer of the results
/// schema (records arrive as JSON and are checked against it; see `model::results::Writer`).
#[pyclass(name = "ResultsWriter", module = "memgauge._native")]
pub struct PyResultsWriter {
    writer: Option<results::Writer>,
}

fn py_error(error: Error) -> PyErr {
    match error {
        Error::Write { .. } | Error::Read { .. } => PyOSError::new_err(error.to_string()),
        _ => PyValueError::new_err(error.to_string()),
    }
}

fn json_object(what: &str, text: &str) -> PyResult<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(PyValueError::new_err(format!("{what}: not a JSON object"))),
        Err(error) => Err(PyValueError::new_err(format!("{what}: {error}"))),
    }
}

impl PyResultsWriter {
    fn writer(&mut self) -> PyResult<&mut results::Writer> {
        self.writer
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("the results were already finished"))
    }
}

#[pymethods]
impl PyResultsWriter {
    /// Starts `output`'s stream (`output` + `.partial`); `environment`: a JSON object.
    #[new]
    #[pyo3(signature = (output, environment, shard = None))]
    fn new(output: PathBuf, environment: &str, shard: Option<String>) -> PyResult<Self> {
        let environment = json_object("environment", environment)?;
        let writer = results::Writer::open(&output, environment, shard).map_err(py_error)?;
        Ok(PyResultsWriter {
            writer: Some(writer),
        })
    }

    /// A test started.
    fn start(&mut self, id: &str) -> PyResult<()> {
        self.writer()?.start(id).map_err(py_error)
    }

    /// A test's record (JSON).
    fn test(&mut self, id: &str, record: &str) -> PyResult<()> {
        self.writer()?.test(id, record).map_err(py_error)
    }

    /// A benchmark's record (JSON).
    fn benchmark(&mut self, id: &str, record: &str) -> PyResult<()> {
        self.writer()?.benchmark(id, record).map_err(py_error)
    }

    /// A recorded test failed after its record (in teardown): its outcome becomes "error".
    /// Returns whether the test had a record.
    fn mark_error(&mut self, id: &str) -> PyResult<bool> {
        self.writer()?.mark_error(id).map_err(py_error)
    }

    /// Writes the document atomically and removes the stream; `tool` and `determinism`: JSON
    /// objects.
    fn finish(&mut self, py: Python<'_>, tool: &str, determinism: &str) -> PyResult<()> {
        let tool = json_object("tool", tool)?;
        let determinism = json_object("determinism", determinism)?;
        let writer = self
            .writer
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the results were already finished"))?;
        py.detach(|| writer.finish(tool, determinism))
            .map_err(py_error)
    }
}

/// Parses a size such as "50 MiB" into bytes (B, KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024).
#[pyfunction]
pub fn parse_size(text: &str) -> PyResult<u64> {
    size::parse_size(text).map_err(|error| PyValueError::new_err(error.to_string()))
}

/// Formats bytes in binary units: "12.34 MiB".
#[pyfunction]
pub fn format_size(bytes: i64) -> String {
    size::format_signed_size(i128::from(bytes))
}

/// The process's current RSS and its high water mark, in bytes (None where the OS does not say).
#[pyfunction]
pub fn rss_bytes() -> (Option<u64>, Option<u64>) {
    let status = crate::engine::proc::status_memory().unwrap_or_default();
    (status.rss_bytes, status.hwm_bytes)
}

/// How allocation sites are found: "frames" (the interpreter's own frames, read directly, on
/// CPython 3.11 to 3.15 once their layout checked out), "public-api" (a frame object per lookup),
/// or "unchecked" before the first scope opens.
#[pyfunction]
pub fn site_lookup() -> &'static str {
    crate::engine::ffi::site_lookup()
}

/// Whether native allocations can be traced here (Linux on x86_64).
#[pyfunction]
pub fn native_supported() -> bool {
    crate::engine::ffi::native_supported()
}

/// `hold=True`: the native hooks stay in while no scope is open, until as many
/// `hold_native(False)` (the pytest plugin holds them for its session). Returns whether they
/// are in.
#[pyfunction]
pub fn hold_native(py: Python<'_>, hold: bool) -> bool {
    crate::engine::ffi::hold_native(py, hold)
}

/// The loaded objects' GOT slots of the malloc family, walked now: (how many, how many hold
/// memgauge's hooks). For tests: none does once the last native scope has closed.
#[pyfunction]
pub fn native_slots(py: Python<'_>) -> (usize, usize) {
    crate::engine::ffi::native_slots(py)
}

/// Runs the `memgauge` command line with `argv` (program name first); returns the exit code.
#[pyfunction]
pub fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| crate::cli::run(argv).code())
}
