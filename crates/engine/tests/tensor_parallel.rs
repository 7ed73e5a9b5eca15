//! Tensor parallelism through the engine, on the CPU: one scheduler and
//! block allocator drive N rank threads (each its own backend, model shard
//! and KV pool of its KV heads, joined by an in-process all-reduce), and the
//! engine gives the tokens of the unsharded engine, for a workload that
//! exercises what every rank must apply alike: the prefix cache, chunked
//! prefill, preemption by recompute and by swap (a small KV pool), and
//! `n > 1` forks (copy-on-write block copies), under asynchronous scheduling
//! (and, once each, synchronous scheduling with padded decode steps, seeded
//! sampling, and an FP8 KV cache).
//! The tiny random Llama (4 query and 2 KV heads) runs at TP 2 and 4 (at 4
//! each KV head is held by two ranks); SmolLM2-135M (9 query and 3 KV heads)
//! at TP 3. Refusals and failures come back as errors, never as a hang.
//!
//! The SmolLM2 test needs the model: `bash scripts/fetch-model.sh` (or
//! `PAGODA_TEST_MODEL`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use pagoda_backend::{Communicator, Tensor};
use pagoda_backend_cpu_ref::{CpuBackend, InProcessComm, InProcessGroup};
use pagoda_engine::{
    load_engine, load_engine_tensor_parallel, EngineConfig, EngineError, GenerationRequest, KvCacheDtype,
    LlmEngine, LoraConfig, PreemptionMode, RankStart, SamplingParams, SpeculativeConfig,
};

/// tests/fixtures/tiny-llama: 2 layers, 4 query and 2 KV heads, 320 tokens.
fn tiny_llama() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

/// One rank start per handle of `comms`, each with its own CPU backend.
fn starts(comms: Vec<Arc<dyn Communicator<CpuBackend>>>) -> Vec<RankStart<CpuBackend>> {
    comms
        .into_iter()
        .map(|comm| -> RankStart<CpuBackend> { Box::new(move || Ok((CpuBackend::new(), comm))) })
        .collect()
}

fn group(world: usize) -> Vec<Arc<dyn Communicator<CpuBackend>>> {
    InProcessGroup::new(world).into_iter().map(|c| Arc::new(c) as Arc<dyn Communicator<CpuBackend>>).collect()
}

/// The engine for `model` at `world` ranks (`load_engine` at 1).
fn engine(model: &Path, world: usize, config: EngineConfig) -> Result<LlmEngine<CpuBackend>, EngineError> {
    let config = EngineConfig { tensor_parallel_size: world, ..config };
    if world == 1 {
        return load_engine(CpuBackend::new(), model, config, |_, _| {});
    }
    load_engine_tensor_parallel(starts(group(world)), model, config, |_, _| {})
}

fn request(id: String, prompt: Vec<u32>, max_tokens: usize, n: usize) -> GenerationRequest {
    let mut r = GenerationRequest::new(id, prompt);
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r.n = n;
    r
}

/// What a run gave, and what it exercised.
#[derive(Debug)]
struct Run {
    /// Per request, per sample, the generated tokens.
    tokens: Vec<Vec<Vec<u32>>>,
    preemptions: u64,
    prefix_hit_tokens: u64,
}

/// Runs `rounds` (each one `generate` call, so later rounds find the
/// earlier rounds' prompts in the prefix cache) and returns every token.
fn run(mut engine: LlmEngine<CpuBackend>, rounds: &[Vec<GenerationRequest>]) -> Run {
    let mut tokens = Vec::new();
    for round in rounds {
        let done = engine.generate(round.clone()).expect("generate");
        tokens.extend(done.iter().map(|r| r.seqs.iter().map(|s| s.token_ids.clone()).collect()));
    }
    assert_eq!(engine.scheduler().kv_usage().used_blocks, 0, "every block freed");
    Run {
        tokens,
        preemptions: engine.scheduler().stats().num_preemptions,
        prefix_hit_tokens: engine.scheduler().prefix_cache_stats().hit_tokens,
    }
}

/// Six prompts sharing a 24-token prefix (3 blocks of 8), 34 to 54 tokens
/// long (two or more chunks of 32), 20 greedy tokens each, plus one prompt
/// with two greedy samples, whose fork copies its last, partial block; a
/// second round repeats two prompts (prefix-cache hits).
fn tiny_rounds() -> Vec<Vec<GenerationRequest>> {
    let prefix: Vec<u32> = (0..24).map(|i| 3 + (i * 37) % 300).collect();
    let prompt = |i: u32, len: u32| -> Vec<u32> {
        prefix.iter().copied().chain((0..len).map(|j| 5 + (i * 101 + j * 13) % 310)).collect()
    };
    let mut first: Vec<GenerationRequest> =
        (0..6).map(|i| request(format!("r{i}"), prompt(i, 10 + 6 * i), 20, 1)).collect();
    first.push(request("fork".into(), prompt(9, 13), 16, 2));
    let second =
        vec![request("again0".into(), prompt(0, 10), 12, 1), request("again3".into(), prompt(3, 28), 12, 1)];
    vec![first, second]
}

/// A KV pool of 24 blocks of 8 tokens: the first round needs about 60.
fn tiny_config(preemption_mode: PreemptionMode) -> EngineConfig {
    EngineConfig {
        block_size: 8,
        num_gpu_blocks: Some(24),
        swap_space_bytes: 4 << 20,
        max_num_batched_tokens: 32,
        max_num_seqs: 8,
        preemption_mode,
        ..EngineConfig::default()
    }
}

#[test]
fn tiny_llama_at_tp_2_and_4_gives_the_tp_1_tokens_through_the_engine() {
    let model = tiny_llama();
    let rounds = tiny_rounds();
    for mode in [PreemptionMode::Recompute, PreemptionMode::Swap] {
        let want = run(engine(&model, 1, tiny_config(mode)).unwrap(), &rounds);
        assert!(want.preemptions > 0, "{mode:?}: the pool is too large to preempt");
        assert!(want.prefix_hit_tokens > 0, "{mode:?}: no prefix-cache hit");
        for world in [2, 4] {
            let started = Instant::now();
            let e = engine(&model, world, tiny_config(mode)).unwrap();
            assert_eq!(e.runner().tensor_parallel_size(), world);
            let got = run(e, &rounds);
            eprintln!("tiny Llama, {mode:?}, TP {world}: {:.2} s", started.elapsed().as_secs_f64());
            assert_eq!(got.tokens, want.tokens, "{mode:?} at TP {world}");
            // The same decisions: the scheduler saw the same tokens.
            assert_eq!(got.preemptions, want.preemptions, "{mode:?} at TP {world}");
            assert_eq!(got.prefix_hit_tokens, want.prefix_hit_tokens, "{mode:?} at TP {world}");
        }
    }
}

#[test]
fn padded_decode_steps_and_synchronous_scheduling_at_tp_2() {
    let model = tiny_llama();
    let rounds = tiny_rounds();
    let config = EngineConfig { async_scheduling: false, ..tiny_config(PreemptionMode::Recompute) };
    let want = run(engine(&model, 1, config.clone()).unwrap(), &rounds);
    let mut padded = engine(&model, 2, config).unwrap();
    padded.force_decode_graphs().expect("every rank pads its decode steps");
    let mut tokens = Vec::new();
    for round in &rounds {
        let done = padded.generate(round.clone()).expect("generate");
        tokens.extend(done.iter().map(|r| r.seqs.iter().map(|s| s.token_ids.clone()).collect::<Vec<_>>()));
    }
    assert!(padded.runner().timings().graphs.steps > 0, "no step ran padded");
    assert_eq!(tokens, want.tokens);
}

#[test]
fn seeded_samples_match_too() {
    // Every rank draws from the same logits with the same seeds; the draws
    // match the unsharded engine's unless f32 rounding moves a logit across
    // a draw's boundary, which these prompts do not come near.
    let model = tiny_llama();
    let prompt: Vec<u32> = (0..19).map(|i| 7 + (i * 53) % 300).collect();
    let mut r = request("sampled".into(), prompt, 24, 3);
    r.sampling = SamplingParams { temperature: 1.0, seed: Some(11), ..SamplingParams::default() };
    let rounds = vec![vec![r]];
    let want = run(engine(&model, 1, tiny_config(PreemptionMode::Recompute)).unwrap(), &rounds);
    assert_ne!(want.tokens[0][0], want.tokens[0][1], "the samples differ");
    let got = run(engine(&model, 2, tiny_config(PreemptionMode::Recompute)).unwrap(), &rounds);
    assert_eq!(got.tokens, want.tokens);
}

#[test]
fn the_kv_budget_is_per_rank_and_each_rank_holds_its_heads() {
    // 2 KV heads: one per rank at TP 2, and still one (replicated) at TP 4,
    // so a rank's block is half the whole model's and the same budget holds
    // twice the blocks.
    let model = tiny_llama();
    let config = EngineConfig { kv_cache_memory_bytes: Some(1 << 20), ..EngineConfig::default() };
    let blocks = |world| engine(&model, world, config.clone()).unwrap().info().num_gpu_blocks;
    let whole = blocks(1);
    assert_eq!(
        whole,
        (1 << 20) / (2 * 2 * 2 * 16 * 16 * 4),
        "2 layers x K,V x 2 heads x 16 tokens x 16 dims x f32"
    );
    assert_eq!(blocks(2), 2 * whole);
    assert_eq!(blocks(4), 2 * whole);
    let e = engine(&model, 2, config).unwrap();
    let shape = e.runner().kv_cache().shape;
    assert_eq!((shape.num_kv_heads, shape.num_blocks), (1, 2 * whole));
}

/// The error loading the tiny Llama with `config` at `world` ranks gives.
fn refusal(world: usize, config: EngineConfig) -> String {
    match engine(&tiny_llama(), world, config) {
        Ok(_) => panic!("TP {world} loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn what_does_not_run_split_is_refused_by_name() {
    let e = refusal(3, EngineConfig::default());
    assert!(e.contains("num_attention_heads 4 is not divisible by tensor parallel size 3"), "{e}");
    let lora = LoraConfig { max_loras: 1, max_lora_rank: 8, max_cpu_loras: 1 };
    let e = refusal(2, EngineConfig { lora: Some(lora), ..EngineConfig::default() });
    assert!(e.contains("--enable-lora is not supported with --tensor-parallel-size 2"), "{e}");
    let draft = SpeculativeConfig::from_json(r#"{"model": "/draft", "num_speculative_tokens": 2}"#).unwrap();
    let e = refusal(2, EngineConfig { speculative: Some(draft), ..EngineConfig::default() });
    assert!(e.contains("--speculative-config with a draft model is not supported"), "{e}");
    let e = refusal(0, EngineConfig::default());
    assert!(e.contains("--tensor-parallel-size must be at least 1"), "{e}");

    let config = EngineConfig { tensor_parallel_size: 2, ..EngineConfig::default() };
    let e = load_engine(CpuBackend::new(), tiny_llama(), config.clone(), |_, _| {}).err().expect("refused");
    assert!(e.to_string().contains("load_engine_tensor_parallel"), "{e}");
    let e = load_engine_tensor_parallel(starts(group(4)), tiny_llama(), config.clone(), |_, _| {})
        .err()
        .expect("refused");
    assert!(e.to_string().contains("--tensor-parallel-size 2 with 4 ranks given"), "{e}");
    let mut swapped = group(2);
    swapped.reverse();
    let e =
        load_engine_tensor_parallel(starts(swapped), tiny_llama(), config, |_, _| {}).err().expect("refused");
    assert!(e.to_string().contains("was given the communicator of rank 1 of 2"), "{e}");
}

#[test]
fn a_rank_that_cannot_start_fails_the_load() {
    let mut ranks = starts(group(2));
    ranks[1] = Box::new(|| Err(EngineError::Config("no such device".into())));
    let config = EngineConfig { tensor_parallel_size: 2, ..EngineConfig::default() };
    let e = load_engine_tensor_parallel(ranks, tiny_llama(), config, |_, _| {}).err().expect("refused");
    assert!(e.to_string().contains("no such device"), "{e}");
}

/// A rank's communicator whose all-reduce fails from its `fail_at`-th call
/// on, as a device error would, aborting the group as a failing rank does.
struct FailingComm {
    inner: InProcessComm,
    calls: AtomicUsize,
    fail_at: usize,
}

impl Communicator<CpuBackend> for FailingComm {
    fn rank(&self) -> usize {
        Communicator::<CpuBackend>::rank(&self.inner)
    }
    fn world_size(&self) -> usize {
        Communicator::<CpuBackend>::world_size(&self.inner)
    }
    fn all_reduce_sum(
        &self,
        backend: &CpuBackend,
        tensor: &Tensor<CpuBackend>,
    ) -> pagoda_backend::Result<()> {
        if self.calls.fetch_add(1, Ordering::Relaxed) + 1 >= self.fail_at {
            Communicator::<CpuBackend>::abort(&self.inner);
            return Err(pagoda_backend::BackendError::Device("rank 1's device fell off the bus".into()));
        }
        self.inner.all_reduce_sum(backend, tensor)
    }
    fn abort(&self) {
        Communicator::<CpuBackend>::abort(&self.inner)
    }
}

#[test]
fn a_rank_failing_mid_run_fails_the_step_and_every_later_one_without_hanging() {
    let mut comms = InProcessGroup::new(2).into_iter();
    let rank_0: Arc<dyn Communicator<CpuBackend>> = Arc::new(comms.next().unwrap());
    // 2 layers x 2 all-reduces a forward pass: fail in the third step.
    let failing = FailingComm { inner: comms.next().unwrap(), calls: AtomicUsize::new(0), fail_at: 10 };
    let ranks = starts(vec![rank_0, Arc::new(failing)]);
    let config =
        EngineConfig { tensor_parallel_size: 2, num_gpu_blocks: Some(64), ..EngineConfig::default() };
    let mut e = load_engine_tensor_parallel(ranks, tiny_llama(), config, |_, _| {}).unwrap();
    e.add_request(request("r".into(), vec![5, 6, 7, 8, 9], 16, 1)).unwrap();
    let err = loop {
        match e.step() {
            Ok(_) => assert!(e.has_unfinished_requests(), "finished before the failure"),
            Err(err) => break err.to_string(),
        }
    };
    assert!(err.contains("fell off the bus"), "the cause is named: {err}");
    let later = e.step().expect_err("the group stays broken").to_string();
    assert!(later.contains("broken"), "{later}");
    drop(e); // joins the rank threads
}

#[test]
fn smollm2_at_tp_3_gives_the_tp_1_tokens_through_the_engine() {
    let _one = common::serial();
    let model = common::model_path();
    let files = pagoda_models::ModelFiles::open(&model).expect("open SmolLM2");
    assert_eq!((files.config.num_attention_heads, files.config.num_kv_heads), (9, 3));
    let tokenizer = files.tokenizer;
    let system = "You are a helpful assistant. You answer every question in one short and friendly \
                  sentence, without lists or code. Question: ";
    let questions = ["What is the capital of France?", "Which planet is known as the red planet?"];
    let prompt = |q: &str| tokenizer.encode(&format!("{system}{q}"), true).expect("encode");
    let mut first: Vec<GenerationRequest> =
        questions.iter().enumerate().map(|(i, q)| request(format!("q{i}"), prompt(q), 6, 1)).collect();
    first.push(request("fork".into(), prompt("Write the first words of a poem about rain."), 5, 2));
    let rounds = vec![first, vec![request("again".into(), prompt(questions[1]), 4, 1)]];
    // 6 blocks of 16 tokens: about two thirds of what the first round needs at once.
    let config = EngineConfig {
        block_size: 16,
        num_gpu_blocks: Some(6),
        max_num_batched_tokens: 24,
        max_model_len: Some(96),
        ..EngineConfig::default()
    };
    let started = Instant::now();
    let want = run(engine(&model, 1, config.clone()).unwrap(), &rounds);
    let tp_1 = started.elapsed().as_secs_f64();
    assert!(want.preemptions > 0 && want.prefix_hit_tokens > 0, "{want:?}");
    let got = run(engine(&model, 3, config).unwrap(), &rounds);
    eprintln!("SmolLM2: TP 1 {tp_1:.1} s, TP 3 {:.1} s", started.elapsed().as_secs_f64() - tp_1);
    assert_eq!(got.tokens, want.tokens);
    assert_eq!((got.preemptions, got.prefix_hit_tokens), (want.preemptions, want.prefix_hit_tokens));
}

#[test]
fn an_fp8_kv_cache_is_split_the_same_way() {
    // Each rank's pool holds FP8 codes of its KV heads over the layers' scales.
    let model = tiny_llama();
    let rounds = tiny_rounds();
    let config = EngineConfig { kv_cache_dtype: KvCacheDtype::Fp8E4M3, ..tiny_config(PreemptionMode::Swap) };
    let want = run(engine(&model, 1, config.clone()).unwrap(), &rounds);
    let got = run(engine(&model, 2, config).unwrap(), &rounds);
    assert_eq!(got.tokens, want.tokens);
}
