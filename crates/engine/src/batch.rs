//! The model runner's persistent batch: what the runner keeps about every
//! sequence from step to step, so that a step is built from the scheduler's
//! changes instead of from scratch (vLLM v1's `InputBatch`).
//!
//! Per sequence it holds:
//! - its **block table**, a host row that the scheduler's
//!   [`BlockTableUpdate`](pagoda_scheduler::BlockTableUpdate)s keep equal to
//!   the allocator's table (rows are reused: a finished sequence's row serves
//!   the next one, and a step allocates no table);
//! - its **sampling state**: the request's parameters (shared, given once by
//!   [`PersistentBatch::add_request`]), its seed stream (`sample_seed` of
//!   the request's seed and its sample index), how many tokens it has sampled
//!   (the counter of its random stream), and the token history penalties
//!   need (prompt, then outputs appended as steps are applied).
//!
//! [`PersistentBatch::prepare`] applies one [`SchedulerOutput`] (ended
//! sequences dropped, preempted ones emptied, tables updated, forked samples
//! given a copy of their parent's table and state) and stages the step's flat
//! host inputs ([`StepInputs`]). The block tables are then gathered once, at
//! the width the step needs: [`PersistentBatch::gather_block_tables`] for an
//! unpadded step, or a decode graph's padded buffers reading the rows through
//! [`BlockTableSource`]. The device copy is the runner's: it uploads the
//! gathered rows of the step's sequences only.
//!
//! A request with a structured-output constraint gives each of its
//! sequences a [`TokenConstraint`] (forks copy their parent's). Per step,
//! [`PersistentBatch::fill_token_masks`] writes the allowed-token bitmask of
//! every constrained row (in parallel; the runner calls it after enqueueing
//! the forward pass, so it overlaps the device), the sampling rows carry the
//! masks, and [`PersistentBatch::apply_sampled`] advances the constraints.
//!
//! # Asynchronous scheduling
//! A step may be prepared while the one before still runs. A sample launched
//! is *pending* until [`PersistentBatch::apply_sampled`] appends its token, so
//! the random-stream counter of a sample is `outputs + pending` (the tokens
//! sampled for the sequence by every earlier step, known or not), exactly the
//! scheduler's known plus awaited tokens. A decode whose input is a token the
//! step in flight samples reads it from that step's row
//! ([`StepInputs::source_rows`]). When steps in flight are dropped (a device
//! failure), [`PersistentBatch::discard_unapplied`] forgets their samples, as
//! the scheduler forgets its awaited tokens. A mask needs the sequence's
//! previous token applied, so a step with constrained rows is not scheduled
//! ahead of (`PreparedStep::schedule_ahead` is false for it).

use std::sync::Arc;

use pagoda_backend::{AttentionHostMetadata, SampledToken, SamplingParams, SamplingRow};
use pagoda_models::LoraAdapter;
use pagoda_paged_kv::BlockId;
use pagoda_scheduler::{RequestId, ScheduledSeq, SchedulerOutput, SeqId, TokenId};
use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::constraint::{TokenConstraint, TokenConstraintFactory};
use crate::error::EngineError;

/// The host inputs of one forward pass, staged by [`PersistentBatch::prepare`]
/// (its buffers are reused from step to step).
#[derive(Debug, Default, PartialEq)]
pub struct StepInputs {
    pub token_ids: Vec<u32>,
    pub positions: Vec<i32>,
    /// Sequences in step order (decodes first). `block_tables` is filled only
    /// by [`PersistentBatch::gather_block_tables`] (`max_blocks_per_seq` is
    /// the widest table of the step from the start).
    pub attn: AttentionHostMetadata,
    /// One row per sampling sequence: the step row whose logits it samples;
    /// then the rows of prompt positions whose logprobs were asked for
    /// ([`Self::prompt_logprobs`]), after every sampling row.
    pub logits_indices: Vec<i32>,
    /// Who samples each logits row, in the same order.
    pub samplers: Vec<SampleTarget>,
    /// Asynchronous scheduling: per token row, the row of the previous step's
    /// samples whose token is this row's input (fed on the device), or -1.
    /// Empty when no row takes its token from the previous step.
    pub source_rows: Vec<i32>,
    /// Prompt chunks of requests that asked for prompt logprobs, in order;
    /// their rows follow the sampling rows in `logits_indices`.
    pub prompt_logprobs: Vec<PromptLogprobRows>,
    /// The prompt token each of those rows predicts (its logprob is wanted).
    pub prompt_targets: Vec<u32>,
    /// Per token row, its request's LoRA adapter id (0: none); empty when no
    /// sequence of the step has an adapter.
    pub lora_ids: Vec<u32>,
}

/// Consecutive prompt positions of one request whose next-token logprobs a
/// step computes: rows `first_position..first_position + num_rows` predict
/// prompt tokens `first_position + 1..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptLogprobRows {
    pub request_id: RequestId,
    pub first_position: usize,
    pub num_rows: usize,
    /// Top alternatives wanted per position.
    pub top_k: usize,
}

impl StepInputs {
    /// Logits rows that sample (the rest are prompt-logprob rows).
    pub fn num_sampling_rows(&self) -> usize {
        self.samplers.len()
    }

    fn clear(&mut self) {
        self.token_ids.clear();
        self.positions.clear();
        self.attn.query_start_loc.clear();
        self.attn.seq_lens.clear();
        self.attn.block_tables.clear();
        self.attn.max_blocks_per_seq = 0;
        self.attn.slot_mapping.clear();
        self.attn.num_decode_seqs = 0;
        self.logits_indices.clear();
        self.samplers.clear();
        self.source_rows.clear();
        self.prompt_logprobs.clear();
        self.prompt_targets.clear();
        self.lora_ids.clear();
    }
}

/// A sequence that samples this step, and the scheduled entry whose last
/// position it samples from (a forked child samples its parent's row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleTarget {
    pub seq_id: SeqId,
    pub entry_seq_id: SeqId,
    /// Position of `seq_id` among the entry's `sample_for` (its sample index at a fork).
    pub fork_index: usize,
    /// For an entry that verifies draft tokens, which of its rows this is.
    pub verify: Option<VerifyRow>,
}

/// Per verification of a step: the sequence and how many of its drafts it
/// accepted.
pub type Verifications = Vec<(SeqId, usize)>;

/// One of the `num_drafts + 1` sampling rows of an entry that verifies draft
/// tokens: row `index` samples the token after the sequence and drafts
/// `..index` (the rows are consecutive, in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyRow {
    pub index: usize,
    pub num_drafts: usize,
}

/// What the engine needs to know about a prepared step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PreparedStep {
    /// Who samples each row of the step, in order.
    pub samplers: Vec<SampleTarget>,
    /// Whether the next step may be scheduled before this one's tokens are
    /// back on the host: not when a row's penalties or bad words need the whole history.
    pub schedule_ahead: bool,
    /// Whether a row samples under a structured-output constraint.
    pub has_token_masks: bool,
}

/// Where a padded decode step reads each sequence's block table from.
pub trait BlockTableSource {
    /// The block table of the step's `row`-th sequence (it covers at least
    /// the sequence's context).
    fn row_table(&self, row: usize) -> &[BlockId];
}

impl BlockTableSource for [Vec<BlockId>] {
    fn row_table(&self, row: usize) -> &[BlockId] {
        &self[row]
    }
}

/// The seed of sample `index` of a request: the request's seed for the first,
/// a distinct stream for each sibling.
pub(crate) fn sample_seed(seed: u64, index: usize) -> u64 {
    if index == 0 {
        seed
    } else {
        seed ^ (index as u64).wrapping_mul(0xd1b5_4a32_d192_ed03)
    }
}

/// What every sequence of a request shares.
#[derive(Debug)]
struct RequestSampling {
    params: Arc<SamplingParams>,
    seed: u64,
    prompt: Vec<TokenId>,
    constraint: Option<Arc<dyn TokenConstraintFactory>>,
    /// Its LoRA adapter's id and matrices.
    lora: Option<(u32, Arc<LoraAdapter>)>,
}

/// The runner's state of one sequence.
#[derive(Debug)]
struct SeqState {
    seq_id: SeqId,
    request: Arc<RequestSampling>,
    /// Its block table, as the scheduler's updates built it.
    block_table: Vec<BlockId>,
    sample_index: usize,
    /// `sample_seed(request seed, sample_index)`.
    seed: u64,
    /// Tokens sampled for it and applied, in order.
    output: Vec<TokenId>,
    /// Samples launched for it whose tokens are not applied yet.
    pending: u64,
    /// Its sampling row in the last step that sampled for it.
    last_sample_row: usize,
    /// Its structured-output constraint, advanced as tokens are applied.
    constraint: Option<Box<dyn TokenConstraint>>,
}

/// The runner's persistent per-sequence state and the staging of the step
/// being prepared. See the module docs.
#[derive(Debug, Default)]
pub struct PersistentBatch {
    block_size: usize,
    /// Requests added and not yet ended.
    requests: FxHashMap<RequestId, Arc<RequestSampling>>,
    /// Sequence states; `None` slots are free (listed in `free_slots`).
    slots: Vec<Option<SeqState>>,
    free_slots: Vec<usize>,
    slot_of: FxHashMap<SeqId, usize>,
    /// Block-table rows of ended sequences, kept for the next ones.
    spare_tables: Vec<Vec<BlockId>>,
    /// The step staged by `prepare`, if any.
    step: Option<u64>,
    inputs: StepInputs,
    /// Per sequence of the step, its slot.
    step_slots: Vec<usize>,
    /// Per sampling row, its sequence's slot and the counter of its draw.
    sampler_slots: Vec<usize>,
    sampler_steps: Vec<u64>,
    /// Per sampling row, the token history it reads when it is not its
    /// sequence's own (a verification row after drafts, whose penalties
    /// count them): `(h, len)`, the first `len` tokens of `draft_histories[h]`,
    /// one history (outputs, then every draft) per verification.
    sampler_histories: Vec<Option<(usize, usize)>>,
    draft_histories: Vec<Vec<TokenId>>,
    /// Per sampling row, the draft that follows its position (a
    /// verification's rows but the last): a constrained row's mask is the
    /// state after the drafts before it.
    sampler_drafts: Vec<Option<TokenId>>,
    /// The sampling rows' allowed-token bitmasks (`mask_words` each; a row
    /// without a constraint keeps zeros), filled by `fill_token_masks`.
    token_masks: Vec<u32>,
    mask_words: usize,
    masks_filled: bool,
    /// Requests that asked for prompt logprobs: top alternatives wanted.
    prompt_logprobs: FxHashMap<RequestId, usize>,
    /// The step rows of the staged prompt-logprob positions.
    prompt_rows: Vec<i32>,
}

impl PersistentBatch {
    pub fn new(block_size: usize) -> Self {
        Self { block_size, ..Self::default() }
    }

    /// Registers a request the scheduler has accepted: its sampling
    /// parameters, its seed (sample `i` draws from `sample_seed(seed, i)`)
    /// and its prompt (the start of every sample's token history).
    pub fn add_request(
        &mut self,
        request_id: RequestId,
        prompt: &[TokenId],
        params: Arc<SamplingParams>,
        seed: u64,
        constraint: Option<Arc<dyn TokenConstraintFactory>>,
        lora: Option<(u32, Arc<LoraAdapter>)>,
    ) {
        let request = RequestSampling { params, seed, prompt: prompt.to_vec(), constraint, lora };
        self.requests.insert(request_id, Arc::new(request));
    }

    /// Asks for the logprobs of `request_id`'s prompt tokens, with `top_k`
    /// alternatives each: every prompt chunk of it computed before its first
    /// sample adds its positions' logits rows (see [`StepInputs::prompt_logprobs`]).
    pub fn want_prompt_logprobs(&mut self, request_id: RequestId, top_k: usize) {
        self.prompt_logprobs.insert(request_id, top_k);
    }

    /// Sequences the batch holds state for.
    pub fn num_seqs(&self) -> usize {
        self.slot_of.len()
    }

    /// Requests added and not yet ended.
    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }

    /// A sequence's block table as the updates built it (`None` if unknown).
    pub fn block_table(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.state(seq).map(|s| s.block_table.as_slice())
    }

    /// A sequence's tokens sampled and applied so far (`None` if unknown).
    pub fn output_tokens(&self, seq: SeqId) -> Option<&[TokenId]> {
        self.state(seq).map(|s| s.output.as_slice())
    }

    /// The step staged by the last [`Self::prepare`], if any.
    pub fn prepared_step(&self) -> Option<u64> {
        self.step
    }

    /// The staged step's inputs.
    pub fn inputs(&self) -> &StepInputs {
        &self.inputs
    }

    /// Applies one step's changes and stages its inputs. `previous` lists who
    /// samples each row of the step before, still running when this one was
    /// scheduled: entries whose input is one of those tokens read it there.
    ///
    /// On an error (the output does not match the batch: a bug on one side)
    /// the batch is left part-way; the engine drops the steps in flight, and
    /// the scheduler sends the tables of their sequences whole again.
    pub fn prepare(
        &mut self,
        out: &SchedulerOutput,
        previous: &[SampleTarget],
    ) -> Result<PreparedStep, EngineError> {
        self.step = None;
        for &seq in &out.finished_seqs {
            self.remove(seq);
        }
        for id in &out.finished_requests {
            self.requests.remove(id);
            self.prompt_logprobs.remove(id);
        }
        for &seq in &out.preempted {
            if let Some(&slot) = self.slot_of.get(&seq) {
                self.slot_mut(slot).block_table.clear();
            }
        }
        self.inputs.clear();
        self.step_slots.clear();
        self.sampler_slots.clear();
        self.sampler_steps.clear();
        self.sampler_histories.clear();
        self.draft_histories.clear();
        self.sampler_drafts.clear();
        self.masks_filled = false;
        self.prompt_rows.clear();
        self.inputs.attn.query_start_loc.push(0);
        let mut max_blocks = 1;
        // Whether every entry so far attends as one-token rows (the scheduler
        // puts decodes first, then verifications, then prompt chunks).
        let mut decode_prefix = true;
        for entry in &out.scheduled {
            let slot = self.update_seq(entry)?;
            let table_len = self.slot_ref(slot).block_table.len();
            let lora_id = self.slot_ref(slot).request.lora.as_ref().map(|(id, _)| *id);
            max_blocks = max_blocks.max(table_len);
            let s = &mut self.inputs;
            let n = entry.token_ids.len();
            if let Some(id) = lora_id {
                s.lora_ids.resize(s.token_ids.len(), 0);
                s.lora_ids.resize(s.token_ids.len() + n, id);
            }
            s.token_ids.extend_from_slice(&entry.token_ids);
            s.positions.extend(entry.positions().map(|p| p as i32));
            s.attn.slot_mapping.extend_from_slice(&entry.slot_mapping);
            decode_prefix &= n == entry.num_draft_tokens + 1;
            if decode_prefix {
                // A decode, or a verification's k + 1 rows as k + 1 decode
                // rows over the same block table, row i seeing the context up
                // to its own position: the decode attention kernel serves
                // them (reading the context once, where a prompt-chunk kernel
                // tiles 64 query rows for 5), and a step of decodes and
                // verifications replays a decode graph.
                let first = s.token_ids.len() - n;
                let last_len = entry.seq_len();
                for i in 0..n {
                    s.attn.query_start_loc.push((first + i + 1) as i32);
                    s.attn.seq_lens.push((last_len + i + 1 - n) as i32);
                    self.step_slots.push(slot);
                }
                s.attn.num_decode_seqs += n;
            } else {
                s.attn.query_start_loc.push(s.token_ids.len() as i32);
                s.attn.seq_lens.push(entry.seq_len() as i32);
                self.step_slots.push(slot);
            }
            if entry.token_from_previous_step {
                let state = self.slot_mut(slot);
                let row = state.last_sample_row;
                if previous.get(row).is_none_or(|t| t.seq_id != entry.seq_id) {
                    return Err(EngineError::Internal(format!(
                        "{:?} takes a token the previous step does not sample",
                        entry.seq_id
                    )));
                }
                let s = &mut self.inputs;
                let first = s.token_ids.len() - n;
                s.source_rows.resize(first, -1);
                s.source_rows.push(row as i32);
            }
            self.stage_prompt_logprobs(entry, slot);
            self.stage_samplers(entry, slot)?;
        }
        if !self.inputs.lora_ids.is_empty() {
            self.inputs.lora_ids.resize(self.inputs.token_ids.len(), 0);
        }
        self.inputs.logits_indices.extend_from_slice(&self.prompt_rows);
        if !self.inputs.source_rows.is_empty() {
            self.inputs.source_rows.resize(self.inputs.token_ids.len(), -1);
        }
        self.inputs.attn.max_blocks_per_seq = max_blocks;
        self.step = Some(out.step);
        let has_token_masks = self.has_token_masks();
        let schedule_ahead = !has_token_masks
            && self.sampler_slots.iter().all(|&slot| !self.slot_ref(slot).request.params.needs_history());
        Ok(PreparedStep { samplers: self.inputs.samplers.clone(), schedule_ahead, has_token_masks })
    }

    /// A live request's LoRA adapter of this id.
    pub fn lora_adapter(&self, id: u32) -> Option<&Arc<LoraAdapter>> {
        self.requests.values().find_map(|r| r.lora.as_ref().filter(|(held, _)| *held == id).map(|(_, a)| a))
    }

    /// Whether a row of the staged step samples under a constraint.
    pub fn has_token_masks(&self) -> bool {
        self.sampler_slots.iter().any(|&slot| self.slot_ref(slot).constraint.is_some())
    }

    /// Writes the allowed-token bitmask of every constrained row of the
    /// staged step (`vocab_size` bits each), in parallel over sequences.
    /// Every earlier sample of those sequences must be applied (their steps
    /// were not scheduled ahead). A verification's rows are filled in order
    /// along its drafts (each accepted after its row's mask, all undone at
    /// the end), so row `i` gets the mask of the state after drafts `..i`.
    pub fn fill_token_masks(&mut self, vocab_size: usize) -> Result<(), EngineError> {
        let words = vocab_size.div_ceil(32);
        self.mask_words = words;
        self.token_masks.clear();
        self.token_masks.resize(self.sampler_slots.len() * words, 0);
        for &slot in &self.sampler_slots {
            let state = self.slot_ref(slot);
            if state.constraint.is_some() && state.pending > 1 {
                return Err(EngineError::Internal(format!(
                    "{:?}: a token mask is needed before its previous token is applied",
                    state.seq_id
                )));
            }
        }
        // A sequence's rows are consecutive (one row, or a verification's).
        // Their constraint is taken out of its state so that sequences fill
        // in parallel, then put back.
        let mut groups: Vec<(usize, usize)> = Vec::new(); // (slot, rows)
        for &slot in &self.sampler_slots {
            match groups.last_mut() {
                Some((last, rows)) if *last == slot => *rows += 1,
                _ => groups.push((slot, 1)),
            }
        }
        let slots = &mut self.slots;
        let mut work: Vec<MaskGroup<'_>> = Vec::with_capacity(groups.len());
        let (mut masks, mut drafts) = (&mut self.token_masks[..], &self.sampler_drafts[..]);
        for &(slot, rows) in &groups {
            let (group_masks, rest) = std::mem::take(&mut masks).split_at_mut(rows * words);
            let (group_drafts, rest_drafts) = drafts.split_at(rows);
            (masks, drafts) = (rest, rest_drafts);
            let constraint = slots[slot].as_mut().and_then(|state| state.constraint.take());
            work.push(MaskGroup { constraint, masks: group_masks, drafts: group_drafts });
        }
        work.par_iter_mut().for_each(|g| {
            if let Some(c) = g.constraint.as_mut() {
                fill_rows_along_drafts(c.as_mut(), g.masks, g.drafts, words);
            }
        });
        for (&(slot, _), g) in groups.iter().zip(work) {
            if let Some(state) = self.slots[slot].as_mut() {
                state.constraint = g.constraint;
            }
        }
        self.masks_filled = true;
        Ok(())
    }

    /// The tokens a decoding sequence's constraint forces next (at most
    /// `max`), when it has one and every token it sampled is applied.
    pub fn forced_tokens(&mut self, seq: SeqId, max: usize) -> Vec<TokenId> {
        let Some(&slot) = self.slot_of.get(&seq) else { return Vec::new() };
        let state = self.slot_mut(slot);
        match state.constraint.as_mut() {
            Some(c) if state.pending == 0 && max > 0 => {
                let mut forced = c.forced_tokens();
                forced.truncate(max);
                forced
            }
            _ => Vec::new(),
        }
    }

    /// Fills the staged step's `attn.block_tables` (`[num_seqs,
    /// max_blocks_per_seq]`, unused entries 0) from the sequences' rows: the
    /// one gather of a step that runs unpadded.
    pub fn gather_block_tables(&mut self) {
        let width = self.inputs.attn.max_blocks_per_seq;
        let tables = &mut self.inputs.attn.block_tables;
        tables.clear();
        tables.reserve(self.step_slots.len() * width);
        for &slot in &self.step_slots {
            let row: &[BlockId] = self.slots[slot].as_ref().map_or(&[], |s| &s.block_table);
            tables.extend(row.iter().map(|&b| b as i32));
            tables.resize(tables.len() + width.saturating_sub(row.len()), 0);
        }
    }

    /// Moves the staged attention metadata out (to hand it to an upload
    /// without copying it); give it back with [`Self::restore_attention`]
    /// so that its buffers serve the next step.
    pub fn take_attention(&mut self) -> AttentionHostMetadata {
        std::mem::take(&mut self.inputs.attn)
    }

    pub fn restore_attention(&mut self, attn: AttentionHostMetadata) {
        self.inputs.attn = attn;
    }

    /// Each sampling row of the staged step: its parameters, seed stream,
    /// counter, and token history.
    pub fn sampling_rows(&self) -> Vec<SamplingRow<'_>> {
        self.sampler_slots
            .iter()
            .zip(&self.sampler_steps)
            .enumerate()
            .map(|(row, (&slot, &step))| {
                let s = self.slot_ref(slot);
                let masks = (self.masks_filled && s.constraint.is_some()).then_some(&self.token_masks[..]);
                let output_tokens = match self.sampler_histories[row] {
                    Some((history, len)) => &self.draft_histories[history][..len],
                    None => &s.output,
                };
                SamplingRow {
                    params: &s.request.params,
                    seed: s.seed,
                    step,
                    prompt_tokens: &s.request.prompt,
                    output_tokens,
                    allowed_tokens: masks.map(|m| &m[row * self.mask_words..(row + 1) * self.mask_words]),
                }
            })
            .collect()
    }

    /// Appends a step's sampled tokens to the histories of its samplers
    /// (`samplers` from its [`PreparedStep`], one token each, in order).
    /// A verification's rows append the tokens it keeps: its samples up to
    /// the first that differs from its draft (`drafts`, per verifying
    /// sequence: the drafts of its entry), that one included. Returns, per
    /// verification, the sequence and how many drafts it accepted. Sequences
    /// that ended since are skipped.
    pub fn apply_sampled(
        &mut self,
        samplers: &[SampleTarget],
        tokens: &[SampledToken],
        drafts: &FxHashMap<SeqId, &[TokenId]>,
    ) -> Result<Verifications, EngineError> {
        if samplers.len() != tokens.len() {
            return Err(EngineError::Internal(format!(
                "{} tokens sampled for {} rows",
                tokens.len(),
                samplers.len()
            )));
        }
        let mut verified = Vec::new();
        let mut kept = Vec::new();
        let mut row = 0;
        while row < samplers.len() {
            let target = samplers[row];
            // The tokens this target keeps, and the rows it spans.
            kept.clear();
            let span = match target.verify {
                None => {
                    kept.push(tokens[row].token);
                    1
                }
                Some(v) => {
                    let rows = v.num_drafts + 1;
                    let entry_drafts = drafts.get(&target.seq_id).copied().unwrap_or(&[]);
                    if v.index != 0 || row + rows > samplers.len() || entry_drafts.len() != v.num_drafts {
                        return Err(EngineError::Internal(format!(
                            "{:?}: verification rows out of order, or {} drafts for {} rows",
                            target.seq_id,
                            entry_drafts.len(),
                            rows
                        )));
                    }
                    let samples: Vec<TokenId> = tokens[row..row + rows].iter().map(|t| t.token).collect();
                    let accepted = crate::speculative::accepted_prefix(entry_drafts, &samples);
                    kept.extend_from_slice(&samples[..=accepted]);
                    verified.push((target.seq_id, accepted));
                    rows
                }
            };
            row += span;
            if let Some(&slot) = self.slot_of.get(&target.seq_id) {
                let state = self.slot_mut(slot);
                state.output.extend_from_slice(&kept);
                state.pending = state.pending.saturating_sub(1);
                if let Some(c) = state.constraint.as_mut() {
                    for &token in &kept {
                        if let Err(e) = c.accept_token(token) {
                            // The mask allowed it, or should have: a bug, reported, not fatal to the batch.
                            tracing::error!(seq = ?target.seq_id, "structured output: {e}");
                        }
                    }
                }
            }
        }
        Ok(verified)
    }

    /// Forgets every sample launched and not applied (the steps in flight
    /// were dropped; their sequences recompute from their known tokens).
    pub fn discard_unapplied(&mut self) {
        self.step = None;
        for state in self.slots.iter_mut().flatten() {
            state.pending = 0;
        }
    }

    /// Applies an entry's table update, creating the sequence's state the
    /// first time it runs. Returns its slot.
    fn update_seq(&mut self, entry: &ScheduledSeq) -> Result<usize, EngineError> {
        let n = entry.token_ids.len();
        if n == 0 || entry.slot_mapping.len() != n {
            return Err(EngineError::Internal(format!(
                "scheduled {:?} with {n} tokens and {} slots",
                entry.seq_id,
                entry.slot_mapping.len()
            )));
        }
        let slot = match self.slot_of.get(&entry.seq_id) {
            Some(&slot) => slot,
            None => {
                // A request's first sequence; the others are forked from it.
                let request = self.requests.get(&entry.request_id).cloned().ok_or_else(|| {
                    EngineError::Internal(format!(
                        "{:?} of {} runs, but the runner was not given the request",
                        entry.seq_id, entry.request_id
                    ))
                })?;
                let seed = sample_seed(request.seed, 0);
                let table = self.spare_tables.pop().unwrap_or_default();
                let constraint = request.constraint.as_ref().map(|f| f.new_constraint());
                self.insert(SeqState {
                    seq_id: entry.seq_id,
                    request,
                    block_table: table,
                    sample_index: 0,
                    seed,
                    output: Vec::new(),
                    pending: 0,
                    last_sample_row: usize::MAX,
                    constraint,
                })
            }
        };
        let block_size = self.block_size;
        let state = self.slot_mut(slot);
        let held = state.block_table.len();
        if !entry.table_update.apply_to(&mut state.block_table) {
            return Err(EngineError::Internal(format!(
                "{:?}: the scheduler keeps {} block-table entries, the runner holds {held}",
                entry.seq_id, entry.table_update.keep
            )));
        }
        let table = &state.block_table;
        if table.len() * block_size < entry.seq_len() {
            return Err(EngineError::Internal(format!(
                "{:?}: {} blocks for {} tokens",
                entry.seq_id,
                table.len(),
                entry.seq_len()
            )));
        }
        debug_assert!(
            entry
                .positions()
                .zip(&entry.slot_mapping)
                .all(|(pos, &slot)| { pagoda_paged_kv::slot_of(table, block_size, pos) == Some(slot) }),
            "{:?}: the slot mapping disagrees with the runner's block table",
            entry.seq_id
        );
        Ok(slot)
    }

    /// Stages the prompt positions of an entry whose request asked for prompt
    /// logprobs, while its prompt is still being computed (not when it is
    /// recomputed after the first token: the logprobs were computed then).
    fn stage_prompt_logprobs(&mut self, entry: &ScheduledSeq, slot: usize) {
        if self.prompt_logprobs.is_empty() {
            return;
        }
        let Some(&top_k) = self.prompt_logprobs.get(&entry.request_id) else { return };
        let state = self.slot_ref(slot);
        if state.sample_index != 0 || !state.output.is_empty() || state.pending != 0 {
            return;
        }
        let request = state.request.clone();
        let prompt = &request.prompt;
        // Position p's logits predict prompt token p + 1.
        let first = entry.start_position;
        let end = (entry.start_position + entry.token_ids.len()).min(prompt.len().saturating_sub(1));
        if first >= end {
            return;
        }
        let first_row = (self.inputs.token_ids.len() - entry.token_ids.len()) as i32;
        self.inputs.prompt_targets.extend_from_slice(&prompt[first + 1..end + 1]);
        self.prompt_rows.extend((0..(end - first) as i32).map(|i| first_row + i));
        self.inputs.prompt_logprobs.push(PromptLogprobRows {
            request_id: entry.request_id,
            first_position: first,
            num_rows: end - first,
            top_k,
        });
    }

    /// Stages the `k + 1` sampling rows of an entry that verifies `k` draft
    /// tokens: row `i` samples after the sequence and drafts `..i`, with the
    /// counter its token has without speculation, and (when its parameters
    /// read the history) a history that ends with those drafts.
    fn stage_verification(&mut self, entry: &ScheduledSeq, slot: usize) -> Result<(), EngineError> {
        let k = entry.num_draft_tokens;
        if entry.sample_for.as_slice() != [entry.seq_id] || k + 1 > entry.token_ids.len() {
            return Err(EngineError::Internal(format!(
                "{:?} verifies {k} drafts but samples for {:?}",
                entry.seq_id, entry.sample_for
            )));
        }
        let first_row = self.inputs.token_ids.len() - (k + 1);
        let state = self.slot_mut(slot);
        let first_step = state.output.len() as u64 + state.pending;
        state.pending += 1;
        // Row `i` reads the outputs and drafts `..i`: prefixes of one history.
        let history = state.request.params.needs_history().then(|| {
            let mut history = state.output.clone();
            history.extend_from_slice(entry.draft_token_ids());
            (history, state.output.len())
        });
        let history_index = history.map(|(history, outputs)| {
            self.draft_histories.push(history);
            (self.draft_histories.len() - 1, outputs)
        });
        for i in 0..=k {
            let row = self.inputs.samplers.len();
            self.slot_mut(slot).last_sample_row = row;
            self.inputs.logits_indices.push((first_row + i) as i32);
            self.inputs.samplers.push(SampleTarget {
                seq_id: entry.seq_id,
                entry_seq_id: entry.seq_id,
                fork_index: 0,
                verify: Some(VerifyRow { index: i, num_drafts: k }),
            });
            self.sampler_slots.push(slot);
            self.sampler_steps.push(first_step + i as u64);
            self.sampler_histories.push(history_index.map(|(h, outputs)| (h, outputs + i)));
            self.sampler_drafts.push(entry.draft_token_ids().get(i).copied());
        }
        Ok(())
    }

    /// Stages the sampling rows of an entry (forking the samples it lists
    /// after its own sequence).
    fn stage_samplers(&mut self, entry: &ScheduledSeq, slot: usize) -> Result<(), EngineError> {
        if entry.num_draft_tokens > 0 {
            return self.stage_verification(entry, slot);
        }
        let last_row = (self.inputs.token_ids.len() - 1) as i32;
        for (fork_index, &seq_id) in entry.sample_for.iter().enumerate() {
            let target = match fork_index {
                0 if seq_id == entry.seq_id => slot,
                0 => {
                    return Err(EngineError::Internal(format!(
                        "{:?} samples first for {:?}",
                        seq_id, entry.seq_id
                    )))
                }
                _ => self.fork(slot, seq_id, fork_index),
            };
            let row = self.inputs.samplers.len();
            let state = self.slot_mut(target);
            let step = state.output.len() as u64 + state.pending;
            state.pending += 1;
            state.last_sample_row = row;
            self.inputs.logits_indices.push(last_row);
            self.inputs.samplers.push(SampleTarget {
                seq_id,
                entry_seq_id: entry.seq_id,
                fork_index,
                verify: None,
            });
            self.sampler_slots.push(target);
            self.sampler_steps.push(step);
            self.sampler_histories.push(None);
            self.sampler_drafts.push(None);
        }
        Ok(())
    }

    /// Creates sample `child` of the sequence in `parent` (the request forks
    /// at this step): a copy of the parent's block table, as updated for this
    /// step, and its history; its own seed stream. A state left from an
    /// earlier attempt at the same fork (dropped with its step) is replaced.
    fn fork(&mut self, parent: usize, child: SeqId, fork_index: usize) -> usize {
        self.remove(child);
        let mut table = self.spare_tables.pop().unwrap_or_default();
        let p = self.slot_ref(parent);
        table.extend_from_slice(&p.block_table);
        let sample_index = p.sample_index + fork_index;
        let state = SeqState {
            seq_id: child,
            request: p.request.clone(),
            block_table: table,
            sample_index,
            seed: sample_seed(p.request.seed, sample_index),
            output: p.output.clone(),
            pending: 0,
            last_sample_row: usize::MAX,
            constraint: p.constraint.as_ref().map(|c| c.boxed_clone()),
        };
        self.insert(state)
    }

    fn insert(&mut self, state: SeqState) -> usize {
        let seq = state.seq_id;
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot] = Some(state);
                slot
            }
            None => {
                self.slots.push(Some(state));
                self.slots.len() - 1
            }
        };
        self.slot_of.insert(seq, slot);
        slot
    }

    fn remove(&mut self, seq: SeqId) {
        let Some(slot) = self.slot_of.remove(&seq) else { return };
        if let Some(mut state) = self.slots[slot].take() {
            state.block_table.clear();
            self.spare_tables.push(state.block_table);
        }
        self.free_slots.push(slot);
    }

    fn state(&self, seq: SeqId) -> Option<&SeqState> {
        self.slot_of.get(&seq).and_then(|&slot| self.slots[slot].as_ref())
    }

    fn slot_ref(&self, slot: usize) -> &SeqState {
        self.slots[slot].as_ref().expect("a slot listed for a live sequence holds its state")
    }

    fn slot_mut(&mut self, slot: usize) -> &mut SeqState {
        self.slots[slot].as_mut().expect("a slot listed for a live sequence holds its state")
    }
}

impl BlockTableSource for PersistentBatch {
    /// The table of the staged step's `row`-th sequence.
    fn row_table(&self, row: usize) -> &[BlockId] {
        &self.slot_ref(self.step_slots[row]).block_table
    }
}

/// One sequence's sampling rows while their masks are filled: its
/// constraint (taken out of its state), their masks, and the draft after each.
struct MaskGroup<'a> {
    constraint: Option<Box<dyn TokenConstraint>>,
    masks: &'a mut [u32],
    drafts: &'a [Option<TokenId>],
}

/// One sequence's rows of masks (`words` each): row `i` after accepting
/// `drafts[..i]`, which are undone at the end. A draft the constraint refuses
/// (a proposer's bug) ends the walk: the rows after it copy its row's mask,
/// and their samples are discarded anyway (the draft cannot be accepted).
fn fill_rows_along_drafts(
    c: &mut dyn TokenConstraint,
    masks: &mut [u32],
    drafts: &[Option<TokenId>],
    words: usize,
) {
    let rows = drafts.len();
    let mut accepted = 0;
    let mut row = 0;
    while row < rows {
        c.fill_mask(&mut masks[row * words..(row + 1) * words]);
        row += 1;
        let Some(draft) = drafts[row - 1] else { continue };
        if row == rows {
            break;
        }
        if let Err(e) = c.accept_token(draft) {
            tracing::error!("a draft the constraint refuses: {e}");
            let (done, rest) = masks.split_at_mut(row * words);
            for next in rest.chunks_exact_mut(words) {
                next.copy_from_slice(&done[(row - 1) * words..]);
            }
            break;
        }
        accepted += 1;
    }
    if let Err(e) = c.rollback(accepted) {
        tracing::error!("undoing a verification's drafts in its constraint: {e}");
    }
}

#[cfg(test)]
mod tests {
    use pagoda_paged_kv::{PagedAllocator, PagedConfig};
    use pagoda_scheduler::{
        BlockTableUpdate, KvAllocator, NewRequest, PreemptionMode, Scheduler, SchedulerConfig,
    };
    use proptest::prelude::*;

    use super::*;

    fn entry(
        seq: u64,
        request: u64,
        tokens: Vec<u32>,
        start: usize,
        update: BlockTableUpdate,
    ) -> ScheduledSeq {
        let n = tokens.len();
        ScheduledSeq {
            seq_id: SeqId(seq),
            request_id: RequestId(request),
            token_ids: tokens,
            start_position: start,
            table_update: update,
            slot_mapping: vec![0; n],
            sample_for: vec![SeqId(seq)],
            token_from_previous_step: false,
            num_draft_tokens: 0,
        }
    }

    fn update(keep: usize, append: &[BlockId]) -> BlockTableUpdate {
        BlockTableUpdate { keep, append: append.to_vec() }
    }

    /// A batch of block size 4 that knows request 1 (prompt [1, 2, 3, 4, 5]).
    fn batch_with_request(params: SamplingParams) -> PersistentBatch {
        let mut b = PersistentBatch::new(4);
        b.add_request(RequestId(1), &[1, 2, 3, 4, 5], Arc::new(params), 77, None, None);
        b
    }

    /// Fixes the slot mapping of every entry from the tables the batch will hold.
    fn with_slots(mut out: SchedulerOutput, tables: &[(u64, &[BlockId])]) -> SchedulerOutput {
        for e in &mut out.scheduled {
            let table = tables.iter().find(|t| t.0 == e.seq_id.0).unwrap().1;
            e.slot_mapping = e.positions().map(|p| pagoda_paged_kv::slot_of(table, 4, p).unwrap()).collect();
        }
        out
    }

    #[test]
    fn tables_follow_the_updates_and_are_gathered_once_per_step() {
        let mut b = batch_with_request(SamplingParams::default());
        b.add_request(RequestId(2), &[9], Arc::new(SamplingParams::default()), 5, None, None);
        let prefill = SchedulerOutput {
            step: 1,
            scheduled: vec![
                entry(0, 1, vec![1, 2, 3, 4, 5], 0, update(0, &[7, 3])),
                entry(1, 2, vec![9], 0, update(0, &[4])),
            ],
            num_decodes: 1,
            ..Default::default()
        };
        let prefill = with_slots(prefill, &[(0, &[7, 3]), (1, &[4])]);
        let step = b.prepare(&prefill, &[]).unwrap();
        assert!(step.schedule_ahead);
        assert_eq!(step.samplers.iter().map(|t| t.seq_id).collect::<Vec<_>>(), vec![SeqId(0), SeqId(1)]);
        assert_eq!(b.inputs().positions, vec![0, 1, 2, 3, 4, 0]);
        assert_eq!(b.inputs().attn.query_start_loc, vec![0, 5, 6]);
        assert_eq!(b.inputs().attn.max_blocks_per_seq, 2);
        b.gather_block_tables();
        assert_eq!(b.inputs().attn.block_tables, vec![7, 3, 4, 0]);
        assert_eq!(b.row_table(1), &[4]);

        // Sequence 0 replaces its last block (copy-on-write) and grows; 1 is unchanged.
        let decode = SchedulerOutput {
            step: 2,
            scheduled: vec![
                entry(0, 1, vec![6], 5, update(1, &[8])),
                entry(1, 2, vec![10], 1, update(1, &[])),
            ],
            num_decodes: 2,
            ..Default::default()
        };
        let decode = with_slots(decode, &[(0, &[7, 8]), (1, &[4])]);
        b.prepare(&decode, &[]).unwrap();
        assert_eq!(b.block_table(SeqId(0)), Some(&[7, 8][..]));
        b.gather_block_tables();
        assert_eq!(b.inputs().attn.block_tables, vec![7, 8, 4, 0]);

        // Preempted, then back with a new table; ended sequences and requests are dropped.
        let preempt = SchedulerOutput { step: 3, preempted: vec![SeqId(0)], ..Default::default() };
        b.prepare(&preempt, &[]).unwrap();
        assert_eq!(b.block_table(SeqId(0)), Some(&[][..]));
        let stale = SchedulerOutput {
            step: 4,
            scheduled: vec![entry(0, 1, vec![1, 2, 3, 4, 5, 6], 0, update(1, &[2]))],
            ..Default::default()
        };
        assert!(b.prepare(&stale, &[]).is_err(), "keeps entries the runner no longer holds");
        let ended = SchedulerOutput {
            step: 5,
            finished_seqs: vec![SeqId(1)],
            finished_requests: vec![RequestId(2)],
            ..Default::default()
        };
        b.prepare(&ended, &[]).unwrap();
        assert_eq!((b.num_seqs(), b.num_requests()), (1, 1));
        assert_eq!(b.block_table(SeqId(1)), None);
        // Its row is reused by the next sequence.
        assert_eq!(b.spare_tables.len(), 1);
    }

    /// A verification of k drafts attends as k + 1 one-token rows over the
    /// sequence's table, each seeing the context up to its own position, so
    /// that a step of decodes and verifications is a decode step (graphable).
    #[test]
    fn a_verification_attends_as_one_row_per_position() {
        let mut b = batch_with_request(SamplingParams::default());
        b.add_request(RequestId(2), &[9], Arc::new(SamplingParams::default()), 5, None, None);
        let prefill = SchedulerOutput {
            step: 1,
            scheduled: vec![
                entry(1, 2, vec![9], 0, update(0, &[4])),
                entry(0, 1, vec![1, 2, 3, 4, 5], 0, update(0, &[7, 3])),
            ],
            num_decodes: 1,
            ..Default::default()
        };
        let prefill = with_slots(prefill, &[(0, &[7, 3]), (1, &[4])]);
        b.prepare(&prefill, &[]).unwrap();
        assert_eq!(b.inputs().attn.num_decode_seqs, 1, "a prompt chunk is one sequence of 5 rows");
        b.apply_sampled(&b.inputs().samplers.clone(), &sampled(&[10, 6]), &FxHashMap::default()).unwrap();

        // Sequence 1 decodes; sequence 0 verifies drafts [11, 12] after its token 6.
        let mut verify = entry(0, 1, vec![6, 11, 12], 5, update(2, &[]));
        verify.num_draft_tokens = 2;
        let step = SchedulerOutput {
            step: 2,
            scheduled: vec![entry(1, 2, vec![10], 1, update(1, &[])), verify],
            num_decodes: 1,
            ..Default::default()
        };
        let step = with_slots(step, &[(0, &[7, 3]), (1, &[4])]);
        b.prepare(&step, &[]).unwrap();
        let inputs = b.inputs();
        assert_eq!(inputs.positions, vec![1, 5, 6, 7]);
        assert_eq!(inputs.attn.query_start_loc, vec![0, 1, 2, 3, 4]);
        assert_eq!(inputs.attn.seq_lens, vec![2, 6, 7, 8]);
        assert_eq!(inputs.attn.num_decode_seqs, 4);
        assert_eq!(inputs.logits_indices, vec![0, 1, 2, 3]);
        assert!(crate::graphs::is_graphable(inputs));
        for row in 1..4 {
            assert_eq!(b.row_table(row), &[7, 3]);
        }
        b.gather_block_tables();
        assert_eq!(b.inputs().attn.block_tables, vec![4, 0, 7, 3, 7, 3, 7, 3]);
        b.inputs().attn.validate().unwrap();
    }

    fn sampled(tokens: &[u32]) -> Vec<SampledToken> {
        tokens.iter().map(|&token| SampledToken { token, logprob: 0.0, top_logprobs: Vec::new() }).collect()
    }

    #[test]
    fn a_sequence_of_an_unknown_request_is_an_error() {
        let mut b = batch_with_request(SamplingParams::default());
        let out = SchedulerOutput {
            step: 1,
            scheduled: vec![entry(0, 9, vec![1], 0, update(0, &[1]))],
            ..Default::default()
        };
        assert!(b.prepare(&with_slots(out, &[(0, &[1])]), &[]).is_err());
        assert_eq!(b.prepared_step(), None);
    }

    #[test]
    fn forks_take_the_parents_table_and_their_own_seed_stream() {
        let params = SamplingParams { temperature: 1.0, ..Default::default() };
        let mut b = batch_with_request(params);
        let mut prefill = entry(0, 1, vec![1, 2, 3, 4, 5], 0, update(0, &[7, 3]));
        prefill.sample_for = vec![SeqId(0), SeqId(1), SeqId(2)];
        let out = with_slots(
            SchedulerOutput { step: 1, scheduled: vec![prefill], ..Default::default() },
            &[(0, &[7, 3])],
        );
        let step = b.prepare(&out, &[]).unwrap();
        assert_eq!(b.inputs().logits_indices, vec![4, 4, 4], "every sample reads the prompt's last row");
        let rows = b.sampling_rows();
        let seeds: Vec<u64> = rows.iter().map(|r| r.seed).collect();
        assert_eq!(seeds, vec![77, sample_seed(77, 1), sample_seed(77, 2)]);
        assert!(rows.iter().all(|r| r.step == 0 && r.prompt_tokens == [1, 2, 3, 4, 5]));
        drop(rows);
        for child in [1, 2] {
            assert_eq!(b.block_table(SeqId(child)), Some(&[7, 3][..]));
        }
        let tokens: Vec<SampledToken> =
            [20, 21, 22].map(|token| SampledToken { token, logprob: 0.0, top_logprobs: vec![] }).into();
        b.apply_sampled(&step.samplers, &tokens, &FxHashMap::default()).unwrap();
        assert_eq!(b.output_tokens(SeqId(2)), Some(&[22][..]));

        // The next decode of sample 1: its copy replaced, its counter at 1.
        let decode = with_slots(
            SchedulerOutput {
                step: 2,
                scheduled: vec![entry(1, 1, vec![21], 5, update(1, &[9]))],
                num_decodes: 1,
                ..Default::default()
            },
            &[(1, &[7, 9])],
        );
        b.prepare(&decode, &step.samplers).unwrap();
        let rows = b.sampling_rows();
        assert_eq!((rows[0].seed, rows[0].step, rows[0].output_tokens), (sample_seed(77, 1), 1, &[21][..]));
        assert_eq!(b.block_table(SeqId(0)), Some(&[7, 3][..]), "the parent keeps its own");
    }

    #[test]
    fn a_token_from_the_step_in_flight_is_fed_and_counted() {
        let params = SamplingParams { temperature: 1.0, ..Default::default() };
        let mut b = batch_with_request(params);
        let first = with_slots(
            SchedulerOutput {
                step: 1,
                scheduled: vec![entry(0, 1, vec![1, 2, 3, 4, 5], 0, update(0, &[7, 3]))],
                ..Default::default()
            },
            &[(0, &[7, 3])],
        );
        let running = b.prepare(&first, &[]).unwrap();
        // Step 2 is prepared before step 1's token is known.
        let mut ahead = entry(0, 1, vec![0], 5, update(2, &[]));
        ahead.token_from_previous_step = true;
        let ahead = with_slots(
            SchedulerOutput { step: 2, scheduled: vec![ahead], num_decodes: 1, ..Default::default() },
            &[(0, &[7, 3])],
        );
        assert!(b.prepare(&ahead, &[]).is_err(), "no step in flight samples its input");
        b.discard_unapplied();
        let running = b.prepare(&first, &[]).map(|_| running).unwrap();
        b.prepare(&ahead, &running.samplers).unwrap();
        assert_eq!(b.inputs().source_rows, vec![0]);
        assert_eq!(b.sampling_rows()[0].step, 1, "one token sampled before, not yet applied");
        let token = |token| SampledToken { token, logprob: 0.0, top_logprobs: vec![] };
        b.apply_sampled(&running.samplers, &[token(40)], &FxHashMap::default()).unwrap();
        assert_eq!(b.output_tokens(SeqId(0)), Some(&[40][..]));
        assert!(b.apply_sampled(&running.samplers, &[], &FxHashMap::default()).is_err(), "one token per row");
        // A dropped step: its sample is forgotten.
        b.discard_unapplied();
        assert_eq!(b.slot_ref(0).pending, 0);
    }

    #[test]
    fn penalties_keep_the_next_step_from_being_scheduled_ahead() {
        let mut b = batch_with_request(SamplingParams { repetition_penalty: 1.2, ..Default::default() });
        let out = with_slots(
            SchedulerOutput {
                step: 1,
                scheduled: vec![entry(0, 1, vec![1, 2, 3, 4, 5], 0, update(0, &[7, 3]))],
                ..Default::default()
            },
            &[(0, &[7, 3])],
        );
        assert!(!b.prepare(&out, &[]).unwrap().schedule_ahead);
    }

    // ---- against a real scheduler ------------------------------------------------

    #[derive(Clone, Debug)]
    enum Op {
        Add { prompt_len: usize, max_tokens: usize, n: usize, penalties: bool, seed: Option<u64> },
        Step { seed: u64 },
        Abort { pick: usize },
        FinishSeq { pick: usize },
        DeviceFailure,
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1usize..20, 1usize..10, prop::sample::select(vec![1usize, 1, 2, 3]), prop::bool::weighted(0.2), prop::option::of(0u64..4))
                .prop_map(|(prompt_len, max_tokens, n, penalties, seed)| Op::Add { prompt_len, max_tokens, n, penalties, seed }),
            8 => any::<u64>().prop_map(|seed| Op::Step { seed }),
            1 => any::<usize>().prop_map(|pick| Op::Abort { pick }),
            1 => any::<usize>().prop_map(|pick| Op::FinishSeq { pick }),
            1 => Just(Op::DeviceFailure),
        ]
    }

    /// A step "on the device": its output, who samples, what they sampled.
    struct Launched {
        out: SchedulerOutput,
        step: PreparedStep,
        tokens: Vec<SampledToken>,
    }

    /// The engine's loop around a real scheduler and the batch, with no model.
    struct Engine {
        s: Scheduler<PagedAllocator>,
        b: PersistentBatch,
        seeds: FxHashMap<RequestId, u64>,
        next: u64,
        in_flight: Option<Launched>,
    }

    impl Engine {
        fn step(&mut self, seed: u64) -> Result<(), TestCaseError> {
            let must_apply = self.in_flight.as_ref().is_some_and(|f| !f.step.schedule_ahead);
            if must_apply || !self.s.can_schedule() {
                self.apply_in_flight()?;
            }
            let out = self.s.schedule().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let previous = self.in_flight.as_ref().map_or(&[][..], |f| &f.step.samplers[..]);
            let step = self.b.prepare(&out, previous).map_err(|e| TestCaseError::fail(e.to_string()))?;
            self.check_against_scheduler(&out, &step)?;
            let mut rng = seed | 1;
            let tokens = step
                .samplers
                .iter()
                .map(|_| {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    SampledToken { token: ((rng >> 33) % 7) as u32, logprob: 0.0, top_logprobs: vec![] }
                })
                .collect();
            let launched = Launched { out, step, tokens };
            self.apply_in_flight()?;
            if !launched.out.is_empty() {
                self.in_flight = Some(launched);
            }
            if !self.s.config().async_scheduling {
                self.apply_in_flight()?;
            }
            Ok(())
        }

        fn apply_in_flight(&mut self) -> Result<(), TestCaseError> {
            let Some(f) = self.in_flight.take() else { return Ok(()) };
            self.b
                .apply_sampled(&f.step.samplers, &f.tokens, &FxHashMap::default())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let pairs: Vec<(SeqId, TokenId)> =
                f.step.samplers.iter().zip(&f.tokens).map(|(t, s)| (t.seq_id, s.token)).collect();
            self.s.update_from_output(&f.out, &pairs).map_err(|e| TestCaseError::fail(e.to_string()))?;
            Ok(())
        }

        /// The rows and tables the batch staged are what the engine built
        /// from the scheduler's internals before the batch existed.
        fn check_against_scheduler(
            &mut self,
            out: &SchedulerOutput,
            step: &PreparedStep,
        ) -> Result<(), TestCaseError> {
            for e in &out.scheduled {
                let real = self.s.allocator().block_table(e.seq_id).unwrap();
                prop_assert_eq!(self.b.block_table(e.seq_id).unwrap(), real);
            }
            self.b.gather_block_tables();
            let attn = &self.b.inputs().attn;
            for (i, e) in out.scheduled.iter().enumerate() {
                let real = self.s.allocator().block_table(e.seq_id).unwrap();
                let row = &attn.block_tables[i * attn.max_blocks_per_seq..][..attn.max_blocks_per_seq];
                prop_assert!(row.iter().zip(real).all(|(&a, &b)| a as u32 == b));
                prop_assert!(row[real.len()..].iter().all(|&b| b == 0));
            }
            let rows = self.b.sampling_rows();
            prop_assert_eq!(rows.len(), step.samplers.len());
            for (target, row) in step.samplers.iter().zip(&rows) {
                // As the engine's `sampling_rows` computed them.
                let (seq, own) = match self.s.seq(target.seq_id) {
                    Some(seq) => (seq, true),
                    None => (self.s.seq(target.entry_seq_id).unwrap(), false),
                };
                let index = if own { seq.sample_index() } else { target.fork_index };
                let output = if own { seq.output_token_ids() } else { &[] };
                let earlier = if own { output.len() + seq.num_awaited_tokens().saturating_sub(1) } else { 0 };
                let seed = sample_seed(self.seeds[&seq.request_id()], index);
                prop_assert_eq!(row.seed, seed, "seed of {}", target.seq_id);
                prop_assert_eq!(row.step, earlier as u64, "counter of {}", target.seq_id);
                prop_assert_eq!(row.prompt_tokens, seq.prompt_token_ids());
                prop_assert_eq!(row.output_tokens, output, "history of {}", target.seq_id);
            }
            Ok(())
        }

        fn live_request(&self, pick: usize) -> Option<RequestId> {
            let mut live: Vec<RequestId> =
                self.seeds.keys().copied().filter(|&r| !self.s.request_seqs(r).is_empty()).collect();
            live.sort();
            (!live.is_empty()).then(|| live[pick % live.len()])
        }

        fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
            match *op {
                Op::Add { prompt_len, max_tokens, n, penalties, seed } => {
                    let id = RequestId(self.next);
                    let prompt: Vec<u32> = (0..prompt_len as u32).map(|t| 10 + t % 5).collect();
                    let r = NewRequest { n, ..NewRequest::new(id, prompt.clone(), max_tokens) };
                    if self.s.add_request(r).is_ok() {
                        self.next += 1;
                        let params = SamplingParams {
                            temperature: 1.0,
                            repetition_penalty: if penalties { 1.1 } else { 1.0 },
                            ..Default::default()
                        };
                        let seed = seed.unwrap_or(1000 + id.0);
                        self.b.add_request(id, &prompt, Arc::new(params), seed, None, None);
                        self.seeds.insert(id, seed);
                    }
                }
                Op::Step { seed } => self.step(seed)?,
                Op::Abort { pick } => {
                    if let Some(r) = self.live_request(pick) {
                        self.s.abort_request(r);
                    }
                }
                Op::FinishSeq { pick } => {
                    if let Some(r) = self.live_request(pick) {
                        let seqs = self.s.request_seqs(r).to_vec();
                        let seq = seqs[pick % seqs.len()];
                        if !self.s.seq(seq).unwrap().output_token_ids().is_empty() {
                            self.s.finish_seq(seq);
                        }
                    }
                }
                Op::DeviceFailure => {
                    self.in_flight = None;
                    self.s.discard_unapplied();
                    self.b.discard_unapplied();
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Driven by a real scheduler (preemption of both kinds, prefix
        /// caching, `n > 1` forks, asynchronous scheduling, aborts, device
        /// failures), the batch's tables equal the allocator's and its
        /// sampling rows (seed, counter, history) equal what the engine
        /// computed from the scheduler's internals, at every step; and once
        /// every request has ended it holds nothing.
        #[test]
        fn the_batch_mirrors_the_scheduler(
            (block_size, blocks, cpu, caching, swap, async_scheduling) in
                (prop::sample::select(vec![1usize, 2, 4]), 8usize..40, 0usize..16, any::<bool>(), any::<bool>(), any::<bool>()),
            ops in prop::collection::vec(op_strategy(), 1..100),
        ) {
            let kv = PagedAllocator::new(PagedConfig {
                num_gpu_blocks: blocks,
                num_cpu_blocks: cpu,
                block_size,
                enable_prefix_caching: caching,
            }).unwrap();
            let config = SchedulerConfig {
                max_num_batched_tokens: 16,
                max_num_seqs: 6,
                max_model_len: 30.min(blocks * block_size),
                preemption_mode: if swap { PreemptionMode::Swap } else { PreemptionMode::Recompute },
                async_scheduling,
                ..SchedulerConfig::default()
            };
            let mut e = Engine {
                s: Scheduler::new(config, kv).unwrap(),
                b: PersistentBatch::new(block_size),
                seeds: FxHashMap::default(),
                next: 0,
                in_flight: None,
            };
            for op in &ops {
                e.apply(op)?;
            }
            let mut steps = 0;
            while e.s.has_unfinished() || e.in_flight.is_some() {
                steps += 1;
                prop_assert!(steps < 3000, "no progress");
                e.step(steps)?;
            }
            let out = e.s.schedule().unwrap();
            e.b.prepare(&out, &[]).unwrap();
            prop_assert_eq!((e.b.num_seqs(), e.b.num_requests()), (0, 0));
        }
    }
}
