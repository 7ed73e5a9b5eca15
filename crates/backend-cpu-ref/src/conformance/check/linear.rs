//! linear, with and without bias, in the activation dtype or with an F32
//! output; linear_fused's norm, SiLU-and-mul and accumulate on the same shapes.

use pagoda_backend::{Backend, DType, HostSlice, LinearFusion};

use crate::conformance::grid::LinearCase;
use crate::conformance::{cpu, dev, Harness, Tolerances};

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>, cases: &[LinearCase]) {
    for c in cases {
        let label = c.label();
        h.case("linear", &label, |h, rng| {
            let (t, k, n) = (c.tokens, c.in_features, c.out_features);
            let (_, x_r, x_d) = h.random_rows(rng, t, k, 1.0, c.margin)?;
            // Weights scaled so outputs stay of order 1 whatever K is.
            let w = rng.normals(n * k, 1.0 / (k.max(1) as f32).sqrt(), h.dtype);
            let (w_r, w_d) = h.floats(&w, &[n, k])?;
            let bias = if c.bias { Some(h.floats(&rng.normals(n, 0.5, h.dtype), &[n])?) } else { None };
            let out_dtype = if c.f32_out { DType::F32 } else { h.dtype };
            let (out_r, out_d) = h.outputs(t, n, out_dtype, c.margin)?;
            cpu(h.cpu.linear(&x_r, &w_r, bias.as_ref().map(|b| &b.0), &out_r))?;
            dev(h.device.linear(&x_d, &w_d, bias.as_ref().map(|b| &b.1), &out_d.view))?;
            // An F32 output only carries the device's summation-order error.
            let tol =
                if c.f32_out { Tolerances::for_dtype(DType::F32).accumulated } else { h.tol.accumulated };
            h.compare_out("linear", &label, &out_r, &out_d, tol)
        });
    }
}

/// What `linear_fused` folds in, one variant per check.
#[derive(Clone, Copy)]
enum Fused {
    Norm,
    Accumulate,
    NormSiluMul,
}

impl Fused {
    fn name(self) -> &'static str {
        match self {
            Fused::Norm => "norm",
            Fused::Accumulate => "accumulate",
            Fused::NormSiluMul => "norm+silu_mul",
        }
    }
}

/// linear_fused on the same shapes: input norm (with an F32 output too: the
/// final norm and lm_head), accumulate into a random residual (with the
/// case's bias), and norm + SiLU-and-mul over a stacked [gate; up] weight.
pub(crate) fn run_fused<B: Backend>(h: &mut Harness<'_, B>, cases: &[LinearCase]) {
    for c in cases {
        let mut variants = vec![Fused::Norm];
        if !c.f32_out {
            variants.push(Fused::Accumulate);
            if c.out_features % 2 == 0 {
                variants.push(Fused::NormSiluMul);
            }
        }
        for fused in variants {
            let label = format!("{} {}", c.label(), fused.name());
            h.case("linear_fused", &label, |h, rng| {
                let (t, k, n) = (c.tokens, c.in_features, c.out_features);
                let (_, x_r, x_d) = h.random_rows(rng, t, k, 1.0, c.margin)?;
                let w = rng.normals(n * k, 1.0 / (k.max(1) as f32).sqrt(), h.dtype);
                let (w_r, w_d) = h.floats(&w, &[n, k])?;
                let bias = if c.bias { Some(h.floats(&rng.normals(n, 0.5, h.dtype), &[n])?) } else { None };
                let gamma = h.floats(&rng.normals(k, 1.0, h.dtype), &[k])?;
                let out_cols = if matches!(fused, Fused::NormSiluMul) { n / 2 } else { n };
                let out_dtype = if c.f32_out { DType::F32 } else { h.dtype };
                let (out_r, out_d) = h.outputs(t, out_cols, out_dtype, c.margin)?;
                if matches!(fused, Fused::Accumulate) {
                    let residual = rng.normals(t * n, 1.0, h.dtype);
                    cpu(h.cpu.write(&out_r, HostSlice::F32(&residual)))?;
                    dev(h.device.write(&out_d.view, HostSlice::F32(&residual)))?;
                }
                let eps = 1e-5;
                let fusion_r = LinearFusion {
                    input_norm: (!matches!(fused, Fused::Accumulate)).then_some((&gamma.0, eps)),
                    silu_mul: matches!(fused, Fused::NormSiluMul),
                    accumulate: matches!(fused, Fused::Accumulate),
                };
                let fusion_d = LinearFusion {
                    input_norm: fusion_r.input_norm.map(|_| (&gamma.1, eps)),
                    silu_mul: fusion_r.silu_mul,
                    accumulate: fusion_r.accumulate,
                };
                cpu(h.cpu.linear_fused(&x_r, &w_r, bias.as_ref().map(|b| &b.0), &out_r, &fusion_r))?;
                dev(h.device.linear_fused(&x_d, &w_d, bias.as_ref().map(|b| &b.1), &out_d.view, &fusion_d))?;
                // Even with an F32 output the normalised rows may pass through the
                // activation dtype (the unfused path), so the dtype's tolerance holds.
                h.compare_out("linear_fused", &label, &out_r, &out_d, h.tol.accumulated)
            });
        }
    }
}
