//! The backend conformance suite (every op against the CPU reference, fresh
//! random inputs, poisoned outputs) on GPU 0. These need an NVIDIA GPU: CI only
//! compiles them; they run on the GPU machine (see PERF.md for the command).
use pagoda_backend::DType;
use pagoda_backend_cpu_ref::conformance::{self, Grid};
use pagoda_backend_cuda::{CudaBackend, KernelOptions};

fn gpu(dtype: DType, options: KernelOptions) -> CudaBackend {
    match CudaBackend::with_kernel_options(0, dtype, options) {
        Ok(b) => b,
        Err(e) => panic!("these tests need a CUDA GPU: {e}"),
    }
}

fn run(dtype: DType, grid: &Grid) {
    run_with(dtype, grid, KernelOptions::default());
}

fn run_with(dtype: DType, grid: &Grid, options: KernelOptions) {
    let device = gpu(dtype, options);
    println!("kernel policy: {}", device.kernel_policy());
    let report = conformance::run(&device, grid);
    println!("{report}");
    // One line per op family with its worst error, for the run's summary.
    let mut ops: Vec<&str> = report.checks.iter().map(|c| c.op.split('/').next().unwrap_or(&c.op)).collect();
    ops.dedup();
    ops.sort_unstable();
    ops.dedup();
    for op in ops {
        if let Some(e) = report.max_rel_err(op) {
            println!("MAXERR {dtype:?} {} {op}: {e:.3e}", grid.name);
        }
    }
    report.assert_all_passed();
}

#[test]
fn quick_grid_bf16() {
    run(DType::BF16, &Grid::quick());
}

#[test]
fn quick_grid_f16() {
    run(DType::F16, &Grid::quick());
}

/// The quick grid with decode attention over FP8 caches on the tensor cores
/// (off by default until measured): only those checks differ from the grids above.
#[test]
fn quick_grid_fp8_decode_on_tensor_cores() {
    let on = KernelOptions { decode_attention_mma: Some(true), ..KernelOptions::default() };
    run_with(DType::BF16, &Grid::quick(), on);
    run_with(DType::F16, &Grid::quick(), on);
}

#[test]
#[ignore = "the issue's full grid (batch to 256, context to 8k): run on the GPU machine with --ignored"]
fn full_grid_bf16() {
    run(DType::BF16, &Grid::full());
}
