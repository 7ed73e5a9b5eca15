//! Tiny random-weight models against transformers' logits and greedy tokens:
//! Llama (f32, tied, llama3 rope), Qwen2 (f16, q/k/v biases, sharded),
//! Mistral (bf16, sliding window 8 < prompt length 20) and the Llama as a
//! GGUF of mixed quant types with llama.cpp's q/k permutation.

mod common;

use common::{argmax, f32s, fixture, fixture_json, u32s, ErrorStats};
use pagoda_backend::{Backend, TokenId};
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_models::{LlamaModel, LoadOptions, ModelFiles, SingleSequence};
use proptest::prelude::*;

/// Logits may differ from transformers' by float reordering only: the
/// largest difference observed is 6.3e-6 (each test prints its own); the
/// tolerance leaves a 15x margin yet is far below the smallest top-2 margin
/// of any greedy step (9e-3).
const TINY_ABS_TOL: f32 = 1e-4;

fn load(rel: &str) -> (ModelFiles, LlamaModel<CpuBackend>) {
    let files = ModelFiles::open(fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let model = files.load_model(&CpuBackend::new(), &LoadOptions::default(), &mut |_, _| {}).unwrap();
    (files, model)
}

fn check_against_golden(rel: &str, golden_rel: &str) {
    let golden = fixture_json(golden_rel);
    let (_, model) = load(rel);
    let cpu = CpuBackend::new();
    let prompt = u32s(&golden["prompt_ids"]);
    let want_prompt_logits = golden["prompt_logits"].as_array().unwrap();

    // Prefill with the logits of every prompt position.
    let mut seq = SingleSequence::new(&cpu, &model, 64, 4).unwrap();
    let logits = cpu.download_f32(&seq.step(&cpu, &prompt, prompt.len()).unwrap()).unwrap();
    let vocab = model.config().vocab_size;
    let mut stats = ErrorStats::default();
    for (row, want) in logits.chunks(vocab).zip(want_prompt_logits) {
        stats.update(row, &f32s(want));
    }

    // Greedy decoding, comparing the full logits of the first decode steps.
    let want_tokens = u32s(&golden["greedy_tokens"]);
    let want_decode = golden["decode_logits"].as_array().unwrap();
    let mut tokens: Vec<TokenId> = Vec::new();
    let mut last = logits[logits.len() - vocab..].to_vec();
    for step in 0..want_tokens.len() {
        let next = argmax(&last);
        tokens.push(next);
        if step + 1 == want_tokens.len() {
            break;
        }
        last = cpu.download_f32(&seq.step(&cpu, &[next], 1).unwrap()).unwrap();
        if let Some(want) = want_decode.get(step) {
            stats.update(&last, &f32s(want));
        }
    }
    eprintln!("{rel}: max |Δlogit| {:.2e}, max rel {:.2e}", stats.max_abs, stats.max_rel);
    assert_eq!(tokens, want_tokens, "{rel}: greedy tokens differ from transformers'");
    assert!(stats.max_abs < TINY_ABS_TOL, "{rel}: logits differ by {:e}", stats.max_abs);
}

#[test]
fn tiny_llama_matches_transformers() {
    check_against_golden("tiny-llama", "tiny-llama/golden.json");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check_against_golden("tiny-qwen2", "tiny-qwen2/golden.json");
}

#[test]
fn tiny_mistral_with_sliding_window_matches_transformers() {
    check_against_golden("tiny-mistral", "tiny-mistral/golden.json");
}

#[test]
fn tiny_llama_gguf_matches_transformers() {
    check_against_golden("tiny-llama-gguf/tiny-llama.gguf", "tiny-llama-gguf/golden.json");
}

#[test]
fn the_gguf_folder_resolves_to_its_one_file_and_reads_its_metadata() {
    let files = ModelFiles::open(fixture("tiny-llama-gguf")).unwrap();
    assert!(files.source.path().ends_with("tiny-llama.gguf"));
    let c = &files.config;
    assert_eq!((c.hidden_size, c.num_layers, c.num_attention_heads, c.num_kv_heads), (64, 2, 4, 2));
    assert_eq!(c.rope_scaling, pagoda_models::RopeScaling::Linear { factor: 2.0 });
    assert!(c.tie_word_embeddings);
    assert_eq!(files.generation.eos_token_ids, [2]);
    // add_bos_token is set in this file: encoding with special tokens prepends BOS.
    let ids = files.tokenizer.encode("hello", true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(files.tokenizer.decode(&ids, true).unwrap(), "hello");
}

#[test]
fn hf_folders_read_generation_and_sharding() {
    let (files, _) = load("tiny-qwen2");
    assert_eq!(files.generation.eos_token_ids, [2]);
    assert_eq!(files.generation.bos_token_id, Some(1));
    assert!(files.config.qkv_bias && !files.config.tie_word_embeddings);
    let (files, _) = load("tiny-mistral");
    assert_eq!(files.config.sliding_window, Some(8));
}

#[test]
fn progress_counts_every_byte_once() {
    let files = ModelFiles::open(fixture("tiny-llama")).unwrap();
    let mut calls = Vec::new();
    files.load_model(&CpuBackend::new(), &LoadOptions::default(), &mut |d, t| calls.push((d, t))).unwrap();
    let total = calls[0].1;
    assert_eq!(calls[0].0, 0);
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0 && w[1].1 == total));
    // Every weight tensor of the file is loaded; the file is header + data.
    let file_len = std::fs::metadata(fixture("tiny-llama/model.safetensors")).unwrap().len();
    assert_eq!(calls.last().unwrap().0, total);
    assert!(total <= file_len && total > file_len * 9 / 10, "total {total} vs file {file_len}");
}

fn tiny_llama() -> &'static (ModelFiles, LlamaModel<CpuBackend>) {
    static MODEL: std::sync::OnceLock<(ModelFiles, LlamaModel<CpuBackend>)> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| load("tiny-llama"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Chunked prefill over a paged cache gives the logits of a single prefill,
    /// whatever the chunk boundaries and block size.
    #[test]
    fn chunked_prefill_matches_one_shot(
        prompt in proptest::collection::vec(3u32..320, 2..40),
        cut_fraction in 0.0f64..1.0,
        block_size in prop::sample::select(vec![1usize, 3, 4, 16]),
    ) {
        let (_, model) = tiny_llama();
        let cpu = CpuBackend::new();
        let cut = ((prompt.len() - 1) as f64 * cut_fraction) as usize + 1; // 1..len
        let mut whole = SingleSequence::new(&cpu, model, 64, 16).unwrap();
        let want = cpu.download_f32(&whole.step(&cpu, &prompt, 1).unwrap()).unwrap();
        let mut chunked = SingleSequence::new(&cpu, model, 64, block_size).unwrap();
        chunked.step(&cpu, &prompt[..cut], 1).unwrap();
        let got = if cut < prompt.len() {
            cpu.download_f32(&chunked.step(&cpu, &prompt[cut..], 1).unwrap()).unwrap()
        } else {
            want.clone()
        };
        let mut stats = ErrorStats::default();
        stats.update(&got, &want);
        prop_assert!(stats.max_abs < 1e-4, "chunked at {cut}: {:e}", stats.max_abs);
    }
}
