//! Benchmarks with LoRA adapters: `--synthetic-loras N` writes N adapters of
//! pseudo-random matrices for the model's shape (every layer's seven
//! projections, rank `--synthetic-lora-rank`) and spreads the requests over
//! them round-robin, so what adapters cost can be measured on a
//! random-weight model of a real shape with no adapter files at hand.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use pagoda_backend::Backend;
use pagoda_engine::{LlmEngine, LoraRequest};
use pagoda_models::{LoadFormat, LoraModule, ModelFiles, SyntheticLora};
use serde::Serialize;

#[derive(Args, Debug, Clone, Copy)]
pub struct LoraBenchArgs {
    /// Run the requests with this many synthetic LoRA adapters, round-robin
    /// (needs --enable-lora; --max-loras sets how many are resident at once).
    #[arg(long, default_value_t = 0)]
    pub synthetic_loras: usize,
    /// Rank of the synthetic adapters.
    #[arg(long, default_value_t = 16)]
    pub synthetic_lora_rank: usize,
}

/// Synthetic adapters written for one run, removed when dropped.
pub struct BenchLoras {
    dir: PathBuf,
    pub adapters: Vec<LoraRequest>,
    rank: usize,
}

impl Drop for BenchLoras {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl BenchLoras {
    /// Writes the adapters for the model at `model`, read in `format` (before
    /// the engine loads, so that nothing else holds memory while they are made).
    pub fn write(args: LoraBenchArgs, model: &Path, format: LoadFormat) -> anyhow::Result<Option<Self>> {
        if args.synthetic_loras == 0 {
            return Ok(None);
        }
        let config = ModelFiles::open_with(model, format).context("reading the model's config")?.config;
        let dir = std::env::temp_dir().join(format!("pagoda-bench-loras-{}", std::process::id()));
        let mut adapters = Vec::with_capacity(args.synthetic_loras);
        for i in 0..args.synthetic_loras {
            let path = dir.join(format!("lora{i}"));
            let adapter = SyntheticLora {
                seed: 1000 + i as u64,
                rank: args.synthetic_lora_rank,
                alpha: 2.0 * args.synthetic_lora_rank as f64,
                use_rslora: false,
                modules: LoraModule::ALL.to_vec(),
                b_amp: 0.01,
            };
            adapter.write(&path, &config, "bench").with_context(|| format!("writing {}", path.display()))?;
            adapters.push(LoraRequest { name: format!("lora{i}"), id: i as u32 + 1, path });
        }
        Ok(Some(Self { dir, adapters, rank: args.synthetic_lora_rank }))
    }

    /// The adapter of the `i`-th request.
    pub fn for_request(&self, i: usize) -> LoraRequest {
        self.adapters[i % self.adapters.len()].clone()
    }

    pub fn report<B: Backend>(&self, engine: &LlmEngine<B>) -> LoraReport {
        let lora = engine.config().lora.clone().unwrap_or_default();
        LoraReport {
            adapters: self.adapters.len(),
            rank: self.rank,
            max_loras: lora.max_loras,
            slot_loads: engine.runner().lora_slot_table().map_or(0, |t| t.loads),
        }
    }
}

/// What a LoRA run used: adapters, their rank, the slots, and how many times
/// an adapter was written into a slot (more than `adapters` means swapping).
#[derive(Serialize, Debug, Clone)]
pub struct LoraReport {
    pub adapters: usize,
    pub rank: usize,
    pub max_loras: usize,
    pub slot_loads: u64,
}

impl std::fmt::Display for LoraReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "LoRA:               {} adapters of rank {}, {} slots, {} slot loads",
            self.adapters, self.rank, self.max_loras, self.slot_loads
        )
    }
}
