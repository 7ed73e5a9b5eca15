//! The backend conformance suite (every op against the CPU reference, fresh
//! random inputs, poisoned outputs) on GPU 0. These need an NVIDIA GPU: CI only
//! compiles them; they run on the GPU machine (see PERF.md for the command).
use pagoda_backend::DType;
use pagoda_backend_cpu_ref::conformance::{self, Grid};
use pagoda_backend_cuda::CudaBackend;

fn gpu(dtype: DType) -> CudaBackend {
    match CudaBackend::with_activation_dtype(0, dtype) {
        Ok(b) => b,
        Err(e) => panic!("these tests need a CUDA GPU: {e}"),
    }
}

fn run(dtype: DType, grid: &Grid) {
    let device = gpu(dtype);
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

#[test]
#[ignore = "the issue's full grid (batch to 256, context to 8k): run on the GPU machine with --ignored"]
fn full_grid_bf16() {
    run(DType::BF16, &Grid::full());
}
