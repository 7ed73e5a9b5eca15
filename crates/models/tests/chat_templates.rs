//! A ChatML-style template using tools, `tojson`, Python string methods,
//! whitespace control and `raise_exception`, rendered as transformers
//! renders it (tests/fixtures/tiny-llama/chat_cases.json), and the tiny
//! tokenizer (tokenizer.json) on those renderings.

mod common;

use common::{fixture, fixture_json, u32s};
use pagoda_models::{ModelError, ModelFiles};
use proptest::prelude::*;

#[test]
fn renders_and_encodes_as_transformers() {
    let files = ModelFiles::open(fixture("tiny-llama")).unwrap();
    let template = files.chat_template.as_ref().expect("chat_template.jinja");
    let cases = fixture_json("tiny-llama/chat_cases.json");
    for r in cases["renders"].as_array().unwrap() {
        let mut extra = serde_json::Map::new();
        if !r["tools"].is_null() {
            extra.insert("tools".into(), r["tools"].clone());
        }
        let add = r["add_generation_prompt"].as_bool().unwrap();
        let text = template.render_json(&r["messages"], add, &extra).unwrap();
        assert_eq!(text, r["text"].as_str().unwrap());
    }
    for e in cases["encodings"].as_array().unwrap() {
        let text = e["text"].as_str().unwrap();
        let ids = files.tokenizer.encode(text, true).unwrap();
        assert_eq!(ids, u32s(&e["ids"]), "ids of {text:?}");
        assert_eq!(files.tokenizer.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn template_rejects_what_transformers_rejects() {
    let files = ModelFiles::open(fixture("tiny-llama")).unwrap();
    let template = files.chat_template.as_ref().unwrap();
    let cases = fixture_json("tiny-llama/chat_cases.json");
    let want = cases["rejected_role_error"].as_str().unwrap();
    let messages = serde_json::json!([{"role": "robot", "content": "x"}]);
    let err = template.render_json(&messages, false, &serde_json::Map::new()).unwrap_err();
    assert!(matches!(err, ModelError::ChatTemplate(_)));
    assert!(err.to_string().contains(want), "{err} does not carry {want:?}");
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let files = ModelFiles::open(fixture("tiny-llama")).unwrap();
    assert!(matches!(files.tokenizer.decode(&[5, 100_000], false), Err(ModelError::Tokenizer(_))));
}

proptest! {
    #[test]
    fn tiny_tokenizer_round_trips_any_string(s in "\\PC*") {
        static FILES: std::sync::OnceLock<ModelFiles> = std::sync::OnceLock::new();
        let files = FILES.get_or_init(|| ModelFiles::open(fixture("tiny-llama")).unwrap());
        let ids = files.tokenizer.encode(&s, false).unwrap();
        prop_assert_eq!(files.tokenizer.decode(&ids, false).unwrap(), s);
    }
}
