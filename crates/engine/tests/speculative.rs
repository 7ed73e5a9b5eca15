//! Speculative decoding on the real default model (SmolLM2-135M-Instruct) on
//! the CPU reference backend: with drafts from n-gram prompt lookup, from a
//! proposer that is always right (the model itself, replayed) and from one
//! that is almost always wrong, every request gets exactly the tokens it
//! gets without speculation (greedy, and sampled with a seed and every
//! sampling parameter), with prefix caching, chunked prefill, preemption and
//! n > 1 in play; and the sampled tokens follow the target's distribution.

use std::collections::HashMap;

use pagoda_backend::SamplingParams;
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{
    load_engine, DraftRequest, EngineConfig, EngineError, GenerationRequest, LlmEngine, PreemptionMode,
    Proposer, SpeculativeConfig,
};
use pagoda_scheduler::{SeqId, TokenId};
use serde_json::Value;

mod common;
use common::{engine, ids, model_path, serial, workspace_root};

fn ngram(k: usize) -> SpeculativeConfig {
    SpeculativeConfig::from_json(&format!(
        r#"{{"method": "ngram", "num_speculative_tokens": {k}, "prompt_lookup_max": 4, "prompt_lookup_min": 1, "min_acceptance_rate": 0}}"#
    ))
    .expect("config")
}

/// The golden prompts, plus one that asks the model to copy a passage (its
/// output repeats the prompt, which prompt lookup drafts from).
fn prompts() -> Vec<Vec<u32>> {
    let path = workspace_root().join("tests/fixtures/smollm2/golden.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("golden")).expect("json");
    let mut prompts: Vec<Vec<u32>> =
        golden["prompts"].as_array().expect("prompts").iter().map(|p| ids(&p["prompt_ids"])).collect();
    let longest = prompts.iter().max_by_key(|p| p.len()).expect("prompts").clone();
    // The same text twice: lookup finds the continuation in the first copy.
    prompts.push([longest.clone(), longest].concat());
    prompts
}

fn request(id: usize, prompt: &[u32], max_tokens: usize, sampling: SamplingParams) -> GenerationRequest {
    let mut r = GenerationRequest::new(format!("r{id}"), prompt.to_vec());
    r.sampling = sampling;
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r
}

/// Every sample's tokens of every request, in request order.
fn run(engine: &mut LlmEngine<CpuBackend>, requests: Vec<GenerationRequest>) -> Vec<Vec<Vec<u32>>> {
    let done = engine.generate(requests).expect("generate");
    let usage = engine.scheduler().kv_usage();
    assert_eq!(usage.used_blocks, 0, "blocks held after every request finished: {usage:?}");
    done.into_iter().map(|r| r.seqs.into_iter().map(|s| s.token_ids).collect()).collect()
}

fn greedy_requests(max_tokens: usize) -> Vec<GenerationRequest> {
    prompts().iter().enumerate().map(|(i, p)| request(i, p, max_tokens, SamplingParams::greedy())).collect()
}

/// Seeded sampling with every parameter that changes the distribution,
/// penalties (which read the history, drafts included) among them, and
/// `n = 2` on one request.
fn sampled_requests(max_tokens: usize) -> Vec<GenerationRequest> {
    let mut requests: Vec<GenerationRequest> = prompts()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sampling = SamplingParams {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.02,
                repetition_penalty: if i % 2 == 0 { 1.1 } else { 1.0 },
                frequency_penalty: if i % 3 == 0 { 0.3 } else { 0.0 },
                presence_penalty: if i % 3 == 1 { 0.2 } else { 0.0 },
                seed: Some(1000 + i as u64),
                ..SamplingParams::default()
            };
            request(i, p, max_tokens, sampling)
        })
        .collect();
    requests[0].n = 2;
    requests
}

/// A proposer that replays what the target model produces without
/// speculation (every draft accepted), or that shifts it by one token id
/// (almost every draft rejected).
struct Replay {
    /// Per request prompt, the tokens the target continues it with.
    continuations: Vec<(Vec<u32>, Vec<u32>)>,
    wrong: bool,
}

impl Proposer for Replay {
    fn name(&self) -> &str {
        "replay"
    }

    fn propose(&mut self, seqs: &[DraftRequest<'_>]) -> Result<Vec<Vec<TokenId>>, EngineError> {
        Ok(seqs
            .iter()
            .map(|s| {
                for (prompt, output) in &self.continuations {
                    if s.tokens.len() > prompt.len() && s.tokens.starts_with(prompt) {
                        let done = s.tokens.len() - prompt.len();
                        if output.len() < done || output[..done] != s.tokens[prompt.len()..] {
                            continue;
                        }
                        let next = output[done..].iter().take(s.max_drafts);
                        return next.map(|&t| if self.wrong { (t + 1) % 1000 } else { t }).collect();
                    }
                }
                Vec::new()
            })
            .collect())
    }

    fn forget(&mut self, _seq: SeqId) {}
}

#[test]
fn ngram_speculation_gives_the_tokens_of_plain_decoding() {
    let _serial = serial();
    let mut plain = engine(EngineConfig::default());
    let want_greedy = run(&mut plain, greedy_requests(16));
    let want_sampled = run(&mut plain, sampled_requests(16));
    drop(plain);

    // Synchronous and asynchronous scheduling; a step budget small enough to
    // chunk the prompts.
    for async_scheduling in [false, true] {
        let config = EngineConfig {
            speculative: Some(ngram(4)),
            async_scheduling,
            max_num_batched_tokens: 48,
            long_prefill_token_threshold: Some(16),
            ..EngineConfig::default()
        };
        let mut e = engine(config);
        assert_eq!(run(&mut e, greedy_requests(16)), want_greedy, "greedy, async = {async_scheduling}");
        if async_scheduling {
            assert_eq!(run(&mut e, sampled_requests(16)), want_sampled, "sampled");
        } else {
            // One at a time (no batching): the same tokens.
            let some = greedy_requests(16).into_iter().rev().take(3);
            let single: Vec<Vec<Vec<u32>>> = some.flat_map(|r| run(&mut e, vec![r])).collect();
            let want: Vec<Vec<Vec<u32>>> = want_greedy.iter().rev().take(3).cloned().collect();
            assert_eq!(single, want, "one request at a time");
        }
        let stats = e.spec_decode_stats().expect("speculating");
        assert!(stats.num_drafts > 0 && stats.num_accepted_tokens > 0, "{stats:?}");
        assert!(stats.num_accepted_tokens <= stats.num_draft_tokens);
    }
}

#[test]
fn speculation_survives_preemption() {
    let _serial = serial();
    // A pool of 12 blocks of 16 for 9 requests of 20-90 tokens: they
    // preempt each other (recompute and swap).
    let mut plain = engine(EngineConfig { num_gpu_blocks: Some(12), ..EngineConfig::default() });
    let want = run(&mut plain, greedy_requests(24));
    drop(plain);
    for preemption_mode in [PreemptionMode::Recompute, PreemptionMode::Swap] {
        let config = EngineConfig {
            num_gpu_blocks: Some(12),
            preemption_mode,
            speculative: Some(ngram(4)),
            ..EngineConfig::default()
        };
        let mut e = engine(config);
        assert_eq!(run(&mut e, greedy_requests(24)), want, "{preemption_mode:?}");
        assert!(e.scheduler().stats().num_preemptions > 0, "the pool is small enough to preempt");
    }
}

#[test]
fn an_always_right_and_an_always_wrong_proposer_change_no_token() {
    let _serial = serial();
    let mut plain = engine(EngineConfig::default());
    let greedy = run(&mut plain, greedy_requests(16));
    let sampled = run(&mut plain, sampled_requests(16));
    drop(plain);
    let continuations = |outputs: &[Vec<Vec<u32>>]| -> Vec<(Vec<u32>, Vec<u32>)> {
        prompts().into_iter().zip(outputs).map(|(p, o)| (p, o[0].clone())).collect()
    };
    let config = || EngineConfig { speculative: None, ..EngineConfig::default() };
    let k4 = ngram(4);

    // Right: every draft accepted (so each verification gives 5 tokens).
    let mut e = engine(config());
    e.set_proposer(k4.clone(), Box::new(Replay { continuations: continuations(&greedy), wrong: false }));
    assert_eq!(run(&mut e, greedy_requests(16)), greedy);
    let stats = e.spec_decode_stats().expect("on");
    assert!(stats.num_drafts > 0);
    assert_eq!(
        stats.num_accepted_tokens, stats.num_draft_tokens,
        "a perfect proposer is always accepted: {stats:?}"
    );

    // Wrong: drafts rejected, the tokens unchanged.
    let mut e = engine(config());
    e.set_proposer(k4.clone(), Box::new(Replay { continuations: continuations(&greedy), wrong: true }));
    assert_eq!(run(&mut e, greedy_requests(16)), greedy);
    let stats = e.spec_decode_stats().expect("on");
    assert!(stats.num_draft_tokens > 0);
    assert!(stats.acceptance_rate() < 0.1, "a wrong proposer is rejected: {stats:?}");

    // Verification steps run as steps of one-token rows on the padded
    // buffers decode graphs replay from: one request, so that each of its
    // verifications is a step of its own; then the batch, right and wrong.
    for wrong in [false, true] {
        let mut e = engine(config());
        e.force_decode_graphs().expect("padded decode buffers");
        e.set_proposer(k4.clone(), Box::new(Replay { continuations: continuations(&greedy), wrong }));
        let first: Vec<GenerationRequest> = greedy_requests(16).into_iter().take(1).collect();
        assert_eq!(run(&mut e, first), greedy[..1], "padded, wrong = {wrong}");
        let (stats, graphs) = (e.spec_decode_stats().expect("on"), e.runner().timings().graphs);
        assert!(stats.num_drafts > 0, "{stats:?}");
        assert!(graphs.steps >= stats.num_drafts, "every verification ran padded: {graphs:?} {stats:?}");
        assert_eq!(run(&mut e, greedy_requests(16)), greedy, "padded batch, wrong = {wrong}");
    }

    // Sampled requests with the sampled continuation as drafts: same tokens.
    let mut e = engine(config());
    e.set_proposer(k4, Box::new(Replay { continuations: continuations(&sampled), wrong: false }));
    assert_eq!(run(&mut e, sampled_requests(16)), sampled);
    let stats = e.spec_decode_stats().expect("on");
    assert!(stats.num_accepted_tokens > 0, "{stats:?}");
}

/// Always drafts the same token after the prompt's first generated token.
struct FixedDraft {
    prompt_len: usize,
    draft: TokenId,
}

impl Proposer for FixedDraft {
    fn name(&self) -> &str {
        "fixed"
    }

    fn propose(&mut self, seqs: &[DraftRequest<'_>]) -> Result<Vec<Vec<TokenId>>, EngineError> {
        Ok(seqs
            .iter()
            .map(|s| if s.tokens.len() == self.prompt_len + 1 { vec![self.draft] } else { vec![] })
            .collect())
    }
}

/// The chi-square statistic's critical value at p = 0.001 for `dof` degrees
/// of freedom (Wilson-Hilferty approximation).
fn chi_square_critical_0_001(dof: usize) -> f64 {
    let k = dof as f64;
    let z = 3.090_232; // the standard normal's 0.999 quantile
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

#[test]
fn sampled_tokens_follow_the_target_distribution_under_speculation() {
    let _serial = serial();
    // A prompt whose first token is nearly certain, then a spread-out second.
    let prompt = prompts()[0].clone();
    let mut e = engine(EngineConfig::default());
    let first = run(&mut e, vec![request(0, &prompt, 1, SamplingParams::greedy())])[0][0][0];
    // The target's distribution of the second token after `first` (temperature 1).
    let mut probe = request(1, &[prompt.clone(), vec![first]].concat(), 1, SamplingParams::greedy());
    probe.sampling.logprobs = Some(20);
    let done = e.generate(vec![probe]).expect("probe");
    let top = done[0].seqs[0].logprobs[0].top.clone();
    let probs: Vec<(u32, f64)> = top.iter().map(|&(t, lp)| (t, (lp as f64).exp())).collect();
    // Draft the most likely second token: accepted with probability p(d),
    // else the residual is sampled (p without d).
    let draft = probs[0].0;
    let config = ngram(1);
    e.set_proposer(config, Box::new(FixedDraft { prompt_len: prompt.len(), draft }));

    const N: usize = 800;
    let requests: Vec<GenerationRequest> = (0..N)
        .map(|i| {
            let sampling =
                SamplingParams { temperature: 1.0, seed: Some(i as u64), ..SamplingParams::default() };
            request(i, &prompt, 3, sampling)
        })
        .collect();
    let outputs = run(&mut e, requests);
    let stats = e.spec_decode_stats().expect("on");
    assert!(stats.num_drafts > 0, "{stats:?}");
    // The second token of the samples whose first token is `first`.
    let mut counts: HashMap<u32, usize> = HashMap::new();
    let mut total = 0;
    for o in &outputs {
        if o[0][0] == first {
            *counts.entry(o[0][1]).or_default() += 1;
            total += 1;
        }
    }
    assert!(total > N / 2, "the first token is the likely one ({total} of {N})");
    // Categories: each top token expected at least 5 times, the rest pooled.
    let mut chi2 = 0.0;
    let mut dof = 0;
    let mut pooled_p = 1.0;
    let mut pooled_count = total;
    for &(t, p) in &probs {
        let expected = p * total as f64;
        if expected < 5.0 {
            continue;
        }
        let observed = counts.get(&t).copied().unwrap_or(0);
        chi2 += (observed as f64 - expected).powi(2) / expected;
        pooled_p -= p;
        pooled_count -= observed;
        dof += 1;
    }
    let expected_rest = pooled_p.max(0.0) * total as f64;
    if expected_rest >= 5.0 {
        chi2 += (pooled_count as f64 - expected_rest).powi(2) / expected_rest;
        dof += 1;
    }
    assert!(dof >= 3, "enough categories to test: {probs:?}");
    let critical = chi_square_critical_0_001(dof - 1);
    assert!(
        chi2 < critical,
        "chi-square {chi2:.1} >= {critical:.1} ({dof} categories, {total} samples): {counts:?} vs {probs:?}"
    );
}

// ---- draft models ---------------------------------------------------------

/// A folder removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn draft_config(model: &std::path::Path, k: usize) -> SpeculativeConfig {
    SpeculativeConfig::from_json(&format!(
        r#"{{"model": "{}", "num_speculative_tokens": {k}, "min_acceptance_rate": 0}}"#,
        model.display()
    ))
    .expect("config")
}

/// A draft that shares SmolLM2's vocabulary and knows nothing: the tiny
/// test Llama's layers with a random embedding of 49152 rows (tied to the
/// output), written to a temporary folder.
fn random_draft() -> TempDir {
    use safetensors::tensor::{Dtype, TensorView};
    let tiny = workspace_root().join("tests/fixtures/tiny-llama");
    let dir = TempDir::new("pagoda-random-draft");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).expect("config"))
            .expect("json");
    config["vocab_size"] = 49152.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write config");
    let bytes = std::fs::read(tiny.join("model.safetensors")).expect("weights");
    let weights = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut embedding = Vec::with_capacity(49152 * 64 * 4);
    for _ in 0..49152 * 64 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
        embedding.extend_from_slice(&x.to_le_bytes());
    }
    let mut tensors: Vec<(String, TensorView<'_>)> = Vec::new();
    for (name, view) in weights.tensors() {
        if name == "model.embed_tokens.weight" {
            assert_eq!(view.shape()[1], 64);
            tensors.push((name, TensorView::new(Dtype::F32, vec![49152, 64], &embedding).expect("view")));
        } else {
            tensors.push((name, view));
        }
    }
    let out = safetensors::serialize(tensors, None).expect("serialize");
    std::fs::write(dir.path().join("model.safetensors"), out).expect("write weights");
    dir
}

#[test]
fn a_draft_model_proposes_and_changes_no_token() {
    let _serial = serial();
    let mut plain = engine(EngineConfig::default());
    let want_greedy = run(&mut plain, greedy_requests(12));
    let want_sampled = run(&mut plain, sampled_requests(12));
    drop(plain);

    // The model as its own draft: its greedy drafts are the greedy tokens.
    let config =
        EngineConfig { speculative: Some(draft_config(&model_path(), 3)), ..EngineConfig::default() };
    let mut e = engine(config.clone());
    assert_eq!(run(&mut e, greedy_requests(12)), want_greedy, "self-draft, greedy");
    let stats = e.spec_decode_stats().expect("on");
    assert!(stats.acceptance_rate() > 0.9, "a model drafting for itself is accepted: {stats:?}");
    assert_eq!(run(&mut e, sampled_requests(12)), want_sampled, "self-draft, sampled");
    drop(e);

    // A random draft: nearly every draft rejected, the tokens unchanged.
    let bad = random_draft();
    let config = EngineConfig { speculative: Some(draft_config(bad.path(), 3)), ..EngineConfig::default() };
    let mut e = engine(config);
    assert_eq!(run(&mut e, greedy_requests(12)), want_greedy, "random draft");
    let stats = e.spec_decode_stats().expect("on");
    assert!(stats.num_draft_tokens > 0 && stats.acceptance_rate() < 0.2, "{stats:?}");
}

#[test]
fn a_draft_model_of_another_vocabulary_is_refused_by_name() {
    let _serial = serial();
    let tiny = workspace_root().join("tests/fixtures/tiny-llama");
    let config = EngineConfig { speculative: Some(draft_config(&tiny, 2)), ..EngineConfig::default() };
    let err = load_engine(CpuBackend::new(), model_path(), config, |_, _| {}).err().expect("refused");
    let message = err.to_string();
    assert!(message.contains("--speculative-config") && message.contains("vocabulary"), "{message}");
}
