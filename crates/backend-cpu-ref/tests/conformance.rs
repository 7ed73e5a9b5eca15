//! The CPU reference backend against something independent of it: every op the conformance
//! suite judges other backends by, recomputed here with deliberately naive loops in f64,
//! straight from the `Backend` trait's documented formulas. (The suite compares a device
//! with `CpuBackend`; run on `CpuBackend` itself it compares the code with itself and can
//! only find zero. `harness_detects_faults.rs` tests the harness; this file tests the
//! reference the harness trusts.)
//!
//! Tolerance: the reference computes in f32 from the same f32 inputs. An elementwise op is
//! within a few f32 roundings (2^-24 = 6e-8 each); a sum of n terms in f32 is within about
//! sqrt(n) of them for random signs. Over these sizes (n up to 1024) that is below 2e-6
//! relative; we allow 1e-5 per row, as the suite's own F32 tolerance for elementwise ops.
//! A real mistake (a wrong position, pairing, head, mask, eps or scale) moves results by 1e-2
//! to 1. Copies must be exact.
#![allow(clippy::needless_range_loop)] // index loops, as the formulas read

use pagoda_backend::{
    AttentionArgs, AttentionHostMetadata, AttentionMetadata, Backend, DType, HostSlice, LinearFusion,
    RopeStyle, RotaryCacheArgs, SamplingParams, SamplingRow, Tensor,
};
use pagoda_backend_cpu_ref::CpuBackend;

const TOL: f64 = 1e-5;

/// A small deterministic generator (64-bit LCG, top bits): values in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.next() * scale) as f32).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (((self.next() + 1.0) / 2.0) * n as f64) as usize % n
    }
}

fn up(cpu: &CpuBackend, data: &[f32], dims: &[usize]) -> Tensor<CpuBackend> {
    cpu.upload(HostSlice::F32(data), dims, DType::F32).unwrap()
}

fn ints(cpu: &CpuBackend, data: &[i32]) -> Tensor<CpuBackend> {
    cpu.upload(HostSlice::I32(data), &[data.len()], DType::I32).unwrap()
}

fn zeros(cpu: &CpuBackend, dims: &[usize]) -> Tensor<CpuBackend> {
    let t = cpu.alloc(dims, DType::F32).unwrap();
    cpu.fill(&t, f32::NAN).unwrap();
    t
}

fn down(cpu: &CpuBackend, t: &Tensor<CpuBackend>) -> Vec<f32> {
    cpu.download_f32(t).unwrap()
}

/// Every row of `got` within `TOL` (relative L2) of `want`.
fn assert_rows_close(what: &str, want: &[f64], got: &[f32], row: usize) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    for (r, (w, g)) in want.chunks(row).zip(got.chunks(row)).enumerate() {
        let diff: f64 = w.iter().zip(g).map(|(a, &b)| (a - b as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = w.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!(
            g.iter().all(|x| x.is_finite()) && diff <= TOL * norm.max(1e-30),
            "{what}, row {r}: relative error {:e}",
            diff / norm
        );
    }
}

fn naive_rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    let h = w.len();
    let mut out = Vec::new();
    for row in x.chunks(h) {
        let mut ss = 0.0;
        for &v in row {
            ss += v as f64 * v as f64;
        }
        let r = 1.0 / (ss / h as f64 + eps as f64).sqrt();
        for i in 0..h {
            out.push(row[i] as f64 * r * w[i] as f64);
        }
    }
    out
}

fn naive_linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, k: usize) -> Vec<f64> {
    let n = w.len() / k;
    let mut out = Vec::new();
    for row in x.chunks(k) {
        for j in 0..n {
            let mut s = bias.map_or(0.0, |b| b[j] as f64);
            for i in 0..k {
                s += row[i] as f64 * w[j * k + i] as f64;
            }
            out.push(s);
        }
    }
    out
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn naive_silu_and_mul(x: &[f64], i: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for row in x.chunks(2 * i) {
        for j in 0..i {
            out.push(silu(row[j]) * row[i + j]);
        }
    }
    out
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

#[test]
fn rms_norm_and_add_rms_norm_match_naive_loops() {
    let cpu = CpuBackend::new();
    let mut g = Lcg(1);
    for (t, h) in [(1, 64), (5, 576), (3, 1000)] {
        let x = g.vec(t * h, 3.0);
        let w = g.vec(h, 1.0);
        let r = g.vec(t * h, 2.0);
        let eps = 1e-5;
        let out = zeros(&cpu, &[t, h]);
        cpu.rms_norm(&up(&cpu, &x, &[t, h]), &up(&cpu, &w, &[h]), eps, &out).unwrap();
        assert_rows_close("rms_norm", &naive_rms_norm(&x, &w, eps), &down(&cpu, &out), h);

        let residual = up(&cpu, &r, &[t, h]);
        let out = zeros(&cpu, &[t, h]);
        cpu.add_rms_norm(&up(&cpu, &x, &[t, h]), &residual, &up(&cpu, &w, &[h]), eps, &out).unwrap();
        let sum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
        let want_sum: Vec<f64> = x.iter().zip(&r).map(|(&a, &b)| a as f64 + b as f64).collect();
        assert_rows_close("add_rms_norm residual", &want_sum, &down(&cpu, &residual), h);
        assert_rows_close("add_rms_norm out", &naive_rms_norm(&sum, &w, eps), &down(&cpu, &out), h);
    }
}

#[test]
fn linear_and_its_fusions_match_naive_loops() {
    let cpu = CpuBackend::new();
    let mut g = Lcg(2);
    for (t, k, n) in [(1, 64, 96), (7, 576, 192), (3, 1024, 40)] {
        let x = g.vec(t * k, 1.0);
        let w = g.vec(n * k, 0.1);
        let b = g.vec(n, 1.0);
        let (xt, wt, bt) = (up(&cpu, &x, &[t, k]), up(&cpu, &w, &[n, k]), up(&cpu, &b, &[n]));
        let out = zeros(&cpu, &[t, n]);
        cpu.linear(&xt, &wt, Some(&bt), &out).unwrap();
        assert_rows_close("linear + bias", &naive_linear(&x, &w, Some(&b), k), &down(&cpu, &out), n);
        let out = zeros(&cpu, &[t, n]);
        cpu.linear(&xt, &wt, None, &out).unwrap();
        assert_rows_close("linear", &naive_linear(&x, &w, None, k), &down(&cpu, &out), n);

        // input norm folded in
        let nw = g.vec(k, 1.0);
        let normed: Vec<f32> = naive_rms_norm(&x, &nw, 1e-6).iter().map(|&v| v as f32).collect();
        let nwt = up(&cpu, &nw, &[k]);
        let out = zeros(&cpu, &[t, n]);
        let fusion = LinearFusion { input_norm: Some((&nwt, 1e-6)), silu_mul: false, accumulate: false };
        cpu.linear_fused(&xt, &wt, None, &out, &fusion).unwrap();
        let want = naive_linear(&normed, &w, None, k);
        assert_rows_close("linear_fused norm", &want, &down(&cpu, &out), n);

        // accumulate: out += x W^T
        let start = g.vec(t * n, 1.0);
        let out = up(&cpu, &start, &[t, n]);
        let fusion = LinearFusion { input_norm: None, silu_mul: false, accumulate: true };
        cpu.linear_fused(&xt, &wt, None, &out, &fusion).unwrap();
        let want: Vec<f64> =
            naive_linear(&x, &w, None, k).iter().zip(&start).map(|(p, &s)| p + s as f64).collect();
        assert_rows_close("linear_fused accumulate", &want, &down(&cpu, &out), n);

        // silu_mul: weight [gate; up], out [t, n/2]
        let out = zeros(&cpu, &[t, n / 2]);
        let fusion = LinearFusion { input_norm: Some((&nwt, 1e-6)), silu_mul: true, accumulate: false };
        cpu.linear_fused(&xt, &wt, None, &out, &fusion).unwrap();
        let want = naive_silu_and_mul(&naive_linear(&normed, &w, None, k), n / 2);
        assert_rows_close("linear_fused norm + silu_mul", &want, &down(&cpu, &out), n / 2);
    }
}

#[test]
fn silu_and_mul_embedding_and_gather_match_naive_loops() {
    let cpu = CpuBackend::new();
    let mut g = Lcg(3);
    let (t, i) = (4, 300);
    let x = g.vec(t * 2 * i, 6.0);
    let out = zeros(&cpu, &[t, i]);
    cpu.silu_and_mul(&up(&cpu, &x, &[t, 2 * i]), &out).unwrap();
    assert_rows_close("silu_and_mul", &naive_silu_and_mul(&f64s(&x), i), &down(&cpu, &out), i);

    let (v, h) = (50, 32);
    let table = g.vec(v * h, 1.0);
    let ids = [3, 0, 49, 3, 17];
    let out = zeros(&cpu, &[ids.len(), h]);
    cpu.embedding(&ints(&cpu, &ids), &up(&cpu, &table, &[v, h]), &out).unwrap();
    let want: Vec<f32> =
        ids.iter().flat_map(|&id| table[id as usize * h..(id as usize + 1) * h].to_vec()).collect();
    assert_eq!(down(&cpu, &out), want, "embedding copies rows exactly");

    let rows = [4, 1, 1, 0];
    let src = g.vec(5 * h, 1.0);
    let out = zeros(&cpu, &[rows.len(), h]);
    cpu.gather_rows(&up(&cpu, &src, &[5, h]), &ints(&cpu, &rows), &out).unwrap();
    let want: Vec<f32> =
        rows.iter().flat_map(|&r| src[r as usize * h..(r as usize + 1) * h].to_vec()).collect();
    assert_eq!(down(&cpu, &out), want, "gather_rows copies rows exactly");
}

/// `[positions, rotary_dim]`: cos of every pair's angle, then sin. Angles are arbitrary
/// here (any table must be applied as given).
fn cos_sin(g: &mut Lcg, positions: usize, rd: usize) -> (Vec<f32>, Vec<f64>) {
    let angles: Vec<f64> = (0..positions * rd / 2).map(|_| g.next() * 3.0).collect();
    let mut table = Vec::new();
    for p in 0..positions {
        let a = &angles[p * rd / 2..(p + 1) * rd / 2];
        table.extend(a.iter().map(|x| x.cos() as f32));
        table.extend(a.iter().map(|x| x.sin() as f32));
    }
    (table, angles)
}

/// One head's vector rotated as the trait documents: Neox pairs `i` with `i + rd/2`,
/// Interleaved `2i` with `2i + 1`; dimensions past `rd` are kept.
fn naive_rotate(x: &[f32], table: &[f32], rd: usize, style: RopeStyle) -> Vec<f64> {
    let mut out = f64s(x);
    for i in 0..rd / 2 {
        let (c, s) = (table[i] as f64, table[rd / 2 + i] as f64);
        let (a, b) = match style {
            RopeStyle::Neox => (i, i + rd / 2),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        out[a] = x[a] as f64 * c - x[b] as f64 * s;
        out[b] = x[b] as f64 * c + x[a] as f64 * s;
    }
    out
}

#[test]
fn rotary_and_cache_matches_naive_loops() {
    let cpu = CpuBackend::new();
    let mut g = Lcg(4);
    for (style, d, rd) in
        [(RopeStyle::Neox, 64, 64), (RopeStyle::Interleaved, 32, 32), (RopeStyle::Neox, 64, 32)]
    {
        let (t, hq, hkv, bs, blocks, maxpos) = (6, 4, 2, 4, 5, 40);
        let width = (hq + 2 * hkv) * d;
        let qkv = g.vec(t * width, 1.0);
        let positions: Vec<i32> = (0..t).map(|_| g.below(maxpos) as i32).collect();
        let (table, _) = cos_sin(&mut g, maxpos, rd);
        let slots: Vec<i64> = vec![0, 7, -1, 19, 4, 12];
        let cache_len = blocks * hkv * bs * d;
        let (k0, v0) = (g.vec(cache_len, 1.0), g.vec(cache_len, 1.0));
        let cache_dims = [blocks, hkv, bs, d];
        let (kc, vc) = (up(&cpu, &k0, &cache_dims), up(&cpu, &v0, &cache_dims));
        let q_out = zeros(&cpu, &[t, hq * d]);
        let table_t = up(&cpu, &table, &[maxpos, rd]);
        let slot_t = cpu.upload(HostSlice::I64(&slots), &[t], DType::I64).unwrap();
        cpu.rotary_and_cache(&RotaryCacheArgs {
            qkv: &up(&cpu, &qkv, &[t, width]),
            positions: &ints(&cpu, &positions),
            cos_sin: &table_t,
            q_out: &q_out,
            k_cache: &kc,
            v_cache: &vc,
            kv_scales: None,
            slot_mapping: &slot_t,
            num_q_heads: hq,
            num_kv_heads: hkv,
            head_dim: d,
            rotary_dim: rd,
            style,
        })
        .unwrap();
        let (mut want_q, mut want_k, mut want_v) = (Vec::new(), f64s(&k0), f64s(&v0));
        for tok in 0..t {
            let row = &qkv[tok * width..(tok + 1) * width];
            let p = positions[tok] as usize;
            let tab = &table[p * rd..(p + 1) * rd];
            for h in 0..hq {
                want_q.extend(naive_rotate(&row[h * d..(h + 1) * d], tab, rd, style));
            }
            if slots[tok] < 0 {
                continue;
            }
            let (block, off) = (slots[tok] as usize / bs, slots[tok] as usize % bs);
            for h in 0..hkv {
                let at = ((block * hkv + h) * bs + off) * d;
                let k = naive_rotate(&row[(hq + h) * d..(hq + h + 1) * d], tab, rd, style);
                want_k[at..at + d].copy_from_slice(&k);
                let v = &row[(hq + hkv + h) * d..(hq + hkv + h + 1) * d];
                want_v[at..at + d].copy_from_slice(&f64s(v));
            }
        }
        let what = format!("{style:?} d {d} rotary {rd}");
        assert_rows_close(&format!("{what}: q"), &want_q, &down(&cpu, &q_out), d);
        assert_rows_close(&format!("{what}: k cache"), &want_k, &down(&cpu, &kc), d);
        // v is copied, and untouched slots keep their contents: exact.
        let got_v: Vec<f64> = f64s(&down(&cpu, &vc));
        assert_eq!(got_v, want_v, "{what}: v cache");
    }
}

#[test]
fn paged_attention_matches_naive_loops() {
    let cpu = CpuBackend::new();
    let mut g = Lcg(5);
    let (hq, hkv, d, bs, blocks) = (4, 2, 32, 4, 16);
    // Two decodes first, then two prefills (one with a cached prefix); block tables scattered.
    let query_lens = [1usize, 1, 5, 3];
    let seq_lens = [9usize, 3, 5, 11];
    let max_blocks = 3;
    let tables: Vec<Vec<i32>> = vec![vec![7, 2, 12], vec![0, 0, 0], vec![3, 9, 0], vec![15, 1, 5]];
    for window in [None, Some(4)] {
        let t: usize = query_lens.iter().sum();
        let q = g.vec(t * hq * d, 1.0);
        let cache_len = blocks * hkv * bs * d;
        let (k, v) = (g.vec(cache_len, 1.0), g.vec(cache_len, 1.0));
        let cache_dims = [blocks, hkv, bs, d];
        let mut start = vec![0i32];
        for &l in &query_lens {
            start.push(start.last().unwrap() + l as i32);
        }
        let host = AttentionHostMetadata {
            query_start_loc: start.clone(),
            seq_lens: seq_lens.iter().map(|&l| l as i32).collect(),
            block_tables: tables.iter().flatten().copied().collect(),
            max_blocks_per_seq: max_blocks,
            slot_mapping: vec![-1; t],
            num_decode_seqs: 2,
        };
        let meta = AttentionMetadata::upload(&cpu, host).unwrap();
        let out = zeros(&cpu, &[t, hq * d]);
        let scale = 1.0 / (d as f32).sqrt();
        cpu.attention(&AttentionArgs {
            q: &up(&cpu, &q, &[t, hq * d]),
            k_cache: &up(&cpu, &k, &cache_dims),
            v_cache: &up(&cpu, &v, &cache_dims),
            kv_scales: None,
            out: &out,
            meta: &meta,
            num_q_heads: hq,
            num_kv_heads: hkv,
            head_dim: d,
            scale,
            sliding_window: window,
        })
        .unwrap();
        let mut want = Vec::new();
        for s in 0..query_lens.len() {
            let (ql, len) = (query_lens[s], seq_lens[s]);
            for i in 0..ql {
                let row = start[s] as usize + i;
                let pos = len - ql + i;
                let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                for h in 0..hq {
                    let kvh = h / (hq / hkv);
                    let qv = &q[(row * hq + h) * d..(row * hq + h + 1) * d];
                    let at = |j: usize| ((tables[s][j / bs] as usize * hkv + kvh) * bs + j % bs) * d;
                    let scores: Vec<f64> = (first..=pos)
                        .map(|j| {
                            (0..d).map(|x| qv[x] as f64 * k[at(j) + x] as f64).sum::<f64>() * scale as f64
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for x in 0..d {
                        want.push(
                            (first..=pos).zip(&e).map(|(j, p)| p / z * v[at(j) + x] as f64).sum::<f64>(),
                        );
                    }
                }
            }
        }
        assert_rows_close(&format!("attention, window {window:?}"), &want, &down(&cpu, &out), d);
    }
}

#[test]
fn greedy_sampling_and_logprobs_match_a_naive_log_softmax() {
    let cpu = CpuBackend::new();
    let mut g = Lcg(6);
    let (rows, vocab) = (3, 1000);
    let logits = g.vec(rows * vocab, 8.0);
    let params = SamplingParams { logprobs: Some(5), ..SamplingParams::greedy() };
    let sampling: Vec<SamplingRow<'_>> = (0..rows)
        .map(|_| SamplingRow {
            params: &params,
            seed: 0,
            step: 0,
            prompt_tokens: &[],
            output_tokens: &[],
            allowed_tokens: None,
        })
        .collect();
    let got = cpu.sample(&up(&cpu, &logits, &[rows, vocab]), &sampling).unwrap();
    for (r, s) in got.iter().enumerate() {
        let row: Vec<f64> = f64s(&logits[r * vocab..(r + 1) * vocab]);
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
        assert_eq!(s.token as usize, order[0], "row {r}: greedy takes the arg-max");
        assert!((s.logprob as f64 - (row[order[0]] - lse)).abs() < 1e-5, "row {r}: logprob");
        assert_eq!(s.top_logprobs.len(), 5);
        for (k, &(tok, lp)) in s.top_logprobs.iter().enumerate() {
            assert_eq!(tok as usize, order[k], "row {r}: top {k}");
            assert!((lp as f64 - (row[order[k]] - lse)).abs() < 1e-5, "row {r}: top {k} logprob");
        }
    }
}

#[test]
fn block_copies_and_swaps_match_naive_copies() {
    let cpu = CpuBackend::new();
    let mut g = Lcg(7);
    let (blocks, hkv, bs, d) = (6, 2, 4, 8);
    let per_block = hkv * bs * d;
    let dims = [blocks, hkv, bs, d];
    let (a0, b0) = (g.vec(blocks * per_block, 1.0), g.vec(blocks * per_block, 1.0));
    let (a, b) = (up(&cpu, &a0, &dims), up(&cpu, &b0, &dims));
    let pairs = [(1u32, 4u32), (4, 5), (0, 2)];
    cpu.copy_blocks(&[&a, &b], &pairs).unwrap();
    for (orig, t) in [(&a0, &a), (&b0, &b)] {
        let mut want = orig.clone();
        for &(src, dst) in &pairs {
            let block = want[src as usize * per_block..(src as usize + 1) * per_block].to_vec();
            want[dst as usize * per_block..(dst as usize + 1) * per_block].copy_from_slice(&block);
        }
        assert_eq!(down(&cpu, t), want, "copy_blocks, applied in order");
    }
    let mut pool = vec![0u8; 3 * per_block * 4];
    cpu.swap_out(&a, &mut pool, &[(5, 2), (0, 0)]).unwrap();
    let after = down(&cpu, &a);
    let host_block = |i: usize| -> Vec<f32> {
        pool[i * per_block * 4..(i + 1) * per_block * 4]
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    assert_eq!(host_block(2), after[5 * per_block..6 * per_block].to_vec(), "swap_out block 5 -> host 2");
    assert_eq!(host_block(0), after[..per_block].to_vec(), "swap_out block 0 -> host 0");
    cpu.swap_in(&pool, &b, &[(2, 3)]).unwrap();
    assert_eq!(
        down(&cpu, &b)[3 * per_block..4 * per_block].to_vec(),
        host_block(2),
        "swap_in host 2 -> block 3"
    );
}
