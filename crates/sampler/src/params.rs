use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::TokenId;

/// Largest number of top logprobs a request may ask for (OpenAI allows 20).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// How a request wants its tokens drawn. Defaults match vLLM/OpenAI:
/// temperature 1, no truncation, no penalties.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k truncation.
    pub top_k: u32,
    /// 1 means no nucleus truncation.
    pub top_p: f32,
    /// 0 means no min-p truncation.
    pub min_p: f32,
    /// 1 means none.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// `Some(n)`: return the chosen token's logprob and the `n` most probable tokens.
    pub logprobs: Option<u32>,
    /// Added to these tokens' logits (OpenAI's `logit_bias`), sorted by token, each token once.
    #[serde(default)]
    pub logit_bias: Vec<(TokenId, f32)>,
    /// Only these tokens may be drawn (vLLM's `allowed_token_ids`); `None`: any.
    #[serde(default)]
    pub allowed_token_ids: Option<Vec<TokenId>>,
    /// Token sequences never to be completed (vLLM's `bad_words`, tokenized):
    /// the last token of each is banned wherever the output so far ends with
    /// the rest of it.
    #[serde(default)]
    pub bad_words: Vec<Vec<TokenId>>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
            logit_bias: Vec::new(),
            allowed_token_ids: None,
            bad_words: Vec::new(),
        }
    }
}

/// Largest `logit_bias` a token may get, either way (OpenAI's range).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// A parameter outside its valid range; the message names it, as OpenAI's errors do.
#[derive(Clone, Debug, PartialEq, Error)]
#[error("{param}: {message}")]
pub struct SamplingParamsError {
    pub param: &'static str,
    pub message: String,
}

impl SamplingParams {
    /// Arg-max decoding.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether any penalty changes the logits (so a backend needs token history).
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }

    /// Whether `logit_bias`, `allowed_token_ids` or `bad_words` constrain the logits.
    pub fn has_logit_constraints(&self) -> bool {
        !self.logit_bias.is_empty() || self.allowed_token_ids.is_some() || !self.bad_words.is_empty()
    }

    /// Whether sampling reads the sequence's token history (penalties, bad words).
    pub fn needs_history(&self) -> bool {
        self.has_penalties() || !self.bad_words.is_empty()
    }

    /// The first token id of the constraints at or above `vocab_size`, with
    /// the parameter it is in.
    pub fn token_outside(&self, vocab_size: usize) -> Option<(&'static str, TokenId)> {
        let outside = |t: &TokenId| *t as usize >= vocab_size;
        if let Some(&(t, _)) = self.logit_bias.iter().find(|(t, _)| outside(t)) {
            return Some(("logit_bias", t));
        }
        if let Some(&t) = self.allowed_token_ids.iter().flatten().find(|t| outside(t)) {
            return Some(("allowed_token_ids", t));
        }
        self.bad_words.iter().flatten().find(|t| outside(t)).map(|&t| ("bad_words", t))
    }

    /// Checks every field against the range vLLM accepts.
    pub fn validate(&self) -> Result<(), SamplingParamsError> {
        fn err(param: &'static str, message: String) -> Result<(), SamplingParamsError> {
            Err(SamplingParamsError { param, message })
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return err("temperature", format!("must be non-negative, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return err("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return err("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return err(
                "repetition_penalty",
                format!("must be greater than zero, got {}", self.repetition_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return err("presence_penalty", format!("must be in [-2, 2], got {}", self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return err("frequency_penalty", format!("must be in [-2, 2], got {}", self.frequency_penalty));
        }
        if let Some(n) = self.logprobs {
            if n > MAX_TOP_LOGPROBS {
                return err("logprobs", format!("must be at most {MAX_TOP_LOGPROBS}, got {n}"));
            }
        }
        if let Some(&(t, b)) =
            self.logit_bias.iter().find(|(_, b)| !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(b))
        {
            return err("logit_bias", format!("the bias of token {t} must be in [-100, 100], got {b}"));
        }
        if self.logit_bias.windows(2).any(|w| w[0].0 >= w[1].0) {
            return err("logit_bias", "must be sorted by token id, each token once".into());
        }
        if self.allowed_token_ids.as_ref().is_some_and(Vec::is_empty) {
            return err("allowed_token_ids", "must not be empty (leave it out to allow every token)".into());
        }
        if self.bad_words.iter().any(Vec::is_empty) {
            return err("bad_words", "a bad word must have at least one token".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_not_greedy() {
        let p = SamplingParams::default();
        assert!(p.validate().is_ok());
        assert!(!p.is_greedy());
        assert!(!p.has_penalties());
        assert!(SamplingParams::greedy().is_greedy());
    }

    #[test]
    fn out_of_range_values_name_the_parameter() {
        let bad = [
            SamplingParams { temperature: -0.5, ..Default::default() },
            SamplingParams { top_p: 1.5, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { min_p: -0.1, ..Default::default() },
            SamplingParams { repetition_penalty: 0.0, ..Default::default() },
            SamplingParams { presence_penalty: 3.0, ..Default::default() },
            SamplingParams { frequency_penalty: -2.5, ..Default::default() },
            SamplingParams { logprobs: Some(21), ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { logit_bias: vec![(3, 101.0)], ..Default::default() },
            SamplingParams { logit_bias: vec![(3, 1.0), (2, 1.0)], ..Default::default() },
            SamplingParams { allowed_token_ids: Some(vec![]), ..Default::default() },
            SamplingParams { bad_words: vec![vec![]], ..Default::default() },
        ];
        let names = [
            "temperature",
            "top_p",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "logprobs",
            "temperature",
            "logit_bias",
            "logit_bias",
            "allowed_token_ids",
            "bad_words",
        ];
        for (p, name) in bad.iter().zip(names) {
            assert_eq!(p.validate().unwrap_err().param, name, "{p:?}");
        }
    }
}
