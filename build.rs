//! Keeps libtorch's CUDA library linked and findable without `LD_LIBRARY_PATH`.
//!
//! rustc links with `--as-needed`, which drops `libtorch_cuda` (nothing references its symbols
//! directly) and CUDA is then never visible. `--no-as-needed -ltorch` keeps it; the rpath to the
//! wheel's `torch/lib` lets the binary start with no environment. `DEP_TCH_LIBTORCH_LIB` is set by
//! torch-sys because it is a direct dependency.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" {
        return;
    }
    if let Some(lib_path) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!(
            "cargo:rustc-link-arg=-Wl,-rpath,{}",
            lib_path.to_string_lossy()
        );
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-ltorch_cuda");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
