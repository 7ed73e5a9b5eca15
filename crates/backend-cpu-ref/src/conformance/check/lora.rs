//! lora_shrink and lora_expand: slots mixed per token (with -1) or in runs,
//! one to three parts at their offsets; each case token by token and again
//! with the tokens grouped by slot ([`LoraGroups`], padded to their capacity
//! as a recorded graph's buffers are), which the reference checks against
//! the slots.
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
//!   `M = |base| + Σ_r |u_r·b_r| <= |base| + ‖u‖·‖b_col‖` (Cauchy-Schwarz, so
//!   the bound costs one norm per token and per column of `b`). The trait
//!   lets a backend round `u` to its dtype first (the dense GEMM path does):
//!   that moves the sum by at most `u·Σ_r |u_r·b_r| <= u·‖u‖·‖b_col‖`. Every
//!   element must meet `u·|ref| + 2.02·(R+1)·2^-24·M + u·‖u‖·‖b_col‖`; the
//!   relative L2 error, reported as for other ops, must stay within
//!   `2u + 1e-4`. A dropped term, a wrong
//!   slot or offset moves elements by about `|b|·|u| ~ 1/sqrt(R)`, far
//!   outside. Rows without an adapter and columns outside the parts must be
//!   untouched bit for bit.

use pagoda_backend::{
    lora_group_capacity, lora_token_groups, Backend, DType, HostSlice, LoraExpandArgs, LoraGroups,
    LoraShrinkArgs, Tensor,
};

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

/// The groups of `slots` on both sides (reference, device), padded to capacity.
type GroupTensors<B> = ((Tensor<crate::CpuBackend>, Tensor<crate::CpuBackend>), (Tensor<B>, Tensor<B>));

fn upload_groups<B: Backend>(
    h: &Harness<'_, B>,
    slots: &[i32],
    num_slots: usize,
) -> Result<GroupTensors<B>, String> {
    let capacity = lora_group_capacity(slots.len(), num_slots);
    let (order, groups) = lora_token_groups(slots, Some(capacity));
    let (order_r, order_d) = h.ints(&order, &[slots.len()])?;
    let (groups_r, groups_d) = h.ints(&groups, &[capacity, 3])?;
    Ok(((order_r, groups_r), (order_d, groups_d)))
}

fn as_groups<B: Backend>(pair: &Option<(Tensor<B>, Tensor<B>)>) -> Option<LoraGroups<'_, B>> {
    pair.as_ref().map(|(order, groups)| LoraGroups { order, groups })
}

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>, cases: &[LoraCase]) {
    for (c, grouped) in cases.iter().flat_map(|c| [(c, false), (c, true)]) {
        let label = if grouped { format!("{} grouped", c.label()) } else { c.label() };
        let (t, k, n, r, parts, s) = (c.tokens, c.in_features, c.out_features, c.rank, c.parts, c.slots);
        let u_cols = parts * r;

        h.case("lora_shrink", &label, |h, rng| {
            let slots = c.layout.assign(t, s, |m| rng.below(m));
            let (slots_r, slots_d) = h.ints(&slots, &[t])?;
            let (groups_r, groups_d) = match grouped.then(|| upload_groups(h, &slots, s)).transpose()? {
                Some((r, d)) => (Some(r), Some(d)),
                None => (None, None),
            };
            let margin = c.column_margin;
            let (_, x_r, x_d) = h.random_rows(rng, t, k, 1.0, margin)?;
            // Scaled so each product is of order 1 whatever K is.
            let a = rng.normals(s * u_cols * k, 1.0 / (k.max(1) as f32).sqrt(), h.dtype);
            let (a_r, a_d) = h.floats(&a, &[s, u_cols, k])?;
            let (out_r, out_d) = h.outputs(t, u_cols, DType::F32, margin)?;
            cpu(h.cpu.lora_shrink(&LoraShrinkArgs {
                x: &x_r,
                a: &a_r,
                token_slots: &slots_r,
                out: &out_r,
                groups: as_groups(&groups_r),
            }))?;
            dev(h.device.lora_shrink(&LoraShrinkArgs {
                x: &x_d,
                a: &a_d,
                token_slots: &slots_d,
                out: &out_d.view,
                groups: as_groups(&groups_d),
            }))?;
            let tol = Tolerances::for_dtype(DType::F32).accumulated;
            h.compare_out("lora_shrink", &label, &out_r, &out_d, tol)
        });

        h.case("lora_expand", &label, |h, rng| {
            let slots = c.layout.assign(t, s, |m| rng.below(m));
            let (slots_r, slots_d) = h.ints(&slots, &[t])?;
            let (groups_r, groups_d) = match grouped.then(|| upload_groups(h, &slots, s)).transpose()? {
                Some((r, d)) => (Some(r), Some(d)),
                None => (None, None),
            };
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
            // ‖b[slot, :, n]‖ for every part, slot and column.
            let mut b_norms = Vec::with_capacity(parts);
            for p in 0..parts {
                let b = rng.normals(s * r * n, 1.0 / (r as f32).sqrt(), h.dtype);
                let (b_r, b_d) = h.floats(&b, &[s, r, n])?;
                let (u_offset, out_offset) = (p * r, margin + p * n);
                cpu(h.cpu.lora_expand(&LoraExpandArgs {
                    u: &u_r,
                    u_offset,
                    b: &b_r,
                    token_slots: &slots_r,
                    out: &out_r,
                    out_offset,
                    groups: as_groups(&groups_r),
                }))?;
                dev(h.device.lora_expand(&LoraExpandArgs {
                    u: &u_d,
                    u_offset,
                    b: &b_d,
                    token_slots: &slots_d,
                    out: &out_d,
                    out_offset,
                    groups: as_groups(&groups_d),
                }))?;
                let col_norms = (0..s * n).map(|sj| {
                    let (sl, j) = (sj / n, sj % n);
                    let col: Vec<f32> = (0..r).map(|i| b[(sl * r + i) * n + j]).collect();
                    norm(&col)
                });
                b_norms.push(col_norms.collect::<Vec<_>>());
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
                    let update = u_norms[p] * b_norms[p][slots[tok] as usize * n + j];
                    let m = base[i].abs() as f64 + update;
                    let (w, g) = (want[i] as f64, got[i] as f64);
                    // NaN is never within.
                    let within = (g - w).abs() <= unit * w.abs() + order * m + unit * update;
                    beyond += usize::from(!within);
                }
            }
            let mut row = h.compare("lora_expand", &label, &want, &got, width, 2.0 * unit + 1e-4)?;
            if beyond > 0 {
                row.passed = false;
                row.note = format!("{beyond} elements beyond u·|ref| + the f32 order bound");
            }
            let untouched = h.exact_count("lora_expand/untouched", &label, changed, "elements changed");
            Ok(vec![row, untouched])
        });
    }
}
