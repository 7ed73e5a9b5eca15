//! Builds the CUDA kernels in `csrc/` with nvcc (through `cc`) and generates the
//! Rust declarations of their C launchers with bindgen from `csrc/pagoda_kernels.h`.
//!
//! CUDA is found through `CUDA_PATH` (a toolkit root holding `bin/nvcc` and
//! `include/cuda.h`), else `/usr/local/cuda`. On a machine without a GPU,
//! `scripts/setup-cuda.sh` installs a toolkit and prints the variables to export.
//! Cargo re-runs this only when a file in `csrc/` changes (or NCCL's header, or its shim).
//!
//! NCCL (tensor parallelism) is bound too, for loading at run time: see `build_nccl`.
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

    build_nccl(&manifest, &cuda_root, &out);
}

/// NCCL (tensor parallelism): bindings for the few functions `src/nccl.rs` calls, generated for
/// loading libnccl.so.2 at run time (bindgen's libloading mode) instead of linking it, so that a
/// run without tensor parallelism never needs NCCL; and a C shim that expands
/// `NCCL_CONFIG_INITIALIZER`, whose fields change between NCCL versions.
///
/// The headers are found through `PAGODA_NCCL_ROOT` (a folder with include/nccl.h, as
/// `scripts/setup-cuda.sh` exports for pip's nvidia-nccl-cu13 wheel), else beside the CUDA root as
/// the wheels lay them out, else in the CUDA root, else in /usr (Debian's libnccl-dev). The
/// library next to the header, if there is one, is where the backend looks last at run time.
fn build_nccl(manifest: &Path, cuda_root: &Path, out: &Path) {
    println!("cargo:rerun-if-env-changed=PAGODA_NCCL_ROOT");
    let root = find_nccl_root(cuda_root);
    let include = root.join("include");
    let header = include.join("nccl.h");
    println!("cargo:rerun-if-changed={}", header.display());
    let shim = manifest.join("src").join("nccl").join("config.c");
    println!("cargo:rerun-if-changed={}", shim.display());
    cc::Build::new()
        .file(&shim)
        .include(&include)
        .include(cuda_root.join("include"))
        .warnings(true)
        .compile("pagoda_nccl_config");

    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .clang_arg(format!("-I{}", include.display()))
        .clang_arg(format!("-I{}", cuda_root.join("include").display()))
        .allowlist_function(
            "nccl(GetVersion|GetUniqueId|CommInitRankConfig|CommFinalize|CommDestroy|CommAbort|\
             GetErrorString|GetLastError|CommGetAsyncError|AllReduce|CommCount|CommUserRank|CommCuDevice)",
        )
        .allowlist_type("nccl(UniqueId|Result_t|DataType_t|RedOp_t|Config_t|Comm_t)")
        .allowlist_var("NCCL_(MAJOR|MINOR|PATCH|VERSION_CODE|UNIQUE_ID_BYTES)")
        .prepend_enum_name(false)
        .dynamic_library_name("NcclLibrary")
        .dynamic_link_require_all(true)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|e| panic!("pagoda-backend-cuda: bindgen failed on {}: {e}", header.display()));
    bindings
        .write_to_file(out.join("nccl.rs"))
        .unwrap_or_else(|e| panic!("pagoda-backend-cuda: cannot write the NCCL bindings: {e}"));

    let library = ["lib", "lib64", "lib/x86_64-linux-gnu"]
        .iter()
        .map(|dir| root.join(dir).join("libnccl.so.2"))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=PAGODA_NCCL_BUILD_LIBRARY={library}");
}

fn find_nccl_root(cuda_root: &Path) -> PathBuf {
    let has_header = |p: &Path| p.join("include").join("nccl.h").is_file();
    if let Some(p) = env::var_os("PAGODA_NCCL_ROOT").map(PathBuf::from) {
        if has_header(&p) {
            return p;
        }
        fail(&format!("PAGODA_NCCL_ROOT={} has no include/nccl.h", p.display()));
    }
    let beside = cuda_root.parent().map(|p| p.join("nccl"));
    beside
        .into_iter()
        .chain([cuda_root.to_path_buf(), PathBuf::from("/usr")])
        .find(|p| has_header(p))
        .unwrap_or_else(|| {
            fail(&format!(
                "no NCCL headers (include/nccl.h) in PAGODA_NCCL_ROOT, beside or in {}, or in /usr",
                cuda_root.display()
            ))
        })
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
         The `cuda` feature needs the CUDA 13 toolkit (nvcc, headers, cuBLAS) and NCCL's headers.\n\
         Without a GPU driver, run `scripts/setup-cuda.sh && source .cuda/env.sh` first.\n"
    )
}
