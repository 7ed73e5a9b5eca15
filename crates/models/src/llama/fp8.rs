//! FP8 (E4M3) weights of the Llama projections: loading them (an FP8
//! checkpoint's codes and scales, or `--quantization fp8` quantizing 16/32-bit
//! weights per output channel) and running them ([`Backend::fp8_linear`]).
//!
//! q/k/v, o, gate/up and down are quantized; embeddings, the LM head and the
//! norms stay in the activation dtype, as in vLLM. The stacked q/k/v and
//! gate/up weights keep one scale per output row, so each part keeps its own
//! (per-tensor scales are repeated over their part's rows: nothing is
//! requantized). A checkpoint's static `input_scale`s of a stacked layer
//! become one, their maximum, as vLLM does.
//!
//! The fusions of the 16-bit path stay: each product is one `fp8_linear`
//! with the same [`LinearFusion`] (input norm, SiLU-and-mul, residual add)
//! that `linear_fused` would get.

use std::ops::Range;

use pagoda_backend::{Backend, DType, Fp8InputScale, Fp8LinearArgs, HostSlice, LinearFusion, Tensor};

use super::{host_slice, LoadOptions, Uploader};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::quantization::{ActivationScheme, Quantization};
use crate::tensor_parallel::weight_rows;
use crate::weights::{WeightData, WeightSource};

/// Where a model's FP8 weights come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fp8Load {
    /// The checkpoint's codes and scales; `static_scales`: its config asks
    /// for an `input_scale` on every quantized projection.
    Checkpoint { static_scales: bool },
    /// `--quantization fp8`: 16/32-bit weights quantized at load.
    Online,
}

impl Fp8Load {
    /// What `config` (its `quantization_config`) and `options` (`--quantization`)
    /// ask for; refused on a sharded model (`world_size > 1`).
    pub(super) fn resolve(
        config: &ModelConfig,
        weights: &dyn WeightSource,
        options: &LoadOptions,
        world_size: usize,
    ) -> Result<Option<Self>> {
        let load = match (config.quantization, options.quantization) {
            (Some(q), _) => {
                Some(Self::Checkpoint { static_scales: q.activation_scheme == ActivationScheme::Static })
            }
            (None, Some(Quantization::Fp8)) => Some(Self::Online),
            (None, None) => None,
        };
        if load.is_some() && world_size > 1 {
            return Err(ModelError::TensorParallel(format!(
                "FP8 weights (--quantization fp8 or an FP8 checkpoint) over {world_size} ranks are not \
                 supported yet"
            )));
        }
        if let Some(Self::Checkpoint { .. }) = load {
            // What stays in the activation dtype must not come as codes.
            let mut dense = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
            if !config.tie_word_embeddings {
                dense.push("lm_head.weight".into());
            }
            for name in dense {
                if let WeightData::Borrowed(_, DType::F8E4M3) = weights.tensor(&name)?.data {
                    return Err(ModelError::Quantization(format!(
                        "{name} is stored as F8_E4M3; embeddings, the LM head and norms must be 16 or 32 bits"
                    )));
                }
            }
        }
        Ok(load)
    }
}

/// An FP8 projection's scales: F32 `[N]` per output row, and the static
/// activation scale when the checkpoint gives one.
pub(super) struct Fp8Scales<B: Backend> {
    pub weight_scale: Tensor<B>,
    pub input_scale: Option<f32>,
}

/// The scales of a layer's FP8 projections (`None`: that projection is in
/// the activation dtype).
pub(super) struct LayerFp8<B: Backend> {
    pub qkv: Option<Fp8Scales<B>>,
    pub o: Option<Fp8Scales<B>>,
    pub gate_up: Option<Fp8Scales<B>>,
    pub down: Option<Fp8Scales<B>>,
}

impl<B: Backend> LayerFp8<B> {
    pub(super) fn none() -> Self {
        Self { qkv: None, o: None, gate_up: None, down: None }
    }

    pub(super) fn any(&self) -> bool {
        self.qkv.is_some() || self.o.is_some() || self.gate_up.is_some() || self.down.is_some()
    }
}

/// `fusion(x' · Wᵀ + bias)` with `weight` in the activation dtype (`fp8`
/// `None`: [`Backend::linear_fused`]) or as E4M3 codes with their scales
/// ([`Backend::fp8_linear`], in the mode the backend prefers for this many rows).
pub(super) fn linear_fused<B: Backend>(
    backend: &B,
    x: &Tensor<B>,
    weight: &Tensor<B>,
    fp8: Option<&Fp8Scales<B>>,
    bias: Option<&Tensor<B>>,
    out: &Tensor<B>,
    fusion: &LinearFusion<'_, B>,
) -> Result<()> {
    match fp8 {
        None => Ok(backend.linear_fused(x, weight, bias, out, fusion)?),
        Some(s) => Ok(backend.fp8_linear(&Fp8LinearArgs {
            x,
            weight,
            weight_scale: &s.weight_scale,
            bias,
            out,
            fusion,
            mode: backend.fp8_linear_mode(x.dims().first().copied().unwrap_or(0)),
            input_scale: s.input_scale.map_or(Fp8InputScale::Dynamic, Fp8InputScale::Static),
        })?),
    }
}

/// `name` with its last component (`weight`) replaced: `….q_proj.weight` ->
/// `….q_proj.weight_scale`.
fn sibling(name: &str, last: &str) -> String {
    match name.rsplit_once('.') {
        Some((module, _)) => format!("{module}.{last}"),
        None => last.to_string(),
    }
}

/// One scalar (a tensor of one element) of a checkpoint, positive and finite.
fn scalar(weights: &dyn WeightSource, name: &str) -> Result<f32> {
    let t = weights.tensor(name)?;
    let data = host_slice(&t.data);
    if t.shape.iter().product::<usize>() != 1 || data.len() != 1 {
        return Err(ModelError::ShapeMismatch { name: name.into(), expected: vec![], found: t.shape });
    }
    let x = data.get_f32(0);
    if !(x.is_finite() && x > 0.0) {
        return Err(ModelError::InvalidTensor {
            name: name.into(),
            detail: format!("a scale of {x} (must be positive and finite)"),
        });
    }
    Ok(x)
}

/// The rows `range` of a `weight_scale` for a weight of `rows` rows: a
/// scalar (`[]` or `[1]`: per tensor) repeated, or `[rows]` / `[rows, 1]`
/// (per channel) sliced. Each must be finite and non-negative.
fn row_scales(weights: &dyn WeightSource, name: &str, rows: usize, range: Range<usize>) -> Result<Vec<f32>> {
    let t = weights.tensor(name)?;
    let data = host_slice(&t.data);
    let numel: usize = t.shape.iter().product();
    let per_channel = numel == rows && matches!(t.shape[..], [n] | [n, 1] if n == rows);
    if !(numel == 1 || per_channel) || data.len() != numel {
        return Err(ModelError::ShapeMismatch { name: name.into(), expected: vec![rows], found: t.shape });
    }
    let values: Vec<f32> = if per_channel {
        range.map(|r| data.get_f32(r)).collect()
    } else {
        vec![data.get_f32(0); range.len()]
    };
    if let Some(bad) = values.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
        return Err(ModelError::InvalidTensor {
            name: name.into(),
            detail: format!("a weight scale of {bad} (must be finite and not negative)"),
        });
    }
    Ok(values)
}

impl<B: Backend> Uploader<'_, B> {
    /// A projection of stacked parts (as [`Uploader::stacked`]: each named
    /// weight's rows `range`) as E4M3 codes with per-row scales, or in the
    /// activation dtype (`None`) when the checkpoint stores it so.
    pub(super) fn fp8_stacked(
        &mut self,
        parts: &[(String, Vec<usize>, Range<usize>)],
        load: Fp8Load,
    ) -> Result<(Tensor<B>, Option<Fp8Scales<B>>)> {
        let Fp8Load::Checkpoint { static_scales } = load else {
            return self.fp8_quantized_at_load(parts);
        };
        let is_fp8 = |name: &str| -> Result<bool> {
            Ok(matches!(self.weights.tensor(name)?.data, WeightData::Borrowed(_, DType::F8E4M3)))
        };
        let fp8: Vec<bool> = parts.iter().map(|(n, _, _)| is_fp8(n)).collect::<Result<_>>()?;
        if !fp8.iter().any(|&f| f) {
            return Ok((self.stacked(parts)?, None)); // a projection the checkpoint left in 16 bits
        }
        if let Some(i) = fp8.iter().position(|&f| !f) {
            return Err(ModelError::Quantization(format!(
                "{} is not FP8 while the projection it is stacked with is",
                parts[i].0
            )));
        }
        let rows: usize = parts.iter().map(|(_, _, r)| r.len()).sum();
        let mut dims = parts[0].1.clone();
        dims[0] = rows;
        let codes = self.backend.alloc(&dims, DType::F8E4M3)?;
        let mut scales = Vec::with_capacity(rows);
        let mut input_scale: Option<f32> = None;
        let mut start = 0;
        for (name, shape, range) in parts {
            let w = self.fetch(name, shape)?;
            let part = weight_rows(&w.data, shape, range.clone());
            let view = codes.narrow(start, range.len())?;
            self.backend.write(&view, part.host_slice())?;
            scales.extend(row_scales(self.weights, &sibling(name, "weight_scale"), shape[0], range.clone())?);
            let input_name = sibling(name, "input_scale");
            if self.weights.contains(&input_name) {
                let s = scalar(self.weights, &input_name)?;
                input_scale = Some(input_scale.map_or(s, |m| m.max(s)));
            } else if static_scales {
                return Err(ModelError::Quantization(format!(
                    "{input_name} is missing (the checkpoint's activation scheme is static)"
                )));
            }
            start += range.len();
            self.advance(name);
        }
        let weight_scale = self.backend.upload(HostSlice::F32(&scales), &[rows], DType::F32)?;
        Ok((codes, Some(Fp8Scales { weight_scale, input_scale })))
    }

    /// `--quantization fp8`: the stacked projection put on the backend in
    /// the activation dtype, then quantized there per output row
    /// ([`Backend::fp8_quantize_rows`]; on a GPU a kernel, where the host took
    /// minutes for an 8B model). The codes are those of the activation
    /// dtype's values, the weights the 16-bit model computes with.
    fn fp8_quantized_at_load(
        &mut self,
        parts: &[(String, Vec<usize>, Range<usize>)],
    ) -> Result<(Tensor<B>, Option<Fp8Scales<B>>)> {
        let staged = self.stacked(parts)?;
        let rows = staged.dim(0);
        let cols = staged.numel() / rows.max(1);
        let codes = self.backend.alloc(staged.dims(), DType::F8E4M3)?;
        let weight_scale = self.backend.alloc(&[rows], DType::F32)?;
        self.backend.fp8_quantize_rows(
            &staged.reshape(&[rows, cols])?,
            &codes.reshape(&[rows, cols])?,
            &weight_scale,
        )?;
        Ok((codes, Some(Fp8Scales { weight_scale, input_scale: None })))
    }
}
