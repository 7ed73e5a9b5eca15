//! LoRA adapters as PEFT saves them, and their slots on a backend.
//!
//! A PEFT adapter folder holds `adapter_config.json` (`r`, `lora_alpha`,
//! `use_rslora`, `target_modules`...) and `adapter_model.safetensors`, whose
//! tensors are named after the base model's modules:
//! `base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight` (`[r, in]`)
//! and `...lora_B.weight` (`[out, r]`). [`LoraAdapter::load`] reads one into
//! host memory for a given base model, checking every tensor against it and
//! folding the scale (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA) into `B`.
//!
//! [`LoraSlots`] holds up to `max_loras` adapters on the backend at once, in
//! stacked tensors per layer and projection (see
//! [`pagoda_backend::LoraShrinkArgs`]); [`LlamaModel::forward`](crate::LlamaModel::forward)
//! applies them to the tokens a step's `lora_slots` name.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::{bf16, f16};
use pagoda_backend::{Backend, DType, HostSlice, Tensor};
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::{SafetensorsWeights, WeightData, WeightSource};

/// The projections a LoRA adapter may adapt, in the order of [`LoraModule::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraModule {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraModule {
    pub const ALL: [LoraModule; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// The module's name in Hugging Face checkpoints and PEFT configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// `(in_features, out_features)` of the projection in this model.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        match self {
            Self::Q => (h, c.q_size()),
            Self::K | Self::V => (h, c.kv_size()),
            Self::O => (c.q_size(), h),
            Self::Gate | Self::Up => (h, i),
            Self::Down => (i, h),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One projection's adapter matrices, f32, row-major.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// `[rank, in_features]`.
    pub a: Vec<f32>,
    /// `[out_features, rank]`, the scale folded in.
    pub b: Vec<f32>,
    pub rank: usize,
}

/// A PEFT LoRA adapter in host memory, checked against one base model.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    path: PathBuf,
    /// The largest rank of any of its projections (`r`, unless `rank_pattern` varies it).
    rank: usize,
    /// `layers[l][module]`: the matrices of each adapted projection.
    layers: Vec<[Option<LoraPair>; 7]>,
    /// `base_model_name_or_path` from its config, if any.
    base_model: Option<String>,
    /// Its slot contents, packed at its first slot load: later loads (an
    /// adapter swapped out and back in) copy bytes and convert nothing.
    packed: OnceLock<PackedSlot>,
}

/// An adapter's slot contents in the slots' layout and dtype: per layer, the
/// bytes of its slot in each of the [`LayerLoraSlots`] stacks, in the order of
/// [`LayerLoraSlots::stacks`] (a stack of `P` parts: `P` chunks, part-major).
#[derive(Clone, Debug)]
struct PackedSlot {
    max_rank: usize,
    dtype: DType,
    layers: Vec<[Vec<u8>; NUM_STACKS]>,
}

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A projection's `A` and `B` as read, before both are checked to be there.
type MatrixPair = (Option<Vec<f32>>, Option<Vec<f32>>);

/// What `adapter_config.json` says that loading needs.
struct AdapterConfig {
    alpha: f64,
    use_rslora: bool,
    base_model: Option<String>,
}

fn parse_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::config(&path, e.to_string()))?;
    let bad = |detail: String| ModelError::config(&path, detail);
    let peft_type = json.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(bad(format!("peft_type {peft_type:?}: only LoRA adapters are supported")));
    }
    let is_true = |key: &str| json.get(key).and_then(Value::as_bool) == Some(true);
    let non_empty = |key: &str| match json.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    for (key, what) in [
        ("use_dora", "DoRA adapters are not supported"),
        ("fan_in_fan_out", "fan_in_fan_out (Conv1D-style weights) is not supported"),
    ] {
        if is_true(key) {
            return Err(bad(format!("{key}: {what}")));
        }
    }
    for (key, what) in [
        ("modules_to_save", "fully trained modules beside the LoRA are not supported"),
        ("alpha_pattern", "per-module alphas are not supported"),
        ("trainable_token_indices", "trainable tokens are not supported"),
    ] {
        if non_empty(key) {
            return Err(bad(format!("{key}: {what}")));
        }
    }
    match json.get("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(other) => {
            return Err(bad(format!("bias {other:?}: LoRA biases are not supported (only \"none\")")))
        }
    }
    let rank = json.get("r").and_then(Value::as_u64).ok_or_else(|| bad("no integer `r`".into()))?;
    if rank == 0 {
        return Err(bad("r is 0".into()));
    }
    // PEFT's default alpha is 8.
    let alpha = match json.get("lora_alpha") {
        None | Some(Value::Null) => 8.0,
        Some(v) => v.as_f64().ok_or_else(|| bad(format!("lora_alpha {v} is not a number")))?,
    };
    if !alpha.is_finite() {
        return Err(bad(format!("lora_alpha {alpha}")));
    }
    Ok(AdapterConfig {
        alpha,
        use_rslora: is_true("use_rslora"),
        base_model: json.get("base_model_name_or_path").and_then(Value::as_str).map(str::to_owned),
    })
}

/// A PEFT tensor name's `(layer, module, is_b)`, or why it cannot be one of ours.
fn parse_tensor_name(name: &str) -> std::result::Result<(usize, LoraModule, bool), String> {
    let unsupported = || {
        format!("tensor {name:?}: only LoRA on the layers' q/k/v/o and gate/up/down projections is supported")
    };
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    if rest.contains("embed_tokens") || rest.contains("lm_head") || rest.contains("lora_embedding") {
        return Err(format!("tensor {name:?}: LoRA on the embeddings or lm_head is not supported"));
    }
    if rest.contains("lora_magnitude_vector") {
        return Err(format!("tensor {name:?}: DoRA adapters are not supported"));
    }
    let rest = rest.strip_prefix("model.").unwrap_or(rest);
    let rest = rest.strip_prefix("layers.").ok_or_else(unsupported)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unsupported)?;
    let layer: usize = layer.parse().map_err(|_| unsupported())?;
    let parts: Vec<&str> = rest.split('.').collect();
    // parent.module.lora_X[.adapter_name].weight
    let (parent, module, kind) = match parts.as_slice() {
        [p, m, k, "weight"] | [p, m, k, _, "weight"] => (*p, *m, *k),
        _ => return Err(unsupported()),
    };
    let module = LoraModule::from_name(module).filter(|m| m.parent() == parent).ok_or_else(unsupported)?;
    let is_b = match kind {
        "lora_A" => false,
        "lora_B" => true,
        _ => return Err(unsupported()),
    };
    Ok((layer, module, is_b))
}

fn to_f32(data: &WeightData<'_>) -> Vec<f32> {
    match data {
        WeightData::Owned(values) => values.clone(),
        WeightData::Borrowed(bytes, dtype) => match dtype {
            DType::F32 => {
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            DType::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::BF16 => {
                bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            DType::F8E4M3 => bytes.iter().map(|&b| pagoda_backend::fp8::e4m3_to_f32(b)).collect(),
            // SafetensorsWeights hands out only float types.
            DType::I32 | DType::I64 => unreachable!("safetensors weights are float"),
        },
    }
}

impl LoraAdapter {
    /// Reads a PEFT adapter folder for `model`: every tensor must adapt one
    /// of the model's layer projections, with shapes that fit it, and every
    /// adapted projection needs both `A` and `B`. Ranks above `max_rank` are
    /// refused (the slots are that wide).
    pub fn load(dir: impl AsRef<Path>, model: &ModelConfig, max_rank: usize) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(ModelError::ModelPath {
                path: dir.into(),
                detail: "not a LoRA adapter folder".into(),
            });
        }
        let config = parse_config(dir)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            let detail = if dir.join("adapter_model.bin").is_file() {
                "adapter_model.bin (a pickle) is not read: save the adapter with safe_serialization (adapter_model.safetensors)"
            } else {
                "no adapter_model.safetensors"
            };
            return Err(ModelError::ModelPath { path: dir.into(), detail: detail.into() });
        }
        let weights = SafetensorsWeights::open_files(std::slice::from_ref(&weights_path))?;
        let bad = |detail: String| ModelError::Safetensors { path: weights_path.clone(), detail };

        let mut halves: Vec<[MatrixPair; 7]> = (0..model.num_layers).map(|_| Default::default()).collect();
        let names: BTreeSet<&str> = weights.names().collect();
        if names.is_empty() {
            return Err(bad("the adapter holds no tensors".into()));
        }
        for name in names {
            let (layer, module, is_b) = parse_tensor_name(name).map_err(bad)?;
            if layer >= model.num_layers {
                return Err(bad(format!("tensor {name:?}: the model has {} layers", model.num_layers)));
            }
            let tensor = weights.tensor(name)?;
            let (in_features, out_features) = module.dims(model);
            let [rows, cols] = tensor.shape[..] else {
                return Err(bad(format!("tensor {name:?} of shape {:?} is not a matrix", tensor.shape)));
            };
            let fits = if is_b { rows == out_features } else { cols == in_features };
            if !fits {
                let want = if is_b { format!("[{out_features}, r]") } else { format!("[r, {in_features}]") };
                return Err(bad(format!("tensor {name:?} of shape {:?} does not fit {want}", tensor.shape)));
            }
            let slot = &mut halves[layer][module.index()];
            let half = if is_b { &mut slot.1 } else { &mut slot.0 };
            *half = Some(to_f32(&tensor.data));
        }

        let mut rank = 0;
        let mut layers = Vec::with_capacity(model.num_layers);
        for (l, modules) in halves.into_iter().enumerate() {
            let mut out: [Option<LoraPair>; 7] = Default::default();
            for (m, (a, b)) in modules.into_iter().enumerate() {
                let module = LoraModule::ALL[m];
                let (in_features, out_features) = module.dims(model);
                let (a, mut b) = match (a, b) {
                    (None, None) => continue,
                    (Some(a), Some(b)) => (a, b),
                    _ => {
                        return Err(bad(format!(
                            "layer {l} {}: lora_A and lora_B must both be present",
                            module.name()
                        )))
                    }
                };
                let r = a.len() / in_features;
                if b.len() != out_features * r || r == 0 {
                    return Err(bad(format!(
                        "layer {l} {}: lora_A has rank {r} but lora_B holds {} values for {out_features} rows",
                        module.name(),
                        b.len()
                    )));
                }
                if r > max_rank {
                    return Err(ModelError::config(
                        dir.join(CONFIG_FILE),
                        format!("rank {r} (layer {l} {}) exceeds --max-lora-rank {max_rank}", module.name()),
                    ));
                }
                let scale = if config.use_rslora {
                    config.alpha / (r as f64).sqrt()
                } else {
                    config.alpha / r as f64
                };
                b.iter_mut().for_each(|v| *v = (*v as f64 * scale) as f32);
                rank = rank.max(r);
                out[m] = Some(LoraPair { a, b, rank: r });
            }
            layers.push(out);
        }
        Ok(Self {
            path: dir.to_path_buf(),
            rank,
            layers,
            base_model: config.base_model,
            packed: OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The largest rank among its projections.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// `base_model_name_or_path` from its config.
    pub fn base_model(&self) -> Option<&str> {
        self.base_model.as_deref()
    }

    /// The matrices of one layer's projection, if the adapter adapts it.
    pub fn pair(&self, layer: usize, module: LoraModule) -> Option<&LoraPair> {
        self.layers.get(layer)?[module.index()].as_ref()
    }

    /// Bytes of its matrices in f32.
    pub fn host_bytes(&self) -> usize {
        self.layers.iter().flatten().flatten().map(|p| 4 * (p.a.len() + p.b.len())).sum()
    }
}

/// `values` as little-endian bytes of `dtype` (a float dtype; anything else
/// keeps f32, which no backend's activation dtype is).
fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        DType::BF16 => {
            let mut v = vec![bf16::ZERO; values.len()];
            v.convert_from_f32_slice(values);
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::F16 => {
            let mut v = vec![f16::ZERO; values.len()];
            v.convert_from_f32_slice(values);
            bytemuck::cast_slice(&v).to_vec()
        }
        _ => bytemuck::cast_slice(values).to_vec(),
    }
}

/// The stacks of [`LayerLoraSlots`].
const NUM_STACKS: usize = 9;

/// The stacked adapter tensors of one layer (see [`pagoda_backend::LoraArgs`]):
/// `S` slots, each of rank `R` (adapters of a lower rank are zero-padded).
/// Every stack is `[P, S, R, N]` with `P` parts of `S` slots: an `A` stack's
/// parts are the projections of one product (so `x · Aᵀ` over every slot
/// gives each part's columns contiguous), a `B` stack's parts are
/// projections of equal width in adjacent output columns (k and v, gate and
/// up), so that a backend may batch their expands; a part's `B` is handed
/// to the products as a `[S, R, N]` view.
pub(crate) struct LayerLoraSlots<B: Backend> {
    /// `[3, S, R, H]`: the A of q, k and v.
    pub qkv_a: Tensor<B>,
    /// `[1, S, R, q]`: q's B transposed; `q_b` is its `[S, R, q]` view.
    q_b_stack: Tensor<B>,
    pub q_b: Tensor<B>,
    /// `[2, S, R, kv]`: k's and v's B transposed; `k_b`, `v_b` are views.
    kv_b_stack: Tensor<B>,
    pub k_b: Tensor<B>,
    pub v_b: Tensor<B>,
    /// `[1, S, R, q]` and `[1, S, R, H]` (`o_b` the `[S, R, H]` view).
    pub o_a: Tensor<B>,
    o_b_stack: Tensor<B>,
    pub o_b: Tensor<B>,
    /// `[2, S, R, H]`: the A of gate and up.
    pub gate_up_a: Tensor<B>,
    /// `[2, S, R, I]`: gate's and up's B transposed; `gate_b`, `up_b` are views.
    gate_up_b_stack: Tensor<B>,
    pub gate_b: Tensor<B>,
    pub up_b: Tensor<B>,
    /// `[1, S, R, I]` and `[1, S, R, H]` (`down_b` the `[S, R, H]` view).
    pub down_a: Tensor<B>,
    down_b_stack: Tensor<B>,
    pub down_b: Tensor<B>,
}

impl<B: Backend> LayerLoraSlots<B> {
    /// Zeroed stacks for `s` slots of rank `r`.
    fn new(backend: &B, c: &ModelConfig, s: usize, r: usize) -> Result<Self> {
        let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_size(), c.kv_size());
        let dtype = backend.activation_dtype();
        let zeros = |parts: usize, n: usize| -> Result<Tensor<B>> {
            let t = backend.alloc(&[parts, s, r, n], dtype)?;
            backend.fill(&t, 0.0)?;
            Ok(t)
        };
        let part = |stack: &Tensor<B>, p: usize| -> Result<Tensor<B>> {
            let n = stack.dim(3);
            Ok(stack.narrow(p, 1)?.reshape(&[s, r, n])?)
        };
        let (q_b_stack, kv_b_stack, o_b_stack) = (zeros(1, q)?, zeros(2, kv)?, zeros(1, h)?);
        let (gate_up_b_stack, down_b_stack) = (zeros(2, i)?, zeros(1, h)?);
        Ok(Self {
            qkv_a: zeros(3, h)?,
            q_b: part(&q_b_stack, 0)?,
            k_b: part(&kv_b_stack, 0)?,
            v_b: part(&kv_b_stack, 1)?,
            o_a: zeros(1, q)?,
            o_b: part(&o_b_stack, 0)?,
            gate_up_a: zeros(2, h)?,
            gate_b: part(&gate_up_b_stack, 0)?,
            up_b: part(&gate_up_b_stack, 1)?,
            down_a: zeros(1, i)?,
            down_b: part(&down_b_stack, 0)?,
            q_b_stack,
            kv_b_stack,
            o_b_stack,
            gate_up_b_stack,
            down_b_stack,
        })
    }

    /// The stacks (the order of [`PackedSlot`]'s buffers).
    fn stacks(&self) -> [&Tensor<B>; NUM_STACKS] {
        [
            &self.qkv_a,
            &self.q_b_stack,
            &self.kv_b_stack,
            &self.o_a,
            &self.o_b_stack,
            &self.gate_up_a,
            &self.gate_up_b_stack,
            &self.down_a,
            &self.down_b_stack,
        ]
    }
}

/// Room for `max_loras` adapters of rank up to `max_rank` on the backend.
pub struct LoraSlots<B: Backend> {
    pub(crate) layers: Vec<LayerLoraSlots<B>>,
    max_loras: usize,
    max_rank: usize,
}

impl<B: Backend> LoraSlots<B> {
    /// Zeroed slots for a model of this config, in the activation dtype.
    pub fn new(backend: &B, c: &ModelConfig, max_loras: usize, max_rank: usize) -> Result<Self> {
        if max_loras == 0 || max_rank == 0 {
            return Err(ModelError::config(
                "lora",
                format!("max_loras {max_loras}, max_lora_rank {max_rank}"),
            ));
        }
        let layers = (0..c.num_layers)
            .map(|_| LayerLoraSlots::new(backend, c, max_loras, max_rank))
            .collect::<Result<_>>()?;
        Ok(Self { layers, max_loras, max_rank })
    }

    pub fn max_loras(&self) -> usize {
        self.max_loras
    }

    pub fn max_rank(&self) -> usize {
        self.max_rank
    }

    /// Device bytes the slots take for a model of this config (for memory planning).
    pub fn bytes_for(c: &ModelConfig, max_loras: usize, max_rank: usize, dtype: DType) -> u64 {
        let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_size(), c.kv_size());
        let per_slot_layer = 3 * h + q + 2 * kv + q + h + 2 * h + 2 * i + i + h;
        (c.num_layers * max_loras * max_rank * per_slot_layer * dtype.size_in_bytes()) as u64
    }

    /// `adapter`'s slot contents in `dtype`, layers packed on several threads
    /// (an 8B adapter of rank 16 is 42M values).
    fn pack(&self, adapter: &LoraAdapter, dtype: DType) -> PackedSlot {
        let r = self.max_rank;
        // Each stack's (parts, N).
        let dims: Vec<[[usize; 2]; NUM_STACKS]> =
            self.layers.iter().map(|slots| slots.stacks().map(|t| [t.dim(0), t.dim(3)])).collect();
        let pack_layer = |l: usize| -> [Vec<u8>; NUM_STACKS] {
            let d = &dims[l];
            // A: each part `r` rows of `in_features`, the adapter's rank rows first.
            let a = |i: usize, modules: &[LoraModule]| {
                debug_assert_eq!(d[i][0], modules.len());
                let k = d[i][1];
                let mut host = vec![0f32; modules.len() * r * k];
                for (p, &m) in modules.iter().enumerate() {
                    if let Some(pair) = adapter.pair(l, m) {
                        host[p * r * k..][..pair.rank * k].copy_from_slice(&pair.a);
                    }
                }
                encode(&host, dtype)
            };
            // B transposed: each part `[r, out]`, the adapter's rank rows first.
            let b = |i: usize, modules: &[LoraModule]| {
                debug_assert_eq!(d[i][0], modules.len());
                let n = d[i][1];
                let mut host = vec![0f32; modules.len() * r * n];
                for (p, &m) in modules.iter().enumerate() {
                    if let Some(pair) = adapter.pair(l, m) {
                        let part = &mut host[p * r * n..(p + 1) * r * n];
                        for (j, src) in pair.b.chunks_exact(pair.rank).enumerate() {
                            for (i, &v) in src.iter().enumerate() {
                                part[i * n + j] = v;
                            }
                        }
                    }
                }
                encode(&host, dtype)
            };
            use LoraModule::*;
            [
                a(0, &[Q, K, V]),
                b(1, &[Q]),
                b(2, &[K, V]),
                a(3, &[O]),
                b(4, &[O]),
                a(5, &[Gate, Up]),
                b(6, &[Gate, Up]),
                a(7, &[Down]),
                b(8, &[Down]),
            ]
        };
        let num_layers = self.layers.len();
        let threads =
            std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8).min(num_layers.max(1));
        let per_thread = num_layers.div_ceil(threads.max(1)).max(1);
        let layers: Vec<[Vec<u8>; NUM_STACKS]> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..num_layers)
                .step_by(per_thread)
                .map(|first| {
                    let pack_layer = &pack_layer;
                    scope.spawn(move || {
                        (first..(first + per_thread).min(num_layers)).map(pack_layer).collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        PackedSlot { max_rank: r, dtype, layers }
    }

    /// Writes `adapter` into `slot` (every projection it does not adapt, and
    /// every rank row past its own, becomes zero). The first load packs the
    /// adapter for the slots' layout and dtype and keeps the bytes with it.
    pub fn load(&self, backend: &B, slot: usize, adapter: &LoraAdapter) -> Result<()> {
        if slot >= self.max_loras {
            return Err(ModelError::Forward(format!("LoRA slot {slot} of {}", self.max_loras)));
        }
        if adapter.rank > self.max_rank {
            return Err(ModelError::Forward(format!(
                "adapter rank {} exceeds the slots' {}",
                adapter.rank, self.max_rank
            )));
        }
        if adapter.layers.len() != self.layers.len() {
            return Err(ModelError::Forward(format!(
                "adapter of {} layers for a model of {}",
                adapter.layers.len(),
                self.layers.len()
            )));
        }
        let dtype = backend.activation_dtype();
        let fresh;
        let packed = match adapter.packed.get() {
            Some(p) if p.max_rank == self.max_rank && p.dtype == dtype => p,
            _ => {
                let p = self.pack(adapter, dtype);
                // The first engine's layout is kept (one engine per adapter cache).
                match adapter.packed.get() {
                    None => adapter.packed.get_or_init(|| p),
                    Some(_) => {
                        fresh = p;
                        &fresh
                    }
                }
            }
        };
        let s = self.max_loras;
        for (slots, bytes) in self.layers.iter().zip(&packed.layers) {
            for (stack, data) in slots.stacks().into_iter().zip(bytes) {
                // Part p of the slot: row p·S + slot of the stack as [P·S, R·N].
                let (parts, row) = (stack.dim(0), stack.numel() / (stack.dim(0) * s));
                let rows = stack.reshape(&[parts * s, row])?;
                for (p, chunk) in data.chunks_exact(data.len() / parts).enumerate() {
                    backend.write(&rows.narrow(p * s + slot, 1)?, HostSlice::Bytes(chunk, dtype))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_parse_with_and_without_the_adapter_name() {
        let q = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight";
        assert_eq!(parse_tensor_name(q), Ok((3, LoraModule::Q, false)));
        let down = "base_model.model.model.layers.12.mlp.down_proj.lora_B.default.weight";
        assert_eq!(parse_tensor_name(down), Ok((12, LoraModule::Down, true)));
        for bad in [
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        ] {
            assert!(parse_tensor_name(bad).is_err(), "{bad}");
        }
    }
}

/// A LoRA adapter of pseudo-random matrices, written as PEFT writes one:
/// for tests against PEFT (whose fixture script draws the same values) and
/// for benchmarks of adapters of real shapes.
///
/// Element `i` (row-major) of layer `l`'s `module` matrix (`A`: 0, `B`: 1) is
/// `(2u - 1) · amp` rounded once to f32, with
/// `u = (splitmix64(seed << 48 ^ l << 40 ^ module << 36 ^ matrix << 32 ^ i) >> 40) / 2^24`,
/// `amp = 1 / sqrt(in_features)` for `A` and `b_amp` for `B`; modules are
/// numbered as in [`LoraModule::ALL`].
#[derive(Clone, Debug)]
pub struct SyntheticLora {
    pub seed: u64,
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub modules: Vec<LoraModule>,
    pub b_amp: f64,
}

/// splitmix64's output function (Steele, Lea and Flood), as the fixture script computes it.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SyntheticLora {
    /// The values of one matrix (`is_b`: `[out, rank]`, else `[rank, in]`).
    pub fn matrix(&self, layer: usize, module: LoraModule, is_b: bool, c: &ModelConfig) -> Vec<f32> {
        let (in_features, out_features) = module.dims(c);
        let (numel, amp) = if is_b {
            (out_features * self.rank, self.b_amp)
        } else {
            (self.rank * in_features, 1.0 / (in_features as f64).sqrt())
        };
        let base = (self.seed << 48)
            ^ ((layer as u64) << 40)
            ^ ((module.index() as u64) << 36)
            ^ (u64::from(is_b) << 32);
        (0..numel as u64)
            .map(|i| {
                let u = (splitmix64(base ^ i) >> 40) as f64 / (1u64 << 24) as f64;
                ((2.0 * u - 1.0) * amp) as f32
            })
            .collect()
    }

    /// The PEFT tensor name of a matrix.
    pub fn tensor_name(layer: usize, module: LoraModule, is_b: bool) -> String {
        let kind = if is_b { "lora_B" } else { "lora_A" };
        format!("base_model.model.model.layers.{layer}.{}.{}.{kind}.weight", module.parent(), module.name())
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32)
    /// into `dir` for a base model of config `c`.
    pub fn write(&self, dir: &Path, c: &ModelConfig, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut targets: Vec<&str> = self.modules.iter().map(|m| m.name()).collect();
        targets.sort_unstable();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "target_modules": targets,
            "modules_to_save": null,
            "use_dora": false,
        });
        let path = dir.join(CONFIG_FILE);
        let text =
            serde_json::to_string_pretty(&config).map_err(|e| ModelError::config(&path, e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;

        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for layer in 0..c.num_layers {
            for &module in &self.modules {
                let (in_features, out_features) = module.dims(c);
                for is_b in [false, true] {
                    let shape =
                        if is_b { vec![out_features, self.rank] } else { vec![self.rank, in_features] };
                    let bytes =
                        self.matrix(layer, module, is_b, c).iter().flat_map(|v| v.to_le_bytes()).collect();
                    tensors.push((Self::tensor_name(layer, module, is_b), shape, bytes));
                }
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                        .expect("shape and bytes agree");
                (name.clone(), view)
            })
            .collect();
        let path = dir.join(WEIGHTS_FILE);
        safetensors::serialize_to_file(views, None, &path)
            .map_err(|e| ModelError::Safetensors { path: path.clone(), detail: e.to_string() })?;
        Ok(())
    }
}
