//! Linear layers (`Backend::linear_fused`; `linear` is one with nothing fused):
//! `p = x' · weightᵀ + bias`, then stored, added or SiLU-and-multiplied.
//!
//! Two paths, chosen by the number of tokens, give the same numbers up to f32
//! summation order:
//! - few tokens (decode): each weight row is streamed once and dotted with
//!   every token while it is in cache; output features are split across
//!   threads. This is a matrix-vector product, bound by reading the weight,
//!   and packing the weight as a GEMM would costs a second pass over it.
//! - many tokens (prefill): `matrixmultiply::sgemm`, with token rows split
//!   across threads.

use std::borrow::Cow;

use pagoda_backend::{LinearFusion, Result};
use rayon::prelude::*;

use crate::ops::{for_each_row, rms_norm_row, silu_and_mul_row};
use crate::simd::{dot, Isa};
use crate::storage::{with_operands, CpuTensor};
use crate::CpuBackend;

/// Up to this many tokens the weight-streaming path wins (measured with the
/// `linear` criterion bench at SmolLM2's shapes on a 2-core x86-64).
pub(crate) const STREAMING_MAX_TOKENS: usize = 8;

/// Output features per task on the streaming path: enough work to amortise
/// a task, small enough to balance the cores.
const STREAMING_FEATURES_PER_TASK: usize = 64;

/// The fused layer, done the plain way: norm rows, product, then store, add
/// or SiLU-and-mul, each exactly as the separate ops compute it.
pub(crate) fn linear_fused(
    x: &CpuTensor,
    weight: &CpuTensor,
    bias: Option<&CpuTensor>,
    out: &CpuTensor,
    fusion: &LinearFusion<'_, CpuBackend>,
) -> Result<()> {
    const OP: &str = "linear_fused";
    let (tokens, k, n) = fusion.check_shapes(OP, x, weight, bias, out)?;
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    inputs.extend(fusion.input_norm.map(|(g, _)| g));
    with_operands(OP, &inputs, &[out], |ins, outs| {
        let xs = ins.f32(x)?;
        let w = ins.f32(weight)?;
        let b = bias.map(|b| ins.f32(b)).transpose()?;
        let norm = fusion.input_norm.map(|(g, eps)| ins.f32(g).map(|g| (g, eps))).transpose()?;
        let normed = fused_input(xs, norm, tokens, k);
        let out = &mut *outs[0];
        if !fusion.silu_mul && !fusion.accumulate {
            matmul_transposed(&normed, w, b, out, tokens, k, n);
            return Ok(());
        }
        let mut product = vec![0.0f32; tokens * n];
        matmul_transposed(&normed, w, b, &mut product, tokens, k, n);
        store_fused(out, &product, fusion, n);
        Ok(())
    })
}

/// The rows a fused linear layer multiplies: `x` itself, or `x` RMS-normed
/// with `norm = (gamma, eps)`, exactly as the separate `rms_norm` computes it.
pub(crate) fn fused_input<'a>(
    x: &'a [f32],
    norm: Option<(&[f32], f32)>,
    tokens: usize,
    k: usize,
) -> Cow<'a, [f32]> {
    match norm {
        Some((g, eps)) => {
            let mut normed = vec![0.0f32; tokens * k];
            for_each_row(&mut normed, k, |t, row| rms_norm_row(&x[t * k..(t + 1) * k], g, eps, row));
            Cow::Owned(normed)
        }
        None => Cow::Borrowed(x),
    }
}

/// A fused linear layer's epilogue: `out = silu_and_mul(product)`,
/// `out += product` or `out = product`, as the fusion says; `product` is
/// `[tokens, n]`.
pub(crate) fn store_fused(out: &mut [f32], product: &[f32], fusion: &LinearFusion<'_, CpuBackend>, n: usize) {
    if fusion.silu_mul {
        let inter = n / 2;
        for_each_row(out, inter, |t, row| {
            let (gate, up) = product[t * n..(t + 1) * n].split_at(inter);
            silu_and_mul_row(gate, up, row);
        });
    } else if fusion.accumulate {
        for (o, &p) in out.iter_mut().zip(product) {
            *o += p;
        }
    } else {
        out.copy_from_slice(product);
    }
}

/// `out[t, j] = Σ_i x[t, i] · w[j, i] + bias[j]`; shapes were checked by the caller.
pub(crate) fn matmul_transposed(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    tokens: usize,
    k: usize,
    n: usize,
) {
    if tokens == 0 || n == 0 {
        return;
    }
    if tokens <= STREAMING_MAX_TOKENS || k == 0 {
        streaming(x, w, bias, out, tokens, k, n);
    } else {
        gemm(x, w, bias, out, tokens, k, n);
    }
}

fn streaming(x: &[f32], w: &[f32], bias: Option<&[f32]>, out: &mut [f32], tokens: usize, k: usize, n: usize) {
    let isa = Isa::detect();
    let block = |c: usize, chunk: &mut [f32]| {
        let features = FeatureBlock { x, w, bias, k, tokens, first: c * STREAMING_FEATURES_PER_TASK };
        match isa {
            // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { features.compute_avx2_fma(chunk) },
            _ => features.compute::<false>(chunk),
        }
    };
    if tokens == 1 {
        // One token: feature-major is the output layout.
        out.par_chunks_mut(STREAMING_FEATURES_PER_TASK).enumerate().for_each(|(c, chunk)| block(c, chunk));
        return;
    }
    // Feature-major scratch so each task owns a contiguous block, then transpose.
    let mut by_feature = vec![0.0f32; n * tokens];
    by_feature
        .par_chunks_mut(STREAMING_FEATURES_PER_TASK * tokens)
        .enumerate()
        .for_each(|(c, chunk)| block(c, chunk));
    for (t, row) in out.chunks_mut(n).enumerate() {
        for (j, o) in row.iter_mut().enumerate() {
            *o = by_feature[j * tokens + t];
        }
    }
}

/// Output features `first..` of every token, each weight row read once and
/// dotted with all tokens while it is in L1.
struct FeatureBlock<'a> {
    x: &'a [f32],
    w: &'a [f32],
    bias: Option<&'a [f32]>,
    k: usize,
    tokens: usize,
    first: usize,
}

impl FeatureBlock<'_> {
    /// Fills `out[f * tokens + t]` for the `out.len() / tokens` features.
    #[inline(always)]
    fn compute<const FMA: bool>(&self, out: &mut [f32]) {
        let k = self.k;
        for (f, per_token) in out.chunks_mut(self.tokens).enumerate() {
            let j = self.first + f;
            let row = &self.w[j * k..(j + 1) * k];
            let b = self.bias.map_or(0.0, |b| b[j]);
            for (t, o) in per_token.iter_mut().enumerate() {
                *o = dot::<FMA>(&self.x[t * k..(t + 1) * k], row) + b;
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn compute_avx2_fma(&self, out: &mut [f32]) {
        self.compute::<true>(out)
    }
}

/// `out = x · wᵀ` (+ bias) through sgemm, split across threads by token rows
/// when there are enough rows to fill the microkernel on every thread, else
/// by output features (each thread then packs only its share of the weight).
fn gemm(x: &[f32], w: &[f32], bias: Option<&[f32]>, out: &mut [f32], tokens: usize, k: usize, n: usize) {
    let threads = rayon::current_num_threads().max(1);
    if tokens >= GEMM_ROWS_PER_THREAD * threads {
        let rows_per_task = tokens.div_ceil(threads);
        out.par_chunks_mut(rows_per_task * n).enumerate().for_each(|(c, out_rows)| {
            let rows = out_rows.len() / n;
            sgemm_into(&x[c * rows_per_task * k..][..rows * k], w, bias, out_rows, rows, k, n);
        });
        return;
    }
    let cols_per_task = n.div_ceil(threads).max(1);
    let blocks: Vec<Vec<f32>> = w
        .par_chunks(cols_per_task * k)
        .enumerate()
        .map(|(c, w_rows)| {
            let cols = w_rows.len() / k.max(1);
            let b = bias.map(|b| &b[c * cols_per_task..][..cols]);
            let mut block = vec![0.0f32; tokens * cols];
            sgemm_into(x, w_rows, b, &mut block, tokens, k, cols);
            block
        })
        .collect();
    for (c, block) in blocks.iter().enumerate() {
        let cols = block.len() / tokens;
        for (t, row) in block.chunks_exact(cols.max(1)).enumerate() {
            out[t * n + c * cols_per_task..][..cols].copy_from_slice(row);
        }
    }
}

/// Token rows per thread from which splitting rows beats splitting features
/// (the AVX2 microkernel is 8 rows tall).
const GEMM_ROWS_PER_THREAD: usize = 8;

/// `out[rows, n] = x[rows, k] · w[n, k]ᵀ + bias`, one sgemm call.
fn sgemm_into(x: &[f32], w: &[f32], bias: Option<&[f32]>, out: &mut [f32], rows: usize, k: usize, n: usize) {
    assert!(x.len() >= rows * k && w.len() >= n * k && out.len() >= rows * n, "sgemm_into: slices too short");
    let beta = match bias {
        Some(b) => {
            out.chunks_mut(n).for_each(|row| row.copy_from_slice(b));
            1.0
        }
        // beta = 0 overwrites C without reading it (it may hold NaN poison).
        None => 0.0,
    };
    // SAFETY: `x` holds `rows x k` (row stride k), `w` holds `n x k`, read as
    // its transpose `k x n` (row stride 1, column stride k), and `out` holds
    // `rows x n` (row stride n), as the assert above checks; `out` is
    // exclusively borrowed, so nothing else reads or writes it meanwhile.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            beta,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use pagoda_backend::{Backend, BackendError, DType, HostSlice};
    use proptest::prelude::*;

    use super::*;
    use crate::CpuBackend;

    fn naive(x: &[f32], w: &[f32], bias: Option<&[f32]>, t: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; t * n];
        for r in 0..t {
            for j in 0..n {
                let s: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
                out[r * n + j] = s + bias.map_or(0.0, |b| b[j] as f64);
            }
        }
        out
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64).map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 - 1000.0) / 500.0).collect()
    }

    #[test]
    fn hand_computed_with_bias() {
        let cpu = CpuBackend::new();
        let x = cpu.upload(HostSlice::F32(&[1.0, 2.0]), &[1, 2], DType::F32).unwrap();
        let w = cpu.upload(HostSlice::F32(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), &[3, 2], DType::F32).unwrap();
        let b = cpu.upload(HostSlice::F32(&[0.5, 0.0, -3.0]), &[3], DType::F32).unwrap();
        let out = cpu.alloc(&[1, 3], DType::F32).unwrap();
        cpu.linear(&x, &w, Some(&b), &out).unwrap();
        assert_eq!(cpu.download_f32(&out).unwrap(), vec![1.5, 2.0, 0.0]);
        let bad = cpu.alloc(&[1, 4], DType::F32).unwrap();
        assert!(matches!(cpu.linear(&x, &w, Some(&b), &bad), Err(BackendError::Shape { .. })));
        assert!(matches!(cpu.linear(&x, &w, Some(&x), &out), Err(BackendError::Shape { .. })));
        let square = cpu.upload(HostSlice::F32(&[1.0, 0.0, 0.0, 1.0]), &[2, 2], DType::F32).unwrap();
        assert!(matches!(cpu.linear(&x, &square, None, &x), Err(BackendError::Aliasing { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Both paths, with and without bias, match a naive f64 triple loop,
        /// and never read the (NaN-poisoned) output.
        #[test]
        fn matches_naive_loop(t in 1usize..40, k in 0usize..70, n in 1usize..150, with_bias: bool, seed in 0u64..1000) {
            let cpu = CpuBackend::new();
            let (xs, ws, bs) = (values(t * k, seed), values(n * k, seed + 1), values(n, seed + 2));
            let x = cpu.upload(HostSlice::F32(&xs), &[t, k], DType::F32).unwrap();
            let w = cpu.upload(HostSlice::F32(&ws), &[n, k], DType::F32).unwrap();
            let b = cpu.upload(HostSlice::F32(&bs), &[n], DType::F32).unwrap();
            let out = cpu.alloc(&[t, n], DType::F32).unwrap();
            cpu.linear(&x, &w, with_bias.then_some(&b), &out).unwrap();
            let got = cpu.download_f32(&out).unwrap();
            let want = naive(&xs, &ws, with_bias.then_some(&bs[..]), t, k, n);
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
    }

    /// `linear_fused` is exactly the separate ops it stands for (all f32 here).
    #[test]
    fn fused_variants_equal_the_separate_ops() {
        let cpu = CpuBackend::new();
        let (t, k, n) = (3usize, 16usize, 10usize);
        let up = |v: &[f32], dims: &[usize]| cpu.upload(HostSlice::F32(v), dims, DType::F32).unwrap();
        let x = up(&values(t * k, 1), &[t, k]);
        let w = up(&values(n * k, 2), &[n, k]);
        let b = up(&values(n, 3), &[n]);
        let g = up(&values(k, 4), &[k]);
        let residual0 = values(t * n, 5);
        let eps = 1e-5;

        // norm: rms_norm then linear
        let normed = cpu.alloc(&[t, k], DType::F32).unwrap();
        cpu.rms_norm(&x, &g, eps, &normed).unwrap();
        let want = cpu.alloc(&[t, n], DType::F32).unwrap();
        cpu.linear(&normed, &w, Some(&b), &want).unwrap();
        let got = cpu.alloc(&[t, n], DType::F32).unwrap();
        let norm = LinearFusion { input_norm: Some((&g, eps)), silu_mul: false, accumulate: false };
        cpu.linear_fused(&x, &w, Some(&b), &got, &norm).unwrap();
        assert_eq!(cpu.download_f32(&got).unwrap(), cpu.download_f32(&want).unwrap());

        // norm + silu_mul: ... then silu_and_mul
        let product = cpu.alloc(&[t, n], DType::F32).unwrap();
        cpu.linear(&normed, &w, None, &product).unwrap();
        let want = cpu.alloc(&[t, n / 2], DType::F32).unwrap();
        cpu.silu_and_mul(&product, &want).unwrap();
        let got = cpu.alloc(&[t, n / 2], DType::F32).unwrap();
        cpu.linear_fused(&x, &w, None, &got, &LinearFusion { silu_mul: true, ..norm }).unwrap();
        assert_eq!(cpu.download_f32(&got).unwrap(), cpu.download_f32(&want).unwrap());

        // accumulate: residual + linear, elementwise
        let plain = cpu.alloc(&[t, n], DType::F32).unwrap();
        cpu.linear(&x, &w, Some(&b), &plain).unwrap();
        let want: Vec<f32> =
            residual0.iter().zip(cpu.download_f32(&plain).unwrap()).map(|(r, p)| r + p).collect();
        let residual = up(&residual0, &[t, n]);
        let add = LinearFusion { input_norm: None, silu_mul: false, accumulate: true };
        cpu.linear_fused(&x, &w, Some(&b), &residual, &add).unwrap();
        assert_eq!(cpu.download_f32(&residual).unwrap(), want);
    }

    #[test]
    fn fused_shapes_and_combinations_are_checked() {
        let cpu = CpuBackend::new();
        let x = cpu.alloc(&[2, 8], DType::F32).unwrap();
        let w_odd = cpu.alloc(&[5, 8], DType::F32).unwrap();
        let w = cpu.alloc(&[6, 8], DType::F32).unwrap();
        let g_wrong = cpu.alloc(&[7], DType::F32).unwrap();
        let out3 = cpu.alloc(&[2, 3], DType::F32).unwrap();
        let out6 = cpu.alloc(&[2, 6], DType::F32).unwrap();
        let none = LinearFusion::<CpuBackend>::none();
        let silu = LinearFusion { silu_mul: true, ..LinearFusion::none() };
        let is_shape = |r: Result<()>| matches!(r, Err(BackendError::Shape { .. }));
        assert!(is_shape(cpu.linear_fused(&x, &w_odd, None, &out3, &silu)), "odd [gate; up]");
        assert!(is_shape(cpu.linear_fused(&x, &w, None, &out6, &silu)), "silu output is half as wide");
        assert!(is_shape(cpu.linear_fused(&x, &w, None, &out3, &none)), "plain output is N wide");
        let both = LinearFusion { silu_mul: true, accumulate: true, input_norm: None };
        assert!(is_shape(cpu.linear_fused(&x, &w, None, &out3, &both)), "silu and accumulate together");
        let bad_norm = LinearFusion { input_norm: Some((&g_wrong, 1e-5)), ..LinearFusion::none() };
        assert!(is_shape(cpu.linear_fused(&x, &w, None, &out6, &bad_norm)), "norm weight of K");
        let bad_eps = LinearFusion { input_norm: Some((&g_wrong, f32::NAN)), ..LinearFusion::none() };
        assert!(is_shape(cpu.linear_fused(&x, &w, None, &out6, &bad_eps)));
        cpu.linear_fused(&x, &w, None, &out3, &silu).unwrap();
    }
}
