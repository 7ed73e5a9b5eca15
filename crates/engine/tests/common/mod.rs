//! Shared helpers of the engine's real-model tests: where the workspace, the
//! model and the fixtures are.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{load_engine, EngineConfig, LlmEngine};
use serde_json::Value;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$PAGODA_TEST_MODEL`, else models/smollm2-135m-instruct/; absent, the
/// test fails (CI fetches the model first).
pub fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("PAGODA_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let default = workspace_root().join("models/smollm2-135m-instruct");
    assert!(
        default.is_dir(),
        "the real-model tests need SmolLM2-135M-Instruct: run `scripts/fetch-model.sh` (or set PAGODA_TEST_MODEL)"
    );
    default
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// Engines are built one test at a time: each holds the f32 weights (0.5 GB)
/// and its KV pool, and the CI machine has two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A test engine on the default model: `config` with a KV pool of 128 MiB
/// unless it says otherwise.
pub fn engine(config: EngineConfig) -> LlmEngine<CpuBackend> {
    let config =
        EngineConfig { kv_cache_memory_bytes: config.kv_cache_memory_bytes.or(Some(128 << 20)), ..config };
    load_engine(CpuBackend::new(), model_path(), config, |_, _| {}).expect("load SmolLM2")
}
