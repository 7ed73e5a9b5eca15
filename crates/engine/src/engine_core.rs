//! The engine core: schedule -> launch -> apply, on token ids only. It owns
//! the scheduler, the model runner and the step in flight, and knows requests
//! by the scheduler's [`RequestId`] alone. Every token-level finish (EOS,
//! stop token ids, `min_tokens`, length) is decided by the scheduler's
//! update and reported here as it was decided; stops found later, from text,
//! come back in through [`EngineCore::finish_seqs`], the way an abort does
//! through [`EngineCore::abort`]. No text is made here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagoda_backend::{Backend, SampledToken};
use pagoda_paged_kv::PagedAllocator;
use pagoda_scheduler::{FinishReason, NewRequest, RequestId, Scheduler, SchedulerOutput, SeqId, TokenId};

use crate::batch::SampleTarget;
use crate::error::EngineError;
use crate::input::EngineCoreRequest;
use crate::metrics::EngineMetrics;
use crate::request::{PromptLogprob, TokenLogprob};
use crate::runner::ModelRunner;
use crate::speculative::{DraftRequest, Speculation, Speculator, PROBE_SEQS};

/// Host wall-clock time of each phase of `step()`, summed over steps; the
/// runner's own split is in [`RunnerTimings`](crate::RunnerTimings).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTimings {
    pub steps: u64,
    pub schedule: Duration,
    /// Building the step's inputs and sampling rows.
    pub prepare: Duration,
    /// The runner enqueueing the step: block moves, uploads, the forward
    /// pass, sampling (on a device backend, without waiting for any of it).
    pub launch: Duration,
    /// Waiting for the device to return a step's sampled tokens.
    pub wait: Duration,
    /// Scheduler update, detokenization, outputs, metrics.
    pub update: Duration,
    /// Steps launched while the step before was still in flight
    /// (asynchronous scheduling at work).
    pub launched_ahead: u64,
}

/// One token a step sampled for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TokenEvent {
    pub request_id: RequestId,
    /// Which of the request's `n` samples.
    pub sample_index: usize,
    pub token: TokenId,
    /// The token's logprob and top alternatives, when the request asked.
    pub logprob: Option<TokenLogprob>,
    /// `Some` when this token ended the sequence (its blocks are freed).
    pub finish: Option<FinishReason>,
}

/// A request scheduled for the first time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScheduledEvent {
    pub request_id: RequestId,
    pub at: Instant,
    /// Prompt tokens found in the prefix cache.
    pub num_cached_tokens: usize,
}

/// What a step of the core produced: first schedulings, then the tokens of
/// at most one applied step, and the prompt logprobs of requests whose first
/// token is among them (one entry per prompt token, the first `None`).
#[derive(Debug, Default)]
pub(crate) struct CoreOutput {
    pub scheduled: Vec<ScheduledEvent>,
    pub tokens: Vec<TokenEvent>,
    pub prompt_logprobs: Vec<(RequestId, Vec<Option<PromptLogprob>>)>,
}

/// What the core keeps of a live request (the runner keeps what sampling needs).
struct RequestState {
    /// Whether a step has scheduled it yet.
    scheduled: bool,
    /// Whether its tokens carry logprobs.
    wants_logprobs: bool,
    /// When it asked for prompt logprobs: one entry per prompt token, filled
    /// in as its prompt chunks run, handed out with its first token.
    prompt_logprobs: Option<Vec<Option<PromptLogprob>>>,
    /// Under a structured-output constraint: its decodes carry the tokens
    /// the grammar forces as drafts (fast-forward), never a proposer's.
    constrained: bool,
}

/// A step enqueued on the device whose sampled tokens are not applied yet.
struct InFlightStep<B: Backend> {
    out: SchedulerOutput,
    /// Who samples each row of `sampled`.
    samplers: Vec<SampleTarget>,
    /// `None` when no row samples (a prefill chunk that ends no prompt).
    sampled: Option<B::Sampled>,
    prompt_tokens: usize,
    /// Whether the next step may be scheduled before this one is applied.
    schedule_ahead: bool,
}

/// Scheduler + model runner + the step in flight.
pub(crate) struct EngineCore<B: Backend> {
    scheduler: Scheduler<PagedAllocator>,
    runner: ModelRunner<B>,
    requests: HashMap<RequestId, RequestState>,
    next_request_id: u64,
    async_scheduling: bool,
    metrics: Arc<EngineMetrics>,
    /// Scheduler counters at the last metrics update (metrics take deltas).
    last_counters: (u64, u64, u64),
    /// With LoRA on: the slots (`max_lora` in the metrics), and the names of
    /// the adapters requests have run with, by id.
    lora_names: Option<(usize, HashMap<u32, String>)>,
    timings: StepTimings,
    /// The step the device is running, whose tokens the next step applies
    /// (asynchronous scheduling; always `None` between steps otherwise).
    in_flight: Option<InFlightStep<B>>,
    /// Prompt logprobs of requests whose first token was applied, for the
    /// next [`CoreOutput`].
    ready_prompt_logprobs: Vec<(RequestId, Vec<Option<PromptLogprob>>)>,
    /// Speculative decoding, when configured.
    speculator: Option<Speculator>,
    /// Whether the next step speculates, decided before the step in flight
    /// is applied (a step that proposes needs every token on the host).
    speculate_next: Option<Speculation>,
    /// Most tokens a grammar's forced run may propose a step (0: off).
    max_fast_forward_tokens: usize,
    fast_forward: FastForwardStats,
    /// Live requests under a constraint (none: no forced tokens to look for).
    num_constrained: usize,
}

/// What structured outputs' fast-forward did: verifications of forced
/// tokens, the tokens proposed, and those accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastForwardStats {
    pub num_drafts: u64,
    pub num_draft_tokens: u64,
    pub num_accepted_tokens: u64,
}

impl<B: Backend> EngineCore<B> {
    pub fn new(
        scheduler: Scheduler<PagedAllocator>,
        runner: ModelRunner<B>,
        async_scheduling: bool,
        metrics: Arc<EngineMetrics>,
    ) -> Self {
        Self {
            scheduler,
            runner,
            requests: HashMap::new(),
            next_request_id: 0,
            async_scheduling,
            metrics,
            last_counters: (0, 0, 0),
            lora_names: None,
            timings: StepTimings::default(),
            in_flight: None,
            ready_prompt_logprobs: Vec::new(),
            speculator: None,
            speculate_next: None,
            max_fast_forward_tokens: 0,
            fast_forward: FastForwardStats::default(),
            num_constrained: 0,
        }
    }

    /// Reports `lora_requests_info` for an engine with `max_loras` slots.
    pub fn enable_lora_metrics(&mut self, max_loras: usize) {
        self.metrics.enable_lora_info();
        self.metrics.set_lora_info(max_loras, &[], &[]);
        self.lora_names = Some((max_loras, HashMap::new()));
    }

    /// Proposes up to `max` grammar-forced tokens a step (0: off).
    pub fn set_max_fast_forward_tokens(&mut self, max: usize) {
        self.max_fast_forward_tokens = max;
    }

    pub fn fast_forward_stats(&self) -> FastForwardStats {
        self.fast_forward
    }

    /// Turns on speculative decoding with this proposer.
    pub fn set_speculator(&mut self, speculator: Speculator) {
        self.speculator = Some(speculator);
    }

    pub fn speculator(&self) -> Option<&Speculator> {
        self.speculator.as_ref()
    }

    pub fn scheduler(&self) -> &Scheduler<PagedAllocator> {
        &self.scheduler
    }

    pub fn runner(&self) -> &ModelRunner<B> {
        &self.runner
    }

    pub fn runner_mut(&mut self) -> &mut ModelRunner<B> {
        &mut self.runner
    }

    pub fn timings(&self) -> StepTimings {
        self.timings
    }

    /// Forgets every cached prefix block no sequence holds.
    pub fn reset_prefix_cache(&mut self) -> usize {
        self.scheduler.reset_prefix_cache()
    }

    /// Whether a step's results are still to be applied.
    pub fn has_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Queues a request for the next step and returns its id.
    pub fn add_request(&mut self, req: &EngineCoreRequest) -> Result<RequestId, EngineError> {
        let id = RequestId(self.next_request_id);
        self.next_request_id += 1;
        let new = NewRequest {
            request_id: id,
            prompt_token_ids: req.prompt_token_ids().to_vec(),
            max_tokens: req.max_tokens(),
            n: req.n(),
            priority: req.priority(),
            arrival: self.next_request_id as f64,
            eos_token_ids: req.eos_token_ids().to_vec(),
            stop_token_ids: req.stop_token_ids().to_vec(),
            ignore_eos: req.ignore_eos(),
            min_tokens: req.min_tokens(),
            cache_salt: req.cache_salt(),
            fairness_group: req.fairness_group().map(u64::from),
            // Cached blocks never had their logits computed.
            skip_prefix_cache: req.prompt_logprobs().is_some(),
            lora: req.lora().map(|(id, _)| *id),
        };
        if let (Some((_, names)), Some((id, _)), Some(name)) =
            (&mut self.lora_names, req.lora(), req.lora_name())
        {
            names.entry(*id).or_insert_with(|| name.to_string());
        }
        // The input processor refuses everything the scheduler would.
        self.scheduler
            .add_request(new)
            .map_err(|e| EngineError::Internal(format!("the scheduler refused a validated request: {e}")))?;
        self.runner.add_request(
            id,
            req.prompt_token_ids(),
            Arc::new(req.sampling().clone()),
            req.seed(),
            req.constraint().cloned(),
            req.lora().cloned(),
        );
        if let Some(top_k) = req.prompt_logprobs() {
            self.runner.want_prompt_logprobs(id, top_k);
        }
        let prompt_logprobs = req.prompt_logprobs().map(|_| vec![None; req.prompt_token_ids().len()]);
        self.requests.insert(
            id,
            RequestState {
                scheduled: false,
                wants_logprobs: req.sampling().logprobs.is_some(),
                prompt_logprobs,
                constrained: req.constraint().is_some(),
            },
        );
        self.num_constrained += usize::from(req.constraint().is_some());
        Ok(id)
    }

    /// Ends a request's unfinished sequences at once, freeing their blocks.
    pub fn abort(&mut self, id: RequestId) {
        self.scheduler.abort_request(id);
        self.remove_request(id);
        // The engine may go idle now (no further step): show the freed blocks at once.
        self.update_gauges();
    }

    /// Ends the given samples `(request, sample index)` at once, freeing
    /// their blocks, as [`Self::abort`] does for a whole request: for stops
    /// the core cannot see (stop strings). Samples already ended are skipped.
    pub fn finish_seqs(&mut self, seqs: &[(RequestId, usize)]) {
        if seqs.is_empty() {
            return;
        }
        for &(id, index) in seqs {
            let scheduler = &self.scheduler;
            let seq = scheduler
                .request_seqs(id)
                .iter()
                .copied()
                .find(|&s| scheduler.seq(s).is_some_and(|q| q.sample_index() == index));
            if let Some(seq) = seq {
                self.scheduler.finish_seq(seq);
            }
            self.forget_if_done(id);
        }
        self.update_gauges();
    }

    /// After a failed step: drops the steps not applied; their sequences
    /// recompute from their known tokens.
    pub fn discard_unapplied(&mut self) {
        self.speculate_next = None;
        let dropped = self.in_flight.take().is_some();
        let requeued = self.scheduler.discard_unapplied();
        self.runner.discard_unapplied();
        if dropped || !requeued.is_empty() {
            tracing::warn!(requeued = requeued.len(), "a failed step dropped the steps in flight");
        }
    }

    /// Applies the step in flight now if the next one cannot be scheduled
    /// before its tokens are on the host (penalties need the whole history;
    /// a fork creates its samples at the update), so that whatever its
    /// tokens end is ended before the next step is scheduled.
    pub fn apply_before_scheduling(&mut self) -> Result<Option<CoreOutput>, EngineError> {
        // Proposals extend every token a sequence has: none may be in flight.
        let speculate = self.decide_speculation();
        let must_apply = self.in_flight.as_ref().is_some_and(|f| !f.schedule_ahead || speculate);
        if !must_apply && self.scheduler.can_schedule() {
            return Ok(None);
        }
        let Some(step) = self.in_flight.take() else { return Ok(None) };
        let tokens = self.apply(step)?;
        let prompt_logprobs = std::mem::take(&mut self.ready_prompt_logprobs);
        Ok(Some(CoreOutput { scheduled: Vec::new(), tokens, prompt_logprobs }))
    }

    /// One step: schedule, launch on the device, then apply the sampled
    /// tokens of the step before (asynchronous scheduling) or of this one.
    pub fn step(&mut self) -> Result<CoreOutput, EngineError> {
        let started = Instant::now();
        let mut tokens = Vec::new();
        if self.decide_speculation() {
            if let Some(previous) = self.in_flight.take() {
                tokens = self.apply(previous)?;
            }
            self.propose_drafts()?;
        }
        self.speculate_next = None;
        self.propose_forced_tokens();
        let out = self.scheduler.schedule()?;
        if let Some(spec) = self.speculator.as_mut() {
            for &seq in &out.finished_seqs {
                spec.forget(seq);
                self.runner.forget_draft(seq);
            }
        }
        let now = Instant::now();
        self.timings.schedule += now - started;
        let scheduled = self.first_scheduled(&out, now);
        let launched = self.launch(out, now)?;
        if let Some(previous) = self.in_flight.take() {
            tokens.extend(self.apply(previous)?);
        }
        self.in_flight = launched;
        if !self.async_scheduling {
            if let Some(step) = self.in_flight.take() {
                tokens.extend(self.apply(step)?);
            }
        }
        let prompt_logprobs = std::mem::take(&mut self.ready_prompt_logprobs);
        Ok(CoreOutput { scheduled, tokens, prompt_logprobs })
    }

    /// Whether the next step speculates (decided once per step).
    fn decide_speculation(&mut self) -> bool {
        self.speculation() != Speculation::Off
    }

    /// What the next step does with speculation (decided once per step).
    fn speculation(&mut self) -> Speculation {
        let running = self.scheduler.num_running();
        match (&mut self.speculator, self.speculate_next) {
            (None, _) => Speculation::Off,
            (Some(_), Some(decided)) => decided,
            (Some(spec), None) => {
                let decided = spec.active(running);
                self.speculate_next = Some(decided);
                decided
            }
        }
    }

    /// Asks the proposer for drafts for every decoding sequence that may
    /// speculate, and hands them to the scheduler (which cuts them to the
    /// step's budget and the requests' limits).
    fn propose_drafts(&mut self) -> Result<(), EngineError> {
        let probe = self.speculation() == Speculation::Probe;
        let Some(spec) = self.speculator.as_mut() else { return Ok(()) };
        let k = spec.config().num_speculative_tokens;
        let requests = &self.requests;
        let wanted: Vec<DraftRequest<'_>> = self
            .scheduler
            .decoding_seqs()
            .filter(|s| requests.get(&s.request_id()).is_some_and(|r| !r.constrained))
            .take(if probe { PROBE_SEQS } else { usize::MAX })
            .map(|s| DraftRequest { seq_id: s.seq_id(), tokens: s.all_token_ids(), max_drafts: k })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let runner = &mut self.runner;
        let drafts = spec.propose(&wanted, |seqs| runner.propose_with_draft(seqs))?;
        spec.note_proposals(drafts.iter().any(|d| !d.is_empty()));
        let ids: Vec<SeqId> = wanted.iter().map(|w| w.seq_id).collect();
        for (seq, drafts) in ids.into_iter().zip(drafts) {
            if !drafts.is_empty() {
                self.scheduler.set_draft_tokens(seq, drafts);
            }
        }
        Ok(())
    }

    /// Proposes, for every decoding sequence under a constraint, the tokens
    /// its grammar forces next (their steps are never scheduled ahead, so
    /// every token they sampled is applied here).
    fn propose_forced_tokens(&mut self) {
        let max = self.max_fast_forward_tokens;
        if max == 0 || self.num_constrained == 0 {
            return;
        }
        let requests = &self.requests;
        let constrained: Vec<SeqId> = self
            .scheduler
            .decoding_seqs()
            .filter(|s| requests.get(&s.request_id()).is_some_and(|r| r.constrained))
            .map(|s| s.seq_id())
            .collect();
        for seq in constrained {
            let forced = self.runner.forced_tokens(seq, max);
            if !forced.is_empty() {
                self.scheduler.set_draft_tokens(seq, forced);
            }
        }
    }

    /// Files the prompt logprobs the runner computed under their requests.
    fn collect_prompt_logprobs(&mut self) {
        for (id, first, entries) in self.runner.take_prompt_logprobs() {
            let Some(slots) = self.requests.get_mut(&id).and_then(|r| r.prompt_logprobs.as_mut()) else {
                continue;
            };
            for (i, entry) in entries.into_iter().enumerate() {
                if let Some(slot) = slots.get_mut(first + i + 1) {
                    *slot = Some(entry);
                }
            }
        }
    }

    /// The prompt logprobs of the requests whose first tokens are among
    /// `tokens` (each handed out once).
    fn take_prompt_logprobs(&mut self, tokens: &[TokenEvent]) {
        for event in tokens {
            let Some(state) = self.requests.get_mut(&event.request_id) else { continue };
            if let Some(entries) = state.prompt_logprobs.take() {
                let missing = entries.iter().skip(1).filter(|e| e.is_none()).count();
                if missing > 0 {
                    tracing::warn!(request = %event.request_id, missing, "prompt logprobs incomplete");
                }
                self.ready_prompt_logprobs.push((event.request_id, entries));
            }
        }
    }

    fn first_scheduled(&mut self, out: &SchedulerOutput, now: Instant) -> Vec<ScheduledEvent> {
        let mut events = Vec::new();
        for entry in &out.scheduled {
            if let Some(state) = self.requests.get_mut(&entry.request_id) {
                if !state.scheduled {
                    state.scheduled = true;
                    events.push(ScheduledEvent {
                        request_id: entry.request_id,
                        at: now,
                        num_cached_tokens: entry.start_position,
                    });
                }
            }
        }
        events
    }

    /// Builds the step's inputs and sampling rows and enqueues it; `None`
    /// when nothing was scheduled. `now`: when scheduling ended.
    fn launch(&mut self, out: SchedulerOutput, now: Instant) -> Result<Option<InFlightStep<B>>, EngineError> {
        // Verified drafts are not prompt tokens.
        let prompt_tokens = out.scheduled[out.num_decodes.min(out.scheduled.len())..]
            .iter()
            .filter(|e| e.num_draft_tokens == 0)
            .map(|e| e.token_ids.len())
            .sum();
        let previous = self.in_flight.as_ref();
        // The runner applies the step's changes to its persistent batch. Its
        // `schedule_ahead` is false when penalties need the whole token
        // history, which the host lacks while this step's tokens are still on
        // the device.
        let step = self.runner.prepare(&out, previous.map_or(&[], |p| &p.samplers))?;
        let prepared = Instant::now();
        self.timings.prepare += prepared - now;
        self.timings.launched_ahead += u64::from(previous.is_some() && !out.is_empty());
        let sampled = self.runner.launch(&out, previous.and_then(|p| p.sampled.as_ref()))?;
        self.collect_prompt_logprobs();
        self.timings.launch += prepared.elapsed();
        Ok((!out.is_empty()).then(|| InFlightStep {
            out,
            samplers: step.samplers,
            sampled,
            prompt_tokens,
            schedule_ahead: step.schedule_ahead,
        }))
    }

    /// Waits for a step's sampled tokens and applies them to the scheduler.
    fn apply(&mut self, step: InFlightStep<B>) -> Result<Vec<TokenEvent>, EngineError> {
        let decode_only = step.out.is_decode_only();
        let waited = Instant::now();
        // Per verification, its drafts; and the sequences whose drafts were
        // forced tokens of a grammar, counted apart from the speculator's
        // (they do not steer its off switch).
        let mut drafts: rustc_hash::FxHashMap<SeqId, &[TokenId]> = rustc_hash::FxHashMap::default();
        let mut forced_seqs = std::collections::HashSet::new();
        for e in step.out.scheduled.iter().filter(|e| e.num_draft_tokens > 0) {
            drafts.insert(e.seq_id, e.draft_token_ids());
            if self.requests.get(&e.request_id).is_some_and(|r| r.constrained) {
                forced_seqs.insert(e.seq_id);
            }
        }
        let (sampled, verified) = match step.sampled {
            Some(sampled) => self.runner.finish(sampled, &step.samplers, decode_only, &drafts)?,
            None => (Vec::new(), Vec::new()),
        };
        let started = Instant::now();
        self.timings.wait += started - waited;
        // Per sequence, the tokens it keeps in order (a verification keeps
        // its rows up to the first rejected draft's), and the last of them,
        // the one it sampled after any accepted drafts.
        let accepted: HashMap<SeqId, usize> = verified.iter().copied().collect();
        let mut sampled_ids: Vec<(SeqId, u32)> = Vec::with_capacity(step.samplers.len());
        // The kept tokens in row order (a sequence's are consecutive), and
        // per sequence where its next one is.
        let mut kept: Vec<Option<SampledToken>> = Vec::with_capacity(step.samplers.len());
        let mut next_kept: HashMap<SeqId, usize> = HashMap::with_capacity(step.samplers.len());
        for (target, token) in step.samplers.iter().zip(sampled) {
            let keep = match target.verify {
                None => Some(true),
                Some(v) => {
                    let a = accepted.get(&target.seq_id).copied().unwrap_or(0);
                    (v.index <= a).then_some(v.index == a)
                }
            };
            if let Some(last) = keep {
                if last {
                    sampled_ids.push((target.seq_id, token.token));
                }
                next_kept.entry(target.seq_id).or_insert(kept.len());
                kept.push(Some(token));
            }
        }
        let mut speculated = Vec::with_capacity(verified.len());
        for &(seq, a) in &verified {
            let drafted = drafts.get(&seq).map_or(0, |d| d.len());
            if forced_seqs.contains(&seq) {
                self.fast_forward.num_drafts += 1;
                self.fast_forward.num_draft_tokens += drafted as u64;
                self.fast_forward.num_accepted_tokens += a as u64;
                self.metrics.fast_forward_draft_tokens.inc_by(drafted as u64);
                self.metrics.fast_forward_accepted_tokens.inc_by(a as u64);
            } else {
                speculated.push((drafted, a));
            }
        }
        if let Some(spec) = self.speculator.as_mut() {
            spec.record_step(speculated.iter().copied());
            self.metrics.record_speculation(&speculated);
        }
        let updates = self.scheduler.update_from_verified_output(&step.out, &sampled_ids, &verified)?;

        self.metrics.engine_steps.inc();
        self.metrics.prompt_tokens.inc_by(step.prompt_tokens as u64);
        self.metrics.generation_tokens.inc_by(updates.len() as u64);
        let step_tokens: usize = step.out.scheduled.iter().map(|e| e.token_ids.len()).sum();
        self.metrics.iteration_tokens.observe(step_tokens as f64);
        let mut events = Vec::with_capacity(updates.len());
        for update in updates {
            let wants_logprobs = self.requests.get(&update.request_id).is_some_and(|r| r.wants_logprobs);
            let token = next_kept.get_mut(&update.seq_id).and_then(|next| {
                *next += 1;
                kept.get_mut(*next - 1).and_then(Option::take)
            });
            let logprob = if wants_logprobs {
                token.map(|s| TokenLogprob { token: s.token, logprob: s.logprob, top: s.top_logprobs })
            } else {
                None
            };
            events.push(TokenEvent {
                request_id: update.request_id,
                sample_index: update.sample_index,
                token: update.new_token,
                logprob,
                finish: update.finish_reason,
            });
        }
        self.take_prompt_logprobs(&events);
        // After the loop: all of a request's samples may end in one step.
        for event in events.iter().filter(|e| e.finish.is_some()) {
            self.forget_if_done(event.request_id);
        }
        self.update_gauges();
        self.timings.update += started.elapsed();
        self.timings.steps += 1;
        Ok(events)
    }

    /// Drops a request's sampling state once the scheduler has none of its
    /// sequences left.
    fn forget_if_done(&mut self, id: RequestId) {
        if self.scheduler.request_seqs(id).is_empty() {
            self.remove_request(id);
        }
    }

    fn remove_request(&mut self, id: RequestId) {
        if self.requests.remove(&id).is_some_and(|r| r.constrained) {
            self.num_constrained -= 1;
        }
    }

    fn update_gauges(&mut self) {
        let m = &self.metrics;
        m.requests_running.set(self.scheduler.num_running() as i64);
        m.requests_waiting.set(self.scheduler.num_waiting() as i64);
        m.requests_swapped.set(self.scheduler.num_swapped() as i64);
        let usage = self.scheduler.kv_usage();
        m.kv_blocks_used.set(usage.used_blocks as i64);
        m.kv_blocks_free.set(usage.free_blocks() as i64);
        m.kv_blocks_cached.set(usage.cached_blocks as i64);
        m.kv_cache_usage.set(usage.used_blocks as f64 / usage.num_gpu_blocks.max(1) as f64);
        let prefix = self.scheduler.prefix_cache_stats();
        let stats = self.scheduler.stats();
        let (q, h, p) = self.last_counters;
        m.prefix_cache_queries.inc_by(prefix.queried_tokens.saturating_sub(q));
        m.prefix_cache_hits.inc_by(prefix.hit_tokens.saturating_sub(h));
        m.preemptions.inc_by(stats.num_preemptions.saturating_sub(p));
        self.last_counters = (prefix.queried_tokens, prefix.hit_tokens, stats.num_preemptions);
        if let Some((max_loras, names)) = &self.lora_names {
            let (running, waiting) = self.scheduler.lora_adapters();
            let named = |ids: &[u32]| -> Vec<&str> {
                ids.iter().map(|id| names.get(id).map_or("?", String::as_str)).collect()
            };
            self.metrics.set_lora_info(*max_loras, &named(&running), &named(&waiting));
        }
    }
}
