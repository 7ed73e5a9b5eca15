//! attention over a paged cache: shuffled block tables, NaN in every slot no
//! query may read, decode-only / prefill-only / mixed batches, cached
//! prefixes, GQA, sliding windows and long contexts.
//!
//! FP8 cases give both backends the same E4M3 codes (random keys and values
//! of unit size, divided by the scales and rounded; the NaN code 0x7F in the
//! slots no query may read) and the same scales. Every code's value is exact
//! in bf16 and f16, so what is left is the arithmetic of the activation-dtype
//! case, judged by the same tolerance.

use pagoda_backend::fp8::e4m3_from_f32;
use pagoda_backend::{AttentionArgs, AttentionHostMetadata, AttentionMetadata, Backend};

use crate::conformance::grid::AttentionCase;
use crate::conformance::{cpu, dev, Harness};

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>, cases: &[AttentionCase]) {
    for c in cases {
        let label = c.label();
        h.case("attention", &label, |h, rng| {
            let (hkv, d, bs) = (c.num_kv_heads, c.head_dim, c.block_size);
            let hq = hkv * c.group;
            let blocks_per_seq: Vec<usize> = c.seqs.iter().map(|s| s.seq_len.div_ceil(bs)).collect();
            let max_blocks = blocks_per_seq.iter().copied().max().unwrap_or(0).max(1);
            let used_blocks: usize = blocks_per_seq.iter().sum();
            let num_blocks = used_blocks + 2 + used_blocks / 8; // spare blocks stay poisoned
            let physical = rng.permutation(num_blocks);

            // Block tables over shuffled physical blocks; unused entries 0.
            let mut tables = vec![0i32; c.seqs.len() * max_blocks];
            let mut readable = vec![false; num_blocks * bs]; // per (block, offset)
            let mut next = physical.iter();
            let mut query_start_loc = vec![0i32];
            let mut slot_mapping = Vec::new();
            for (s, seq) in c.seqs.iter().enumerate() {
                if seq.query_len > seq.seq_len || seq.seq_len == 0 {
                    return Err(format!("grid case: sequence {s} is {seq:?}"));
                }
                for b in 0..blocks_per_seq[s] {
                    let block = *next.next().ok_or("ran out of blocks")?;
                    tables[s * max_blocks + b] = block as i32;
                    for off in 0..bs.min(seq.seq_len - b * bs) {
                        readable[block * bs + off] = true;
                    }
                }
                for p in seq.seq_len - seq.query_len..seq.seq_len {
                    let block = tables[s * max_blocks + p / bs] as i64;
                    slot_mapping.push(block * bs as i64 + (p % bs) as i64);
                }
                query_start_loc.push(query_start_loc[s] + seq.query_len as i32);
            }
            let tokens = slot_mapping.len();
            let host = AttentionHostMetadata {
                query_start_loc,
                seq_lens: c.seqs.iter().map(|s| s.seq_len as i32).collect(),
                block_tables: tables,
                max_blocks_per_seq: max_blocks,
                slot_mapping,
                num_decode_seqs: c.seqs.iter().take_while(|s| s.query_len == 1).count(),
            };
            let meta_r = cpu(AttentionMetadata::upload(&h.cpu, host.clone()))?;
            let meta_d = dev(AttentionMetadata::upload(h.device, host))?;

            // Random K/V in the slots the sequences own, NaN everywhere else.
            let cache_dims = [num_blocks, hkv, bs, d];
            let mut caches = Vec::new();
            let fp8_scales = c.fp8.map(|s| s.values());
            for cache in 0..2 {
                let mut data = rng.normals(num_blocks * hkv * bs * d, 1.0, h.dtype);
                for (row, chunk) in data.chunks_mut(d).enumerate() {
                    let (block, off) = (row / (hkv * bs), row % bs);
                    if !readable[block * bs + off] {
                        chunk.fill(f32::NAN);
                    }
                }
                match fp8_scales {
                    None => caches.push(h.floats(&data, &cache_dims)?),
                    Some((ks, vs)) => {
                        let s = if cache == 0 { ks } else { vs };
                        let codes: Vec<u8> = data.iter().map(|&x| e4m3_from_f32(x / s)).collect();
                        caches.push(h.fp8_codes(&codes, &cache_dims)?);
                    }
                }
            }
            let [(k_r, k_d), (v_r, v_d)] = <[_; 2]>::try_from(caches).map_err(|_| "two caches")?;
            let scales = c.fp8.map(|s| h.fp8_scales(s)).transpose()?.flatten();

            let (_, q_r, q_d) = h.random_rows(rng, tokens, hq * d, 1.0, 0)?;
            let (out_r, out_d) = h.outputs(tokens, hq * d, h.dtype, 0)?;
            // Prefill batches use the [T, Hq, D] form of q and out, decode-only the flat one.
            let (q_r, out_r3, q_d, out_d3) = if host_has_prefill(c) {
                let dims = [tokens, hq, d];
                (
                    cpu(q_r.reshape(&dims))?,
                    cpu(out_r.reshape(&dims))?,
                    dev(q_d.reshape(&dims))?,
                    dev(out_d.view.reshape(&dims))?,
                )
            } else {
                (q_r, out_r.clone(), q_d, out_d.view.clone())
            };
            let scale = 1.0 / (d as f32).sqrt();
            cpu(h.cpu.attention(&AttentionArgs {
                q: &q_r,
                k_cache: &k_r,
                v_cache: &v_r,
                kv_scales: scales.as_ref().map(|s| &s.0),
                out: &out_r3,
                meta: &meta_r,
                num_q_heads: hq,
                num_kv_heads: hkv,
                head_dim: d,
                scale,
                sliding_window: c.sliding_window,
            }))?;
            dev(h.device.attention(&AttentionArgs {
                q: &q_d,
                k_cache: &k_d,
                v_cache: &v_d,
                kv_scales: scales.as_ref().map(|s| &s.1),
                out: &out_d3,
                meta: &meta_d,
                num_q_heads: hq,
                num_kv_heads: hkv,
                head_dim: d,
                scale,
                sliding_window: c.sliding_window,
            }))?;
            let want = cpu(h.cpu.download_f32(&out_r))?;
            let got = dev(h.device.download_f32(&out_d.whole))?;
            Ok(vec![h.compare("attention", &label, &want, &got, d, h.tol.accumulated)?])
        });
    }
}

fn host_has_prefill(c: &AttentionCase) -> bool {
    c.seqs.iter().any(|s| s.query_len > 1)
}
