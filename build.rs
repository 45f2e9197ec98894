//! Keeps libtorch's CUDA library linked and findable without `LD_LIBRARY_PATH`.
//!
//! rustc links with `--as-needed`, which drops `libtorch_cuda` (nothing references its symbols
//! directly) and CUDA is then never visible. `--no-as-needed -ltorch` keeps it; the rpath to the
//! wheel's `torch/lib` lets the binary start with no environment. `DEP_TCH_LIBTORCH_LIB` is set by
//! torch-sys because it is a direct dependency. (The worker crate's build script builds the
//! allocator shim.)

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let lib_path = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys is a direct dependency, so DEP_TCH_LIBTORCH_LIB is set");
    if std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default() == "linux" {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_path}");
        // Not for `runpod-parse`, the document parser's child process: it must not map
        // libtorch (its address-space limit is for the document, not for CUDA libraries).
        for target in ["bin=runpod-worker", "tests"] {
            for arg in [
                "-Wl,--no-as-needed",
                "-ltorch",
                "-ltorch_cuda",
                "-Wl,--as-needed",
            ] {
                println!("cargo:rustc-link-arg-{target}={arg}");
            }
        }
    }
}
