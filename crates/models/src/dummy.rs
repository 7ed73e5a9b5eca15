//! Random weights made from a config alone (`--load-format dummy`, vLLM's
//! name): shapes larger than any disk need no files, and the values are
//! made on the device ([`Backend::fill_uniform`]), so nothing crosses the
//! host for them.
//!
//! The values, per tensor (each its own seeded stream, keyed by the load
//! seed and the tensor's name):
//! - RMSNorm weights: 1.0, as trained norms roughly are.
//! - Every projection `[out, in]` (lm_head included) and its bias: uniform
//!   in `±1/√in` (PyTorch's default `nn.Linear` init), so each product keeps
//!   the scale of its input: activations stay of order one through any
//!   number of layers.
//! - The embedding table: uniform in `±1`.
//!
//! vLLM fills every parameter, norms included, with `U(-1e-3, 1e-3)`. At
//! that scale each product shrinks its input 15- to 50-fold and each norm
//! ~1700-fold: keys and values of an 8B shape are ~2e-5 (below E4M3's
//! smallest subnormal, so an FP8 KV cache with unit scales holds zeros) and
//! logits ~1e-6 (sampling at temperature 1 is uniform). Speed does not
//! depend on the values; n-gram drafts, prefix reuse and an FP8 cache do.
//! With tied embeddings either way the model tends to repeat a token (a
//! random embedding row is most like itself). ARCHITECTURE.md has the
//! measurements.

use std::collections::HashMap;

use pagoda_backend::{splitmix64_draw, Backend, Tensor, UniformFill};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::llama::checkpoint_tensors;
use crate::weights::{WeightData, WeightSource, WeightTensor};

/// vLLM's seed for dummy weights: the default of [`DummyWeights::new`]'s callers.
pub const DEFAULT_DUMMY_SEED: u64 = 1234;

/// How one tensor's values are made.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    Constant(f32),
    Uniform(UniformFill),
}

/// The weights of a model of a given config, as a formula: every tensor the
/// config implies, each made where it is loaded. A [`WeightSource`] whose
/// [`WeightSource::on_device`] is itself, so the loader fills device memory
/// instead of uploading; its [`WeightSource::tensor`] computes the same
/// values on the host (bit for bit, before rounding to the device's dtype).
#[derive(Clone, Debug)]
pub struct DummyWeights {
    seed: u64,
    tensors: HashMap<String, (Vec<usize>, Init)>,
}

/// FNV-1a of a tensor's name: what tells two tensors' streams apart.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3))
}

/// The most layers a dummy model may have.
const MAX_LAYERS: usize = 1 << 16;

/// The largest dummy model, in bf16 bytes (1 PiB): past any device, so a
/// config.json no file backs cannot make the loader overflow or run for ever.
const MAX_BYTES: u128 = 1 << 50;

/// Checks `c` is a model the loader can make: [`ModelConfig::validate`], and
/// sizes within [`MAX_LAYERS`] and [`MAX_BYTES`].
fn check_size(c: &ModelConfig) -> std::result::Result<(), String> {
    c.validate()?;
    if c.num_layers > MAX_LAYERS {
        return Err(format!("num_hidden_layers {} is more than {MAX_LAYERS}", c.num_layers));
    }
    // In u128, saturating: any overflow is past the bound anyway.
    let n = |x: usize| x as u128;
    let (h, v, i, d) = (n(c.hidden_size), n(c.vocab_size), n(c.intermediate_size), n(c.head_dim));
    let (q, kv) = (n(c.num_attention_heads).saturating_mul(d), n(c.num_kv_heads).saturating_mul(d));
    // Projections, norms and biases of one layer (an upper bound).
    let per_layer = [q, q, kv, kv, i, i, i]
        .into_iter()
        .fold(0u128, |sum, x| sum.saturating_add(x.saturating_mul(h)))
        .saturating_add(q.saturating_add(kv.saturating_mul(2)).saturating_add(h.saturating_mul(3)));
    let elements =
        n(c.num_layers).saturating_mul(per_layer).saturating_add(v.saturating_mul(h).saturating_mul(2));
    if elements.saturating_mul(2) > MAX_BYTES {
        return Err(format!(
            "a model of this shape is larger than {} TiB in bf16: past what any device holds",
            MAX_BYTES >> 40
        ));
    }
    Ok(())
}

impl DummyWeights {
    /// Every tensor `config` implies, seeded by `seed` (the same seed makes
    /// the same model, on any backend and any number of tensor-parallel
    /// ranks). An invalid config, or one too large for any device, is
    /// refused with the reason.
    pub fn new(config: &ModelConfig, seed: u64) -> std::result::Result<Self, String> {
        check_size(config)?;
        let fan_in = |name: &str, shapes: &HashMap<&str, &Vec<usize>>| -> usize {
            // A bias takes its weight's fan-in.
            let weight = name.strip_suffix(".bias").map(|p| format!("{p}.weight"));
            let shape = weight.as_deref().and_then(|w| shapes.get(w)).copied();
            shape.or_else(|| shapes.get(name).copied()).and_then(|s| s.get(1)).copied().unwrap_or(1)
        };
        let list = checkpoint_tensors(config);
        let shapes: HashMap<&str, &Vec<usize>> = list.iter().map(|(n, s)| (n.as_str(), s)).collect();
        let tensors = list
            .iter()
            .map(|(name, shape)| {
                let key = splitmix64_draw(seed, name_hash(name));
                let init = if name.ends_with("norm.weight") {
                    Init::Constant(1.0)
                } else if name == "model.embed_tokens.weight" {
                    Init::Uniform(UniformFill::new(key, -1.0, 1.0))
                } else {
                    let a = (1.0 / (fan_in(name, &shapes) as f64).sqrt()) as f32;
                    Init::Uniform(UniformFill::new(key, -a, a))
                };
                (name.clone(), (shape.clone(), init))
            })
            .collect();
        Ok(Self { seed, tensors })
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn entry(&self, name: &str) -> Result<&(Vec<usize>, Init)> {
        self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor(name.into()))
    }

    /// Fills `dst` with the part of tensor `name` whose first element is at
    /// row `row` (of the leading dimension) and column `col` (of the last
    /// dimension, 2-D tensors only): the whole tensor, a tensor-parallel
    /// rank's rows of a column-parallel weight or bias (a narrowed view), or
    /// its columns of a row-parallel one.
    pub fn fill<B: Backend>(
        &self,
        backend: &B,
        name: &str,
        dst: &Tensor<B>,
        row: usize,
        col: usize,
    ) -> Result<()> {
        let (shape, init) = self.entry(name)?;
        let fits = match (shape.as_slice(), dst.dims()) {
            ([r], [n]) => col == 0 && row + n <= *r,
            ([r, c], [n, m]) => row + n <= *r && col + m <= *c,
            _ => false,
        };
        if !fits {
            return Err(ModelError::InvalidTensor {
                name: name.into(),
                detail: format!("no part {:?} at ({row}, {col}) in a tensor of {shape:?}", dst.dims()),
            });
        }
        match init {
            Init::Constant(value) => backend.fill(dst, *value)?,
            Init::Uniform(fill) => {
                let part = match shape.as_slice() {
                    [_, cols] => fill.at(row, col, *cols),
                    _ => UniformFill { first: row as u64, ..*fill },
                };
                backend.fill_uniform(dst, &part)?;
            }
        }
        Ok(())
    }
}

impl WeightSource for DummyWeights {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|(shape, _)| shape.clone())
    }

    /// Bytes of the tensor in a bf16 checkpoint: what loading progress counts.
    fn file_bytes(&self, name: &str) -> u64 {
        self.tensors.get(name).map_or(0, |(shape, _)| 2 * shape.iter().product::<usize>() as u64)
    }

    fn tensor(&self, name: &str) -> Result<WeightTensor<'_>> {
        let (shape, init) = self.entry(name)?;
        let cols = shape.last().copied().unwrap_or(1);
        let rows = shape.iter().product::<usize>() / cols.max(1);
        let values = match init {
            Init::Constant(value) => vec![*value; rows * cols],
            Init::Uniform(fill) => fill.host_values(0..rows, cols, cols as u64),
        };
        Ok(WeightTensor { shape: shape.clone(), data: WeightData::Owned(values) })
    }

    fn on_device(&self) -> Option<&DummyWeights> {
        Some(self)
    }
}
