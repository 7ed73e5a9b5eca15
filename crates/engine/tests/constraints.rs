//! Structured-output constraints through the whole engine on the real default
//! model (CPU reference backend): every token of a constrained sample is one
//! its constraint allowed, forks (`n > 1`) keep their own constraint state,
//! and unconstrained requests in the same batch are untouched.

use std::sync::Arc;

use pagoda_backend::SamplingParams;
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{load_engine, EngineConfig, FixedTokenSet, GenerationRequest, LlmEngine};

mod common;
use common::model_path;

fn engine(async_scheduling: bool) -> LlmEngine<CpuBackend> {
    let config =
        EngineConfig { kv_cache_memory_bytes: Some(64 << 20), async_scheduling, ..EngineConfig::default() };
    load_engine(CpuBackend::new(), model_path(), config, |_, _| {}).expect("load SmolLM2")
}

fn request(
    id: &str,
    prompt: &[u32],
    sampling: SamplingParams,
    n: usize,
    max_tokens: usize,
) -> GenerationRequest {
    let mut r = GenerationRequest::new(id, prompt.to_vec());
    r.sampling = sampling;
    r.n = n;
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r
}

#[test]
fn constrained_samples_draw_only_allowed_tokens_and_leave_the_others_alone() {
    for async_scheduling in [false, true] {
        let mut e = engine(async_scheduling);
        let prompt = e.tokenizer().encode("The capital of France is", true).expect("encode");
        let alone =
            e.generate(vec![request("alone", &prompt, SamplingParams::greedy(), 1, 12)]).expect("alone");

        // Tokens the model would not pick on its own: the mask must force them.
        let allowed: Vec<u32> = vec![17, 250, 1001, 4242];
        let mut constrained = request(
            "constrained",
            &prompt,
            SamplingParams { seed: Some(3), ..SamplingParams::default() },
            3,
            12,
        );
        constrained.constraint = Some(Arc::new(FixedTokenSet::new(allowed.clone())));
        let mut greedy_constrained = request("greedy-constrained", &prompt, SamplingParams::greedy(), 1, 12);
        greedy_constrained.constraint = Some(Arc::new(FixedTokenSet::new(allowed.clone())));
        let free = request("free", &prompt, SamplingParams::greedy(), 1, 12);
        let done = e.generate(vec![constrained, greedy_constrained, free]).expect("generate");

        for r in &done {
            match r.request_id.as_str() {
                "free" => assert_eq!(
                    r.seqs[0].token_ids, alone[0].seqs[0].token_ids,
                    "an unconstrained request changed beside constrained ones (async {async_scheduling})"
                ),
                _ => {
                    for s in &r.seqs {
                        assert_eq!(s.token_ids.len(), 12);
                        assert!(
                            s.token_ids.iter().all(|t| allowed.contains(t)),
                            "{}: {:?} leaves the allowed set (async {async_scheduling})",
                            r.request_id,
                            s.token_ids
                        );
                    }
                }
            }
        }
        let sampled = done.iter().find(|r| r.request_id == "constrained").expect("constrained");
        assert_eq!(sampled.seqs.len(), 3);
        assert!(
            sampled.seqs.iter().any(|s| s.token_ids != sampled.seqs[0].token_ids),
            "three seeded samples over four tokens all came out the same"
        );
    }
}
