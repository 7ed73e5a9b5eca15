//! What a client asks the engine for, and what the engine streams back.

use std::sync::Arc;

use pagoda_sampler::{SamplingParams, TokenId};

use crate::constraint::TokenConstraintFactory;

/// A generation request, already tokenized. The server and CLI build these;
/// the engine's [`InputProcessor`](crate::InputProcessor) checks one before accepting it.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// Unique among live requests (the server makes `cmpl-...` ids).
    pub request_id: String,
    pub prompt_token_ids: Vec<TokenId>,
    pub sampling: SamplingParams,
    /// Tokens to generate at most; `None` means up to the model's length limit.
    pub max_tokens: Option<usize>,
    /// Generate at least this many tokens before EOS or stop token ids count.
    pub min_tokens: usize,
    /// Parallel samples of the same prompt (the prompt is computed once and shared).
    pub n: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<TokenId>,
    pub ignore_eos: bool,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    /// Lower values run first under the priority policy (vLLM's convention).
    pub priority: i32,
    /// Produce text (false for token-id benchmarks: saves the detokenizer's time).
    pub detokenize: bool,
    /// Requests with the same group share one fair share of admission: the
    /// server sets it from the API call's id ([`fairness_group`]), so one
    /// call's prompts and samples cannot keep other clients' requests
    /// waiting. `None`: its own group. (A hash, not the id, keeps requests
    /// small on the engine's channel.)
    pub fairness_group: Option<u32>,
    /// Requests share prefix-cached KV blocks only with requests of the same
    /// salt (vLLM's `cache_salt`, hashed by the server with a key of its own);
    /// `None`: the unsalted cache.
    pub cache_salt: Option<u64>,
    /// Structured outputs: every sample's tokens follow this constraint (a
    /// compiled grammar). Refused on a backend that cannot apply token masks.
    pub constraint: Option<Arc<dyn TokenConstraintFactory>>,
    /// vLLM's `prompt_logprobs`: the logprob of every prompt token after the
    /// first given the tokens before it, with this many top alternatives.
    /// The prompt is then computed whole (no prefix-cached blocks are reused:
    /// their logits were never computed).
    pub prompt_logprobs: Option<usize>,
    /// The LoRA adapter to run with (the server resolves the request's
    /// `model` to one); refused unless the engine was built with LoRA.
    pub lora: Option<crate::lora::LoraRequest>,
}

impl GenerationRequest {
    /// A request with OpenAI's defaults for everything but the prompt.
    pub fn new(request_id: impl Into<String>, prompt_token_ids: Vec<TokenId>) -> Self {
        Self {
            request_id: request_id.into(),
            prompt_token_ids,
            sampling: SamplingParams::default(),
            max_tokens: Some(16),
            min_tokens: 0,
            n: 1,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            priority: 0,
            detokenize: true,
            fairness_group: None,
            cache_salt: None,
            constraint: None,
            prompt_logprobs: None,
            lora: None,
        }
    }
}

/// The fairness group of every engine request made for one API call.
pub fn fairness_group(api_request_id: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    api_request_id.hash(&mut h);
    h.finish() as u32
}

/// Why a sequence ended (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the model's length limit.
    Length,
    /// Aborted: the client went away, or the server is shutting down.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What matched when a sequence stopped (vLLM's `stop_reason`): `None` in
/// [`SeqDelta::stop_reason`] means EOS or a length limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    TokenId(TokenId),
    String(String),
}

/// The logprob of one generated token and its top alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenId,
    pub logprob: f32,
    pub top: Vec<(TokenId, f32)>,
}

/// The logprob of one prompt token given the tokens before it, its rank in
/// that distribution (1 is the most likely; tokens of equal logprob count
/// before it, as vLLM counts), and the top alternatives, most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprob {
    pub token: TokenId,
    pub logprob: f32,
    pub rank: u32,
    pub top: Vec<(TokenId, f32)>,
}

/// New output of one of a request's `n` sequences since the last delta.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqDelta {
    /// Which of the `n` samples (0-based).
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<TokenId>,
    /// One per token in `token_ids` when the request asked for logprobs.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
}

/// One update of a request: the deltas of those of its sequences that moved.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutput {
    pub request_id: String,
    pub deltas: Vec<SeqDelta>,
    /// True on the request's last update (every sequence has finished).
    pub finished: bool,
    pub num_prompt_tokens: usize,
    /// Prompt tokens found in the prefix cache (known once the prompt is scheduled).
    pub num_cached_tokens: usize,
    /// When the request asked for them, on its first output: one entry per
    /// prompt token, the first `None` (nothing comes before it).
    pub prompt_logprobs: Option<Vec<Option<PromptLogprob>>>,
}
