//! fp8_linear in both modes: per-channel E4M3 weights of rows of different
//! magnitudes (so the scales differ by up to 64x), each fusion, with and
//! without bias, views, and a static activation scale that saturates codes.
//!
//! Tolerance, derived from the arithmetic before any device ran. Both
//! backends get the same codes, scales and activations, so what the device
//! adds is:
//! - *Weight only*: each product `x · dec(w)` of a 16-bit x (at most 11
//!   significant bits) and a code (4 bits) is exact in f32; the sums differ
//!   by f32 summation order (relative ~K·2^-24 worst case, ~1e-5 RMS for K
//!   = 14336, what the F32 tolerance of 1e-4 allows); the two scale
//!   multiplies add 2^-24 each; then the output is rounded to the dtype
//!   (2^-8 = 3.9e-3 at most for bf16, ~1.6e-3 RMS): the same budget as the
//!   16-bit `linear`, whose tolerance (1e-2 bf16, 2e-3 f16, 1e-4 f32) holds.
//!   A device that fuses the norm in f32 or rounds the normed row to its
//!   dtype first moves x' by at most 2^-8 relative: inside that tolerance,
//!   as for `linear_fused`.
//! - *Quantized activations*: the codes `e4m3(x' / s_x)` are bit-identical
//!   on both sides when x' is (the row maximum is exact, `/ 448` and `x' / s`
//!   are correctly rounded IEEE divisions, and E4M3 rounding is the same
//!   nearest-even function), and `dec(q) · dec(w)` is exact (4 x 4 bits). The
//!   spec rounds x' to the activation dtype before quantizing; the reference
//!   here does so too (the norm on the reference, rounded to the device's
//!   dtype, then the product without the norm), so x' can differ only where
//!   the device's f32 norm differs from the reference's by an ulp across a
//!   16-bit rounding boundary (about 2^-15 of elements), and then by one
//!   code step (2^-3 relative) in that element: ~1e-4 relative in the
//!   output. Hopper's FP8 MMA sums in a reduced-precision accumulator that
//!   cuBLAS promotes to f32 every few k-blocks (without fast accumulation):
//!   ~2^-14 relative per block, ~1e-4 of the output RMS. With the output
//!   rounding (as above), the dtype's accumulated-ops tolerance holds again.
//!
//! The modes differ from each other by the activation rounding, about 2^-4
//! per element (~3% of the output RMS): a device that computes the other
//! mode than the one asked for fails by a factor of 3 or more (bf16), and a
//! wrong scale (row or token), code or fusion by far more.

use pagoda_backend::{
    fp8_quantize_rows, Backend, DType, Fp8InputScale, Fp8LinearArgs, Fp8LinearMode, HostSlice, LinearFusion,
};

use crate::conformance::grid::{Fp8Fusion, Fp8LinearCase};
use crate::conformance::random::round_to;
use crate::conformance::{cpu, dev, fp8_codes_of, Harness};

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>, cases: &[Fp8LinearCase]) {
    for c in cases {
        for mode in [Fp8LinearMode::WeightOnly, Fp8LinearMode::QuantizedActivations] {
            let label = format!("{} {mode:?}", c.label());
            h.case("fp8_linear", &label, |h, rng| {
                let (t, k, n) = (c.tokens, c.in_features, c.out_features);
                let (_, x_r, x_d) = h.random_rows(rng, t, k, 1.0, c.margin)?;
                // Rows of sizes 2^-3..2^3 around 1/sqrt(K), so outputs stay of order 1
                // and every row has its own scale.
                let mut w = rng.normals(n * k, 1.0 / (k.max(1) as f32).sqrt(), DType::F32);
                for (j, row) in w.chunks_mut(k.max(1)).enumerate() {
                    let factor = 2f32.powi((j % 7) as i32 - 3);
                    row.iter_mut().for_each(|v| *v *= factor);
                }
                let (codes, scales) = fp8_quantize_rows(&w, n, k);
                let (w_r, w_d) = h.fp8_codes(&codes, &[n, k])?;
                let (s_r, s_d) = h.f32s(&scales, &[n])?;
                let bias = if c.bias { Some(h.floats(&rng.normals(n, 0.5, h.dtype), &[n])?) } else { None };
                let gamma = h.floats(&rng.normals(k, 1.0, h.dtype), &[k])?;
                let silu = c.fusion == Fp8Fusion::NormSiluMul;
                if silu && n % 2 != 0 {
                    return Err(format!("SiLU-and-mul over {n} columns"));
                }
                let out_cols = if silu { n / 2 } else { n };
                let (out_r, out_d) = h.outputs(t, out_cols, h.dtype, c.margin)?;
                if c.fusion == Fp8Fusion::Accumulate {
                    let residual = rng.normals(t * n, 1.0, h.dtype);
                    cpu(h.cpu.write(&out_r, HostSlice::F32(&residual)))?;
                    dev(h.device.write(&out_d.view, HostSlice::F32(&residual)))?;
                }
                let eps = 1e-5;
                let norm = matches!(c.fusion, Fp8Fusion::Norm | Fp8Fusion::NormSiluMul);
                let fusion_d = LinearFusion {
                    input_norm: norm.then_some((&gamma.1, eps)),
                    silu_mul: silu,
                    accumulate: c.fusion == Fp8Fusion::Accumulate,
                };
                let input_scale = c.static_input_scale.map_or(Fp8InputScale::Dynamic, Fp8InputScale::Static);
                // The reference: with quantized activations, the norm first, its
                // rows rounded to the device's dtype (as the op specifies), then
                // the product on those rows.
                let rounded_normed = if norm && mode == Fp8LinearMode::QuantizedActivations {
                    let normed = cpu(h.cpu.alloc(&[t, k], DType::F32))?;
                    cpu(h.cpu.rms_norm(&x_r, &gamma.0, eps, &normed))?;
                    let values: Vec<f32> =
                        cpu(h.cpu.download_f32(&normed))?.into_iter().map(|v| round_to(h.dtype, v)).collect();
                    Some(cpu(h.cpu.upload(HostSlice::F32(&values), &[t, k], DType::F32))?)
                } else {
                    None
                };
                let fusion_r = LinearFusion {
                    input_norm: (norm && rounded_normed.is_none()).then_some((&gamma.0, eps)),
                    silu_mul: silu,
                    accumulate: c.fusion == Fp8Fusion::Accumulate,
                };
                cpu(h.cpu.fp8_linear(&Fp8LinearArgs {
                    x: rounded_normed.as_ref().unwrap_or(&x_r),
                    weight: &w_r,
                    weight_scale: &s_r,
                    bias: bias.as_ref().map(|b| &b.0),
                    out: &out_r,
                    fusion: &fusion_r,
                    mode,
                    input_scale,
                }))?;
                dev(h.device.fp8_linear(&Fp8LinearArgs {
                    x: &x_d,
                    weight: &w_d,
                    weight_scale: &s_d,
                    bias: bias.as_ref().map(|b| &b.1),
                    out: &out_d.view,
                    fusion: &fusion_d,
                    mode,
                    input_scale,
                }))?;
                h.compare_out("fp8_linear", &label, &out_r, &out_d, h.tol.accumulated)
            });
        }
    }
}

/// `fp8_quantize_rows` (weights quantized at load) over each case's weight
/// shape, and one whose rows are not a multiple of 8 (the host path on a
/// device). Exact: the row maximum is exact, `/ 448` and `w / s` are IEEE
/// divisions and E4M3 rounding is one function, so the codes and scales are
/// bit-identical to the host's `fp8_quantize_rows` over the same values.
/// Rows of sizes 2^-3..2^3 and a zero row (scale 1).
pub(crate) fn run_quantize_rows<B: Backend>(h: &mut Harness<'_, B>, cases: &[Fp8LinearCase]) {
    let mut shapes: Vec<(usize, usize)> = cases.iter().map(|c| (c.out_features, c.in_features)).collect();
    shapes.push((5, 36));
    shapes.sort_unstable();
    shapes.dedup();
    for (rows, cols) in shapes {
        let label = format!("R{rows} C{cols}");
        h.case("fp8_quantize_rows", &label, |h, rng| {
            let mut w = rng.normals(rows * cols, 1.0, h.dtype);
            for (r, row) in w.chunks_mut(cols.max(1)).enumerate() {
                // Rounded to the dtype again: scaled down, an f16 value may become subnormal.
                let factor = if r == 1 { 0.0 } else { 2f32.powi((r % 7) as i32 - 3) };
                row.iter_mut().for_each(|v| *v = round_to(h.dtype, *v * factor));
            }
            let (want_codes, want_scales) = fp8_quantize_rows(&w, rows, cols);
            let (_, x_d) = h.floats(&w, &[rows, cols])?;
            let codes_d = dev(h.device.alloc(&[rows, cols], DType::F8E4M3))?;
            let scales_d = dev(h.device.alloc(&[rows], DType::F32))?;
            dev(h.device.fp8_quantize_rows(&x_d, &codes_d, &scales_d))?;
            let got_codes = dev(fp8_codes_of(h.device, &codes_d))?;
            let got_scales = dev(h.device.download_f32(&scales_d))?;
            let code_diffs = want_codes.iter().zip(&got_codes).filter(|(a, b)| a != b).count()
                + want_codes.len().abs_diff(got_codes.len());
            let scale_diffs =
                want_scales.iter().zip(&got_scales).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
                    + want_scales.len().abs_diff(got_scales.len());
            Ok(vec![
                h.exact_count("fp8_quantize_rows/codes", &label, code_diffs, "codes differ"),
                h.exact_count("fp8_quantize_rows/scales", &label, scale_diffs, "scales differ"),
            ])
        });
    }
}
