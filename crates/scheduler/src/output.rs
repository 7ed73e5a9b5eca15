//! What one scheduling step hands to the model runner.

use std::ops::Range;

use pagoda_paged_kv::{BlockCopy, BlockId, SeqId, SwapIn, SwapOut, TokenId};

use crate::RequestId;

/// One sequence's part of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    pub request_id: RequestId,
    /// Tokens whose KV is computed this step (one for a decode; a prompt or a
    /// chunk of it for a prefill).
    pub token_ids: Vec<TokenId>,
    /// Tokens already computed: the new tokens sit at positions
    /// `start_position..start_position + token_ids.len()`.
    pub start_position: usize,
    /// The sequence's whole block table after this step's allocation.
    pub block_table: Vec<BlockId>,
    /// Cache slot of each new token: `block_table[pos / B] * B + pos % B`.
    pub slot_mapping: Vec<i64>,
    /// Sequences that sample a token from this entry's last position: empty
    /// for a prefill chunk that does not finish the prompt, `[seq_id]`
    /// normally, and every sample's id (this one first) at the step where a
    /// request with `n > 1` finishes its prompt and forks.
    pub sample_for: Vec<SeqId>,
    /// Asynchronous scheduling: this decode's one input token is the one the
    /// previous step (still running when this one was scheduled) samples for
    /// the sequence. `token_ids[0]` is then a placeholder (0): the runner
    /// takes the id from that step's sampled tokens on the device.
    pub token_from_previous_step: bool,
}

impl ScheduledSeq {
    /// Positions of the new tokens.
    pub fn positions(&self) -> Range<usize> {
        self.start_position..self.start_position + self.token_ids.len()
    }

    /// Context length after this step (cached tokens plus new ones).
    pub fn seq_len(&self) -> usize {
        self.start_position + self.token_ids.len()
    }
}

/// Everything one step asks of the runner.
///
/// The runner must apply it in this order: **swap-outs, then swap-ins, then
/// block copies, then the forward pass** (which writes each new token's KV to
/// its slot, all tokens of a layer before that layer's attention reads).
/// The scheduler relies on it: a block released by a swap-out may be a
/// swap-in or copy destination in the same step, and a sequence admitted this
/// step may reuse a prefix block that another entry of this step fills.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// Increases by one per call to `schedule`; `update_from_output` checks it.
    pub step: u64,
    /// Entries with exactly one new token (decodes) first, then prefills and
    /// prefill chunks. No sequence appears twice.
    pub scheduled: Vec<ScheduledSeq>,
    /// How many leading entries of `scheduled` have exactly one new token.
    pub num_decodes: usize,
    /// `(gpu, cpu)` block copies to the swap pool.
    pub blocks_to_swap_out: Vec<SwapOut>,
    /// `(cpu, gpu)` block copies from the swap pool.
    pub blocks_to_swap_in: Vec<SwapIn>,
    /// `(src, dst)` GPU block copies (copy-on-write).
    pub blocks_to_copy: Vec<BlockCopy>,
    /// Sequences preempted this step (recomputed later or swapped out).
    pub preempted: Vec<SeqId>,
    /// Sum of `token_ids.len()` over `scheduled`.
    pub num_batched_tokens: usize,
}

impl SchedulerOutput {
    /// Nothing to run (there may still be plans, e.g. after preemptions).
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }

    /// Whether a request forks into its `n` samples at this step (the next
    /// step cannot be scheduled before this one is applied).
    pub fn forks(&self) -> bool {
        self.scheduled.iter().any(|s| s.sample_for.len() > 1)
    }

    /// Every sequence that samples a token this step, in entry order.
    pub fn sampling_seqs(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.scheduled.iter().flat_map(|s| s.sample_for.iter().copied())
    }
}
