//! Builds the CUDA kernels in `csrc/` with nvcc (through `cc`) and generates the
//! Rust declarations of their C launchers with bindgen from `csrc/pagoda_kernels.h`.
//!
//! CUDA is found through `CUDA_PATH` (a toolkit root holding `bin/nvcc` and
//! `include/cuda.h`), else `/usr/local/cuda`. On a machine without a GPU,
//! `scripts/setup-cuda.sh` installs a toolkit and prints the variables to export.
//! Cargo re-runs this only when a file in `csrc/` changes.
use std::env;
use std::path::{Path, PathBuf};

/// GPU targets compiled into the fat binary: Hopper with its arch-specific
/// features (H100/H200), and Ampere (A100), whose code also runs on Ada.
const GENCODES: &[&str] = &["arch=compute_90a,code=sm_90a", "arch=compute_80,code=sm_80"];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let csrc = manifest.join("../../csrc").canonicalize().unwrap_or_else(|e| {
        panic!("pagoda-backend-cuda: kernel sources not found at {}/../../csrc: {e}", manifest.display())
    });
    let cuda_root = find_cuda_root();
    let nvcc = cuda_root.join("bin").join("nvcc");
    if !nvcc.is_file() {
        fail(&format!("{} has include/cuda.h but no bin/nvcc", cuda_root.display()));
    }

    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=PAGODA_NVCC_FLAGS");
    println!("cargo:rerun-if-changed={}", csrc.display());
    let mut units = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&csrc)
        .unwrap_or_else(|e| panic!("pagoda-backend-cuda: cannot list {}: {e}", csrc.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => {
                println!("cargo:rerun-if-changed={}", path.display());
                units.push(path);
            }
            Some("cuh") | Some("h") => println!("cargo:rerun-if-changed={}", path.display()),
            _ => {}
        }
    }

    // cc finds nvcc through NVCC; kernels are always built optimised, without
    // device debug code, whatever the cargo profile.
    env::set_var("NVCC", &nvcc);
    let mut build = cc::Build::new();
    build
        .cuda(true)
        .cudart("static")
        .debug(false)
        .opt_level(3)
        .include(&csrc)
        .flag("-std=c++17")
        .flag("-O3")
        .flag("-lineinfo")
        .flag("--expt-relaxed-constexpr")
        .flag("-Xcompiler=-fPIC")
        .warnings(false);
    for g in GENCODES {
        build.flag(format!("-gencode={g}"));
    }
    if let Ok(extra) = env::var("PAGODA_NVCC_FLAGS") {
        for f in extra.split_whitespace() {
            build.flag(f);
        }
    }
    build.files(&units);
    build.compile("pagoda_kernels");

    // cudart is static (cc links it); cuBLAS is dynamic, found at run time through the loader path.
    for dir in ["lib64", "lib", "targets/x86_64-linux/lib"] {
        let d = cuda_root.join(dir);
        if d.join("libcublas.so").exists() {
            println!("cargo:rustc-link-search=native={}", d.display());
        }
    }
    println!("cargo:rustc-link-lib=dylib=cublas");
    println!("cargo:rustc-link-lib=dylib=cublasLt");
    println!("cargo:rustc-link-lib=dylib=stdc++");

    let header = csrc.join("pagoda_kernels.h");
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .allowlist_function("pagoda_.*")
        .allowlist_type("Pagoda.*")
        .allowlist_var("PAGODA_.*")
        .derive_default(true)
        .generate()
        .unwrap_or_else(|e| panic!("pagoda-backend-cuda: bindgen failed on {}: {e}", header.display()));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("pagoda_kernels.rs"))
        .unwrap_or_else(|e| panic!("pagoda-backend-cuda: cannot write bindings: {e}"));
}

fn is_cuda_root(p: &Path) -> bool {
    p.join("include").join("cuda.h").is_file()
}

fn find_cuda_root() -> PathBuf {
    if let Some(p) = env::var_os("CUDA_PATH").map(PathBuf::from) {
        if is_cuda_root(&p) {
            return p;
        }
        fail(&format!("CUDA_PATH={} has no include/cuda.h", p.display()));
    }
    let default = PathBuf::from("/usr/local/cuda");
    if is_cuda_root(&default) {
        return default;
    }
    fail("no CUDA toolkit: set CUDA_PATH, or install one at /usr/local/cuda")
}

fn fail(why: &str) -> ! {
    panic!(
        "\n\npagoda-backend-cuda: {why}.\n\
         The `cuda` feature needs the CUDA 13 toolkit (nvcc, headers, cuBLAS).\n\
         Without a GPU driver, run `scripts/setup-cuda.sh && source .cuda/env.sh` first.\n"
    )
}
