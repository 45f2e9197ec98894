//! Lets the binaries and tests find libtorch without `LD_LIBRARY_PATH` (an rpath to the wheel's
//! `torch/lib`; `DEP_TCH_LIBTORCH_LIB` is set by torch-sys because it is a direct dependency).
//!
//! Nothing forces `libtorch_cuda` in: rustc links with `--as-needed`, so only the libraries
//! whose symbols are used are mapped. `runpod-worker` uses none of libtorch's symbols (it maps none),
//! `runpod-worker-torch` maps libtorch_cpu, and loads libtorch_cuda at start when the host has
//! an NVIDIA driver (`worker::gpu::cuda_runtime::load_torch_cuda`). `runpod-parse`, the
//! document parser's child, maps no libtorch either: its address-space limit is for the
//! document.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let lib_path = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys is a direct dependency, so DEP_TCH_LIBTORCH_LIB is set");
    if std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default() == "linux" {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_path}");
        // The front binary links the `worker` crate for its config, so tch's C++ glue is in
        // its link. Its inline functions would be exported (libtorch references the same
        // names), which keeps them live and libtorch_cpu needed. Exporting nothing from the
        // static archives lets the unused glue be collected and `--as-needed` drop libtorch.
        println!("cargo:rustc-link-arg-bin=runpod-worker=-Wl,--exclude-libs,ALL");
    }
}
