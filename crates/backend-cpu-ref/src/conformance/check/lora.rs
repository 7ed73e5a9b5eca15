//! lora_apply: slots mixed per token (with -1) or in runs, one to three
//! parts at their offsets; each case token by token and again with the
//! tokens grouped by slot ([`LoraGroups`], padded to their capacity as a
//! recorded graph's buffers are), which the reference checks against the
//! slots. The parts' `B` are views of one tensor in cases of an even column
//! margin (a backend may then batch the parts' products) and tensors of
//! their own otherwise.
//!
//! Tolerances, from the arithmetic (both backends get identical inputs):
//! the device forms `s = base + Σ_r u_r·b_r` in f32, with `u = A·x` its own
//! f32 shrink, and rounds `s` to its dtype once; the reference keeps f32.
//! Per element, `|dev - ref| <= u·|ref| + (1 + u)·|s - ref|` with `u` the
//! dtype's unit roundoff (2^-8 bf16, 2^-11 f16, 2^-24 f32), and `s - ref`
//! gathers:
//! - the expand's summation order: two f32 evaluations of the same R + 1
//!   terms differ by at most `2·γ(R+1)·M`, `γ(n) ≈ n·2^-24`,
//!   `M = |base| + Σ_r |u_r·b_r| <= |base| + ‖u‖·‖b_col‖` (Cauchy-Schwarz, so
//!   the bound costs one norm per token and per column of `b`; `u` exact,
//!   from f64 on the host);
//! - the shrink's summation order: each `u_r` of either side is within
//!   `γ(K)·Σ_k |a_rk·x_k| <= γ(K)·‖a_r‖·‖x‖` of the exact one, so the two
//!   sides' `u` differ by `‖δu‖ <= 2·γ(K)·‖x‖·‖A_slot‖_F`, which moves the sum
//!   by at most `‖δu‖·‖b_col‖`;
//! - the trait lets a backend round `u` to its dtype first (the dense GEMM
//!   path does): that moves the sum by at most `u·(‖u‖ + ‖δu‖)·‖b_col‖`.
//!
//! Every element must meet the sum of these terms (with 2.02 for 2 in the
//! `γ` terms); the relative L2 error, reported as for other ops, must stay
//! within `2u + 1e-4`. A dropped term, a wrong slot, part or offset moves
//! elements by about `|b|·|u| ~ 1`, far outside. Rows without an adapter and
//! columns outside the parts must be untouched bit for bit.

use pagoda_backend::{
    lora_group_capacity, lora_token_groups, Backend, DType, LoraArgs, LoraGroups, LoraPart, Tensor,
};

use crate::conformance::grid::LoraCase;
use crate::conformance::{cpu, dev, Harness};

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

/// The parts' `B` views, `[S, R, N]` each, of `whole` (`[P·S, R, N]`) or of
/// one tensor per part.
fn part_views<B: Backend>(
    whole: &Tensor<B>,
    own: &[Tensor<B>],
    parts: usize,
    s: usize,
    r: usize,
    n: usize,
) -> Result<Vec<Tensor<B>>, String> {
    if !own.is_empty() {
        return Ok(own.to_vec());
    }
    (0..parts)
        .map(|p| whole.narrow(p * s, s).and_then(|v| v.reshape(&[s, r, n])).map_err(|e| e.to_string()))
        .collect()
}

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>, cases: &[LoraCase]) {
    for (c, grouped) in cases.iter().flat_map(|c| [(c, false), (c, true)]) {
        let label = if grouped { format!("{} grouped", c.label()) } else { c.label() };
        let (t, k, n, r, parts, s) = (c.tokens, c.in_features, c.out_features, c.rank, c.parts, c.slots);
        // Even margins: the parts' B are views of one tensor.
        let one_b = c.column_margin % 2 == 0;

        h.case("lora_apply", &label, |h, rng| {
            let slots = c.layout.assign(t, s, |m| rng.below(m));
            let (slots_r, slots_d) = h.ints(&slots, &[t])?;
            let (groups_r, groups_d) = match grouped.then(|| upload_groups(h, &slots, s)).transpose()? {
                Some((r, d)) => (Some(r), Some(d)),
                None => (None, None),
            };
            let margin = c.column_margin;
            let width = parts * n + 2 * margin;
            let (x, x_r, x_d) = h.random_rows(rng, t, k, 1.0, margin)?;
            // Scaled so each shrunk value is of order 1 whatever K is, and each
            // update of order 1 whatever R is.
            let a = rng.normals(parts * s * r * k, 1.0 / (k.max(1) as f32).sqrt(), h.dtype);
            let (a_r, a_d) = h.floats(&a, &[parts, s, r, k])?;
            let b = rng.normals(parts * s * r * n, 1.0 / (r as f32).sqrt(), h.dtype);
            let (b_r, b_d) = h.floats(&b, &[parts * s, r, n])?;
            let (mut own_r, mut own_d) = (Vec::new(), Vec::new());
            if !one_b {
                for p in 0..parts {
                    let (pr, pd) = h.floats(&b[p * s * r * n..(p + 1) * s * r * n], &[s, r, n])?;
                    own_r.push(pr);
                    own_d.push(pd);
                }
            }
            let views_r = part_views(&b_r, &own_r, parts, s, r, n)?;
            let views_d = part_views(&b_d, &own_d, parts, s, r, n)?;
            let offset = |p: usize| margin + p * n;
            let parts_r: Vec<LoraPart<'_, crate::CpuBackend>> =
                views_r.iter().enumerate().map(|(p, b)| LoraPart { b, out_offset: offset(p) }).collect();
            let parts_d: Vec<LoraPart<'_, B>> =
                views_d.iter().enumerate().map(|(p, b)| LoraPart { b, out_offset: offset(p) }).collect();
            // The base product's output, of the same order as the update (so
            // an error in the update is not hidden under it).
            let base = rng.normals(t * width, 1.0, h.dtype);
            let (out_r, out_d) = h.floats(&base, &[t, width])?;
            cpu(h.cpu.lora_apply(&LoraArgs {
                x: &x_r,
                a: &a_r,
                parts: &parts_r,
                token_slots: &slots_r,
                out: &out_r,
                groups: as_groups(&groups_r),
            }))?;
            dev(h.device.lora_apply(&LoraArgs {
                x: &x_d,
                a: &a_d,
                parts: &parts_d,
                token_slots: &slots_d,
                out: &out_d,
                groups: as_groups(&groups_d),
            }))?;
            let want = cpu(h.cpu.download_f32(&out_r))?;
            let got = dev(h.device.download_f32(&out_d))?;
            if want.len() != got.len() {
                return Err(format!("device returned {} elements, reference {}", got.len(), want.len()));
            }

            let unit = unit_roundoff(h.dtype);
            let eps = 2f64.powi(-24);
            let order = 2.02 * (r + 1) as f64 * eps;
            // ‖A[p, slot]‖_F and ‖b[p, slot, :, j]‖.
            let a_norms: Vec<f64> = a.chunks_exact(r * k).map(norm).collect();
            let b_norms: Vec<f64> = (0..parts * s * n)
                .map(|psj| {
                    let (ps, j) = (psj / n, psj % n);
                    let col: Vec<f32> = (0..r).map(|i| b[(ps * r + i) * n + j]).collect();
                    norm(&col)
                })
                .collect();
            let (mut beyond, mut changed) = (0usize, 0usize);
            for tok in 0..t {
                let xt = &x[tok * k..(tok + 1) * k];
                // The exact shrink's norm and the bound on the two sides' shrink difference, per part.
                let (u_norms, du_norms): (Vec<f64>, Vec<f64>) = match usize::try_from(slots[tok]) {
                    Ok(sl) => (0..parts)
                        .map(|p| {
                            let u: Vec<f64> = (0..r)
                                .map(|i| {
                                    let row = &a[((p * s + sl) * r + i) * k..][..k];
                                    row.iter().zip(xt).map(|(&w, &v)| w as f64 * v as f64).sum()
                                })
                                .collect();
                            let u_norm = u.iter().map(|v| v * v).sum::<f64>().sqrt();
                            (u_norm, 2.02 * k as f64 * eps * norm(xt) * a_norms[p * s + sl])
                        })
                        .unzip(),
                    Err(_) => (Vec::new(), Vec::new()),
                };
                for col in 0..width {
                    let i = tok * width + col;
                    let inside = col >= margin && col < margin + parts * n;
                    if slots[tok] < 0 || !inside {
                        changed += usize::from(got[i].to_bits() != base[i].to_bits());
                        continue;
                    }
                    let (p, j) = ((col - margin) / n, (col - margin) % n);
                    let b_norm = b_norms[(p * s + slots[tok] as usize) * n + j];
                    let update = u_norms[p] * b_norm;
                    let shrink = du_norms[p] * b_norm;
                    let m = base[i].abs() as f64 + update;
                    let (w, g) = (want[i] as f64, got[i] as f64);
                    let bound =
                        unit * w.abs() + (1.0 + unit) * (order * m + shrink + unit * (update + shrink));
                    // NaN is never within.
                    let within = (g - w).abs() <= bound;
                    beyond += usize::from(!within);
                }
            }
            let mut row = h.compare("lora_apply", &label, &want, &got, width, 2.0 * unit + 1e-4)?;
            if beyond > 0 {
                row.passed = false;
                row.note = format!("{beyond} elements beyond u·|ref| + the f32 order bounds");
            }
            let untouched = h.exact_count("lora_apply/untouched", &label, changed, "elements changed");
            Ok(vec![row, untouched])
        });
    }
}
