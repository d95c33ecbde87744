fn main() {
    // `read_frames`: the hooks may read the interpreter's own frames
    // (`src/engine/ffi/frames.rs`), whose layouts are written down for CPython 3.11 to 3.15
    // with the GIL.
    println!("cargo:rustc-check-cfg=cfg(read_frames)");
    #[cfg(feature = "python")]
    {
        // The Py_3_* cfgs select the C API of the Python being built for.
        pyo3_build_config::use_pyo3_cfgs();
        let config = pyo3_build_config::get();
        let version = config.version();
        let version = (version.major, version.minor);
        if ((3, 11)..(3, 16)).contains(&version) && !config.is_free_threaded() {
            println!("cargo:rustc-cfg=read_frames");
        }
    }
}
