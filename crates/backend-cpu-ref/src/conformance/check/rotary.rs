//! rotary_and_cache: the rotated queries, the cache slots written, and every
//! other slot left exactly as it was.
//!
//! # FP8 caches: how far apart the two backends' codes may be
//! Both caches start from the same codes and the op stores `e4m3(x / s)`.
//! - **v** is copied from the input, which both sides hold exactly (rounded to
//!   the activation dtype by the harness), and `v / s` is one IEEE f32
//!   division on both: the codes must be **equal**.
//! - **k**: the reference's `x` is the rotated key in f32; a 16-bit device's is
//!   its own f32 rotation (a few f32 ulps away: another order, FMA) rounded to
//!   bf16/f16. So the two quotients differ by at most half a bf16 ulp, a
//!   relative 2^-8, plus those ulps. E4M3 values are 2^-3 to 2^-4 apart
//!   relative to their size (2^-9 apart absolutely below 2^-6, where the
//!   difference is smaller still), so at most one rounding boundary lies
//!   between the two quotients: codes are **equal or adjacent** (one
//!   representable step, [`e4m3_ordinal`]; both saturate together above 448).
//!   Adjacent codes need a boundary inside that gap: per code a chance of at
//!   most 2^-8 / 2^-4 = 1/16, about 1/64 on average (the mean bf16 rounding
//!   error is a quarter ulp, against spacings of 2^-3 relative at worst). The
//!   check allows an eighth of the written key codes to be adjacent, twice
//!   the worst case: a wrong rounding mode (truncation makes about half of
//!   them adjacent) fails it; so does any code two or more steps away (a
//!   wrong scale, position, head or slot).

use pagoda_backend::fp8::{e4m3_from_f32, e4m3_ordinal};
use pagoda_backend::{Backend, DType, HostSlice, RotaryCacheArgs, Tensor};

use super::mismatches;
use crate::conformance::grid::RotaryCase;
use crate::conformance::{cpu, dev, fp8_codes_of, CheckResult, CpuTensor, Harness};

/// The share of written key codes that may be one step apart (see the module docs).
const MAX_ADJACENT_KEY_CODES: f64 = 1.0 / 8.0;

/// Llama's `inv_freq[i] = theta^(-2i / rotary_dim)`, as the `[positions, rotary_dim]` cos|sin table.
pub(crate) fn cos_sin_table(max_positions: usize, rotary_dim: usize, theta: f64) -> Vec<f32> {
    let half = rotary_dim / 2;
    let mut table = Vec::with_capacity(max_positions * rotary_dim);
    for p in 0..max_positions {
        let angles: Vec<f64> =
            (0..half).map(|i| p as f64 * theta.powf(-2.0 * i as f64 / rotary_dim as f64)).collect();
        table.extend(angles.iter().map(|a| a.cos() as f32));
        table.extend(angles.iter().map(|a| a.sin() as f32));
    }
    table
}

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>, cases: &[RotaryCase]) {
    for c in cases {
        let label = c.label();
        h.case("rotary_and_cache", &label, |h, rng| {
            let (t, hq, hkv, d) = (c.tokens, c.num_q_heads, c.num_kv_heads, c.head_dim);
            let width = (hq + 2 * hkv) * d;
            let (_, qkv_r, qkv_d) = h.random_rows(rng, t, width, 1.0, 0)?;
            let positions: Vec<i32> = (0..t).map(|_| rng.below(c.max_positions) as i32).collect();
            let (pos_r, pos_d) = h.ints(&positions, &[t])?;
            let table = cos_sin_table(c.max_positions, c.rotary_dim, 10_000.0);
            let dims = [c.max_positions, c.rotary_dim];
            let cs_r = cpu(h.cpu.upload(HostSlice::F32(&table), &dims, DType::F32))?;
            let cs_d = dev(h.device.upload(HostSlice::F32(&table), &dims, DType::F32))?;
            // Distinct random slots; some tokens skipped with -1.
            let num_slots = c.num_blocks * c.block_size;
            if num_slots < t {
                return Err(format!("grid case: {num_slots} cache slots for {t} tokens"));
            }
            let order = rng.permutation(num_slots);
            let slots: Vec<i64> = (0..t)
                .map(|i| {
                    if c.skip_every > 0 && i % c.skip_every == c.skip_every - 1 {
                        -1
                    } else {
                        order[i] as i64
                    }
                })
                .collect();
            let slot_r = cpu(h.cpu.upload(HostSlice::I64(&slots), &[t], DType::I64))?;
            let slot_d = dev(h.device.upload(HostSlice::I64(&slots), &[t], DType::I64))?;
            // Caches start with random contents (identical on both sides).
            let cache_dims = [c.num_blocks, hkv, c.block_size, d];
            let cache_len = num_slots * hkv * d;
            let k0 = rng.normals(cache_len, 1.0, h.dtype);
            let v0 = rng.normals(cache_len, 1.0, h.dtype);
            let ((k_r, k_d), (v_r, v_d)) = match c.fp8 {
                None => (h.floats(&k0, &cache_dims)?, h.floats(&v0, &cache_dims)?),
                Some(scales) => {
                    let (ks, vs) = scales.values();
                    let codes =
                        |x: &[f32], s: f32| x.iter().map(|&x| e4m3_from_f32(x / s)).collect::<Vec<u8>>();
                    (h.fp8_codes(&codes(&k0, ks), &cache_dims)?, h.fp8_codes(&codes(&v0, vs), &cache_dims)?)
                }
            };
            let scales = c.fp8.map(|s| h.fp8_scales(s)).transpose()?.flatten();
            let (q_r, q_d) = h.outputs(t, hq * d, h.dtype, 0)?;

            let args_r = RotaryCacheArgs {
                qkv: &qkv_r,
                positions: &pos_r,
                cos_sin: &cs_r,
                q_out: &q_r,
                k_cache: &k_r,
                v_cache: &v_r,
                kv_scales: scales.as_ref().map(|s| &s.0),
                slot_mapping: &slot_r,
                num_q_heads: hq,
                num_kv_heads: hkv,
                head_dim: d,
                rotary_dim: c.rotary_dim,
                style: c.style,
            };
            cpu(h.cpu.rotary_and_cache(&args_r))?;
            let args_d = RotaryCacheArgs {
                qkv: &qkv_d,
                positions: &pos_d,
                cos_sin: &cs_d,
                q_out: &q_d.view,
                k_cache: &k_d,
                v_cache: &v_d,
                kv_scales: scales.as_ref().map(|s| &s.1),
                slot_mapping: &slot_d,
                num_q_heads: hq,
                num_kv_heads: hkv,
                head_dim: d,
                rotary_dim: c.rotary_dim,
                style: c.style,
            };
            dev(h.device.rotary_and_cache(&args_d))?;

            let mut rows = h.compare_out("rotary_and_cache/q_out", &label, &q_r, &q_d, h.tol.elementwise)?;
            let mut written = vec![false; num_slots];
            for &s in slots.iter().filter(|&&s| s >= 0) {
                written[s as usize] = true;
            }
            if c.fp8.is_some() {
                let caches = [("k_cache", &k_r, &k_d), ("v_cache", &v_r, &v_d)];
                rows.extend(compare_fp8_caches(h, c, &label, &written, caches)?);
                return Ok(rows);
            }
            for (name, initial, r, dt) in [("k_cache", &k0, &k_r, &k_d), ("v_cache", &v0, &v_r, &v_d)] {
                let want = cpu(h.cpu.download_f32(r))?;
                let got = dev(h.device.download_f32(dt))?;
                // Only the written slots, one row per (slot, head).
                let pick = |all: &[f32]| -> Vec<f32> {
                    let mut v = Vec::new();
                    for (block, head, off) in cache_rows(c.num_blocks, hkv, c.block_size) {
                        if written[block * c.block_size + off] {
                            let at = ((block * hkv + head) * c.block_size + off) * d;
                            v.extend_from_slice(&all[at..at + d]);
                        }
                    }
                    v
                };
                let (want_w, got_w) = (pick(&want), pick(&got));
                rows.push(h.compare(
                    &format!("rotary_and_cache/{name}"),
                    &label,
                    &want_w,
                    &got_w,
                    d,
                    h.tol.elementwise,
                )?);
                // Every slot not in the mapping must be bit-identical to its start.
                let keep = |all: &[f32]| -> Vec<f32> {
                    let mut v = Vec::new();
                    for (block, head, off) in cache_rows(c.num_blocks, hkv, c.block_size) {
                        if !written[block * c.block_size + off] {
                            let at = ((block * hkv + head) * c.block_size + off) * d;
                            v.extend_from_slice(&all[at..at + d]);
                        }
                    }
                    v
                };
                let changed = mismatches(&keep(initial), &keep(&got));
                rows.push(h.exact_count(
                    &format!("rotary_and_cache/{name} untouched"),
                    &label,
                    changed,
                    "elements changed",
                ));
            }
            Ok(rows)
        });
    }
}

/// The F8E4M3 caches after the op: written key codes equal or adjacent (at
/// most [`MAX_ADJACENT_KEY_CODES`] of them adjacent), written value codes
/// equal, every other code as it was (the module docs derive the bounds).
#[allow(clippy::type_complexity)]
fn compare_fp8_caches<B: Backend>(
    h: &Harness<'_, B>,
    c: &RotaryCase,
    label: &str,
    written: &[bool],
    caches: [(&str, &CpuTensor, &Tensor<B>); 2],
) -> Result<Vec<CheckResult>, String> {
    let d = c.head_dim;
    let mut rows = Vec::new();
    for (name, r, dt) in caches {
        let want = cpu(fp8_codes_of(&h.cpu, r))?;
        let got = dev(fp8_codes_of(h.device, dt))?;
        if want.len() != got.len() {
            return Err(format!("{name}: device has {} codes, reference {}", got.len(), want.len()));
        }
        let (mut compared, mut adjacent, mut far, mut untouched_changed) = (0usize, 0usize, 0usize, 0usize);
        let mut worst = 0i32;
        for (block, head, off) in cache_rows(c.num_blocks, c.num_kv_heads, c.block_size) {
            let at = ((block * c.num_kv_heads + head) * c.block_size + off) * d;
            let (w, g) = (&want[at..at + d], &got[at..at + d]);
            if !written[block * c.block_size + off] {
                untouched_changed += w.iter().zip(g).filter(|(a, b)| a != b).count();
                continue;
            }
            for (&a, &b) in w.iter().zip(g) {
                compared += 1;
                // NaN codes (never written from finite inputs) count as far.
                let nan = |x: u8| x & 0x7F == 0x7F;
                let steps =
                    if nan(a) || nan(b) { i32::MAX } else { (e4m3_ordinal(a) - e4m3_ordinal(b)).abs() };
                worst = worst.max(steps);
                match steps {
                    0 => {}
                    1 => adjacent += 1,
                    _ => far += 1,
                }
            }
        }
        let is_k = name == "k_cache";
        let adjacent_share = adjacent as f64 / compared.max(1) as f64;
        let (passed, tolerance) = if is_k {
            (far == 0 && adjacent_share <= MAX_ADJACENT_KEY_CODES, MAX_ADJACENT_KEY_CODES)
        } else {
            (far == 0 && adjacent == 0, 0.0)
        };
        let note = if passed && adjacent == 0 {
            String::new()
        } else {
            format!(
                "{adjacent} of {compared} codes one step apart, {far} further (worst {})",
                if worst == i32::MAX { "NaN".to_string() } else { worst.to_string() }
            )
        };
        rows.push(CheckResult {
            op: format!("rotary_and_cache/{name} fp8"),
            case: label.to_string(),
            rel_err: if far > 0 { f64::INFINITY } else { adjacent_share },
            max_row_err: worst as f64,
            tolerance,
            passed,
            note,
        });
        rows.push(h.exact_count(
            &format!("rotary_and_cache/{name} untouched"),
            label,
            untouched_changed,
            "codes changed",
        ));
    }
    Ok(rows)
}

/// `(block, head, offset)` of every cache row, in memory order.
fn cache_rows(blocks: usize, heads: usize, block_size: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..blocks).flat_map(move |b| (0..heads).flat_map(move |h| (0..block_size).map(move |o| (b, h, o))))
}
