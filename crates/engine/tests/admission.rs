//! Admission and startup limits, on the tiny Llama fixture (fast on the CPU):
//! the context length against the model's and the KV cache's, and the
//! async engine's pending-work limits (requests, sequences, tokens), all or
//! none per submission.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{
    load_engine, AsyncEngine, AsyncEngineOptions, EngineConfig, EngineError, GenerationRequest, LlmEngine,
    SamplingParams, SubmitError,
};

/// tests/fixtures/tiny-llama: 2 layers, 320 tokens, 256 positions.
fn tiny_llama() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

fn load(config: EngineConfig) -> Result<LlmEngine<CpuBackend>, EngineError> {
    load_engine(CpuBackend::new(), tiny_llama(), config, |_, _| {})
}

fn config_error(config: EngineConfig) -> String {
    match load(config) {
        Err(EngineError::Config(message)) => message,
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("expected a configuration error, the engine started"),
    }
}

#[test]
fn max_model_len_above_the_models_is_an_error_naming_both() {
    let message = config_error(EngineConfig { max_model_len: Some(100_000), ..EngineConfig::default() });
    assert!(message.contains("100000") && message.contains("256"), "{message}");
    let engine =
        load(EngineConfig { max_model_len: Some(256), ..EngineConfig::default() }).expect("the model's own");
    assert_eq!(engine.info().max_model_len, 256);
}

#[test]
fn a_kv_cache_below_one_sequence_is_refused_or_lowers_the_default_length() {
    // 4 blocks of 16 tokens: 64 tokens, a quarter of the model's 256.
    let small = EngineConfig { num_gpu_blocks: Some(4), ..EngineConfig::default() };
    let message = config_error(EngineConfig { max_model_len: Some(128), ..small.clone() });
    assert!(message.contains("64 tokens") && message.contains("--max-model-len 128"), "{message}");
    assert!(message.contains("--gpu-memory-utilization"), "{message}");
    // The model's own length, not asked for, is lowered to what the cache holds.
    let engine = load(small.clone()).expect("starts with a shorter context");
    assert_eq!(engine.info().max_model_len, 64);
    let engine = load(EngineConfig { max_model_len: Some(64), ..small }).expect("fits exactly");
    assert_eq!(engine.info().max_model_len, 64);
}

fn request(id: &str, max_tokens: usize, n: usize) -> GenerationRequest {
    let mut r = GenerationRequest::new(id, vec![1, 17, 42, 99, 7]);
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r.n = n;
    r
}

fn start(options: AsyncEngineOptions, config: EngineConfig) -> AsyncEngine {
    AsyncEngine::start(move || load(config), options).expect("the tiny model loads")
}

fn invalid(result: Result<Vec<pagoda_engine::RequestStream>, SubmitError>) -> (Option<&'static str>, String) {
    match result {
        Err(SubmitError::Invalid(EngineError::InvalidRequest { param, message })) => (param, message),
        Err(other) => panic!("expected a 400-kind refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, the request was admitted"),
    }
}

/// Waits (generously: CI is slow) until the engine holds no work.
fn wait_idle(engine: &AsyncEngine) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.num_live_requests() > 0 || engine.num_live_seqs() > 0 {
        assert!(Instant::now() < deadline, "live work was never released");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pending_limits_count_work_and_refuse_what_can_never_fit() {
    let options =
        AsyncEngineOptions { max_pending_requests: 4, max_pending_seqs: 6, max_pending_tokens: Some(1000) };
    let engine = start(options, EngineConfig::default());

    // Over a limit on its own, on an idle engine: invalid (400), never "retry later".
    let five: Vec<_> = (0..5).map(|i| request(&format!("p{i}"), 4, 1)).collect();
    let (param, message) = invalid(engine.submit_all(five));
    assert_eq!(param, Some("prompt"));
    assert!(
        message.contains("5 pending requests") && message.contains("--max-pending-requests 4"),
        "{message}"
    );
    let (param, message) = invalid(engine.submit_all(vec![request("a", 4, 4), request("b", 4, 4)]));
    assert_eq!(param, Some("n"));
    assert!(message.contains("8 pending sequences") && message.contains("--max-pending-seqs 6"), "{message}");
    // 5 prompt tokens + 2 x 200 output tokens, three times.
    let three: Vec<_> = (0..3).map(|i| request(&format!("t{i}"), 200, 2)).collect();
    let (param, message) = invalid(engine.submit_all(three));
    assert_eq!(param, Some("max_tokens"));
    assert!(
        message.contains("1215 pending tokens") && message.contains("--max-pending-tokens 1000"),
        "{message}"
    );
    // An invalid prompt among several is named, and nothing is admitted.
    let mut bad = request("bad", 4, 1);
    bad.prompt_token_ids = vec![100_000];
    let (param, message) = invalid(engine.submit_all(vec![request("ok", 4, 1), bad]));
    assert_eq!(param, Some("prompt"));
    assert!(message.starts_with("prompt 1: "), "{message}");
    assert_eq!(engine.num_live_requests(), 0);

    // Busy: a long request of 4 sequences is live, so 2 x 2 more must wait (429)...
    let long = engine.submit(request("long", 240, 4)).expect("admitted on an idle engine");
    assert_eq!((engine.num_live_requests(), engine.num_live_seqs()), (1, 4));
    let pair = || vec![request("x", 4, 2), request("y", 4, 2)];
    match engine.submit_all(pair()) {
        Err(SubmitError::Overloaded { what: "sequences", in_use: 4, needed: 4, limit: 6, .. }) => {}
        Err(other) => panic!("expected 429 on sequences, got {other}"),
        Ok(_) => panic!("admitted beyond --max-pending-seqs"),
    }
    // ... all or none: neither of the pair was queued.
    assert_eq!((engine.num_live_requests(), engine.num_live_seqs()), (1, 4));
    // Once the long one is gone (dropped: aborted), the same pair is admitted and runs.
    drop(long);
    wait_idle(&engine);
    let streams = engine.submit_all(pair()).expect("admitted once the engine is free");
    assert_eq!(engine.num_live_seqs(), 4);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    for mut stream in streams {
        let mut finished = false;
        while let Some(out) = runtime.block_on(stream.next()) {
            finished |= out.expect("no engine error").finished;
        }
        assert!(finished);
    }
    wait_idle(&engine);
}

#[test]
fn a_request_the_kv_cache_cannot_hold_is_refused_at_submit() {
    // 8 blocks of 16: 128 tokens, so the model's 256 is lowered to 128.
    let config = EngineConfig { num_gpu_blocks: Some(8), ..EngineConfig::default() };
    let engine = start(AsyncEngineOptions::default(), config);
    assert_eq!(engine.info().max_model_len, 128);
    // Past the (lowered) context: refused before it reaches the engine thread.
    let (param, message) = invalid(engine.submit_all(vec![request("long", 200, 1)]));
    assert_eq!(param, Some("max_tokens"));
    assert!(message.contains("maximum context length is 128"), "{message}");
    // Four samples of 105 tokens need 4 x 7 blocks: more than the cache holds.
    let (param, message) = invalid(engine.submit_all(vec![request("wide", 100, 4)]));
    assert_eq!(param, Some("max_tokens"));
    assert!(message.contains("KV cache") && message.contains("8 blocks"), "{message}");
    assert_eq!(engine.num_live_requests(), 0);
}

/// A copy of the tiny Llama (links to its files) whose generation_config.json
/// asks for temperature 0.3 and top-p 0.8; and a folder asking for 0.5.
fn tiny_llama_with_sampling_defaults() -> (PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("pagoda-generation-config-{}", std::process::id()));
    let model = root.join("model");
    let other = root.join("other");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    for entry in std::fs::read_dir(tiny_llama()).unwrap() {
        let entry = entry.unwrap();
        let link = model.join(entry.file_name());
        if entry.file_name() != "generation_config.json" && !link.exists() {
            std::os::unix::fs::symlink(entry.path().canonicalize().unwrap(), link).unwrap();
        }
    }
    std::fs::write(
        model.join("generation_config.json"),
        r#"{"eos_token_id": 2, "temperature": 0.3, "top_p": 0.8}"#,
    )
    .unwrap();
    std::fs::write(other.join("generation_config.json"), r#"{"temperature": 0.5}"#).unwrap();
    (model, other)
}

#[test]
fn generation_config_chooses_where_sampling_defaults_come_from() {
    use pagoda_engine::GenerationConfigSource;
    let (model, other) = tiny_llama_with_sampling_defaults();
    let defaults = |source: GenerationConfigSource| {
        let config = EngineConfig { generation_config: source, ..EngineConfig::default() };
        let engine = load_engine(CpuBackend::new(), &model, config, |_, _| {}).expect("loads");
        let d = engine.info().default_sampling.clone();
        (d.temperature, d.top_p, engine.info().eos_token_ids.clone())
    };
    let (temperature, top_p, eos) = defaults(GenerationConfigSource::Model);
    assert_eq!((temperature, top_p), (0.3, 0.8));
    // vLLM's `vllm`: OpenAI's defaults; the model's EOS stays.
    let openai = SamplingParams::default();
    assert_eq!(defaults(GenerationConfigSource::Builtin), (openai.temperature, openai.top_p, eos.clone()));
    assert_eq!(defaults(GenerationConfigSource::Folder(other.clone())), (0.5, openai.top_p, eos));
    let missing = EngineConfig {
        generation_config: GenerationConfigSource::Folder(other.join("nowhere")),
        ..EngineConfig::default()
    };
    let message = match load_engine(CpuBackend::new(), &model, missing, |_, _| {}) {
        Err(EngineError::Config(message)) => message,
        other => panic!("expected a configuration error, got {:?}", other.err()),
    };
    assert!(message.contains("generation_config.json"), "{message}");
}
