//! The whole model on the GPU: SmolLM2-135M-Instruct on the CUDA backend
//! against the CPU reference backend and Hugging Face transformers' golden
//! greedy tokens. Built with `--features cuda`; runs only where a GPU is.
//!
//! bf16 activations round every layer's output to 8 significant bits, so
//! exact greedy equality with an f32 reference can only be demanded where the
//! reference's top-2 logits are apart by more than that noise. The checks:
//! 1. teacher-forced logits over prompt + golden continuation: CUDA vs CPU,
//!    error reported, and arg-max agreement wherever the CPU's top-2 gap is
//!    clear of the observed error;
//! 2. greedy generation through the full engine (scheduler, paged KV,
//!    on-GPU sampling) equals the golden tokens, up to a near-tie;
//! 3. the same in f16, where the margin is 8x wider.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use pagoda_backend::{Backend, DType, SamplingParams};
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_backend_cuda::CudaBackend;
use pagoda_engine::{load_engine, EngineConfig, GenerationRequest, GraphStats};
use pagoda_models::{LlamaModel, LoadOptions, ModelFiles, SingleSequence};
use serde_json::Value;

/// The repository root: the current directory when it holds the fixtures
/// (a test binary carried to a GPU machine runs from the copied tree there),
/// else where the binary was built.
fn root() -> PathBuf {
    if std::path::Path::new("tests/fixtures/smollm2/golden.json").is_file() {
        PathBuf::from(".")
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }
}

fn model_path() -> PathBuf {
    std::env::var("PAGODA_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("models/smollm2-135m-instruct"))
}

fn golden_cases() -> Vec<(Vec<u32>, Vec<u32>)> {
    let path = root().join("tests/fixtures/smollm2/golden.json");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("golden fixture")).expect("json");
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
    };
    v["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| (ids(&p["prompt_ids"]), ids(&p["greedy_tokens"])))
        .collect()
}

/// Logits `[len, V]` of every position of `tokens`, one prefill.
fn all_logits<B: Backend>(backend: &B, model: &LlamaModel<B>, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut seq = SingleSequence::new(backend, model, tokens.len() + 16, 16).expect("sequence");
    let logits = seq.step(backend, tokens, tokens.len()).expect("forward");
    let flat = backend.download_f32(&logits).expect("download");
    flat.chunks(model.config().vocab_size).map(|r| r.to_vec()).collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &x)| if x > row[best] { i } else { best })
}

/// Gap between the best and second-best logit.
fn top2_gap(row: &[f32]) -> f32 {
    let best = argmax(row);
    let second =
        row.iter().enumerate().filter(|&(i, _)| i != best).map(|(_, &x)| x).fold(f32::NEG_INFINITY, f32::max);
    row[best] - second
}

fn cuda(dtype: DType) -> CudaBackend {
    CudaBackend::with_activation_dtype(0, dtype).expect("a CUDA device")
}

/// Teacher-forced comparison; returns (max abs error, max row relative error
/// ||got - want|| / ||want||, positions compared).
fn compare_teacher_forced(dtype: DType) -> (f32, f64, usize) {
    let files = ModelFiles::open(model_path()).expect("open SmolLM2");
    let cpu = CpuBackend::new();
    let gpu = cuda(dtype);
    let cpu_model = files.load_model(&cpu, &LoadOptions::default(), &mut |_, _| {}).expect("load on cpu");
    let gpu_model = files.load_model(&gpu, &LoadOptions::default(), &mut |_, _| {}).expect("load on cuda");
    let mut max_abs = 0f32;
    let mut max_rel = 0f64;
    let mut positions = 0;
    let mut close_calls = Vec::new();
    for (prompt, golden) in golden_cases() {
        let tokens = [prompt.clone(), golden].concat();
        let want = all_logits(&cpu, &cpu_model, &tokens);
        let got = all_logits(&gpu, &gpu_model, &tokens);
        for (w, g) in want.iter().zip(&got) {
            let err = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err.is_finite(), "{dtype:?}: non-finite logits");
            max_abs = max_abs.max(err);
            let diff: f64 = w.iter().zip(g).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
            let norm: f64 = w.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            max_rel = max_rel.max(diff / norm);
            positions += 1;
        }
        for (pos, (w, g)) in want.iter().zip(&got).enumerate().skip(prompt.len() - 1) {
            if argmax(w) != argmax(g) {
                close_calls.push((pos, top2_gap(w)));
            }
        }
    }
    for &(pos, gap) in &close_calls {
        assert!(gap <= 2.0 * max_abs, "{dtype:?}: arg-max differs at position {pos} where the CPU's top-2 gap {gap} exceeds twice the max error {max_abs}");
    }
    println!(
        "{dtype:?} teacher-forced: max |logit err| {max_abs:.4}, max row rel err {max_rel:.2e} over {positions} \
         positions; arg-max flips at near-ties: {close_calls:?}"
    );
    (max_abs, max_rel, positions)
}

// Thresholds, from the H100 runs of 2026-11-23: the worst row over 276
// positions had relative error 0.135 in bf16 and 0.0173 in f16 (max |err|
// 2.17 and 0.23). The 8x ratio is the ratio of the two formats' rounding
// (8 vs 11 significant bits), which says the error is rounding accumulated over
// 30 layers, not a wrong kernel (every op alone is within 2.5e-3 of the CPU,
// and f16 reproduces all golden tokens). Limits leave ~50% headroom.
#[test]
fn teacher_forced_logits_match_the_cpu_reference_bf16() {
    let (_, rel, n) = compare_teacher_forced(DType::BF16);
    assert!(n > 100 && rel < 0.2, "bf16 logits relative error {rel}");
}

#[test]
fn teacher_forced_logits_match_the_cpu_reference_f16() {
    let (_, rel, _) = compare_teacher_forced(DType::F16);
    assert!(rel < 0.03, "f16 logits relative error {rel}");
}

fn engine_greedy(dtype: DType) -> Vec<Vec<u32>> {
    engine_greedy_with(dtype, EngineConfig::default()).0
}

/// Greedy tokens of every golden prompt (one batch) and how decode steps used graphs.
fn engine_greedy_with(dtype: DType, config: EngineConfig) -> (Vec<Vec<u32>>, GraphStats) {
    let cases = golden_cases();
    let mut engine = load_engine(cuda(dtype), model_path(), config, |_, _| {}).expect("engine");
    let reqs = cases
        .iter()
        .enumerate()
        .map(|(i, (prompt, want))| {
            let mut r = GenerationRequest::new(format!("g{i}"), prompt.clone());
            r.sampling = SamplingParams::greedy();
            r.max_tokens = Some(want.len());
            r
        })
        .collect();
    let tokens =
        engine.generate(reqs).expect("generate").into_iter().map(|r| r.seqs[0].token_ids.clone()).collect();
    (tokens, engine.runner().timings().graphs)
}

/// Greedy tokens through the engine equal the golden ones, except that after
/// a near-tie (CPU top-2 gap below `tie`) the continuation may legitimately differ.
fn check_engine_against_golden(dtype: DType, tie: f32) {
    let files = ModelFiles::open(model_path()).expect("open");
    let cpu = CpuBackend::new();
    let cpu_model = files.load_model(&cpu, &LoadOptions::default(), &mut |_, _| {}).expect("cpu model");
    let got = engine_greedy(dtype);
    let mut exact = 0;
    for (i, ((prompt, want), got)) in golden_cases().iter().zip(&got).enumerate() {
        match want.iter().zip(got).position(|(a, b)| a != b) {
            None => {
                assert_eq!(got.len(), want.len(), "{dtype:?} prompt {i}: length differs");
                exact += 1;
            }
            Some(k) => {
                let context = [prompt.clone(), want[..k].to_vec()].concat();
                let logits = all_logits(&cpu, &cpu_model, &context);
                let gap = top2_gap(logits.last().expect("row"));
                assert!(gap < tie, "{dtype:?} prompt {i}: token {k} differs ({} vs golden {}) at a clear decision (gap {gap})", got[k], want[k]);
                println!("{dtype:?} prompt {i}: diverges at token {k} on a near-tie (gap {gap:.4})");
            }
        }
    }
    println!("{dtype:?}: {exact} of {} golden prompts reproduced token for token", got.len());
}

#[test]
fn engine_greedy_tokens_match_transformers_bf16() {
    check_engine_against_golden(DType::BF16, 0.25);
}

#[test]
fn engine_greedy_tokens_match_transformers_f16() {
    check_engine_against_golden(DType::F16, 0.05);
}

/// Decode steps replayed from CUDA graphs compute what eager steps compute:
/// the padded bucket runs the same kernels on the same rows, so greedy tokens
/// are identical, at a batch that pads (6 prompts -> 8) and alone (bucket 1).
#[test]
fn graph_replays_match_eager_steps() {
    for max_num_seqs in [256, 1] {
        let config = EngineConfig { max_num_seqs, ..EngineConfig::default() };
        let (eager, none) =
            engine_greedy_with(DType::BF16, EngineConfig { enforce_eager: true, ..config.clone() });
        assert_eq!(none, GraphStats::default(), "enforce_eager records no graphs");
        let (graphs, stats) = engine_greedy_with(DType::BF16, config);
        println!("max_num_seqs {max_num_seqs}: {stats:?}");
        assert!(stats.captures > 0 && stats.replays > 0 && stats.failed == 0, "{stats:?}");
        assert_eq!(graphs, eager, "max_num_seqs {max_num_seqs}: graph replays changed greedy tokens");
    }
}
