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
    /// Its slot contents, packed when the host cache reads it
    /// ([`Self::pack_for_slots`]) or else at its first slot load: slot loads
    /// (an adapter swapped out and back in too) copy bytes and convert nothing.
    packed: OnceLock<PackedSlot>,
}

/// An adapter's slot contents in the slots' layout and dtype: per layer, the
/// bytes of its slot in each of the [`LayerLoraSlots`] stacks, in the order of
/// [`LayerLoraSlots::stacks`] (a stack of `P` parts: `P` chunks, part-major).
#[derive(Clone, Debug)]
struct PackedSlot {
    /// What the bytes were packed for: a slot load with any other layout repacks.
    layout: SlotLayout,
    layers: Vec<[Vec<u8>; NUM_STACKS]>,
}

/// Everything an adapter's packed slot contents depend on, derived from the
/// model config alone so that an adapter can be packed (by the host cache)
/// before it meets a [`LoraSlots`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SlotLayout {
    max_rank: usize,
    dtype: DType,
    num_layers: usize,
    /// Each stack's `[parts, N]`, the same in every layer.
    stacks: [[usize; 2]; NUM_STACKS],
}

impl SlotLayout {
    fn new(c: &ModelConfig, max_rank: usize, dtype: DType) -> Self {
        Self { max_rank, dtype, num_layers: c.num_layers, stacks: stack_dims(c) }
    }
}

/// Each [`LayerLoraSlots`] stack's `[parts, N]` for a model of config `c`, in
/// the order of [`LayerLoraSlots::stacks`]: the one source of the slots'
/// shapes, for allocating them and for packing adapters into them.
fn stack_dims(c: &ModelConfig) -> [[usize; 2]; NUM_STACKS] {
    let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_size(), c.kv_size());
    [
        [3, h],  // qkv_a
        [1, q],  // q_b
        [2, kv], // k_b, v_b
        [1, q],  // o_a
        [1, h],  // o_b
        [2, h],  // gate_up_a
        [2, i],  // gate_b, up_b
        [1, i],  // down_a
        [1, h],  // down_b
    ]
}

/// The modules of each stack's parts, and whether the stack holds `B`
/// (transposed) rather than `A`, in the order of [`stack_dims`].
const STACK_MODULES: [(&[LoraModule], bool); NUM_STACKS] = {
    use LoraModule::*;
    [
        (&[Q, K, V], false),
        (&[Q], true),
        (&[K, V], true),
        (&[O], false),
        (&[O], true),
        (&[Gate, Up], false),
        (&[Gate, Up], true),
        (&[Down], false),
        (&[Down], true),
    ]
};

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
    /// Zeroed stacks for `s` slots of `layout`.
    fn new(backend: &B, layout: &SlotLayout, s: usize) -> Result<Self> {
        let r = layout.max_rank;
        let zeros = |[parts, n]: [usize; 2]| -> Result<Tensor<B>> {
            let t = backend.alloc(&[parts, s, r, n], layout.dtype)?;
            backend.fill(&t, 0.0)?;
            Ok(t)
        };
        let part = |stack: &Tensor<B>, p: usize| -> Result<Tensor<B>> {
            let n = stack.dim(3);
            Ok(stack.narrow(p, 1)?.reshape(&[s, r, n])?)
        };
        let [qkv_a, q_b, kv_b, o_a, o_b, gate_up_a, gate_up_b, down_a, down_b] = layout.stacks;
        let (q_b_stack, kv_b_stack, o_b_stack) = (zeros(q_b)?, zeros(kv_b)?, zeros(o_b)?);
        let (gate_up_b_stack, down_b_stack) = (zeros(gate_up_b)?, zeros(down_b)?);
        Ok(Self {
            qkv_a: zeros(qkv_a)?,
            q_b: part(&q_b_stack, 0)?,
            k_b: part(&kv_b_stack, 0)?,
            v_b: part(&kv_b_stack, 1)?,
            o_a: zeros(o_a)?,
            o_b: part(&o_b_stack, 0)?,
            gate_up_a: zeros(gate_up_a)?,
            gate_b: part(&gate_up_b_stack, 0)?,
            up_b: part(&gate_up_b_stack, 1)?,
            down_a: zeros(down_a)?,
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

/// Whether `adapter` fits slots of `layout`: its layers, its rank, and every
/// matrix's width (packing copies whole matrices into place).
fn check_fits(adapter: &LoraAdapter, layout: &SlotLayout) -> Result<()> {
    if adapter.rank > layout.max_rank {
        return Err(ModelError::Forward(format!(
            "adapter rank {} exceeds the slots' {}",
            adapter.rank, layout.max_rank
        )));
    }
    if adapter.layers.len() != layout.num_layers {
        return Err(ModelError::Forward(format!(
            "adapter of {} layers for a model of {}",
            adapter.layers.len(),
            layout.num_layers
        )));
    }
    for (l, modules) in adapter.layers.iter().enumerate() {
        for ((stack_modules, is_b), [_, n]) in STACK_MODULES.iter().zip(layout.stacks) {
            for &m in *stack_modules {
                let Some(pair) = &modules[m.index()] else { continue };
                let len = if *is_b { pair.b.len() } else { pair.a.len() };
                if len != pair.rank * n {
                    return Err(ModelError::Forward(format!(
                        "layer {l} {}: the adapter's matrices do not fit the slots (width {n})",
                        m.name()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// `adapter`'s slot contents for slots of `layout` (which it must fit, see
/// [`check_fits`]), layers packed on several threads (an 8B adapter of rank
/// 16 is 42M values).
fn pack(adapter: &LoraAdapter, layout: &SlotLayout) -> PackedSlot {
    let (r, dtype) = (layout.max_rank, layout.dtype);
    let pack_layer = |l: usize| -> [Vec<u8>; NUM_STACKS] {
        std::array::from_fn(|i| {
            let (modules, is_b) = STACK_MODULES[i];
            let [parts, n] = layout.stacks[i];
            debug_assert_eq!(parts, modules.len());
            // Each part `[r, n]`, the adapter's rank rows first: A as is, B transposed.
            let mut host = vec![0f32; parts * r * n];
            for (p, &m) in modules.iter().enumerate() {
                let Some(pair) = adapter.pair(l, m) else { continue };
                let part = &mut host[p * r * n..(p + 1) * r * n];
                if is_b {
                    for (out, row) in pair.b.chunks_exact(pair.rank).enumerate() {
                        for (k, &v) in row.iter().enumerate() {
                            part[k * n + out] = v;
                        }
                    }
                } else {
                    part[..pair.rank * n].copy_from_slice(&pair.a);
                }
            }
            encode(&host, dtype)
        })
    };
    let num_layers = layout.num_layers;
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
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    PackedSlot { layout: *layout, layers }
}

impl LoraAdapter {
    /// Packs its slot contents for [`LoraSlots`] of rank `max_rank` in `dtype`
    /// on a model of config `c` (the slots' [`LoraSlots::max_rank`] and
    /// [`LoraSlots::dtype`]), and keeps them: [`LoraSlots::load`] then copies
    /// bytes. Packing transposes and converts every matrix (42M values for an
    /// 8B adapter of rank 16), so a host cache does it when it reads an
    /// adapter rather than inside an engine step. A no-op when packed already
    /// (for any slots: the first packing is kept, as by [`LoraSlots::load`]).
    pub fn pack_for_slots(&self, c: &ModelConfig, max_rank: usize, dtype: DType) -> Result<()> {
        let layout = SlotLayout::new(c, max_rank, dtype);
        if self.packed.get().is_none() {
            check_fits(self, &layout)?;
            // A concurrent packer may win; both packed for their own layout.
            let _ = self.packed.set(pack(self, &layout));
        }
        Ok(())
    }

    /// Whether its slot contents are packed for these slots (see
    /// [`Self::pack_for_slots`]), so that a slot load converts nothing.
    pub fn is_packed_for_slots(&self, c: &ModelConfig, max_rank: usize, dtype: DType) -> bool {
        self.packed.get().is_some_and(|p| p.layout == SlotLayout::new(c, max_rank, dtype))
    }
}

/// Room for `max_loras` adapters of rank up to `max_rank` on the backend.
pub struct LoraSlots<B: Backend> {
    pub(crate) layers: Vec<LayerLoraSlots<B>>,
    max_loras: usize,
    layout: SlotLayout,
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
        let layout = SlotLayout::new(c, max_rank, backend.activation_dtype());
        let layers = (0..c.num_layers)
            .map(|_| LayerLoraSlots::new(backend, &layout, max_loras))
            .collect::<Result<_>>()?;
        Ok(Self { layers, max_loras, layout })
    }

    pub fn max_loras(&self) -> usize {
        self.max_loras
    }

    pub fn max_rank(&self) -> usize {
        self.layout.max_rank
    }

    /// The dtype the slots hold (the backend's activation dtype).
    pub fn dtype(&self) -> DType {
        self.layout.dtype
    }

    /// Device bytes the slots take for a model of this config (for memory planning).
    pub fn bytes_for(c: &ModelConfig, max_loras: usize, max_rank: usize, dtype: DType) -> u64 {
        let per_slot_layer: usize = stack_dims(c).iter().map(|[parts, n]| parts * n).sum();
        (c.num_layers * max_loras * max_rank * per_slot_layer * dtype.size_in_bytes()) as u64
    }

    /// Writes `adapter` into `slot` (every projection it does not adapt, and
    /// every rank row past its own, becomes zero). An adapter not packed for
    /// these slots yet ([`LoraAdapter::pack_for_slots`]) is packed here and
    /// keeps the bytes.
    pub fn load(&self, backend: &B, slot: usize, adapter: &LoraAdapter) -> Result<()> {
        if slot >= self.max_loras {
            return Err(ModelError::Forward(format!("LoRA slot {slot} of {}", self.max_loras)));
        }
        let fresh;
        let packed = match adapter.packed.get() {
            Some(p) if p.layout == self.layout => p,
            _ => {
                check_fits(adapter, &self.layout)?;
                let p = pack(adapter, &self.layout);
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
        let (s, dtype) = (self.max_loras, self.layout.dtype);
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
    use pagoda_backend_cpu_ref::CpuBackend;

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

    fn tiny_config() -> ModelConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama/config.json");
        ModelConfig::from_hf_file(&path).unwrap()
    }

    /// A rank-`rank` adapter of some projections, written to `dir` and read back.
    fn tiny_adapter(c: &ModelConfig, dir: &Path, rank: usize) -> LoraAdapter {
        let modules = vec![LoraModule::Q, LoraModule::V, LoraModule::O, LoraModule::Up, LoraModule::Down];
        let synthetic = SyntheticLora { seed: 5, rank, alpha: 16.0, use_rslora: false, modules, b_amp: 0.1 };
        synthetic.write(dir, c, "tiny-llama").unwrap();
        LoraAdapter::load(dir, c, 16).unwrap()
    }

    /// Slot `slot`'s values in every stack of every layer.
    fn slot_contents(cpu: &CpuBackend, slots: &LoraSlots<CpuBackend>, slot: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for layer in &slots.layers {
            for stack in layer.stacks() {
                let values = cpu.download_f32(stack).unwrap();
                // [P, S, R·N]: part p of the slot is row p·S + slot.
                let row = stack.numel() / (stack.dim(0) * slots.max_loras);
                for p in 0..stack.dim(0) {
                    out.extend_from_slice(&values[(p * slots.max_loras + slot) * row..][..row]);
                }
            }
        }
        out
    }

    #[test]
    fn the_slot_layout_from_the_config_is_the_shape_of_the_slots() {
        let c = tiny_config();
        let slots = LoraSlots::new(&CpuBackend::new(), &c, 3, 16).unwrap();
        for layer in &slots.layers {
            assert_eq!(layer.stacks().map(|t| [t.dim(0), t.dim(3)]), slots.layout.stacks);
            assert!(layer.stacks().iter().all(|t| t.dims()[1..3] == [3, 16] && t.dtype() == DType::F32));
        }
        for ((modules, _), [parts, _]) in STACK_MODULES.iter().zip(stack_dims(&c)) {
            assert_eq!(modules.len(), parts);
        }
    }

    #[test]
    fn packing_at_cache_time_gives_the_slot_contents_of_packing_at_slot_load() {
        let c = tiny_config();
        let cpu = CpuBackend::new();
        let slots = LoraSlots::new(&cpu, &c, 4, 16).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a");
        // The same adapter three times: packed by its slot load, packed
        // ahead for these slots (as the host cache does), and packed ahead
        // for slots of another rank (which the slot load must not use).
        let at_load = tiny_adapter(&c, &dir, 8);
        let ahead = LoraAdapter::load(&dir, &c, 16).unwrap();
        ahead.pack_for_slots(&c, 16, cpu.activation_dtype()).unwrap();
        assert!(ahead.is_packed_for_slots(&c, 16, DType::F32));
        let other_rank = LoraAdapter::load(&dir, &c, 16).unwrap();
        other_rank.pack_for_slots(&c, 32, DType::F32).unwrap();
        assert!(!other_rank.is_packed_for_slots(&c, 16, DType::F32));

        assert!(!at_load.is_packed_for_slots(&c, 16, DType::F32));
        slots.load(&cpu, 0, &at_load).unwrap();
        assert!(at_load.is_packed_for_slots(&c, 16, DType::F32));
        let (packed_ahead, packed_at_load) = (ahead.packed.get().unwrap(), at_load.packed.get().unwrap());
        assert_eq!(packed_ahead.layout, packed_at_load.layout);
        assert!(packed_ahead.layers == packed_at_load.layers, "packed bytes differ");

        slots.load(&cpu, 1, &ahead).unwrap();
        slots.load(&cpu, 3, &other_rank).unwrap();
        let want = slot_contents(&cpu, &slots, 0);
        assert!(want.iter().any(|&v| v != 0.0));
        assert!(slot_contents(&cpu, &slots, 1) == want, "the adapter packed ahead");
        assert!(slot_contents(&cpu, &slots, 3) == want, "the adapter packed for rank-32 slots");
        assert!(slot_contents(&cpu, &slots, 2).iter().all(|&v| v == 0.0));

        // Slots of another shape are refused, not packed wrong.
        let mut wider = c.clone();
        wider.intermediate_size *= 2;
        let fresh = LoraAdapter::load(&dir, &c, 16).unwrap();
        let err = fresh.pack_for_slots(&wider, 16, DType::F32).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        assert!(fresh.packed.get().is_none());
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
