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
    /// Most prompt tokens one sequence may prefill in one step, so that one
    /// long prompt cannot take the whole budget.
    pub long_prefill_token_threshold: Option<usize>,
    /// Allow scheduling a step while the previous one is not applied yet (its
    /// tokens still being sampled), so the host prepares step N+1 while the
    /// device runs step N. Decodes of the previous step's samplers then take
    /// their input token from the device (see
    /// [`crate::ScheduledSeq::token_from_previous_step`]).
    pub async_scheduling: bool,
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
            async_scheduling: false,
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_num_batched_tokens == 0 {
            return Err(ConfigError::Zero("max_num_batched_tokens"));
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
        if !self.enable_chunked_prefill && self.max_num_batched_tokens < self.max_model_len {
            return Err(ConfigError::BudgetBelowModelLen {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_model_len: self.max_model_len,
            });
        }
        Ok(())
    }
}
