//! A model's generation defaults: which tokens end a sequence, and the
//! sampling settings its authors recommend (`generation_config.json`).

use std::path::Path;

use pagoda_backend::{SamplingParams, TokenId};
use serde_json::Value;

use crate::config::token_id_list;
use crate::error::{ModelError, Result};

/// Stop tokens and default sampling settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    /// Tokens that end generation (deduplicated, in first-seen order).
    pub eos_token_ids: Vec<TokenId>,
    pub bos_token_id: Option<TokenId>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` if the folder has one (else defaults).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::config(&path, e.to_string()))?;
        Ok(Self::from_json(&json))
    }

    pub fn from_json(json: &Value) -> Self {
        let f = |k: &str| json.get(k).and_then(Value::as_f64).map(|v| v as f32);
        let u = |k: &str| json.get(k).and_then(Value::as_u64);
        Self {
            eos_token_ids: token_id_list(json.get("eos_token_id")),
            bos_token_id: u("bos_token_id").map(|v| v as TokenId),
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: u("top_k").map(|v| v as u32),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            max_new_tokens: u("max_new_tokens").map(|v| v as usize),
        }
    }

    /// Takes the sampling defaults (temperature, top-p, top-k, min-p,
    /// repetition penalty, max new tokens) of `other` instead of these; the
    /// token ids stay (EOS and BOS are the model's). `other` empty: OpenAI's
    /// defaults, as vLLM's `--generation-config vllm` gives.
    pub fn use_sampling_defaults_of(&mut self, other: &GenerationConfig) {
        self.temperature = other.temperature;
        self.top_p = other.top_p;
        self.top_k = other.top_k;
        self.min_p = other.min_p;
        self.repetition_penalty = other.repetition_penalty;
        self.max_new_tokens = other.max_new_tokens;
    }

    /// Checks the token ids the engine relies on (`eos_token_id`, `bos_token_id`) against the
    /// model's vocabulary, naming the key of the first one outside it.
    pub fn validate_token_ids(&self, vocab_size: usize) -> std::result::Result<(), String> {
        let outside = |id: TokenId| id as usize >= vocab_size;
        if let Some(id) = self.eos_token_ids.iter().copied().find(|&id| outside(id)) {
            return Err(format!("`eos_token_id` {id} is outside the vocabulary of {vocab_size} tokens"));
        }
        if let Some(id) = self.bos_token_id.filter(|&id| outside(id)) {
            return Err(format!("`bos_token_id` {id} is outside the vocabulary of {vocab_size} tokens"));
        }
        Ok(())
    }

    /// Adds stop tokens (from `config.json` or the tokenizer) not yet listed.
    pub fn add_eos_tokens(&mut self, ids: impl IntoIterator<Item = TokenId>) {
        for id in ids {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
    }

    /// Sampling parameters with this model's defaults filled in over the
    /// OpenAI defaults; a request's own fields then override these.
    pub fn default_sampling_params(&self) -> SamplingParams {
        let base = SamplingParams::default();
        SamplingParams {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_p: self.top_p.unwrap_or(base.top_p),
            top_k: self.top_k.unwrap_or(base.top_k),
            min_p: self.min_p.unwrap_or(base.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(base.repetition_penalty),
            ..base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_lists_and_merges_stop_tokens() {
        let mut g = GenerationConfig::from_json(&json!({
            "eos_token_id": [128001, 128009], "temperature": 0.6, "top_p": 0.9, "do_sample": true
        }));
        g.add_eos_tokens([128009, 2]);
        assert_eq!(g.eos_token_ids, [128001, 128009, 2]);
        let p = g.default_sampling_params();
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.6, 0.9, 0));
    }
}
