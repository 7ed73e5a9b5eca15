//! Prompt logprobs (vLLM's `prompt_logprobs`) on the real default model
//! (SmolLM2-135M-Instruct) on the CPU reference backend.
//!
//! Oracles, each independent of the path under test (all prompt rows of a
//! prefill gathered before the LM head, a host log-softmax, positions filed
//! per chunk):
//! - the engine's own sampler: the prefix `prompt[..=p]` run as a request of
//!   its own, whose first sampled token's top-20 logprobs are the sampler's
//!   log-softmax of the last row of a separate forward pass;
//! - Hugging Face transformers (the golden fixture): at positions past the
//!   golden prompt, the prompt continues with transformers' greedy tokens, and
//!   the fixture's top-10 logits there fix every logprob difference.
//!
//! The bound, 2e-3 absolute, was fixed before any run: both engines compute
//! in f32 on the CPU, where the logits (of size ~20) differ by summation order
//! only, orders of magnitude below it.

use pagoda_backend::SamplingParams;
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{load_engine, EngineConfig, GenerationRequest, LlmEngine, PromptLogprob};
use serde_json::Value;

mod common;
use common::{ids, model_path, workspace_root};

const BOUND: f32 = 2e-3;

fn engine(config: EngineConfig) -> LlmEngine<CpuBackend> {
    let config = EngineConfig { kv_cache_memory_bytes: Some(64 << 20), ..config };
    load_engine(CpuBackend::new(), model_path(), config, |_, _| {}).expect("load SmolLM2")
}

/// The golden case "Once upon a time, in a small village,": its prompt, then
/// `extra` of transformers' greedy tokens, and transformers' top-10 (id,
/// logit) at each of those extra positions.
/// Transformers' top-10 `(id, logit)` at one position.
type TopLogits = Vec<(u32, f32)>;

fn golden_prompt(extra: usize) -> (Vec<u32>, usize, Vec<TopLogits>) {
    let path = workspace_root().join("tests/fixtures/smollm2/golden.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("golden")).expect("json");
    let case = golden["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .find(|p| p["prompt_text"].as_str().is_some_and(|t| t.starts_with("Once upon a time")))
        .expect("golden case");
    let mut prompt = ids(&case["prompt_ids"]);
    let base = prompt.len();
    prompt.extend(ids(&case["greedy_tokens"]).into_iter().take(extra));
    let tops = case["steps"].as_array().expect("steps")[..extra]
        .iter()
        .map(|s| {
            let ids = ids(&s["top_ids"]);
            let logits = s["top_logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32);
            ids.into_iter().zip(logits).collect()
        })
        .collect();
    (prompt, base, tops)
}

fn request(id: &str, prompt: Vec<u32>, prompt_logprobs: Option<usize>) -> GenerationRequest {
    let mut r = GenerationRequest::new(id, prompt);
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(1);
    r.ignore_eos = true;
    r.prompt_logprobs = prompt_logprobs;
    r
}

/// Runs one prompt-logprobs request; returns its entries and its cached tokens.
fn prompt_logprobs(
    e: &mut LlmEngine<CpuBackend>,
    prompt: &[u32],
    k: usize,
) -> (Vec<Option<PromptLogprob>>, usize) {
    let out = e.generate(vec![request("p", prompt.to_vec(), Some(k))]).expect("generate").remove(0);
    (out.prompt_logprobs.expect("prompt logprobs asked for"), out.num_cached_tokens)
}

fn assert_close(a: f32, b: f32, what: &str) {
    assert!((a - b).abs() <= BOUND, "{what}: {a} vs {b} (bound {BOUND})");
}

/// Each entry's shape: the prompt token, its rank among the top list, the
/// top list sorted.
fn check_shape(prompt: &[u32], entries: &[Option<PromptLogprob>], k: usize) {
    assert_eq!(entries.len(), prompt.len());
    assert!(entries[0].is_none(), "the first prompt token has no logprob");
    for (p, entry) in entries.iter().enumerate().skip(1) {
        let e = entry.as_ref().unwrap_or_else(|| panic!("position {p} has no logprob"));
        assert_eq!(e.token, prompt[p]);
        assert_eq!(e.top.len(), k);
        assert!(e.top.windows(2).all(|w| w[0].1 >= w[1].1), "top list sorted");
        assert!(e.logprob <= 0.0 && e.rank >= 1);
        if let Some(i) = e.top.iter().position(|&(t, _)| t == e.token) {
            assert_eq!(e.rank as usize, i + 1, "position {p}: rank of a token in the top list");
            assert_eq!(e.top[i].1, e.logprob);
        } else {
            assert!(e.rank as usize > k, "position {p}: rank {} of a token outside the top {k}", e.rank);
        }
    }
}

fn assert_same(a: &[Option<PromptLogprob>], b: &[Option<PromptLogprob>], what: &str) {
    assert_eq!(a.len(), b.len());
    for (p, (x, y)) in a.iter().zip(b).enumerate().skip(1) {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        assert_close(x.logprob, y.logprob, &format!("{what}, position {p}"));
        for ((tx, lx), (ty, ly)) in x.top.iter().zip(&y.top) {
            assert_eq!(tx, ty, "{what}, position {p}: top tokens");
            assert_close(*lx, *ly, &format!("{what}, position {p}, top token {tx}"));
        }
    }
}

#[test]
fn prompt_logprobs_match_the_sampler_and_transformers_with_a_cached_prefix_and_in_chunks() {
    let (prompt, base, tops) = golden_prompt(4);
    let k = 20;
    // Prefix caching on, blocks of 8: the prompt's first blocks get cached by
    // an ordinary request first.
    let mut e = engine(EngineConfig { block_size: 8, enable_prefix_caching: true, ..Default::default() });
    let warm = e.generate(vec![request("warm", prompt.clone(), None)]).unwrap().remove(0);
    assert_eq!(warm.prompt_logprobs, None, "not asked for");
    let again = e.generate(vec![request("again", prompt.clone(), None)]).unwrap().remove(0);
    assert!(again.num_cached_tokens >= 8, "a cached prefix is present: {}", again.num_cached_tokens);

    let (entries, cached) = prompt_logprobs(&mut e, &prompt, k);
    assert_eq!(cached, 0, "a prompt-logprobs request recomputes its whole prompt");
    check_shape(&prompt, &entries, k);

    // Oracle 1: each prefix run alone; its first sample's top-20 logprobs.
    for p in 1..prompt.len() {
        let mut r = request("prefix", prompt[..p].to_vec(), None);
        r.sampling.logprobs = Some(k as u32);
        let out = e.generate(vec![r]).unwrap().remove(0);
        let sampled = &out.seqs[0].logprobs[0];
        let got = entries[p].as_ref().unwrap();
        for ((t_want, lp_want), (t_got, lp_got)) in sampled.top.iter().zip(&got.top) {
            assert_eq!(t_want, t_got, "position {p}: top tokens");
            assert_close(*lp_got, *lp_want, &format!("position {p}, token {t_want}"));
        }
        if let Some(&(_, lp)) = sampled.top.iter().find(|&&(t, _)| t == prompt[p]) {
            assert_close(got.logprob, lp, &format!("position {p}, the prompt token"));
        }
    }

    // Oracle 2: transformers' logits at the positions past the golden prompt
    // (prompt token p is transformers' greedy token of step p - base).
    for (step, top) in tops.iter().enumerate() {
        let p = base + step;
        let got = entries[p].as_ref().unwrap();
        assert_eq!(got.token, top[0].0, "the prompt continues with transformers' greedy token");
        assert_eq!(got.rank, 1);
        for (i, &(t, logit)) in top.iter().enumerate() {
            assert_eq!(got.top[i].0, t, "position {p}: transformers' top-10 order");
            // log p(t) - log p(top) = logit(t) - logit(top).
            assert_close(got.top[i].1 - got.logprob, logit - top[0].1, &format!("position {p}, token {t}"));
        }
    }

    // Ordinary requests still use the cache afterwards.
    let after = e.generate(vec![request("after", prompt.clone(), None)]).unwrap().remove(0);
    assert!(after.num_cached_tokens >= 8);
    drop(e);

    // Chunked prefill: chunks of at most 5 tokens each contribute their positions.
    let mut chunked = engine(EngineConfig {
        block_size: 8,
        enable_chunked_prefill: true,
        max_num_batched_tokens: 5,
        ..Default::default()
    });
    let (chunks, _) = prompt_logprobs(&mut chunked, &prompt, k);
    check_shape(&prompt, &chunks, k);
    assert_same(&chunks, &entries, "chunked prefill");

    // Beside other requests, with n > 1: the same values, on the first output only.
    let mut other = request("other", prompt[..7].to_vec(), None);
    other.max_tokens = Some(4);
    let mut wanted = request("mixed", prompt.clone(), Some(k));
    wanted.n = 2;
    wanted.max_tokens = Some(3);
    wanted.sampling = SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() };
    let outs = chunked.generate(vec![other, wanted]).unwrap();
    assert_eq!(outs[0].prompt_logprobs, None);
    assert_same(outs[1].prompt_logprobs.as_ref().unwrap(), &entries, "in a mixed batch");
}
