//! The output processor: from the engine core's token events to the
//! [`RequestOutput`]s a client sees. Incremental detokenization, stop
//! strings, logprobs, finish reasons, and the per-request metrics (queue
//! time, TTFT, inter-token latency, end-to-end latency, finishes). It never
//! calls the core: the samples a stop string ended are returned, for the
//! engine to tell the core as it tells it of an abort.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use pagoda_models::Tokenizer;
use pagoda_scheduler::{FinishReason as CoreFinish, RequestId};

use crate::detokenizer::IncrementalDetokenizer;
use crate::engine_core::CoreOutput;
use crate::input::EngineCoreRequest;
use crate::metrics::EngineMetrics;
use crate::request::{FinishReason, PromptLogprob, RequestOutput, SeqDelta, StopReason};
use crate::stop::{StopChecker, StopScan};

/// The text side of one sample.
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

/// The output side of one live request.
struct RequestState {
    /// The client's id, which labels the request's outputs.
    external_id: String,
    num_prompt_tokens: usize,
    detokenize: bool,
    skip_special_tokens: bool,
    stop: StopChecker,
    seqs: Vec<SeqState>,
    arrived: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    /// Prompt tokens found in the prefix cache (known once first scheduled).
    num_cached_tokens: usize,
    /// The request's `n` and `max_tokens` (for their histograms).
    n: usize,
    max_tokens: usize,
    /// Prompt logprobs not yet sent (they ride on the next output).
    prompt_logprobs: Option<Vec<Option<PromptLogprob>>>,
}

/// What one batch of core events became.
#[derive(Debug, Default)]
pub(crate) struct ProcessedOutputs {
    /// One output per request that moved (finished ones included).
    pub outputs: Vec<RequestOutput>,
    /// Samples `(request, sample index)` a stop string ended: the core must
    /// finish them.
    pub stopped: Vec<(RequestId, usize)>,
}

pub(crate) struct OutputProcessor {
    tokenizer: Tokenizer,
    metrics: Arc<EngineMetrics>,
    requests: HashMap<RequestId, RequestState>,
}

impl OutputProcessor {
    pub fn new(tokenizer: Tokenizer, metrics: Arc<EngineMetrics>) -> Self {
        Self { tokenizer, metrics, requests: HashMap::new() }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Starts tracking a request the core knows as `id`.
    pub fn add_request(&mut self, id: RequestId, req: &EngineCoreRequest, arrived: Instant) {
        let prompt = req.prompt_token_ids();
        let seq = || SeqState {
            detokenizer: IncrementalDetokenizer::new(prompt),
            text: String::new(),
            sent: 0,
            stop_scan: StopScan::default(),
            finished: None,
            last_token_at: None,
            num_tokens: 0,
        };
        self.requests.insert(
            id,
            RequestState {
                external_id: req.request_id().to_string(),
                num_prompt_tokens: prompt.len(),
                detokenize: req.detokenize(),
                skip_special_tokens: req.skip_special_tokens(),
                stop: StopChecker::new(req.stop().to_vec(), req.include_stop_str_in_output()),
                seqs: (0..req.n()).map(|_| seq()).collect(),
                arrived,
                first_scheduled: None,
                first_token: None,
                num_cached_tokens: 0,
                n: req.n(),
                max_tokens: req.max_tokens(),
                prompt_logprobs: None,
            },
        );
    }

    /// Forgets an aborted request and returns its last output: every
    /// unfinished sample with finish reason `abort` and the text it held
    /// back. `None` if it is not live.
    pub fn abort(&mut self, id: RequestId) -> Option<RequestOutput> {
        let state = self.requests.remove(&id)?;
        // Counted once, like a finished request; its times and sizes are not a finished request's.
        self.metrics.request_success.with_label_values(&["abort"]).inc();
        let deltas = state
            .seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.finished.is_none())
            .map(|(index, s)| SeqDelta {
                index,
                text: s.text[s.sent..].to_string(),
                token_ids: Vec::new(),
                logprobs: Vec::new(),
                finish_reason: Some(FinishReason::Abort),
                stop_reason: None,
            })
            .collect();
        Some(RequestOutput {
            request_id: state.external_id,
            deltas,
            finished: true,
            num_prompt_tokens: state.num_prompt_tokens,
            num_cached_tokens: state.num_cached_tokens,
            prompt_logprobs: state.prompt_logprobs,
        })
    }

    /// Turns the events of one core step into outputs, one per request that
    /// moved; a request whose samples have all finished is forgotten.
    pub fn process(&mut self, step: CoreOutput) -> ProcessedOutputs {
        for event in step.scheduled {
            if let Some(state) = self.requests.get_mut(&event.request_id) {
                state.num_cached_tokens = event.num_cached_tokens;
                // A preempted request is scheduled again: its phases start at the first time.
                if state.first_scheduled.is_none() {
                    state.first_scheduled = Some(event.at);
                }
                self.metrics.request_queue_time.observe((event.at - state.arrived).as_secs_f64());
            }
        }
        for (id, entries) in step.prompt_logprobs {
            if let Some(state) = self.requests.get_mut(&id) {
                state.prompt_logprobs = Some(entries);
            }
        }
        let now = Instant::now();
        let mut processed = ProcessedOutputs::default();
        let outputs = &mut processed.outputs;
        let mut position: HashMap<RequestId, usize> = HashMap::new();
        for event in step.tokens {
            let Some(state) = self.requests.get_mut(&event.request_id) else { continue };
            let Some(seq) = state.seqs.get_mut(event.sample_index) else { continue };
            if state.first_token.is_none() {
                state.first_token = Some(now);
                self.metrics.time_to_first_token.observe((now - state.arrived).as_secs_f64());
            }
            if let Some(prev) = seq.last_token_at {
                let gap = (now - prev).as_secs_f64();
                self.metrics.inter_token_latency.observe(gap);
                self.metrics.time_per_output_token.observe(gap);
            }
            seq.last_token_at = Some(now);
            seq.num_tokens += 1;

            let mut finish = event.finish.map(|r| match r {
                CoreFinish::Eos(_) => (FinishReason::Stop, None),
                CoreFinish::StopToken(token) => (FinishReason::Stop, Some(StopReason::TokenId(token))),
                CoreFinish::Length => (FinishReason::Length, None),
            });
            // The token that stopped the sequence is not part of its text.
            let stopped_by_token =
                matches!(event.finish, Some(CoreFinish::Eos(_) | CoreFinish::StopToken(_)));
            if state.detokenize && !stopped_by_token {
                let skip = state.skip_special_tokens;
                let tok = &self.tokenizer;
                let decode = |ids: &[u32]| tok.decode(ids, skip).unwrap_or_default();
                let new_text = seq.detokenizer.push(event.token, &decode);
                seq.text.push_str(&new_text);
                if let Some(m) = state.stop.check(&mut seq.stop_scan, &seq.text) {
                    seq.text.truncate(m.truncate_at);
                    finish = Some((FinishReason::Stop, Some(StopReason::String(m.stop))));
                    processed.stopped.push((event.request_id, event.sample_index));
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
                index: event.sample_index,
                text,
                token_ids: vec![event.token],
                logprobs: event.logprob.into_iter().collect(),
                finish_reason: finish.as_ref().map(|f| f.0),
                stop_reason: finish.and_then(|f| f.1),
            };
            let slot = *position.entry(event.request_id).or_insert_with(|| {
                outputs.push(RequestOutput {
                    request_id: state.external_id.clone(),
                    deltas: Vec::new(),
                    finished: false,
                    num_prompt_tokens: state.num_prompt_tokens,
                    num_cached_tokens: state.num_cached_tokens,
                    prompt_logprobs: state.prompt_logprobs.take(),
                });
                outputs.len() - 1
            });
            outputs[slot].deltas.push(delta);
        }
        for (id, slot) in position {
            let done = self.requests.get(&id).is_some_and(|s| s.seqs.iter().all(|q| q.finished.is_some()));
            if !done {
                continue;
            }
            processed.outputs[slot].finished = true;
            if let Some(state) = self.requests.remove(&id) {
                let reason = state.seqs[0].finished.as_ref().map_or("abort", |(r, _)| r.as_str());
                self.record_finished(&state, reason, now);
            }
        }
        processed
    }

    /// The per-request metrics of a request whose samples all finished by
    /// `now`: one success count for the whole request, however many samples
    /// it had, and its phase times and sizes.
    fn record_finished(&self, state: &RequestState, reason: &str, now: Instant) {
        let m = &self.metrics;
        m.request_success.with_label_values(&[reason]).inc();
        m.e2e_request_latency.observe((now - state.arrived).as_secs_f64());
        let generated: usize = state.seqs.iter().map(|s| s.num_tokens).sum();
        let longest = state.seqs.iter().map(|s| s.num_tokens).max().unwrap_or(0);
        m.request_prompt_tokens.observe(state.num_prompt_tokens as f64);
        m.request_generation_tokens.observe(generated as f64);
        m.request_max_num_generation_tokens.observe(longest as f64);
        m.request_params_n.observe(state.n as f64);
        m.request_params_max_tokens.observe(state.max_tokens as f64);
        if let Some(scheduled) = state.first_scheduled {
            m.request_inference_time.observe((now - scheduled).as_secs_f64());
            if let Some(first) = state.first_token {
                m.request_prefill_time.observe((first - scheduled).as_secs_f64());
            }
        }
        if let Some(first) = state.first_token {
            m.request_decode_time.observe((now - first).as_secs_f64());
            if longest > 1 {
                m.request_time_per_output_token.observe((now - first).as_secs_f64() / (longest - 1) as f64);
            }
        }
    }
}
