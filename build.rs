fn main() {
    // The Py_3_* cfgs select the C API of the Python being built for.
    #[cfg(feature = "python")]
    pyo3_build_config::use_pyo3_cfgs();
}
