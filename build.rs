//! Keeps libtorch's CUDA library linked and findable without `LD_LIBRARY_PATH`, and builds the
//! allocator shim.
//!
//! rustc links with `--as-needed`, which drops `libtorch_cuda` (nothing references its symbols
//! directly) and CUDA is then never visible. `--no-as-needed -ltorch` keeps it; the rpath to the
//! wheel's `torch/lib` lets the binary start with no environment. `DEP_TCH_LIBTORCH_LIB` is set by
//! torch-sys because it is a direct dependency.
//!
//! `src/gpu/torch_mem_shim.cpp` is compiled against the wheel's headers: allocator statistics
//! that tch does not expose.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/gpu/torch_mem_shim.cpp");
    let lib_path = std::env::var_os("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys is a direct dependency, so DEP_TCH_LIBTORCH_LIB is set");
    let lib_path = Path::new(&lib_path);
    compile_shim(lib_path);
    if std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default() == "linux" {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_path.display());
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

/// The wheel's layout: `torch/lib` beside `torch/include`.
fn compile_shim(lib_path: &Path) {
    let include = lib_path
        .parent()
        .map(|torch| torch.join("include"))
        .unwrap_or_default();
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag_if_supported("-w")
        .file("src/gpu/torch_mem_shim.cpp")
        .compile("torch_mem_shim");
    println!("cargo:rustc-link-search=native={}", lib_path.display());
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    // dlopen/dlsym for the CUDA runtime queries (in libc since glibc 2.34, libdl before).
    println!("cargo:rustc-link-lib=dylib=dl");
}
