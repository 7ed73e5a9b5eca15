//! The whole engine on the real default model (SmolLM2-135M-Instruct) on the
//! CPU reference backend: scheduler + paged KV + model + sampler end to end.
//!
//! Greedy tokens must equal Hugging Face transformers' (the golden fixture)
//! and must not depend on what else is in the batch, on prefix caching, on
//! the block size, or on preemption (recompute or swap).

use std::sync::OnceLock;

use pagoda_backend::{Backend, SamplingParams};
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{
    CompletedRequest, EngineConfig, FinishReason, GenerationRequest, LlmEngine, PreemptionMode, StopReason,
};
use serde_json::Value;

mod common;
use common::{engine, ids, serial, workspace_root};

fn golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let path = workspace_root().join("tests/fixtures/smollm2/golden.json");
        serde_json::from_str(&std::fs::read_to_string(&path).expect("golden fixture")).expect("golden JSON")
    })
}

/// (prompt ids, transformers' greedy tokens) of every golden prompt.
fn golden_cases() -> Vec<(Vec<u32>, Vec<u32>)> {
    golden()["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| (ids(&p["prompt_ids"]), ids(&p["greedy_tokens"])))
        .collect()
}

fn greedy(id: impl Into<String>, prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    let mut r = GenerationRequest::new(id, prompt);
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r
}

/// Tokens compared in the invariance tests (the golden test checks all 32).
const TOKENS: usize = 16;

fn run_all<B: Backend>(engine: &mut LlmEngine<B>, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let reqs =
        prompts.iter().enumerate().map(|(i, p)| greedy(format!("r{i}"), p.clone(), max_tokens)).collect();
    engine.generate(reqs).expect("generate").into_iter().map(|r| r.seqs[0].token_ids.clone()).collect()
}

fn assert_no_blocks_held<B: Backend>(engine: &LlmEngine<B>) {
    let usage = engine.scheduler().kv_usage();
    assert_eq!(usage.used_blocks, 0, "blocks still held after every request finished: {usage:?}");
    assert_eq!(usage.used_cpu_blocks, 0, "CPU swap blocks still held: {usage:?}");
}

#[test]
fn greedy_tokens_match_transformers_through_the_engine() {
    let _serial = serial();
    let cases = golden_cases();
    let mut e = engine(EngineConfig::default());
    // All prompts in one batch; each stops where transformers stopped (EOS or 32 tokens).
    let reqs = cases
        .iter()
        .enumerate()
        .map(|(i, (prompt, want))| {
            let mut r = greedy(format!("g{i}"), prompt.clone(), want.len());
            r.ignore_eos = false;
            r
        })
        .collect();
    let got = e.generate(reqs).expect("generate");
    for (i, ((_, want), got)) in cases.iter().zip(&got).enumerate() {
        assert_eq!(&got.seqs[0].token_ids, want, "golden prompt {i}: greedy tokens differ from transformers");
    }
    assert_no_blocks_held(&e);
}

/// Eight different prompts: the golden ones plus two made from them.
fn batch_of_eight() -> Vec<Vec<u32>> {
    let mut prompts: Vec<Vec<u32>> = golden_cases().into_iter().map(|(p, _)| p).collect();
    let longest = prompts.iter().max_by_key(|p| p.len()).expect("prompts").clone();
    prompts.push(longest[..longest.len() / 2].to_vec());
    prompts.push([longest.clone(), longest].concat());
    prompts.truncate(8);
    assert_eq!(prompts.len(), 8);
    prompts
}

#[test]
fn batching_prefix_caching_and_block_size_do_not_change_greedy_tokens() {
    let _serial = serial();
    let prompts = batch_of_eight();
    let target = 0;
    let alone = run_all(&mut engine(EngineConfig::default()), &prompts[target..=target], TOKENS);
    for (block_size, prefix_caching) in [(16, true), (16, false), (32, true), (32, false)] {
        let config = EngineConfig { block_size, enable_prefix_caching: prefix_caching, ..Default::default() };
        let mut e = engine(config);
        let batched = run_all(&mut e, &prompts, TOKENS);
        assert_eq!(
            batched[target], alone[0],
            "block size {block_size}, prefix caching {prefix_caching}: batched greedy tokens differ from alone"
        );
        // Every other prompt of the batch also equals its own solo run.
        if block_size == 16 && prefix_caching {
            for (i, p) in prompts.iter().enumerate().skip(1) {
                let solo = run_all(&mut e, std::slice::from_ref(p), TOKENS);
                assert_eq!(batched[i], solo[0], "prompt {i}: batched vs alone");
            }
        }
        assert_no_blocks_held(&e);
    }
}

#[test]
fn preemption_by_recompute_and_by_swap_keeps_greedy_tokens() {
    let _serial = serial();
    let prompts = batch_of_eight();
    let reference = run_all(&mut engine(EngineConfig::default()), &prompts, TOKENS);
    let longest = prompts.iter().map(|p| p.len()).max().expect("prompts") + TOKENS;
    // Enough blocks for the longest sequence alone, far too few for all eight.
    let blocks = longest.div_ceil(16) + 2;
    for mode in [PreemptionMode::Recompute, PreemptionMode::Swap] {
        let config = EngineConfig {
            num_gpu_blocks: Some(blocks),
            preemption_mode: mode,
            swap_space_bytes: 64 << 20,
            enable_prefix_caching: false,
            ..Default::default()
        };
        let mut e = engine(config);
        let got = run_all(&mut e, &prompts, TOKENS);
        let preemptions = e.scheduler().stats().num_preemptions;
        assert!(preemptions > 0, "{mode:?}: the tiny KV pool should have forced preemptions");
        assert_eq!(
            got, reference,
            "{mode:?}: greedy tokens changed under preemption ({preemptions} preemptions)"
        );
        assert_no_blocks_held(&e);
    }
}

#[test]
fn prefix_cache_is_hit_by_a_repeated_prompt() {
    let _serial = serial();
    let mut e = engine(EngineConfig::default());
    let prompt = batch_of_eight().pop().expect("a long prompt");
    let first = e.generate(vec![greedy("a", prompt.clone(), 4)]).expect("first");
    let second = e.generate(vec![greedy("b", prompt.clone(), 4)]).expect("second");
    assert_eq!(first[0].num_cached_tokens, 0);
    let full_blocks = (prompt.len() - 1) / 16 * 16;
    assert!(
        second[0].num_cached_tokens >= full_blocks.min(prompt.len() - 1) && second[0].num_cached_tokens > 0,
        "second run reused {} of {} prompt tokens",
        second[0].num_cached_tokens,
        prompt.len()
    );
    assert_eq!(first[0].seqs[0].token_ids, second[0].seqs[0].token_ids);
}

fn single(engine: &mut LlmEngine<CpuBackend>, req: GenerationRequest) -> CompletedRequest {
    engine.generate(vec![req]).expect("generate").remove(0)
}

#[test]
fn parallel_samples_share_the_prompt_and_seeds_reproduce() {
    let _serial = serial();
    let mut e = engine(EngineConfig::default());
    let prompt = golden_cases()[3].0.clone();
    let sampled = |seed| {
        let mut r = greedy("s", prompt.clone(), 12);
        r.sampling = SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() };
        r.n = 3;
        r
    };
    let a = single(&mut e, sampled(7));
    let b = single(&mut e, sampled(7));
    assert_eq!(a.seqs.len(), 3);
    assert_eq!(a.seqs, b.seqs, "the same seed must give the same samples");
    let distinct: std::collections::HashSet<_> = a.seqs.iter().map(|s| s.token_ids.clone()).collect();
    assert!(distinct.len() > 1, "three samples at temperature 1 were identical: {:?}", a.seqs);

    // n=2 greedy: both samples equal the n=1 greedy run.
    let mut g = greedy("g", prompt.clone(), 12);
    let one = single(&mut e, g.clone());
    g.n = 2;
    let two = single(&mut e, g);
    for s in &two.seqs {
        assert_eq!(s.token_ids, one.seqs[0].token_ids);
    }
    // The seeded sample of a request does not depend on the batch around it.
    let mut batch = vec![sampled(11)];
    batch[0].request_id = "seeded".into();
    batch.extend(batch_of_eight().into_iter().enumerate().map(|(i, p)| greedy(format!("o{i}"), p, 6)));
    let in_batch = e.generate(batch).expect("batch").remove(0);
    let alone = single(&mut e, sampled(11));
    assert_eq!(in_batch.seqs, alone.seqs);
    assert_no_blocks_held(&e);
}

#[test]
fn stop_conditions_end_sequences_with_the_right_reason() {
    let _serial = serial();
    let mut e = engine(EngineConfig::default());
    let (prompt, want) = golden_cases()[0].clone();
    // max_tokens: length.
    let r = single(&mut e, greedy("len", prompt.clone(), 5));
    assert_eq!(r.seqs[0].finish_reason, Some(FinishReason::Length));
    assert_eq!(r.seqs[0].token_ids, want[..5]);
    // A stop token id: the sequence ends at it, reported, and not in the text.
    // (The first token that does not occur earlier in the greedy output.)
    let k = (2..want.len()).find(|&i| !want[..i].contains(&want[i])).expect("a fresh token");
    let mut req = greedy("tok", prompt.clone(), 20);
    req.stop_token_ids = vec![want[k]];
    let r = single(&mut e, req);
    assert_eq!(r.seqs[0].finish_reason, Some(FinishReason::Stop));
    assert_eq!(r.seqs[0].stop_reason, Some(StopReason::TokenId(want[k])));
    assert_eq!(r.seqs[0].token_ids, want[..=k]);
    // A stop string taken from the greedy text: the text is cut before it.
    let full = single(&mut e, greedy("full", prompt.clone(), 12));
    let text = full.seqs[0].text.clone();
    let stop: String = text.trim_start().chars().skip(3).take(4).collect();
    assert!(!stop.is_empty(), "greedy text too short: {text:?}");
    let mut req = greedy("str", prompt.clone(), 12);
    req.stop = vec![stop.clone()];
    let r = single(&mut e, req);
    assert_eq!(r.seqs[0].finish_reason, Some(FinishReason::Stop));
    assert_eq!(r.seqs[0].stop_reason, Some(StopReason::String(stop.clone())));
    let cut = text.find(&stop).expect("stop occurs in the text");
    assert_eq!(r.seqs[0].text, text[..cut]);
    assert_no_blocks_held(&e);
}

#[test]
fn eos_ends_a_chat_answer_and_its_text_is_sensible() {
    let _serial = serial();
    let mut e = engine(EngineConfig::default());
    let chat = golden()["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .find(|p| p["kind"] == "chat")
        .expect("a chat prompt");
    let mut req = greedy("chat", ids(&chat["prompt_ids"]), 200);
    req.ignore_eos = false;
    let r = single(&mut e, req);
    assert_eq!(r.seqs[0].finish_reason, Some(FinishReason::Stop), "the answer should end with <|im_end|>");
    assert_eq!(r.seqs[0].stop_reason, None, "EOS is reported as a plain stop");
    assert!(!r.seqs[0].text.contains("<|im_end|>"));
    let want = e.tokenizer().decode(&r.seqs[0].token_ids, true).expect("decode");
    assert_eq!(r.seqs[0].text, want, "streamed text equals a one-shot decode");
}

#[test]
fn abort_frees_blocks_at_once_and_bad_requests_are_refused() {
    let _serial = serial();
    let mut e = engine(EngineConfig::default());
    let prompt = batch_of_eight().pop().expect("prompt");
    e.add_request(greedy("victim", prompt.clone(), 50)).expect("add");
    e.add_request(greedy("other", prompt[..10].to_vec(), 3)).expect("add");
    e.step().expect("step");
    assert!(e.scheduler().kv_usage().used_blocks > 0);
    let last = e.abort_request("victim").expect("live request");
    assert!(last.finished);
    assert_eq!(last.deltas[0].finish_reason, Some(FinishReason::Abort));
    while e.has_unfinished_requests() {
        e.step().expect("step");
    }
    assert_no_blocks_held(&e);
    assert!(e.abort_request("victim").is_none(), "a finished request cannot be aborted twice");

    let max_len = e.info().max_model_len;
    let vocab = e.info().vocab_size as u32;
    let too_long = greedy("long", vec![1; max_len], 1);
    let out_of_vocab = greedy("vocab", vec![vocab], 1);
    let empty = greedy("empty", vec![], 1);
    let mut bad_temp = greedy("temp", vec![1, 2], 1);
    bad_temp.sampling.temperature = -1.0;
    for req in [too_long, out_of_vocab, empty, bad_temp] {
        let id = req.request_id.clone();
        assert!(
            matches!(e.add_request(req), Err(pagoda_engine::EngineError::InvalidRequest { .. })),
            "{id} should be refused as invalid"
        );
    }
    e.add_request(greedy("dup", vec![1, 2], 1)).expect("add");
    assert!(matches!(
        e.add_request(greedy("dup", vec![1, 2], 1)),
        Err(pagoda_engine::EngineError::DuplicateRequest(_))
    ));
}

/// Decode steps padded into the fixed buffers graphs replay from (bucket
/// batch sizes 1, 2, 4, 8, …; padding rows that write no cache slot) give the
/// same greedy tokens as unpadded steps. The CPU cannot record graphs, so
/// this checks the padding itself; the CUDA model test checks the replays.
#[test]
fn padded_decode_steps_keep_greedy_tokens() {
    let _serial = serial();
    let prompts = batch_of_eight();
    let mut plain = engine(EngineConfig::default());
    let mut padded = engine(EngineConfig::default());
    padded.force_decode_graphs().expect("padded decode buffers");
    // Three prompts pad to a bucket of 4; all eight fill one of 8 until some finish.
    for batch in [&prompts[..3], &prompts[..]] {
        let want = run_all(&mut plain, batch, TOKENS);
        let got = run_all(&mut padded, batch, TOKENS);
        assert_eq!(got, want, "{} prompts: padded decode steps changed greedy tokens", batch.len());
    }
    let stats = padded.runner().timings().graphs;
    assert!(stats.warmups >= 2, "decode steps should have run padded: {stats:?}");
    assert_eq!(stats.replays, 0, "the CPU backend records no graphs");
    assert_no_blocks_held(&padded);
}

/// Asynchronous scheduling (step N+1 scheduled and launched before step N's
/// tokens are back, its inputs fed from N's samples on the device) changes
/// nothing a client sees: tokens, text, finish reasons and logprobs equal a
/// synchronous engine's, for greedy and seeded sampling, penalties (which
/// fall back to waiting), stop strings and tokens found one step late, n > 1
/// forks, and padded decode steps.
#[test]
fn async_scheduling_gives_the_same_outputs_as_synchronous() {
    let _serial = serial();
    let prompts = batch_of_eight();
    let (prompt0, want0) = golden_cases()[0].clone();
    let requests = || {
        let mut reqs: Vec<GenerationRequest> =
            prompts.iter().enumerate().map(|(i, p)| greedy(format!("g{i}"), p.clone(), 4 + 3 * i)).collect();
        let mut seeded = greedy("seeded", prompts[1].clone(), 14);
        seeded.sampling = SamplingParams {
            temperature: 0.9,
            top_p: 0.9,
            seed: Some(5),
            logprobs: Some(2),
            ..Default::default()
        };
        reqs.push(seeded);
        let mut penalized = greedy("penalized", prompts[2].clone(), 12);
        penalized.sampling.repetition_penalty = 1.3;
        penalized.sampling.frequency_penalty = 0.5;
        reqs.push(penalized);
        let mut forked = greedy("forked", prompts[3].clone(), 9);
        forked.sampling = SamplingParams { temperature: 1.0, seed: Some(9), ..Default::default() };
        forked.n = 2;
        reqs.push(forked);
        let mut stop_token = greedy("stop-token", prompt0.clone(), 20);
        stop_token.stop_token_ids = vec![want0[3]];
        reqs.push(stop_token);
        let mut eos = greedy("eos", prompts[4].clone(), 40);
        eos.ignore_eos = false;
        reqs.push(eos);
        reqs
    };
    let sync_config = EngineConfig { async_scheduling: false, ..EngineConfig::default() };
    let mut sync = engine(sync_config);
    let want = sync.generate(requests()).expect("synchronous");
    // A stop string from the synchronous text, matched one step late here.
    let text = &want[0].seqs[0].text;
    let stop: String = text.trim_start().chars().skip(2).take(3).collect();
    let with_stop = |mut reqs: Vec<GenerationRequest>| {
        let mut r = greedy("stop-string", prompts[0].clone(), 20);
        r.stop = vec![stop.clone()];
        reqs.push(r);
        reqs
    };
    let want = sync.generate(with_stop(requests())).expect("synchronous");
    assert_eq!(sync.step_timings().launched_ahead, 0);

    for padded in [false, true] {
        let mut e = engine(EngineConfig::default());
        if padded {
            e.force_decode_graphs().expect("padded decode buffers");
        }
        let got = e.generate(with_stop(requests())).expect("asynchronous");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(
                g.seqs, w.seqs,
                "{} (padded: {padded}) differs from the synchronous engine",
                w.request_id
            );
        }
        // Penalties and forks made some of those steps wait; plain requests never do.
        assert!(e.step_timings().launched_ahead > 0);
        let before = e.step_timings();
        assert_eq!(run_all(&mut e, &prompts, TOKENS), run_all(&mut sync, &prompts, TOKENS));
        let (steps, ahead) =
            (e.step_timings().steps - before.steps, e.step_timings().launched_ahead - before.launched_ahead);
        assert!(ahead + 1 >= steps, "{ahead} of {steps} steps launched ahead (padded: {padded})");
        assert_no_blocks_held(&e);
    }
    let stop_string = want.last().expect("stop-string request");
    assert_eq!(stop_string.seqs[0].stop_reason, Some(StopReason::String(stop)));
}
