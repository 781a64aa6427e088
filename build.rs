//! Links the binary against libtorch so that it runs without LD_LIBRARY_PATH (an rpath to
//! libtorch's folder) and, when the CUDA libraries are installed, keeps `torch_cuda` linked
//! (the linker would drop it with --as-needed, and CUDA would then be silently unavailable).

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        return;
    };
    let lib = Path::new(&libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // The full PyTorch wheel brings the CUDA libraries (cuBLAS among them) beside torch; the
    // small CPU set does not, and then torch_cuda could not even be loaded.
    let site_packages = Path::new(&libtorch).parent().unwrap_or(Path::new("."));
    if lib.join("libtorch_cuda.so").exists() && site_packages.join("nvidia/cublas").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        println!("cargo:rustc-cfg=hepaflow_cuda_linked");
    }
    println!("cargo::rustc-check-cfg=cfg(hepaflow_cuda_linked)");
}
