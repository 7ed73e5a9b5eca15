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
use crate::request::{FinishReason, RequestOutput, SeqDelta, StopReason};
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
    first_token: Option<Instant>,
    /// Prompt tokens found in the prefix cache (known once first scheduled).
    num_cached_tokens: usize,
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
                first_token: None,
                num_cached_tokens: 0,
            },
        );
    }

    /// Forgets an aborted request and returns its last output: every
    /// unfinished sample with finish reason `abort` and the text it held
    /// back. `None` if it is not live.
    pub fn abort(&mut self, id: RequestId) -> Option<RequestOutput> {
        let state = self.requests.remove(&id)?;
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
        })
    }

    /// Turns the events of one core step into outputs, one per request that
    /// moved; a request whose samples have all finished is forgotten.
    pub fn process(&mut self, step: CoreOutput) -> ProcessedOutputs {
        for event in step.scheduled {
            if let Some(state) = self.requests.get_mut(&event.request_id) {
                state.num_cached_tokens = event.num_cached_tokens;
                self.metrics.request_queue_time.observe((event.at - state.arrived).as_secs_f64());
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
                self.metrics.inter_token_latency.observe((now - prev).as_secs_f64());
            }
            seq.last_token_at = Some(now);

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
                self.metrics.e2e_request_latency.observe((now - state.arrived).as_secs_f64());
                for seq in &state.seqs {
                    if let Some((reason, _)) = &seq.finished {
                        self.metrics.request_success.with_label_values(&[reason.as_str()]).inc();
                    }
                }
            }
        }
        processed
    }
}
