//! Builds the allocator shim (`src/gpu/torch_mem_shim.cpp`, allocator statistics that tch does
//! not expose) against the wheel's headers, and lets this crate's own tests find libtorch
//! without `LD_LIBRARY_PATH` (an rpath to the wheel's `torch/lib`). The binary's build script
//! does the same for the binaries, and keeps `libtorch_cuda` linked.

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
