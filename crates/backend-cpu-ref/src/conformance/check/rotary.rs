//! rotary_and_cache: the rotated queries, the cache slots written, and every
//! other slot left exactly as it was.

use pagoda_backend::{Backend, DType, HostSlice, RotaryCacheArgs};

use super::mismatches;
use crate::conformance::grid::RotaryCase;
use crate::conformance::{cpu, dev, Harness};

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
            let (k_r, k_d) = h.floats(&k0, &cache_dims)?;
            let (v_r, v_d) = h.floats(&v0, &cache_dims)?;
            let (q_r, q_d) = h.outputs(t, hq * d, h.dtype, 0)?;

            let args_r = RotaryCacheArgs {
                qkv: &qkv_r,
                positions: &pos_r,
                cos_sin: &cs_r,
                q_out: &q_r,
                k_cache: &k_r,
                v_cache: &v_r,
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

/// `(block, head, offset)` of every cache row, in memory order.
fn cache_rows(blocks: usize, heads: usize, block_size: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..blocks).flat_map(move |b| (0..heads).flat_map(move |h| (0..block_size).map(move |o| (b, h, o))))
}
