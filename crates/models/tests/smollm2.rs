//! The real model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers:
//! greedy tokens exactly, logits within a tolerance, tokenizer ids on ~300
//! strings, and the chat template's renderings.
//!
//! Needs the model: `bash scripts/fetch-model.sh` (or `PAGODA_TEST_MODEL`).

mod common;

use std::sync::OnceLock;

use common::{argmax, f32s, fixture_json, real_model_path, u32s, ErrorStats};
use pagoda_backend::Backend;
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_models::{ChatMessage, LlamaModel, LoadOptions, ModelFiles, SingleSequence};
use proptest::prelude::*;

/// transformers' logits come from the same dequantised f32 weights; only the
/// order of float additions differs (30 layers deep). Largest difference
/// observed: 2.7e-5 (relative 1.4e-6); the tolerance leaves a ~40x margin and
/// is still below the smallest top-2 gap of any greedy step in the fixture
/// (4.9e-3), so greedy tokens must match exactly.
const REAL_ABS_TOL: f32 = 1e-3;

fn files() -> &'static ModelFiles {
    static FILES: OnceLock<ModelFiles> = OnceLock::new();
    FILES.get_or_init(|| ModelFiles::open(real_model_path()).expect("open SmolLM2"))
}

fn model() -> &'static LlamaModel<CpuBackend> {
    static MODEL: OnceLock<LlamaModel<CpuBackend>> = OnceLock::new();
    MODEL.get_or_init(|| {
        files()
            .load_model(
                &CpuBackend::new(),
                &LoadOptions { max_positions: Some(1024), ..Default::default() },
                &mut |_, _| {},
            )
            .expect("load SmolLM2")
    })
}

#[test]
fn config_matches_the_file() {
    let c = &files().config;
    assert_eq!(c.num_layers, 30);
    assert_eq!((c.hidden_size, c.intermediate_size), (576, 1536));
    assert_eq!((c.num_attention_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope_theta, 100_000.0);
    assert!(c.tie_word_embeddings);
    assert_eq!(files().generation.eos_token_ids, [2]);
    assert_eq!(files().tokenizer.eos_token_id(), Some(2));
    assert_eq!(files().tokenizer.bos_token_id(), Some(1));
}

#[test]
fn greedy_tokens_and_logits_match_transformers() {
    let golden = fixture_json("smollm2/golden.json");
    let cpu = CpuBackend::new();
    let model = model();
    let tokenizer = &files().tokenizer;
    let vocab = model.config().vocab_size;
    let mut stats = ErrorStats::default();
    let mut min_margin = f32::INFINITY;
    for p in golden["prompts"].as_array().unwrap() {
        let text = p["prompt_text"].as_str().unwrap();
        let want_prompt = u32s(&p["prompt_ids"]);
        // Our own tokenizer and template must produce the prompt transformers used.
        assert_eq!(tokenizer.encode(text, true).unwrap(), want_prompt, "prompt ids of {text:?}");
        if let Some(messages) = p.get("messages") {
            let messages: Vec<ChatMessage> = serde_json::from_value(messages.clone()).unwrap();
            let template = files().chat_template.as_ref().unwrap();
            assert_eq!(template.render(&messages, true).unwrap(), text);
        }

        let want_tokens = u32s(&p["greedy_tokens"]);
        let steps = p["steps"].as_array().unwrap();
        let mut seq = SingleSequence::new(&cpu, model, want_prompt.len() + 40, 16).unwrap();
        let mut input = want_prompt.clone();
        let mut got = Vec::new();
        while got.len() < want_tokens.len() {
            let logits = cpu.download_f32(&seq.step(&cpu, &input, 1).unwrap()).unwrap();
            assert_eq!(logits.len(), vocab);
            if let Some(step) = steps.get(got.len()) {
                let ids = u32s(&step["top_ids"]);
                let want = f32s(&step["top_logits"]);
                let ours: Vec<f32> = ids.iter().map(|&i| logits[i as usize]).collect();
                stats.update(&ours, &want);
                min_margin = min_margin.min(want[0] - want[1]);
            }
            let token = argmax(&logits);
            got.push(token);
            input = vec![token];
        }
        assert_eq!(
            got,
            want_tokens,
            "greedy continuation of {text:?}: ours {:?} vs transformers {:?}",
            tokenizer.decode(&got, false).unwrap(),
            p["greedy_text"]
        );
    }
    eprintln!(
        "SmolLM2 vs transformers: max |Δlogit| {:.3e} (max rel {:.3e}) over the top-10 of 4 steps x 6 prompts; \
         smallest top-2 margin {min_margin:.3e}",
        stats.max_abs, stats.max_rel
    );
    assert!(stats.max_abs < REAL_ABS_TOL, "logits differ by {:e}", stats.max_abs);
}

#[test]
fn tokenizer_matches_transformers_on_fixture_strings() {
    let cases = fixture_json("smollm2/tokenizer_cases.json");
    let tokenizer = &files().tokenizer;
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(ids, u32s(&case["ids"]), "ids of {text:?}");
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text, "round trip of {text:?}");
        checked += 1;
    }
    assert!(checked >= 300);
    assert_eq!(
        tokenizer.encode("Hello world", true).unwrap(),
        u32s(&cases["hello_world_with_special_tokens"])
    );
}

#[test]
fn chat_template_renders_as_transformers() {
    let fixture = fixture_json("smollm2/chat_template.json");
    let template = files().chat_template.as_ref().expect("SmolLM2 has a chat template");
    assert_eq!(files().tokenizer.config().chat_template.as_deref(), fixture["template"].as_str());
    for r in fixture["renders"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(r["messages"].clone()).unwrap();
        let add = r["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(template.render(&messages, add).unwrap(), r["text"].as_str().unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Byte-level BPE loses nothing: any string survives encode then decode.
    #[test]
    fn any_string_round_trips(s in "\\PC*") {
        let t = &files().tokenizer;
        let ids = t.encode(&s, false).unwrap();
        prop_assert_eq!(t.decode(&ids, false).unwrap(), s);
    }
}
