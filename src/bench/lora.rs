//! Benchmarks with LoRA adapters: `--synthetic-loras N` writes N adapters of
//! pseudo-random matrices for the model's shape (every layer's seven
//! projections, rank `--synthetic-lora-rank`) and spreads the requests over
//! them round-robin, so what adapters cost can be measured on a
//! random-weight model of a real shape with no adapter files at hand.
//!
//! The adapters are read into the engine's host cache before the timed run
//! ([`BenchLoras::preload`]), as `serve` reads its `--lora-modules` at
//! startup: the run times serving with adapters, not reading them from disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use pagoda_backend::Backend;
use pagoda_engine::{LlmEngine, LoraCache, LoraRequest};
use pagoda_models::{LoadFormat, LoraAdapter, LoraModule, ModelFiles, SyntheticLora};
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
    /// The adapters as [`Self::preload`] read them, held for the run: the
    /// host cache never evicts an adapter someone holds, so none is read twice.
    resident: Vec<Arc<LoraAdapter>>,
    /// Seconds [`Self::preload`] took.
    adapter_load_s: f64,
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
        Ok(Some(Self {
            dir,
            adapters,
            rank: args.synthetic_lora_rank,
            resident: Vec::new(),
            adapter_load_s: 0.0,
        }))
    }

    /// Reads every adapter into the engine's host cache (which also packs it
    /// for the device slots) and holds it for the run; call before the timer
    /// starts.
    pub fn preload<B: Backend>(&mut self, engine: &LlmEngine<B>) -> anyhow::Result<()> {
        let cache = engine.lora_cache().context("--synthetic-loras needs --enable-lora")?;
        self.preload_into(cache)
    }

    fn preload_into(&mut self, cache: &LoraCache) -> anyhow::Result<()> {
        let started = Instant::now();
        self.resident = self.adapters.iter().map(|a| cache.get(a)).collect::<Result<_, _>>()?;
        self.adapter_load_s = started.elapsed().as_secs_f64();
        Ok(())
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
            adapter_load_s: self.adapter_load_s,
        }
    }
}

/// What a LoRA run used: adapters, their rank, the slots, how many times
/// an adapter was written into a slot (more than `adapters` means swapping),
/// and how long reading the adapters took (before, and not in, the timed run).
#[derive(Serialize, Debug, Clone)]
pub struct LoraReport {
    pub adapters: usize,
    pub rank: usize,
    pub max_loras: usize,
    pub slot_loads: u64,
    pub adapter_load_s: f64,
}

impl std::fmt::Display for LoraReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "LoRA:               {} adapters of rank {}, {} slots, {} slot loads, read in {:.2} s \
             before the timed run (as serve does at startup)",
            self.adapters, self.rank, self.max_loras, self.slot_loads, self.adapter_load_s
        )
    }
}

#[cfg(test)]
mod tests {
    use pagoda_engine::LoraConfig;

    use super::*;

    #[test]
    fn preloaded_adapters_stay_resident_for_the_run() {
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let args = LoraBenchArgs { synthetic_loras: 3, synthetic_lora_rank: 8 };
        let mut loras = BenchLoras::write(args, &model, LoadFormat::Dummy).unwrap().unwrap();
        let config = ModelFiles::open_with(&model, LoadFormat::Dummy).unwrap().config;
        // One unheld adapter fits the host cache: without the preload's hold,
        // round-robin requests would re-read an adapter on every request.
        let lora = LoraConfig { max_loras: 1, max_lora_rank: 8, max_cpu_loras: 1 };
        let cache = LoraCache::new(lora, config);
        loras.preload_into(&cache).unwrap();
        assert_eq!(cache.stats(), (3, 3));
        for i in 0..12 {
            cache.get(&loras.for_request(i)).unwrap();
        }
        assert_eq!(cache.stats().1, 3, "an adapter was read again during the run");
        assert!(loras.adapter_load_s > 0.0);
    }
}
