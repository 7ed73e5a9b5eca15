//! The shape of a Llama-family model, read from a Hugging Face `config.json`
//! or from GGUF metadata.

use std::path::Path;

use pagoda_backend::DType;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::gguf::{GgufError, GgufHeader};
use crate::quantization::CheckpointQuantization;

/// The architectures this crate runs: all are the Llama decoder with small
/// variations, which [`ModelConfig`] spells out as flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM and the GGUF `llama` family.
    Llama,
    /// Llama with a sliding attention window.
    Mistral,
    /// Llama with biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    /// From a Hugging Face `architectures[0]` (or `model_type`) name.
    pub fn from_hf_name(name: &str) -> Result<Self> {
        match name {
            "LlamaForCausalLM" | "llama" => Ok(Self::Llama),
            "MistralForCausalLM" | "mistral" => Ok(Self::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Ok(Self::Qwen2),
            other => Err(ModelError::UnknownArchitecture(other.into())),
        }
    }
}

/// How positions are stretched before the rotary embedding.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (every frequency divided by it).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling: long wavelengths are divided
    /// by `factor`, short ones kept, the band between interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// One divisor per frequency, as GGUF files store Llama 3.1's scaling
    /// (the `rope_freqs.weight` tensor).
    PerFrequency(Vec<f64>),
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// The LM head is the embedding table.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Attention window in tokens, for the layers [`Self::layer_sliding_window`] names.
    pub sliding_window: Option<usize>,
    /// Layers before this index attend to the full context (Qwen2's `max_window_layers`).
    pub first_sliding_layer: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// An FP8 checkpoint's `quantization_config` (`None`: 16/32-bit weights).
    pub quantization: Option<CheckpointQuantization>,
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::config(path, e.to_string()))?;
        Self::from_hf_json(&json).map_err(|e| match e {
            ModelError::Config { detail, .. } => ModelError::config(path, detail),
            other => other,
        })
    }

    /// From the parsed JSON of a `config.json` (transformers 4 or 5 spelling).
    pub fn from_hf_json(json: &Value) -> Result<Self> {
        let bad = |detail: String| ModelError::config("config.json", detail);
        let arch_name = json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| json.get("model_type").and_then(Value::as_str))
            .ok_or_else(|| bad("neither `architectures` nor `model_type` is set".into()))?;
        let architecture = Architecture::from_hf_name(arch_name)?;

        let usize_field = |key: &str| -> Result<Option<usize>> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| bad(format!("`{key}` must be a non-negative integer, got {v}"))),
            }
        };
        let required = |key: &str| -> Result<usize> {
            usize_field(key)?.ok_or_else(|| bad(format!("`{key}` is missing")))
        };
        let f64_field = |key: &str| -> Result<Option<f64>> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => {
                    v.as_f64().map(Some).ok_or_else(|| bad(format!("`{key}` must be a number, got {v}")))
                }
            }
        };
        let bool_field = |key: &str, default: bool| json.get(key).and_then(Value::as_bool).unwrap_or(default);

        let hidden_size = required("hidden_size")?;
        let num_attention_heads = required("num_attention_heads")?;
        let head_dim = match usize_field("head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 && hidden_size % num_attention_heads != 0 => {
                return Err(bad(format!(
                    "`hidden_size` {hidden_size} is not a multiple of `num_attention_heads` \
                     {num_attention_heads} (and no `head_dim` is given)"
                )))
            }
            None => hidden_size.checked_div(num_attention_heads).unwrap_or(0),
        };

        // transformers 5 moved `rope_theta` and `rope_scaling` into `rope_parameters`.
        let rope_params = json.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(f64_field("rope_theta")?)
            .unwrap_or(10_000.0);
        let scaling_json = rope_params.or_else(|| json.get("rope_scaling").filter(|v| v.is_object()));
        let rope_scaling = match scaling_json {
            None => RopeScaling::None,
            Some(s) => parse_hf_rope_scaling(s, usize_field("max_position_embeddings")?).map_err(bad)?,
        };

        let attention_bias = bool_field("attention_bias", false);
        let qkv_bias = architecture == Architecture::Qwen2 || attention_bias;
        let sliding_window = match architecture {
            Architecture::Llama => None,
            Architecture::Mistral => usize_field("sliding_window")?,
            Architecture::Qwen2 if bool_field("use_sliding_window", false) => usize_field("sliding_window")?,
            Architecture::Qwen2 => None,
        };
        let num_layers = required("num_hidden_layers")?;
        let first_sliding_layer = match architecture {
            Architecture::Qwen2 => usize_field("max_window_layers")?.unwrap_or(0),
            _ => 0,
        };

        let config = Self {
            architecture,
            hidden_size,
            intermediate_size: required("intermediate_size")?,
            num_layers,
            num_attention_heads,
            num_kv_heads: usize_field("num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim,
            vocab_size: required("vocab_size")?,
            max_position_embeddings: usize_field("max_position_embeddings")?.unwrap_or(4096),
            rms_norm_eps: f64_field("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: bool_field("tie_word_embeddings", false),
            qkv_bias,
            o_bias: attention_bias,
            sliding_window,
            first_sliding_layer,
            bos_token_id: json.get("bos_token_id").and_then(Value::as_u64).map(|v| v as u32),
            eos_token_ids: token_id_list(json.get("eos_token_id")),
            quantization: CheckpointQuantization::from_hf_config(json).map_err(bad)?,
        };
        config.check().map_err(|(field, detail)| bad(format!("`{}` {detail}", hf_key(field))))?;
        Ok(config)
    }

    /// From GGUF metadata. `has_output_tensor` says whether the file has its
    /// own LM head (`output.weight`); llama.cpp omits it when tied.
    pub fn from_gguf(header: &GgufHeader, has_output_tensor: bool) -> Result<Self, GgufError> {
        let arch = header.get_str("general.architecture")?.to_string();
        let architecture = match arch.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            _ => {
                return Err(GgufError::Metadata {
                    key: "general.architecture".into(),
                    detail: format!("unsupported architecture {arch:?} (supported: llama, qwen2)"),
                })
            }
        };
        let key = |name: &str| format!("{arch}.{name}");
        let u = |name: &str| header.get_u64(&key(name)).map(|v| v as usize);
        let hidden_size = u("embedding_length")?;
        let num_attention_heads = u("attention.head_count")?;
        let num_kv_heads = header
            .get(&key("attention.head_count_kv"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(num_attention_heads);
        let optional = |name: &str| header.get(&key(name)).and_then(|v| v.as_u64()).map(|v| v as usize);
        let metadata_error = |name: &str, detail: String| GgufError::Metadata { key: key(name), detail };
        let head_dim = match optional("attention.key_length") {
            Some(d) => d,
            None if num_attention_heads > 0 && hidden_size % num_attention_heads != 0 => {
                return Err(metadata_error(
                    "embedding_length",
                    format!(
                        "{hidden_size} is not a multiple of {} {num_attention_heads} \
                         (and no {} is given)",
                        key("attention.head_count"),
                        key("attention.key_length")
                    ),
                ))
            }
            None => hidden_size.checked_div(num_attention_heads).unwrap_or(0),
        };
        // K and V share one head size here, and RoPE turns the whole head.
        if let Some(v) = optional("attention.value_length").filter(|&v| v != head_dim) {
            return Err(metadata_error(
                "attention.value_length",
                format!("{v} differs from the key head size {head_dim}, which is not supported"),
            ));
        }
        // (A head size of 0 is reported below, by `check`.)
        match optional("rope.dimension_count").filter(|_| head_dim > 0) {
            Some(0) => return Err(metadata_error("rope.dimension_count", "must be positive".into())),
            Some(d) if d != head_dim => {
                return Err(metadata_error(
                    "rope.dimension_count",
                    format!(
                    "{d} differs from the head size {head_dim}; partial rotary embeddings are not supported"
                ),
                ))
            }
            _ => {}
        }
        let vocab_size = match header.get(&key("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => header.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_scaling = match header.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear { factor: header.get_f64(&key("rope.scaling.factor"))? },
            Some(other) => {
                return Err(GgufError::Metadata {
                    key: key("rope.scaling.type"),
                    detail: format!("unsupported rope scaling {other:?} (supported: none, linear)"),
                })
            }
        };
        let token_id = |k: &str| header.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let config = Self {
            architecture,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: u("context_length")?,
            rms_norm_eps: header.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            rope_theta: header.get(&key("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10_000.0),
            rope_scaling,
            tie_word_embeddings: !has_output_tensor,
            qkv_bias: architecture == Architecture::Qwen2,
            o_bias: false,
            sliding_window: None,
            first_sliding_layer: 0,
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            quantization: None,
        };
        config
            .check()
            .map_err(|(field, detail)| GgufError::Metadata { key: gguf_key(&arch, field), detail })?;
        Ok(config)
    }

    /// Checks what the engine relies on: sizes positive and fitting together
    /// (heads divide, head_dim even), finite positive epsilon and rope
    /// parameters, BOS/EOS ids inside the vocabulary.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.check().map_err(|(field, detail)| format!("{field} {detail}"))
    }

    /// [`Self::validate`], naming the offending field of [`ModelConfig`] apart,
    /// so each source can name its own key for it.
    fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some(&(name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err((name, "must be positive".into()));
        }
        if self.num_attention_heads % self.num_kv_heads != 0 {
            return Err((
                "num_kv_heads",
                format!(
                    "{} does not divide the {} attention heads",
                    self.num_kv_heads, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(("head_dim", format!("{} must be even for rotary embeddings", self.head_dim)));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(("rms_norm_eps", format!("{} must be a positive finite number", self.rms_norm_eps)));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(("rope_theta", format!("{} must be a positive finite number", self.rope_theta)));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let scaling_ok = match &self.rope_scaling {
            RopeScaling::None => true,
            RopeScaling::Linear { factor } => positive(*factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => [*factor, *low_freq_factor, *high_freq_factor, *original_max_position_embeddings]
                .into_iter()
                .all(positive),
            RopeScaling::PerFrequency(divisors) => divisors.iter().all(|&d| positive(d)),
        };
        if !scaling_ok {
            return Err(("rope_scaling", format!("{:?} needs positive finite factors", self.rope_scaling)));
        }
        if self.sliding_window == Some(0) {
            return Err(("sliding_window", "must be positive".into()));
        }
        let vocab = self.vocab_size;
        if let Some(bos) = self.bos_token_id.filter(|&id| id as usize >= vocab) {
            return Err(("bos_token_id", format!("{bos} is outside the vocabulary of {vocab} tokens")));
        }
        if let Some(eos) = self.eos_token_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(("eos_token_ids", format!("{eos} is outside the vocabulary of {vocab} tokens")));
        }
        Ok(())
    }

    /// Width of the query projection (`Hq * D`).
    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key (or value) projection (`Hkv * D`).
    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Rows of the fused q/k/v weight.
    pub fn qkv_size(&self) -> usize {
        self.q_size() + 2 * self.kv_size()
    }

    /// The attention window of a layer, if it has one.
    pub fn layer_sliding_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| layer >= self.first_sliding_layer)
    }

    /// Bytes of K and V, over all layers, of one cache block of `block_size`
    /// tokens; the engine divides its memory budget by this.
    pub fn kv_cache_bytes_per_block(&self, block_size: usize, dtype: DType) -> usize {
        2 * self.num_layers * self.num_kv_heads * block_size * self.head_dim * dtype.size_in_bytes()
    }
}

/// The `config.json` key of a [`ModelConfig`] field.
fn hf_key(field: &str) -> &str {
    match field {
        "num_layers" => "num_hidden_layers",
        "num_kv_heads" => "num_key_value_heads",
        "eos_token_ids" => "eos_token_id",
        other => other,
    }
}

/// The GGUF metadata key of a [`ModelConfig`] field.
fn gguf_key(arch: &str, field: &str) -> String {
    let suffix = match field {
        "bos_token_id" => return "tokenizer.ggml.bos_token_id".into(),
        "eos_token_ids" => return "tokenizer.ggml.eos_token_id".into(),
        "hidden_size" => "embedding_length",
        "intermediate_size" => "feed_forward_length",
        "num_layers" => "block_count",
        "num_attention_heads" => "attention.head_count",
        "num_kv_heads" => "attention.head_count_kv",
        "head_dim" => "attention.key_length",
        "vocab_size" => "vocab_size",
        "max_position_embeddings" => "context_length",
        "rms_norm_eps" => "attention.layer_norm_rms_epsilon",
        "rope_theta" => "rope.freq_base",
        "rope_scaling" => "rope.scaling.factor",
        other => other,
    };
    format!("{arch}.{suffix}")
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (5) to a [`RopeScaling`].
fn parse_hf_rope_scaling(
    s: &Value,
    max_positions: Option<usize>,
) -> std::result::Result<RopeScaling, String> {
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> std::result::Result<f64, String> {
        s.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope scaling {kind:?} needs a numeric `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")
                .or_else(|e| max_positions.map(|m| m as f64).ok_or(e))?,
        }),
        other => Err(format!("unsupported rope scaling type {other:?} (supported: default, linear, llama3)")),
    }
}

/// An id or a list of ids (`eos_token_id` may be either).
pub(crate) fn token_id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama_json() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "eos_token_id": [2, 7]
        })
    }

    #[test]
    fn reads_llama_and_derives_sizes() {
        let c = ModelConfig::from_hf_json(&llama_json()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.qkv_size(), 64 + 2 * 32);
        assert_eq!(c.eos_token_ids, [2, 7]);
        assert!(c.tie_word_embeddings && !c.qkv_bias);
        // 2 (K and V) * 2 layers * 2 kv heads * 16 tokens * 16 dims * 2 bytes.
        assert_eq!(c.kv_cache_bytes_per_block(16, DType::BF16), 2 * 2 * 2 * 16 * 16 * 2);
    }

    #[test]
    fn reads_both_rope_spellings() {
        let mut j = llama_json();
        j["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = ModelConfig::from_hf_json(&j).unwrap();
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let mut j = llama_json();
        j.as_object_mut().unwrap().remove("rope_theta");
        j["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0});
        let c = ModelConfig::from_hf_json(&j).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        j["rope_parameters"]["rope_type"] = json!("yarn");
        assert!(matches!(ModelConfig::from_hf_json(&j), Err(ModelError::Config { .. })));
    }

    #[test]
    fn architectures_and_their_flags() {
        let mut j = llama_json();
        j["architectures"] = json!(["Qwen2ForCausalLM"]);
        j["sliding_window"] = json!(32);
        let c = ModelConfig::from_hf_json(&j).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.sliding_window, None, "Qwen2 ignores the window unless use_sliding_window");
        j["architectures"] = json!(["MistralForCausalLM"]);
        let c = ModelConfig::from_hf_json(&j).unwrap();
        assert_eq!(c.layer_sliding_window(1), Some(32));
        j["architectures"] = json!(["GPT2LMHeadModel"]);
        assert!(matches!(ModelConfig::from_hf_json(&j), Err(ModelError::UnknownArchitecture(_))));
    }

    #[test]
    fn inconsistent_sizes_are_config_errors() {
        let mut j = llama_json();
        j["num_key_value_heads"] = json!(3);
        assert!(matches!(ModelConfig::from_hf_json(&j), Err(ModelError::Config { .. })));
        let mut j = llama_json();
        j["hidden_size"] = json!("big");
        assert!(matches!(ModelConfig::from_hf_json(&j), Err(ModelError::Config { .. })));
        let mut j = llama_json();
        j.as_object_mut().unwrap().remove("vocab_size");
        assert!(matches!(ModelConfig::from_hf_json(&j), Err(ModelError::Config { .. })));
    }
}
