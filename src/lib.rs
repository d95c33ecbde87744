//! memgauge: exact, deterministic memory figures for Python code, and a gate for CI.

pub mod baseline;
pub mod blocks;
pub mod cli;
pub mod compare;
pub mod error;
pub mod ffi;
pub mod html;
pub mod proc;
pub mod render;
pub mod results;
pub mod rss;
pub mod size;
pub mod timeline;
pub mod tracker;

#[cfg(feature = "python")]
mod bindings;
#[cfg(feature = "python")]
mod lines;
#[cfg(feature = "python")]
pub mod scope;

// The engine relies on the GIL (one owner of its state, no locks on the hooks' path): on a
// free-threaded build, importing it re-enables the GIL rather than letting hooks race.
#[cfg(feature = "python")]
#[pyo3::pymodule(gil_used = true)]
mod _native {
    #[pymodule_export]
    use crate::bindings::{cli_main, format_size, parse_size, rss_bytes, site_lookup, PyScope};
    #[pymodule_export]
    use crate::lines::LineTracer;

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("__version__", env!("CARGO_PKG_VERSION"))
    }
}
