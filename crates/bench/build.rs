//! Lets this crate's tests find libtorch without `LD_LIBRARY_PATH`: they link the worker, and
//! with it libtorch (an rpath to the wheel's `torch/lib`, as the worker's build script sets).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let lib_path = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys is a direct dependency, so DEP_TCH_LIBTORCH_LIB is set");
    if std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default() == "linux" {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_path}");
    }
}
