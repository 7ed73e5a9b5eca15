//! LoRA on the CPU reference backend against an independent oracle: the
//! same model with each adapter merged into its weights (`W + scale · B · A`,
//! computed here in f64 from the adapter's generator, not from Pagoda's
//! loader). Running an adapter from a slot must give the merged model's
//! logits, for prefill and decode, for adapters of different ranks,
//! projections and scalings, side by side in the slots.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::fixture;
use pagoda_backend::Backend;
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_models::weights::{SafetensorsWeights, WeightData, WeightSource, WeightTensor};
use pagoda_models::{
    LlamaModel, LoadOptions, LoraAdapter, LoraModule, ModelConfig, ModelError, ModelFiles, SingleSequence,
    SyntheticLora,
};

/// The base weights with some tensors replaced.
struct Merged {
    base: SafetensorsWeights,
    replaced: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl WeightSource for Merged {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.replaced.get(name).map(|(s, _)| s.clone()).or_else(|| self.base.shape(name))
    }
    fn file_bytes(&self, name: &str) -> u64 {
        self.base.file_bytes(name)
    }
    fn tensor(&self, name: &str) -> Result<WeightTensor<'_>, ModelError> {
        match self.replaced.get(name) {
            Some((shape, values)) => {
                Ok(WeightTensor { shape: shape.clone(), data: WeightData::Owned(values.clone()) })
            }
            None => self.base.tensor(name),
        }
    }
}

fn f32_values(t: &WeightTensor<'_>) -> Vec<f32> {
    match &t.data {
        WeightData::Owned(v) => v.clone(),
        WeightData::Borrowed(bytes, _) => {
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
    }
}

/// The tiny Llama's weights with `adapter` merged in.
fn merged(dir: &Path, c: &ModelConfig, adapter: &SyntheticLora) -> Merged {
    let base = SafetensorsWeights::open_dir(dir).unwrap();
    let r = adapter.rank as f64;
    let scale = if adapter.use_rslora { adapter.alpha / r.sqrt() } else { adapter.alpha / r };
    let mut replaced = HashMap::new();
    for layer in 0..c.num_layers {
        for &module in &adapter.modules {
            let parent = if matches!(module, LoraModule::Gate | LoraModule::Up | LoraModule::Down) {
                "mlp"
            } else {
                "self_attn"
            };
            let name = format!("model.layers.{layer}.{parent}.{}.weight", module.name());
            let w = base.tensor(&name).unwrap();
            let (shape, mut values) = (w.shape.clone(), f32_values(&w));
            let (k, n) = module.dims(c);
            assert_eq!(shape, [n, k]);
            let a = adapter.matrix(layer, module, false, c);
            let b = adapter.matrix(layer, module, true, c);
            for row in 0..n {
                for col in 0..k {
                    let delta: f64 = (0..adapter.rank)
                        .map(|j| b[row * adapter.rank + j] as f64 * a[j * k + col] as f64)
                        .sum();
                    let v = &mut values[row * k + col];
                    *v = (*v as f64 + scale * delta) as f32;
                }
            }
            replaced.insert(name, (shape, values));
        }
    }
    Merged { base, replaced }
}

fn adapters() -> Vec<SyntheticLora> {
    vec![
        SyntheticLora {
            seed: 11,
            rank: 8,
            alpha: 16.0,
            use_rslora: false,
            modules: LoraModule::ALL.to_vec(),
            b_amp: 0.2,
        },
        SyntheticLora {
            seed: 12,
            rank: 4,
            alpha: 8.0,
            use_rslora: true,
            modules: vec![LoraModule::Q, LoraModule::V],
            b_amp: 0.3,
        },
        SyntheticLora {
            seed: 13,
            rank: 16,
            alpha: 4.0,
            use_rslora: false,
            modules: vec![LoraModule::Gate, LoraModule::Up, LoraModule::Down, LoraModule::O],
            b_amp: 0.2,
        },
    ]
}

/// Prefill logits of every prompt position, then 6 greedy decode steps' logits.
fn run(cpu: &CpuBackend, model: &LlamaModel<CpuBackend>, slot: Option<usize>, prompt: &[u32]) -> Vec<f32> {
    let mut seq = SingleSequence::new(cpu, model, 64, 4).unwrap();
    seq.set_lora_slot(slot);
    let vocab = model.config().vocab_size;
    let mut all = cpu.download_f32(&seq.step(cpu, prompt, prompt.len()).unwrap()).unwrap();
    for _ in 0..6 {
        let last = &all[all.len() - vocab..];
        let next = (0..vocab).max_by(|&i, &j| last[i].total_cmp(&last[j])).unwrap() as u32;
        all.extend(cpu.download_f32(&seq.step(cpu, &[next], 1).unwrap()).unwrap());
    }
    all
}

/// f32 against f32 with the same products in another order: the tiny models
/// differ from transformers by at most 6.3e-6 (tiny_models.rs); an adapter's
/// delta adds one more product of the same size, so the same 1e-4 bound holds.
const ABS_TOL: f32 = 1e-4;

#[test]
fn adapters_in_slots_give_the_merged_models_logits() {
    let dir = fixture("tiny-llama");
    let files = ModelFiles::open(&dir).unwrap();
    let c = files.config.clone();
    let cpu = CpuBackend::new();
    let mut model = files.load_model(&cpu, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    model.enable_lora(&cpu, 4, 16).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = vec![1, 17, 42, 99, 5, 250, 7, 64, 33, 12, 8];
    let base = run(&cpu, &model, None, &prompt);
    // Slots 3, 1, 0: every slot index path, not only slot 0.
    let slots = [3, 1, 0];
    let mut synthetic = Vec::new();
    for (adapter, &slot) in adapters().iter().zip(&slots) {
        let path = tmp.path().join(format!("adapter{}", adapter.seed));
        adapter.write(&path, &c, "tiny-llama").unwrap();
        let loaded = LoraAdapter::load(&path, &c, 16).unwrap();
        assert_eq!(loaded.rank(), adapter.rank);
        model.lora_slots().unwrap().load(&cpu, slot, &loaded).unwrap();
        synthetic.push((adapter.clone(), slot));
    }
    // A slot with an adapter but run as the base model is the base model.
    assert_eq!(run(&cpu, &model, None, &prompt), base);
    for (adapter, slot) in synthetic {
        let got = run(&cpu, &model, Some(slot), &prompt);
        let weights = merged(&dir, &c, &adapter);
        let oracle =
            LlamaModel::load(&cpu, c.clone(), &weights, &LoadOptions::default(), &mut |_, _| {}).unwrap();
        let want = run(&cpu, &oracle, None, &prompt);
        assert_eq!(got.len(), want.len(), "adapter {}: greedy paths diverged", adapter.seed);
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let moved = got.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!(
            "adapter {} in slot {slot}: max |Δ| vs merged {max:.2e}; vs base {moved:.2e}",
            adapter.seed
        );
        assert!(max < ABS_TOL, "adapter {}: logits differ from the merged model's by {max:e}", adapter.seed);
        assert!(
            moved > 100.0 * ABS_TOL,
            "adapter {}: the adapter barely changes the logits ({moved:e})",
            adapter.seed
        );
    }
}

#[test]
fn adapters_that_do_not_fit_are_refused_by_name() {
    let dir = fixture("tiny-llama");
    let c = ModelFiles::open(&dir).unwrap().config;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("a");
    let adapter = SyntheticLora {
        seed: 1,
        rank: 32,
        alpha: 16.0,
        use_rslora: false,
        modules: vec![LoraModule::Q],
        b_amp: 0.1,
    };
    adapter.write(&path, &c, "tiny-llama").unwrap();
    let err = LoraAdapter::load(&path, &c, 16).unwrap_err().to_string();
    assert!(err.contains("rank 32") && err.contains("max-lora-rank 16"), "{err}");
    // For another model (wider hidden size) the shapes do not fit.
    let mut wider = c.clone();
    wider.hidden_size *= 2;
    let err = LoraAdapter::load(&path, &wider, 64).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
    // Unsupported PEFT options are named.
    let config_path = path.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["use_dora"] = true.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = LoraAdapter::load(&path, &c, 64).unwrap_err().to_string();
    assert!(err.contains("DoRA"), "{err}");
    // No folder, or no weights.
    assert!(LoraAdapter::load(tmp.path().join("missing"), &c, 64).is_err());
    config["use_dora"] = false.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    std::fs::remove_file(path.join("adapter_model.safetensors")).unwrap();
    let err = LoraAdapter::load(&path, &c, 64).unwrap_err().to_string();
    assert!(err.contains("no adapter_model.safetensors"), "{err}");
}
