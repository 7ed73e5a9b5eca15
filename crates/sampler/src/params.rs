use serde::{Deserialize, Serialize};
use thiserror::Error;

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
        }
    }
}

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
        ];
        for (p, name) in bad.iter().zip(names) {
            assert_eq!(p.validate().unwrap_err().param, name, "{p:?}");
        }
    }
}
