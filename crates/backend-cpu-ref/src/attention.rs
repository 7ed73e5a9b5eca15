//! Causal attention over the paged KV cache, one (query token, head) row at a
//! time: scores `q·k · scale` over the row's visible positions, read through
//! the sequence's block table; softmax with the maximum subtracted and an f64
//! sum; `out = Σ p_j v_j`.
//!
//! The metadata is read from its device tensors (as a device kernel would),
//! not from the host copy, so a step whose uploaded tensors disagree with the
//! host description fails here as it would on a GPU.
//!
//! F8E4M3 caches hold E4M3 values; a key is read as `code value * k_scale`
//! and a value as `code value * v_scale` (one f32 product each), before the
//! same arithmetic as an F32 cache.

use pagoda_backend::{AttentionArgs, BackendError, DType, Result};

use crate::rotary::kv_scales;
use crate::simd::{axpy, dot, Isa};
use crate::storage::with_operands;
use crate::CpuBackend;
use rayon::prelude::*;

const OP: &str = "attention";

/// Where one query row looks: its sequence and the key positions it sees.
#[derive(Clone, Copy, Debug)]
struct QueryRow {
    seq: usize,
    /// Visible key positions `first..=last`.
    first: usize,
    last: usize,
}

/// The paged cache as attention sees it.
#[derive(Clone, Copy, Debug)]
struct Paging {
    block_size: usize,
    num_blocks: usize,
    /// Entries per block table row.
    max_blocks: usize,
}

/// Checks the metadata and returns, for every query token, what it attends to.
fn plan_rows(
    query_start_loc: &[i32],
    seq_lens: &[i32],
    block_tables: &[i32],
    paging: Paging,
    num_tokens: usize,
    sliding_window: Option<usize>,
) -> Result<Vec<QueryRow>> {
    let Paging { block_size, num_blocks, max_blocks } = paging;
    let index = |detail: String| BackendError::Index { op: OP, detail };
    if query_start_loc.first() != Some(&0) || query_start_loc.last().copied() != Some(num_tokens as i32) {
        return Err(BackendError::shape(OP, format!("query_start_loc must run from 0 to {num_tokens}")));
    }
    let mut rows = Vec::with_capacity(num_tokens);
    for (seq, &seq_len) in seq_lens.iter().enumerate() {
        let (start, end) = (query_start_loc[seq], query_start_loc[seq + 1]);
        if end < start {
            return Err(BackendError::shape(OP, format!("query_start_loc decreases at sequence {seq}")));
        }
        let q_len = (end - start) as usize;
        if seq_len < 0 || (seq_len as usize) < q_len {
            return Err(BackendError::shape(
                OP,
                format!("sequence {seq}: seq_len {seq_len} < {q_len} queries"),
            ));
        }
        let seq_len = seq_len as usize;
        if seq_len > max_blocks * block_size {
            return Err(index(format!(
                "sequence {seq}: seq_len {seq_len} exceeds {max_blocks} blocks of {block_size}"
            )));
        }
        let table = &block_tables[seq * max_blocks..(seq + 1) * max_blocks];
        if let Some((i, &b)) = table[..seq_len.div_ceil(block_size)]
            .iter()
            .enumerate()
            .find(|&(_, &b)| b < 0 || b as usize >= num_blocks)
        {
            return Err(index(format!(
                "sequence {seq}: block table entry {i} is {b} of {num_blocks} blocks"
            )));
        }
        for i in 0..q_len {
            let last = seq_len - q_len + i;
            let first = sliding_window.map_or(0, |w| (last + 1).saturating_sub(w));
            rows.push(QueryRow { seq, first, last });
        }
    }
    Ok(rows)
}

/// Where key and value rows sit in a `[num_blocks, Hkv, block_size, D]` cache.
#[derive(Clone, Copy, Debug)]
struct CacheLayout {
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl CacheLayout {
    /// Calls `f(offset)` with the element offset of the K (or V) row of
    /// `kv_head` for every position the query row sees, in position order,
    /// walking the block table one block at a time.
    fn for_each_key(&self, table: &[i32], kv_head: usize, row: QueryRow, mut f: impl FnMut(usize)) {
        let (bs, d) = (self.block_size, self.head_dim);
        let mut p = row.first;
        while p <= row.last {
            let logical = p / bs;
            let end = ((logical + 1) * bs).min(row.last + 1);
            let block = table[logical] as usize;
            let base = (block * self.num_kv_heads + kv_head) * bs;
            for pos in p..end {
                f((base + pos % bs) * d);
            }
            p = end;
        }
    }
}

/// Everything one (query token, q head) row needs, shared by all rows.
struct RowKernel<'a> {
    qs: &'a [f32],
    ks: &'a [f32],
    vs: &'a [f32],
    tables: &'a [i32],
    rows: &'a [QueryRow],
    layout: CacheLayout,
    max_blocks: usize,
    num_q_heads: usize,
    /// Query heads per KV head.
    group: usize,
    scale: f32,
    /// The caches' dequantisation scales: both 1.0 for an F32 cache, whose
    /// rows are used as they are.
    kv_scales: Option<(f32, f32)>,
}

impl RowKernel<'_> {
    /// Output row `row_index` (token `row_index / Hq`, head `row_index % Hq`);
    /// `scores` is scratch reused across rows.
    #[inline(always)]
    fn attend<const FMA: bool>(&self, row_index: usize, scores: &mut Vec<f32>, out_row: &mut [f32]) {
        let d = self.layout.head_dim;
        let (t, h) = (row_index / self.num_q_heads, row_index % self.num_q_heads);
        let row = self.rows[t];
        let table = &self.tables[row.seq * self.max_blocks..(row.seq + 1) * self.max_blocks];
        let q_row = &self.qs[row_index * d..(row_index + 1) * d];
        let kv_head = h / self.group;
        scores.clear();
        match self.kv_scales {
            None => self.layout.for_each_key(table, kv_head, row, |at| {
                scores.push(dot::<FMA>(q_row, &self.ks[at..at + d]) * self.scale)
            }),
            Some((k_scale, _)) => {
                let mut key = vec![0.0f32; d];
                self.layout.for_each_key(table, kv_head, row, |at| {
                    dequantize(&self.ks[at..at + d], k_scale, &mut key);
                    scores.push(dot::<FMA>(q_row, &key) * self.scale)
                })
            }
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s as f64;
        }
        out_row.fill(0.0);
        let mut weights = scores.iter();
        match self.kv_scales {
            None => self.layout.for_each_key(table, kv_head, row, |at| {
                axpy::<FMA>(out_row, weights.next().copied().unwrap_or(0.0), &self.vs[at..at + d]);
            }),
            Some((_, v_scale)) => {
                let mut value = vec![0.0f32; d];
                self.layout.for_each_key(table, kv_head, row, |at| {
                    dequantize(&self.vs[at..at + d], v_scale, &mut value);
                    axpy::<FMA>(out_row, weights.next().copied().unwrap_or(0.0), &value);
                })
            }
        }
        let inv_sum = (1.0 / sum) as f32;
        out_row.iter_mut().for_each(|o| *o *= inv_sum);
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2_fma(&self, row_index: usize, scores: &mut Vec<f32>, out_row: &mut [f32]) {
        self.attend::<true>(row_index, scores, out_row)
    }
}

/// `out = codes * scale`: one cache row of E4M3 values, dequantised.
fn dequantize(codes: &[f32], scale: f32, out: &mut [f32]) {
    out.iter_mut().zip(codes).for_each(|(o, &c)| *o = c * scale);
}

pub(crate) fn attention(args: &AttentionArgs<'_, CpuBackend>) -> Result<()> {
    let cache = args.check()?;
    let AttentionArgs { q, k_cache, v_cache, out, meta, kv_scales: scales, .. } = *args;
    let fp8 = k_cache.dtype() == DType::F8E4M3;
    let (hq, hkv, d) = (args.num_q_heads, args.num_kv_heads, args.head_dim);
    let (tokens, block_size, num_blocks) = (meta.host.num_tokens(), cache.block_size, cache.num_blocks);
    let max_blocks = meta.host.max_blocks_per_seq;
    let group = hq / hkv;

    let mut inputs = vec![q, k_cache, v_cache, &meta.query_start_loc, &meta.seq_lens, &meta.block_tables];
    inputs.extend(scales);
    with_operands(OP, &inputs, &[out], |ins, outs| {
        let (qs, ks, vs) = (ins.f32(q)?, ins.cache_values(k_cache)?, ins.cache_values(v_cache)?);
        let kv_scales = if fp8 { Some(kv_scales(OP, ins, scales)?) } else { None };
        let tables = ins.i32(&meta.block_tables)?;
        let rows = plan_rows(
            ins.i32(&meta.query_start_loc)?,
            ins.i32(&meta.seq_lens)?,
            tables,
            Paging { block_size, num_blocks, max_blocks },
            tokens,
            args.sliding_window,
        )?;
        let kernel = RowKernel {
            qs,
            ks,
            vs,
            tables,
            rows: &rows,
            layout: CacheLayout { block_size, num_kv_heads: hkv, head_dim: d },
            max_blocks,
            num_q_heads: hq,
            group,
            scale: args.scale,
            kv_scales,
        };
        let isa = Isa::detect();
        outs[0].par_chunks_mut(d).enumerate().for_each_init(
            Vec::new,
            |scores, (row_index, out_row)| match isa {
                // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { kernel.attend_avx2_fma(row_index, scores, out_row) },
                _ => kernel.attend::<false>(row_index, scores, out_row),
            },
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use pagoda_backend::fp8::{e4m3_from_f32, e4m3_to_f32};
    use pagoda_backend::{AttentionHostMetadata, AttentionMetadata, Backend, HostSlice, Tensor};
    use proptest::prelude::*;

    use super::*;

    /// A small deterministic generator, so the tests need no RNG crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn below(&mut self, n: usize) -> usize {
            ((self.next() + 1.0) * 0.5 * n as f32) as usize % n.max(1)
        }
    }

    /// One sequence's dense K and V, `[seq_len, Hkv, D]`, and its query count.
    struct DenseSeq {
        k: Vec<f32>,
        v: Vec<f32>,
        seq_len: usize,
        q_len: usize,
    }

    /// Dense causal attention in f64, straight from the definition.
    #[allow(clippy::too_many_arguments)]
    fn dense_attention(
        q: &[f32],
        seqs: &[DenseSeq],
        hq: usize,
        hkv: usize,
        d: usize,
        scale: f32,
        window: Option<usize>,
    ) -> Vec<f64> {
        let mut out = Vec::new();
        let mut t = 0;
        for s in seqs {
            for i in 0..s.q_len {
                let pos = s.seq_len - s.q_len + i;
                for h in 0..hq {
                    let kh = h * hkv / hq;
                    let qr = &q[(t * hq + h) * d..][..d];
                    let visible: Vec<usize> =
                        (0..=pos).filter(|&p| window.is_none_or(|w| pos - p < w)).collect();
                    let scores: Vec<f64> = visible
                        .iter()
                        .map(|&p| {
                            let kr = &s.k[(p * hkv + kh) * d..][..d];
                            qr.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = w.iter().sum();
                    for e in 0..d {
                        out.push(
                            visible
                                .iter()
                                .zip(&w)
                                .map(|(&p, wi)| wi * s.v[(p * hkv + kh) * d + e] as f64)
                                .sum::<f64>()
                                / total,
                        );
                    }
                }
                t += 1;
            }
        }
        out
    }

    struct Paged {
        cpu: CpuBackend,
        q: Tensor<CpuBackend>,
        k_cache: Tensor<CpuBackend>,
        v_cache: Tensor<CpuBackend>,
        out: Tensor<CpuBackend>,
        meta: AttentionMetadata<CpuBackend>,
    }

    /// Scatters dense K/V into a NaN-poisoned cache through shuffled block tables.
    fn scatter(
        seqs: &[DenseSeq],
        q: &[f32],
        hq: usize,
        hkv: usize,
        d: usize,
        block_size: usize,
        rng: &mut Lcg,
    ) -> Paged {
        let cpu = CpuBackend::new();
        let blocks_per_seq: Vec<usize> = seqs.iter().map(|s| s.seq_len.div_ceil(block_size)).collect();
        let max_blocks = blocks_per_seq.iter().copied().max().unwrap_or(0).max(1);
        let num_blocks = blocks_per_seq.iter().sum::<usize>() + 3; // spare blocks stay poisoned
        let mut ids: Vec<usize> = (0..num_blocks).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let mut next = ids.into_iter();
        let block_numel = hkv * block_size * d;
        let mut kc = vec![f32::NAN; num_blocks * block_numel];
        let mut vc = kc.clone();
        let mut tables = vec![0i32; seqs.len() * max_blocks];
        let mut qsl = vec![0i32];
        for (si, s) in seqs.iter().enumerate() {
            for b in 0..blocks_per_seq[si] {
                let phys = next.next().unwrap();
                tables[si * max_blocks + b] = phys as i32;
                for p in b * block_size..((b + 1) * block_size).min(s.seq_len) {
                    for h in 0..hkv {
                        let at = ((phys * hkv + h) * block_size + p % block_size) * d;
                        kc[at..at + d].copy_from_slice(&s.k[(p * hkv + h) * d..][..d]);
                        vc[at..at + d].copy_from_slice(&s.v[(p * hkv + h) * d..][..d]);
                    }
                }
            }
            qsl.push(qsl[si] + s.q_len as i32);
        }
        let tokens = *qsl.last().unwrap() as usize;
        let host = AttentionHostMetadata {
            query_start_loc: qsl,
            seq_lens: seqs.iter().map(|s| s.seq_len as i32).collect(),
            block_tables: tables,
            max_blocks_per_seq: max_blocks,
            slot_mapping: vec![-1; tokens],
            num_decode_seqs: seqs.iter().take_while(|s| s.q_len == 1).count(),
        };
        let dims = [num_blocks, hkv, block_size, d];
        Paged {
            q: cpu.upload(HostSlice::F32(q), &[tokens, hq, d], DType::F32).unwrap(),
            k_cache: cpu.upload(HostSlice::F32(&kc), &dims, DType::F32).unwrap(),
            v_cache: cpu.upload(HostSlice::F32(&vc), &dims, DType::F32).unwrap(),
            out: cpu.alloc(&[tokens, hq, d], DType::F32).unwrap(),
            meta: AttentionMetadata::upload(&cpu, host).unwrap(),
            cpu,
        }
    }

    fn run(p: &Paged, hq: usize, hkv: usize, d: usize, window: Option<usize>) -> Result<Vec<f32>> {
        p.cpu.attention(&AttentionArgs {
            q: &p.q,
            k_cache: &p.k_cache,
            v_cache: &p.v_cache,
            kv_scales: None,
            out: &p.out,
            meta: &p.meta,
            num_q_heads: hq,
            num_kv_heads: hkv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            sliding_window: window,
        })?;
        p.cpu.download_f32(&p.out)
    }

    #[test]
    fn one_key_returns_its_value_and_two_keys_mix_by_softmax() {
        // q = [1, 0]; keys [0, 0] and [2, 0]; scale 1: weights e^0, e^2.
        let seqs =
            [DenseSeq { k: vec![0.0, 0.0, 2.0, 0.0], v: vec![1.0, 0.0, 0.0, 1.0], seq_len: 2, q_len: 2 }];
        let p = scatter(&seqs, &[1.0, 0.0, 1.0, 0.0], 1, 1, 2, 16, &mut Lcg(1));
        let out = p.cpu.attention(&AttentionArgs {
            q: &p.q,
            k_cache: &p.k_cache,
            v_cache: &p.v_cache,
            kv_scales: None,
            out: &p.out,
            meta: &p.meta,
            num_q_heads: 1,
            num_kv_heads: 1,
            head_dim: 2,
            scale: 1.0,
            sliding_window: None,
        });
        out.unwrap();
        let got = p.cpu.download_f32(&p.out).unwrap();
        let e2 = 2f32.exp();
        let want = [1.0, 0.0, 1.0 / (1.0 + e2), e2 / (1.0 + e2)];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    /// Several sequences (decodes first, then prefills with and without a
    /// cached prefix), GQA, unaligned lengths and optional sliding windows.
    fn check_against_dense(
        lens: &[(usize, usize)],
        hq: usize,
        hkv: usize,
        d: usize,
        bs: usize,
        window: Option<usize>,
        seed: u64,
    ) {
        let mut rng = Lcg(seed);
        let seqs: Vec<DenseSeq> = lens
            .iter()
            .map(|&(seq_len, q_len)| DenseSeq {
                k: (0..seq_len * hkv * d).map(|_| rng.next() * 2.0).collect(),
                v: (0..seq_len * hkv * d).map(|_| rng.next()).collect(),
                seq_len,
                q_len,
            })
            .collect();
        let tokens: usize = lens.iter().map(|l| l.1).sum();
        let q: Vec<f32> = (0..tokens * hq * d).map(|_| rng.next() * 2.0).collect();
        let paged = scatter(&seqs, &q, hq, hkv, d, bs, &mut rng);
        let got = run(&paged, hq, hkv, d, window).unwrap();
        let want = dense_attention(&q, &seqs, hq, hkv, d, 1.0 / (d as f32).sqrt(), window);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 1e-5, "element {i}: {g} vs {w} ({lens:?}, window {window:?})");
        }
    }

    #[test]
    fn paged_matches_dense_for_a_mixed_batch() {
        // Two decodes, a prefill with a cached prefix (chunked prefill), a fresh prefill.
        let lens = [(37, 1), (1, 1), (50, 13), (17, 17)];
        check_against_dense(&lens, 6, 2, 8, 16, None, 3);
        check_against_dense(&lens, 4, 4, 16, 8, None, 4);
        check_against_dense(&lens, 8, 1, 8, 32, Some(5), 5);
    }

    #[test]
    fn fp8_caches_attend_like_their_dequantized_values() {
        let (hq, hkv, d, bs) = (4, 2, 8, 4);
        let (k_scale, v_scale) = (0.02f32, 0.37f32);
        let mut rng = Lcg(11);
        let lens = [(13usize, 1usize), (9, 4)];
        // Codes first; the dense reference sees their values times the scales.
        let mut seqs = Vec::new();
        let mut codes = Vec::new();
        for &(seq_len, q_len) in &lens {
            let n = seq_len * hkv * d;
            let k8: Vec<u8> = (0..n).map(|_| e4m3_from_f32(rng.next() * 3.0 / k_scale)).collect();
            let v8: Vec<u8> = (0..n).map(|_| e4m3_from_f32(rng.next() / v_scale)).collect();
            let k = k8.iter().map(|&c| e4m3_to_f32(c) * k_scale).collect();
            let v = v8.iter().map(|&c| e4m3_to_f32(c) * v_scale).collect();
            seqs.push(DenseSeq { k, v, seq_len, q_len });
            codes.push((k8, v8));
        }
        let q: Vec<f32> = (0..5 * hq * d).map(|_| rng.next()).collect();
        let paged = scatter(&seqs, &q, hq, hkv, d, bs, &mut rng);
        // The F32 caches hold the dequantized values (NaN where unused):
        // quantize them back, exactly, into F8E4M3 caches.
        let to_fp8 = |t: &Tensor<CpuBackend>, scale: f32| {
            let codes: Vec<u8> =
                paged.cpu.download_f32(t).unwrap().iter().map(|&x| e4m3_from_f32(x / scale)).collect();
            paged.cpu.upload(HostSlice::Bytes(&codes, DType::F8E4M3), t.dims(), DType::F8E4M3).unwrap()
        };
        let (k8, v8) = (to_fp8(&paged.k_cache, k_scale), to_fp8(&paged.v_cache, v_scale));
        let scales = paged.cpu.upload(HostSlice::F32(&[k_scale, v_scale]), &[2], DType::F32).unwrap();
        let args = AttentionArgs {
            q: &paged.q,
            k_cache: &k8,
            v_cache: &v8,
            kv_scales: Some(&scales),
            out: &paged.out,
            meta: &paged.meta,
            num_q_heads: hq,
            num_kv_heads: hkv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            sliding_window: None,
        };
        paged.cpu.attention(&args).unwrap();
        let got = paged.cpu.download_f32(&paged.out).unwrap();
        let want = dense_attention(&q, &seqs, hq, hkv, d, 1.0 / (d as f32).sqrt(), None);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 1e-5, "element {i}: {g} vs {w}");
        }
        // Without scales the codes are read at 1.0: a different result.
        paged.cpu.attention(&AttentionArgs { kv_scales: None, ..args }).unwrap();
        assert_ne!(paged.cpu.download_f32(&paged.out).unwrap(), got);
        // An F32 q over F8E4M3 caches is the CPU's FP8 path; F32 K with F8E4M3 V is refused.
        let mixed = paged.cpu.attention(&AttentionArgs { k_cache: &paged.k_cache, ..args });
        assert!(matches!(mixed, Err(BackendError::DType { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn paged_matches_dense(
            decodes in proptest::collection::vec(1usize..70, 0..3),
            prefills in proptest::collection::vec((1usize..40, 0usize..40), 0..3),
            (hkv, group) in (1usize..3, 1usize..4),
            d in prop_oneof![Just(4usize), Just(8), Just(20)],
            bs in prop_oneof![Just(1usize), Just(4), Just(16)],
            window in proptest::option::of(1usize..30),
            seed in 0u64..10_000,
        ) {
            let lens: Vec<(usize, usize)> = decodes.iter().map(|&l| (l, 1))
                .chain(prefills.iter().map(|&(q, prefix)| (q + prefix, q)))
                .collect();
            check_against_dense(&lens, hkv * group, hkv, d, bs, window, seed);
        }
    }

    #[test]
    fn bad_metadata_is_an_error() {
        let seqs = [DenseSeq { k: vec![0.5; 40], v: vec![0.5; 40], seq_len: 20, q_len: 1 }];
        let p = scatter(&seqs, &[0.1; 2], 1, 1, 2, 16, &mut Lcg(9));
        assert!(run(&p, 1, 1, 2, None).is_ok());
        // seq_len beyond the table's blocks.
        let meta = |seq_len: i32, table: Vec<i32>| {
            let host = AttentionHostMetadata {
                query_start_loc: vec![0, 1],
                seq_lens: vec![seq_len],
                block_tables: table.clone(),
                max_blocks_per_seq: table.len(),
                slot_mapping: vec![-1],
                num_decode_seqs: 1,
            };
            AttentionMetadata::upload(&p.cpu, host).unwrap()
        };
        let try_meta = |m: &AttentionMetadata<CpuBackend>| {
            p.cpu.attention(&AttentionArgs {
                q: &p.q,
                k_cache: &p.k_cache,
                v_cache: &p.v_cache,
                kv_scales: None,
                out: &p.out,
                meta: m,
                num_q_heads: 1,
                num_kv_heads: 1,
                head_dim: 2,
                scale: 1.0,
                sliding_window: None,
            })
        };
        assert!(matches!(try_meta(&meta(33, vec![0, 1])), Err(BackendError::Index { .. })));
        let num_blocks = p.k_cache.dim(0) as i32;
        assert!(matches!(try_meta(&meta(20, vec![0, num_blocks])), Err(BackendError::Index { .. })));
        assert!(matches!(try_meta(&meta(20, vec![-1, 0])), Err(BackendError::Index { .. })));
        // Unused table entries are not read (entry 1 is garbage but seq_len fits in one block).
        assert!(try_meta(&meta(16, vec![0, -5])).is_ok());
        // Heads that do not divide, out aliasing q.
        assert!(matches!(run(&p, 1, 2, 2, None), Err(BackendError::Shape { .. })));
        let aliased = p.cpu.attention(&AttentionArgs {
            q: &p.q,
            k_cache: &p.k_cache,
            v_cache: &p.v_cache,
            kv_scales: None,
            out: &p.q,
            meta: &p.meta,
            num_q_heads: 1,
            num_kv_heads: 1,
            head_dim: 2,
            scale: 1.0,
            sliding_window: None,
        });
        assert!(matches!(aliased, Err(BackendError::Aliasing { .. })));
    }
}
