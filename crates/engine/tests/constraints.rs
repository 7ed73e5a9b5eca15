//! Structured-output constraints through the whole engine on the real default
//! model (CPU reference backend): every token of a constrained sample is one
//! its constraint allowed, forks (`n > 1`) keep their own constraint state,
//! and unconstrained requests in the same batch are untouched; the tokens a
//! grammar forces, proposed as drafts (fast-forward), change no token.

use std::sync::Arc;

use pagoda_backend::SamplingParams;
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{
    load_engine, EngineConfig, FixedTokenSet, GenerationRequest, LlmEngine, TokenConstraint,
    TokenConstraintFactory,
};

mod common;
use common::model_path;

fn engine(async_scheduling: bool) -> LlmEngine<CpuBackend> {
    engine_with(EngineConfig { async_scheduling, ..EngineConfig::default() })
}

fn engine_with(config: EngineConfig) -> LlmEngine<CpuBackend> {
    let config = EngineConfig { kv_cache_memory_bytes: Some(64 << 20), ..config };
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

/// Allows a fixed set and claims to force its tokens in turn: drafts the
/// model mostly rejects, so fast-forward's rejection path runs on every step.
#[derive(Clone, Debug)]
struct ForcesWrongly {
    allowed: Vec<u32>,
    accepted: usize,
}

impl TokenConstraint for ForcesWrongly {
    fn fill_mask(&mut self, words: &mut [u32]) {
        FixedTokenSet::new(self.allowed.clone()).fill_mask(words)
    }

    fn accept_token(&mut self, token: u32) -> Result<(), String> {
        self.accepted += 1;
        FixedTokenSet::new(self.allowed.clone()).accept_token(token)
    }

    fn boxed_clone(&self) -> Box<dyn TokenConstraint> {
        Box::new(self.clone())
    }

    fn forced_tokens(&mut self) -> Vec<u32> {
        (0..3).map(|i| self.allowed[(self.accepted + i) % self.allowed.len()]).collect()
    }

    fn rollback(&mut self, n: usize) -> Result<(), String> {
        self.accepted -= n;
        Ok(())
    }
}

impl TokenConstraintFactory for ForcesWrongly {
    fn new_constraint(&self) -> Box<dyn TokenConstraint> {
        Box::new(self.clone())
    }
}

/// Fast-forward (a grammar's forced tokens proposed as drafts, verified
/// under each row's mask) gives exactly the tokens of one-at-a-time
/// constrained decoding, greedy and seeded, alone and batched beside a free
/// request, synchronous and asynchronous; with a JSON schema whose keys the
/// grammar forces it takes fewer steps.
#[test]
fn forced_tokens_as_drafts_change_no_token() {
    let mut plain = engine_with(EngineConfig { max_fast_forward_tokens: 0, ..EngineConfig::default() });
    let prompt =
        plain.tokenizer().encode("Give a person as JSON, with a name and an age: ", true).expect("encode");
    let info = plain.info().clone();
    let compiler =
        pagoda_structured::GrammarCompiler::new(plain.tokenizer(), &info.eos_token_ids, info.vocab_size)
            .expect("grammar compiler");
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
        "required": ["name", "age", "city"],
        "additionalProperties": false
    });
    let grammar: Arc<dyn TokenConstraintFactory> =
        Arc::new(compiler.compile(&pagoda_structured::GrammarSpec::JsonSchema(schema)).expect("compile"));
    let wrong: Arc<dyn TokenConstraintFactory> =
        Arc::new(ForcesWrongly { allowed: vec![17, 250, 1001, 4242], accepted: 0 });
    let requests = |constraint: &Arc<dyn TokenConstraintFactory>| {
        let mut greedy = request("greedy", &prompt, SamplingParams::greedy(), 1, 40);
        greedy.ignore_eos = false;
        greedy.constraint = Some(constraint.clone());
        let mut seeded =
            request("seeded", &prompt, SamplingParams { seed: Some(11), ..SamplingParams::default() }, 2, 40);
        seeded.ignore_eos = false;
        seeded.constraint = Some(constraint.clone());
        let free = request("free", &prompt, SamplingParams::greedy(), 1, 12);
        vec![greedy, seeded, free]
    };
    let tokens = |done: Vec<pagoda_engine::CompletedRequest>| -> Vec<(String, Vec<Vec<u32>>)> {
        let mut v: Vec<_> = done
            .into_iter()
            .map(|r| (r.request_id, r.seqs.into_iter().map(|s| s.token_ids).collect()))
            .collect();
        v.sort();
        v
    };
    for (name, constraint) in [("json schema", &grammar), ("wrong forcing", &wrong)] {
        let want_alone = tokens(plain.generate(requests(constraint)[..1].to_vec()).expect("alone"));
        let steps_before = plain.metrics().engine_steps.get();
        let want = tokens(plain.generate(requests(constraint)).expect("batch"));
        let plain_steps = plain.metrics().engine_steps.get() - steps_before;
        for async_scheduling in [false, true] {
            let mut ff = engine_with(EngineConfig { async_scheduling, ..EngineConfig::default() });
            let alone = tokens(ff.generate(requests(constraint)[..1].to_vec()).expect("alone"));
            assert_eq!(alone, want_alone, "{name}, alone, async {async_scheduling}");
            let steps_before = ff.metrics().engine_steps.get();
            let batch = tokens(ff.generate(requests(constraint)).expect("batch"));
            let ff_steps = ff.metrics().engine_steps.get() - steps_before;
            assert_eq!(batch, want, "{name}, batched, async {async_scheduling}");
            let stats = ff.fast_forward_stats();
            println!("{name}, async {async_scheduling}: {ff_steps} steps with fast-forward, {plain_steps} without; {stats:?}");
            assert!(stats.num_draft_tokens > 0, "{name}: nothing was forced: {stats:?}");
            if name == "json schema" {
                assert!(stats.num_accepted_tokens > 0, "{name}: no forced token accepted: {stats:?}");
                assert!(
                    ff_steps < plain_steps,
                    "{name}: {ff_steps} steps with fast-forward, {plain_steps} without"
                );
            } else {
                assert!(stats.num_accepted_tokens < stats.num_draft_tokens, "{name}: {stats:?}");
            }
            assert!(ff.spec_decode_stats().is_none(), "forced tokens are not speculation");
        }
    }
}
