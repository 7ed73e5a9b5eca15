//! The conformance harness checked on the reference itself: CpuBackend
//! against CpuBackend must pass every check with zero error.

use pagoda_backend_cpu_ref::conformance::{self, Grid};
use pagoda_backend_cpu_ref::CpuBackend;

#[test]
fn cpu_reference_passes_the_quick_grid_exactly() {
    let grid = Grid::quick();
    let report = conformance::run(&CpuBackend::new(), &grid);
    println!("{report}");
    report.assert_all_passed();
    assert!(report.checks.len() > 60, "only {} checks ran", report.checks.len());
    for op in [
        "memory/upload f32",
        "memory/upload bf16",
        "memory/write view",
        "memory/fill",
        "embedding",
        "rms_norm",
        "add_rms_norm/out",
        "add_rms_norm/residual",
        "silu_and_mul",
        "gather_rows",
        "linear",
        "rotary_and_cache/q_out",
        "rotary_and_cache/k_cache",
        "rotary_and_cache/v_cache untouched",
        "attention",
        "copy_blocks",
        "swap_out",
        "swap_in",
        "sample/tokens",
        "sample/logprobs",
        "errors",
    ] {
        let worst = report.max_rel_err(op);
        assert!(worst.is_some(), "no check of {op}");
    }
    // The same code on the same inputs: every measured error is exactly zero.
    for c in &report.checks {
        assert_eq!(c.rel_err, 0.0, "{} {}: {}", c.op, c.case, c.rel_err);
    }
}

/// The full grid (minutes on many cores, longer here):
/// `cargo test --release -p pagoda-backend-cpu-ref --test conformance -- --ignored`.
#[test]
#[ignore = "minutes of CPU; run explicitly"]
fn cpu_reference_passes_the_full_grid() {
    let start = std::time::Instant::now();
    let report = conformance::run(&CpuBackend::new(), &Grid::full());
    println!("{report}");
    println!("full grid: {} checks in {:.1?}", report.checks.len(), start.elapsed());
    report.assert_all_passed();
}
