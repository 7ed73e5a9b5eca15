//! Sampling for Pagoda: what a request asks for ([`SamplingParams`]), how one
//! row of logits becomes one token ([`sample_row`]), and the counter-based
//! random numbers that make seeded sampling reproducible across batches,
//! preemption and backends ([`uniform`]).
//!
//! This crate knows nothing of tensors or devices. It is the reference every
//! backend's `sample` op must agree with: the CPU backend calls [`sample_row`]
//! directly, the CUDA backend's kernels are tested against it.
//!
//! ```
//! use pagoda_sampler::{sample_row, SamplingParams, SamplingRow};
//! let params = SamplingParams::greedy();
//! let row = SamplingRow {
//!     params: &params, seed: 0, step: 0, prompt_tokens: &[], output_tokens: &[], allowed_tokens: None,
//! };
//! let out = sample_row(&[0.1, 2.0, -1.0], &row);
//! assert_eq!(out.token, 1);
//! ```
//!
//! # The order of operations (the contract every backend follows)
//! 1. `logprob`/`top_logprobs` are taken from the *raw* logits
//!    (log-softmax before any penalty or temperature), as vLLM v1 does.
//! 2. Constraints, in vLLM's order: tokens outside a structured-output
//!    grammar's mask (`allowed_tokens`) go to -inf, then those outside
//!    `allowed_token_ids`; so does the last token of each of `bad_words` whose other
//!    tokens end the output so far; `logit_bias` is added.
//! 3. Penalties on the logits: repetition (tokens seen in prompt or output:
//!    positive logits divided by it, negative ones multiplied), then frequency
//!    (minus `frequency_penalty * count in output`) and presence (minus
//!    `presence_penalty` if the token occurs in the output).
//! 4. `temperature == 0`: greedy, the arg-max of the penalised logits, lowest
//!    token id on ties. Otherwise logits are divided by the temperature.
//! 5. Softmax; keep the `top_k` most probable (ties by lower token id); keep
//!    the smallest prefix, in descending-probability order, whose mass reaches
//!    `top_p`; drop tokens whose probability is below `min_p` times the
//!    largest. The first token always survives.
//! 6. Draw `u = uniform(seed, step)` and walk the survivors in descending
//!    probability order (ties by lower id), returning the first token whose
//!    cumulative renormalised probability exceeds `u`.

mod params;
mod reference;
mod rng;

pub use params::{SamplingParams, SamplingParamsError, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS};
pub use reference::{apply_logit_constraints, apply_penalties, log_softmax, sample_row};
pub use rng::uniform;

/// A token id in the model's vocabulary.
pub type TokenId = u32;

/// Everything needed to sample one row of logits.
#[derive(Clone, Copy, Debug)]
pub struct SamplingRow<'a> {
    pub params: &'a SamplingParams,
    /// The effective seed: the request's seed, or one drawn when the request arrived.
    pub seed: u64,
    /// The random-stream counter: how many tokens this sequence has sampled
    /// so far (plus a per-sequence offset for n>1 siblings). Same seed and step
    /// give the same draw, whatever else is in the batch.
    pub step: u64,
    pub prompt_tokens: &'a [TokenId],
    pub output_tokens: &'a [TokenId],
    /// The tokens a structured-output grammar allows next, as a bitmask (bit
    /// `t % 32` of word `t / 32`; `vocab.div_ceil(32)` words); `None`: any.
    /// The engine fills it per step from the sequence's grammar state.
    pub allowed_tokens: Option<&'a [u32]>,
}

/// Whether bit `token` of an allowed-token bitmask is set (ids past its end are not allowed).
pub fn token_allowed(mask: &[u32], token: TokenId) -> bool {
    mask.get(token as usize / 32).is_some_and(|w| w >> (token % 32) & 1 == 1)
}

/// The token chosen for one row, with its log-probability under the raw
/// distribution and, when asked for, the most probable alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token: TokenId,
    pub logprob: f32,
    /// `(token, logprob)` in descending logprob order, `params.logprobs` long.
    pub top_logprobs: Vec<(TokenId, f32)>,
}
