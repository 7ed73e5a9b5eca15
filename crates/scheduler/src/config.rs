//! Scheduler configuration.

use crate::error::ConfigError;
use crate::policy::Policy;

/// What to do with a running sequence when the KV cache runs out of blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PreemptionMode {
    /// Free its blocks and queue it again; its prompt and generated tokens are
    /// recomputed when it resumes (prefix caching often makes that cheap).
    #[default]
    Recompute,
    /// Copy its blocks to the CPU swap pool and copy them back when it
    /// resumes. Falls back to recompute when the CPU pool is full, and for
    /// sequences still in their prefill.
    Swap,
}

/// Limits and policies of a [`crate::Scheduler`].
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// Token budget of one step (prefill and decode tokens together).
    pub max_num_batched_tokens: usize,
    /// Most sequences in one step, and most running at once.
    pub max_num_seqs: usize,
    /// The model's context length: prompt plus output never exceeds it.
    pub max_model_len: usize,
    /// Split long prompts over several steps, so that decodes keep running
    /// beside them. When off, a prompt is scheduled whole or not at all.
    pub enable_chunked_prefill: bool,
    pub preemption_mode: PreemptionMode,
    pub policy: Policy,
    /// A prompt with more than this many tokens left to prefill is *long*
    /// (vLLM `--long-prefill-token-threshold`). When set, it also caps every
    /// prefill chunk, as in vLLM's v1 scheduler. When unset and
    /// `max_num_partial_prefills > 1`, prompts are classed long above 4% of
    /// `max_model_len` (vLLM's default) but chunks are not capped: the
    /// partial-prefill rules below cap them only while queued prompts wait.
    pub long_prefill_token_threshold: Option<usize>,
    /// Most prompts partially prefilled at once (vLLM
    /// `--max-num-partial-prefills`). Above 1 (the default is 4), with chunked
    /// prefill, a step reserves budget for queued prompts: see
    /// [`crate::Scheduler`]'s rule 2. 1 gives the plain FCFS behaviour, where
    /// running prefills take the budget first and queued prompts wait for them.
    pub max_num_partial_prefills: usize,
    /// Most *long* prompts partially prefilled at once (vLLM
    /// `--max-long-partial-prefills`); further long prompts wait while shorter
    /// ones behind them are admitted. Used when `max_num_partial_prefills > 1`.
    pub max_long_partial_prefills: usize,
    /// Allow scheduling a step while the previous one is not applied yet (its
    /// tokens still being sampled), so the host prepares step N+1 while the
    /// device runs step N. Decodes of the previous step's samplers then take
    /// their input token from the device (see
    /// [`crate::ScheduledSeq::token_from_previous_step`]).
    pub async_scheduling: bool,
    /// Most distinct LoRA adapters among the running sequences (vLLM
    /// `--max-loras`: the adapter slots on the device); `None`: no limit.
    /// A waiting request whose adapter would exceed it waits while requests
    /// behind it may still join the running adapters; after
    /// [`crate::LORA_FAIRNESS_STEPS`] steps none may (base-model requests
    /// still start), so the running adapters drain and it cannot starve.
    pub max_loras: Option<usize>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            max_model_len: 2048,
            enable_chunked_prefill: true,
            preemption_mode: PreemptionMode::Recompute,
            policy: Policy::Fcfs,
            long_prefill_token_threshold: None,
            max_num_partial_prefills: 4,
            max_long_partial_prefills: 1,
            async_scheduling: false,
            max_loras: None,
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_num_batched_tokens == 0 {
            return Err(ConfigError::Zero("max_num_batched_tokens"));
        }
        if self.max_loras == Some(0) {
            return Err(ConfigError::Zero("max_loras"));
        }
        if self.max_num_seqs == 0 {
            return Err(ConfigError::Zero("max_num_seqs"));
        }
        if self.max_model_len == 0 {
            return Err(ConfigError::Zero("max_model_len"));
        }
        if self.long_prefill_token_threshold == Some(0) {
            return Err(ConfigError::Zero("long_prefill_token_threshold"));
        }
        if self.max_num_partial_prefills == 0 {
            return Err(ConfigError::Zero("max_num_partial_prefills"));
        }
        if self.max_long_partial_prefills == 0 {
            return Err(ConfigError::Zero("max_long_partial_prefills"));
        }
        if self.max_long_partial_prefills > self.max_num_partial_prefills {
            return Err(ConfigError::LongPartialPrefillsAboveMax {
                max_long_partial_prefills: self.max_long_partial_prefills,
                max_num_partial_prefills: self.max_num_partial_prefills,
            });
        }
        if !self.enable_chunked_prefill && self.max_num_batched_tokens < self.max_model_len {
            return Err(ConfigError::BudgetBelowModelLen {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_model_len: self.max_model_len,
            });
        }
        Ok(())
    }

    /// The limits of concurrent partial prefills, or `None` when they do not
    /// apply (one partial prefill at most, or no chunking).
    pub(crate) fn partial_prefill_limits(&self) -> Option<PartialPrefillLimits> {
        if self.max_num_partial_prefills <= 1 || !self.enable_chunked_prefill {
            return None;
        }
        Some(PartialPrefillLimits {
            max_partial: self.max_num_partial_prefills,
            max_long: self.max_long_partial_prefills,
            long_threshold: self.long_prompt_threshold(),
        })
    }

    /// Prompts with more tokens than this left to prefill are long: the
    /// configured threshold, else 4% of `max_model_len` (vLLM's default).
    pub fn long_prompt_threshold(&self) -> usize {
        self.long_prefill_token_threshold.unwrap_or((self.max_model_len * 4 / 100).max(1))
    }
}

/// [`SchedulerConfig::partial_prefill_limits`], resolved.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PartialPrefillLimits {
    pub max_partial: usize,
    pub max_long: usize,
    pub long_threshold: usize,
}
