//! POST /v1/completions: one engine request per prompt, each with `n`
//! samples; choice `i` of prompt `p` has index `p * n + i` (vLLM's numbering).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Json, Response};
use axum::Extension;
use pagoda_engine::{AsyncEngine, PromptLogprob, RequestOutput, SeqDelta};

use crate::endpoint::{log_finished, run_endpoint, Cancelled, PromptWorkers};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::logprobs::TokenTexts;
use crate::params::{bad_words, check_max_logprobs, generation_request, stream_mode, PromptOptions};
use crate::protocol::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, PromptInput, StopReasonOut,
    Usage, UsageField,
};
use crate::state::{unix_now, AppState};
use crate::streaming::{self, to_json, ChunkWriter, StreamUsage};

pub async fn create_completion(
    State(state): State<AppState>,
    Extension(workers): Extension<Arc<PromptWorkers>>,
    body: Result<ApiJson<CompletionRequest>, ApiError>,
) -> Response {
    run_endpoint(state, body, "cmpl", "completions", move |state, request, id, started| {
        complete(state, workers, request, id, started)
    })
    .await
}

/// Token ids of each text prompt, tokenized in order on a prompt worker.
/// Stops at the first prompt that cannot fit the context (the rest would be
/// refused with it), or when the client has gone.
fn tokenize_prompts(
    engine: &AsyncEngine,
    texts: &[String],
    options: PromptOptions,
    cancelled: &Cancelled,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let max_model_len = engine.info().max_model_len;
    let mut prompts = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        if cancelled.is_set() {
            return Err(Cancelled::error());
        }
        let mut ids = engine
            .tokenizer()
            .encode(text, options.add_special_tokens)
            .map_err(|e| ApiError::bad_request(Some("prompt"), e.to_string()))?;
        options.truncate(&mut ids);
        if ids.len() >= max_model_len {
            let which = if texts.len() > 1 { format!("prompt {i}") } else { "your prompt".to_string() };
            return Err(ApiError::bad_request(
                Some("prompt"),
                format!(
                    "This model's maximum context length is {max_model_len} tokens. However, {which} has {} \
                     tokens, which leaves no room for output.",
                    ids.len()
                ),
            ));
        }
        prompts.push(ids);
    }
    Ok(prompts)
}

async fn complete(
    state: AppState,
    workers: Arc<PromptWorkers>,
    request: CompletionRequest,
    request_id: String,
    started: Instant,
) -> Result<Response, ApiError> {
    let lora = state.resolve_model(request.model.as_deref())?;
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request(Some("suffix"), "suffix is not supported"));
    }
    let echo = request.echo.unwrap_or(false);
    let max_logprobs = state.config().max_logprobs;
    check_max_logprobs("logprobs", request.logprobs.map(|k| k as usize), max_logprobs)?;
    check_max_logprobs("prompt_logprobs", request.sampling.prompt_logprobs, max_logprobs)?;
    let n = request.sampling.n.unwrap_or(1);
    // best_of < n is refused with the other sampling fields.
    let best_of = request.sampling.best_of.unwrap_or(n).max(n);
    if best_of > n && request.sampling.stream == Some(true) {
        return Err(ApiError::bad_request(
            Some("best_of"),
            format!("best_of ({best_of}) above n ({n}) cannot be streamed, as in OpenAI's API"),
        ));
    }
    // Echo with max_tokens 0 returns the prompt alone (lm-evaluation-harness
    // asks so for loglikelihoods): one token is generated and dropped, as vLLM does.
    let echo_only = echo && request.max_tokens == Some(0);
    let max_tokens = if echo_only { Some(1) } else { request.max_tokens };
    let engine = state.engine();
    // Cheap checks first: a refused request costs no tokenization.
    let mut template = generation_request(&request.sampling, engine.info(), max_tokens, request.logprobs)?;
    // Echoed prompt tokens get logprobs (the engine's prompt logprobs).
    let echo_logprobs = request.logprobs.filter(|_| echo).map(|k| k as usize);
    if let Some(k) = echo_logprobs {
        template.prompt_logprobs = Some(template.prompt_logprobs.map_or(k, |p| p.max(k)));
    }
    if best_of > n {
        // The n of best_of samples with the highest cumulative logprob are returned.
        template.n = best_of;
        template.sampling.logprobs.get_or_insert(0);
    }
    template.sampling.bad_words =
        bad_words(engine.tokenizer(), request.sampling.bad_words.as_deref().unwrap_or_default())?;
    template.cache_salt = state.cache_salt(request.sampling.cache_salt.as_deref())?;
    template.lora = lora.clone();
    let max_model_len = engine.info().max_model_len;
    let options = PromptOptions::new(&request.sampling, max_model_len, true)?;
    if let Some(grammar) = crate::structured::requested_grammar(&request.sampling)? {
        template.constraint = Some(crate::structured::compile_on_worker(&state, &workers, grammar).await?);
    }
    let (prompts, prompt_texts): (Vec<Vec<u32>>, Option<Vec<String>>) = match request.prompt {
        PromptInput::Texts(texts) => {
            // A prompt to be truncated may be any length: only its kept tokens are checked.
            let truncating = options.truncate_to.is_some();
            for (i, text) in texts.iter().enumerate().filter(|_| !truncating) {
                workers.check_text_fits(text, max_model_len, "prompt").map_err(|mut e| {
                    if texts.len() > 1 {
                        e.message = format!("prompt {i}: {}", e.message);
                    }
                    e
                })?;
            }
            let input_bytes = texts.iter().map(String::len).sum();
            let engine = engine.clone();
            let (prompts, texts) = workers
                .run(input_bytes, move |cancelled| {
                    let prompts = tokenize_prompts(&engine, &texts, options, cancelled)?;
                    Ok((prompts, texts))
                })
                .await?;
            // Echo shows what the model saw: truncated prompts are decoded from their kept tokens.
            (prompts, (echo && !truncating).then_some(texts))
        }
        PromptInput::TokenIds(mut ids) => {
            ids.iter_mut().for_each(|ids| options.truncate(ids));
            (ids, None)
        }
    };
    let mode = stream_mode(&request.sampling);
    let stream = mode.stream;
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let num_prompts = prompts.len();
    // Token-id prompts are decoded for echo only once the engine has
    // accepted them (so their length is bounded by the context).
    let echo_ids = (echo && prompt_texts.is_none()).then(|| prompts.clone());
    let echo_logprob_ids = echo_logprobs.map(|_| prompts.clone());

    let requests: Vec<_> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, ids)| {
            let mut req = template.clone();
            req.request_id = if num_prompts == 1 { request_id.clone() } else { format!("{request_id}-{i}") };
            req.prompt_token_ids = ids;
            req.fairness_group = Some(pagoda_engine::fairness_group(&request_id));
            req
        })
        .collect();
    let _adapter = crate::lora::hold_adapter(&state, lora.as_ref()).await?;
    // All prompts are admitted together or not at all (errors name the prompt).
    let streams = engine.submit_all(requests)?;
    let echo_texts: Option<Vec<String>> = match (prompt_texts, echo_ids) {
        (Some(texts), _) => Some(texts),
        (None, Some(ids)) => {
            let engine = engine.clone();
            let input_bytes = prompt_tokens * std::mem::size_of::<u32>();
            Some(
                workers
                    .run(input_bytes, move |_| {
                        let tokenizer = engine.tokenizer();
                        Ok(ids.iter().map(|ids| tokenizer.decode(ids, true).unwrap_or_default()).collect())
                    })
                    .await?,
            )
        }
        (None, None) => None,
    };
    tracing::info!(
        num_prompts,
        prompt_tokens,
        n,
        max_tokens = template.max_tokens,
        stream,
        lora = lora.as_ref().map(|l| l.name.as_str()),
        "request accepted"
    );

    let model = state.response_model(lora.as_ref());
    let created = unix_now();
    let want_logprobs = request.logprobs.is_some();
    let as_token_ids = request.sampling.return_tokens_as_token_ids.unwrap_or(false);
    let prompt_logprobs_k = request.sampling.prompt_logprobs;
    if stream {
        let writer = CompletionChunks {
            id: request_id,
            created,
            model,
            n,
            want_logprobs,
            as_token_ids,
            engine: engine.clone(),
            echo: echo_texts,
            echo_only,
            echo_logprobs: echo_logprob_ids
                .map(|ids| (ids, vec![None; num_prompts], echo_logprobs.unwrap_or(0))),
            echoed: vec![false; num_prompts * n],
            offsets: vec![0; num_prompts * n],
            usage: StreamUsage::new(mode, prompt_tokens),
        };
        return Ok(streaming::sse_response(streaming::merge(streams), writer, started));
    }

    let done = streaming::collect(streams, best_of).await?;
    let texts = TokenTexts::new(engine.tokenizer(), as_token_ids);
    let mut choices = Vec::with_capacity(num_prompts * n);
    let mut completion_tokens = 0;
    for (p, request_done) in done.into_iter().enumerate() {
        if !echo_only {
            completion_tokens += request_done.num_generated_tokens();
        }
        let prompt_logprobs = request_done.prompt_logprobs.unwrap_or_default();
        let mut seqs = request_done.seqs;
        if best_of > n {
            let cumulative =
                |s: &pagoda_engine::CompletedSeq| s.logprobs.iter().map(|l| l.logprob as f64).sum::<f64>();
            seqs.sort_by(|a, b| cumulative(b).total_cmp(&cumulative(a)).then(a.index.cmp(&b.index)));
            seqs.truncate(n);
        }
        for (i, mut seq) in seqs.into_iter().enumerate() {
            if echo_only {
                seq.text.clear();
                seq.logprobs.clear();
            }
            let mut text = echo_texts.as_ref().map(|t| t[p].clone()).unwrap_or_default();
            text.push_str(&seq.text);
            let logprobs = want_logprobs.then(|| {
                let mut offset = 0;
                let mut out = match (&echo_logprob_ids, echo_logprobs) {
                    (Some(ids), Some(k)) => {
                        texts.echoed_prompt(&ids[p], &top_k(&prompt_logprobs, k), &mut offset)
                    }
                    _ => Default::default(),
                };
                out.extend(texts.completion(&seq.logprobs, &mut offset));
                out
            });
            choices.push(CompletionChoice {
                index: p * n + i,
                text,
                logprobs,
                finish_reason: seq.finish_reason.map(|r| r.as_str()),
                stop_reason: StopReasonOut::from_engine(&seq.stop_reason),
                prompt_logprobs: prompt_logprobs_k
                    .map(|k| texts.prompt_logprobs(&top_k(&prompt_logprobs, k))),
            });
        }
    }
    let usage = Usage::new(prompt_tokens, completion_tokens);
    log_finished(prompt_tokens, completion_tokens, started);
    let response = CompletionResponse {
        id: request_id,
        object: "text_completion",
        created,
        model,
        choices,
        usage: UsageField::Counts(usage),
    };
    Ok(Json(response).into_response())
}

/// One prompt's logprobs as the engine returns them (the first `None`).
type PromptLogprobs = Vec<Option<PromptLogprob>>;

/// Per prompt its token ids and its prompt logprobs once known, and the top
/// alternatives the echo shows.
type EchoLogprobs = (Vec<Vec<u32>>, Vec<Option<PromptLogprobs>>, usize);

/// The SSE chunks of a streamed completion: one chunk per choice update.
struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    n: usize,
    want_logprobs: bool,
    /// Logprobs name tokens by id (`return_tokens_as_token_ids`).
    as_token_ids: bool,
    engine: Arc<AsyncEngine>,
    /// Prompt texts to put before each choice's first text, when echoing.
    echo: Option<Vec<String>>,
    /// Echo with max_tokens 0: the generated token is dropped.
    echo_only: bool,
    /// Echo with logprobs: per prompt its token ids and (once its first
    /// output came) its prompt logprobs, and the top alternatives wanted.
    echo_logprobs: Option<EchoLogprobs>,
    echoed: Vec<bool>,
    /// Characters sent so far per choice (for `text_offset`).
    offsets: Vec<usize>,
    usage: StreamUsage,
}

impl CompletionChunks {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: UsageField) -> String {
        to_json(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn choice(&mut self, prompt: usize, mut delta: SeqDelta) -> Option<CompletionChoice> {
        let index = prompt * self.n + delta.index;
        if self.echo_only {
            delta.text.clear();
            delta.token_ids.clear();
            delta.logprobs.clear();
        }
        self.usage.completion_tokens += delta.token_ids.len();
        let mut text = String::new();
        let mut echoed_logprobs = None;
        let texts = TokenTexts::new(self.engine.tokenizer(), self.as_token_ids);
        if let Some(echo) = &self.echo {
            if !self.echoed[index] {
                self.echoed[index] = true;
                text.push_str(&echo[prompt]);
                if let Some((ids, logprobs, k)) = &self.echo_logprobs {
                    let entries = top_k(logprobs[prompt].as_deref().unwrap_or_default(), *k);
                    echoed_logprobs =
                        Some(texts.echoed_prompt(&ids[prompt], &entries, &mut self.offsets[index]));
                }
            }
        }
        text.push_str(&delta.text);
        let logprobs: Option<CompletionLogprobs> =
            if self.want_logprobs && (!delta.logprobs.is_empty() || echoed_logprobs.is_some()) {
                let mut out = echoed_logprobs.unwrap_or_default();
                out.extend(texts.completion(&delta.logprobs, &mut self.offsets[index]));
                Some(out)
            } else {
                None
            };
        // A new token with no text yet (text held back for a possible stop
        // string, a partial UTF-8 character, or a model without a tokenizer)
        // still gets its chunk, as vLLM sends it: clients time tokens by chunks.
        if text.is_empty()
            && delta.token_ids.is_empty()
            && logprobs.is_none()
            && delta.finish_reason.is_none()
        {
            return None;
        }
        Some(CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason: delta.finish_reason.map(|r| r.as_str()),
            stop_reason: StopReasonOut::from_engine(&delta.stop_reason),
            prompt_logprobs: None,
        })
    }
}

/// Prompt logprobs with at most `k` top alternatives each (the engine
/// computed the most any field of the request asked for).
fn top_k(logprobs: &[Option<PromptLogprob>], k: usize) -> Vec<Option<PromptLogprob>> {
    logprobs
        .iter()
        .map(|e| {
            e.as_ref().map(|lp| PromptLogprob { top: lp.top.iter().take(k).copied().collect(), ..lp.clone() })
        })
        .collect()
}

impl ChunkWriter for CompletionChunks {
    fn start(&mut self) -> Vec<String> {
        Vec::new()
    }

    fn output(&mut self, prompt: usize, out: RequestOutput) -> Vec<String> {
        if let (Some((_, logprobs, _)), Some(entries)) = (self.echo_logprobs.as_mut(), out.prompt_logprobs) {
            logprobs[prompt] = Some(entries);
        }
        let mut chunks = Vec::with_capacity(out.deltas.len());
        for delta in out.deltas {
            if let Some(choice) = self.choice(prompt, delta) {
                chunks.push(self.chunk(vec![choice], self.usage.pending()));
            }
        }
        chunks
    }

    fn end(&mut self) -> Vec<String> {
        self.usage.last().map(|usage| self.chunk(Vec::new(), usage)).into_iter().collect()
    }

    fn usage(&self) -> (usize, usize) {
        self.usage.counts()
    }
}
