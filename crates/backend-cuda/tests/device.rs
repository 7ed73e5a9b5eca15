//! GPU behaviour the conformance grid does not reach: index errors found on the
//! device, wide GQA groups (served by the prefill kernel), split-K decode over
//! a long context against the reference, seeded sampling over a large
//! vocabulary, and the timing helpers. Needs an NVIDIA GPU (CI compiles only).
use half::bf16;
use pagoda_backend::{
    AttentionArgs, AttentionHostMetadata, AttentionMetadata, Backend, BackendError, DType, HostSlice,
    SamplingParams, SamplingRow,
};
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_backend_cuda::CudaBackend;

fn gpu() -> CudaBackend {
    match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => panic!("these tests need a CUDA GPU: {e}"),
    }
}

/// A small xorshift generator: fresh inputs per test without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Values rounded to bf16 so both backends see identical inputs.
    fn bf16_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| bf16::from_f32(self.next()).to_f32()).collect()
    }
}

fn rel_err(want: &[f32], got: &[f32]) -> f64 {
    assert_eq!(want.len(), got.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&w, &g) in want.iter().zip(got) {
        assert!(g.is_finite(), "non-finite device output");
        num += (w as f64 - g as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn out_of_range_token_id_is_reported_at_the_next_wait() {
    let g = gpu();
    let table = g.upload(HostSlice::F32(&[1.0; 4 * 8]), &[4, 8], DType::BF16).unwrap();
    let ids = g.upload(HostSlice::I32(&[0, 4]), &[2], DType::I32).unwrap();
    let out = g.alloc(&[2, 8], DType::BF16).unwrap();
    g.embedding(&ids, &table, &out).unwrap();
    assert!(matches!(g.synchronize(), Err(BackendError::Index { .. })));
    // The word is cleared once reported.
    g.synchronize().unwrap();
}

/// Paged attention of one configuration on both backends, with shuffled block tables.
fn attention_case(hq: usize, hkv: usize, d: usize, bs: usize, seqs: &[(usize, usize)], seed: u64) -> f64 {
    let g = gpu();
    let cpu = CpuBackend::new();
    let mut rng = Rng(seed);
    let blocks_per_seq: Vec<usize> = seqs.iter().map(|&(len, _)| len.div_ceil(bs)).collect();
    let max_blocks = *blocks_per_seq.iter().max().unwrap();
    let num_blocks: usize = blocks_per_seq.iter().sum::<usize>() + 3;
    // A shuffled assignment of physical blocks.
    let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
    for i in (1..perm.len()).rev() {
        let j = ((rng.next() + 1.0) * 0.5 * i as f32) as usize % (i + 1);
        perm.swap(i, j);
    }
    let mut tables = vec![0i32; seqs.len() * max_blocks];
    let mut next = 0;
    for (s, &n) in blocks_per_seq.iter().enumerate() {
        for b in 0..n {
            tables[s * max_blocks + b] = perm[next];
            next += 1;
        }
    }
    let mut qsl = vec![0i32];
    for &(_, q) in seqs {
        qsl.push(qsl.last().unwrap() + q as i32);
    }
    let t = *qsl.last().unwrap() as usize;
    let host = AttentionHostMetadata {
        query_start_loc: qsl,
        seq_lens: seqs.iter().map(|&(l, _)| l as i32).collect(),
        block_tables: tables,
        max_blocks_per_seq: max_blocks,
        slot_mapping: vec![-1; t],
        num_decode_seqs: seqs.iter().take_while(|&&(_, q)| q == 1).count(),
    };
    let cache_dims = [num_blocks, hkv, bs, d];
    let kd = rng.bf16_vec(num_blocks * hkv * bs * d);
    let vd = rng.bf16_vec(num_blocks * hkv * bs * d);
    let qd = rng.bf16_vec(t * hq * d);
    let (gq, gk, gv) = (
        g.upload(HostSlice::F32(&qd), &[t, hq, d], DType::BF16).unwrap(),
        g.upload(HostSlice::F32(&kd), &cache_dims, DType::BF16).unwrap(),
        g.upload(HostSlice::F32(&vd), &cache_dims, DType::BF16).unwrap(),
    );
    let gout = g.alloc(&[t, hq, d], DType::BF16).unwrap();
    g.fill(&gout, f32::NAN).unwrap();
    let gmeta = AttentionMetadata::upload(&g, host.clone()).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    g.attention(&AttentionArgs {
        q: &gq,
        k_cache: &gk,
        v_cache: &gv,
        out: &gout,
        meta: &gmeta,
        num_q_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
        scale,
        sliding_window: None,
    })
    .unwrap();
    let (cq, ck, cv) = (
        cpu.upload(HostSlice::F32(&qd), &[t, hq, d], DType::F32).unwrap(),
        cpu.upload(HostSlice::F32(&kd), &cache_dims, DType::F32).unwrap(),
        cpu.upload(HostSlice::F32(&vd), &cache_dims, DType::F32).unwrap(),
    );
    let cout = cpu.alloc(&[t, hq, d], DType::F32).unwrap();
    let cmeta = AttentionMetadata::upload(&cpu, host).unwrap();
    cpu.attention(&AttentionArgs {
        q: &cq,
        k_cache: &ck,
        v_cache: &cv,
        out: &cout,
        meta: &cmeta,
        num_q_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
        scale,
        sliding_window: None,
    })
    .unwrap();
    rel_err(&cpu.download_f32(&cout).unwrap(), &g.download_f32(&gout).unwrap())
}

#[test]
fn wide_gqa_groups_match_the_reference() {
    // 16 query heads per KV head: decode rows go through the tensor-core kernel.
    let e = attention_case(32, 2, 128, 16, &[(300, 1), (77, 1), (90, 40)], 11);
    println!("wide GQA rel err {e:.2e}");
    assert!(e < 1e-2, "{e}");
}

#[test]
fn long_context_split_k_decode_matches_the_reference() {
    let e = attention_case(8, 2, 128, 16, &[(8191, 1), (5000, 1), (1, 1), (513, 1)], 12);
    println!("8k split-K decode rel err {e:.2e}");
    assert!(e < 1e-2, "{e}");
    let e = attention_case(6, 2, 64, 32, &[(4000, 1), (3000, 700)], 13);
    println!("long prefill over a cached prefix rel err {e:.2e}");
    assert!(e < 1e-2, "{e}");
}

#[test]
fn seeded_sampling_over_a_large_vocabulary_matches_the_reference() {
    let g = gpu();
    let cpu = CpuBackend::new();
    let (m, v) = (8, 128_256);
    let mut rng = Rng(99);
    // Peaked logits, so that top-p keeps a short head and ties cannot blur the comparison.
    let logits: Vec<f32> = (0..m * v).map(|_| rng.next() * 6.0).collect();
    let gl = g.upload(HostSlice::F32(&logits), &[m, v], DType::F32).unwrap();
    let cl = cpu.upload(HostSlice::F32(&logits), &[m, v], DType::F32).unwrap();
    let params = [
        SamplingParams::greedy(),
        SamplingParams { temperature: 0.7, top_p: 0.9, logprobs: Some(5), ..Default::default() },
        SamplingParams { temperature: 1.0, top_k: 50, ..Default::default() },
        SamplingParams { temperature: 1.3, min_p: 0.05, repetition_penalty: 1.3, ..Default::default() },
    ];
    let history: Vec<u32> = (0..64).map(|i| (i * 2003) % v as u32).collect();
    let mut mismatches = 0;
    for step in 0..8u64 {
        let rows: Vec<SamplingRow> = (0..m)
            .map(|i| SamplingRow {
                params: &params[i % params.len()],
                seed: 1234 + i as u64,
                step,
                prompt_tokens: &history[..32],
                output_tokens: &history[32..],
            })
            .collect();
        let want = cpu.sample(&cl, &rows).unwrap();
        let got = g.sample(&gl, &rows).unwrap();
        for (w, o) in want.iter().zip(&got) {
            mismatches += (w.token != o.token) as usize;
            assert!((w.logprob - o.logprob).abs() < 1e-3, "{w:?} vs {o:?}");
            assert_eq!(w.top_logprobs.len(), o.top_logprobs.len());
            for (a, b) in w.top_logprobs.iter().zip(&o.top_logprobs) {
                assert_eq!(a.0, b.0);
                assert!((a.1 - b.1).abs() < 1e-3);
            }
        }
    }
    assert_eq!(mismatches, 0, "tokens differ from the reference");
}

#[test]
fn time_ms_measures_a_device_copy() {
    let g = gpu();
    let a = g.alloc(&[64 << 20], DType::BF16).unwrap();
    let b = g.alloc(&[64 << 20], DType::BF16).unwrap();
    g.fill(&a, 1.5).unwrap();
    let ms = g.time_ms(|| g.copy(&a, &b)).unwrap();
    assert!(ms > 0.0);
    assert_eq!(g.download_f32(&b.narrow(0, 4).unwrap()).unwrap(), vec![1.5; 4]);
}
