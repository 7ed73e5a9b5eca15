//! Shared helpers for the model-level tests: fixture paths and JSON, the real
//! model's location, and logits comparison.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;

use serde_json::Value;

/// The workspace root (crates/models/../..).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixture(rel: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(rel)
}

pub fn fixture_json(rel: &str) -> Value {
    let path = fixture(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// SmolLM2-135M-Instruct: `$PAGODA_TEST_MODEL`, else models/smollm2-135m-instruct/.
/// Absent, the test fails (CI fetches the model first; a silent skip would hide that).
pub fn real_model_path() -> PathBuf {
    if let Ok(p) = std::env::var("PAGODA_TEST_MODEL") {
        let path = PathBuf::from(&p);
        assert!(path.exists(), "PAGODA_TEST_MODEL={p} does not exist (run `bash scripts/fetch-model.sh`)");
        return path;
    }
    let default = workspace_root().join("models/smollm2-135m-instruct");
    assert!(
        default.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file(),
        "the real-model tests need SmolLM2-135M-Instruct: run `bash scripts/fetch-model.sh` \
         (or set PAGODA_TEST_MODEL to a model path)"
    );
    default
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

/// Largest absolute and relative (to the row's largest magnitude) difference.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorStats {
    pub max_abs: f32,
    pub max_rel: f32,
}

impl ErrorStats {
    pub fn update(&mut self, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "row lengths differ");
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        for (g, w) in got.iter().zip(want) {
            let abs = (g - w).abs();
            self.max_abs = self.max_abs.max(abs);
            self.max_rel = self.max_rel.max(abs / scale);
        }
    }
}

/// Greedy choice: the largest logit, the lowest id on ties (the sampler's rule).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of one row of logits, in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    row.iter().map(|&x| x as f64 - log_sum).collect()
}
