fn main() {
    // `read_frames`: the hooks may read the interpreter's own frames
    // (`src/engine/ffi/frames.rs`), whose layouts are written down for CPython 3.11 to 3.15
    // with the GIL.
    println!("cargo:rustc-check-cfg=cfg(read_frames)");
    // `native_hooks`: the malloc family can be interposed in the loaded objects' GOT slots
    // (`src/engine/ffi/native.rs`): 64-bit ELF on Linux, and x86_64 (not x32), where the
    // `dlopen` trampoline is written.
    println!("cargo:rustc-check-cfg=cfg(native_hooks)");
    let target = |key: &str| std::env::var(key).unwrap_or_default();
    if target("CARGO_CFG_TARGET_OS") == "linux"
        && target("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && target("CARGO_CFG_TARGET_POINTER_WIDTH") == "64"
    {
        println!("cargo:rustc-cfg=native_hooks");
    }
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
