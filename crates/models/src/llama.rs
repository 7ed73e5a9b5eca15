//! The Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) over the
//! [`Backend`] trait.
//!
//! One layer is: RMS norm (fused with the residual add from the previous
//! layer) → fused q/k/v projection → rotary embedding and KV-cache write →
//! paged attention → output projection → residual add and RMS norm → fused
//! gate/up projection → SiLU(gate) · up → down projection. The q/k/v and
//! gate/up weights are concatenated at load so each is one matmul.
//!
//! Sharded over tensor-parallel ranks ([`LlamaModel::load_sharded`]), each
//! rank runs the same layer on its heads and FFN columns ([`TpShard`]) and
//! completes the o and down products with one all-reduce each.

use std::ops::Range;
use std::sync::Arc;

use pagoda_backend::{
    lora_token_groups, AttentionArgs, AttentionHostMetadata, AttentionMetadata, Backend, Communicator, DType,
    HostSlice, KvCacheShape, LinearFusion, LoraArgs, LoraGroups, LoraPart, RopeStyle, RotaryCacheArgs,
    Tensor, TokenId,
};

mod fp8;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::lora::{LayerLoraSlots, LoraSlots};
use crate::quantization::Quantization;
use crate::rope::cos_sin_table;
use crate::tensor_parallel::{weight_columns, weight_rows, TpShard};
use crate::weights::{WeightData, WeightSource, WeightTensor};
use fp8::{Fp8Load, LayerFp8};

/// The paged KV cache of every layer: `layers[l] = (K, V)`, each
/// `[num_blocks, num_kv_heads, block_size, head_dim]` of `dtype` (the model's
/// dtype, or F8E4M3 with a K and a V scale per layer).
pub struct KvCache<B: Backend> {
    pub shape: KvCacheShape,
    pub layers: Vec<(Tensor<B>, Tensor<B>)>,
    pub dtype: DType,
    /// Per layer, F32 `[2]` (K's scale, V's): views of one `[layers, 2]`
    /// tensor, for an F8E4M3 cache; empty otherwise.
    pub kv_scales: Vec<Tensor<B>>,
}

impl<B: Backend> KvCache<B> {
    /// Every K and V tensor, in layer order (for `copy_blocks` and swapping).
    pub fn tensors(&self) -> Vec<&Tensor<B>> {
        self.layers.iter().flat_map(|(k, v)| [k, v]).collect()
    }

    /// The scales layer `l`'s K and V are stored with (F8E4M3 caches only).
    pub fn layer_scales(&self, l: usize) -> Option<&Tensor<B>> {
        self.kv_scales.get(l)
    }

    /// Bytes of one block of one K (or V) tensor: what a host swap pool
    /// holds per block and cache tensor.
    pub fn block_bytes(&self) -> usize {
        self.shape.block_numel() * self.dtype.size_in_bytes()
    }
}

/// The inputs of one forward step, on the device.
pub struct ForwardBatch<B: Backend> {
    /// I32 `[T]`.
    pub token_ids: Tensor<B>,
    /// I32 `[T]`.
    pub positions: Tensor<B>,
    pub attn: AttentionMetadata<B>,
    /// I32 `[M]`: the rows of the step whose logits are wanted.
    pub logits_indices: Tensor<B>,
    /// Each token's LoRA slot and the tokens grouped by slot; `None` when no
    /// token of the step has an adapter (the LoRA products are then skipped).
    pub lora: Option<LoraTokens<B>>,
}

/// A step's LoRA inputs on the device: views of one I32 buffer, so a step
/// writes them with one copy.
pub struct LoraTokens<B: Backend> {
    /// I32 `[T]`: each token's slot, -1 for none.
    pub slots: Tensor<B>,
    /// I32 `[T]` and `[G, 3]`: the tokens grouped by slot ([`LoraGroups`]).
    pub order: Tensor<B>,
    pub groups: Tensor<B>,
}

impl<B: Backend> LoraTokens<B> {
    /// I32 elements of the buffer for `tokens` tokens in `groups` groups.
    pub fn buffer_len(tokens: usize, groups: usize) -> usize {
        2 * tokens + 3 * groups
    }

    /// The host layout of the buffer: slots, order, groups (padded to
    /// `capacity` groups when given, for a fixed-size buffer).
    pub fn host_layout(slots: &[i32], capacity: Option<usize>, into: &mut Vec<i32>) {
        let (order, groups) = lora_token_groups(slots, capacity);
        into.clear();
        into.extend_from_slice(slots);
        into.extend_from_slice(&order);
        into.extend_from_slice(&groups);
    }

    /// Views of `buffer` (at least [`LoraTokens::buffer_len`]) for `tokens`
    /// tokens in `groups` groups.
    pub fn views(buffer: &Tensor<B>, tokens: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            slots: buffer.narrow(0, tokens)?,
            order: buffer.narrow(tokens, tokens)?,
            groups: buffer.narrow(2 * tokens, 3 * groups)?.reshape(&[groups, 3])?,
        })
    }

    fn groups(&self) -> LoraGroups<'_, B> {
        LoraGroups { order: &self.order, groups: &self.groups }
    }
}

impl<B: Backend> ForwardBatch<B> {
    /// Uploads host inputs, checking their lengths agree with the attention metadata.
    pub fn upload(
        backend: &B,
        token_ids: &[TokenId],
        positions: &[i32],
        attn: AttentionHostMetadata,
        logits_indices: &[i32],
    ) -> Result<Self> {
        let t = token_ids.len();
        if positions.len() != t || attn.num_tokens() != t {
            return Err(ModelError::Forward(format!(
                "{t} tokens, {} positions, {} slots in the attention metadata",
                positions.len(),
                attn.num_tokens()
            )));
        }
        if let Some(bad) = logits_indices.iter().find(|&&i| i < 0 || i as usize >= t) {
            return Err(ModelError::Forward(format!(
                "logits index {bad} outside the {t} tokens of the step"
            )));
        }
        let ids: Vec<i32> = token_ids
            .iter()
            .map(|&id| i32::try_from(id).map_err(|_| ModelError::Forward(format!("token id {id} too large"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            token_ids: backend.upload(HostSlice::I32(&ids), &[t], DType::I32)?,
            positions: backend.upload(HostSlice::I32(positions), &[t], DType::I32)?,
            attn: AttentionMetadata::upload(backend, attn)?,
            logits_indices: backend.upload(
                HostSlice::I32(logits_indices),
                &[logits_indices.len()],
                DType::I32,
            )?,
            lora: None,
        })
    }

    /// Adds each token's LoRA slot (-1: none), for a model with [`LoraSlots`].
    pub fn with_lora_slots(mut self, backend: &B, slots: &[i32]) -> Result<Self> {
        let t = self.num_tokens();
        if slots.len() != t {
            return Err(ModelError::Forward(format!("{} LoRA slots for {t} tokens", slots.len())));
        }
        let mut host = Vec::new();
        LoraTokens::<B>::host_layout(slots, None, &mut host);
        let groups = (host.len() - 2 * t) / 3;
        let buffer = backend.upload(HostSlice::I32(&host), &[host.len()], DType::I32)?;
        self.lora = Some(LoraTokens::views(&buffer, t, groups)?);
        Ok(self)
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.numel()
    }
}

/// Largest rotary table we build (4 GiB of f32); Llama 3.1's 128k context needs 16M.
const MAX_ROPE_TABLE_ELEMENTS: usize = 1 << 30;

/// What to load and how.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Longest sequence (in tokens) the engine will run; caps the rotary
    /// table. Default: the model's `max_position_embeddings`.
    pub max_positions: Option<usize>,
    /// `--quantization fp8`: quantize the projections of a 16/32-bit
    /// checkpoint to E4M3 at load (an FP8 checkpoint is FP8 without it).
    pub quantization: Option<Quantization>,
}

struct LlamaLayer<B: Backend> {
    input_norm: Tensor<B>,
    /// `[Hq*D + 2*Hkv*D, H]`: q, k and v rows stacked.
    qkv: Tensor<B>,
    qkv_bias: Option<Tensor<B>>,
    o_proj: Tensor<B>,
    o_bias: Option<Tensor<B>>,
    post_attention_norm: Tensor<B>,
    /// `[2I, H]`: gate rows then up rows.
    gate_up: Tensor<B>,
    down: Tensor<B>,
    sliding_window: Option<usize>,
    /// The scales of the projections stored as E4M3 codes (`fp8.rs`); those
    /// weights above are then F8E4M3.
    fp8: LayerFp8<B>,
}

/// A loaded Llama-family model on a backend.
pub struct LlamaModel<B: Backend> {
    config: ModelConfig,
    dtype: DType,
    embed_tokens: Tensor<B>,
    layers: Vec<LlamaLayer<B>>,
    norm: Tensor<B>,
    /// The embedding table itself when the embeddings are tied.
    lm_head: Tensor<B>,
    /// F32 `[max_positions, head_dim]`.
    cos_sin: Tensor<B>,
    max_positions: usize,
    /// Per layer, the checkpoint's KV-cache scales `(k, v)` (1.0 where it
    /// has none): what an F8E4M3 cache stores its keys and values with.
    kv_scales: Vec<(f32, f32)>,
    /// Room for LoRA adapters, once [`LlamaModel::enable_lora`] made it.
    lora: Option<LoraSlots<B>>,
    /// This rank's heads and FFN columns (all of them when unsharded).
    shard: TpShard,
    /// The group the row-parallel products are summed over; `None` when
    /// unsharded, so a single rank runs no collective at all.
    comm: Option<Arc<dyn Communicator<B>>>,
}

/// Layer `l`'s KV-cache scales in the checkpoint: `self_attn.k_scale` and
/// `self_attn.v_scale` (each 1.0 when absent), else `self_attn.kv_scale` for
/// both, as vLLM reads FP8 checkpoints. Each is one value, positive and finite.
fn checkpoint_kv_scales(weights: &dyn WeightSource, l: usize) -> Result<(f32, f32)> {
    let name = |s: &str| format!("model.layers.{l}.self_attn.{s}");
    let read = |name: String| -> Result<Option<f32>> {
        if !weights.contains(&name) {
            return Ok(None);
        }
        let t = weights.tensor(&name)?;
        let data = host_slice(&t.data);
        if t.shape.iter().product::<usize>() != 1 || data.len() != 1 {
            return Err(ModelError::ShapeMismatch { name, expected: vec![], found: t.shape });
        }
        let x = data.get_f32(0);
        if !(x.is_finite() && x > 0.0) {
            return Err(ModelError::InvalidTensor {
                name,
                detail: format!("a KV-cache scale of {x} (must be positive and finite)"),
            });
        }
        Ok(Some(x))
    };
    let (k, v) = (read(name("k_scale"))?, read(name("v_scale"))?);
    if k.is_none() && v.is_none() {
        if let Some(both) = read(name("kv_scale"))? {
            return Ok((both, both));
        }
    }
    Ok((k.unwrap_or(1.0), v.unwrap_or(1.0)))
}

/// Every tensor a Hugging Face checkpoint of `c` holds (those the model
/// loads), with its full shape, in load order.
pub(crate) fn checkpoint_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, v, i) = (c.hidden_size, c.vocab_size, c.intermediate_size);
    let (q, kv) = (c.q_size(), c.kv_size());
    let mut expected: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![v, h]), ("model.norm.weight".into(), vec![h])];
    if !c.tie_word_embeddings {
        expected.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let mut layer = vec![
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ];
        if c.qkv_bias {
            layer.extend([
                ("self_attn.q_proj.bias", vec![q]),
                ("self_attn.k_proj.bias", vec![kv]),
                ("self_attn.v_proj.bias", vec![kv]),
            ]);
        }
        if c.o_bias {
            layer.push(("self_attn.o_proj.bias", vec![h]));
        }
        expected.extend(layer.into_iter().map(|(n, s)| (format!("{p}.{n}"), s)));
    }
    expected
}

/// Uploads tensors one at a time, checking shapes and reporting progress.
struct Uploader<'a, B: Backend> {
    backend: &'a B,
    weights: &'a dyn WeightSource,
    dtype: DType,
    done: u64,
    total: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl<B: Backend> Uploader<'_, B> {
    fn fetch(&self, name: &str, expected: &[usize]) -> Result<WeightTensor<'_>> {
        let t = self.weights.tensor(name)?;
        if t.shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.into(),
                expected: expected.to_vec(),
                found: t.shape,
            });
        }
        Ok(t)
    }

    fn advance(&mut self, name: &str) {
        self.done += self.weights.file_bytes(name);
        (self.progress)(self.done, self.total);
    }

    /// A new device tensor holding one named weight.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor<B>> {
        let t = match self.weights.on_device() {
            Some(dummy) => {
                let t = self.backend.alloc(shape, self.dtype)?;
                dummy.fill(self.backend, name, &t, 0, 0)?;
                t
            }
            None => {
                let w = self.fetch(name, shape)?;
                self.backend.upload(host_slice(&w.data), shape, self.dtype)?
            }
        };
        self.advance(name);
        Ok(t)
    }

    /// A new device tensor of stacked rows: of each named weight (of its full
    /// shape), in order, the rows of its range (this rank's share; all of
    /// them unsharded), along the leading dimension. Each part is written
    /// straight into its rows.
    fn stacked(&mut self, parts: &[(String, Vec<usize>, Range<usize>)]) -> Result<Tensor<B>> {
        let rows: usize = parts.iter().map(|(_, _, r)| r.len()).sum();
        let mut dims = parts[0].1.clone();
        dims[0] = rows;
        let out = self.backend.alloc(&dims, self.dtype)?;
        let mut start = 0;
        for (name, shape, range) in parts {
            let rows = out.narrow(start, range.len())?;
            match self.weights.on_device() {
                Some(dummy) => dummy.fill(self.backend, name, &rows, range.start, 0)?,
                None => {
                    let w = self.fetch(name, shape)?;
                    let part = weight_rows(&w.data, shape, range.clone());
                    self.backend.write(&rows, part.host_slice())?;
                }
            }
            start += range.len();
            self.advance(name);
        }
        Ok(out)
    }

    /// A new device tensor of the columns `cols` of a 2-D named weight (a
    /// row-parallel rank's share of the input features).
    fn columns(&mut self, name: &str, shape: &[usize], cols: Range<usize>) -> Result<Tensor<B>> {
        if cols.len() == shape[1] {
            return self.tensor(name, shape);
        }
        let t = match self.weights.on_device() {
            Some(dummy) => {
                let t = self.backend.alloc(&[shape[0], cols.len()], self.dtype)?;
                dummy.fill(self.backend, name, &t, 0, cols.start)?;
                t
            }
            None => {
                let w = self.fetch(name, shape)?;
                let part = weight_columns(&w.data, shape, cols.clone());
                self.backend.upload(part.host_slice(), &[shape[0], cols.len()], self.dtype)?
            }
        };
        self.advance(name);
        Ok(t)
    }
}

fn host_slice<'a>(data: &'a WeightData<'_>) -> HostSlice<'a> {
    match data {
        WeightData::Borrowed(bytes, dtype) => HostSlice::Bytes(bytes, *dtype),
        WeightData::Owned(values) => HostSlice::F32(values),
    }
}

impl<B: Backend> LlamaModel<B> {
    /// Uploads the weights named as in Hugging Face checkpoints, in the
    /// backend's activation dtype, tensor by tensor. `progress(done, total)`
    /// counts bytes of the file.
    pub fn load(
        backend: &B,
        config: ModelConfig,
        weights: &dyn WeightSource,
        options: &LoadOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self> {
        Self::load_with(backend, config, weights, options, None, progress)
    }

    /// [`LlamaModel::load`] of rank `comm.rank()`'s shard of a model split
    /// over `comm.world_size()` ranks ([`TpShard`]; a size that does not divide
    /// the model is [`ModelError::TensorParallel`]). Every rank loads its own
    /// shard, on its own backend, and then runs every forward pass with the
    /// same batches as the others, in step: each layer meets the other ranks
    /// in two all-reduces. A group of one loads the whole model.
    pub fn load_sharded(
        backend: &B,
        config: ModelConfig,
        weights: &dyn WeightSource,
        options: &LoadOptions,
        comm: Arc<dyn Communicator<B>>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self> {
        Self::load_with(backend, config, weights, options, Some(comm), progress)
    }

    fn load_with(
        backend: &B,
        config: ModelConfig,
        weights: &dyn WeightSource,
        options: &LoadOptions,
        comm: Option<Arc<dyn Communicator<B>>>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self> {
        config.validate().map_err(|d| ModelError::config("config", d))?;
        let shard = match &comm {
            Some(comm) => TpShard::new(&config, comm.rank(), comm.world_size())?,
            None => TpShard::whole(&config),
        };
        let comm = comm.filter(|comm| comm.world_size() > 1);
        let c = &config;
        let (h, v, i) = (c.hidden_size, c.vocab_size, c.intermediate_size);
        let (q, kv) = (c.q_size(), c.kv_size());

        // Every tensor the config implies, with its shape: checked before any
        // upload, so a wrong file fails in milliseconds, not after minutes.
        let expected = checkpoint_tensors(c);
        for (name, shape) in &expected {
            match weights.shape(name) {
                None => return Err(ModelError::MissingTensor(name.clone())),
                Some(found) if found != *shape => {
                    return Err(ModelError::ShapeMismatch {
                        name: name.clone(),
                        expected: shape.clone(),
                        found,
                    })
                }
                Some(_) => {}
            }
        }
        let max_positions = options.max_positions.unwrap_or(c.max_position_embeddings).max(1);
        if max_positions.saturating_mul(c.head_dim) > MAX_ROPE_TABLE_ELEMENTS {
            return Err(ModelError::config(
                "config",
                format!("a rotary table for {max_positions} positions is too large; set LoadOptions::max_positions"),
            ));
        }
        let names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let total = names.iter().map(|n| weights.file_bytes(n)).sum();
        progress(0, total);

        let dtype = backend.activation_dtype();
        let fp8_load = Fp8Load::resolve(c, weights, options, shard.world_size())?;
        let mut up = Uploader { backend, weights, dtype, done: 0, total, progress };
        let embed_tokens = up.tensor("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            // Column parallel: this rank's rows of q/k/v (its heads) and of gate/up;
            // row parallel: its input columns of o and down.
            let qkv_parts = |kind: &str, cols: &[usize]| -> Vec<(String, Vec<usize>, Range<usize>)> {
                [("q", q, shard.q_rows()), ("k", kv, shard.kv_rows()), ("v", kv, shard.kv_rows())]
                    .into_iter()
                    .map(|(m, rows, range)| {
                        (format!("{p}.self_attn.{m}_proj.{kind}"), [&[rows][..], cols].concat(), range)
                    })
                    .collect()
            };
            let ffn_columns = shard.intermediate_columns();
            let gate_up_parts = [
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h], ffn_columns.clone()),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h], ffn_columns.clone()),
            ];
            let (o_name, down_name) =
                (format!("{p}.self_attn.o_proj.weight"), format!("{p}.mlp.down_proj.weight"));
            // FP8: every projection as codes with row scales (unsharded: `resolve`
            // refuses tensor parallelism, so o and down are whole).
            let (qkv, o_proj, gate_up, down, fp8) = match fp8_load {
                None => (
                    up.stacked(&qkv_parts("weight", &[h]))?,
                    up.columns(&o_name, &[h, q], shard.q_rows())?,
                    up.stacked(&gate_up_parts)?,
                    up.columns(&down_name, &[h, i], ffn_columns)?,
                    LayerFp8::none(),
                ),
                Some(load) => {
                    let (qkv, qkv_s) = up.fp8_stacked(&qkv_parts("weight", &[h]), load)?;
                    let (o_proj, o_s) = up.fp8_stacked(&[(o_name, vec![h, q], 0..h)], load)?;
                    let (gate_up, gate_up_s) = up.fp8_stacked(&gate_up_parts, load)?;
                    let (down, down_s) = up.fp8_stacked(&[(down_name, vec![h, i], 0..h)], load)?;
                    (
                        qkv,
                        o_proj,
                        gate_up,
                        down,
                        LayerFp8 { qkv: qkv_s, o: o_s, gate_up: gate_up_s, down: down_s },
                    )
                }
            };
            layers.push(LlamaLayer {
                input_norm: up.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv,
                qkv_bias: if c.qkv_bias { Some(up.stacked(&qkv_parts("bias", &[]))?) } else { None },
                o_proj,
                o_bias: match (c.o_bias, shard.rank()) {
                    (false, _) => None,
                    (true, 0) => Some(up.tensor(&format!("{p}.self_attn.o_proj.bias"), &[h])?),
                    // Added once, by rank 0, into the sum of the partial products.
                    (true, _) => {
                        up.advance(&format!("{p}.self_attn.o_proj.bias"));
                        None
                    }
                },
                post_attention_norm: up.tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up,
                down,
                sliding_window: c.layer_sliding_window(l),
                fp8,
            });
        }
        let norm = up.tensor("model.norm.weight", &[h])?;
        let lm_head =
            if c.tie_word_embeddings { embed_tokens.clone() } else { up.tensor("lm_head.weight", &[v, h])? };

        let table = cos_sin_table(c, max_positions);
        let cos_sin = backend.upload(HostSlice::F32(&table), &[max_positions, c.head_dim], DType::F32)?;
        let kv_scales = (0..c.num_layers).map(|l| checkpoint_kv_scales(weights, l)).collect::<Result<_>>()?;
        Ok(Self {
            config,
            dtype,
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos_sin,
            max_positions,
            kv_scales,
            lora: None,
            shard,
            comm,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The dtype of weights, activations and the KV cache.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Allocates zeroed slots for `max_loras` adapters of rank up to `max_rank`.
    /// Not on a sharded model ([`ModelError::TensorParallel`]): the adapters'
    /// matrices are not split across ranks.
    pub fn enable_lora(&mut self, backend: &B, max_loras: usize, max_rank: usize) -> Result<()> {
        if self.is_fp8() {
            return Err(ModelError::Quantization(
                "LoRA adapters on FP8 weights (--quantization fp8 or an FP8 checkpoint) are not supported"
                    .into(),
            ));
        }
        if self.comm.is_some() {
            return Err(ModelError::TensorParallel(format!(
                "LoRA adapters on a model sharded over {} ranks are not supported",
                self.shard.world_size()
            )));
        }
        self.lora = Some(LoraSlots::new(backend, &self.config, max_loras, max_rank)?);
        Ok(())
    }

    /// Whether any projection holds FP8 (E4M3) weights.
    pub fn is_fp8(&self) -> bool {
        self.layers.iter().any(|l| l.fp8.any())
    }

    /// The LoRA slots, if [`LlamaModel::enable_lora`] made them.
    pub fn lora_slots(&self) -> Option<&LoraSlots<B>> {
        self.lora.as_ref()
    }

    /// This rank's share of the model (the whole model when unsharded).
    pub fn tp_shard(&self) -> &TpShard {
        &self.shard
    }

    /// Positions the rotary table covers: the longest sequence this model can run.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Per layer, the KV-cache scales `(k, v)` the checkpoint gives
    /// (`model.layers.N.self_attn.k_scale` / `v_scale`, or one `kv_scale`
    /// for both); 1.0 where it gives none (GGUF files never do).
    pub fn kv_scales(&self) -> &[(f32, f32)] {
        &self.kv_scales
    }

    /// A zeroed paged KV cache of `num_blocks` blocks of `block_size` tokens per
    /// layer, for this rank's KV heads (every rank's cache has the same block
    /// ids; each holds its own heads of them). `dtype` is the model's dtype or
    /// F8E4M3, which stores each layer's keys and values over its
    /// [`LlamaModel::kv_scales`] (E4M3 codes, half the bytes of bf16).
    pub fn alloc_kv_cache(
        &self,
        backend: &B,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
    ) -> Result<KvCache<B>> {
        if dtype != self.dtype && dtype != DType::F8E4M3 {
            return Err(ModelError::KvCache(format!(
                "a {dtype:?} cache for a model of {:?} (the model's dtype or F8E4M3)",
                self.dtype
            )));
        }
        let shape = KvCacheShape {
            num_blocks,
            num_kv_heads: self.shard.num_kv_heads(),
            block_size,
            head_dim: self.config.head_dim,
        };
        let mut layers = Vec::with_capacity(self.config.num_layers);
        for _ in 0..self.config.num_layers {
            let k = backend.alloc(&shape.dims(), dtype)?;
            let v = backend.alloc(&shape.dims(), dtype)?;
            // Unwritten slots are never read, but zeros keep a stray read finite.
            backend.fill(&k, 0.0)?;
            backend.fill(&v, 0.0)?;
            layers.push((k, v));
        }
        let kv_scales = if dtype == DType::F8E4M3 {
            let flat: Vec<f32> = self.kv_scales.iter().flat_map(|&(k, v)| [k, v]).collect();
            let all = backend.upload(HostSlice::F32(&flat), &[self.kv_scales.len(), 2], DType::F32)?;
            (0..self.kv_scales.len()).map(|l| Ok(all.narrow(l, 1)?.reshape(&[2])?)).collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(KvCache { shape, layers, dtype, kv_scales })
    }

    /// Runs the step's tokens through the model, writing their keys and values
    /// into `kv`, and returns the F32 logits `[M, V]` of the rows
    /// `batch.logits_indices` selects.
    pub fn forward(&self, backend: &B, batch: &ForwardBatch<B>, kv: &KvCache<B>) -> Result<Tensor<B>> {
        let logits = backend.alloc(&[batch.logits_indices.numel(), self.config.vocab_size], DType::F32)?;
        self.forward_into(backend, batch, kv, &logits)?;
        Ok(logits)
    }

    /// [`LlamaModel::forward`] into a caller's F32 `[M, V]` logits tensor. It
    /// allocates nothing that outlives the call, so it can be captured as a
    /// graph (the logits then stay where the graph writes them).
    ///
    /// Sharded, every rank computes the same (replicated) logits. A batch
    /// refused by the checks is refused by every rank before any collective;
    /// a failure after them aborts the rank's group (see
    /// [`Communicator::abort`]), since the other ranks may be waiting in an
    /// all-reduce this rank will never join.
    pub fn forward_into(
        &self,
        backend: &B,
        batch: &ForwardBatch<B>,
        kv: &KvCache<B>,
        logits: &Tensor<B>,
    ) -> Result<()> {
        let c = &self.config;
        let t = self.check_batch(batch, kv)?;
        let m = batch.logits_indices.numel();
        if logits.dims() != [m, c.vocab_size] || logits.dtype() != DType::F32 {
            return Err(ModelError::Forward(format!(
                "logits {:?} {:?} for {m} rows of {} (F32 wanted)",
                logits.dims(),
                logits.dtype(),
                c.vocab_size
            )));
        }
        let result = self.forward_checked(backend, batch, kv, logits, t, m);
        if let (Err(_), Some(comm)) = (&result, &self.comm) {
            comm.abort();
        }
        result
    }

    /// Sums the row-parallel partial products in the residual over the ranks
    /// (nothing at all when unsharded).
    fn reduce_residual(&self, backend: &B, residual: &Tensor<B>) -> Result<()> {
        match &self.comm {
            Some(comm) => Ok(comm.all_reduce_sum(backend, residual)?),
            None => Ok(()),
        }
    }

    /// The forward pass of [`LlamaModel::forward_into`], on a checked batch of `t`
    /// tokens with `m` logits rows.
    fn forward_checked(
        &self,
        backend: &B,
        batch: &ForwardBatch<B>,
        kv: &KvCache<B>,
        logits: &Tensor<B>,
        t: usize,
        m: usize,
    ) -> Result<()> {
        let (c, s) = (&self.config, &self.shard);
        let (h, d) = (c.hidden_size, self.dtype);

        // The residual stream is updated in place by the o and down products
        // (accumulate); each norm rides in the product that consumes it.
        let residual = backend.alloc(&[t, h], d)?;
        let qkv = backend.alloc(&[t, s.qkv_size()], d)?;
        let q = backend.alloc(&[t, s.q_size()], d)?;
        let attn_out = backend.alloc(&[t, s.q_size()], d)?;
        let mlp_act = backend.alloc(&[t, s.intermediate_size()], d)?;
        let eps = c.rms_norm_eps;
        let normed_by =
            |weight| LinearFusion { input_norm: Some((weight, eps)), silu_mul: false, accumulate: false };
        // Sharded, o and down are row parallel: rank 0 adds its partial product
        // into the residual and the other ranks write theirs over it, so the
        // all-reduce that follows adds the residual (and o's bias, which only
        // rank 0 holds) once and every partial product once.
        let add_to_residual = LinearFusion { input_norm: None, silu_mul: false, accumulate: s.rank() == 0 };

        // With adapters in the step, each adapted product gets its LoRA delta:
        // q/k/v's and gate/up's norms are computed once, for the base product
        // (then unfused) and the LoRA shrink alike, and gate/up is activated
        // only after its delta is added.
        let lora = match (&batch.lora, &self.lora) {
            (Some(tokens), Some(slots)) => Some(LoraStep::new(backend, c, slots, tokens, t)?),
            (Some(_), None) => {
                return Err(ModelError::Forward("a step with LoRA slots for a model without LoRA".into()))
            }
            _ => None,
        };

        backend.embedding(&batch.token_ids, &self.embed_tokens, &residual)?;
        for (l, (layer, (k_cache, v_cache))) in self.layers.iter().zip(&kv.layers).enumerate() {
            match &lora {
                None => fp8::linear_fused(
                    backend,
                    &residual,
                    &layer.qkv,
                    layer.fp8.qkv.as_ref(),
                    layer.qkv_bias.as_ref(),
                    &qkv,
                    &normed_by(&layer.input_norm),
                )?,
                Some(lora) => {
                    let normed = lora.norm(backend, &residual, &layer.input_norm, eps)?;
                    backend.linear(normed, &layer.qkv, layer.qkv_bias.as_ref(), &qkv)?;
                    lora.qkv(backend, l, normed, &qkv)?;
                }
            }
            backend.rotary_and_cache(&RotaryCacheArgs {
                qkv: &qkv,
                positions: &batch.positions,
                cos_sin: &self.cos_sin,
                q_out: &q,
                k_cache,
                v_cache,
                kv_scales: kv.layer_scales(l),
                slot_mapping: &batch.attn.slot_mapping,
                num_q_heads: s.num_q_heads(),
                num_kv_heads: s.num_kv_heads(),
                head_dim: c.head_dim,
                rotary_dim: c.head_dim,
                style: RopeStyle::Neox,
            })?;
            backend.attention(&AttentionArgs {
                q: &q,
                k_cache,
                v_cache,
                kv_scales: kv.layer_scales(l),
                out: &attn_out,
                meta: &batch.attn,
                num_q_heads: s.num_q_heads(),
                num_kv_heads: s.num_kv_heads(),
                head_dim: c.head_dim,
                scale: 1.0 / (c.head_dim as f32).sqrt(),
                sliding_window: layer.sliding_window,
            })?;
            fp8::linear_fused(
                backend,
                &attn_out,
                &layer.o_proj,
                layer.fp8.o.as_ref(),
                layer.o_bias.as_ref(),
                &residual,
                &add_to_residual,
            )?;
            self.reduce_residual(backend, &residual)?;
            match &lora {
                None => {
                    let mlp_in = LinearFusion { silu_mul: true, ..normed_by(&layer.post_attention_norm) };
                    let gate_up_fp8 = layer.fp8.gate_up.as_ref();
                    fp8::linear_fused(
                        backend,
                        &residual,
                        &layer.gate_up,
                        gate_up_fp8,
                        None,
                        &mlp_act,
                        &mlp_in,
                    )?;
                }
                Some(lora) => {
                    lora.o(backend, l, &attn_out, &residual)?;
                    let normed = lora.norm(backend, &residual, &layer.post_attention_norm, eps)?;
                    backend.linear(normed, &layer.gate_up, None, &lora.gate_up)?;
                    lora.gate_up(backend, l, normed, &mlp_act)?;
                }
            }
            let down_fp8 = layer.fp8.down.as_ref();
            fp8::linear_fused(backend, &mlp_act, &layer.down, down_fp8, None, &residual, &add_to_residual)?;
            self.reduce_residual(backend, &residual)?;
            if let Some(lora) = &lora {
                lora.down(backend, l, &mlp_act, &residual)?;
            }
        }

        // Only the rows that sample need the final norm and the vocabulary product.
        if m > 0 {
            let last_hidden = backend.alloc(&[m, h], d)?;
            backend.gather_rows(&residual, &batch.logits_indices, &last_hidden)?;
            backend.linear_fused(&last_hidden, &self.lm_head, None, logits, &normed_by(&self.norm))?;
        }
        Ok(())
    }

    /// Checks the batch and cache fit this model; returns the token count.
    fn check_batch(&self, batch: &ForwardBatch<B>, kv: &KvCache<B>) -> Result<usize> {
        let c = &self.config;
        let t = batch.num_tokens();
        let err = |s: String| Err(ModelError::Forward(s));
        if t == 0 {
            return err("empty batch".into());
        }
        if batch.token_ids.dtype() != DType::I32 || batch.positions.dtype() != DType::I32 {
            return err("token_ids and positions must be I32".into());
        }
        if batch.positions.numel() != t || batch.attn.host.num_tokens() != t {
            return err(format!(
                "{t} tokens but {} positions and {} slots",
                batch.positions.numel(),
                batch.attn.host.num_tokens()
            ));
        }
        if batch.attn.host.max_seq_len() > self.max_positions {
            return err(format!(
                "sequence of {} tokens exceeds the {} positions the model was loaded for",
                batch.attn.host.max_seq_len(),
                self.max_positions
            ));
        }
        let scaled = kv.dtype != DType::F8E4M3 || kv.kv_scales.len() == c.num_layers;
        if kv.layers.len() != c.num_layers
            || kv.shape.num_kv_heads != self.shard.num_kv_heads()
            || kv.shape.head_dim != c.head_dim
            || !scaled
        {
            return err(format!(
                "KV cache {:?} with {} layers does not fit this model",
                kv.shape,
                kv.layers.len()
            ));
        }
        Ok(t)
    }
}

/// A step's LoRA work: the token slots, the normed input of q/k/v and
/// gate/up (computed once for the base product and the LoRA shrink), and
/// gate/up's output before SiLU-and-mul.
struct LoraStep<'a, B: Backend> {
    slots: &'a [LayerLoraSlots<B>],
    tokens: &'a LoraTokens<B>,
    /// `[T, H]`: a norm's output, the input of q/k/v and of gate/up.
    normed: Tensor<B>,
    /// `[T, 2I]`: gate/up before SiLU-and-mul (the base product writes it).
    gate_up: Tensor<B>,
    q_size: usize,
    kv_size: usize,
    intermediate: usize,
}

impl<'a, B: Backend> LoraStep<'a, B> {
    fn new(
        backend: &B,
        c: &ModelConfig,
        slots: &'a LoraSlots<B>,
        tokens: &'a LoraTokens<B>,
        t: usize,
    ) -> Result<Self> {
        let d = backend.activation_dtype();
        Ok(Self {
            slots: &slots.layers,
            tokens,
            normed: backend.alloc(&[t, c.hidden_size], d)?,
            gate_up: backend.alloc(&[t, 2 * c.intermediate_size], d)?,
            q_size: c.q_size(),
            kv_size: c.kv_size(),
            intermediate: c.intermediate_size,
        })
    }

    /// `rms_norm(residual)` into the step's normed buffer, which it returns.
    fn norm(&self, backend: &B, residual: &Tensor<B>, weight: &Tensor<B>, eps: f32) -> Result<&Tensor<B>> {
        backend.rms_norm(residual, weight, eps, &self.normed)?;
        Ok(&self.normed)
    }

    /// `out[:, at_p..] += B_p · (A_p · x)` for each part `(b, at)`.
    fn apply(
        &self,
        backend: &B,
        x: &Tensor<B>,
        a: &Tensor<B>,
        parts: &[(&Tensor<B>, usize)],
        out: &Tensor<B>,
    ) -> Result<()> {
        let parts: Vec<LoraPart<'_, B>> =
            parts.iter().map(|&(b, out_offset)| LoraPart { b, out_offset }).collect();
        Ok(backend.lora_apply(&LoraArgs {
            x,
            a,
            parts: &parts,
            token_slots: &self.tokens.slots,
            out,
            groups: Some(self.tokens.groups()),
        })?)
    }

    /// `qkv += [B_q; B_k; B_v] · (A_qkv · normed)`, normed from [`LoraStep::norm`].
    fn qkv(&self, backend: &B, l: usize, normed: &Tensor<B>, qkv: &Tensor<B>) -> Result<()> {
        let s = &self.slots[l];
        let (q, kv) = (self.q_size, self.kv_size);
        self.apply(backend, normed, &s.qkv_a, &[(&s.q_b, 0), (&s.k_b, q), (&s.v_b, q + kv)], qkv)
    }

    /// `residual += B_o · (A_o · attn_out)` (the base o product was added already).
    fn o(&self, backend: &B, l: usize, attn_out: &Tensor<B>, residual: &Tensor<B>) -> Result<()> {
        let s = &self.slots[l];
        self.apply(backend, attn_out, &s.o_a, &[(&s.o_b, 0)], residual)
    }

    /// `mlp_act = silu_and_mul(gate_up + [B_gate; B_up] · (A_gate_up · normed))`,
    /// with the base product already in `self.gate_up`.
    fn gate_up(&self, backend: &B, l: usize, normed: &Tensor<B>, mlp_act: &Tensor<B>) -> Result<()> {
        let s = &self.slots[l];
        let parts = [(&s.gate_b, 0), (&s.up_b, self.intermediate)];
        self.apply(backend, normed, &s.gate_up_a, &parts, &self.gate_up)?;
        Ok(backend.silu_and_mul(&self.gate_up, mlp_act)?)
    }

    /// `residual += B_down · (A_down · mlp_act)`.
    fn down(&self, backend: &B, l: usize, mlp_act: &Tensor<B>, residual: &Tensor<B>) -> Result<()> {
        let s = &self.slots[l];
        self.apply(backend, mlp_act, &s.down_a, &[(&s.down_b, 0)], residual)
    }
}
