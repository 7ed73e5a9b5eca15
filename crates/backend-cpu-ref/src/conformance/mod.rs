//! The conformance suite: checks any [`Backend`] op by op against
//! [`CpuBackend`], the reference.
//!
//! ```
//! use pagoda_backend_cpu_ref::{conformance, CpuBackend};
//! let mut grid = conformance::Grid::quick();
//! grid.attention.truncate(1); // a device's tests would keep them all
//! let report = conformance::run(&CpuBackend::new(), &grid);
//! println!("{report}");
//! report.assert_all_passed();
//! ```
//!
//! # How each check works
//! - Inputs are fresh random values from a generator seeded by the grid seed
//!   and the case's label, **rounded to the device's activation dtype** before
//!   both backends get them, so both see identical numbers (the reference holds
//!   them exactly in f32).
//! - Device outputs are **poisoned** first (filled with NaN, the caches' unused
//!   slots too), so an element the device never writes, or a cache slot it
//!   reads but should not, fails the check. NaN never passes.
//! - Outputs are compared by relative L2 error in f64, over the whole output
//!   and per row (one token's vector, one head, one cache slot): the row
//!   measure catches a single wrong row that a large output would dilute.
//! - Views: some cases give the device narrowed views; the rows around an
//!   output view must stay untouched.
//! - Sampling compares tokens (greedy: always equal; seeded: equal unless the
//!   reference's choice was ambiguous, see below) and logprobs (absolute).
//!
//! # Tolerances ([`Tolerances::for_dtype`])
//! The device and the reference see the same inputs, so the error is what the
//! device adds: rounding its output to its dtype, plus f32 accumulation in a
//! different order.
//! - **F32**: 1e-5 for elementwise ops (a few ulps of 6e-8 each), 1e-4 for
//!   reductions over long axes (GEMM K up to 14336, attention over 8k keys:
//!   the error of f32 summation grows with the square root of the length, and
//!   fast `exp` differs by a few ulps).
//! - **BF16**: 1e-2. Rounding to bf16's 8 significant bits has a relative
//!   error of at most 2^-8 = 3.9e-3 per element, about 1.6e-3 RMS (measured:
//!   an emulated device that computes in f32 and stores bf16 shows 1.2e-3 to
//!   1.8e-3 per op, worst row 2.6e-3). A kernel that also rounds an
//!   intermediate (q after RoPE, P before P·V in flash attention) adds about as
//!   much again. 1e-2 leaves a factor of 2.5 to 4 over that, while real bugs (a
//!   wrong position, head, block, mask or eps) give errors of 1e-1 to 1.
//! - **F16**: 2e-3: the same argument with 11 significant bits (2^-11 =
//!   4.9e-4 max, ~2e-4 RMS measured).
//! - LoRA (`out += B·(A·x)` in the activation dtype) is judged element by
//!   element against the bound its arithmetic gives: one rounding of the f32
//!   result, `u·|ref|` with `u` the dtype's unit roundoff, plus the f32
//!   summation-order terms of the shrink and the expand and the rounding of
//!   the shrunk vector a backend may make. `check/lora.rs` derives it.
//! - Exact ops (copies: embedding, gather, copy_blocks, swap, memory round
//!   trips, untouched cache slots) must match bit for bit: tolerance 0.
//! - FP8 (E4M3) KV caches: attention reads the same codes on both sides, and
//!   every code's value is exact in bf16 and f16, so it is judged as the
//!   activation dtype's attention. The cache write compares codes: values'
//!   equal, keys' equal or one representable step apart, for at most an
//!   eighth of them (the device rounds the rotated key to its dtype before
//!   quantising; `check/rotary.rs` derives the bound).
//! - FP8 linear layers (E4M3 weights, per-channel scales): both modes are
//!   judged by the activation dtype's tolerance for accumulated ops, given
//!   the same codes; `check/fp8_linear.rs` derives it from the arithmetic.
//! - Logprobs: 1e-3 absolute whatever the dtype: both sides compute the
//!   log-softmax of identical logits in f32 or better; summing 128k terms in
//!   f32 in another order moves the result by ~1e-5.
//! - Seeded sampling: a device may pick another token only where float
//!   rounding can reorder the reference's decision: the two tokens'
//!   probabilities are within 1e-3 (relative to the largest), or the random
//!   draw lies within 1e-3 (of the kept mass) of the boundary between them.
//!   Such rows are counted in the note; any other difference fails.

mod check;
mod grid;
mod random;
mod report;

use pagoda_backend::{Backend, BackendError, DType, HostSlice, HostVec, Tensor};

pub use grid::{
    AttentionCase, BlocksCase, Fp8Fusion, Fp8LinearCase, Fp8Scales, Grid, LinearCase, LoraCase, RotaryCase,
    RowsCase, SampleCase, SeqShape, SlotLayout,
};
pub use report::{CheckResult, ConformanceReport};

use crate::CpuBackend;
use random::{errors, CaseRng, Errors};

/// Tolerances of one device dtype; see the module docs for the reasoning.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerances {
    /// Ops whose output elements each depend on a handful of inputs.
    pub elementwise: f64,
    /// Ops that sum over a long axis (linear, attention).
    pub accumulated: f64,
    /// Absolute, in nats.
    pub logprob: f64,
    /// Relative band within which sampling may differ (probabilities, CDF).
    pub sampling_ambiguity: f64,
}

impl Tolerances {
    pub fn for_dtype(dtype: DType) -> Self {
        let (elementwise, accumulated) = match dtype {
            DType::BF16 => (1e-2, 1e-2),
            DType::F16 => (2e-3, 2e-3),
            _ => (1e-5, 1e-4),
        };
        Self { elementwise, accumulated, logprob: 1e-3, sampling_ambiguity: 1e-3 }
    }
}

/// Runs every case of `grid` on `device` and on the CPU reference, with the
/// tolerances of the device's activation dtype.
pub fn run<B: Backend>(device: &B, grid: &Grid) -> ConformanceReport {
    run_with(device, grid, Tolerances::for_dtype(device.activation_dtype()))
}

/// [`run`] with explicit tolerances.
pub fn run_with<B: Backend>(device: &B, grid: &Grid, tolerances: Tolerances) -> ConformanceReport {
    let mut h = Harness {
        device,
        cpu: CpuBackend::new(),
        dtype: device.activation_dtype(),
        tol: tolerances,
        seed: grid.seed,
        checks: Vec::new(),
    };
    check::memory::run(&mut h, &grid.memory);
    check::rows::run(&mut h, &grid.rows);
    check::linear::run(&mut h, &grid.linear);
    check::linear::run_fused(&mut h, &grid.linear);
    check::rotary::run(&mut h, &grid.rotary);
    check::attention::run(&mut h, &grid.attention);
    check::blocks::run(&mut h, &grid.blocks);
    check::sample::run(&mut h, &grid.sample);
    check::lora::run(&mut h, &grid.lora);
    check::fp8_linear::run(&mut h, &grid.fp8_linear);
    check::fp8_linear::run_quantize_rows(&mut h, &grid.fp8_linear);
    if grid.errors {
        check::errors::run(&mut h);
    }
    ConformanceReport {
        device: device.name(),
        activation_dtype: h.dtype,
        grid: grid.name.clone(),
        checks: h.checks,
    }
}

/// Why a check could not produce a measurement.
type Failure = String;
type Outcome<T> = std::result::Result<T, Failure>;

/// Labels a device error.
fn dev<T>(r: Result<T, BackendError>) -> Outcome<T> {
    r.map_err(|e| format!("device: {e}"))
}

/// Labels a reference error (a harness bug or an invalid grid case).
fn cpu<T>(r: Result<T, BackendError>) -> Outcome<T> {
    r.map_err(|e| format!("reference: {e}"))
}

/// The E4M3 codes of an F8E4M3 tensor on any backend.
fn fp8_codes_of<X: Backend>(backend: &X, t: &Tensor<X>) -> Result<Vec<u8>, BackendError> {
    match backend.download(t)? {
        HostVec::F8E4M3(codes) => Ok(codes),
        other => Err(BackendError::DType { op: "download", dtype: other.dtype() }),
    }
}

type CpuTensor = Tensor<CpuBackend>;

/// One run's state: the two backends and the rows gathered so far.
pub(crate) struct Harness<'d, B: Backend> {
    device: &'d B,
    cpu: CpuBackend,
    dtype: DType,
    tol: Tolerances,
    seed: u64,
    checks: Vec<CheckResult>,
}

/// A device output to be poisoned, possibly a view with guard rows around it.
struct DeviceOut<B: Backend> {
    whole: Tensor<B>,
    view: Tensor<B>,
    margin: usize,
    /// Elements per row.
    cols: usize,
}

/// The value around an output view, which the op must leave alone.
const GUARD: f32 = 7.0;

impl<B: Backend> Harness<'_, B> {
    /// Runs one case: every measurement it returns becomes a row; an error
    /// becomes one failing row.
    fn case(
        &mut self,
        op: &str,
        label: &str,
        check: impl FnOnce(&Self, &mut CaseRng) -> Outcome<Vec<CheckResult>>,
    ) {
        let mut rng = CaseRng::new(self.seed, &format!("{op} {label}"));
        match check(self, &mut rng) {
            Ok(rows) => self.checks.extend(rows),
            Err(note) => self.checks.push(CheckResult {
                op: op.to_string(),
                case: label.to_string(),
                rel_err: f64::NAN,
                max_row_err: f64::NAN,
                tolerance: 0.0,
                passed: false,
                note,
            }),
        }
    }

    fn result(&self, op: &str, case: &str, e: Errors, tolerance: f64) -> CheckResult {
        let passed = e.finite && e.rel <= tolerance && e.worst_row <= tolerance;
        let note = if e.finite { String::new() } else { "non-finite values".into() };
        CheckResult {
            op: op.to_string(),
            case: case.to_string(),
            rel_err: e.rel,
            max_row_err: e.worst_row,
            tolerance,
            passed,
            note,
        }
    }

    /// Compares a device output with the reference's.
    fn compare(
        &self,
        op: &str,
        case: &str,
        reference: &[f32],
        device: &[f32],
        row_len: usize,
        tolerance: f64,
    ) -> Outcome<CheckResult> {
        if reference.len() != device.len() {
            return Err(format!(
                "{op}: device returned {} elements, reference {}",
                device.len(),
                reference.len()
            ));
        }
        Ok(self.result(op, case, errors(reference, device, row_len), tolerance))
    }

    /// The same float data on both backends (already rounded by the caller).
    fn floats(&self, data: &[f32], dims: &[usize]) -> Outcome<(CpuTensor, Tensor<B>)> {
        Ok((
            cpu(self.cpu.upload(HostSlice::F32(data), dims, DType::F32))?,
            dev(self.device.upload(HostSlice::F32(data), dims, self.dtype))?,
        ))
    }

    /// F32 data on both backends as F32 tensors (scales, whatever the device's dtype).
    fn f32s(&self, data: &[f32], dims: &[usize]) -> Outcome<(CpuTensor, Tensor<B>)> {
        Ok((
            cpu(self.cpu.upload(HostSlice::F32(data), dims, DType::F32))?,
            dev(self.device.upload(HostSlice::F32(data), dims, DType::F32))?,
        ))
    }

    /// Random activations `[rows, cols]` on both backends; with a margin, as a
    /// view `margin` rows into a larger tensor (with random rows around it).
    fn random_rows(
        &self,
        rng: &mut CaseRng,
        rows: usize,
        cols: usize,
        scale: f32,
        margin: usize,
    ) -> Outcome<(Vec<f32>, CpuTensor, Tensor<B>)> {
        let all = rng.normals((rows + 2 * margin) * cols, scale, self.dtype);
        let (r, d) = self.floats(&all, &[rows + 2 * margin, cols])?;
        let data = all[margin * cols..(margin + rows) * cols].to_vec();
        Ok((data, cpu(r.narrow(margin, rows))?, dev(d.narrow(margin, rows))?))
    }

    /// The same E4M3 codes on both backends, as F8E4M3 tensors.
    fn fp8_codes(&self, codes: &[u8], dims: &[usize]) -> Outcome<(CpuTensor, Tensor<B>)> {
        let data = HostSlice::Bytes(codes, DType::F8E4M3);
        Ok((
            cpu(self.cpu.upload(data, dims, DType::F8E4M3))?,
            dev(self.device.upload(data, dims, DType::F8E4M3))?,
        ))
    }

    /// The F32 `[k, v]` scale tensor of an FP8 case on both backends (none for unit scales).
    fn fp8_scales(&self, scales: Fp8Scales) -> Outcome<Option<(CpuTensor, Tensor<B>)>> {
        match scales {
            Fp8Scales::Unit => Ok(None),
            Fp8Scales::Given(k, v) => self.f32s(&[k, v], &[2]).map(Some),
        }
    }

    fn ints(&self, data: &[i32], dims: &[usize]) -> Outcome<(CpuTensor, Tensor<B>)> {
        Ok((
            cpu(self.cpu.upload(HostSlice::I32(data), dims, DType::I32))?,
            dev(self.device.upload(HostSlice::I32(data), dims, DType::I32))?,
        ))
    }

    /// A reference output and a NaN-poisoned device output of `[rows, cols]`
    /// (`dtype` on the device), inside guard rows when `margin > 0`.
    fn outputs(
        &self,
        rows: usize,
        cols: usize,
        dtype: DType,
        margin: usize,
    ) -> Outcome<(CpuTensor, DeviceOut<B>)> {
        let reference = cpu(self.cpu.alloc(&[rows, cols], DType::F32))?;
        let whole = dev(self.device.alloc(&[rows + 2 * margin, cols], dtype))?;
        dev(self.device.fill(&whole, GUARD))?;
        let view = dev(whole.narrow(margin, rows))?;
        dev(self.device.fill(&view, f32::NAN))?;
        Ok((reference, DeviceOut { whole, view, margin, cols }))
    }

    /// Compares a device output (and its guard rows) with the reference.
    fn compare_out(
        &self,
        op: &str,
        case: &str,
        reference: &CpuTensor,
        out: &DeviceOut<B>,
        tolerance: f64,
    ) -> Outcome<Vec<CheckResult>> {
        let want = cpu(self.cpu.download_f32(reference))?;
        let whole = dev(self.device.download_f32(&out.whole))?;
        let inner = &whole[out.margin * out.cols..(out.margin * out.cols + want.len()).min(whole.len())];
        let mut rows = vec![self.compare(op, case, &want, inner, out.cols, tolerance)?];
        if out.margin > 0 {
            let split = out.margin * out.cols;
            let outside = whole[..split].iter().chain(&whole[split + want.len()..]);
            let changed = outside.filter(|&&x| x != GUARD).count();
            rows.push(self.exact_count(&format!("{op}/outside view"), case, changed, "elements changed"));
        }
        Ok(rows)
    }

    /// A row that passes only when `count` is zero.
    fn exact_count(&self, op: &str, case: &str, count: usize, what: &str) -> CheckResult {
        CheckResult {
            op: op.to_string(),
            case: case.to_string(),
            rel_err: count as f64,
            max_row_err: count as f64,
            tolerance: 0.0,
            passed: count == 0,
            note: if count == 0 { String::new() } else { format!("{count} {what}") },
        }
    }
}
