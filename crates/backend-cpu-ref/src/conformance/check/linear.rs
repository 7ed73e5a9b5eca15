//! linear, with and without bias, in the activation dtype or with an F32 output.

use pagoda_backend::{Backend, DType};

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
