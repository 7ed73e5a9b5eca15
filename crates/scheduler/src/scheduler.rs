//! The continuous-batching scheduler.

use std::collections::{BTreeSet, VecDeque};

use pagoda_paged_kv::{
    slot_of, AllocError, BlockId, InvariantViolation, KvAllocator, KvUsage, PrefixCacheStats, PrefixHit,
    SeqId, SeqStart, TokenId,
};
use rustc_hash::FxHashMap;

use crate::config::{PartialPrefillLimits, PreemptionMode, SchedulerConfig};
use crate::error::{AddRequestError, ConfigError, SchedulerError, UpdateError};
use crate::output::{BlockTableUpdate, ScheduledSeq, SchedulerOutput};
use crate::policy::{RankKey, RequestView, SchedulingPolicy};
use crate::request::{FinishReason, NewRequest, RequestId, SeqStatus, SeqUpdate, Sequence};

/// Cumulative counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub num_steps: u64,
    /// Preemptions of either kind.
    pub num_preemptions: u64,
    pub num_recompute_preemptions: u64,
    pub num_swap_preemptions: u64,
    pub num_requests_added: u64,
    /// Requests whose every sample has finished (including aborted ones).
    pub num_requests_finished: u64,
    pub num_requests_aborted: u64,
}

/// Per-request state shared by its samples.
#[derive(Clone, Debug)]
struct RequestState {
    max_tokens: usize,
    eos_token_ids: Vec<TokenId>,
    stop_token_ids: Vec<TokenId>,
    ignore_eos: bool,
    min_tokens: usize,
    /// Folded into its blocks' prefix-cache hashes: the salt and the LoRA adapter.
    extra_key: Option<u64>,
    /// [`NewRequest::lora`].
    lora: Option<u32>,
    /// [`NewRequest::skip_prefix_cache`].
    skip_prefix_cache: bool,
    group: FairnessGroup,
    /// Sequences of this request that exist and have not finished.
    live_seqs: Vec<SeqId>,
}

type QueueKey = (RankKey, SeqId);

/// Whose fair share of admission a request draws on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum FairnessGroup {
    Shared(u64),
    Alone(RequestId),
}

/// What became of a queued sequence offered a place in the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admission {
    Admitted,
    /// Not now, but sequences ranked after it may go (a long prompt held back
    /// by `max_long_partial_prefills`).
    PassOver,
    /// Not now, and nothing ranked after it either (no overtaking).
    Stop,
}

/// Partial prefills counted while a step is built, against their limits.
#[derive(Clone, Copy, Debug)]
struct PartialPrefills {
    limits: PartialPrefillLimits,
    partial: usize,
    long: usize,
}

/// Steps a queued sequence may wait for its LoRA adapter to get a slot
/// while sequences behind it keep joining the adapters already running; after
/// that none may, so the running adapters drain and it starts.
pub const LORA_FAIRNESS_STEPS: u64 = 32;

/// The LoRA adapters of the running sequences while a step admits queued
/// ones, against `max_loras`.
struct LoraAdmission {
    max: usize,
    active: rustc_hash::FxHashSet<u32>,
    /// A queued sequence has waited more than [`LORA_FAIRNESS_STEPS`] for a
    /// slot: no sequence after it starts with an adapter.
    drain: bool,
}

impl LoraAdmission {
    /// Whether a sequence of adapter `lora` may start: its adapter is running
    /// (unless the adapters must drain) or there is a slot for it.
    fn allows(&self, lora: Option<u32>) -> bool {
        let Some(lora) = lora else { return true };
        !self.drain && (self.active.contains(&lora) || self.active.len() < self.max)
    }
}

/// A scheduled step whose results are not applied yet.
#[derive(Clone, Copy, Debug)]
struct UnappliedStep {
    step: u64,
    /// A request forks at this step: nothing can be scheduled before it is
    /// applied (the samples do not exist until then).
    forks: bool,
    /// An entry verifies draft tokens: how many of them its sequence keeps
    /// is known only once the step is applied, so nothing can be scheduled
    /// before that.
    verifies_drafts: bool,
}

/// Iteration-level scheduler: each [`Scheduler::schedule`] call picks the
/// sequences of one model step under the token and sequence budgets, and
/// [`Scheduler::update_from_output`] feeds the sampled tokens back.
///
/// A step schedules, in order:
/// 1. running sequences that decode (one new token each), best-ranked first;
///    when a block is missing, the worst-ranked running sequence not yet
///    scheduled this step is preempted (possibly the one being scheduled);
/// 2. running sequences in the middle of a chunked prefill, with what is left
///    of the token budget. With concurrent partial prefills
///    (`max_num_partial_prefills > 1`, the default), when several prompts
///    compete (running prefills, plus a queued sequence that could start),
///    each running prefill takes at most its share of what the decodes left
///    (`1/k`, `k` = the competitors, at most `max_num_partial_prefills`) and a
///    long one (more tokens left than the long-prompt threshold) at most the
///    threshold: so a short prompt arriving while long ones prefill starts in
///    the next step and gets at least `1/max_num_partial_prefills` of the
///    step until its prompt is done, instead of waiting for them;
/// 3. unless step 1 or 2 preempted anything, swapped and waiting sequences
///    merged in rank order (so a preempted sequence resumes before anything
///    ranked after it), except that among waiting sequences of the same
///    policy class, those of a fairness group ([`NewRequest::fairness_group`])
///    holding fewer running sequences go first (FCFS within a group): one
///    client's fan-out never keeps another's request waiting for more than
///    the next free slot. Swapped ones are swapped in, waiting ones reuse their
///    longest cached prefix and prefill the rest, the last one chunked to fit.
///    The first one that does not fit stops the step (no overtaking), with
///    one exception under the partial-prefill limits: a prompt its chunk
///    would leave unfinished starts only while fewer than
///    `max_num_partial_prefills` prompts are unfinished, and a long one only
///    while fewer than `max_long_partial_prefills` long ones are (a prompt
///    that started long counts as long until its prefill ends); a long one
///    held back by that is passed over, so shorter prompts behind it go first.
pub struct Scheduler<A: KvAllocator> {
    config: SchedulerConfig,
    kv: A,
    policy: Box<dyn SchedulingPolicy>,
    requests: FxHashMap<RequestId, RequestState>,
    seqs: FxHashMap<SeqId, Sequence>,
    waiting: BTreeSet<QueueKey>,
    running: BTreeSet<QueueKey>,
    swapped: BTreeSet<QueueKey>,
    /// Samples that running sequences will fork into when their prompts
    /// complete: they count against `max_num_seqs` already.
    pending_fork_slots: usize,
    /// The queued sequence waiting longest for a LoRA slot, and the step it
    /// was first refused one ([`LORA_FAIRNESS_STEPS`]).
    lora_waiter: Option<(SeqId, u64)>,
    next_seq_id: u64,
    next_arrival_index: u64,
    /// The last step handed out.
    step: u64,
    /// Steps handed out and not applied yet, oldest first (at most one
    /// between calls, two during an asynchronous `schedule`).
    unapplied: VecDeque<UnappliedStep>,
    /// Sequences and requests ended since the last step, for its output.
    finished_seqs: Vec<SeqId>,
    finished_requests: Vec<RequestId>,
    stats: SchedulerStats,
}

/// The cache slots of `positions` through a sequence's block table; an error
/// when the table is too short for them (a bug in the allocator or here).
fn slots_of(
    seq: SeqId,
    table: &[BlockId],
    block_size: usize,
    positions: std::ops::Range<usize>,
) -> Result<Vec<i64>, SchedulerError> {
    let end = positions.end;
    positions
        .map(|pos| slot_of(table, block_size, pos))
        .collect::<Option<Vec<i64>>>()
        .ok_or(SchedulerError::ShortBlockTable { seq, blocks: table.len(), tokens: end })
}

/// Whether an allocation for `seq` succeeded. Running out of memory is a
/// plain `false` (the sequence waits for a later step); any other refusal is
/// a bug (in the allocator or here), reported as an error.
fn allocated(result: Result<(), AllocError>, seq: SeqId) -> Result<bool, SchedulerError> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.is_out_of_memory() => Ok(false),
        Err(source) => Err(SchedulerError::Allocator { seq, source }),
    }
}

impl<A: KvAllocator> Scheduler<A> {
    /// A scheduler with the built-in policy named in `config`.
    pub fn new(config: SchedulerConfig, kv: A) -> Result<Self, ConfigError> {
        let policy = config.policy.build();
        Self::with_policy(config, kv, policy)
    }

    /// A scheduler with a custom policy (`config.policy` is ignored).
    pub fn with_policy(
        config: SchedulerConfig,
        kv: A,
        policy: Box<dyn SchedulingPolicy>,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            kv,
            policy,
            requests: FxHashMap::default(),
            seqs: FxHashMap::default(),
            waiting: BTreeSet::new(),
            running: BTreeSet::new(),
            swapped: BTreeSet::new(),
            pending_fork_slots: 0,
            lora_waiter: None,
            next_seq_id: 0,
            next_arrival_index: 0,
            step: 0,
            unapplied: VecDeque::new(),
            finished_seqs: Vec::new(),
            finished_requests: Vec::new(),
            stats: SchedulerStats::default(),
        })
    }

    // ---- requests in and out ------------------------------------------------

    /// Queues a request. Refuses (and queues nothing) a request that could
    /// never complete: empty or over-long prompt, or a sequence longer than
    /// the whole KV cache.
    pub fn add_request(&mut self, req: NewRequest) -> Result<(), AddRequestError> {
        let len = req.prompt_token_ids.len();
        let max_model_len = self.config.max_model_len;
        if len == 0 {
            return Err(AddRequestError::EmptyPrompt);
        }
        if len > max_model_len {
            return Err(AddRequestError::PromptTooLong { len, max_model_len });
        }
        if req.max_tokens == 0 {
            return Err(AddRequestError::ZeroMaxTokens);
        }
        if req.min_tokens > req.max_tokens {
            return Err(AddRequestError::MinTokensExceedsMax {
                min_tokens: req.min_tokens,
                max_tokens: req.max_tokens,
            });
        }
        if req.n == 0 {
            return Err(AddRequestError::ZeroSamples);
        }
        if req.n > self.config.max_num_seqs {
            return Err(AddRequestError::TooManySamples { n: req.n, max_num_seqs: self.config.max_num_seqs });
        }
        if self.requests.contains_key(&req.request_id) {
            return Err(AddRequestError::DuplicateRequest(req.request_id));
        }
        // A sample holds KV for at most prompt + max_tokens tokens, capped by
        // the model length; it must fit alone, or it could never finish.
        let max_total_tokens = len.saturating_add(req.max_tokens).min(max_model_len).max(len);
        if !self.kv.can_ever_fit(max_total_tokens) {
            return Err(AddRequestError::CannotFit {
                tokens: max_total_tokens,
                capacity_tokens: self.kv.num_gpu_blocks() * self.kv.block_size(),
            });
        }

        let view = RequestView {
            request_id: req.request_id,
            priority: req.priority,
            arrival: req.arrival,
            arrival_index: self.next_arrival_index,
            num_prompt_tokens: len,
            max_tokens: req.max_tokens,
            n: req.n,
        };
        self.next_arrival_index += 1;
        let rank = self.policy.rank(&view);
        let seq_id = self.new_seq_id();
        let pending_fork = (1..req.n).map(|_| self.new_seq_id()).collect();
        let seq = Sequence {
            seq_id,
            request_id: req.request_id,
            sample_index: 0,
            tokens: req.prompt_token_ids,
            num_prompt_tokens: len,
            num_computed_tokens: 0,
            num_awaited_tokens: 0,
            status: SeqStatus::Waiting,
            rank,
            pending_fork,
            max_total_tokens,
            scheduled_step: 0,
            num_blocks_sent: 0,
            long_prefill: false,
            draft_tokens: Vec::new(),
        };
        self.requests.insert(
            req.request_id,
            RequestState {
                max_tokens: req.max_tokens,
                eos_token_ids: req.eos_token_ids,
                stop_token_ids: req.stop_token_ids,
                ignore_eos: req.ignore_eos,
                min_tokens: req.min_tokens,
                extra_key: prefix_cache_extra_key(req.cache_salt, req.lora),
                lora: req.lora,
                skip_prefix_cache: req.skip_prefix_cache,
                group: req.fairness_group.map_or(FairnessGroup::Alone(req.request_id), FairnessGroup::Shared),
                live_seqs: vec![seq_id],
            },
        );
        self.waiting.insert((rank, seq_id));
        self.seqs.insert(seq_id, seq);
        self.stats.num_requests_added += 1;
        Ok(())
    }

    /// Aborts every sequence of a request, wherever it is, freeing its blocks
    /// at once. Returns the sequences aborted (empty if the request is unknown
    /// or already finished).
    pub fn abort_request(&mut self, request_id: RequestId) -> Vec<SeqId> {
        let Some(req) = self.requests.get(&request_id) else { return Vec::new() };
        let seqs = req.live_seqs.clone();
        for &s in &seqs {
            self.finish(s);
        }
        if !seqs.is_empty() {
            self.stats.num_requests_aborted += 1;
        }
        seqs
    }

    /// Ends one sequence for a reason found outside the scheduler (a stop
    /// string, a client cancelling one sample), freeing its blocks at once.
    /// Returns false if unknown. Ending a request's first sample before its
    /// prompt completes also drops the samples it was to fork into. The
    /// reason is the caller's to report; the scheduler only needs to know
    /// the sequence is over.
    pub fn finish_seq(&mut self, seq_id: SeqId) -> bool {
        if !self.seqs.contains_key(&seq_id) {
            return false;
        }
        self.finish(seq_id);
        true
    }

    // ---- one step ------------------------------------------------------------

    /// Picks the sequences of the next step (see the type's docs for the
    /// rules). Execute it, then give it to [`Self::update_from_output`] before
    /// the next call; with `async_scheduling`, before the call after next
    /// (unless it forks: see [`Self::can_schedule`]). A step that scheduled
    /// nothing needs no update, but may still carry swap-outs to execute.
    pub fn schedule(&mut self) -> Result<SchedulerOutput, SchedulerError> {
        if !self.can_schedule() {
            let oldest = self.unapplied.front().map_or(self.step, |u| u.step);
            return Err(SchedulerError::StepNotApplied(oldest));
        }
        self.step += 1;
        self.stats.num_steps += 1;
        let mut out = SchedulerOutput {
            step: self.step,
            finished_seqs: std::mem::take(&mut self.finished_seqs),
            finished_requests: std::mem::take(&mut self.finished_requests),
            ..SchedulerOutput::default()
        };
        let mut budget = self.config.max_num_batched_tokens;
        let mut preempted = false;

        // Decodes first, in rank order; prefill chunks of running sequences
        // get what is left. Sequences preempted along the way (always ranked
        // after the one being scheduled) are skipped by the status check.
        let running: Vec<SeqId> = self.running.iter().map(|&(_, id)| id).collect();
        // Draft tokens take only what every later decode leaves: speculation
        // never keeps a plain decode out of the step.
        let mut decodes_after = running.iter().filter(|id| self.is_plain_decode(id)).count();
        let mut drafted: Vec<(usize, Vec<TokenId>)> = Vec::new();
        let mut prefills = Vec::new();
        for id in running {
            if self.batch_is_full(budget, &out) {
                break;
            }
            let seq = &self.seqs[&id];
            if seq.status != SeqStatus::Running || self.ends_with_awaited(seq) {
                continue;
            }
            if seq.num_tokens() - seq.num_computed_tokens > 1 {
                prefills.push(id);
                continue;
            }
            decodes_after = decodes_after.saturating_sub(1);
            let drafts = self.take_draft_tokens(id, budget.saturating_sub(1 + decodes_after));
            if self.schedule_running(id, 1, &mut out, &mut preempted)? {
                budget -= 1;
                if !drafts.is_empty() {
                    // Their budget is reserved now, their blocks taken last.
                    budget -= drafts.len();
                    drafted.push((out.scheduled.len() - 1, drafts));
                }
            }
        }
        // With concurrent partial prefills, the prompts that compete for this
        // step (running prefills and a queued one that could start) share what
        // the decodes left, and long ones are capped at the threshold (rule 2
        // in the type's docs).
        let limits = self.config.partial_prefill_limits();
        let (share, long_cap) = match limits {
            Some(l) => {
                let queued = !preempted && self.queued_prompt_can_start(l, &prefills);
                let competing = (prefills.len() + usize::from(queued)).min(l.max_partial);
                if competing > 1 {
                    ((budget / competing).max(1), l.long_threshold)
                } else {
                    (usize::MAX, usize::MAX)
                }
            }
            None => (usize::MAX, usize::MAX),
        };
        let long_threshold = limits.map_or(usize::MAX, |l| l.long_threshold);
        for &id in &prefills {
            if self.batch_is_full(budget, &out) {
                break;
            }
            let seq = &self.seqs[&id];
            if seq.status != SeqStatus::Running {
                continue;
            }
            let remaining = seq.num_tokens() - seq.num_computed_tokens;
            let cap = if remaining > long_threshold { share.min(long_cap) } else { share };
            let Some(n) = self.prefill_chunk(remaining, budget.min(cap)) else {
                continue;
            };
            if self.schedule_running(id, n, &mut out, &mut preempted)? {
                budget -= n;
            }
        }
        // After a preemption memory is tight: admitting more would only
        // preempt again (and swap-ins must not share a step with swap-outs,
        // whose CPU blocks they could reuse before they are read).
        if !preempted {
            let mut partials = limits.map(|l| self.count_partial_prefills(l, &prefills));
            self.schedule_queued(&mut out, &mut budget, partials.as_mut())?;
        }
        // Draft slots come from blocks nothing else in the step needed, so
        // speculation never preempts, nor keeps a prompt from starting;
        // drafts that do not fit are dropped and give their budget back.
        for (index, drafts) in drafted {
            if !self.attach_drafts(index, &drafts, &mut out)? {
                budget += drafts.len();
            }
        }

        if !out.scheduled.is_sorted_by_key(|s| s.token_ids.len() != 1) {
            out.scheduled.sort_by_key(|s| s.token_ids.len() != 1);
        }
        out.num_decodes = out.scheduled.iter().take_while(|s| s.token_ids.len() == 1).count();
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget;
        // A step that computes nothing samples nothing: there is nothing to apply.
        if !out.scheduled.is_empty() {
            let verifies_drafts = out.scheduled.iter().any(|e| e.num_draft_tokens > 0);
            self.unapplied.push_back(UnappliedStep { step: self.step, forks: out.forks(), verifies_drafts });
        }
        Ok(out)
    }

    /// Whether a running sequence computes one token in its next step.
    fn is_plain_decode(&self, id: &SeqId) -> bool {
        let seq = &self.seqs[id];
        seq.status == SeqStatus::Running
            && !self.ends_with_awaited(seq)
            && seq.num_tokens() - seq.num_computed_tokens <= 1
    }

    /// Whether [`Self::schedule`] may be called now: every step is applied,
    /// or, with `async_scheduling`, one is not and it does not fork.
    pub fn can_schedule(&self) -> bool {
        match self.unapplied.front() {
            None => true,
            Some(u) => {
                self.config.async_scheduling && self.unapplied.len() == 1 && !u.forks && !u.verifies_drafts
            }
        }
    }

    /// Whether a running sequence must wait for its awaited tokens before it
    /// can be scheduled again: two are outstanding, or the one outstanding
    /// ends it by length (computing past it would be wasted).
    fn ends_with_awaited(&self, seq: &Sequence) -> bool {
        match seq.num_awaited_tokens {
            0 => false,
            1 => {
                let max_tokens = self.requests.get(&seq.request_id).map_or(usize::MAX, |r| r.max_tokens);
                seq.num_tokens() - seq.num_prompt_tokens >= max_tokens
                    || seq.num_tokens() >= self.config.max_model_len
            }
            _ => true,
        }
    }

    /// Whether the step can take no more: no token budget left, or
    /// `max_num_seqs` sequences scheduled.
    fn batch_is_full(&self, budget: usize, out: &SchedulerOutput) -> bool {
        budget == 0 || out.scheduled.len() >= self.config.max_num_seqs
    }

    /// How many of `remaining` prompt tokens to prefill now, or `None` to skip.
    fn prefill_chunk(&self, remaining: usize, budget: usize) -> Option<usize> {
        if self.config.enable_chunked_prefill {
            let cap = self.config.long_prefill_token_threshold.unwrap_or(usize::MAX);
            Some(remaining.min(budget).min(cap)).filter(|&n| n > 0)
        } else {
            (remaining <= budget).then_some(remaining)
        }
    }

    /// The draft tokens proposed for a decoding sequence, taken (each
    /// proposal is used once), cut to what this step can verify: at most
    /// `budget` tokens, and never more than the request may still generate
    /// or the model length allows (one token always follows the accepted
    /// drafts). Empty while the sequence awaits a token.
    fn take_draft_tokens(&mut self, id: SeqId, budget: usize) -> Vec<TokenId> {
        let Some(seq) = self.seqs.get_mut(&id) else { return Vec::new() };
        let mut drafts = std::mem::take(&mut seq.draft_tokens);
        if seq.num_awaited_tokens > 0 || !seq.pending_fork.is_empty() {
            return Vec::new();
        }
        let max_tokens = self.requests.get(&seq.request_id).map_or(0, |r| r.max_tokens);
        let generated = seq.tokens.len() - seq.num_prompt_tokens;
        let by_length = max_tokens.saturating_sub(generated + 1);
        let by_context = self.config.max_model_len.saturating_sub(seq.tokens.len() + 1);
        drafts.truncate(budget.min(by_length).min(by_context));
        drafts
    }

    /// Allocates `n` slots for a running sequence, preempting worse-ranked
    /// sequences while blocks are missing. Returns false if the sequence
    /// itself was preempted.
    fn schedule_running(
        &mut self,
        id: SeqId,
        n: usize,
        out: &mut SchedulerOutput,
        preempted: &mut bool,
    ) -> Result<bool, SchedulerError> {
        loop {
            let seq = &self.seqs[&id];
            let start = seq.num_computed_tokens;
            let copies = out.blocks_to_copy.len();
            // A decode whose input is the token the running step samples: its
            // slot is allocated now, its id told to the allocator at the update.
            let allocation = if start == seq.tokens.len() && n == 1 {
                self.kv.append_pending_slot(id, &mut out.blocks_to_copy)
            } else {
                self.kv.append_slots(id, &seq.tokens[start..start + n], &mut out.blocks_to_copy)
            };
            match allocation {
                Ok(()) => {
                    // A copy-on-write replaced the last block of the table
                    // (the one holding position `start - 1`), and no other.
                    if out.blocks_to_copy.len() > copies && start > 0 {
                        let replaced = (start - 1) / self.kv.block_size();
                        if let Some(seq) = self.seqs.get_mut(&id) {
                            seq.num_blocks_sent = seq.num_blocks_sent.min(replaced);
                        }
                    }
                    self.push_entry(id, n, out)?;
                    return Ok(true);
                }
                Err(e) if e.is_out_of_memory() => {
                    // `id` itself is a candidate, so a victim always exists.
                    let victim = self.pick_victim().unwrap_or(id);
                    self.preempt(victim, out)?;
                    *preempted = true;
                    if victim == id {
                        return Ok(false);
                    }
                }
                Err(source) => return Err(SchedulerError::Allocator { seq: id, source }),
            }
        }
    }

    /// The worst-ranked running sequence not scheduled in this step.
    fn pick_victim(&self) -> Option<SeqId> {
        self.running.iter().rev().map(|&(_, s)| s).find(|s| self.seqs[s].scheduled_step != self.step)
    }

    fn preempt(&mut self, victim: SeqId, out: &mut SchedulerOutput) -> Result<(), SchedulerError> {
        let Some(seq) = self.seqs.get_mut(&victim) else { return Ok(()) };
        let key = (seq.rank, victim);
        self.running.remove(&key);
        self.pending_fork_slots -= seq.pending_fork.len();
        // Swapped out or freed: it comes back with a new table.
        seq.num_blocks_sent = 0;
        out.preempted.push(victim);
        self.stats.num_preemptions += 1;
        if self.config.preemption_mode == PreemptionMode::Swap && seq.is_decoding() {
            match self.kv.swap_out(victim, &mut out.blocks_to_swap_out) {
                Ok(()) => {
                    seq.status = SeqStatus::Swapped;
                    self.swapped.insert(key);
                    self.stats.num_swap_preemptions += 1;
                    return Ok(());
                }
                Err(AllocError::OutOfCpuBlocks { .. }) => {} // recompute instead
                Err(source) => return Err(SchedulerError::Allocator { seq: victim, source }),
            }
        }
        self.kv.free(victim).map_err(|source| SchedulerError::Allocator { seq: victim, source })?;
        seq.num_computed_tokens = 0;
        seq.status = SeqStatus::Waiting;
        self.waiting.insert(key);
        self.stats.num_recompute_preemptions += 1;
        Ok(())
    }

    /// Whether a queued sequence could start this step under the
    /// partial-prefill limits: a swapped one, or the best-ranked waiting one
    /// that is not a long prompt held back by `max_long_partial_prefills`.
    /// (Cached prefixes are not looked up here: this only decides whether
    /// running prefills leave room.)
    fn queued_prompt_can_start(&self, limits: PartialPrefillLimits, running_prefills: &[SeqId]) -> bool {
        if !self.swapped.is_empty() {
            return true;
        }
        let long_running = running_prefills.iter().filter(|id| self.seqs[id].long_prefill).count();
        for &(_, id) in &self.waiting {
            let seq = &self.seqs[&id];
            if seq.num_awaited_tokens > 0 {
                return false; // it blocks the queue until its token is known
            }
            if seq.tokens.len() <= limits.long_threshold || long_running < limits.max_long {
                return true;
            }
        }
        false
    }

    /// Running sequences still in their prompt after this step's chunks
    /// (`prefills`: those that were in it before).
    fn count_partial_prefills(&self, limits: PartialPrefillLimits, prefills: &[SeqId]) -> PartialPrefills {
        let mut count = PartialPrefills { limits, partial: 0, long: 0 };
        for id in prefills {
            let seq = &self.seqs[id];
            let remaining = seq.num_tokens() - seq.num_computed_tokens;
            if seq.status == SeqStatus::Running && remaining > 1 {
                count.partial += 1;
                count.long += usize::from(seq.long_prefill);
            }
        }
        count
    }

    /// Swapped and waiting sequences, until one does not fit: swapped ones
    /// in rank order, merged with waiting ones in [`Self::admission_order`].
    /// Under the partial-prefill limits, a long prompt held back by
    /// `max_long_partial_prefills` is passed over instead.
    fn schedule_queued(
        &mut self,
        out: &mut SchedulerOutput,
        budget: &mut usize,
        mut partials: Option<&mut PartialPrefills>,
    ) -> Result<(), SchedulerError> {
        let order = self.admission_order();
        let mut waiting = order.iter().copied().peekable();
        let mut loras = self.config.max_loras.map(|max| LoraAdmission {
            max,
            active: self.running.iter().filter_map(|(_, id)| self.lora_of(*id)).collect(),
            drain: false,
        });
        // The sequence that has waited longest for a slot, while it waits.
        if self
            .lora_waiter
            .is_some_and(|(id, _)| self.seqs.get(&id).is_none_or(|s| s.status == SeqStatus::Running))
        {
            self.lora_waiter = None;
        }
        while !self.batch_is_full(*budget, out) {
            let next = match (self.swapped.first().copied(), waiting.peek().copied()) {
                (Some(s), Some(w)) if s < w => (s, true),
                (_, Some(w)) => (w, false),
                (Some(s), None) => (s, true),
                (None, None) => break,
            };
            let lora = self.lora_of(next.0 .1);
            if let Some(loras) = &mut loras {
                if !loras.allows(lora) {
                    if !loras.drain {
                        let (id, since) = *self.lora_waiter.get_or_insert((next.0 .1, self.step));
                        if id == next.0 .1 && self.step - since > LORA_FAIRNESS_STEPS {
                            loras.drain = true;
                        }
                    }
                    // Swapped sequences go in rank order: one that must wait stops them all.
                    if next.1 {
                        break;
                    }
                    waiting.next();
                    continue;
                }
            }
            let admission = match next {
                (key, true) => {
                    if self.try_swap_in(key, out, budget)? {
                        Admission::Admitted
                    } else {
                        Admission::Stop
                    }
                }
                (key, false) => {
                    waiting.next();
                    self.try_admit(key, out, budget, partials.as_deref_mut())?
                }
            };
            match admission {
                Admission::Admitted => {
                    if let (Some(loras), Some(lora)) = (&mut loras, lora) {
                        loras.active.insert(lora);
                    }
                }
                Admission::PassOver => {}
                Admission::Stop => break,
            }
        }
        Ok(())
    }

    /// The LoRA adapter of a sequence's request.
    pub(crate) fn lora_of(&self, id: SeqId) -> Option<u32> {
        self.requests.get(&self.seqs.get(&id)?.request_id)?.lora
    }

    /// The waiting sequences in the order they are offered a place: by the
    /// policy's class (the priority, under the priority policy), then by how
    /// many sequences their fairness group would hold once they start
    /// (running ones, samples still to fork, and those of the group queued
    /// before them), then by the group's size (running and queued: a small
    /// request goes before a fan-out that holds as few), then by rank. So a request's fan-out cannot keep another
    /// client's request waiting for more than the next free slot, and within
    /// a group the order is the policy's.
    fn admission_order(&self) -> Vec<QueueKey> {
        let group_of = |id: &SeqId| self.requests.get(&self.seqs[id].request_id).map(|r| r.group);
        let mut held: FxHashMap<Option<FairnessGroup>, usize> = FxHashMap::default();
        for (_, id) in &self.running {
            *held.entry(group_of(id)).or_default() += 1 + self.seqs[id].pending_fork.len();
        }
        let slots = |key: &QueueKey| 1 + self.seqs[&key.1].pending_fork.len();
        let mut size = held.clone();
        for key in &self.waiting {
            *size.entry(group_of(&key.1)).or_default() += slots(key);
        }
        let mut order: Vec<(i64, usize, usize, QueueKey)> = self
            .waiting
            .iter()
            .map(|&key| {
                let group = group_of(&key.1);
                let count = held.entry(group).or_default();
                let before = *count;
                *count += slots(&key);
                (key.0 .0, before, size[&group], key)
            })
            .collect();
        order.sort_unstable();
        order.into_iter().map(|(_, _, _, key)| key).collect()
    }

    fn try_swap_in(
        &mut self,
        key: QueueKey,
        out: &mut SchedulerOutput,
        budget: &mut usize,
    ) -> Result<bool, SchedulerError> {
        let id = key.1;
        let seq = &self.seqs[&id];
        let start = seq.num_computed_tokens;
        let n = seq.tokens.len() - start;
        // A sequence swapped out while a step sampled for it resumes once that token is known.
        if seq.num_awaited_tokens > 0
            || self.running.len() + self.pending_fork_slots >= self.config.max_num_seqs
            || n > *budget
        {
            return Ok(false);
        }
        if !allocated(self.kv.swap_in(id, &seq.tokens[start..], &mut out.blocks_to_swap_in), id)? {
            return Ok(false);
        }
        self.swapped.remove(&key);
        self.start_running(key, n, out, budget)
    }

    fn try_admit(
        &mut self,
        key: QueueKey,
        out: &mut SchedulerOutput,
        budget: &mut usize,
        partials: Option<&mut PartialPrefills>,
    ) -> Result<Admission, SchedulerError> {
        let id = key.1;
        let seq = &self.seqs[&id];
        // Reserve room for the samples this prompt will fork into. A sequence
        // preempted while a step sampled for it resumes once that token is known.
        let slots = self.running.len() + self.pending_fork_slots;
        if seq.num_awaited_tokens > 0 || slots + 1 + seq.pending_fork.len() > self.config.max_num_seqs {
            return Ok(Admission::Stop);
        }
        let request = self.requests.get(&seq.request_id);
        let salt = request.and_then(|r| r.extra_key);
        let prefix = if request.is_some_and(|r| r.skip_prefix_cache) {
            PrefixHit::miss(seq.tokens.len())
        } else {
            self.kv.lookup_prefix(&seq.tokens, salt)
        };
        let cached = prefix.num_cached_tokens;
        let remaining = seq.tokens.len() - cached;
        let Some(n) = self.prefill_chunk(remaining, *budget) else { return Ok(Admission::Stop) };
        // A prompt left unfinished by this chunk becomes a partial prefill.
        if let Some(p) = partials.as_deref() {
            if n < remaining {
                let long = remaining > p.limits.long_threshold;
                if long && p.long >= p.limits.max_long {
                    return Ok(Admission::PassOver);
                }
                if p.partial >= p.limits.max_partial {
                    return Ok(Admission::Stop);
                }
            }
        }
        let start = SeqStart {
            tokens: &seq.tokens[..cached + n],
            prefix,
            extra_key: salt,
            max_total_tokens: seq.max_total_tokens,
        };
        if !allocated(self.kv.start_seq(id, start), id)? {
            return Ok(Admission::Stop);
        }
        let long_prefill = partials.as_deref().is_some_and(|p| remaining > p.limits.long_threshold);
        if let Some(p) = partials {
            if n < remaining {
                p.partial += 1;
                p.long += usize::from(long_prefill);
            }
        }
        self.waiting.remove(&key);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.num_computed_tokens = cached;
            seq.num_blocks_sent = 0;
            seq.long_prefill = long_prefill;
            self.pending_fork_slots += seq.pending_fork.len();
        }
        self.start_running(key, n, out, budget)?;
        Ok(Admission::Admitted)
    }

    /// Moves a queued sequence, whose slots for its next `n` tokens are
    /// allocated, into the running set and schedules those tokens. Returns
    /// true (admitted), for the `try_*` callers.
    fn start_running(
        &mut self,
        key: QueueKey,
        n: usize,
        out: &mut SchedulerOutput,
        budget: &mut usize,
    ) -> Result<bool, SchedulerError> {
        let id = key.1;
        self.running.insert(key);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.status = SeqStatus::Running;
        }
        self.push_entry(id, n, out)?;
        *budget -= n;
        Ok(true)
    }

    /// Gives the decode of entry `index` slots for `drafts` (speculative
    /// tokens to verify, computed after its token but counted only once
    /// accepted) if free blocks allow, and appends them to the entry.
    /// Returns whether they fit.
    fn attach_drafts(
        &mut self,
        index: usize,
        drafts: &[TokenId],
        out: &mut SchedulerOutput,
    ) -> Result<bool, SchedulerError> {
        let b = self.kv.block_size();
        let Some(entry) = out.scheduled.get_mut(index) else { return Ok(false) };
        let id = entry.seq_id;
        // The decode's own slot made its last block private: no copy here.
        match self.kv.append_draft_slots(id, drafts.len(), &mut out.blocks_to_copy) {
            Ok(()) => {}
            Err(e) if e.is_out_of_memory() => return Ok(false),
            Err(source) => return Err(SchedulerError::Allocator { seq: id, source }),
        }
        let Some(seq) = self.seqs.get_mut(&id) else { return Ok(false) };
        let table = self.kv.block_table(id).unwrap_or(&[]);
        let start = entry.seq_len();
        entry.slot_mapping.extend(slots_of(id, table, b, start..start + drafts.len())?);
        entry.token_ids.extend_from_slice(drafts);
        entry.num_draft_tokens = drafts.len();
        entry.table_update.append.extend_from_slice(&table[seq.num_blocks_sent..]);
        seq.num_blocks_sent = table.len();
        Ok(true)
    }

    /// Describes `n` new tokens of a sequence whose slots are allocated, and
    /// counts them as computed (and the token sampled after them as awaited).
    fn push_entry(&mut self, id: SeqId, n: usize, out: &mut SchedulerOutput) -> Result<(), SchedulerError> {
        let b = self.kv.block_size();
        let Some(seq) = self.seqs.get_mut(&id) else { return Ok(()) };
        seq.scheduled_step = self.step;
        let start = seq.num_computed_tokens;
        let end = start + n;
        let table = self.kv.block_table(id).unwrap_or(&[]);
        let slot_mapping = slots_of(id, table, b, start..end)?;
        let keep = seq.num_blocks_sent.min(table.len());
        let table_update = BlockTableUpdate { keep, append: table[keep..].to_vec() };
        seq.num_blocks_sent = table.len();
        let sample_for = if end == seq.num_tokens() {
            std::iter::once(id).chain(seq.pending_fork.iter().copied()).collect()
        } else {
            Vec::new()
        };
        // Only a decode can start past the known tokens (its input is awaited).
        let token_from_previous_step = end > seq.tokens.len();
        let token_ids = if token_from_previous_step { vec![0; n] } else { seq.tokens[start..end].to_vec() };
        seq.num_computed_tokens = end;
        if !sample_for.is_empty() {
            seq.num_awaited_tokens += 1;
        }
        out.scheduled.push(ScheduledSeq {
            seq_id: id,
            request_id: seq.request_id,
            token_ids,
            start_position: start,
            table_update,
            slot_mapping,
            sample_for,
            token_from_previous_step,
            num_draft_tokens: 0,
        });
        Ok(())
    }

    // ---- after the step ----------------------------------------------------------

    /// Applies a step's results (steps in the order they were scheduled):
    /// forks requests with `n > 1` whose prompt just completed, appends each
    /// sampled token, checks stop conditions (the request's stop tokens, then
    /// EOS unless `ignore_eos`, both only after `min_tokens`; then
    /// `max_tokens` and the model length), reports which one ended each
    /// finished sequence ([`FinishReason`]), and frees those at once.
    ///
    /// `sampled` holds one token per sequence in the output's `sample_for`
    /// lists. Sequences aborted or finished since the step was scheduled are
    /// skipped (a token sampled for them is ignored). A sequence preempted
    /// since then keeps its token: it was sampled from a complete context.
    pub fn update_from_output(
        &mut self,
        output: &SchedulerOutput,
        sampled: &[(SeqId, TokenId)],
    ) -> Result<Vec<SeqUpdate>, UpdateError> {
        self.update_from_verified_output(output, sampled, &[])
    }

    /// [`Self::update_from_output`] for a step whose entries verify draft
    /// tokens (speculative decoding): `accepted` says, for every sequence
    /// whose entry has `num_draft_tokens > 0`, how many of its drafts the
    /// target model accepted (a leading run). Those drafts are appended as
    /// tokens, each checked for stops as a sampled token is (tokens after a
    /// stop are dropped), then the sequence's sampled token; the slots of the
    /// rejected drafts go back to the allocator.
    pub fn update_from_verified_output(
        &mut self,
        output: &SchedulerOutput,
        sampled: &[(SeqId, TokenId)],
        accepted: &[(SeqId, usize)],
    ) -> Result<Vec<SeqUpdate>, UpdateError> {
        if output.is_empty() && sampled.is_empty() && output.step <= self.step {
            return Ok(Vec::new()); // nothing ran: nothing to apply
        }
        let oldest = self.unapplied.front().map(|u| u.step);
        if oldest != Some(output.step) {
            if output.step <= self.step && oldest.is_none_or(|o| output.step < o) {
                return Err(UpdateError::AlreadyApplied(output.step));
            }
            return Err(UpdateError::StaleOutput { got: output.step, expected: oldest.unwrap_or(self.step) });
        }
        // Validate everything before changing anything.
        let mut tokens: FxHashMap<SeqId, Option<TokenId>> =
            FxHashMap::with_capacity_and_hasher(sampled.len(), Default::default());
        for s in output.sampling_seqs() {
            tokens.insert(s, None);
        }
        for &(s, t) in sampled {
            match tokens.get_mut(&s) {
                None => return Err(UpdateError::UnexpectedSample(s)),
                Some(Some(_)) => return Err(UpdateError::DuplicateSample(s)),
                Some(slot) => *slot = Some(t),
            }
        }
        let live: Vec<bool> = output.scheduled.iter().map(|e| self.is_live_entry(e)).collect();
        for (entry, _) in output.scheduled.iter().zip(&live).filter(|(_, &l)| l) {
            if let Some(&s) = entry.sample_for.iter().find(|s| tokens.get(s).is_some_and(|t| t.is_none())) {
                return Err(UpdateError::MissingSample(s));
            }
        }
        let mut accepted_of: FxHashMap<SeqId, usize> = FxHashMap::default();
        let drafts_of: FxHashMap<SeqId, usize> = match accepted.is_empty() {
            true => FxHashMap::default(),
            false => output.scheduled.iter().map(|e| (e.seq_id, e.num_draft_tokens)).collect(),
        };
        for &(s, n) in accepted {
            let drafts = drafts_of.get(&s).copied().unwrap_or(0);
            if n > drafts || accepted_of.insert(s, n).is_some() {
                return Err(UpdateError::BadAcceptance { seq: s, accepted: n, drafts });
            }
        }
        for (entry, _) in output.scheduled.iter().zip(&live).filter(|(_, &l)| l) {
            if entry.num_draft_tokens > 0 && !accepted_of.contains_key(&entry.seq_id) {
                return Err(UpdateError::BadAcceptance {
                    seq: entry.seq_id,
                    accepted: 0,
                    drafts: entry.num_draft_tokens,
                });
            }
        }
        self.unapplied.pop_front();

        let mut updates = Vec::with_capacity(sampled.len());
        for (entry, _) in output.scheduled.iter().zip(&live).filter(|(_, &l)| l) {
            if entry.sample_for.len() > 1 {
                self.fork_samples(entry.seq_id, &entry.sample_for[1..]);
            }
            if entry.num_draft_tokens > 0 {
                let n = accepted_of.get(&entry.seq_id).copied().unwrap_or(0);
                if !self.accept_drafts(entry, n, &mut updates)? {
                    continue; // a stop among the accepted drafts ended it
                }
            }
            for s in &entry.sample_for {
                if let Some(&Some(token)) = tokens.get(s) {
                    self.append_token(*s, token, &mut updates)?;
                }
            }
        }
        Ok(updates)
    }

    /// Forgets every step not applied yet, whose results will never come (the
    /// device failed). Each sequence those steps scheduled, or that awaits a
    /// token from them, goes back to the waiting queue to recompute from its
    /// known tokens: nothing is lost but the work. Returns those sequences.
    pub fn discard_unapplied(&mut self) -> Vec<SeqId> {
        let Some(oldest) = self.unapplied.front().map(|u| u.step) else { return Vec::new() };
        self.unapplied.clear();
        let mut requeued: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| {
                s.num_awaited_tokens > 0 || (s.scheduled_step >= oldest && s.status != SeqStatus::Waiting)
            })
            .map(|(&id, _)| id)
            .collect();
        requeued.sort();
        for &id in &requeued {
            let Some(seq) = self.seqs.get_mut(&id) else { continue };
            seq.num_awaited_tokens = 0;
            let key = (seq.rank, id);
            if seq.status == SeqStatus::Waiting {
                continue;
            }
            if self.running.remove(&key) {
                self.pending_fork_slots -= seq.pending_fork.len();
            }
            self.swapped.remove(&key);
            let freed = self.kv.free(id);
            debug_assert!(freed.is_ok(), "freeing {id}: {freed:?}");
            seq.num_computed_tokens = 0;
            seq.num_blocks_sent = 0;
            seq.status = SeqStatus::Waiting;
            self.waiting.insert(key);
        }
        requeued
    }

    fn is_live_entry(&self, entry: &ScheduledSeq) -> bool {
        self.seqs.contains_key(&entry.seq_id)
    }

    /// Creates the other samples of a request whose prompt just completed.
    /// Each shares the parent's blocks; if the allocator cannot share, the
    /// sample is queued to recompute the prompt on its own. A sample that
    /// shares them starts from the table the runner holds for the parent (the
    /// runner copied it at the step that forks), so it inherits the parent's
    /// `num_blocks_sent`.
    fn fork_samples(&mut self, parent: SeqId, children: &[SeqId]) {
        let Some(p) = self.seqs.get_mut(&parent) else { return };
        self.pending_fork_slots -= p.pending_fork.len();
        p.pending_fork.clear();
        let template = p.clone();
        for (i, &child) in children.iter().enumerate() {
            let mut seq = template.clone();
            seq.seq_id = child;
            seq.sample_index = template.sample_index + i + 1;
            match self.kv.fork(parent, child) {
                Ok(()) => {
                    self.running.insert((seq.rank, child));
                }
                Err(_) => {
                    seq.status = SeqStatus::Waiting;
                    seq.num_computed_tokens = 0;
                    seq.num_blocks_sent = 0;
                    self.waiting.insert((seq.rank, child));
                }
            }
            self.seqs.insert(child, seq);
            if let Some(req) = self.requests.get_mut(&template.request_id) {
                req.live_seqs.push(child);
            }
        }
    }

    /// Keeps the first `n` draft tokens an entry verified: the allocator
    /// keeps (and hashes) their slots and releases the rest, then they are
    /// appended as tokens. Returns whether the sequence is still live.
    fn accept_drafts(
        &mut self,
        entry: &ScheduledSeq,
        n: usize,
        updates: &mut Vec<SeqUpdate>,
    ) -> Result<bool, UpdateError> {
        let id = entry.seq_id;
        let accepted = &entry.draft_token_ids()[..n];
        // Still running with its draft slots: nothing is scheduled (so
        // nothing preempted) before a verification is applied.
        self.kv
            .accept_draft_tokens(id, accepted)
            .map_err(|source| UpdateError::Allocator { seq: id, source })?;
        // Blocks released from the end of the table: the runner's copy
        // keeps only the entries still there (later ones are sent anew).
        let table_len = self.kv.block_table(id).map_or(0, <[_]>::len);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.num_blocks_sent = seq.num_blocks_sent.min(table_len);
        }
        for &token in accepted {
            // `num_computed_tokens` stays below the tokens until all are in,
            // so `append_token` sees no pending slot.
            self.append_token(id, token, updates)?;
            if !self.seqs.contains_key(&id) {
                return Ok(false);
            }
        }
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.num_computed_tokens += n;
        }
        Ok(self.seqs.contains_key(&id))
    }

    /// Sets the draft tokens proposed to follow a running sequence's tokens,
    /// replacing any earlier proposal; its next decode verifies them (as many
    /// as the step's budget and the request's limits allow). Ignored for a
    /// sequence that is unknown or not decoding.
    pub fn set_draft_tokens(&mut self, seq_id: SeqId, drafts: Vec<TokenId>) {
        if let Some(seq) = self.seqs.get_mut(&seq_id) {
            if seq.status == SeqStatus::Running && seq.is_decoding() {
                seq.draft_tokens = drafts;
            }
        }
    }

    /// Running sequences that are decoding with every token known: those a
    /// proposer can draft for.
    pub fn decoding_seqs(&self) -> impl Iterator<Item = &Sequence> + '_ {
        self.running
            .iter()
            .filter_map(|(_, id)| self.seqs.get(id))
            .filter(|s| s.status == SeqStatus::Running && s.is_decoding() && s.num_awaited_tokens == 0)
    }

    fn append_token(
        &mut self,
        id: SeqId,
        token: TokenId,
        updates: &mut Vec<SeqUpdate>,
    ) -> Result<(), UpdateError> {
        let Some(seq) = self.seqs.get_mut(&id) else { return Ok(()) };
        seq.tokens.push(token);
        seq.num_awaited_tokens = seq.num_awaited_tokens.saturating_sub(1);
        // Scheduled ahead (asynchronous scheduling): a later step already holds
        // this token's slot, and the allocator can now hash it.
        if seq.status == SeqStatus::Running && seq.num_computed_tokens >= seq.tokens.len() {
            self.kv
                .set_pending_token(id, token)
                .map_err(|source| UpdateError::Allocator { seq: id, source })?;
        }
        let finish_reason = self
            .requests
            .get(&seq.request_id)
            .and_then(|req| stop_reason(req, seq, token, self.config.max_model_len));
        updates.push(SeqUpdate {
            seq_id: id,
            request_id: seq.request_id,
            sample_index: seq.sample_index,
            new_token: token,
            finish_reason,
        });
        if finish_reason.is_some() {
            self.finish(id);
        }
        Ok(())
    }

    /// Removes a sequence from its queue, frees its blocks, and retires the
    /// request once its last sample is gone. The next step's output lists
    /// them (and the samples it was still to fork into, which never will).
    fn finish(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.remove(&id) else { return };
        self.finished_seqs.push(id);
        self.finished_seqs.extend_from_slice(&seq.pending_fork);
        let key = (seq.rank, id);
        match seq.status {
            SeqStatus::Waiting => {
                self.waiting.remove(&key);
            }
            SeqStatus::Running | SeqStatus::Swapped => {
                if self.running.remove(&key) {
                    self.pending_fork_slots -= seq.pending_fork.len();
                }
                self.swapped.remove(&key);
                // Cannot fail: running and swapped sequences hold blocks.
                let freed = self.kv.free(id);
                debug_assert!(freed.is_ok(), "freeing {id}: {freed:?}");
            }
        }
        if let Some(req) = self.requests.get_mut(&seq.request_id) {
            req.live_seqs.retain(|&s| s != id);
            if req.live_seqs.is_empty() {
                self.requests.remove(&seq.request_id);
                self.finished_requests.push(seq.request_id);
                self.stats.num_requests_finished += 1;
            }
        }
    }

    fn new_seq_id(&mut self) -> SeqId {
        let id = SeqId(self.next_seq_id);
        self.next_seq_id += 1;
        id
    }

    // ---- introspection ---------------------------------------------------------------

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn policy_name(&self) -> &str {
        self.policy.name()
    }

    /// A live sequence (finished ones are forgotten at once).
    pub fn seq(&self, seq_id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&seq_id)
    }

    /// The live sequences of a request.
    pub fn request_seqs(&self, request_id: RequestId) -> &[SeqId] {
        self.requests.get(&request_id).map(|r| r.live_seqs.as_slice()).unwrap_or(&[])
    }

    /// The LoRA adapters of the running sequences, and of the waiting and
    /// swapped ones, each sorted and without repeats.
    pub fn lora_adapters(&self) -> (Vec<u32>, Vec<u32>) {
        let collect = |queue: &BTreeSet<QueueKey>| {
            let set: BTreeSet<u32> = queue.iter().filter_map(|(_, id)| self.lora_of(*id)).collect();
            set.into_iter().collect::<Vec<u32>>()
        };
        let mut waiting = collect(&self.waiting);
        waiting.extend(collect(&self.swapped));
        waiting.sort_unstable();
        waiting.dedup();
        (collect(&self.running), waiting)
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_swapped(&self) -> usize {
        self.swapped.len()
    }

    /// Whether any request is still in flight.
    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty()
    }

    pub fn num_unfinished_requests(&self) -> usize {
        self.requests.len()
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.kv.prefix_cache_stats()
    }

    pub fn kv_usage(&self) -> KvUsage {
        self.kv.usage()
    }

    pub fn allocator(&self) -> &A {
        &self.kv
    }

    /// Evicts every unreferenced prefix-cache block; returns how many.
    pub fn reset_prefix_cache(&mut self) -> usize {
        self.kv.reset_prefix_cache()
    }

    /// Checks queues, statuses, requests and the allocator against each other
    /// (O(everything); for tests). Valid between `update_from_output` and
    /// `schedule` (with one step unapplied under asynchronous scheduling).
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        self.kv.check_invariants()?;
        let queued = self.waiting.len() + self.running.len() + self.swapped.len();
        if queued != self.seqs.len() {
            return Err(format!("{} sequences but {queued} queue entries", self.seqs.len()).into());
        }
        for (&id, seq) in &self.seqs {
            let key = (seq.rank, id);
            let (queue, on_gpu) = match seq.status {
                SeqStatus::Waiting => (&self.waiting, None),
                SeqStatus::Running => (&self.running, Some(true)),
                SeqStatus::Swapped => (&self.swapped, Some(false)),
            };
            if !queue.contains(&key) {
                return Err(format!("{id} is {:?} but not in that queue", seq.status).into());
            }
            match on_gpu {
                None => {
                    if self.kv.num_tokens(id).is_some() || seq.num_computed_tokens != 0 {
                        return Err(format!("{id} is waiting but holds KV").into());
                    }
                }
                Some(gpu) => {
                    let drafts = self.kv.num_draft_slots(id);
                    if self.kv.num_tokens(id) != Some(seq.num_computed_tokens + drafts)
                        || self.kv.is_swapped(id) == gpu
                    {
                        return Err(format!(
                            "{id} ({:?}): {} computed tokens, allocator holds {:?} (swapped = {})",
                            seq.status,
                            seq.num_computed_tokens,
                            self.kv.num_tokens(id),
                            self.kv.is_swapped(id)
                        )
                        .into());
                    }
                }
            }
            let table_len = self.kv.block_table(id).map_or(0, <[_]>::len);
            let sent_ok = match seq.status {
                SeqStatus::Running => seq.num_blocks_sent <= table_len,
                SeqStatus::Waiting | SeqStatus::Swapped => seq.num_blocks_sent == 0,
            };
            if !sent_ok {
                return Err(format!(
                    "{id} ({:?}): the runner is said to hold {} of its {table_len} blocks",
                    seq.status, seq.num_blocks_sent
                )
                .into());
            }
            if seq.num_computed_tokens >= seq.num_tokens() && seq.status != SeqStatus::Waiting {
                return Err(format!("{id} has nothing left to compute").into());
            }
            if seq.num_awaited_tokens > self.unapplied.len() {
                return Err(format!(
                    "{id} awaits {} tokens from {} unapplied steps",
                    seq.num_awaited_tokens,
                    self.unapplied.len()
                )
                .into());
            }
            let owned = self.requests.get(&seq.request_id).is_some_and(|r| r.live_seqs.contains(&id));
            if !owned {
                return Err(format!("{id} is not listed by {}", seq.request_id).into());
            }
        }
        if let Some(max) = self.config.max_loras {
            let active: rustc_hash::FxHashSet<u32> =
                self.running.iter().filter_map(|(_, id)| self.lora_of(*id)).collect();
            if active.len() > max {
                return Err(format!("{} LoRA adapters running, max_loras {max}", active.len()).into());
            }
        }
        let pending: usize = self.running.iter().map(|(_, s)| self.seqs[s].pending_fork.len()).sum();
        if pending != self.pending_fork_slots {
            return Err(
                format!("{pending} pending fork slots, counter says {}", self.pending_fork_slots).into()
            );
        }
        if self.running.len() + pending > self.config.max_num_seqs {
            return Err(
                format!("{} running + {pending} forks to come > max_num_seqs", self.running.len()).into()
            );
        }
        for (rid, req) in &self.requests {
            if req.live_seqs.is_empty() || req.live_seqs.iter().any(|s| !self.seqs.contains_key(s)) {
                return Err(format!("{rid} lists sequences that do not exist, or none").into());
            }
        }
        Ok(())
    }
}

/// The extra key of a request's prefix-cache hashes: its salt, with its LoRA
/// adapter mixed in (the same salt under two adapters, or under an adapter
/// and none, never shares blocks).
fn prefix_cache_extra_key(salt: Option<u64>, lora: Option<u32>) -> Option<u64> {
    let Some(lora) = lora else { return salt };
    // splitmix64's finalizer over the adapter id and the salt.
    let mut z = salt.unwrap_or(0x5bd1_e995_1234_5678) ^ (u64::from(lora) << 32 | 0x4c6f_5241);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    Some(z ^ (z >> 31))
}

/// Why the token just appended ends the sequence, if it does.
fn stop_reason(
    req: &RequestState,
    seq: &Sequence,
    token: TokenId,
    max_model_len: usize,
) -> Option<FinishReason> {
    let num_output = seq.tokens.len() - seq.num_prompt_tokens;
    if num_output >= req.min_tokens {
        if req.stop_token_ids.contains(&token) {
            return Some(FinishReason::StopToken(token));
        }
        if !req.ignore_eos && req.eos_token_ids.contains(&token) {
            return Some(FinishReason::Eos(token));
        }
    }
    if num_output >= req.max_tokens || seq.tokens.len() >= max_model_len {
        return Some(FinishReason::Length);
    }
    None
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
