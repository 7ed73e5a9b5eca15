//! GPU behaviour the conformance grid does not reach: index errors found on the
//! device, wide GQA groups (served by the prefill kernel), split-K decode over
//! a long context against the reference, seeded sampling over a large
//! vocabulary, logit constraints and structured-output masks, LoRA slots out of
//! range and LoRA products replayed from a graph, an FP8 cache step replayed
//! from a graph with changing scales, FP8 linear layers replayed from a graph, asynchronous
//! sampling (handles in flight, fed ids, dropped handles), uploads staged through the page-locked ring, the timing helpers,
//! and the kernel policy (each forced decode partition, PDL and the GEMV on
//! and off, against the reference). Needs an NVIDIA GPU (CI compiles only).
use half::bf16;
use pagoda_backend::{
    lora_group_capacity, lora_token_groups, AttentionArgs, AttentionHostMetadata, AttentionMetadata, Backend,
    BackendError, DType, HostSlice, HostVec, LoraArgs, LoraGroups, LoraPart, SamplingParams, SamplingRow,
    Tensor,
};
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_backend_cuda::policy::DECODE_PARTITIONS;
use pagoda_backend_cuda::{CudaBackend, DecodePartition, KernelOptions, KernelPolicy};

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
    attention_case_on(&gpu(), hq, hkv, d, bs, seqs, seed)
}

/// [`attention_case`] on a given GPU backend (and so under its kernel policy).
fn attention_case_on(
    g: &CudaBackend,
    hq: usize,
    hkv: usize,
    d: usize,
    bs: usize,
    seqs: &[(usize, usize)],
    seed: u64,
) -> f64 {
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
    let gmeta = AttentionMetadata::upload(g, host.clone()).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    g.attention(&AttentionArgs {
        q: &gq,
        k_cache: &gk,
        v_cache: &gv,
        kv_scales: None,
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
        kv_scales: None,
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

/// `x · wᵀ` for a few token rows (the GEMV's shapes) on both backends.
fn linear_case(g: &CudaBackend, t: usize, n: usize, k: usize, seed: u64) -> f64 {
    let cpu = CpuBackend::new();
    let mut rng = Rng(seed);
    let (x, w) = (rng.bf16_vec(t * k), rng.bf16_vec(n * k));
    let (gx, gw) = (
        g.upload(HostSlice::F32(&x), &[t, k], DType::BF16).unwrap(),
        g.upload(HostSlice::F32(&w), &[n, k], DType::BF16).unwrap(),
    );
    let gout = g.alloc(&[t, n], DType::F32).unwrap();
    g.linear(&gx, &gw, None, &gout).unwrap();
    let (cx, cw) = (
        cpu.upload(HostSlice::F32(&x), &[t, k], DType::F32).unwrap(),
        cpu.upload(HostSlice::F32(&w), &[n, k], DType::F32).unwrap(),
    );
    let cout = cpu.alloc(&[t, n], DType::F32).unwrap();
    cpu.linear(&cx, &cw, None, &cout).unwrap();
    rel_err(&cpu.download_f32(&cout).unwrap(), &g.download_f32(&gout).unwrap())
}

#[test]
fn every_kernel_policy_matches_the_reference() {
    let facts = gpu().device_facts();
    // The creation options win; what they leave unset comes from the device.
    let forced = KernelOptions {
        decode_partition: Some(DecodePartition::Tokens(128)),
        pdl: Some(false),
        gemv: Some(false),
        gemv_mma_min_tokens: Some(17),
        decode_attention_mma: None,
    };
    let mut g =
        CudaBackend::with_kernel_options(0, DType::BF16, forced).expect("these tests need a CUDA GPU");
    let p = g.kernel_policy();
    println!("{} ({facts:?}): {p}", g.name());
    assert!(facts.num_sms > 0);
    assert_eq!(
        p,
        KernelPolicy {
            num_sms: facts.num_sms,
            use_pdl: false,
            use_gemv: false,
            gemv_mma_min_tokens: 17,
            decode_partition: Some(128),
            decode_attention_mma: false
        }
    );
    // Decode shapes that pick small, large and whole partitions on their own, under each forced one.
    let seqs = [(2000, 1), (577, 1), (1, 1), (64, 1)];
    for partition in [DecodePartition::Auto]
        .into_iter()
        .chain(DECODE_PARTITIONS.iter().map(|&n| DecodePartition::Tokens(n)))
    {
        for pdl in [true, false] {
            g.set_kernel_options(KernelOptions {
                decode_partition: Some(partition),
                pdl: Some(pdl),
                ..KernelOptions::default()
            });
            assert_eq!(g.kernel_policy().use_pdl, pdl && facts.supports_pdl());
            let e = attention_case_on(&g, 8, 2, 128, 16, &seqs, 21);
            println!("decode partition {partition}, PDL {pdl}: rel err {e:.2e}");
            assert!(e < 1e-2, "partition {partition}, PDL {pdl}: {e}");
        }
    }
    // The tensor-core GEMV for every row count it takes, the CUDA-core GEMV,
    // and cuBLAS, for the same few-row products.
    for (gemv, mma_from) in [(true, 1), (true, 17), (false, 17)] {
        g.set_kernel_options(KernelOptions {
            gemv: Some(gemv),
            gemv_mma_min_tokens: Some(mma_from),
            ..KernelOptions::default()
        });
        assert_eq!(g.kernel_policy().use_gemv, gemv);
        assert_eq!(g.kernel_policy().gemv_mma_min_tokens, mma_from);
        for t in [1, 3, 5, 8, 9, 16] {
            let e = linear_case(&g, t, 320, 256, 22);
            println!("linear t={t}, GEMV {gemv}, tensor cores from {mma_from} rows: rel err {e:.2e}");
            assert!(e < 1e-2, "t={t}, GEMV {gemv}, tensor cores from {mma_from}: {e}");
        }
    }
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
                allowed_tokens: None,
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

// ---- asynchronous sampling ------------------------------------------------------

/// Sampling parameters of every kind (greedy, seeded with each truncation,
/// penalties, logprobs), one per row in turn.
fn mixed_params() -> Vec<SamplingParams> {
    vec![
        SamplingParams::greedy(),
        SamplingParams { temperature: 0.8, top_p: 0.9, logprobs: Some(3), ..Default::default() },
        SamplingParams { temperature: 1.0, top_k: 20, ..Default::default() },
        SamplingParams { temperature: 1.2, min_p: 0.05, repetition_penalty: 1.2, ..Default::default() },
    ]
}

fn mixed_rows<'a>(
    params: &'a [SamplingParams],
    m: usize,
    step: u64,
    history: &'a [u32],
) -> Vec<SamplingRow<'a>> {
    (0..m)
        .map(|i| SamplingRow {
            params: &params[i % params.len()],
            seed: 77 + i as u64,
            step,
            prompt_tokens: &history[..history.len() / 2],
            output_tokens: &history[history.len() / 2..],
            allowed_tokens: None,
        })
        .collect()
}

/// Peaked random logits `[m, v]` (f32), rounded to bf16 so every backend sees the same values.
fn random_logits(seed: u64, m: usize, v: usize) -> Vec<f32> {
    Rng(seed).bf16_vec(m * v).iter().map(|x| x * 8.0).collect()
}

#[test]
fn sample_async_then_finish_equals_sample() {
    let g = gpu();
    let (m, v) = (6, 5000);
    let params = mixed_params();
    let history: Vec<u32> = (0..40).map(|i| i * 97 % 5000).collect();
    let logits = g.upload(HostSlice::F32(&random_logits(1, m, v)), &[m, v], DType::F32).unwrap();
    let rows = mixed_rows(&params, m, 3, &history);
    let want = g.sample(&logits, &rows).unwrap();
    let handle = g.sample_async(&logits, &rows).unwrap();
    assert_eq!(handle.num_rows(), m);
    assert_eq!(g.finish_sample(handle).unwrap(), want);
    // No rows: an empty result, whenever it is finished.
    let none = g.alloc(&[0, v], DType::F32).unwrap();
    let empty = g.sample_async(&none, &[]).unwrap();
    assert!(g.finish_sample(empty).unwrap().is_empty());
}

#[test]
fn handles_in_flight_finish_in_any_order() {
    let g = gpu();
    let (m, v) = (5, 3000);
    let params = mixed_params();
    let history: Vec<u32> = (0..20).collect();
    let la = g.upload(HostSlice::F32(&random_logits(2, m, v)), &[m, v], DType::BF16).unwrap();
    let lb = g.upload(HostSlice::F32(&random_logits(3, m, v)), &[m, v], DType::BF16).unwrap();
    let (ra, rb) = (mixed_rows(&params, m, 0, &history), mixed_rows(&params, m, 1, &history));
    let (want_a, want_b) = (g.sample(&la, &ra).unwrap(), g.sample(&lb, &rb).unwrap());
    assert_ne!(want_a, want_b);
    for reverse in [false, true] {
        let a = g.sample_async(&la, &ra).unwrap();
        let b = g.sample_async(&lb, &rb).unwrap();
        if reverse {
            assert_eq!(g.finish_sample(b).unwrap(), want_b);
            assert_eq!(g.finish_sample(a).unwrap(), want_a);
        } else {
            assert_eq!(g.finish_sample(a).unwrap(), want_a);
            assert_eq!(g.finish_sample(b).unwrap(), want_b);
        }
    }
}

#[test]
fn dropped_unfinished_handles_leave_later_samples_intact() {
    let g = gpu();
    let (m, v) = (4, 2000);
    let params = mixed_params();
    let logits = g.upload(HostSlice::F32(&random_logits(4, m, v)), &[m, v], DType::F32).unwrap();
    let rows = mixed_rows(&params, m, 9, &[]);
    let want = g.sample(&logits, &rows).unwrap();
    for i in 0..50 {
        // Dropped at once (its copies surely still running), or after another is queued.
        let dropped = g.sample_async(&logits, &rows).unwrap();
        let kept = g.sample_async(&logits, &rows).unwrap();
        if i % 2 == 0 {
            drop(dropped);
            assert_eq!(g.finish_sample(kept).unwrap(), want);
        } else {
            assert_eq!(g.finish_sample(kept).unwrap(), want);
            drop(dropped);
        }
    }
    g.synchronize().unwrap();
}

/// `feed_sampled_tokens` from handles of both backends over the same logits and rows.
fn feed_on<B: Backend>(
    b: &B,
    logits: &[f32],
    m: usize,
    v: usize,
    rows: &[SamplingRow<'_>],
    src: &[i32],
) -> Vec<f32> {
    let l = b.upload(HostSlice::F32(logits), &[m, v], DType::F32).unwrap();
    let sampled = b.sample_async(&l, rows).unwrap();
    let before: Vec<i32> = (0..src.len() as i32).map(|i| 100_000 + i).collect();
    let ids = b.upload(HostSlice::I32(&before), &[src.len()], DType::I32).unwrap();
    let source = b.upload(HostSlice::I32(src), &[src.len()], DType::I32).unwrap();
    b.feed_sampled_tokens(&sampled, &source, &ids).unwrap();
    let fed = b.download_f32(&ids).unwrap();
    let tokens = b.finish_sample(sampled).unwrap();
    for (i, &r) in src.iter().enumerate() {
        let want = if r < 0 { before[i] as f32 } else { tokens[r as usize].token as f32 };
        assert_eq!(fed[i], want, "entry {i} (source row {r})");
    }
    fed
}

#[test]
fn fed_token_ids_match_the_reference() {
    let g = gpu();
    let cpu = CpuBackend::new();
    let (m, v) = (5, 4096);
    let params = mixed_params();
    let history: Vec<u32> = (0..30).map(|i| i * 131 % 4096).collect();
    let logits = random_logits(5, m, v);
    let rows = mixed_rows(&params, m, 2, &history);
    // Decodes first (each fed from its row), prefill positions (-1) kept, rows repeated.
    let src = [3, 0, 4, -1, -1, -1, 1, 2, 2, -1];
    assert_eq!(feed_on(&g, &logits, m, v, &rows, &src), feed_on(&cpu, &logits, m, v, &rows, &src));
    // A larger batch (several blocks of the kernel), all greedy.
    let (m, v) = (300, 257);
    let logits = random_logits(6, m, v);
    let greedy = [SamplingParams::greedy()];
    let rows = mixed_rows(&greedy, m, 0, &[]);
    let src: Vec<i32> = (0..700).map(|i| if i % 7 == 3 { -1 } else { (i * 13 % m) as i32 }).collect();
    assert_eq!(feed_on(&g, &logits, m, v, &rows, &src), feed_on(&cpu, &logits, m, v, &rows, &src));
}

#[test]
fn an_out_of_range_source_row_is_reported_by_the_next_finish_sample() {
    let g = gpu();
    let (m, v) = (2, 100);
    let logits = g.upload(HostSlice::F32(&random_logits(7, m, v)), &[m, v], DType::F32).unwrap();
    let greedy = [SamplingParams::greedy()];
    let rows = mixed_rows(&greedy, m, 0, &[]);
    let ids = g.upload(HostSlice::I32(&[5, 6, 7]), &[3], DType::I32).unwrap();
    let bad = g.upload(HostSlice::I32(&[1, 2, -1]), &[3], DType::I32).unwrap();

    let a = g.sample_async(&logits, &rows).unwrap();
    g.feed_sampled_tokens(&a, &bad, &ids).unwrap(); // queued: nothing is known yet
    let b = g.sample_async(&logits, &rows).unwrap();
    let tokens = g.finish_sample(a).unwrap(); // its copy of the status word came first
    assert!(matches!(g.finish_sample(b), Err(BackendError::Index { .. })));
    // The bad entry was left alone, the good one fed; the error was reported once.
    assert_eq!(g.download_f32(&ids).unwrap(), vec![tokens[1].token as f32, 6.0, 7.0]);
    g.synchronize().unwrap();
    assert_eq!(g.sample(&logits, &rows).unwrap(), tokens);

    // A handle dropped unfinished hands its error on to the next wait.
    let a = g.sample_async(&logits, &rows).unwrap();
    g.feed_sampled_tokens(&a, &bad, &ids).unwrap();
    let b = g.sample_async(&logits, &rows).unwrap();
    drop(b);
    assert!(matches!(g.synchronize(), Err(BackendError::Index { .. })));
    assert_eq!(g.finish_sample(a).unwrap(), tokens);
    g.synchronize().unwrap();

    // Shapes and dtypes are checked on the host.
    let a = g.sample_async(&logits, &rows).unwrap();
    let short = g.upload(HostSlice::I32(&[0]), &[1], DType::I32).unwrap();
    assert!(matches!(g.feed_sampled_tokens(&a, &short, &ids), Err(BackendError::Shape { .. })));
    assert!(matches!(g.feed_sampled_tokens(&a, &ids, &ids), Err(BackendError::Aliasing { .. })));
    let wide = g.upload(HostSlice::I64(&[0, 0, 0]), &[3], DType::I64).unwrap();
    assert!(matches!(g.feed_sampled_tokens(&a, &wide, &ids), Err(BackendError::DType { .. })));
    g.finish_sample(a).unwrap();
}

// ---- staged uploads ----------------------------------------------------------------

#[test]
fn many_small_staged_writes_land_in_order_across_ring_laps() {
    let g = gpu();
    // Keep the GPU busy first (~20 ms), so the copies queue up behind it and
    // the ring (16 MiB) wraps onto regions whose copies have not run yet.
    let busy = g.alloc(&[256 << 20], DType::F32).unwrap();
    for _ in 0..64 {
        g.fill(&busy, 1.0).unwrap();
    }
    // 3000 writes of 4096 + 7 i32 (~48 MiB in all, three laps), each a new value
    // per slot, and some slots written twice: the later write must win.
    let (slots, len) = (2000, 4096 + 7);
    let dst = g.alloc(&[slots, len], DType::I32).unwrap();
    let mut want = vec![0i32; slots * len];
    let mut host = vec![0i32; len];
    for w in 0..3000usize {
        let slot = w * 7 % slots;
        host.iter_mut().enumerate().for_each(|(i, x)| *x = (w * 10_000 + i) as i32);
        g.write(&dst.narrow(slot, 1).unwrap(), HostSlice::I32(&host)).unwrap();
        want[slot * len..(slot + 1) * len].copy_from_slice(&host);
    }
    // Small uploads of new tensors through the same ring, kept alive together.
    let small: Vec<_> =
        (0..500).map(|i| g.upload(HostSlice::F32(&[i as f32; 33]), &[33], DType::F32).unwrap()).collect();
    // One copy over the staging limit (4 MiB) takes the pageable path.
    let big: Vec<f32> = (0..(5 << 20) / 4).map(|i| i as f32).collect();
    let big_dev = g.upload(HostSlice::F32(&big), &[big.len()], DType::F32).unwrap();
    let HostVec::I32(got) = g.download(&dst).unwrap() else { panic!("an I32 tensor downloads as I32") };
    assert!(got == want, "staged writes lost or reordered");
    for (i, t) in small.iter().enumerate() {
        assert_eq!(g.download_f32(t).unwrap(), vec![i as f32; 33]);
    }
    assert_eq!(g.download_f32(&big_dev).unwrap(), big);
}

// ---- logit constraints and structured-output masks ---------------------------------

/// A random word with about a quarter of its bits set.
fn sparse_bits(rng: &mut Rng) -> u32 {
    rng.next();
    let a = (rng.0 >> 32) as u32;
    rng.next();
    a & (rng.0 >> 32) as u32
}

/// The `k` largest logits' token ids of one row (ties to the lower id).
fn top_ids(row: &[f32], k: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    ids.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    ids.truncate(k);
    ids
}

#[test]
fn token_masks_and_logit_constraints_match_the_reference() {
    let g = gpu();
    let cpu = CpuBackend::new();
    assert!(g.supports_token_masks() && g.supports_logit_constraints());
    // A vocabulary of whole mask words in f32, and one ending mid-word in bf16.
    for (m, v, dtype, seed) in [(64, 49_152, DType::F32, 21u64), (40, 50_001, DType::BF16, 22)] {
        let mut rng = Rng(seed);
        // Peaked logits (as the large-vocabulary test); for bf16, rounded so both backends see the same values.
        let logits: Vec<f32> = (0..m * v)
            .map(|_| rng.next() * 6.0)
            .map(|x| if dtype == DType::BF16 { bf16::from_f32(x).to_f32() } else { x })
            .collect();
        let gl = g.upload(HostSlice::F32(&logits), &[m, v], dtype).unwrap();
        // The reference in f32: the values are the same (bf16-exact where the device's are bf16).
        let cl = cpu.upload(HostSlice::F32(&logits), &[m, v], DType::F32).unwrap();
        let words = v.div_ceil(32);
        let prompt: Vec<u32> = (0..32).map(|i| (i * 7919) % v as u32).collect();
        let mut params = Vec::new();
        let mut masks: Vec<Option<Vec<u32>>> = Vec::new();
        let mut outputs: Vec<Vec<u32>> = Vec::new();
        for i in 0..m {
            let row = &logits[i * v..(i + 1) * v];
            let best = top_ids(row, 8);
            let random_ids = |rng: &mut Rng, n: usize| -> Vec<u32> {
                (0..n).map(|_| ((rng.next() + 1.0) * 0.5 * v as f32) as u32 % v as u32).collect()
            };
            let mut output: Vec<u32> = (0..16).map(|j| (i as u32 * 131 + j * 17) % v as u32).collect();
            let mut mask = None;
            let p = match i % 10 {
                // Greedy under a grammar mask, with top logprobs (raw).
                0 => {
                    mask = Some((0..words).map(|_| sparse_bits(&mut rng)).collect());
                    SamplingParams { logprobs: Some(3), ..SamplingParams::greedy() }
                }
                // Top-p under a grammar mask and allowed_token_ids (their intersection),
                // the mask one word short of the vocabulary (the last word's tokens banned).
                1 => {
                    mask = Some((0..words - 1).map(|_| sparse_bits(&mut rng)).collect());
                    let mut ids = random_ids(&mut rng, 3000);
                    ids.extend(&best[..4]);
                    SamplingParams {
                        temperature: 0.8,
                        top_p: 0.9,
                        allowed_token_ids: Some(ids),
                        ..Default::default()
                    }
                }
                // Top-k with bad words: the best token alone, the second best after the output's
                // last token (it is: banned), the third after a token the output does not end
                // with (kept), and a three-token word whose two-token prefix ends the output.
                2 => {
                    let last = *output.last().unwrap();
                    let before = output[output.len() - 2];
                    SamplingParams {
                        temperature: 1.0,
                        top_k: 20,
                        repetition_penalty: 1.3,
                        bad_words: vec![
                            vec![best[0]],
                            vec![last, best[1]],
                            vec![last.wrapping_add(1) % v as u32, best[2]],
                            vec![before, last, best[3]],
                        ],
                        ..Default::default()
                    }
                }
                // Greedy with the same bad words: the choice moves to the third best.
                3 => {
                    let last = *output.last().unwrap();
                    SamplingParams {
                        bad_words: vec![vec![best[0]], vec![last, best[1]], vec![last ^ 1, best[2]]],
                        frequency_penalty: 0.5,
                        presence_penalty: 0.3,
                        ..SamplingParams::greedy()
                    }
                }
                // Greedy with logit bias: a weak token pushed to the top, the best pushed down,
                // then the penalties on the biased logits (the weak token is in the output).
                4 => {
                    let weak = top_ids(&row.iter().map(|x| -x).collect::<Vec<_>>(), 1)[0];
                    output.push(weak);
                    let mut bias = vec![(weak, 20.0), (best[0], -100.0), (best[1], 0.5)];
                    bias.sort_by_key(|&(t, _)| t);
                    SamplingParams { logit_bias: bias, repetition_penalty: 1.5, ..SamplingParams::greedy() }
                }
                // Min-p over a few allowed ids with biases, one of them on a banned id (stays -inf).
                5 => {
                    let ids = vec![best[5], best[6], best[7], random_ids(&mut rng, 1)[0]];
                    let outside = (0..v as u32).find(|t| !ids.contains(t)).unwrap();
                    let mut bias = vec![(ids[0], -1.0), (ids[3], 3.0), (outside, 100.0)];
                    bias.sort_by_key(|&(t, _)| t);
                    bias.dedup_by_key(|e| e.0);
                    SamplingParams {
                        temperature: 1.2,
                        min_p: 0.05,
                        allowed_token_ids: Some(ids),
                        logit_bias: bias,
                        logprobs: Some(5),
                        ..Default::default()
                    }
                }
                // A grammar that allows one token only, drawing.
                6 => {
                    let t = best[7] as usize;
                    let mut w = vec![0u32; words];
                    w[t / 32] = 1 << (t % 32);
                    mask = Some(w);
                    SamplingParams { temperature: 0.9, top_k: 5, ..Default::default() }
                }
                // Every token banned (a mask of zeros): the arg-max rule decides, greedy or drawing.
                7 => {
                    mask = Some(vec![0u32; words]);
                    if i % 20 == 7 {
                        SamplingParams::greedy()
                    } else {
                        SamplingParams { temperature: 1.0, top_p: 0.5, ..Default::default() }
                    }
                }
                // Unconstrained rows between them: seeded, and greedy with penalties.
                8 => {
                    SamplingParams { temperature: 0.7, top_p: 0.95, logprobs: Some(2), ..Default::default() }
                }
                _ => SamplingParams { repetition_penalty: 1.2, ..SamplingParams::greedy() },
            };
            params.push(p);
            masks.push(mask);
            outputs.push(output);
        }
        let mut mismatches = 0;
        for step in 0..3u64 {
            let rows: Vec<SamplingRow> = (0..m)
                .map(|i| SamplingRow {
                    params: &params[i],
                    seed: 4321 + i as u64,
                    step,
                    prompt_tokens: &prompt,
                    output_tokens: &outputs[i],
                    allowed_tokens: masks[i].as_deref(),
                })
                .collect();
            let want = cpu.sample(&cl, &rows).unwrap();
            let got = g.sample(&gl, &rows).unwrap();
            for (i, (w, o)) in want.iter().zip(&got).enumerate() {
                if w.token != o.token {
                    mismatches += 1;
                    println!("vocab {v} step {step} row {i}: reference {} cuda {}", w.token, o.token);
                }
                assert!((w.logprob - o.logprob).abs() < 1e-3, "row {i}: {w:?} vs {o:?}");
                assert_eq!(w.top_logprobs.len(), o.top_logprobs.len());
                for (a, b) in w.top_logprobs.iter().zip(&o.top_logprobs) {
                    assert_eq!(a.0, b.0);
                    assert!((a.1 - b.1).abs() < 1e-3);
                }
            }
            // The constraints took effect where the test aims them.
            for i in 0..m {
                let t = want[i].token;
                match i % 10 {
                    0 | 1 | 6 => assert!(pagoda_sampler::token_allowed(masks[i].as_ref().unwrap(), t)),
                    3 => assert!(!top_ids(&logits[i * v..(i + 1) * v], 2).contains(&t)),
                    7 => assert_eq!(t, 0, "row {i}: all banned, the arg-max rule picks the lowest id"),
                    _ => {}
                }
            }
        }
        assert_eq!(mismatches, 0, "tokens differ from the reference (vocab {v})");
    }
}

/// A LoRA slot past the slot count is skipped on the device (its row left
/// as it was) and reported by the next wait: token by token (2 tokens),
/// through the grouped kernels when they are on (16 tokens: 8 of slot 1, 8
/// of slot 2), and on the dense path (64 tokens).
#[test]
fn lora_slot_past_the_count_is_reported_at_the_next_wait() {
    let g = gpu();
    let (k, r, n, s) = (64, 8, 4, 2);
    let filled = |dims: &[usize], dtype, v| {
        let x = g.alloc(dims, dtype).unwrap();
        g.fill(&x, v).unwrap();
        x
    };
    let a = filled(&[1, s, r, k], DType::BF16, 0.125);
    let b = filled(&[s, r, n], DType::BF16, 0.125);
    let parts = [LoraPart { b: &b, out_offset: 0 }];
    for t in [2usize, 16, 64] {
        let token_slots: Vec<i32> = (0..t).map(|i| 1 + (i >= t / 2) as i32).collect();
        let (order, groups) = lora_token_groups(&token_slots, None);
        let slots = g.upload(HostSlice::I32(&token_slots), &[t], DType::I32).unwrap();
        let order = g.upload(HostSlice::I32(&order), &[t], DType::I32).unwrap();
        let groups = g.upload(HostSlice::I32(&groups), &[groups.len() / 3, 3], DType::I32).unwrap();
        let x = filled(&[t, k], DType::BF16, 1.0);
        let out = filled(&[t, n], DType::BF16, 1.0);
        let args = LoraArgs {
            x: &x,
            a: &a,
            parts: &parts,
            token_slots: &slots,
            out: &out,
            groups: Some(LoraGroups { order: &order, groups: &groups }),
        };
        g.lora_apply(&args).unwrap();
        assert!(matches!(g.synchronize(), Err(BackendError::Index { .. })), "T{t}");
        // u = 64 · 0.125 = 8 per rank row; 8 rows · 8 · 0.125 = 8 added.
        assert_eq!(
            g.download_f32(&out).unwrap(),
            [vec![9.0; t / 2 * n], vec![1.0; t / 2 * n]].concat(),
            "T{t}"
        );
        g.synchronize().unwrap();
    }
}

/// A LoRA product of two parts (their B views of one tensor, so the dense
/// path batches them) recorded in a graph and replayed over new inputs and
/// slots gives what the same call gives eagerly (the same kernels: bit for
/// bit), and that matches the CPU reference: token by token (5 tokens),
/// grouped by slot (40 tokens, the groups padded to their capacity as the
/// decode graphs' are, so the recorded grid stays right when the groups
/// change; the grouped kernels only with PAGODA_LORA_GROUPED=1, and
/// PAGODA_LORA_DENSE_MIN_TOKENS above 40), and dense (64 tokens).
#[test]
fn lora_products_replay_in_a_graph() {
    for (t, grouped) in [(5, false), (40, true), (64, false)] {
        lora_products_replay(t, grouped);
    }
}

fn lora_products_replay(t: usize, grouped: bool) {
    let g = gpu();
    let cpu = CpuBackend::new();
    let mut rng = Rng(0x10_7a + t as u64);
    let (k, n, r, s) = (576, 200, 16, 3);
    let x_host = rng.bf16_vec(t * k);
    let a_host = rng.bf16_vec(2 * s * r * k);
    let b_host = rng.bf16_vec(2 * s * r * n);
    let base = rng.bf16_vec(t * 2 * n);
    let on = |v: &[f32], dims: &[usize], dtype| g.upload(HostSlice::F32(v), dims, dtype).unwrap();
    let (x, a, b) = (
        on(&x_host, &[t, k], DType::BF16),
        on(&a_host, &[2, s, r, k], DType::BF16),
        on(&b_host, &[2 * s, r, n], DType::BF16),
    );
    let b_parts: Vec<Tensor<CudaBackend>> =
        (0..2).map(|p| b.narrow(p * s, s).unwrap().reshape(&[s, r, n]).unwrap()).collect();
    let parts: Vec<LoraPart<'_, CudaBackend>> =
        b_parts.iter().enumerate().map(|(p, b)| LoraPart { b, out_offset: p * n }).collect();
    let capacity = lora_group_capacity(t, s);
    let slots = g.upload(HostSlice::I32(&vec![0; t]), &[t], DType::I32).unwrap();
    let order = g.alloc(&[t], DType::I32).unwrap();
    let groups = g.alloc(&[capacity, 3], DType::I32).unwrap();
    let write_slots = |token_slots: &[i32]| {
        g.write(&slots, HostSlice::I32(token_slots)).unwrap();
        let (o, gr) = lora_token_groups(token_slots, Some(capacity));
        g.write(&order, HostSlice::I32(&o)).unwrap();
        g.write(&groups, HostSlice::I32(&gr)).unwrap();
    };
    write_slots(&vec![0; t]);
    let lora_groups = || grouped.then_some(LoraGroups { order: &order, groups: &groups });
    let out = g.alloc(&[t, 2 * n], DType::BF16).unwrap();
    let step = |g: &CudaBackend, x: &Tensor<CudaBackend>| -> pagoda_backend::Result<()> {
        g.lora_apply(&LoraArgs {
            x,
            a: &a,
            parts: &parts,
            token_slots: &slots,
            out: &out,
            groups: lora_groups(),
        })
    };
    let graph = g.capture(&mut || step(&g, &x)).unwrap();
    // Mixed slots with -1; one slot for all; mostly none.
    let rounds: [Vec<i32>; 3] = [
        (0..t).map(|i| [2, -1, 0, 2, 1][i % 5]).collect(),
        vec![1; t],
        (0..t).map(|i| if i % 5 == 2 { 2 } else { -1 }).collect(),
    ];
    for (round, token_slots) in rounds.iter().enumerate() {
        let x_host: Vec<f32> = if round == 0 { x_host.clone() } else { rng.bf16_vec(t * k) };
        g.write(&x, HostSlice::F32(&x_host)).unwrap();
        write_slots(token_slots);
        g.write(&out, HostSlice::F32(&base)).unwrap();
        g.replay(&graph).unwrap();
        let replayed = g.download_f32(&out).unwrap();
        g.write(&out, HostSlice::F32(&base)).unwrap();
        step(&g, &x).unwrap();
        let eager = g.download_f32(&out).unwrap();
        assert!(replayed == eager, "T{t} round {round}: replay differs from the eager call");

        let c = |v: &[f32], dims: &[usize]| cpu.upload(HostSlice::F32(v), dims, DType::F32).unwrap();
        let (cx, ca, cb, cout) = (
            c(&x_host, &[t, k]),
            c(&a_host, &[2, s, r, k]),
            c(&b_host, &[2 * s, r, n]),
            c(&base, &[t, 2 * n]),
        );
        let cb_parts: Vec<Tensor<CpuBackend>> =
            (0..2).map(|p| cb.narrow(p * s, s).unwrap().reshape(&[s, r, n]).unwrap()).collect();
        let cparts: Vec<LoraPart<'_, CpuBackend>> =
            cb_parts.iter().enumerate().map(|(p, b)| LoraPart { b, out_offset: p * n }).collect();
        let cslots = cpu.upload(HostSlice::I32(token_slots), &[t], DType::I32).unwrap();
        cpu.lora_apply(&LoraArgs {
            x: &cx,
            a: &ca,
            parts: &cparts,
            token_slots: &cslots,
            out: &cout,
            groups: None,
        })
        .unwrap();
        let e_out = rel_err(&cpu.download_f32(&cout).unwrap(), &eager);
        println!("T{t} grouped {grouped} round {round}: rel err {e_out:.2e}");
        assert!(e_out < 1e-2, "T{t} round {round}: rel err {e_out}");
    }
}

/// An FP8 step, the cache write then attention over it, recorded in a graph
/// and replayed with other scales (the kernels read them from the device at
/// run time, after waiting for the kernel before): the replay equals the
/// eager calls bit for bit, the written codes are the reference's (keys one
/// step apart at most, values equal; see the conformance suite), and the
/// output matches the reference within the bf16 tolerance. A decode of 300
/// tokens and a 40-token prefill after 60 cached, so both kernels run.
#[test]
fn fp8_cache_steps_replay_in_a_graph_with_the_scales_of_the_moment() {
    use pagoda_backend::fp8::{e4m3_from_f32, e4m3_ordinal};
    use pagoda_backend::{RopeStyle, RotaryCacheArgs};

    let g = gpu();
    let cpu = CpuBackend::new();
    let mut rng = Rng(0xf8);
    let (hq, hkv, d, bs) = (8usize, 2usize, 128usize, 16usize);
    let seqs = [(300usize, 1usize), (100, 40)];
    let blocks: Vec<usize> = seqs.iter().map(|&(l, _)| l.div_ceil(bs)).collect();
    let (max_blocks, num_blocks) = (*blocks.iter().max().unwrap(), blocks.iter().sum::<usize>() + 2);
    let mut tables = vec![0i32; seqs.len() * max_blocks];
    let (mut next, mut qsl, mut slots, mut positions) = (0i32, vec![0i32], Vec::new(), Vec::new());
    for (s, &(len, q)) in seqs.iter().enumerate() {
        for b in 0..blocks[s] {
            tables[s * max_blocks + b] = (num_blocks as i32 - 1) - next; // reversed: not the identity
            next += 1;
        }
        for p in len - q..len {
            slots.push(tables[s * max_blocks + p / bs] as i64 * bs as i64 + (p % bs) as i64);
            positions.push(p as i32);
        }
        qsl.push(qsl[s] + q as i32);
    }
    let t = slots.len();
    let host = AttentionHostMetadata {
        query_start_loc: qsl,
        seq_lens: seqs.iter().map(|&(l, _)| l as i32).collect(),
        block_tables: tables,
        max_blocks_per_seq: max_blocks,
        slot_mapping: slots,
        num_decode_seqs: 1,
    };
    let cache_dims = [num_blocks, hkv, bs, d];
    let cache_len = num_blocks * hkv * bs * d;
    // The cached prefix: codes of unit-size values over the first round's scales.
    let k0: Vec<u8> = (0..cache_len).map(|_| e4m3_from_f32(rng.next() * 2.0 / 0.05)).collect();
    let v0: Vec<u8> = (0..cache_len).map(|_| e4m3_from_f32(rng.next() / 0.02)).collect();
    let width = (hq + 2 * hkv) * d;
    let qkv = rng.bf16_vec(t * width);
    let table: Vec<f32> = (0..512)
        .flat_map(|p| {
            let angles: Vec<f32> =
                (0..d / 2).map(|i| p as f32 * 10_000f32.powf(-2.0 * i as f32 / d as f32)).collect();
            angles.iter().map(|a| a.cos()).chain(angles.iter().map(|a| a.sin())).collect::<Vec<_>>()
        })
        .collect();

    /// One backend's tensors for the step.
    struct Step<B: Backend> {
        qkv: Tensor<B>,
        positions: Tensor<B>,
        cos_sin: Tensor<B>,
        q: Tensor<B>,
        k: Tensor<B>,
        v: Tensor<B>,
        scales: Tensor<B>,
        out: Tensor<B>,
        meta: AttentionMetadata<B>,
    }
    fn step_on<B: Backend>(
        b: &B,
        act: DType,
        qkv: &[f32],
        pos: &[i32],
        table: &[f32],
        host: &AttentionHostMetadata,
        (hq, d, t, dims): (usize, usize, usize, [usize; 4]),
    ) -> Step<B> {
        Step {
            qkv: b.upload(HostSlice::F32(qkv), &[t, qkv.len() / t], act).unwrap(),
            positions: b.upload(HostSlice::I32(pos), &[t], DType::I32).unwrap(),
            cos_sin: b.upload(HostSlice::F32(table), &[512, d], DType::F32).unwrap(),
            q: b.alloc(&[t, hq, d], act).unwrap(),
            k: b.alloc(&dims, DType::F8E4M3).unwrap(),
            v: b.alloc(&dims, DType::F8E4M3).unwrap(),
            scales: b.upload(HostSlice::F32(&[1.0, 1.0]), &[2], DType::F32).unwrap(),
            out: b.alloc(&[t, hq, d], act).unwrap(),
            meta: AttentionMetadata::upload(b, host.clone()).unwrap(),
        }
    }
    fn run<B: Backend>(
        b: &B,
        s: &Step<B>,
        (hq, hkv, d): (usize, usize, usize),
    ) -> pagoda_backend::Result<()> {
        b.rotary_and_cache(&RotaryCacheArgs {
            qkv: &s.qkv,
            positions: &s.positions,
            cos_sin: &s.cos_sin,
            q_out: &s.q,
            k_cache: &s.k,
            v_cache: &s.v,
            kv_scales: Some(&s.scales),
            slot_mapping: &s.meta.slot_mapping,
            num_q_heads: hq,
            num_kv_heads: hkv,
            head_dim: d,
            rotary_dim: d,
            style: RopeStyle::Neox,
        })?;
        b.attention(&AttentionArgs {
            q: &s.q,
            k_cache: &s.k,
            v_cache: &s.v,
            kv_scales: Some(&s.scales),
            out: &s.out,
            meta: &s.meta,
            num_q_heads: hq,
            num_kv_heads: hkv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            sliding_window: None,
        })
    }
    let shape = (hq, d, t, cache_dims);
    let gs = step_on(&g, DType::BF16, &qkv, &positions, &table, &host, shape);
    let cs = step_on(&cpu, DType::F32, &qkv, &positions, &table, &host, shape);
    // The prefix's codes back in both caches, the scales of the round, NaN in the output.
    let set = |k_scale: f32, v_scale: f32| {
        g.write(&gs.k, HostSlice::Bytes(&k0, DType::F8E4M3)).unwrap();
        g.write(&gs.v, HostSlice::Bytes(&v0, DType::F8E4M3)).unwrap();
        g.write(&gs.scales, HostSlice::F32(&[k_scale, v_scale])).unwrap();
        g.fill(&gs.out, f32::NAN).unwrap();
        cpu.write(&cs.k, HostSlice::Bytes(&k0, DType::F8E4M3)).unwrap();
        cpu.write(&cs.v, HostSlice::Bytes(&v0, DType::F8E4M3)).unwrap();
        cpu.write(&cs.scales, HostSlice::F32(&[k_scale, v_scale])).unwrap();
    };
    let codes = |b: HostVec| match b {
        HostVec::F8E4M3(c) => c,
        other => panic!("an FP8 cache downloaded as {:?}", other.dtype()),
    };
    set(1.0, 1.0);
    let graph = g.capture(&mut || run(&g, &gs, (hq, hkv, d))).unwrap();
    for (round, (ks, vs)) in [(0.05f32, 0.02f32), (0.11, 0.3), (0.013, 0.0071)].into_iter().enumerate() {
        set(ks, vs);
        g.replay(&graph).unwrap();
        let replayed = (
            g.download_f32(&gs.out).unwrap(),
            codes(g.download(&gs.k).unwrap()),
            codes(g.download(&gs.v).unwrap()),
        );
        set(ks, vs);
        run(&g, &gs, (hq, hkv, d)).unwrap();
        let eager = (
            g.download_f32(&gs.out).unwrap(),
            codes(g.download(&gs.k).unwrap()),
            codes(g.download(&gs.v).unwrap()),
        );
        assert!(replayed == eager, "round {round}: the replay differs from the eager calls");
        run(&cpu, &cs, (hq, hkv, d)).unwrap();
        let (want_k, want_v) = (codes(cpu.download(&cs.k).unwrap()), codes(cpu.download(&cs.v).unwrap()));
        let steps = |a: &[u8], b: &[u8]| {
            a.iter().zip(b).map(|(&x, &y)| (e4m3_ordinal(x) - e4m3_ordinal(y)).abs()).max().unwrap_or(0)
        };
        let (k_steps, v_steps) = (steps(&want_k, &eager.1), steps(&want_v, &eager.2));
        let e = rel_err(&cpu.download_f32(&cs.out).unwrap(), &eager.0);
        println!("FP8 round {round} (scales {ks}, {vs}): rel err {e:.2e}, key codes within {k_steps} step, values {v_steps}");
        assert!(k_steps <= 1 && v_steps == 0, "round {round}: codes {k_steps} / {v_steps} steps apart");
        assert!(e < 1e-2, "round {round}: {e}");
    }
}

/// FP8 linear layers recorded in a graph replay what they compute eagerly, in both
/// modes (the FP8 GEMV; the quantization kernel and cuBLASLt's FP8 GEMM inside a
/// capture, whose workspace is the handle's own), and in-features the kernels do not
/// take (not a multiple of 16) are refused by name rather than read past a row.
#[test]
fn fp8_linear_replays_from_a_graph_and_refuses_unaligned_rows() {
    use pagoda_backend::fp8::e4m3_from_f32;
    use pagoda_backend::{Fp8InputScale, Fp8LinearArgs, Fp8LinearMode, LinearFusion};
    let g = gpu();
    let mut rng = Rng(0xf8f8_0019);
    let (k, n) = (256usize, 96usize);
    let codes: Vec<u8> = (0..n * k).map(|_| e4m3_from_f32(rng.next() * 4.0)).collect();
    let w = g.upload(HostSlice::Bytes(&codes, DType::F8E4M3), &[n, k], DType::F8E4M3).unwrap();
    let scales: Vec<f32> = (0..n).map(|j| 0.01 * (1 + j % 5) as f32).collect();
    let s = g.upload(HostSlice::F32(&scales), &[n], DType::F32).unwrap();
    let fusion = LinearFusion::none();
    for (t, mode) in [(4usize, Fp8LinearMode::WeightOnly), (40, Fp8LinearMode::QuantizedActivations)] {
        let x = g.upload(HostSlice::F32(&rng.bf16_vec(t * k)), &[t, k], DType::BF16).unwrap();
        let (eager, replayed) =
            (g.alloc(&[t, n], DType::BF16).unwrap(), g.alloc(&[t, n], DType::BF16).unwrap());
        let eager_args = Fp8LinearArgs {
            x: &x,
            weight: &w,
            weight_scale: &s,
            bias: None,
            out: &eager,
            fusion: &fusion,
            mode,
            input_scale: Fp8InputScale::Dynamic,
        };
        let replayed_args = Fp8LinearArgs { out: &replayed, ..eager_args };
        g.fp8_linear(&eager_args).unwrap();
        let graph = g.capture(&mut || g.fp8_linear(&replayed_args)).unwrap();
        g.replay(&graph).unwrap();
        assert_eq!(g.download_f32(&replayed).unwrap(), g.download_f32(&eager).unwrap(), "{mode:?}");
    }
    let x = g.alloc(&[2, 40], DType::BF16).unwrap();
    g.fill(&x, 1.0).unwrap();
    let w40 = g.upload(HostSlice::Bytes(&[0x38; 8 * 40], DType::F8E4M3), &[8, 40], DType::F8E4M3).unwrap();
    let s8 = g.upload(HostSlice::F32(&[1.0; 8]), &[8], DType::F32).unwrap();
    let out = g.alloc(&[2, 8], DType::BF16).unwrap();
    let err = g
        .fp8_linear(&Fp8LinearArgs {
            x: &x,
            weight: &w40,
            weight_scale: &s8,
            bias: None,
            out: &out,
            fusion: &fusion,
            mode: Fp8LinearMode::WeightOnly,
            input_scale: Fp8InputScale::Dynamic,
        })
        .unwrap_err();
    assert!(
        matches!(err, BackendError::Shape { .. }) && err.to_string().contains("multiples of 16"),
        "{err}"
    );
}
