//! embedding, rms_norm, add_rms_norm, silu_and_mul and gather_rows.

use pagoda_backend::Backend;

use crate::conformance::grid::RowsCase;
use crate::conformance::{cpu, dev, Harness};

const EPS: f32 = 1e-5;

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>, cases: &[RowsCase]) {
    for c in cases {
        let label = c.label();
        let (t, hid, m) = (c.tokens, c.hidden, c.margin);

        h.case("embedding", &label, |h, rng| {
            let table = rng.normals(c.vocab * hid, 1.0, h.dtype);
            let (table_r, table_d) = h.floats(&table, &[c.vocab, hid])?;
            let ids: Vec<i32> = (0..t).map(|_| rng.below(c.vocab) as i32).collect();
            let (ids_r, ids_d) = h.ints(&ids, &[t])?;
            let (out_r, out_d) = h.outputs(t, hid, h.dtype, m)?;
            cpu(h.cpu.embedding(&ids_r, &table_r, &out_r))?;
            dev(h.device.embedding(&ids_d, &table_d, &out_d.view))?;
            h.compare_out("embedding", &label, &out_r, &out_d, 0.0)
        });

        h.case("rms_norm", &label, |h, rng| {
            let (_, x_r, x_d) = h.random_rows(rng, t, hid, 2.0, m)?;
            let w = rng.normals(hid, 0.2, h.dtype).iter().map(|v| 1.0 + v).collect::<Vec<_>>();
            let w = w.iter().map(|&v| crate::conformance::random::round_to(h.dtype, v)).collect::<Vec<_>>();
            let (w_r, w_d) = h.floats(&w, &[hid])?;
            let (out_r, out_d) = h.outputs(t, hid, h.dtype, m)?;
            cpu(h.cpu.rms_norm(&x_r, &w_r, EPS, &out_r))?;
            dev(h.device.rms_norm(&x_d, &w_d, EPS, &out_d.view))?;
            h.compare_out("rms_norm", &label, &out_r, &out_d, h.tol.elementwise)
        });

        h.case("add_rms_norm", &label, |h, rng| {
            let (_, x_r, x_d) = h.random_rows(rng, t, hid, 1.0, m)?;
            let (_, res_r, res_d) = h.random_rows(rng, t, hid, 3.0, m)?;
            let w = rng.normals(hid, 1.0, h.dtype);
            let (w_r, w_d) = h.floats(&w, &[hid])?;
            let (out_r, out_d) = h.outputs(t, hid, h.dtype, m)?;
            cpu(h.cpu.add_rms_norm(&x_r, &res_r, &w_r, EPS, &out_r))?;
            dev(h.device.add_rms_norm(&x_d, &res_d, &w_d, EPS, &out_d.view))?;
            let mut rows = h.compare_out("add_rms_norm/out", &label, &out_r, &out_d, h.tol.elementwise)?;
            let want = cpu(h.cpu.download_f32(&res_r))?;
            let got = dev(h.device.download_f32(&res_d))?;
            rows.push(h.compare("add_rms_norm/residual", &label, &want, &got, hid, h.tol.elementwise)?);
            Ok(rows)
        });

        h.case("silu_and_mul", &label, |h, rng| {
            let inter = c.intermediate;
            let (_, x_r, x_d) = h.random_rows(rng, t, 2 * inter, 2.0, m)?;
            let (out_r, out_d) = h.outputs(t, inter, h.dtype, m)?;
            cpu(h.cpu.silu_and_mul(&x_r, &out_r))?;
            dev(h.device.silu_and_mul(&x_d, &out_d.view))?;
            h.compare_out("silu_and_mul", &label, &out_r, &out_d, h.tol.elementwise)
        });

        h.case("gather_rows", &label, |h, rng| {
            let (_, x_r, x_d) = h.random_rows(rng, t, hid, 1.0, m)?;
            // Some rows twice, some never, in no particular order.
            let picked = t / 2 + 1;
            let idx: Vec<i32> = (0..picked).map(|_| rng.below(t) as i32).collect();
            let (idx_r, idx_d) = h.ints(&idx, &[picked])?;
            let (out_r, out_d) = h.outputs(picked, hid, h.dtype, m)?;
            cpu(h.cpu.gather_rows(&x_r, &idx_r, &out_r))?;
            dev(h.device.gather_rows(&x_d, &idx_d, &out_d.view))?;
            h.compare_out("gather_rows", &label, &out_r, &out_d, 0.0)
        });
    }
}
