//! The synchronous engine: one `step()` schedules, runs the model, samples,
//! and turns sampled tokens into per-request output deltas.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use pagoda_backend::{Backend, SamplingParams};
use pagoda_models::{ChatTemplate, LoadedModel, Tokenizer};
use pagoda_paged_kv::{PagedAllocator, PagedConfig};
use pagoda_scheduler::{
    FinishReason as SchedFinish, NewRequest, RequestId, Scheduler, SchedulerOutput, SeqId, SeqUpdate,
};

use crate::batch::SampleTarget;
use crate::config::EngineConfig;
use crate::detokenizer::IncrementalDetokenizer;
use crate::error::EngineError;
use crate::metrics::EngineMetrics;
use crate::request::{FinishReason, GenerationRequest, RequestOutput, SeqDelta, StopReason, TokenLogprob};
use crate::runner::ModelRunner;
use crate::stop::{StopChecker, StopScan, MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES};

/// Facts about the served model that request validation and the API need.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    /// Default sampling parameters from generation_config.json.
    pub default_sampling: SamplingParams,
    pub num_gpu_blocks: usize,
    pub block_size: usize,
}

struct SeqState {
    detokenizer: IncrementalDetokenizer,
    /// All output text so far (truncated at a stop string once matched).
    text: String,
    /// Bytes of `text` already sent to the client.
    sent: usize,
    /// Where `text` has got to in the request's stop-string automaton.
    stop_scan: StopScan,
    finished: Option<(FinishReason, Option<StopReason>)>,
    last_token_at: Option<Instant>,
    num_tokens: usize,
}

struct RequestState {
    request: GenerationRequest,
    scheduler_id: RequestId,
    stop: StopChecker,
    seqs: Vec<Option<SeqState>>,
    arrived: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    num_cached_tokens: usize,
}

/// The engine: scheduler + model runner + per-request output state.
pub struct LlmEngine<B: Backend> {
    config: EngineConfig,
    info: ModelInfo,
    tokenizer: Tokenizer,
    chat_template: Option<Arc<ChatTemplate>>,
    scheduler: Scheduler<PagedAllocator>,
    runner: ModelRunner<B>,
    requests: HashMap<String, RequestState>,
    by_scheduler_id: HashMap<RequestId, String>,
    next_request_id: u64,
    next_seed: u64,
    metrics: Arc<EngineMetrics>,
    /// Scheduler counters at the last metrics update (metrics take deltas).
    last_counters: (u64, u64, u64),
    timings: StepTimings,
    /// The step the device is running, whose tokens the next `step()` applies
    /// (asynchronous scheduling; always `None` between steps otherwise).
    in_flight: Option<InFlightStep<B>>,
}

/// Host wall-clock time of each phase of `step()`, summed over steps; the
/// runner's own split is in [`RunnerTimings`](crate::RunnerTimings).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTimings {
    pub steps: u64,
    pub schedule: std::time::Duration,
    /// Building the step's inputs and sampling rows.
    pub prepare: std::time::Duration,
    /// The runner enqueueing the step: block moves, uploads, the forward
    /// pass, sampling (on a device backend, without waiting for any of it).
    pub launch: std::time::Duration,
    /// Waiting for the device to return a step's sampled tokens.
    pub wait: std::time::Duration,
    /// Scheduler update, detokenization, outputs, metrics.
    pub update: std::time::Duration,
    /// Steps launched while the step before was still in flight
    /// (asynchronous scheduling at work).
    pub launched_ahead: u64,
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

impl<B: Backend> LlmEngine<B> {
    /// Sizes the KV pool from the config and the memory left after the
    /// weights, and assembles the engine.
    pub fn new(backend: B, loaded: LoadedModel<B>, mut config: EngineConfig) -> Result<Self, EngineError> {
        config.validate()?;
        let model_config = loaded.model.config().clone();
        config.check_max_model_len(&model_config)?;
        let memory = backend.memory_info().ok();
        let num_gpu_blocks = config.num_gpu_blocks(&backend, &model_config, memory)?;
        config.fit_max_model_len_to_kv_cache(&model_config, num_gpu_blocks)?;
        let num_cpu_blocks = config.num_cpu_blocks(&backend, &model_config);
        let kv = PagedAllocator::new(PagedConfig {
            num_gpu_blocks,
            num_cpu_blocks,
            block_size: config.block_size,
            enable_prefix_caching: config.enable_prefix_caching,
        })
        .map_err(|e| EngineError::Config(e.to_string()))?;
        let scheduler =
            Scheduler::with_policy(config.scheduler_config(&model_config), kv, config.policy.build())
                .map_err(|e| EngineError::Config(e.to_string()))?;
        let mut runner =
            ModelRunner::new(backend, loaded.model, num_gpu_blocks, num_cpu_blocks, config.block_size)?;
        let graphs = !config.enforce_eager && runner.backend().supports_graphs();
        if graphs {
            let max_batch = config.max_graph_batch_size.min(config.max_num_seqs);
            runner.enable_decode_graphs(max_batch, config.max_model_len(&model_config))?;
        }
        let mut eos_token_ids = loaded.generation.eos_token_ids.clone();
        if eos_token_ids.is_empty() {
            eos_token_ids.extend(loaded.tokenizer.eos_token_id());
        }
        let info = ModelInfo {
            max_model_len: config.max_model_len(&model_config),
            vocab_size: model_config.vocab_size,
            eos_token_ids,
            default_sampling: loaded.generation.default_sampling_params(),
            num_gpu_blocks,
            block_size: config.block_size,
        };
        if !loaded.tokenizer.is_present() {
            tracing::warn!(
                "the model has no tokenizer: only token-id requests work, and outputs carry no text"
            );
        }
        let metrics = Arc::new(EngineMetrics::new());
        metrics.kv_blocks_total.set(num_gpu_blocks as i64);
        tracing::info!(
            num_gpu_blocks,
            num_cpu_blocks,
            block_size = config.block_size,
            max_model_len = info.max_model_len,
            device = %runner.backend().name(),
            graphs,
            "engine ready"
        );
        Ok(Self {
            next_seed: config.seed,
            config,
            info,
            tokenizer: loaded.tokenizer,
            chat_template: loaded.chat_template.map(Arc::new),
            scheduler,
            runner,
            requests: HashMap::new(),
            by_scheduler_id: HashMap::new(),
            next_request_id: 0,
            metrics,
            last_counters: (0, 0, 0),
            timings: StepTimings::default(),
            in_flight: None,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn chat_template(&self) -> Option<&Arc<ChatTemplate>> {
        self.chat_template.as_ref()
    }

    pub fn metrics(&self) -> Arc<EngineMetrics> {
        self.metrics.clone()
    }

    /// Pads decode steps into fixed buffers, and records graphs where the
    /// backend can, even where the engine did not turn this on itself (the CPU
    /// backend): tests check the padded path on the CPU with it.
    #[doc(hidden)]
    pub fn force_decode_graphs(&mut self) -> Result<(), EngineError> {
        let max_batch = self.config.max_graph_batch_size.min(self.config.max_num_seqs);
        self.runner.enable_decode_graphs(max_batch, self.info.max_model_len)
    }

    pub fn runner(&self) -> &ModelRunner<B> {
        &self.runner
    }

    pub fn scheduler(&self) -> &Scheduler<PagedAllocator> {
        &self.scheduler
    }

    /// Where `step()` spent its time so far.
    pub fn step_timings(&self) -> StepTimings {
        self.timings
    }

    /// Whether `step()` has work: live requests, or a step in flight whose
    /// results are still to be applied.
    pub fn has_unfinished_requests(&self) -> bool {
        !self.requests.is_empty() || self.in_flight.is_some()
    }

    pub fn num_unfinished_requests(&self) -> usize {
        self.requests.len()
    }

    /// Queues a request. It joins the batch at the next step.
    pub fn add_request(&mut self, mut req: GenerationRequest) -> Result<(), EngineError> {
        self.add_request_at(&mut req, Instant::now())?;
        Ok(())
    }

    /// [`add_request`](Self::add_request) with the arrival time given (the
    /// async engine passes when the HTTP request arrived).
    pub fn add_request_at(
        &mut self,
        req: &mut GenerationRequest,
        arrived: Instant,
    ) -> Result<(), EngineError> {
        if self.requests.contains_key(&req.request_id) {
            return Err(EngineError::DuplicateRequest(req.request_id.clone()));
        }
        validate_request(&self.info, self.config.max_num_seqs, req)?;
        if !self.tokenizer.is_present() {
            // Like vLLM's --skip-tokenizer-init: token ids in, token ids out.
            if !req.stop.is_empty() {
                return Err(EngineError::invalid(
                    Some("stop"),
                    "stop strings need a tokenizer; this model has none",
                ));
            }
            req.detokenize = false;
        }
        let scheduler_id = RequestId(self.next_request_id);
        self.next_request_id += 1;
        let seed = req.sampling.seed.unwrap_or_else(|| {
            self.next_seed = self.next_seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            self.next_seed
        });
        let (eos_token_id, mut stop_token_ids) = match self.info.eos_token_ids.split_first() {
            Some((&first, rest)) if !req.ignore_eos => (Some(first), rest.to_vec()),
            _ => (None, Vec::new()),
        };
        stop_token_ids.extend_from_slice(&req.stop_token_ids);
        let new = NewRequest {
            request_id: scheduler_id,
            prompt_token_ids: req.prompt_token_ids.clone(),
            // Validated: the prompt leaves room for at least one token.
            max_tokens: req.max_tokens.unwrap_or(self.info.max_model_len - req.prompt_token_ids.len()),
            n: req.n,
            priority: req.priority,
            arrival: self.next_request_id as f64,
            eos_token_id,
            stop_token_ids,
            ignore_eos: req.ignore_eos,
            min_tokens: req.min_tokens,
            cache_salt: None,
            fairness_group: req.fairness_group.map(u64::from),
        };
        self.scheduler.add_request(new).map_err(|e| EngineError::invalid(Some("prompt"), e.to_string()))?;
        self.runner.add_request(scheduler_id, &req.prompt_token_ids, Arc::new(req.sampling.clone()), seed);
        let stop = StopChecker::new(req.stop.clone(), req.include_stop_str_in_output);
        self.by_scheduler_id.insert(scheduler_id, req.request_id.clone());
        self.requests.insert(
            req.request_id.clone(),
            RequestState {
                request: req.clone(),
                scheduler_id,
                stop,
                seqs: (0..req.n).map(|_| None).collect(),
                arrived,
                first_scheduled: None,
                first_token: None,
                num_cached_tokens: 0,
            },
        );
        Ok(())
    }

    /// Aborts a request (client gone): frees its blocks at once and returns
    /// its last output (every unfinished sequence with finish reason `abort`),
    /// or `None` if the request is not live.
    pub fn abort_request(&mut self, request_id: &str) -> Option<RequestOutput> {
        let mut state = self.requests.remove(request_id)?;
        self.scheduler.abort_request(state.scheduler_id);
        self.by_scheduler_id.remove(&state.scheduler_id);
        self.metrics.request_success.with_label_values(&["abort"]).inc();
        // The engine may go idle now (no further step): show the freed blocks at once.
        self.update_gauges();
        let deltas = state
            .seqs
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_none_or(|s| s.finished.is_none()))
            .map(|(index, seq)| {
                let text = seq.as_mut().map(|s| s.text[s.sent..].to_string()).unwrap_or_default();
                SeqDelta {
                    index,
                    text,
                    token_ids: Vec::new(),
                    logprobs: Vec::new(),
                    finish_reason: Some(FinishReason::Abort),
                    stop_reason: None,
                }
            })
            .collect();
        Some(RequestOutput {
            request_id: request_id.to_string(),
            deltas,
            finished: true,
            num_prompt_tokens: state.request.prompt_token_ids.len(),
            num_cached_tokens: state.num_cached_tokens,
        })
    }

    /// One iteration: schedule a step, enqueue it on the device, then apply
    /// the sampled tokens of the step before it (asynchronous scheduling) or
    /// of this one: scheduler update, detokenization, stop strings. Returns
    /// an output for every request that produced something (finished ones
    /// included).
    ///
    /// After an error, the steps not applied are dropped and their sequences
    /// recompute from their known tokens (callers usually abort everything).
    pub fn step(&mut self) -> Result<Vec<RequestOutput>, EngineError> {
        let result = self.try_step();
        if result.is_err() {
            let dropped = self.in_flight.take().is_some();
            let requeued = self.scheduler.discard_unapplied();
            self.runner.discard_unapplied();
            if dropped || !requeued.is_empty() {
                tracing::warn!(requeued = requeued.len(), "a failed step dropped the steps in flight");
            }
        }
        result
    }

    fn try_step(&mut self) -> Result<Vec<RequestOutput>, EngineError> {
        let mut outputs = Vec::new();
        // A step whose results the next one needs on the host is applied first.
        let must_apply = self.in_flight.as_ref().is_some_and(|f| !f.schedule_ahead);
        if must_apply || !self.scheduler.can_schedule() {
            if let Some(step) = self.in_flight.take() {
                outputs = self.apply(step)?;
            }
        }
        let started = Instant::now();
        let out = self.scheduler.schedule()?;
        let now = Instant::now();
        self.timings.schedule += now - started;
        let prompt_tokens =
            out.scheduled[out.num_decodes.min(out.scheduled.len())..].iter().map(|e| e.token_ids.len()).sum();
        for entry in &out.scheduled {
            if let Some(state) =
                self.by_scheduler_id.get(&entry.request_id).and_then(|id| self.requests.get_mut(id))
            {
                if state.first_scheduled.is_none() {
                    state.first_scheduled = Some(now);
                    state.num_cached_tokens = entry.start_position;
                    self.metrics.request_queue_time.observe((now - state.arrived).as_secs_f64());
                }
            }
        }

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
        self.timings.launch += prepared.elapsed();
        let launched = (!out.is_empty()).then(|| InFlightStep {
            out,
            samplers: step.samplers,
            sampled,
            prompt_tokens,
            schedule_ahead: step.schedule_ahead,
        });

        if let Some(previous) = self.in_flight.take() {
            outputs.extend(self.apply(previous)?);
        }
        self.in_flight = launched;
        if !self.config.async_scheduling {
            if let Some(step) = self.in_flight.take() {
                outputs.extend(self.apply(step)?);
            }
        }
        Ok(outputs)
    }

    /// Waits for a step's sampled tokens and applies them.
    fn apply(&mut self, step: InFlightStep<B>) -> Result<Vec<RequestOutput>, EngineError> {
        let decode_only = step.out.num_decodes == step.out.scheduled.len();
        let waited = Instant::now();
        let sampled = match step.sampled {
            Some(sampled) => self.runner.finish(sampled, &step.samplers, decode_only)?,
            None => Vec::new(),
        };
        let started = Instant::now();
        self.timings.wait += started - waited;
        let sampled_ids: Vec<(SeqId, u32)> =
            step.samplers.iter().zip(&sampled).map(|(t, s)| (t.seq_id, s.token)).collect();
        let logprobs_by_seq: HashMap<SeqId, TokenLogprob> = step
            .samplers
            .iter()
            .zip(sampled)
            .map(|(t, s)| {
                (t.seq_id, TokenLogprob { token: s.token, logprob: s.logprob, top: s.top_logprobs })
            })
            .collect();
        let updates = self.scheduler.update_from_output(&step.out, &sampled_ids)?;

        self.metrics.engine_steps.inc();
        self.metrics.prompt_tokens.inc_by(step.prompt_tokens as u64);
        self.metrics.generation_tokens.inc_by(updates.len() as u64);
        let outputs = self.process_updates(updates, logprobs_by_seq);
        self.update_gauges();
        self.timings.update += started.elapsed();
        self.timings.steps += 1;
        Ok(outputs)
    }

    fn process_updates(
        &mut self,
        updates: Vec<SeqUpdate>,
        mut logprobs: HashMap<SeqId, TokenLogprob>,
    ) -> Vec<RequestOutput> {
        let now = Instant::now();
        let mut outputs: Vec<RequestOutput> = Vec::new();
        let mut position: HashMap<String, usize> = HashMap::new();
        for update in updates {
            let Some(request_id) = self.by_scheduler_id.get(&update.request_id).cloned() else { continue };
            let Some(state) = self.requests.get_mut(&request_id) else { continue };
            let index = update.sample_index;
            if state.first_token.is_none() {
                state.first_token = Some(now);
                self.metrics.time_to_first_token.observe((now - state.arrived).as_secs_f64());
            }
            let prompt = &state.request.prompt_token_ids;
            let seq = state.seqs[index].get_or_insert_with(|| SeqState {
                detokenizer: IncrementalDetokenizer::new(prompt),
                text: String::new(),
                sent: 0,
                stop_scan: StopScan::default(),
                finished: None,
                last_token_at: None,
                num_tokens: 0,
            });
            if let Some(prev) = seq.last_token_at {
                self.metrics.inter_token_latency.observe((now - prev).as_secs_f64());
            }
            seq.last_token_at = Some(now);
            seq.num_tokens += 1;

            let mut finish = update.finish_reason.map(|r| match r {
                SchedFinish::Stop(Some(token)) => {
                    let is_eos = self.info.eos_token_ids.contains(&token)
                        && !state.request.stop_token_ids.contains(&token);
                    (FinishReason::Stop, if is_eos { None } else { Some(StopReason::TokenId(token)) })
                }
                SchedFinish::Stop(None) => (FinishReason::Stop, None),
                SchedFinish::Length => (FinishReason::Length, None),
                SchedFinish::Abort => (FinishReason::Abort, None),
            });
            // The token that stopped the sequence is not part of its text.
            let stopped_by_token = matches!(update.finish_reason, Some(SchedFinish::Stop(Some(_))));
            if state.request.detokenize && !stopped_by_token {
                let skip = state.request.skip_special_tokens;
                let tok = &self.tokenizer;
                let decode = |ids: &[u32]| tok.decode(ids, skip).unwrap_or_default();
                let new_text = seq.detokenizer.push(update.new_token, &decode);
                seq.text.push_str(&new_text);
                if let Some(m) = state.stop.check(&mut seq.stop_scan, &seq.text) {
                    seq.text.truncate(m.truncate_at);
                    finish = Some((FinishReason::Stop, Some(StopReason::String(m.stop))));
                    self.scheduler.finish_seq(update.seq_id, SchedFinish::Stop(None));
                } else if finish.is_some() {
                    let rest = seq.detokenizer.flush(&decode);
                    seq.text.push_str(&rest);
                }
            }
            seq.finished = finish.clone();

            let streamable = if finish.is_some() {
                seq.text.len()
            } else {
                state.stop.streamable_len(&seq.stop_scan, &seq.text)
            };
            let text = if streamable > seq.sent {
                seq.text[seq.sent..streamable].to_string()
            } else {
                String::new()
            };
            seq.sent = seq.sent.max(streamable);
            let delta = SeqDelta {
                index,
                text,
                token_ids: vec![update.new_token],
                logprobs: if state.request.sampling.logprobs.is_some() {
                    logprobs.remove(&update.seq_id).into_iter().collect()
                } else {
                    Vec::new()
                },
                finish_reason: finish.as_ref().map(|f| f.0),
                stop_reason: finish.and_then(|f| f.1),
            };
            let slot = *position.entry(request_id.clone()).or_insert_with(|| {
                outputs.push(RequestOutput {
                    request_id: request_id.clone(),
                    deltas: Vec::new(),
                    finished: false,
                    num_prompt_tokens: state.request.prompt_token_ids.len(),
                    num_cached_tokens: state.num_cached_tokens,
                });
                outputs.len() - 1
            });
            outputs[slot].deltas.push(delta);
        }
        for output in &mut outputs {
            let done = self
                .requests
                .get(&output.request_id)
                .is_some_and(|s| s.seqs.iter().all(|q| q.as_ref().is_some_and(|q| q.finished.is_some())));
            if done {
                output.finished = true;
                if let Some(state) = self.requests.remove(&output.request_id) {
                    self.by_scheduler_id.remove(&state.scheduler_id);
                    self.metrics.e2e_request_latency.observe((now - state.arrived).as_secs_f64());
                    for seq in state.seqs.iter().flatten() {
                        if let Some((reason, _)) = &seq.finished {
                            self.metrics.request_success.with_label_values(&[reason.as_str()]).inc();
                        }
                    }
                }
            }
        }
        outputs
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
    }
}

/// Checks a request against the model and the engine's limits: lengths
/// (prompt, `max_tokens`, both within the context and the KV cache), `n`,
/// sampling parameters, stop strings and token ids. `max_tokens` absent
/// means up to the context length. Runs in [`LlmEngine::add_request`]; the
/// async engine also runs it on the caller's thread, for early 400s.
pub fn validate_request(
    info: &ModelInfo,
    max_num_seqs: usize,
    req: &GenerationRequest,
) -> Result<(), EngineError> {
    let prompt_len = req.prompt_token_ids.len();
    if prompt_len == 0 {
        return Err(EngineError::invalid(Some("prompt"), "the prompt is empty"));
    }
    if let Some(&bad) = req.prompt_token_ids.iter().find(|&&t| t as usize >= info.vocab_size) {
        return Err(EngineError::invalid(
            Some("prompt"),
            format!("token id {bad} is out of vocabulary (size {})", info.vocab_size),
        ));
    }
    if prompt_len >= info.max_model_len {
        return Err(EngineError::invalid(
            Some("prompt"),
            format!(
                "This model's maximum context length is {} tokens. However, your prompt has {prompt_len} \
                 tokens, which leaves no room for output.",
                info.max_model_len
            ),
        ));
    }
    let requested_max_tokens = req.max_tokens;
    let max_tokens = requested_max_tokens.unwrap_or(info.max_model_len - prompt_len);
    if max_tokens == 0 {
        return Err(EngineError::invalid(Some("max_tokens"), "max_tokens must be at least 1"));
    }
    // Checked: a client may send any max_tokens up to u64::MAX.
    let total_len = prompt_len.checked_add(max_tokens);
    if total_len.is_none_or(|total| total > info.max_model_len) {
        return Err(EngineError::invalid(
            Some("max_tokens"),
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens \
                 ({prompt_len} in the prompt, {max_tokens} in the completion).",
                info.max_model_len,
                prompt_len as u128 + max_tokens as u128
            ),
        ));
    }
    // Here too, not only in the scheduler, where it would fail the request late.
    if req.min_tokens > max_tokens {
        return Err(EngineError::invalid(
            Some("min_tokens"),
            format!("min_tokens ({}) must not exceed max_tokens ({max_tokens})", req.min_tokens),
        ));
    }
    if req.n == 0 || req.n > max_num_seqs {
        return Err(EngineError::invalid(
            Some("n"),
            format!("n must be in 1..={max_num_seqs}, got {}", req.n),
        ));
    }
    // Without max_tokens the output may stop early, so only the prompt must
    // fit; with it, the whole of every sample must.
    let seq_len = if requested_max_tokens.is_some() { prompt_len + max_tokens } else { prompt_len };
    let needed = kv_blocks_needed(prompt_len, seq_len, req.n, info.block_size);
    if needed.is_none_or(|blocks| blocks > info.num_gpu_blocks) {
        let capacity = info.num_gpu_blocks * info.block_size;
        let what = if req.n > 1 {
            format!("{} samples of up to {seq_len} tokens, sharing a prompt of {prompt_len} tokens,", req.n)
        } else {
            format!("a sequence of {seq_len} tokens")
        };
        let needed = needed.map_or_else(|| "more".to_string(), |b| b.to_string());
        return Err(EngineError::invalid(
            Some(if requested_max_tokens.is_some() { "max_tokens" } else { "prompt" }),
            format!(
                "This request cannot fit in the KV cache: {what} need {needed} blocks of {} tokens, but the \
                 cache holds {} blocks ({capacity} tokens). Lower max_tokens or n, or shorten the prompt.",
                info.block_size, info.num_gpu_blocks
            ),
        ));
    }
    if req.stop.len() > MAX_STOP_STRINGS {
        return Err(EngineError::invalid(
            Some("stop"),
            format!("at most {MAX_STOP_STRINGS} stop strings are allowed, got {}", req.stop.len()),
        ));
    }
    if let Some(long) = req.stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
        return Err(EngineError::invalid(
            Some("stop"),
            format!(
                "a stop string may be at most {MAX_STOP_STRING_BYTES} bytes long, got one of {} bytes",
                long.len()
            ),
        ));
    }
    req.sampling.validate().map_err(|e| EngineError::invalid(Some(e.param), e.to_string()))?;
    if let Some(&bad) = req.stop_token_ids.iter().find(|&&t| t as usize >= info.vocab_size) {
        return Err(EngineError::invalid(
            Some("stop_token_ids"),
            format!("token id {bad} is out of vocabulary"),
        ));
    }
    Ok(())
}

/// KV blocks a request holds at most: the prompt's full blocks once (its `n`
/// samples share them copy-on-write) and, per sample, the blocks from there
/// to `seq_len` tokens. `None` on overflow.
pub fn kv_blocks_needed(prompt_len: usize, seq_len: usize, n: usize, block_size: usize) -> Option<usize> {
    let shared = prompt_len / block_size;
    let own = seq_len.div_ceil(block_size).checked_sub(shared)?;
    own.checked_mul(n)?.checked_add(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model of 512 tokens of context over a KV cache of 64 blocks of 16
    /// (1024 tokens).
    fn info() -> ModelInfo {
        ModelInfo {
            max_model_len: 512,
            vocab_size: 1000,
            eos_token_ids: vec![2],
            default_sampling: SamplingParams::default(),
            num_gpu_blocks: 64,
            block_size: 16,
        }
    }

    fn request(prompt_len: usize, max_tokens: Option<usize>, n: usize) -> GenerationRequest {
        let mut r = GenerationRequest::new("r", vec![1; prompt_len]);
        r.max_tokens = max_tokens;
        r.n = n;
        r
    }

    fn refusal(req: &GenerationRequest) -> (Option<&'static str>, String) {
        match validate_request(&info(), 256, req) {
            Err(EngineError::InvalidRequest { param, message }) => (param, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn huge_max_tokens_is_refused_not_wrapped() {
        for max_tokens in [usize::MAX, usize::MAX - 5, usize::MAX / 2 + 1, 503] {
            let (param, message) = refusal(&request(10, Some(max_tokens), 1));
            assert_eq!(param, Some("max_tokens"));
            assert!(message.contains("maximum context length is 512"), "{message}");
            assert!(message.contains(&max_tokens.to_string()), "{message}");
        }
        validate_request(&info(), 256, &request(10, Some(502), 1)).expect("prompt + max_tokens = 512 fits");
        // min_tokens against the max_tokens implied by the context.
        let mut r = request(10, None, 1);
        r.min_tokens = 503;
        assert_eq!(refusal(&r).0, Some("min_tokens"));
        r.min_tokens = 502;
        validate_request(&info(), 256, &r).expect("min_tokens up to the context");
    }

    #[test]
    fn kv_blocks_count_the_shared_prompt_once() {
        // 40 prompt tokens: 2 full blocks shared; each sample owns 4 blocks (to 100 tokens).
        assert_eq!(kv_blocks_needed(40, 100, 1, 16), Some(7));
        assert_eq!(kv_blocks_needed(40, 100, 3, 16), Some(2 + 3 * 5));
        assert_eq!(kv_blocks_needed(32, 32, 4, 16), Some(2));
        assert_eq!(kv_blocks_needed(1, usize::MAX, usize::MAX, 16), None);
    }

    #[test]
    fn requests_larger_than_the_kv_cache_are_refused() {
        // n=1 always fits within the context; n samples of 500 tokens need 32 blocks each.
        validate_request(&info(), 256, &request(10, Some(490), 1)).expect("one sample fits");
        validate_request(&info(), 256, &request(10, Some(490), 2)).expect("two fit in 64 blocks");
        let (param, message) = refusal(&request(10, Some(490), 3));
        assert_eq!(param, Some("max_tokens"));
        assert!(message.contains("KV cache") && message.contains("64 blocks"), "{message}");
        // Without max_tokens only the prompt counts: outputs may end early.
        validate_request(&info(), 256, &request(500, None, 3)).expect("prompt fits thrice");
        let (param, _) = refusal(&request(500, None, 256));
        assert_eq!(param, Some("prompt"));
    }

    #[test]
    fn stop_strings_are_bounded_in_number_and_length() {
        let mut r = request(10, Some(10), 1);
        r.stop = vec!["x".repeat(MAX_STOP_STRING_BYTES); MAX_STOP_STRINGS];
        validate_request(&info(), 256, &r).expect("at the limits");
        r.stop.push("y".into());
        let (param, message) = refusal(&r);
        assert_eq!(param, Some("stop"));
        assert!(message.contains(&format!("at most {MAX_STOP_STRINGS} stop strings")), "{message}");
        r.stop = vec!["a".into(), "é".repeat(MAX_STOP_STRING_BYTES / 2 + 1)];
        let (param, message) = refusal(&r);
        assert_eq!(param, Some("stop"));
        assert!(message.contains(&format!("at most {MAX_STOP_STRING_BYTES} bytes")), "{message}");
    }
}
