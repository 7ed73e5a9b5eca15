//! Bad input gives a typed error, never a panic: real files, damaged in the
//! test (truncated, magic flipped, wrong sizes, missing pieces).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::fixture;
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_models::{GgufError, GgufHeader, LoadOptions, ModelError, ModelFiles, ModelSource};
use proptest::prelude::*;

/// A copy of a fixture folder in a fresh temporary directory.
fn copy_fixture(rel: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(rel.replace('/', "_"));
    fs::create_dir_all(&dst).unwrap();
    for entry in fs::read_dir(fixture(rel)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    (tmp, dst)
}

fn load(path: &Path) -> Result<(), ModelError> {
    let files = ModelFiles::open(path)?;
    files.load_model(&CpuBackend::new(), &LoadOptions::default(), &mut |_, _| {})?;
    Ok(())
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn missing_paths_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ModelFiles::open(tmp.path().join("nope")).unwrap_err();
    assert!(
        matches!(err, ModelError::ModelPath { .. }) && err.to_string().contains("does not exist"),
        "{err}"
    );
    let err = ModelFiles::open(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("neither config.json"), "{err}");

    let txt = tmp.path().join("weights.bin");
    fs::write(&txt, b"hello").unwrap();
    assert!(matches!(ModelSource::resolve(&txt), Err(ModelError::ModelPath { .. })));

    // Without tokenizer.json the model opens for token-id use, and any text
    // use says why it cannot work.
    let (_t, dir) = copy_fixture("tiny-llama");
    fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let files = ModelFiles::open(&dir).unwrap();
    assert!(!files.tokenizer.is_present());
    let err = files.tokenizer.encode("hello", true).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    assert!(files.tokenizer.decode(&[1, 2], true).is_err());

    let (_t, dir) = copy_fixture("tiny-llama");
    fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = ModelFiles::open(&dir).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    let (_t, dir) = copy_fixture("tiny-qwen2");
    fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert!(matches!(ModelFiles::open(&dir), Err(ModelError::Io { .. })));
}

#[test]
fn folder_with_two_ggufs_is_ambiguous() {
    let (_t, dir) = copy_fixture("tiny-llama-gguf");
    fs::copy(dir.join("tiny-llama.gguf"), dir.join("other.gguf")).unwrap();
    let err = ModelFiles::open(&dir).unwrap_err();
    assert!(err.to_string().contains("2 .gguf files"), "{err}");
}

#[test]
fn unknown_architecture() {
    let (_t, dir) = copy_fixture("tiny-llama");
    edit_json(&dir.join("config.json"), |c| c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]));
    let err = ModelFiles::open(&dir).unwrap_err();
    assert!(matches!(err, ModelError::UnknownArchitecture(ref a) if a == "GPT2LMHeadModel"), "{err}");
}

#[test]
fn broken_config_json() {
    let (_t, dir) = copy_fixture("tiny-llama");
    fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert!(matches!(ModelFiles::open(&dir), Err(ModelError::Config { .. })));
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let (_t, dir) = copy_fixture("tiny-llama");
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    for len in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        fs::write(&path, &bytes[..len]).unwrap();
        let err = ModelFiles::open(&dir).unwrap_err();
        assert!(matches!(err, ModelError::Safetensors { .. }), "truncated to {len}: {err}");
    }
    // A header length pointing past the end of the file.
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    fs::write(&path, &bad).unwrap();
    assert!(matches!(ModelFiles::open(&dir), Err(ModelError::Safetensors { .. })));
    // Garbage in the JSON header.
    let mut bad = bytes.clone();
    bad[9] = b'!';
    fs::write(&path, &bad).unwrap();
    assert!(matches!(ModelFiles::open(&dir), Err(ModelError::Safetensors { .. })));
}

#[test]
fn shapes_that_do_not_fit_the_config() {
    let (_t, dir) = copy_fixture("tiny-llama");
    edit_json(&dir.join("config.json"), |c| c["intermediate_size"] = serde_json::json!(96));
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, ModelError::ShapeMismatch { ref name, .. } if name.contains("gate_proj")), "{err}");
    let (_t, dir) = copy_fixture("tiny-llama");
    edit_json(&dir.join("config.json"), |c| c["vocab_size"] = serde_json::json!(321));
    assert!(matches!(load(&dir), Err(ModelError::ShapeMismatch { .. })));
}

#[test]
fn missing_tensor() {
    // Untied, the model needs lm_head.weight, which this tied checkpoint lacks.
    let (_t, dir) = copy_fixture("tiny-llama");
    edit_json(&dir.join("config.json"), |c| c["tie_word_embeddings"] = serde_json::json!(false));
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor(ref n) if n == "lm_head.weight"), "{err}");
}

fn gguf_bytes() -> Vec<u8> {
    fs::read(fixture("tiny-llama-gguf/tiny-llama.gguf")).unwrap()
}

fn open_gguf_bytes(bytes: &[u8]) -> Result<ModelFiles, ModelError> {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    fs::write(&path, bytes).unwrap();
    ModelFiles::open(&path)
}

fn gguf_error(bytes: &[u8]) -> GgufError {
    match open_gguf_bytes(bytes) {
        Err(ModelError::Gguf { cause, .. }) => cause,
        Err(other) => panic!("expected a GGUF error, got {other}"),
        Ok(_) => panic!("expected a GGUF error, the file opened"),
    }
}

#[test]
fn gguf_bad_magic_version_and_truncation() {
    let good = gguf_bytes();
    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    assert!(matches!(gguf_error(&b), GgufError::BadMagic(_)));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(gguf_error(&b), GgufError::UnsupportedVersion(1)));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&4u32.to_le_bytes());
    assert!(matches!(gguf_error(&b), GgufError::UnsupportedVersion(4)));
    for len in [0, 3, 10, 100, good.len() / 2, good.len() - 1] {
        let err = gguf_error(&good[..len]);
        assert!(matches!(err, GgufError::Truncated { .. } | GgufError::Invalid(_)), "len {len}: {err}");
    }
}

#[test]
fn gguf_bad_value_and_tensor_types() {
    let good = gguf_bytes();
    let header = GgufHeader::parse(&good).unwrap();
    // The first metadata entry's value type follows magic, version, the two
    // counts and its key (u64 length + bytes).
    let first_key_len = u64::from_le_bytes(good[24..32].try_into().unwrap()) as usize;
    let at = 32 + first_key_len;
    let mut b = good.clone();
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(matches!(gguf_error(&b), GgufError::BadValueType { value_type: 99, .. }));

    // A tensor's ggml type: find the first tensor info by its name.
    let name = &header.tensors[0].name;
    let pos = good.windows(name.len()).position(|w| w == name.as_bytes()).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(good[pos..pos + 4].try_into().unwrap()) as usize;
    let type_at = pos + 4 + 8 * n_dims;
    let mut b = good.clone();
    b[type_at..type_at + 4].copy_from_slice(&5u32.to_le_bytes()); // a retired ggml type id
    assert!(matches!(gguf_error(&b), GgufError::UnknownTensorType { ggml_type: 5, .. }));
}

#[test]
fn gguf_unsupported_architecture_and_tokenizer() {
    let good = gguf_bytes();
    // Same length, other name: "llama" -> "gpt-j" keeps every offset valid.
    let needle = b"\x05\x00\x00\x00\x00\x00\x00\x00llama";
    let pos = good.windows(needle.len()).position(|w| w == needle).unwrap();
    let mut b = good.clone();
    b[pos + 8..pos + 13].copy_from_slice(b"gpt-j");
    let err = gguf_error(&b);
    assert!(err.to_string().contains("unsupported architecture"), "{err}");

    let needle = b"\x04\x00\x00\x00\x00\x00\x00\x00gpt2";
    let pos = good.windows(needle.len()).position(|w| w == needle).unwrap();
    let mut b = good.clone();
    b[pos + 8..pos + 12].copy_from_slice(b"t5xx");
    let err = gguf_error(&b);
    assert!(err.to_string().contains("not supported"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any damage to a GGUF header is an error or a valid parse, never a panic.
    #[test]
    fn gguf_parser_never_panics(flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8), cut in 0usize..4096) {
        let mut bytes = gguf_bytes();
        for (at, v) in flips {
            let at = at % bytes.len();
            bytes[at] = v;
        }
        let cut = bytes.len() - cut.min(bytes.len());
        let _ = GgufHeader::parse(&bytes[..cut]);
    }
}

#[test]
fn absurd_sizes_fail_before_allocating() {
    let (_t, dir) = copy_fixture("tiny-llama");
    edit_json(&dir.join("config.json"), |c| c["intermediate_size"] = serde_json::json!(1u64 << 40));
    assert!(matches!(load(&dir), Err(ModelError::ShapeMismatch { .. })));
    let (_t, dir) = copy_fixture("tiny-llama");
    edit_json(&dir.join("config.json"), |c| c["max_position_embeddings"] = serde_json::json!(1u64 << 40));
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, ModelError::Config { .. }) && err.to_string().contains("max_positions"), "{err}");
}

/// An error and its `source()` chain as anyhow's `{:#}` prints it: "a: b: c".
fn render_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        text = format!("{text}: {cause}");
        next = cause.source();
    }
    text
}

#[test]
fn load_errors_print_their_cause_once() {
    // An I/O error: a missing shard.
    let (_t, dir) = copy_fixture("tiny-qwen2");
    fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = ModelFiles::open(&dir).unwrap_err();
    let text = render_chain(&err);
    assert_eq!(text.matches("No such file or directory").count(), 1, "{text}");
    assert!(text.contains("model-00002-of-00002.safetensors"), "{text}");

    // A GGUF error: a truncated file.
    let good = gguf_bytes();
    let err = open_gguf_bytes(&good[..good.len() / 2]).expect_err("a truncated GGUF fails");
    let text = render_chain(&err);
    let ModelError::Gguf { cause, .. } = &err else { panic!("expected a GGUF error, got {err}") };
    assert_eq!(text.matches(&cause.to_string()).count(), 1, "{text}");
    assert!(text.contains("m.gguf"), "{text}");
}

/// The GGUF fixture with the u32 value of metadata `key` replaced.
fn gguf_with_u32(key: &str, value: u32) -> Vec<u8> {
    let mut bytes = gguf_bytes();
    let pos = bytes.windows(key.len()).position(|w| w == key.as_bytes()).expect("the key is in the fixture")
        + key.len();
    assert_eq!(bytes[pos..pos + 4], 4u32.to_le_bytes(), "{key} holds a u32");
    bytes[pos + 4..pos + 8].copy_from_slice(&value.to_le_bytes());
    bytes
}

/// The GGUF error of a fixture whose `key` is `value`, as text.
fn gguf_metadata_error(key: &str, value: u32) -> String {
    match gguf_error(&gguf_with_u32(key, value)) {
        GgufError::Metadata { key: named, detail } => format!("{named}: {detail}"),
        other => panic!("{key} = {value}: expected a metadata error, got {other}"),
    }
}

#[test]
fn gguf_metadata_the_engine_relies_on_is_validated() {
    // The fixture: vocabulary 320, 4 heads of 16 (2 KV heads), context 256.
    let cases = [
        ("tokenizer.ggml.eos_token_id", 320, "outside the vocabulary"),
        ("tokenizer.ggml.bos_token_id", 100_000, "outside the vocabulary"),
        ("llama.rope.dimension_count", 0, "must be positive"),
        ("llama.rope.dimension_count", 8, "partial rotary"),
        ("llama.context_length", 0, "must be positive"),
        ("llama.vocab_size", 0, "must be positive"),
        ("llama.attention.head_count", 0, "must be positive"),
        ("llama.attention.head_count", 3, "not a multiple"),
        ("llama.attention.head_count_kv", 3, "does not divide"),
        ("llama.attention.head_count_kv", 0, "must be positive"),
    ];
    for (key, value, why) in cases {
        let text = gguf_metadata_error(key, value);
        assert!(text.contains(key) && text.contains(why), "{key} = {value}: {text}");
    }
    // The epsilon is an f32: 0 and NaN are refused.
    for eps in [0f32, f32::NAN] {
        let key = "llama.attention.layer_norm_rms_epsilon";
        let mut bytes = gguf_bytes();
        let pos = bytes.windows(key.len()).position(|w| w == key.as_bytes()).unwrap() + key.len();
        bytes[pos + 4..pos + 8].copy_from_slice(&eps.to_le_bytes());
        let text = gguf_error(&bytes).to_string();
        assert!(text.contains(key) && text.contains("positive finite"), "{eps}: {text}");
    }
    // The unchanged fixture still opens.
    open_gguf_bytes(&gguf_bytes()).unwrap();
}

#[test]
fn generation_config_token_ids_outside_the_vocabulary_are_refused() {
    let cases = [
        (serde_json::json!({"eos_token_id": [2, 320]}), "`eos_token_id` 320 is outside the vocabulary"),
        (
            serde_json::json!({"eos_token_id": 2, "bos_token_id": 5000}),
            "`bos_token_id` 5000 is outside the vocabulary",
        ),
    ];
    for (json, want) in cases {
        let (_t, dir) = copy_fixture("tiny-llama");
        let path = dir.join("generation_config.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let err = ModelFiles::open(&dir).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ModelError::Config { .. })
                && text.contains("generation_config.json")
                && text.contains(want),
            "{json}: {text}"
        );
    }
    // Ids inside the vocabulary open.
    let (_t, dir) = copy_fixture("tiny-llama");
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [1, 2], "bos_token_id": 1}"#)
        .unwrap();
    ModelFiles::open(&dir).unwrap();
}

#[test]
fn config_json_values_the_engine_relies_on_are_validated() {
    let cases = [
        ("eos_token_id", serde_json::json!(320), "`eos_token_id` 320 is outside the vocabulary"),
        ("bos_token_id", serde_json::json!(5000), "`bos_token_id` 5000 is outside the vocabulary"),
        ("rms_norm_eps", serde_json::json!(0.0), "`rms_norm_eps` 0 must be a positive finite number"),
        ("num_key_value_heads", serde_json::json!(3), "`num_key_value_heads` 3 does not divide"),
        ("max_position_embeddings", serde_json::json!(0), "`max_position_embeddings` must be positive"),
    ];
    for (key, value, want) in cases {
        let (_t, dir) = copy_fixture("tiny-llama");
        edit_json(&dir.join("config.json"), |c| c[key] = value.clone());
        let err = ModelFiles::open(&dir).unwrap_err();
        assert!(matches!(err, ModelError::Config { .. }) && err.to_string().contains(want), "{key}: {err}");
    }
    // Without head_dim, the head size is hidden_size / heads, which must divide.
    let (_t, dir) = copy_fixture("tiny-llama");
    edit_json(&dir.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("head_dim");
        c["hidden_size"] = serde_json::json!(66);
    });
    let err = ModelFiles::open(&dir).unwrap_err();
    assert!(err.to_string().contains("not a multiple of `num_attention_heads`"), "{err}");
}
