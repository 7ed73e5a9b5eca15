//! Property tests: random interleavings of add / schedule / update / abort
//! against small KV pools, with a shadow copy of cache memory that executes
//! each step exactly as a runner must (swap-outs, swap-ins, copies, then the
//! new tokens' writes through the slot mapping). After every step each
//! scheduled sequence's whole context is read back through its block table
//! and compared with its tokens, so any wrong table, slot, copy, swap or
//! prefix-cache hit shows up as corrupted "KV".
//!
//! Some steps carry speculative draft tokens on their decodes (random
//! drafts, a random number of them accepted), so rejected drafts' slots are
//! released and their blocks reused under the same checks.
//!
//! The harness also mirrors a runner's persistent batch: it applies every
//! step's block-table updates (and drops finished sequences, empties
//! preempted ones, copies a parent's table to the samples it forks into) to
//! its own copy of the tables, and checks that copy against the allocator's
//! real table for every scheduled sequence, every step.

use std::collections::{BTreeMap, BTreeSet};

use pagoda_paged_kv::{
    BlockId, ContiguousAllocator, ContiguousConfig, PagedAllocator, PagedConfig, Reservation,
};
use pagoda_scheduler::{
    FinishReason, KvAllocator, NewRequest, Policy, PreemptionMode, RequestId, Scheduler, SchedulerConfig,
    SchedulerOutput, SeqId, TokenId,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Add {
        base: usize,
        prompt_len: usize,
        max_tokens: usize,
        n: usize,
        priority: i32,
        eos: bool,
        salt: Option<u64>,
        lora: Option<u32>,
    },
    Step {
        seed: u64,
    },
    Abort {
        pick: usize,
        mid_step: bool,
    },
    FinishSeq {
        pick: usize,
    },
    /// The step in flight fails on the device: its results never come.
    DeviceFailure,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..3, 1usize..24, 1usize..12, prop::sample::select(vec![1usize, 1, 1, 2, 3]), -2i32..3, any::<bool>(), prop::option::weighted(0.2, 0u64..2), prop::option::weighted(0.4, 1u32..5))
            .prop_map(|(base, prompt_len, max_tokens, n, priority, eos, salt, lora)| Op::Add { base, prompt_len, max_tokens, n, priority, eos, salt, lora }),
        8 => any::<u64>().prop_map(|seed| Op::Step { seed }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, mid_step)| Op::Abort { pick, mid_step }),
        1 => any::<usize>().prop_map(|pick| Op::FinishSeq { pick }),
        1 => Just(Op::DeviceFailure),
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    block_size: usize,
    num_gpu_blocks: usize,
    num_cpu_blocks: usize,
    caching: bool,
    contiguous: Option<Reservation>,
    config: SchedulerConfig,
}

fn setup_strategy() -> impl Strategy<Value = Setup> {
    (
        prop::sample::select(vec![1usize, 2, 4, 8]),
        6usize..40,
        0usize..16,
        any::<bool>(),
        prop::option::weighted(
            0.2,
            prop::sample::select(vec![
                Reservation::Fixed(40),
                Reservation::Exact,
                Reservation::NextPowerOfTwo,
            ]),
        ),
        (
            1usize..40,
            1usize..6,
            12usize..40,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            prop::option::of(1usize..8),
        ),
        any::<bool>(),
        (1usize..5).prop_flat_map(|partial| (Just(partial), 1..=partial)),
        prop::option::weighted(0.5, 1usize..4),
    )
        .prop_map(
            |(
                block_size,
                blocks,
                cpu,
                caching,
                contiguous,
                (batched, seqs, model_len, chunked, swap, priority, threshold),
                async_scheduling,
                (max_num_partial_prefills, max_long_partial_prefills),
                max_loras,
            )| {
                let max_model_len = model_len.min(blocks * block_size);
                let max_model_len = match contiguous {
                    Some(Reservation::Fixed(m)) => max_model_len.min(m),
                    _ => max_model_len,
                };
                let config = SchedulerConfig {
                    max_num_batched_tokens: if chunked { batched } else { batched.max(max_model_len) },
                    max_num_seqs: seqs,
                    max_model_len,
                    enable_chunked_prefill: chunked,
                    preemption_mode: if swap { PreemptionMode::Swap } else { PreemptionMode::Recompute },
                    policy: if priority { Policy::Priority } else { Policy::Fcfs },
                    long_prefill_token_threshold: threshold,
                    max_num_partial_prefills,
                    max_long_partial_prefills,
                    async_scheduling,
                    max_loras,
                };
                Setup { block_size, num_gpu_blocks: blocks, num_cpu_blocks: cpu, caching, contiguous, config }
            },
        )
}

fn base_prompt(base: usize) -> Vec<TokenId> {
    (0..24u32).map(|i| 10 + (i * (base as u32 + 1) / 2) % 4).collect()
}

const EOS: TokenId = 0;

/// What the test knows about each request, independently of the scheduler.
#[derive(Debug)]
struct Expect {
    n: usize,
    max_tokens: usize,
    prompt_len: usize,
    /// Tokens sampled so far per sample index.
    sampled: BTreeMap<usize, usize>,
    finished: BTreeSet<usize>,
    aborted: bool,
}

/// A step "running on the device": its output, the tokens it samples, and
/// how many drafts each of its verifications accepts.
type InFlight = (SchedulerOutput, Vec<(SeqId, TokenId)>, Vec<(SeqId, usize)>);

/// What the shadow cache holds in a slot: the token, and what else its KV
/// depends on (the request's salt and LoRA adapter: a prefix-cache hit across
/// either reads the wrong entries).
type ShadowKv = (TokenId, Option<u64>, Option<u32>);

struct Harness<A: KvAllocator> {
    s: Scheduler<A>,
    gpu: Vec<Option<ShadowKv>>,
    cpu: Vec<Option<ShadowKv>>,
    /// Each request's salt and adapter.
    contexts: BTreeMap<RequestId, (Option<u64>, Option<u32>)>,
    requests: BTreeMap<RequestId, Expect>,
    next_request: u64,
    /// Under asynchronous scheduling: the step "running on the device", with
    /// the tokens it samples (known to the device, not yet to the scheduler).
    in_flight: Option<InFlight>,
    /// The runner's copy of each sequence's block table, built from the
    /// steps' updates alone.
    tables: BTreeMap<SeqId, Vec<BlockId>>,
    /// Requests the runner was told of and not yet told have ended.
    runner_requests: BTreeSet<RequestId>,
    /// Block-table entries sent over the run, and entries a full copy per
    /// scheduled sequence per step would have sent.
    entries_sent: usize,
    entries_scheduled: usize,
    /// Sequences whose rejected drafts released blocks, and the length of
    /// their allocator table right after.
    rolled_back: BTreeMap<SeqId, usize>,
}

impl<A: KvAllocator> Harness<A> {
    fn new(s: Scheduler<A>) -> Self {
        let b = s.allocator().block_size();
        let gpu = vec![None; s.allocator().num_gpu_blocks() * b];
        let cpu = vec![None; s.allocator().num_cpu_blocks() * b];
        Self {
            s,
            gpu,
            cpu,
            contexts: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_request: 0,
            in_flight: None,
            rolled_back: BTreeMap::new(),
            tables: BTreeMap::new(),
            runner_requests: BTreeSet::new(),
            entries_sent: 0,
            entries_scheduled: 0,
        }
    }

    /// Queues a request built outside the op list.
    fn add(&mut self, r: NewRequest) -> Result<RequestId, TestCaseError> {
        let id = r.request_id;
        let e = Expect {
            n: r.n,
            max_tokens: r.max_tokens,
            prompt_len: r.prompt_token_ids.len(),
            sampled: BTreeMap::new(),
            finished: BTreeSet::new(),
            aborted: false,
        };
        let context = (r.cache_salt, r.lora);
        self.s.add_request(r).map_err(|e| TestCaseError::fail(e.to_string()))?;
        self.contexts.insert(id, context);
        self.requests.insert(id, e);
        self.runner_requests.insert(id);
        self.next_request = self.next_request.max(id.0 + 1);
        Ok(id)
    }

    fn live_request(&self, pick: usize) -> Option<RequestId> {
        let live: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, e)| !e.aborted && e.finished.len() < e.n)
            .map(|(&r, _)| r)
            .collect();
        (!live.is_empty()).then(|| live[pick % live.len()])
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Add { base, prompt_len, max_tokens, n, priority, eos, salt, lora } => {
                let id = RequestId(self.next_request);
                let mut r = NewRequest::new(id, base_prompt(*base)[..*prompt_len].to_vec(), *max_tokens);
                r.n = *n;
                r.priority = *priority;
                r.eos_token_ids = if *eos { vec![EOS] } else { Vec::new() };
                r.cache_salt = *salt;
                r.lora = *lora;
                if self.s.add_request(r).is_ok() {
                    self.contexts.insert(id, (*salt, *lora));
                    self.next_request += 1;
                    self.runner_requests.insert(id);
                    let e = Expect {
                        n: *n,
                        max_tokens: *max_tokens,
                        prompt_len: *prompt_len,
                        sampled: BTreeMap::new(),
                        finished: BTreeSet::new(),
                        aborted: false,
                    };
                    self.requests.insert(id, e);
                }
            }
            Op::Step { seed } => self.step(*seed, None)?,
            Op::DeviceFailure => {
                if self.in_flight.take().is_some() {
                    self.s.discard_unapplied();
                }
            }
            Op::Abort { pick, mid_step } => {
                if let Some(r) = self.live_request(*pick) {
                    if *mid_step {
                        self.step(*pick as u64, Some(r))?;
                    } else {
                        self.abort(r);
                    }
                }
            }
            Op::FinishSeq { pick } => {
                if let Some(r) = self.live_request(*pick) {
                    // Engines stop on strings in generated text: only after a token.
                    let seqs: Vec<SeqId> = self
                        .s
                        .request_seqs(r)
                        .iter()
                        .copied()
                        .filter(|&q| !self.s.seq(q).unwrap().output_token_ids().is_empty())
                        .collect();
                    if seqs.is_empty() {
                        return Ok(());
                    }
                    let seq = seqs[pick % seqs.len()];
                    let idx = self.s.seq(seq).unwrap().sample_index();
                    prop_assert!(self.s.finish_seq(seq));
                    prop_assert!(self.requests.get_mut(&r).unwrap().finished.insert(idx));
                }
            }
        }
        if let Err(e) = self.s.check_invariants() {
            return Err(TestCaseError::fail(e.to_string()));
        }
        Ok(())
    }

    fn abort(&mut self, r: RequestId) {
        self.s.abort_request(r);
        self.requests.get_mut(&r).unwrap().aborted = true;
    }

    fn copy(from: &[Option<ShadowKv>], to: &mut [Option<ShadowKv>], src: u32, dst: u32, b: usize) {
        let block: Vec<_> = from[src as usize * b..(src as usize + 1) * b].to_vec();
        to[dst as usize * b..(dst as usize + 1) * b].copy_from_slice(&block);
    }

    fn check_output(&self, out: &SchedulerOutput) -> Result<(), TestCaseError> {
        let cfg = self.s.config();
        let b = self.s.allocator().block_size();
        prop_assert!(out.num_batched_tokens <= cfg.max_num_batched_tokens, "token budget");
        prop_assert_eq!(
            out.num_batched_tokens,
            out.scheduled.iter().map(|e| e.token_ids.len()).sum::<usize>()
        );
        prop_assert!(out.scheduled.len() <= cfg.max_num_seqs, "sequence budget");
        if let Some(max_loras) = cfg.max_loras {
            let loras: BTreeSet<u32> = out
                .scheduled
                .iter()
                .filter_map(|e| self.contexts[&self.s.seq(e.seq_id).unwrap().request_id()].1)
                .collect();
            prop_assert!(
                loras.len() <= max_loras,
                "{} adapters in a step, max_loras {}",
                loras.len(),
                max_loras
            );
        }
        let ids: BTreeSet<SeqId> = out.scheduled.iter().map(|e| e.seq_id).collect();
        prop_assert_eq!(ids.len(), out.scheduled.len(), "a sequence scheduled twice");
        prop_assert!(out.scheduled[..out.num_decodes].iter().all(|e| e.token_ids.len() == 1));
        prop_assert!(out.scheduled.iter().all(|e| e.num_draft_tokens < e.token_ids.len()));
        prop_assert!(out.scheduled[out.num_decodes..].iter().all(|e| e.token_ids.len() > 1), "decodes first");
        for p in &out.preempted {
            prop_assert!(!ids.contains(p), "preempted and scheduled in one step");
        }
        // A CPU block freed by a swap-in must not be overwritten by a swap-out
        // of the same step (swap-outs run first).
        let written: BTreeSet<u32> = out.blocks_to_swap_out.iter().map(|p| p.1).collect();
        prop_assert!(out.blocks_to_swap_in.iter().all(|p| !written.contains(&p.0)));
        for e in &out.scheduled {
            prop_assert!(!e.token_ids.is_empty());
            let seq = self.s.seq(e.seq_id).unwrap();
            let all = seq.all_token_ids();
            if e.token_from_previous_step {
                prop_assert!(cfg.async_scheduling, "an awaited input without asynchronous scheduling");
                prop_assert_eq!(e.token_ids.len(), 1);
                prop_assert_eq!(e.start_position, all.len(), "the awaited token is the next one");
                prop_assert!(
                    self.previous_sample(e.seq_id).is_some(),
                    "no running step samples {}",
                    e.seq_id
                );
            } else {
                let verified = e.start_position..e.seq_len() - e.num_draft_tokens;
                let real = &e.token_ids[..e.token_ids.len() - e.num_draft_tokens];
                prop_assert_eq!(real, &all[verified], "tokens of {}", e.seq_id);
            }
            // Drafts are counted as computed only once accepted.
            let computed = e.seq_len() - e.num_draft_tokens;
            prop_assert_eq!(seq.num_computed_tokens(), computed);
            if e.num_draft_tokens > 0 {
                prop_assert_eq!(e.token_ids.len(), e.num_draft_tokens + 1, "drafts follow one decode token");
                prop_assert_eq!(&e.sample_for, &vec![e.seq_id]);
            }
            if e.sample_for.is_empty() {
                prop_assert!(computed < seq.num_tokens(), "a prefill chunk that reaches the end");
            } else {
                prop_assert_eq!(computed + 1, seq.num_tokens(), "sample only at the end");
            }
            let table = &self.tables[&e.seq_id];
            prop_assert!(table.len() * b >= e.seq_len());
            for (i, pos) in e.positions().enumerate() {
                prop_assert_eq!(e.slot_mapping[i], table[pos / b] as i64 * b as i64 + (pos % b) as i64);
            }
        }
        Ok(())
    }

    /// Applies a step's block-table updates as a runner does, and checks the
    /// result against the allocator's tables.
    fn mirror_tables(&mut self, out: &SchedulerOutput) -> Result<(), TestCaseError> {
        for id in &out.finished_seqs {
            prop_assert!(self.s.seq(*id).is_none(), "{} listed as ended but live", id);
            self.tables.remove(id);
        }
        for id in &out.finished_requests {
            prop_assert!(self.s.request_seqs(*id).is_empty(), "{} listed as ended but live", id);
            prop_assert!(self.runner_requests.remove(id), "{} listed as ended twice", id);
        }
        for id in &out.preempted {
            if let Some(table) = self.tables.get_mut(id) {
                table.clear();
            }
        }
        for e in &out.scheduled {
            prop_assert!(!out.finished_seqs.contains(&e.seq_id), "{} scheduled and ended", e.seq_id);
            let update = &e.table_update;
            let table = self.tables.entry(e.seq_id).or_default();
            // Only what changed is sent: at most the last entry replaced, or a new
            // table; after rejected drafts released blocks, what is left of it.
            let held = self.rolled_back.remove(&e.seq_id).map_or(table.len(), |n| n.min(table.len()));
            prop_assert!(
                update.keep == 0 || update.keep + 1 >= held,
                "{}: keeps {} of {} entries",
                e.seq_id,
                update.keep,
                table.len()
            );
            prop_assert!(
                update.apply_to(table),
                "{}: keeps {} of {} entries",
                e.seq_id,
                update.keep,
                table.len()
            );
            let real = self.s.allocator().block_table(e.seq_id).unwrap_or(&[]);
            prop_assert_eq!(&table[..], real, "{}: the runner's table is not the allocator's", e.seq_id);
            self.entries_sent += update.append.len();
            self.entries_scheduled += real.len();
            // A request forking here: its samples start from the parent's table.
            let table = table.clone();
            for child in e.sample_for.iter().skip(1) {
                self.tables.insert(*child, table.clone());
            }
        }
        Ok(())
    }

    /// Runs the output on the shadow memory and reads every context back.
    fn execute(&mut self, out: &SchedulerOutput) -> Result<(), TestCaseError> {
        let b = self.s.allocator().block_size();
        for &(g, c) in &out.blocks_to_swap_out {
            Self::copy(&self.gpu, &mut self.cpu, g, c, b);
        }
        for &(c, g) in &out.blocks_to_swap_in {
            Self::copy(&self.cpu, &mut self.gpu, c, g, b);
        }
        for &(src, dst) in &out.blocks_to_copy {
            let gpu = self.gpu.clone();
            Self::copy(&gpu, &mut self.gpu, src, dst, b);
        }
        for e in &out.scheduled {
            let fed = if e.token_from_previous_step { self.previous_sample(e.seq_id) } else { None };
            let (salt, lora) = self.contexts[&self.s.seq(e.seq_id).unwrap().request_id()];
            for (&slot, &t) in e.slot_mapping.iter().zip(&e.token_ids) {
                self.gpu[slot as usize] = Some((fed.unwrap_or(t), salt, lora));
            }
        }
        Ok(())
    }

    /// The token the step in flight samples for `seq`, as the device has it.
    fn previous_sample(&self, seq: SeqId) -> Option<TokenId> {
        let (_, sampled, _) = self.in_flight.as_ref()?;
        sampled.iter().find(|&&(s, _)| s == seq).map(|&(_, t)| t)
    }

    /// Reads every scheduled sequence's context back through its table (once
    /// the tokens a step was scheduled ahead of are known).
    fn read_back(&self, out: &SchedulerOutput) -> Result<(), TestCaseError> {
        let b = self.s.allocator().block_size();
        for e in &out.scheduled {
            // Finished or aborted since (its KV no longer matters).
            let Some(seq) = self.s.seq(e.seq_id) else { continue };
            let all = seq.all_token_ids();
            // Draft positions (not tokens until accepted) hold the drafts.
            let known = e.seq_len() - e.num_draft_tokens;
            prop_assert!(all.len() >= known, "{}: inputs still unknown", e.seq_id);
            let table = &self.tables[&e.seq_id];
            let (salt, lora) = self.contexts[&seq.request_id()];
            let expected = all[..known].iter().chain(e.draft_token_ids().iter().take(e.seq_len() - known));
            for (pos, &t) in expected.enumerate() {
                let slot = table[pos / b] as usize * b + pos % b;
                prop_assert_eq!(
                    self.gpu[slot],
                    Some((t, salt, lora)),
                    "{} reads wrong KV at position {}",
                    e.seq_id,
                    pos
                );
            }
        }
        Ok(())
    }

    /// One engine step: schedule, "run" on the shadow memory, then apply the
    /// step before it (asynchronous) or this one (synchronous).
    fn step(&mut self, seed: u64, abort_mid_step: Option<RequestId>) -> Result<(), TestCaseError> {
        if self.in_flight.is_some() && !self.s.can_schedule() {
            self.apply_in_flight()?; // it forks, or verifies drafts
        }
        let mut rng = seed | 1;
        let mut next = move || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            rng >> 33
        };
        if seed % 3 == 0 {
            // A proposer drafts 1-4 tokens for every decode that can take them.
            let decoding: Vec<SeqId> = self.s.decoding_seqs().map(|q| q.seq_id()).collect();
            for id in decoding {
                let drafts = (0..1 + next() % 4).map(|_| (next() % 6) as TokenId).collect();
                self.s.set_draft_tokens(id, drafts);
            }
        }
        let out = self.s.schedule().map_err(|e| TestCaseError::fail(e.to_string()))?;
        self.mirror_tables(&out)?;
        self.check_output(&out)?;
        self.execute(&out)?;
        if let Some(r) = abort_mid_step {
            self.abort(r);
        }
        let sampled: Vec<(SeqId, TokenId)> =
            out.sampling_seqs().map(|id| (id, (next() % 6) as TokenId)).collect();
        let accepted: Vec<(SeqId, usize)> = out
            .scheduled
            .iter()
            .filter(|e| e.num_draft_tokens > 0)
            .map(|e| (e.seq_id, next() as usize % (e.num_draft_tokens + 1)))
            .collect();
        self.apply_in_flight()?;
        self.read_back(&out)?;
        if !out.is_empty() {
            self.in_flight = Some((out, sampled, accepted));
        }
        if !self.s.config().async_scheduling {
            self.apply_in_flight()?;
        }
        Ok(())
    }

    /// Gives the step in flight's tokens to the scheduler and checks the updates.
    fn apply_in_flight(&mut self) -> Result<(), TestCaseError> {
        let Some((out, sampled, accepted)) = self.in_flight.take() else { return Ok(()) };
        let updates = self
            .s
            .update_from_verified_output(&out, &sampled, &accepted)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for &(seq, _) in &accepted {
            if let Some(table) = self.s.allocator().block_table(seq) {
                self.rolled_back.insert(seq, table.len());
            }
        }
        let mut last_count: BTreeMap<SeqId, usize> = BTreeMap::new();
        for u in updates {
            let e = self.requests.get_mut(&u.request_id).unwrap();
            prop_assert!(!e.aborted, "update for an aborted request");
            prop_assert!(!e.finished.contains(&u.sample_index), "update after finish");
            let count = e.sampled.entry(u.sample_index).or_insert(0);
            *count += 1;
            prop_assert!(*count <= e.max_tokens, "max_tokens exceeded");
            if let Some(seq) = self.s.seq(u.seq_id) {
                // A verification appends several tokens, one update each.
                let outputs = seq.output_token_ids();
                prop_assert!(outputs.len() >= *count, "outputs lost");
                prop_assert_eq!(outputs[*count - 1], u.new_token);
                last_count.insert(u.seq_id, *count);
            }
            match u.finish_reason {
                Some(FinishReason::Length) => {
                    let cap =
                        e.max_tokens.min(self.s.config().max_model_len.saturating_sub(e.prompt_len).max(1));
                    prop_assert_eq!(*count, cap, "Length finish at the wrong count");
                    e.finished.insert(u.sample_index);
                }
                Some(FinishReason::Eos(t) | FinishReason::StopToken(t)) => {
                    prop_assert_eq!(t, u.new_token);
                    e.finished.insert(u.sample_index);
                }
                None => {}
            }
        }
        for (id, count) in last_count {
            if let Some(seq) = self.s.seq(id) {
                prop_assert_eq!(seq.output_token_ids().len(), count, "outputs lost or duplicated");
            }
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), TestCaseError> {
        let mut steps = 0;
        while self.s.has_unfinished() || self.in_flight.is_some() {
            steps += 1;
            prop_assert!(steps < 5000, "no progress: {} unfinished", self.s.num_unfinished_requests());
            self.step(steps, None)?;
            if let Err(e) = self.s.check_invariants() {
                return Err(TestCaseError::fail(e.to_string()));
            }
        }
        for (r, e) in &self.requests {
            prop_assert!(e.aborted || e.finished.len() == e.n, "{} ended with {:?}", r, e);
        }
        let stats = self.s.stats();
        prop_assert_eq!(stats.num_requests_finished, stats.num_requests_added);
        // One more step tells the runner of the last ends: it then holds nothing.
        let out = self.s.schedule().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(out.is_empty());
        self.mirror_tables(&out)?;
        prop_assert!(self.tables.is_empty(), "the runner still holds {:?}", self.tables.keys());
        prop_assert!(self.runner_requests.is_empty(), "the runner still holds {:?}", self.runner_requests);
        prop_assert!(self.entries_sent <= self.entries_scheduled);
        let u = self.s.kv_usage();
        prop_assert_eq!(u.used_blocks, 0, "blocks leaked");
        prop_assert_eq!(u.used_cpu_blocks, 0, "CPU blocks leaked");
        Ok(())
    }
}

fn run<A: KvAllocator>(s: Scheduler<A>, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = Harness::new(s);
    for op in ops {
        h.apply(op)?;
    }
    h.drain()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn every_request_ends_and_memory_stays_consistent(
        setup in setup_strategy(),
        ops in prop::collection::vec(op_strategy(), 1..120),
    ) {
        match setup.contiguous {
            None => {
                let kv = PagedAllocator::new(PagedConfig {
                    num_gpu_blocks: setup.num_gpu_blocks,
                    num_cpu_blocks: setup.num_cpu_blocks,
                    block_size: setup.block_size,
                    enable_prefix_caching: setup.caching,
                }).unwrap();
                run(Scheduler::new(setup.config.clone(), kv).unwrap(), &ops)?;
            }
            Some(reservation) => {
                let kv = ContiguousAllocator::new(ContiguousConfig {
                    num_gpu_blocks: setup.num_gpu_blocks,
                    num_cpu_blocks: setup.num_cpu_blocks,
                    block_size: setup.block_size,
                    reservation,
                }).unwrap();
                run(Scheduler::new(setup.config.clone(), kv).unwrap(), &ops)?;
            }
        }
    }
}

/// Long prompts prefilling, then a short prompt arriving: how the bound on
/// its wait is derived is in `short_prompt_starts_within_a_bound_beside_long_prefills`.
#[derive(Clone, Debug)]
struct ShortBesideLong {
    config: SchedulerConfig,
    block_size: usize,
    long_prompts: Vec<(usize, usize)>,
    short_len: usize,
    arrives_after: usize,
}

fn short_beside_long_strategy() -> impl Strategy<Value = ShortBesideLong> {
    (
        (2usize..6).prop_flat_map(|partial| (Just(partial), 1..partial)),
        prop::collection::vec((0usize..300, 1usize..20), 1..4),
        0usize..4,
        0usize..64,
        prop::option::of(2usize..16),
        (prop::sample::select(vec![1usize, 4, 16]), any::<bool>(), any::<bool>()),
        (any::<u32>(), 0usize..8),
    )
        .prop_map(
            |(
                (partial, long_partial),
                longs,
                spare_seqs,
                spare_budget,
                threshold,
                (block_size, async_scheduling, priority),
                (short_pick, arrives_after),
            )| {
                let max_model_len = 512;
                let max_num_seqs = longs.len() + 1 + spare_seqs;
                let max_num_batched_tokens = max_num_seqs + partial + spare_budget;
                let config = SchedulerConfig {
                    max_num_batched_tokens,
                    max_num_seqs,
                    max_model_len,
                    long_prefill_token_threshold: threshold,
                    max_num_partial_prefills: partial,
                    max_long_partial_prefills: long_partial,
                    async_scheduling,
                    policy: if priority { Policy::Priority } else { Policy::Fcfs },
                    ..SchedulerConfig::default()
                };
                let long_threshold = config.long_prompt_threshold();
                // Longer than the threshold and than a whole step's budget.
                let shortest_long = long_threshold.max(max_num_batched_tokens) + 1;
                let long_prompts = longs
                    .into_iter()
                    .map(|(extra, max_tokens)| ((shortest_long + extra).min(400), max_tokens))
                    .collect();
                let short_len = 1 + short_pick as usize % long_threshold;
                ShortBesideLong { config, block_size, long_prompts, short_len, arrives_after }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// With concurrent partial prefills (and `max_long_partial_prefills <
    /// max_num_partial_prefills`), a short prompt arriving while long ones
    /// prefill gets its first token within `L + 2 + ceil(s / share)` steps:
    /// at most `L` steps in which long prompts ranked before it start (each
    /// takes what the step has left), one in which it starts, then at least
    /// `share = (budget - max_num_seqs) / max_num_partial_prefills` of its
    /// `s` tokens per step; one more under asynchronous scheduling, whose
    /// samples are applied a step later. The KV pool is large enough that
    /// nothing is preempted.
    #[test]
    fn short_prompt_starts_within_a_bound_beside_long_prefills(case in short_beside_long_strategy()) {
        let cfg = case.config.clone();
        let kv = PagedAllocator::new(PagedConfig {
            num_gpu_blocks: (case.long_prompts.len() + 1) * cfg.max_model_len.div_ceil(case.block_size),
            num_cpu_blocks: 0,
            block_size: case.block_size,
            enable_prefix_caching: false,
        }).unwrap();
        let mut h = Harness::new(Scheduler::new(cfg.clone(), kv).unwrap());
        for (i, &(len, max_tokens)) in case.long_prompts.iter().enumerate() {
            let prompt = (0..len as u32).map(|t| 1000 + t).collect();
            h.add(NewRequest { priority: i as i32 % 2, ..NewRequest::new(RequestId(i as u64), prompt, max_tokens) })?;
        }
        for step in 0..case.arrives_after {
            h.step(step as u64, None)?;
        }
        let short = RequestId(100);
        h.add(NewRequest { priority: 1, ..NewRequest::new(short, vec![7; case.short_len], 1) })?;
        let share = (cfg.max_num_batched_tokens - cfg.max_num_seqs) / cfg.max_num_partial_prefills;
        let bound = cfg.max_long_partial_prefills + 2 + case.short_len.div_ceil(share)
            + usize::from(cfg.async_scheduling);
        let mut waited = 0;
        while h.requests[&short].sampled.is_empty() {
            waited += 1;
            prop_assert!(waited <= bound, "no first token after {} steps (bound {})", waited, bound);
            h.step(waited as u64, None)?;
        }
        h.drain()?;
    }
}

/// One client's fan-out (many requests of one fairness group, some with
/// `n > 1`) and another client's single request arriving later.
#[derive(Clone, Debug)]
struct FanOutBesideOne {
    max_num_seqs: usize,
    fan_out: Vec<(usize, usize, usize)>,
    single_len: usize,
    arrives_after: usize,
    async_scheduling: bool,
}

fn fan_out_strategy() -> impl Strategy<Value = FanOutBesideOne> {
    (
        2usize..6,
        prop::collection::vec((1usize..20, 1usize..10, 1usize..3), 2..12),
        1usize..8,
        0usize..6,
        any::<bool>(),
    )
        .prop_map(|(max_num_seqs, fan_out, single_len, arrives_after, async_scheduling)| {
            let fan_out = fan_out
                .into_iter()
                .map(|(len, max_tokens, n)| (len, max_tokens, n.min(max_num_seqs)))
                .collect();
            FanOutBesideOne { max_num_seqs, fan_out, single_len, arrives_after, async_scheduling }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// The single request starts within `2 + 2 + 10 + 1` steps of its
    /// arrival, however large the fan-out: at most the time for one running
    /// sequence to finish (its prompt, at most 19 tokens, takes at most 2
    /// steps at its share of the budget; then at most 9 more tokens), one
    /// step to start, one more under asynchronous scheduling. The fan-out's
    /// requests start in their arrival order.
    #[test]
    fn a_fan_out_does_not_starve_another_clients_request(case in fan_out_strategy()) {
        let cfg = SchedulerConfig {
            max_num_batched_tokens: 64,
            max_num_seqs: case.max_num_seqs,
            max_model_len: 64,
            async_scheduling: case.async_scheduling,
            ..SchedulerConfig::default()
        };
        let kv = PagedAllocator::new(PagedConfig {
            num_gpu_blocks: 64 * case.max_num_seqs,
            num_cpu_blocks: 0,
            block_size: 4,
            enable_prefix_caching: false,
        }).unwrap();
        let mut h = Harness::new(Scheduler::new(cfg.clone(), kv).unwrap());
        for (i, &(len, max_tokens, n)) in case.fan_out.iter().enumerate() {
            let prompt = (0..len as u32).map(|t| 1000 * (i as u32 + 1) + t).collect();
            let r = NewRequest { n, fairness_group: Some(7), ..NewRequest::new(RequestId(i as u64), prompt, max_tokens) };
            h.add(r)?;
        }
        let mut started: BTreeMap<RequestId, usize> = BTreeMap::new();
        let single = RequestId(100);
        let mut step = 0;
        let mut single_started = None;
        while h.s.has_unfinished() || h.in_flight.is_some() {
            if step == case.arrives_after {
                h.add(NewRequest::new(single, vec![3; case.single_len], 2))?;
            }
            step += 1;
            prop_assert!(step < 5000, "no progress");
            h.step(step as u64, None)?;
            for (&r, _) in h.requests.iter() {
                let running = h.s.request_seqs(r).iter().any(|&q| h.s.seq(q).unwrap().num_computed_tokens() > 0);
                if running || !h.requests[&r].sampled.is_empty() {
                    started.entry(r).or_insert(step);
                }
            }
            if single_started.is_none() && started.contains_key(&single) {
                single_started = Some(step);
            }
        }
        let arrived = case.arrives_after;
        let bound = 2 + 2 + 10 + usize::from(case.async_scheduling);
        if let Some(at) = single_started {
            prop_assert!(at - arrived <= bound, "the single request started {} steps after it arrived (bound {})", at - arrived, bound);
        }
        let order: Vec<usize> = (0..case.fan_out.len()).filter_map(|i| started.get(&RequestId(i as u64)).copied()).collect();
        prop_assert!(order.is_sorted(), "the fan-out's requests started out of order: {:?}", order);
    }
}
