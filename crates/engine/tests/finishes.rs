//! How sequences end, on the tiny Llama fixture (fast on the CPU): a stop
//! string, found by the output processor, ends only the sample it matched,
//! and goes back to the engine core the way an abort does, so both free the
//! sequence's blocks at once; a request id already live is refused whichever
//! way the request comes in.

use std::path::PathBuf;

use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{
    load_engine, EngineConfig, EngineError, FinishReason, GenerationRequest, LlmEngine, RequestOutput,
    SamplingParams, StopReason,
};

/// tests/fixtures/tiny-llama: 2 layers, 320 tokens, 256 positions.
fn tiny_llama() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

fn load(async_scheduling: bool) -> LlmEngine<CpuBackend> {
    let config = EngineConfig { async_scheduling, ..EngineConfig::default() };
    load_engine(CpuBackend::new(), tiny_llama(), config, |_, _| {}).expect("the tiny model loads")
}

const PROMPT: [u32; 5] = [1, 17, 42, 99, 7];

fn request(id: &str, max_tokens: usize, n: usize, sampling: SamplingParams) -> GenerationRequest {
    let mut r = GenerationRequest::new(id, PROMPT.to_vec());
    r.sampling = sampling;
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r.n = n;
    r
}

/// A stretch of `text` of a few characters that `other` does not contain.
fn stop_string_of(text: &str, other: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    (1..chars.len().saturating_sub(3)).map(|i| chars[i..i + 3].iter().collect::<String>()).find(|s| {
        !s.trim().is_empty() && !other.contains(s.as_str()) && text.find(s.as_str()).is_some_and(|at| at > 0)
    })
}

#[test]
fn a_stop_string_ends_only_the_sample_it_matched() {
    for async_scheduling in [true, false] {
        let mut e = load(async_scheduling);
        let sampling = SamplingParams { temperature: 1.0, seed: Some(3), ..SamplingParams::default() };
        let free = e.generate(vec![request("free", 24, 2, sampling.clone())]).expect("generate");
        let (t0, t1) = (&free[0].seqs[0].text, &free[0].seqs[1].text);
        let stop =
            stop_string_of(t0, t1).unwrap_or_else(|| panic!("no stop string in {t0:?} apart from {t1:?}"));

        let mut req = request("stopped", 24, 2, sampling);
        req.stop = vec![stop.clone()];
        let done = e.generate(vec![req]).expect("generate");
        let (s0, s1) = (&done[0].seqs[0], &done[0].seqs[1]);
        assert_eq!(s0.finish_reason, Some(FinishReason::Stop));
        assert_eq!(s0.stop_reason, Some(StopReason::String(stop.clone())));
        assert_eq!(s0.text, t0[..t0.find(&stop).expect("in the text")], "cut before the stop string");
        assert!(s0.token_ids.len() < 24);
        assert_eq!(s1.finish_reason, Some(FinishReason::Length), "the other sample runs on");
        assert_eq!(s1.token_ids.len(), 24);
        assert_eq!(e.scheduler().kv_usage().used_blocks, 0);
        assert!(!e.has_unfinished_requests());
    }
}

/// Steps until `id`'s last output, and returns it.
fn step_until_finished(e: &mut LlmEngine<CpuBackend>, id: &str) -> RequestOutput {
    for _ in 0..100 {
        let outputs = e.step().expect("step");
        if let Some(out) = outputs.into_iter().find(|o| o.request_id == id && o.finished) {
            return out;
        }
    }
    panic!("{id} never finished");
}

#[test]
fn an_abort_and_a_stop_string_free_blocks_alike() {
    for async_scheduling in [true, false] {
        let mut e = load(async_scheduling);
        let greedy = SamplingParams::greedy();
        let free = e.generate(vec![request("free", 40, 1, greedy.clone())]).expect("generate");
        let text = &free[0].seqs[0].text;
        let stop = stop_string_of(text, "").unwrap_or_else(|| panic!("no stop string in {text:?}"));
        let metrics = e.metrics();

        // A stop string: the output processor finds it, the core frees the
        // sequence's blocks within the same step.
        let mut req = request("stopped", 40, 1, greedy.clone());
        req.stop = vec![stop.clone()];
        e.add_request(req).expect("add");
        let last = step_until_finished(&mut e, "stopped");
        assert_eq!(last.deltas[0].stop_reason, Some(StopReason::String(stop)));
        assert_eq!(e.scheduler().kv_usage().used_blocks, 0, "freed when the stop string is found");
        assert_eq!(metrics.kv_blocks_used.get(), 0);
        assert!(!e.scheduler().has_unfinished());
        let stopped_free = e.scheduler().kv_usage().free_blocks();

        // An abort of the same request while it runs: the same path.
        e.add_request(request("aborted", 40, 1, greedy)).expect("add");
        let mut generated = 0;
        while generated < 3 {
            let outputs = e.step().expect("step");
            assert!(outputs.iter().all(|o| !o.finished), "a 40-token request still runs");
            generated += outputs.iter().flat_map(|o| &o.deltas).map(|d| d.token_ids.len()).sum::<usize>();
        }
        assert!(e.scheduler().kv_usage().used_blocks > 0);
        let last = e.abort_request("aborted").expect("live");
        assert_eq!(last.deltas[0].finish_reason, Some(FinishReason::Abort));
        assert_eq!(e.scheduler().kv_usage().used_blocks, 0, "freed at the abort");
        assert_eq!(metrics.kv_blocks_used.get(), 0);
        assert!(!e.scheduler().has_unfinished());
        assert_eq!(e.scheduler().kv_usage().free_blocks(), stopped_free);
        while e.has_unfinished_requests() {
            assert!(e.step().expect("step").is_empty(), "nothing comes of an aborted request");
        }
    }
}

#[test]
fn a_live_request_id_is_refused_whichever_way_it_comes() {
    let mut e = load(true);
    let sampling = SamplingParams { temperature: 1.0, ..SamplingParams::default() };
    e.add_request(request("a", 8, 1, sampling.clone())).expect("add");
    match e.add_request(request("a", 8, 1, sampling.clone())) {
        Err(EngineError::DuplicateRequest(id)) => assert_eq!(id, "a"),
        other => panic!("expected a duplicate refusal, got {other:?}"),
    }
    let processed = e.input_processor().process(request("a", 8, 1, sampling)).expect("valid");
    match e.add_processed(processed, std::time::Instant::now()) {
        Err(EngineError::DuplicateRequest(id)) => assert_eq!(id, "a"),
        other => panic!("expected a duplicate refusal, got {other:?}"),
    }
    assert_eq!(e.num_unfinished_requests(), 1);
}
