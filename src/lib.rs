//! memgauge: exact, deterministic memory figures for Python code, and a gate for CI.

//!
//! The parts, each importing only from those listed after it: `cli` (the `memgauge` command) and
//! `bindings` (the Python module), `timeline` (`memgauge run` and `plot`), `gate` (compare and
//! the reports), `engine` (the measurement), `model` (results, baseline, figures, sizes, errors).

pub mod cli;
pub mod engine;
pub mod gate;
pub mod model;
pub mod timeline;

#[cfg(feature = "python")]
mod bindings;

// The engine relies on the GIL (one owner of its state, no locks on the hooks' path): on a
// free-threaded build, importing it re-enables the GIL rather than letting hooks race.
#[cfg(feature = "python")]
#[pyo3::pymodule(gil_used = true)]
mod _native {
    #[pymodule_export]
    use crate::bindings::{
        cli_main, format_size, hold_native, native_slots, native_supported, parse_size, rss_bytes,
        site_lookup, PyResultsWriter, PyScope,
    };
    #[pymodule_export]
    use crate::engine::lines::LineTracer;

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        // What native tracing appends to an environment key, defined with the results schema.
        m.add("NATIVE_SUFFIX", crate::model::results::NATIVE_SUFFIX)
    }
}
