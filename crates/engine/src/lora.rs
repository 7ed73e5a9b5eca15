//! Multi-LoRA serving: which adapters a request may name, the host cache of
//! loaded adapters, and the device slots they run from.
//!
//! Three tiers, as in vLLM and S-LoRA:
//! - the *registry* (the server's: names to [`LoraRequest`]s);
//! - the host cache ([`LoraCache`]): adapters read from disk, at most
//!   `max_cpu_loras` kept when no live request holds them (a live request
//!   holds its adapter through an `Arc`, so unloading or evicting one never
//!   breaks a request in flight);
//! - the device slots ([`LoraSlotTable`]): `max_loras` adapters on the
//!   device, replaced least recently used. The scheduler keeps a step's
//!   distinct adapters within `max_loras`, so every step's adapters fit.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pagoda_backend::{Backend, DType};
use pagoda_models::{LlamaModel, LoraAdapter, ModelConfig};
use rustc_hash::FxHashMap;

use crate::error::EngineError;

/// vLLM's LoRA flags: `--max-loras`, `--max-lora-rank`, `--max-cpu-loras`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraConfig {
    /// Adapters resident on the device at once, and most distinct adapters in one step.
    pub max_loras: usize,
    /// The largest adapter rank accepted (the slots are this wide).
    pub max_lora_rank: usize,
    /// Adapters kept in host memory when no request holds them (at least `max_loras`).
    pub max_cpu_loras: usize,
}

impl Default for LoraConfig {
    /// vLLM's defaults: one adapter at a time, rank up to 16.
    fn default() -> Self {
        Self { max_loras: 1, max_lora_rank: 16, max_cpu_loras: 1 }
    }
}

/// The ranks vLLM accepts for `--max-lora-rank`.
pub const SUPPORTED_LORA_RANKS: [usize; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

impl LoraConfig {
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.max_loras == 0 {
            return Err(EngineError::Config("--max-loras must be at least 1".into()));
        }
        if !SUPPORTED_LORA_RANKS.contains(&self.max_lora_rank) {
            return Err(EngineError::Config(format!(
                "--max-lora-rank {} is not one of {SUPPORTED_LORA_RANKS:?}",
                self.max_lora_rank
            )));
        }
        if self.max_cpu_loras < self.max_loras {
            return Err(EngineError::Config(format!(
                "--max-cpu-loras ({}) must be at least --max-loras ({})",
                self.max_cpu_loras, self.max_loras
            )));
        }
        Ok(())
    }
}

/// An adapter a request runs with: vLLM's `LoRARequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraRequest {
    /// The name clients use (`model` in the API).
    pub name: String,
    /// Unique per registered adapter, at least 1; a name registered again
    /// after an unload gets a new id (so its old blocks and slot are not reused).
    pub id: u32,
    /// The PEFT folder.
    pub path: PathBuf,
}

/// Loaded adapters in host memory, shared by whoever accepts requests (which
/// loads a request's adapter before the engine sees it) and the engine.
#[derive(Debug)]
pub struct LoraCache {
    config: LoraConfig,
    model: ModelConfig,
    /// The dtype of the engine's device slots, when it has them: adapters
    /// read are packed for the slots here, not in the engine step that
    /// first loads them into a slot.
    slot_dtype: Option<DType>,
    inner: Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    adapters: FxHashMap<u32, (Arc<LoraAdapter>, u64)>,
    clock: u64,
    loads: u64,
}

impl LoraCache {
    pub fn new(config: LoraConfig, model: ModelConfig) -> Self {
        Self { config, model, slot_dtype: None, inner: Mutex::default() }
    }

    /// Packs every adapter it reads for device slots of `model`,
    /// `max_lora_rank` wide, in `dtype` ([`LoraAdapter::pack_for_slots`]),
    /// so that loading one into a slot copies bytes. The slots
    /// ([`pagoda_models::LoraSlots`]) must be made from the same model config
    /// (one unsharded model); should they differ, a slot load repacks.
    pub fn with_slot_dtype(mut self, dtype: DType) -> Self {
        self.slot_dtype = Some(dtype);
        self
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The adapter of `request`, read from its folder unless cached. Reading
    /// checks it against the model (every tensor's shape, rank within
    /// `max_lora_rank`); an adapter that does not fit is an error naming why.
    /// An adapter the caller holds is never evicted (so one held from
    /// startup on is read once).
    pub fn get(&self, request: &LoraRequest) -> Result<Arc<LoraAdapter>, EngineError> {
        {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.clock += 1;
            let clock = inner.clock;
            if let Some((adapter, used)) = inner.adapters.get_mut(&request.id) {
                *used = clock;
                return Ok(adapter.clone());
            }
        }
        // Read and pack outside the lock: other requests' adapters stay available meanwhile.
        let lora_error = |e| EngineError::Lora(format!("adapter {:?}: {e}", request.name));
        let adapter =
            LoraAdapter::load(&request.path, &self.model, self.config.max_lora_rank).map_err(lora_error)?;
        if let Some(dtype) = self.slot_dtype {
            adapter.pack_for_slots(&self.model, self.config.max_lora_rank, dtype).map_err(lora_error)?;
        }
        let adapter = Arc::new(adapter);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        inner.loads += 1;
        let clock = inner.clock;
        let adapter = inner.adapters.entry(request.id).or_insert((adapter, clock)).0.clone();
        // Evict the least recently used adapters no request holds.
        while inner.adapters.len() > self.config.max_cpu_loras {
            let victim = inner
                .adapters
                .iter()
                .filter(|(_, (a, _))| Arc::strong_count(a) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(&id, _)| id);
            match victim {
                Some(id) => inner.adapters.remove(&id),
                None => break,
            };
        }
        Ok(adapter)
    }

    /// Drops an adapter from the cache (requests holding it keep it).
    pub fn remove(&self, id: u32) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).adapters.remove(&id);
    }

    /// Adapters in the cache, and reads from disk so far.
    pub fn stats(&self) -> (usize, u64) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (inner.adapters.len(), inner.loads)
    }
}

/// Which adapter each device slot holds; loads a step's adapters into slots.
#[derive(Debug)]
pub struct LoraSlotTable {
    /// Per slot: its adapter's id and when a step last used it.
    slots: Vec<Option<(u32, u64)>>,
    clock: u64,
    /// Adapters written into a slot so far (a working set larger than the
    /// slots shows here).
    pub loads: u64,
}

impl LoraSlotTable {
    pub fn new(max_loras: usize) -> Self {
        Self { slots: vec![None; max_loras], clock: 0, loads: 0 }
    }

    /// The slot of each of a step's adapters (`ids`, distinct), loading those
    /// not resident into free or least recently used slots that no adapter of
    /// this step holds. `adapter_of` finds an adapter by id.
    pub fn assign<'a, B: Backend>(
        &mut self,
        backend: &B,
        model: &LlamaModel<B>,
        ids: &[u32],
        adapter_of: impl Fn(u32) -> Option<&'a Arc<LoraAdapter>>,
    ) -> Result<Vec<(u32, usize)>, EngineError> {
        let slots = model
            .lora_slots()
            .ok_or_else(|| EngineError::Internal("a step with LoRA adapters, but LoRA is off".into()))?;
        if ids.len() > self.slots.len() {
            return Err(EngineError::Internal(format!(
                "{} adapters in one step, {} slots",
                ids.len(),
                self.slots.len()
            )));
        }
        self.clock += 1;
        let now = self.clock;
        let mut assigned = Vec::with_capacity(ids.len());
        // Resident ones first, so a load never evicts an adapter this step uses.
        for &id in ids {
            if let Some(slot) = self.slots.iter().position(|s| s.is_some_and(|(held, _)| held == id)) {
                self.slots[slot] = Some((id, now));
                assigned.push((id, slot));
            }
        }
        for &id in ids {
            if assigned.iter().any(|&(held, _)| held == id) {
                continue;
            }
            let slot = (0..self.slots.len())
                .filter(|&s| self.slots[s].is_none_or(|(_, used)| used < now))
                .min_by_key(|&s| self.slots[s].map_or(0, |(_, used)| used))
                .expect("fewer adapters in a step than slots");
            let adapter = adapter_of(id)
                .ok_or_else(|| EngineError::Internal(format!("no adapter {id} among the live requests")))?;
            slots.load(backend, slot, adapter)?;
            self.loads += 1;
            self.slots[slot] = Some((id, now));
            assigned.push((id, slot));
        }
        Ok(assigned)
    }

    /// Adapters resident now.
    pub fn num_resident(&self) -> usize {
        self.slots.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use pagoda_models::{LoraModule, SyntheticLora};

    use super::*;

    /// `n` rank-8 adapters for the tiny test model, written under `dir`.
    fn write_adapters(model: &ModelConfig, dir: &Path, n: usize) -> Vec<LoraRequest> {
        (0..n)
            .map(|i| {
                let path = dir.join(format!("lora{i}"));
                let modules = LoraModule::ALL.to_vec();
                let synthetic = SyntheticLora {
                    seed: i as u64,
                    rank: 8,
                    alpha: 16.0,
                    use_rslora: false,
                    modules,
                    b_amp: 0.1,
                };
                synthetic.write(&path, model, "tiny-llama").unwrap();
                LoraRequest { name: format!("lora{i}"), id: i as u32 + 1, path }
            })
            .collect()
    }

    #[test]
    fn adapters_held_from_startup_are_read_once_and_packed_for_the_slots() {
        let config_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama/config.json");
        let model = ModelConfig::from_hf_file(&config_path).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let adapters = write_adapters(&model, tmp.path(), 4);
        // Fewer host slots than adapters: unheld ones would be evicted and re-read.
        let config = LoraConfig { max_loras: 2, max_lora_rank: 16, max_cpu_loras: 2 };
        let cache = LoraCache::new(config.clone(), model.clone()).with_slot_dtype(DType::BF16);

        // As the bench (and serve, for --lora-modules) does before any request.
        let held: Vec<Arc<LoraAdapter>> = adapters.iter().map(|a| cache.get(a).unwrap()).collect();
        assert_eq!(cache.stats(), (4, 4));
        assert!(held.iter().all(|a| a.is_packed_for_slots(&model, 16, DType::BF16)));
        // The run's requests, round-robin over the adapters.
        for i in 0..32 {
            let adapter = cache.get(&adapters[i % adapters.len()]).unwrap();
            assert!(Arc::ptr_eq(&adapter, &held[i % adapters.len()]));
        }
        assert_eq!(cache.stats().1, 4, "an adapter held from startup was read again");

        // Not held, the same requests re-read evicted adapters.
        let cold = LoraCache::new(config, model.clone());
        for i in 0..32 {
            let adapter = cold.get(&adapters[i % adapters.len()]).unwrap();
            assert!(!adapter.is_packed_for_slots(&model, 16, DType::BF16), "no slot dtype, no packing");
        }
        assert!(cold.stats().1 > 4, "{:?}", cold.stats());
    }
}
