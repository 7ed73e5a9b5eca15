//! Requests as they arrive, sequences as the scheduler tracks them, and what a
//! step reports back per sequence.

use std::fmt;

use pagoda_paged_kv::{SeqId, TokenId};

use crate::policy::RankKey;

/// A client request (one prompt; `n` parallel samples of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request {}", self.0)
    }
}

/// A request as handed to [`crate::Scheduler::add_request`].
#[derive(Clone, Debug, PartialEq)]
pub struct NewRequest {
    pub request_id: RequestId,
    pub prompt_token_ids: Vec<TokenId>,
    /// Most tokens to generate per sample (at least 1).
    pub max_tokens: usize,
    /// Parallel samples: the prompt is prefilled once, then forks into `n`
    /// sequences that share its KV blocks copy-on-write.
    pub n: usize,
    /// Lower values are served first under the priority policy.
    pub priority: i32,
    /// Arrival time in seconds (informational; order is the order of arrival
    /// at `add_request`).
    pub arrival: f64,
    /// The model's end-of-sequence tokens: any of them ends a sample
    /// ([`FinishReason::Eos`]) unless `ignore_eos`.
    pub eos_token_ids: Vec<TokenId>,
    /// The request's own stop tokens ([`FinishReason::StopToken`]; they
    /// apply despite `ignore_eos`, and win over EOS for a token in both).
    pub stop_token_ids: Vec<TokenId>,
    /// Keep generating past the EOS tokens.
    pub ignore_eos: bool,
    /// EOS and stop tokens do not end a sample before this many tokens.
    pub min_tokens: usize,
    /// Folded into every prefix-cache block hash: requests with different
    /// salts (tenants, LoRA adapters) never share cached blocks.
    pub cache_salt: Option<u64>,
    /// Requests with the same group share one fair share of admission (the
    /// server gives every prompt and sample of one API call the same group);
    /// `None`: a group of its own. See [`crate::Scheduler`]'s rule 3.
    pub fairness_group: Option<u64>,
    /// Compute the whole prompt even when a prefix of it is cached (its
    /// blocks still enter the cache): for requests that need something of
    /// every prompt position, such as prompt logprobs, which cached blocks
    /// never produced.
    pub skip_prefix_cache: bool,
    /// The LoRA adapter the request runs with (an id the engine gives each
    /// adapter; `None`: the base model). A step holds sequences of at most
    /// [`crate::SchedulerConfig::max_loras`] distinct adapters, and adapters
    /// never share prefix-cached blocks (the id is folded into the block hash
    /// with the salt).
    pub lora: Option<u32>,
}

impl NewRequest {
    /// A single-sample request with every option at its default.
    pub fn new(request_id: RequestId, prompt_token_ids: Vec<TokenId>, max_tokens: usize) -> Self {
        Self {
            request_id,
            prompt_token_ids,
            max_tokens,
            n: 1,
            priority: 0,
            arrival: 0.0,
            eos_token_ids: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
            cache_salt: None,
            fairness_group: None,
            skip_prefix_cache: false,
            lora: None,
        }
    }
}

/// Why [`crate::Scheduler::update_from_output`] ended a sequence: every
/// token-level stop is decided there, and reported with its cause, so no
/// caller has to work out again which condition matched. (Stops found
/// outside the scheduler, such as stop strings, and aborts end a sequence
/// through [`crate::Scheduler::finish_seq`] and
/// [`crate::Scheduler::abort_request`]; their reason is the caller's.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// One of the model's end-of-sequence tokens ([`NewRequest::eos_token_ids`]).
    Eos(TokenId),
    /// One of the request's own [`NewRequest::stop_token_ids`].
    StopToken(TokenId),
    /// `max_tokens` generated, or the model's maximum length reached.
    Length,
}

/// Where a live sequence is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqStatus {
    /// Queued for (re)computation; holds no blocks.
    Waiting,
    /// Holds GPU blocks; scheduled in steps while budgets allow.
    Running,
    /// Preempted to the CPU swap pool.
    Swapped,
}

/// One sequence: a request's prompt and the tokens one of its samples has
/// generated so far.
#[derive(Clone, Debug)]
pub struct Sequence {
    pub(crate) seq_id: SeqId,
    pub(crate) request_id: RequestId,
    pub(crate) sample_index: usize,
    /// Prompt then generated tokens.
    pub(crate) tokens: Vec<TokenId>,
    pub(crate) num_prompt_tokens: usize,
    /// Tokens whose KV is computed or scheduled for computation (advanced
    /// when a step is scheduled, so the next step can be scheduled before
    /// this one's results are back).
    pub(crate) num_computed_tokens: usize,
    /// Tokens that scheduled steps sample for this sequence and that are not
    /// in `tokens` yet: 1 from scheduling until the update, 2 briefly under
    /// asynchronous scheduling (the step running and the one just scheduled).
    pub(crate) num_awaited_tokens: usize,
    pub(crate) status: SeqStatus,
    pub(crate) rank: RankKey,
    /// Sibling sequences to create when the prompt completes (n > 1).
    pub(crate) pending_fork: Vec<SeqId>,
    /// Upper bound on tokens this sequence ever holds KV slots for.
    pub(crate) max_total_tokens: usize,
    /// The last step this sequence was scheduled in.
    pub(crate) scheduled_step: u64,
    /// Leading entries of its block table that the runner holds (sent in
    /// earlier steps and unchanged since): the next entry's
    /// [`crate::BlockTableUpdate::keep`]. 0 while it holds no blocks.
    pub(crate) num_blocks_sent: usize,
    /// Whether its prefill holds one of the `max_long_partial_prefills`
    /// slots: set when it starts with more than the long-prompt threshold
    /// left to prefill, and kept until the prompt is done. (Judged by what
    /// is left at each step instead, a long prompt's last chunks would free
    /// the slot early, and a queued long prompt could start beside it and
    /// take the partial-prefill slot a short prompt was to get.)
    pub(crate) long_prefill: bool,
    /// Speculative tokens proposed to follow its tokens
    /// ([`crate::Scheduler::set_draft_tokens`]), verified by its next decode.
    pub(crate) draft_tokens: Vec<TokenId>,
}

impl Sequence {
    pub fn seq_id(&self) -> SeqId {
        self.seq_id
    }

    pub fn request_id(&self) -> RequestId {
        self.request_id
    }

    /// Which of the request's `n` samples this is (0-based).
    pub fn sample_index(&self) -> usize {
        self.sample_index
    }

    pub fn prompt_token_ids(&self) -> &[TokenId] {
        &self.tokens[..self.num_prompt_tokens]
    }

    pub fn output_token_ids(&self) -> &[TokenId] {
        &self.tokens[self.num_prompt_tokens..]
    }

    /// Prompt followed by output.
    pub fn all_token_ids(&self) -> &[TokenId] {
        &self.tokens
    }

    pub fn num_computed_tokens(&self) -> usize {
        self.num_computed_tokens
    }

    /// Tokens already sampled for it by scheduled steps but not applied yet.
    pub fn num_awaited_tokens(&self) -> usize {
        self.num_awaited_tokens
    }

    /// Known tokens plus awaited ones: the length the sequence will have once
    /// every scheduled step is applied.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len() + self.num_awaited_tokens
    }

    pub fn status(&self) -> SeqStatus {
        self.status
    }

    /// Whether the KV of all tokens but the newest is computed (the sequence
    /// is generating, not prefilling).
    pub fn is_decoding(&self) -> bool {
        self.pending_fork.is_empty()
            && self.num_computed_tokens + 1 == self.num_tokens()
            && self.num_computed_tokens >= self.num_prompt_tokens
    }
}

/// What a step did to one sequence that sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqUpdate {
    pub seq_id: SeqId,
    pub request_id: RequestId,
    /// Which of the request's samples this is (0-based).
    pub sample_index: usize,
    pub new_token: TokenId,
    /// `Some` when this token ended the sequence (its blocks are already freed).
    pub finish_reason: Option<FinishReason>,
}
