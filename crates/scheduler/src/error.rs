use pagoda_paged_kv::{AllocError, SeqId};
use thiserror::Error;

use crate::RequestId;

/// A scheduler configuration that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error(
        "without chunked prefill, max_num_batched_tokens ({max_num_batched_tokens}) must be at least \
         max_model_len ({max_model_len}), or a long prompt could never be scheduled"
    )]
    BudgetBelowModelLen { max_num_batched_tokens: usize, max_model_len: usize },
    #[error(
        "max_long_partial_prefills ({max_long_partial_prefills}) must not exceed \
         max_num_partial_prefills ({max_num_partial_prefills})"
    )]
    LongPartialPrefillsAboveMax { max_long_partial_prefills: usize, max_num_partial_prefills: usize },
}

/// Why a request was refused at the door.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AddRequestError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {len} tokens, more than the model's maximum length of {max_model_len}")]
    PromptTooLong { len: usize, max_model_len: usize },
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error("min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})")]
    MinTokensExceedsMax { min_tokens: usize, max_tokens: usize },
    #[error("n must be at least 1")]
    ZeroSamples,
    #[error("n = {n} exceeds max_num_seqs ({max_num_seqs})")]
    TooManySamples { n: usize, max_num_seqs: usize },
    #[error("{0} is already known")]
    DuplicateRequest(RequestId),
    #[error("a sequence of {tokens} tokens can never fit in the KV cache ({capacity_tokens} token slots)")]
    CannotFit { tokens: usize, capacity_tokens: usize },
}

/// Why [`crate::Scheduler::schedule`] could not produce a step.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum SchedulerError {
    /// A step's output has not been given to `update_from_output`, and the
    /// next step cannot be scheduled before it is (synchronous scheduling; or
    /// two steps unapplied; or the unapplied step forks samples).
    #[error("step {0} was scheduled but its output has not been applied yet")]
    StepNotApplied(u64),
    /// The allocator refused something other than for lack of memory: a bug
    /// in the allocator or the scheduler, reported instead of a panic.
    #[error("KV allocator error for {seq}: {source}")]
    Allocator {
        seq: SeqId,
        #[source]
        source: AllocError,
    },
    /// The allocator's block table does not cover the scheduled tokens.
    #[error("{seq}: block table of {blocks} blocks cannot hold {tokens} tokens")]
    ShortBlockTable { seq: SeqId, blocks: usize, tokens: usize },
}

/// Sampled tokens that do not match the step they are reported for. Nothing
/// is applied when this is returned.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum UpdateError {
    #[error("output of step {got} given, but the last scheduled step is {expected}")]
    StaleOutput { got: u64, expected: u64 },
    #[error("the output of step {0} was already applied")]
    AlreadyApplied(u64),
    #[error("a token was sampled for {0}, which does not sample in this step")]
    UnexpectedSample(SeqId),
    #[error("two tokens were sampled for {0}")]
    DuplicateSample(SeqId),
    #[error("no token was sampled for {0}")]
    MissingSample(SeqId),
    /// Accepted draft counts must be given exactly for the entries that
    /// verify drafts, each at most its number of drafts.
    #[error("{seq}: {accepted} draft tokens accepted of {drafts} verified")]
    BadAcceptance { seq: SeqId, accepted: usize, drafts: usize },
    /// The allocator refused to learn an awaited token: a bug (the step's
    /// other results may be applied already).
    #[error("KV allocator error for {seq}: {source}")]
    Allocator {
        seq: SeqId,
        #[source]
        source: AllocError,
    },
}
