//! What one scheduling step hands to the model runner.
//!
//! The output is incremental, as vLLM v1's `SchedulerOutput` is: the runner
//! keeps its own copy of every running sequence's block table (its persistent
//! batch), and each step carries only what changed in it
//! ([`BlockTableUpdate`]), plus the sequences that ended since the step
//! before ([`SchedulerOutput::finished_seqs`]) so that the runner drops their
//! state. Tokens, positions and slots are per step and sent whole.
//!
//! # Keeping the runner's block tables in step
//! The scheduler remembers, per sequence, how many leading entries of its
//! allocator block table the runner holds (`keep` is that number) and sends
//! the rest. Every way a table changes is covered:
//! - a new block appended as the sequence grows: `keep` = the old length,
//!   `append` = the new blocks;
//! - copy-on-write (a write into a shared, partly filled last block): the last
//!   entry is replaced, `keep` = the old length - 1;
//! - a sequence admitted (its table starting with its prefix-cached blocks),
//!   admitted again after a recompute preemption, or swapped back in: a new
//!   table, `keep` = 0, `append` = all of it;
//! - a forked sample (`n > 1`): at the step whose entry lists it in
//!   `sample_for`, the runner gives it a copy of the parent's table (after the
//!   parent's update of that step); its later updates build on that copy, or
//!   start again from `keep` = 0 if the allocator could not share the blocks;
//! - a preempted sequence (listed in [`SchedulerOutput::preempted`]) holds
//!   no table until it is admitted or swapped in again, with `keep` = 0.
//!
//! A step therefore costs the scheduler O(changed entries), not O(table).

use std::ops::Range;

use pagoda_paged_kv::{BlockCopy, BlockId, SeqId, SwapIn, SwapOut, TokenId};

use crate::RequestId;

/// How one sequence's block table changed since the runner last saw it: the
/// runner keeps the first `keep` entries of its copy, drops any after them,
/// and appends `append`. The result is the allocator's table after this
/// step's allocation (it covers at least the sequence's `seq_len()` tokens).
/// See the module docs for the cases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTableUpdate {
    /// Leading entries of the runner's copy that are still valid.
    pub keep: usize,
    /// Entries that follow them (empty when nothing changed).
    pub append: Vec<BlockId>,
}

impl BlockTableUpdate {
    /// Applies the update to a runner's copy of the table. Returns false, and
    /// leaves `table` alone, when it holds fewer than `keep` entries (the
    /// copy is not the one the scheduler tracked: a bug on one side).
    #[must_use]
    pub fn apply_to(&self, table: &mut Vec<BlockId>) -> bool {
        if table.len() < self.keep {
            return false;
        }
        table.truncate(self.keep);
        table.extend_from_slice(&self.append);
        true
    }

    /// The length of the table once updated.
    pub fn new_len(&self) -> usize {
        self.keep + self.append.len()
    }
}

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
    /// What changed in the sequence's block table since the runner last saw
    /// it (usually nothing, or one new block).
    pub table_update: BlockTableUpdate,
    /// Cache slot of each new token: `table[pos / B] * B + pos % B`, through
    /// the table once `table_update` is applied.
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
    /// Speculative decoding: the last `num_draft_tokens` of `token_ids` are
    /// draft tokens to verify (a decode's one real token comes first). Every
    /// one of the entry's positions then samples: position `i` gives the
    /// token that follows `token_ids[..=i]`, and the sequence keeps the
    /// drafts up to the first one that differs from its sample, then that
    /// sample ([`crate::Scheduler::update_from_verified_output`]).
    pub num_draft_tokens: usize,
}

impl ScheduledSeq {
    /// The draft tokens this entry verifies (empty for an ordinary entry).
    pub fn draft_token_ids(&self) -> &[TokenId] {
        &self.token_ids[self.token_ids.len() - self.num_draft_tokens..]
    }

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
    /// Entries with exactly one new token (decodes) first, then
    /// verifications of drafts and prefills and prefill chunks. No sequence
    /// appears twice.
    pub scheduled: Vec<ScheduledSeq>,
    /// How many leading entries of `scheduled` have exactly one new token.
    pub num_decodes: usize,
    /// `(gpu, cpu)` block copies to the swap pool.
    pub blocks_to_swap_out: Vec<SwapOut>,
    /// `(cpu, gpu)` block copies from the swap pool.
    pub blocks_to_swap_in: Vec<SwapIn>,
    /// `(src, dst)` GPU block copies (copy-on-write).
    pub blocks_to_copy: Vec<BlockCopy>,
    /// Sequences preempted this step (recomputed later or swapped out): they
    /// hold no block table until they run again (with `keep` = 0). Their
    /// other state (tokens, sampling) lives on.
    pub preempted: Vec<SeqId>,
    /// Sequences that ended since the previous step (finished, aborted,
    /// stopped from outside, or samples that never forked because their
    /// request ended first): the runner forgets them. None of them is
    /// scheduled again.
    pub finished_seqs: Vec<SeqId>,
    /// Requests whose every sequence has ended since the previous step,
    /// including requests aborted before they ever ran.
    pub finished_requests: Vec<RequestId>,
    /// Sum of `token_ids.len()` over `scheduled`.
    pub num_batched_tokens: usize,
}

impl SchedulerOutput {
    /// Nothing to run (there may still be plans, e.g. after preemptions).
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }

    /// Whether every entry is a one-token decode or a verification of its
    /// drafts (the decode token and the drafts): no prompt tokens.
    pub fn is_decode_only(&self) -> bool {
        self.scheduled.iter().all(|s| s.token_ids.len() == s.num_draft_tokens + 1)
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
