//! FP8 (E4M3) weights: what a checkpoint's `quantization_config` says, and
//! `--quantization fp8` (vLLM's flag), which quantizes a 16/32-bit
//! checkpoint at load.
//!
//! Read from `config.json` ([`CheckpointQuantization::from_hf_config`]):
//! - `quant_method: "fp8"` (vLLM's and transformers' FP8 checkpoints, e.g.
//!   from llm-compressor or AutoFP8): each quantized projection has its
//!   weight as `F8_E4M3` and a `weight_scale` (a scalar: per tensor, or
//!   `[N]`/`[N, 1]`: per output channel), and with `activation_scheme:
//!   "static"` an `input_scale` (one activation scale). `weight_block_size`
//!   (block-wise scales, DeepSeek-style) is refused by name.
//! - `quant_method: "compressed-tensors"` in its float layout: every config
//!   group's `weights` is `{num_bits: 8, type: "float", strategy: "tensor" |
//!   "channel"}`; `input_activations` dynamic (per token or tensor: run per
//!   token here) or static per tensor (an `input_scale` per layer). Anything
//!   else (integers, 4 bits, group or block strategies) is refused by name.
//!
//! Which projections are quantized is read from the tensors themselves (a
//! weight stored as `F8_E4M3` with its `weight_scale`), so the
//! checkpoint's ignore lists need no interpreting: a projection left in
//! 16 bits loads as one. Embeddings, the LM head and norms always stay in
//! the activation dtype, as in vLLM.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// `--quantization`: how to quantize weights at load. vLLM's flag; only
/// `fp8` is offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// Per-output-channel E4M3 weights (`scale = max|row| / 448`) of q/k/v,
    /// o, gate/up and down; activations quantized per token where a backend
    /// runs FP8 tensor-core products.
    Fp8,
}

impl FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp8" => Ok(Self::Fp8),
            other => Err(format!(
                "--quantization {other} is not supported (supported: fp8; FP8 and compressed-tensors \
                 float checkpoints are detected from config.json without the flag)"
            )),
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fp8 => "fp8",
        })
    }
}

/// The checkpoint format an FP8 `quantization_config` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8CheckpointFormat {
    /// `quant_method: "fp8"`.
    Fp8,
    /// `quant_method: "compressed-tensors"`, float-quantized.
    CompressedTensors,
}

/// How a checkpoint scales activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationScheme {
    /// Computed per token at run time.
    Dynamic,
    /// The checkpoint's `input_scale` per layer (required).
    Static,
}

/// An FP8 checkpoint's `quantization_config`, as far as loading needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointQuantization {
    pub format: Fp8CheckpointFormat,
    pub activation_scheme: ActivationScheme,
}

impl CheckpointQuantization {
    /// From the `quantization_config` object of a `config.json` (`None` when
    /// there is none). A method or layout this crate cannot run is an error
    /// naming it.
    pub fn from_hf_config(json: &Value) -> Result<Option<Self>, String> {
        let q = match json.get("quantization_config") {
            None | Some(Value::Null) => return Ok(None),
            Some(q) if q.is_object() => q,
            Some(other) => return Err(format!("`quantization_config` is not an object: {other}")),
        };
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("<none>");
        match method {
            "fp8" => Self::fp8(q).map(Some),
            "compressed-tensors" => Self::compressed_tensors(q).map(Some),
            other => Err(format!(
                "`quantization_config.quant_method` {other:?} is not supported (supported: \"fp8\" and \
                 \"compressed-tensors\" with 8-bit float weights)"
            )),
        }
    }

    fn fp8(q: &Value) -> Result<Self, String> {
        if !matches!(q.get("weight_block_size"), None | Some(Value::Null)) {
            return Err(format!(
                "block-wise FP8 (`quantization_config.weight_block_size` {}) is not supported: per-tensor \
                 and per-channel weight scales only",
                q["weight_block_size"]
            ));
        }
        let activation_scheme = match q.get("activation_scheme").and_then(Value::as_str) {
            None | Some("dynamic") => ActivationScheme::Dynamic,
            Some("static") => ActivationScheme::Static,
            Some(other) => {
                return Err(format!(
                    "`quantization_config.activation_scheme` {other:?} (supported: dynamic, static)"
                ))
            }
        };
        Ok(Self { format: Fp8CheckpointFormat::Fp8, activation_scheme })
    }

    fn compressed_tensors(q: &Value) -> Result<Self, String> {
        if let Some(format) = q.get("format").and_then(Value::as_str) {
            if !matches!(format, "float-quantized" | "naive-quantized") {
                return Err(format!(
                    "compressed-tensors format {format:?} is not supported (8-bit float weights: \
                     float-quantized or naive-quantized)"
                ));
            }
        }
        let groups = q
            .get("config_groups")
            .and_then(Value::as_object)
            .filter(|g| !g.is_empty())
            .ok_or("compressed-tensors: `quantization_config.config_groups` is missing or empty")?;
        let mut activation_scheme = None;
        for (name, group) in groups {
            let weights = group
                .get("weights")
                .filter(|w| w.is_object())
                .ok_or_else(|| format!("compressed-tensors group {name:?} has no `weights`"))?;
            let num_bits = weights.get("num_bits").and_then(Value::as_u64);
            let kind = weights.get("type").and_then(Value::as_str);
            let strategy = weights.get("strategy").and_then(Value::as_str);
            if num_bits != Some(8) || kind != Some("float") {
                return Err(format!(
                    "compressed-tensors group {name:?}: weights of {} bits, type {} are not supported \
                     (8-bit float only)",
                    num_bits.map_or("?".into(), |b| b.to_string()),
                    kind.unwrap_or("?")
                ));
            }
            if !matches!(strategy, Some("tensor" | "channel")) {
                return Err(format!(
                    "compressed-tensors group {name:?}: weight strategy {} is not supported (tensor or \
                     channel; block and group scales are not)",
                    strategy.unwrap_or("?")
                ));
            }
            let scheme = match group.get("input_activations") {
                // Weight-only checkpoints (W8A16): the activation scale is left to us.
                None | Some(Value::Null) => ActivationScheme::Dynamic,
                Some(a) => {
                    let bits = a.get("num_bits").and_then(Value::as_u64);
                    let kind = a.get("type").and_then(Value::as_str);
                    if bits != Some(8) || kind != Some("float") {
                        return Err(format!(
                            "compressed-tensors group {name:?}: input activations of {} bits, type {} are \
                             not supported (8-bit float only)",
                            bits.map_or("?".into(), |b| b.to_string()),
                            kind.unwrap_or("?")
                        ));
                    }
                    let dynamic = a.get("dynamic").and_then(Value::as_bool).unwrap_or(false);
                    let strategy = a.get("strategy").and_then(Value::as_str);
                    match (dynamic, strategy) {
                        (true, _) => ActivationScheme::Dynamic,
                        (false, Some("tensor") | None) => ActivationScheme::Static,
                        (false, Some(other)) => {
                            return Err(format!(
                                "compressed-tensors group {name:?}: static input activations by {other} are \
                                 not supported (static per tensor, or dynamic)"
                            ))
                        }
                    }
                }
            };
            if activation_scheme.is_some_and(|s| s != scheme) {
                return Err("compressed-tensors: config groups with different activation schemes".into());
            }
            activation_scheme = Some(scheme);
        }
        Ok(Self {
            format: Fp8CheckpointFormat::CompressedTensors,
            activation_scheme: activation_scheme.unwrap_or(ActivationScheme::Dynamic),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(q: Value) -> Result<Option<CheckpointQuantization>, String> {
        CheckpointQuantization::from_hf_config(&json!({ "quantization_config": q }))
    }

    #[test]
    fn fp8_and_compressed_tensors_configs_parse() {
        assert_eq!(CheckpointQuantization::from_hf_config(&json!({})), Ok(None));
        let fp8 = parse(
            json!({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}),
        );
        assert_eq!(
            fp8,
            Ok(Some(CheckpointQuantization {
                format: Fp8CheckpointFormat::Fp8,
                activation_scheme: ActivationScheme::Static
            }))
        );
        let ct = parse(json!({
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": false},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true},
                "targets": ["Linear"]}},
            "ignore": ["lm_head"]
        }))
        .unwrap()
        .unwrap();
        assert_eq!(ct.format, Fp8CheckpointFormat::CompressedTensors);
        assert_eq!(ct.activation_scheme, ActivationScheme::Dynamic);
    }

    #[test]
    fn other_methods_and_layouts_are_refused_by_name() {
        let err = |q: Value| parse(q).unwrap_err();
        assert!(err(json!({"quant_method": "fp8", "weight_block_size": [128, 128]}))
            .contains("weight_block_size"));
        assert!(err(json!({"quant_method": "awq"})).contains("\"awq\""));
        assert!(err(json!({"quant_method": "gptq", "bits": 4})).contains("gptq"));
        let group = |weights: Value| json!({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": weights}}});
        assert!(err(group(json!({"num_bits": 4, "type": "int", "strategy": "group"}))).contains("4 bits"));
        assert!(err(group(json!({"num_bits": 8, "type": "float", "strategy": "block"}))).contains("block"));
        assert!(err(json!({"quant_method": "compressed-tensors", "format": "pack-quantized"}))
            .contains("pack-quantized"));
        assert_eq!("fp8".parse(), Ok(Quantization::Fp8));
        assert!("awq".parse::<Quantization>().unwrap_err().contains("awq"));
    }
}
