//! lora_shrink and lora_expand: slots mixed per token (with -1) or in runs,
//! one to three parts at their offsets.
//!
//! Tolerances, from the arithmetic (both backends get identical inputs):
//! - shrink: an F32 output, a sum over K in f32 on both sides in different
//!   orders: the F32 tolerance for accumulated ops (1e-4, relative L2 per
//!   row). A token without an adapter has a zero reference row, so anything
//!   but exact zeros fails.
//! - expand: the device forms `s = base + Σ_r u_r·b_r` in f32 and rounds it
//!   to its dtype once; the reference keeps f32. Per element,
//!   `|dev - ref| <= u·|ref| + (1 + u)·|s - ref|` with `u` the dtype's unit
//!   roundoff (2^-8 bf16, 2^-11 f16, 2^-24 f32), and two f32 evaluations of
//!   the same R + 1 terms differ by at most `2·γ(R+1)·M`, `γ(n) ≈ n·2^-24`,
//!   `M = |base| + Σ_r |u_r·b_r| <= |base| + ‖u‖·‖b_row‖` (Cauchy-Schwarz, so
//!   the bound costs one norm per token and per row of `b`). Every element
//!   must meet `u·|ref| + 2.02·(R+1)·2^-24·M`; the relative L2 error, reported
//!   as for other ops, must stay within `u + 1e-4`. A dropped term, a wrong
//!   slot or offset moves elements by about `|b|·|u| ~ 1/sqrt(R)`, far
//!   outside. Rows without an adapter and columns outside the parts must be
//!   untouched bit for bit.

use pagoda_backend::{Backend, DType, HostSlice, LoraExpandArgs, LoraShrinkArgs};

use crate::conformance::grid::LoraCase;
use crate::conformance::{cpu, dev, Harness, Tolerances};

/// The unit roundoff of storing a value in `dtype` (round to nearest).
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    }
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>, cases: &[LoraCase]) {
    for c in cases {
        let label = c.label();
        let (t, k, n, r, parts, s) = (c.tokens, c.in_features, c.out_features, c.rank, c.parts, c.slots);
        let u_cols = parts * r;

        h.case("lora_shrink", &label, |h, rng| {
            let slots = c.layout.assign(t, s, |m| rng.below(m));
            let (slots_r, slots_d) = h.ints(&slots, &[t])?;
            let margin = c.column_margin;
            let (_, x_r, x_d) = h.random_rows(rng, t, k, 1.0, margin)?;
            // Scaled so each product is of order 1 whatever K is.
            let a = rng.normals(s * u_cols * k, 1.0 / (k.max(1) as f32).sqrt(), h.dtype);
            let (a_r, a_d) = h.floats(&a, &[s, u_cols, k])?;
            let (out_r, out_d) = h.outputs(t, u_cols, DType::F32, margin)?;
            cpu(h.cpu.lora_shrink(&LoraShrinkArgs { x: &x_r, a: &a_r, token_slots: &slots_r, out: &out_r }))?;
            dev(h.device.lora_shrink(&LoraShrinkArgs {
                x: &x_d,
                a: &a_d,
                token_slots: &slots_d,
                out: &out_d.view,
            }))?;
            let tol = Tolerances::for_dtype(DType::F32).accumulated;
            h.compare_out("lora_shrink", &label, &out_r, &out_d, tol)
        });

        h.case("lora_expand", &label, |h, rng| {
            let slots = c.layout.assign(t, s, |m| rng.below(m));
            let (slots_r, slots_d) = h.ints(&slots, &[t])?;
            let margin = c.column_margin;
            let width = parts * n + 2 * margin;
            // A shrink's output, the same F32 values on both sides.
            let u = rng.normals(t * u_cols, 1.0, DType::F32);
            let u_r = cpu(h.cpu.upload(HostSlice::F32(&u), &[t, u_cols], DType::F32))?;
            let u_d = dev(h.device.upload(HostSlice::F32(&u), &[t, u_cols], DType::F32))?;
            // The base product's output, of the same order as the update (so
            // an error in the update is not hidden under it).
            let base = rng.normals(t * width, 1.0, h.dtype);
            let (out_r, out_d) = h.floats(&base, &[t, width])?;
            // ‖b[slot, n, :]‖ for every part, slot and column.
            let mut b_norms = Vec::with_capacity(parts);
            for p in 0..parts {
                let b = rng.normals(s * n * r, 1.0 / (r as f32).sqrt(), h.dtype);
                let (b_r, b_d) = h.floats(&b, &[s, n, r])?;
                let (u_offset, out_offset) = (p * r, margin + p * n);
                cpu(h.cpu.lora_expand(&LoraExpandArgs {
                    u: &u_r,
                    u_offset,
                    b: &b_r,
                    token_slots: &slots_r,
                    out: &out_r,
                    out_offset,
                }))?;
                dev(h.device.lora_expand(&LoraExpandArgs {
                    u: &u_d,
                    u_offset,
                    b: &b_d,
                    token_slots: &slots_d,
                    out: &out_d,
                    out_offset,
                }))?;
                b_norms.push(b.chunks(r.max(1)).map(norm).collect::<Vec<_>>());
            }
            let want = cpu(h.cpu.download_f32(&out_r))?;
            let got = dev(h.device.download_f32(&out_d))?;
            if want.len() != got.len() {
                return Err(format!("device returned {} elements, reference {}", got.len(), want.len()));
            }

            let unit = unit_roundoff(h.dtype);
            let order = 2.02 * (r + 1) as f64 * 2f64.powi(-24);
            let (mut beyond, mut changed) = (0usize, 0usize);
            for tok in 0..t {
                let u_norms: Vec<f64> = (0..parts).map(|p| norm(&u[tok * u_cols + p * r..][..r])).collect();
                for col in 0..width {
                    let i = tok * width + col;
                    let inside = col >= margin && col < margin + parts * n;
                    if slots[tok] < 0 || !inside {
                        changed += usize::from(got[i].to_bits() != base[i].to_bits());
                        continue;
                    }
                    let (p, j) = ((col - margin) / n, (col - margin) % n);
                    let m = base[i].abs() as f64 + u_norms[p] * b_norms[p][slots[tok] as usize * n + j];
                    let (w, g) = (want[i] as f64, got[i] as f64);
                    // NaN is never within.
                    let within = (g - w).abs() <= unit * w.abs() + order * m;
                    beyond += usize::from(!within);
                }
            }
            let mut row = h.compare("lora_expand", &label, &want, &got, width, unit + 1e-4)?;
            if beyond > 0 {
                row.passed = false;
                row.note = format!("{beyond} elements beyond u·|ref| + the f32 order bound");
            }
            let untouched = h.exact_count("lora_expand/untouched", &label, changed, "elements changed");
            Ok(vec![row, untouched])
        });
    }
}
