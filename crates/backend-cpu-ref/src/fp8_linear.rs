//! `fp8_linear`: both modes of `pagoda_backend::Fp8LinearArgs`, written as the
//! formulas read. The weight's codes are held as their f32 values (an F8E4M3
//! tensor here), so the product is the f32 `matmul_transposed` of the plain
//! linear layer, over exactly the codes' values; the scales are applied to
//! its f32 sums afterwards, then the bias and the fusion.

use pagoda_backend::fp8::e4m3_round;
use pagoda_backend::{fp8_dynamic_scale, Fp8InputScale, Fp8LinearArgs, Fp8LinearMode, Result};

use crate::linear::{fused_input, matmul_transposed, store_fused};
use crate::storage::with_operands;
use crate::CpuBackend;

pub(crate) fn fp8_linear(a: &Fp8LinearArgs<'_, CpuBackend>) -> Result<()> {
    const OP: &str = "fp8_linear";
    let (tokens, k, n) = a.check(OP)?;
    let mut inputs = vec![a.x, a.weight_scale];
    inputs.extend(a.bias);
    inputs.extend(a.fusion.input_norm.map(|(g, _)| g));
    // The weight is read through `cache_values` (F8E4M3 values); declared last
    // so that the other inputs' dtype checks come first.
    inputs.push(a.weight);
    with_operands(OP, &inputs, &[a.out], |ins, outs| {
        let xs = ins.f32(a.x)?;
        let w = ins.cache_values(a.weight)?;
        let scales = ins.f32(a.weight_scale)?;
        let bias = a.bias.map(|b| ins.f32(b)).transpose()?;
        // x' (the activation dtype here is f32, so "rounded to it" is x' itself).
        let norm = a.fusion.input_norm.map(|(g, eps)| ins.f32(g).map(|g| (g, eps))).transpose()?;
        let mut rows = fused_input(xs, norm, tokens, k);
        // Per row, the factor its sums are multiplied by besides s_w[n].
        let row_scales: Vec<f32> = match a.mode {
            Fp8LinearMode::WeightOnly => vec![1.0; tokens],
            Fp8LinearMode::QuantizedActivations => {
                let scales: Vec<f32> = (0..tokens)
                    .map(|t| match a.input_scale {
                        Fp8InputScale::Dynamic => fp8_dynamic_scale(&rows[t * k..(t + 1) * k]),
                        Fp8InputScale::Static(s) => s,
                    })
                    .collect();
                let quantized = rows.to_mut();
                for (t, row) in quantized.chunks_mut(k.max(1)).enumerate().take(tokens) {
                    for x in row {
                        *x = e4m3_round(*x / scales[t]);
                    }
                }
                scales
            }
        };
        let mut product = vec![0.0f32; tokens * n];
        matmul_transposed(&rows, w, None, &mut product, tokens, k, n);
        for (t, row) in product.chunks_mut(n.max(1)).enumerate().take(tokens) {
            for (j, p) in row.iter_mut().enumerate() {
                *p = *p * row_scales[t] * scales[j] + bias.map_or(0.0, |b| b[j]);
            }
        }
        store_fused(outs[0], &product, a.fusion, n);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use pagoda_backend::fp8::{e4m3_from_f32, e4m3_to_f32};
    use pagoda_backend::{Backend, BackendError, DType, HostSlice, LinearFusion};

    use super::*;

    fn args<'a>(
        x: &'a crate::storage::CpuTensor,
        w: &'a crate::storage::CpuTensor,
        s: &'a crate::storage::CpuTensor,
        out: &'a crate::storage::CpuTensor,
        fusion: &'a LinearFusion<'a, CpuBackend>,
        mode: Fp8LinearMode,
        input_scale: Fp8InputScale,
    ) -> Fp8LinearArgs<'a, CpuBackend> {
        Fp8LinearArgs { x, weight: w, weight_scale: s, bias: None, out, fusion, mode, input_scale }
    }

    /// Both modes on numbers worked by hand.
    #[test]
    fn hand_computed_modes() {
        let cpu = CpuBackend::new();
        // Codes for 1.0, -2.0, 0.5 and 3.0; row scales 0.5 and 2.
        let codes: Vec<u8> = [1.0f32, -2.0, 0.5, 3.0].iter().map(|&v| e4m3_from_f32(v)).collect();
        let w = cpu.upload(HostSlice::Bytes(&codes, DType::F8E4M3), &[2, 2], DType::F8E4M3).unwrap();
        let s = cpu.upload(HostSlice::F32(&[0.5, 2.0]), &[2], DType::F32).unwrap();
        // x = [0.3, 0.7]: not E4M3 values (0.3 -> 0.3125 at scale 1).
        let x = cpu.upload(HostSlice::F32(&[0.3, 0.7]), &[1, 2], DType::F32).unwrap();
        let out = cpu.alloc(&[1, 2], DType::F32).unwrap();
        let none = LinearFusion::none();
        let run = |mode, input_scale| {
            cpu.fp8_linear(&args(&x, &w, &s, &out, &none, mode, input_scale)).unwrap();
            cpu.download_f32(&out).unwrap()
        };
        // Weight only: 0.5·(0.3 - 1.4) and 2·(0.15 + 2.1).
        let got = run(Fp8LinearMode::WeightOnly, Fp8InputScale::Dynamic);
        assert!((got[0] - 0.5 * (0.3 - 1.4)).abs() < 1e-6 && (got[1] - 2.0 * 2.25).abs() < 1e-6, "{got:?}");
        // Quantized, static scale 1: q = [0.3125, 0.6875].
        let (q0, q1) = (e4m3_to_f32(e4m3_from_f32(0.3)), e4m3_to_f32(e4m3_from_f32(0.7)));
        assert_eq!((q0, q1), (0.3125, 0.6875));
        let got = run(Fp8LinearMode::QuantizedActivations, Fp8InputScale::Static(1.0));
        assert_eq!(got, vec![0.5 * (q0 - 2.0 * q1), 2.0 * (0.5 * q0 + 3.0 * q1)]);
        // Dynamic: s_x = 0.7 / 448, the largest element exactly 448 codes' worth.
        let sx = 0.7f32 / 448.0;
        let (d0, d1) = (e4m3_to_f32(e4m3_from_f32(0.3 / sx)), e4m3_to_f32(e4m3_from_f32(0.7 / sx)));
        assert_eq!(d1, 448.0);
        let got = run(Fp8LinearMode::QuantizedActivations, Fp8InputScale::Dynamic);
        let want = [(d0 - 2.0 * d1) * sx * 0.5, (0.5 * d0 + 3.0 * d1) * sx * 2.0];
        assert!(
            (got[0] - want[0]).abs() <= 1e-6 * want[0].abs()
                && (got[1] - want[1]).abs() <= 1e-6 * want[1].abs()
        );
    }

    #[test]
    fn operands_are_checked() {
        let cpu = CpuBackend::new();
        let x = cpu.alloc(&[2, 4], DType::F32).unwrap();
        cpu.fill(&x, 1.0).unwrap();
        let w8 = cpu.upload(HostSlice::Bytes(&[0x38; 12], DType::F8E4M3), &[3, 4], DType::F8E4M3).unwrap();
        let w32 = cpu.alloc(&[3, 4], DType::F32).unwrap();
        let s = cpu.upload(HostSlice::F32(&[1.0; 3]), &[3], DType::F32).unwrap();
        let s_short = cpu.upload(HostSlice::F32(&[1.0; 2]), &[2], DType::F32).unwrap();
        let out = cpu.alloc(&[2, 3], DType::F32).unwrap();
        let none = LinearFusion::none();
        let (wo, dynamic) = (Fp8LinearMode::WeightOnly, Fp8InputScale::Dynamic);
        assert!(matches!(
            cpu.fp8_linear(&args(&x, &w32, &s, &out, &none, wo, dynamic)),
            Err(BackendError::DType { .. })
        ));
        assert!(matches!(
            cpu.fp8_linear(&args(&x, &w8, &s_short, &out, &none, wo, dynamic)),
            Err(BackendError::Shape { .. })
        ));
        let q = Fp8LinearMode::QuantizedActivations;
        assert!(matches!(
            cpu.fp8_linear(&args(&x, &w8, &s, &out, &none, q, Fp8InputScale::Static(0.0))),
            Err(BackendError::Shape { .. })
        ));
        assert!(matches!(
            cpu.fp8_linear(&args(&x, &w8, &s, &x, &none, wo, dynamic)),
            Err(BackendError::Shape { .. } | BackendError::Aliasing { .. })
        ));
        cpu.fp8_linear(&args(&x, &w8, &s, &out, &none, wo, dynamic)).unwrap();
        // 0x38 is 1.0: every output is 4.
        assert_eq!(cpu.download_f32(&out).unwrap(), vec![4.0; 6]);
    }
}
