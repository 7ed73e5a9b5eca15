//! FP8 (E4M3) weights: a linear layer whose weight is stored as E4M3 codes
//! with one f32 scale per output channel ([`Backend::fp8_linear`]).
//!
//! The weight `W` (`[N, K]`) is held as codes `w[n, k]` with scales `s_w[n]`,
//! `W[n, k] ≈ s_w[n] · dec(w[n, k])` (`dec` is [`crate::fp8::e4m3_to_f32`]);
//! a checkpoint's per-tensor scale is repeated over the `N` rows at load, and
//! a layer that stacks several projections (q/k/v, gate/up) keeps each
//! part's rows with their own scales. Activations stay in the activation
//! dtype (bf16/f16; F32 on the CPU reference), and so does the output.
//!
//! Two modes compute the product, each exactly specified here because a
//! device uses both (the CUDA backend: the first for up to 16 rows, where the
//! product is bound by reading the weight, the second above, on FP8 tensor
//! cores); [`Backend::fp8_linear_mode`] says which one a backend prefers for
//! a number of rows, and every backend computes both on request:
//!
//! - [`Fp8LinearMode::WeightOnly`]: `p[t, n] = s_w[n] · Σ_k x'[t, k] · dec(w[n, k])`
//!   with `x'` in its own precision (the normed row as computed, not
//!   quantized). Only the weight is rounded (at load).
//! - [`Fp8LinearMode::QuantizedActivations`]: each row of `x'` is first
//!   rounded to the activation dtype, then quantized to E4M3 with a scale
//!   `s_x[t]` ([`Fp8InputScale`]): `q[t, k] = e4m3(x'[t, k] / s_x[t])` (an
//!   IEEE f32 division, round to nearest even, then [`crate::fp8::e4m3_from_f32`]:
//!   nearest code, ties to even, saturating at ±448), and
//!   `p[t, n] = s_x[t] · s_w[n] · Σ_k dec(q[t, k]) · dec(w[n, k])`, the sum in
//!   f32 or better. This is vLLM's `Fp8LinearMethod` (`cutlass_scaled_mm`).
//!
//! Then, in both modes, `p += bias[n]`, and the fusion of [`LinearFusion`]
//! (input norm before, SiLU-and-mul or residual add after) exactly as
//! [`Backend::linear_fused`] applies it.
//!
//! The dynamic scale is per token (per row), `s_x[t] = max_k |x'[t, k]| / 448`
//! (f32 division; 1 for a row of zeros), not vLLM's default per-tensor one:
//! each row then uses E4M3's whole range, so a row of small values next to
//! an outlier row keeps its precision (per-tensor scaling flushes it towards
//! the subnormals), and a row's result depends on that row alone: a token
//! gets the same numbers whatever else is in the batch (prefix caching,
//! chunked prefill and batching do not change them). vLLM takes the same
//! per-token scales where its kernels allow (`use_per_token_if_dynamic`).
//! A checkpoint's static `input_scale` ([`Fp8InputScale::Static`]) is one
//! scale for every row, as vLLM's `activation_scheme: static`.
//!
//! Rounding, for the bounds the conformance suite derives
//! (`pagoda-backend-cpu-ref`'s `check/fp8_linear.rs`): E4M3 keeps 3 mantissa
//! bits, so a value's code is within a relative 2^-4 of it (normal range);
//! every product `x · dec(w)` of a 16-bit `x` (8 or 11 significant bits) and
//! a code (4 bits) is exact in f32, as is `dec(q) · dec(w)`; the two
//! backends' results differ only by f32 summation order and the rounding of
//! the output, given the same codes.

use crate::{Backend, BackendError, DType, HostSlice, LinearFusion, Result, Tensor};

/// The largest finite E4M3 magnitude, which a dynamic scale maps a row's
/// largest magnitude to.
pub use crate::fp8::E4M3_MAX;

/// How [`Backend::fp8_linear`] treats the activations; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8LinearMode {
    /// Activations in their own precision against dequantized weights.
    WeightOnly,
    /// Activations quantized to E4M3 with a scale per row, then an
    /// FP8 x FP8 product (tensor cores on Hopper).
    QuantizedActivations,
}

/// The activation scale of [`Fp8LinearMode::QuantizedActivations`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fp8InputScale {
    /// Per row: `max_k |x'[t, k]| / 448`, 1 for a row of zeros ([`fp8_dynamic_scale`]).
    Dynamic,
    /// One scale for every row (a checkpoint's `input_scale`), positive and finite.
    Static(f32),
}

/// `out = fusion(p)`, `p = x' · Wᵀ + bias` with an FP8 weight; see the module docs.
pub struct Fp8LinearArgs<'a, B: Backend> {
    /// `[T, K]`, a float dtype (the activation dtype).
    pub x: &'a Tensor<B>,
    /// F8E4M3 `[N, K]`: the codes.
    pub weight: &'a Tensor<B>,
    /// F32 `[N]`: each output channel's scale, positive and finite.
    pub weight_scale: &'a Tensor<B>,
    /// `[N]`, x's dtype.
    pub bias: Option<&'a Tensor<B>>,
    /// `[T, N]` (`[T, N/2]` with SiLU-and-mul), x's dtype.
    pub out: &'a Tensor<B>,
    /// As for [`Backend::linear_fused`].
    pub fusion: &'a LinearFusion<'a, B>,
    pub mode: Fp8LinearMode,
    /// Used by [`Fp8LinearMode::QuantizedActivations`] only.
    pub input_scale: Fp8InputScale,
}

impl<B: Backend> Fp8LinearArgs<'_, B> {
    /// The checks every backend makes first: shapes (as `linear_fused`),
    /// dtypes, the static scale, and that `out` aliases no input. Returns
    /// `(tokens, in_features, out_features)`.
    pub fn check(&self, op: &'static str) -> Result<(usize, usize, usize)> {
        let (t, k, n) = self.fusion.check_shapes(op, self.x, self.weight, self.bias, self.out)?;
        if !self.x.dtype().is_float() {
            return Err(BackendError::DType { op, dtype: self.x.dtype() });
        }
        self.weight.expect_dtype(op, DType::F8E4M3)?;
        self.weight_scale.expect_dtype(op, DType::F32)?;
        self.weight_scale.expect_dims(op, "weight_scale", &[n])?;
        self.out.expect_dtype(op, self.x.dtype())?;
        if let Some(b) = self.bias {
            b.expect_dtype(op, self.x.dtype())?;
        }
        if let Some((g, _)) = self.fusion.input_norm {
            g.expect_dtype(op, self.x.dtype())?;
        }
        if let Fp8InputScale::Static(s) = self.input_scale {
            if !(s.is_finite() && s > 0.0) {
                return Err(BackendError::shape(op, format!("static input scale {s}")));
            }
        }
        let mut inputs = vec![self.x, self.weight, self.weight_scale];
        inputs.extend(self.bias);
        inputs.extend(self.fusion.input_norm.map(|(g, _)| g));
        if inputs.iter().any(|i| i.overlaps(self.out)) {
            return Err(BackendError::Aliasing { op });
        }
        Ok((t, k, n))
    }
}

/// The checks of [`Backend::fp8_quantize_rows`]: `x` a float `[rows, cols]`,
/// `codes` F8E4M3 of the same dims, `scales` F32 `[rows]`, none overlapping
/// another. Returns `(rows, cols)`.
pub fn check_fp8_quantize_rows<B: Backend>(
    op: &'static str,
    x: &Tensor<B>,
    codes: &Tensor<B>,
    scales: &Tensor<B>,
) -> Result<(usize, usize)> {
    let [rows, cols] = *x.dims() else {
        return Err(BackendError::shape(op, format!("x of dims {:?} (rows and columns)", x.dims())));
    };
    if !x.dtype().is_float() {
        return Err(BackendError::DType { op, dtype: x.dtype() });
    }
    codes.expect_dtype(op, DType::F8E4M3)?;
    codes.expect_dims(op, "codes", &[rows, cols])?;
    scales.expect_dtype(op, DType::F32)?;
    scales.expect_dims(op, "scales", &[rows])?;
    if x.overlaps(codes) || x.overlaps(scales) || codes.overlaps(scales) {
        return Err(BackendError::Aliasing { op });
    }
    Ok((rows, cols))
}

/// [`Backend::fp8_quantize_rows`] through the host: reads `x` back,
/// quantizes with [`fp8_quantize_rows`], writes the codes and scales (the
/// trait's default, and a device's way for shapes its kernel does not take).
pub fn fp8_quantize_rows_on_host<B: Backend>(
    backend: &B,
    x: &Tensor<B>,
    codes: &Tensor<B>,
    scales: &Tensor<B>,
) -> Result<()> {
    let (rows, cols) = check_fp8_quantize_rows("fp8_quantize_rows", x, codes, scales)?;
    let values = backend.download_f32(x)?;
    let (host_codes, host_scales) = fp8_quantize_rows(&values, rows, cols);
    backend.write(codes, HostSlice::Bytes(&host_codes, DType::F8E4M3))?;
    backend.write(scales, HostSlice::F32(&host_scales))
}

/// The dynamic per-row activation scale: `max |x| / 448` (an f32 division),
/// or 1 when every element is zero (its codes are then zeros whatever the
/// scale). NaN elements are ignored by the maximum.
pub fn fp8_dynamic_scale(row: &[f32]) -> f32 {
    let max = row.iter().fold(0f32, |m, &x| m.max(x.abs()));
    if max > 0.0 {
        max / E4M3_MAX
    } else {
        1.0
    }
}

/// The per-output-channel quantization of a weight at load (`--quantization
/// fp8`, as vLLM's online FP8): each row's scale is `max |w_row| / 448` (1
/// for a zero row), its codes `e4m3(w / scale)`. Returns `(codes, scales)`
/// for `rows` rows of `cols` values.
///
/// Rows are independent, so large weights are split over the host's threads
/// (an 8B model's projections are ~7·10^9 values); the result does not depend
/// on the split.
pub fn fp8_quantize_rows(values: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    assert_eq!(values.len(), rows * cols, "fp8_quantize_rows: {rows} x {cols} values");
    let mut codes = vec![0u8; values.len()];
    let mut scales = vec![1f32; rows];
    let cols = cols.max(1);
    let quantize = |values: &[f32], codes: &mut [u8], scales: &mut [f32]| {
        for ((row, out), scale) in values.chunks(cols).zip(codes.chunks_mut(cols)).zip(scales.iter_mut()) {
            *scale = fp8_dynamic_scale(row);
            for (c, &w) in out.iter_mut().zip(row) {
                *c = crate::fp8::e4m3_from_f32(w / *scale);
            }
        }
    };
    // Below ~1M values a thread costs more than it saves.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(values.len() >> 20).max(1);
    if threads == 1 || rows < 2 {
        quantize(values, &mut codes, &mut scales);
        return (codes, scales);
    }
    let rows_per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        let chunks = values
            .chunks(rows_per * cols)
            .zip(codes.chunks_mut(rows_per * cols))
            .zip(scales.chunks_mut(rows_per));
        for ((v, c), s) in chunks {
            scope.spawn(move || quantize(v, c, s));
        }
    });
    (codes, scales)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::e4m3_to_f32;

    #[test]
    fn dynamic_scales_map_the_largest_magnitude_to_448() {
        assert_eq!(fp8_dynamic_scale(&[1.0, -896.0, 3.0]), 2.0);
        assert_eq!(fp8_dynamic_scale(&[0.0, -0.0]), 1.0);
        assert_eq!(fp8_dynamic_scale(&[]), 1.0);
    }

    /// A weight large enough to be split over threads gets the codes and
    /// scales of quantizing each row on its own.
    #[test]
    fn threaded_quantization_equals_row_by_row() {
        let (rows, cols) = (2100usize, 1024usize); // over 2^21 values: two threads or more
        let values: Vec<f32> =
            (0..rows * cols).map(|i| ((i as f32 * 0.618).sin() * (1 + i % 7) as f32) * 0.01).collect();
        let (codes, scales) = fp8_quantize_rows(&values, rows, cols);
        for r in [0, 1, 1049, 1050, 2099] {
            let (row_codes, row_scales) = fp8_quantize_rows(&values[r * cols..(r + 1) * cols], 1, cols);
            assert_eq!(scales[r], row_scales[0], "row {r}");
            assert_eq!(&codes[r * cols..(r + 1) * cols], &row_codes[..], "row {r}");
        }
    }

    /// Quantizing rows and decoding them gives every weight back within
    /// half a code step (relative 2^-4 in the normal range), the row's
    /// largest magnitude exactly (448 · scale), and zero rows as zeros.
    #[test]
    fn per_channel_quantization_round_trips_within_half_a_step() {
        let (rows, cols) = (5usize, 64usize);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                if r == 3 {
                    return 0.0;
                }
                // Rows of very different magnitudes, both signs.
                let v = ((c as f32 * 0.37 + r as f32).sin()) * 10f32.powi(r as i32 - 2);
                if c % 7 == 0 {
                    -v
                } else {
                    v
                }
            })
            .collect();
        let (codes, scales) = fp8_quantize_rows(&values, rows, cols);
        assert_eq!(scales[3], 1.0);
        for r in 0..rows {
            let row = &values[r * cols..(r + 1) * cols];
            let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            for c in 0..cols {
                let w = row[c];
                let back = e4m3_to_f32(codes[r * cols + c]) * scales[r];
                let scaled = (w / scales[r]).abs();
                // Half a step: 2^-4 relative in the normal range, 2^-10 absolute (in code units) below it.
                let half_step = if scaled >= 2f32.powi(-6) { scaled * 2f32.powi(-4) } else { 2f32.powi(-10) };
                assert!((back - w).abs() <= half_step * scales[r] * 1.0001, "row {r} col {c}: {w} -> {back}");
                if w.abs() == max && max > 0.0 {
                    assert!((back.abs() - max).abs() <= max * 1e-6, "the largest is exact: {w} -> {back}");
                }
            }
        }
    }
}
