//! POST /v1/completions: one engine request per prompt, each with `n`
//! samples; choice `i` of prompt `p` has index `p * n + i` (vLLM's numbering).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Json, Response};
use axum::Extension;
use pagoda_engine::{AsyncEngine, RequestOutput, SeqDelta};

use crate::endpoint::{log_finished, run_endpoint, Cancelled, PromptWorkers};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::logprobs::TokenTexts;
use crate::params::{bad_words, generation_request, stream_mode, PromptOptions};
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
    state.check_model(request.model.as_deref())?;
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request(Some("suffix"), "suffix is not supported"));
    }
    let echo = request.echo.unwrap_or(false);
    if echo && request.logprobs.is_some() {
        return Err(ApiError::bad_request(Some("echo"), "echo together with logprobs is not supported"));
    }
    let engine = state.engine();
    // Cheap checks first: a refused request costs no tokenization.
    let mut template =
        generation_request(&request.sampling, engine.info(), request.max_tokens, request.logprobs)?;
    template.sampling.bad_words =
        bad_words(engine.tokenizer(), request.sampling.bad_words.as_deref().unwrap_or_default())?;
    template.cache_salt = state.cache_salt(request.sampling.cache_salt.as_deref())?;
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
    let n = template.n;
    let mode = stream_mode(&request.sampling);
    let stream = mode.stream;
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let num_prompts = prompts.len();
    // Token-id prompts are decoded for echo only once the engine has
    // accepted them (so their length is bounded by the context).
    let echo_ids = (echo && prompt_texts.is_none()).then(|| prompts.clone());

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
        "request accepted"
    );

    let model = state.config().model_name().to_string();
    let created = unix_now();
    let want_logprobs = request.logprobs.is_some();
    let as_token_ids = request.sampling.return_tokens_as_token_ids.unwrap_or(false);
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
            echoed: vec![false; num_prompts * n],
            offsets: vec![0; num_prompts * n],
            usage: StreamUsage::new(mode, prompt_tokens),
        };
        return Ok(streaming::sse_response(streaming::merge(streams), writer, started));
    }

    let done = streaming::collect(streams, n).await?;
    let texts = TokenTexts::new(engine.tokenizer(), as_token_ids);
    let mut choices = Vec::with_capacity(num_prompts * n);
    let mut completion_tokens = 0;
    for (p, request_done) in done.into_iter().enumerate() {
        completion_tokens += request_done.num_generated_tokens();
        for seq in request_done.seqs {
            let mut text = echo_texts.as_ref().map(|t| t[p].clone()).unwrap_or_default();
            text.push_str(&seq.text);
            choices.push(CompletionChoice {
                index: p * n + seq.index,
                text,
                logprobs: want_logprobs.then(|| texts.completion(&seq.logprobs, &mut 0)),
                finish_reason: seq.finish_reason.map(|r| r.as_str()),
                stop_reason: StopReasonOut::from_engine(&seq.stop_reason),
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

    fn choice(&mut self, prompt: usize, delta: SeqDelta) -> Option<CompletionChoice> {
        let index = prompt * self.n + delta.index;
        self.usage.completion_tokens += delta.token_ids.len();
        let mut text = String::new();
        if let Some(echo) = &self.echo {
            if !self.echoed[index] {
                self.echoed[index] = true;
                text.push_str(&echo[prompt]);
            }
        }
        text.push_str(&delta.text);
        let logprobs: Option<CompletionLogprobs> =
            (self.want_logprobs && !delta.logprobs.is_empty()).then(|| {
                TokenTexts::new(self.engine.tokenizer(), self.as_token_ids)
                    .completion(&delta.logprobs, &mut self.offsets[index])
            });
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
        })
    }
}

impl ChunkWriter for CompletionChunks {
    fn start(&mut self) -> Vec<String> {
        Vec::new()
    }

    fn output(&mut self, prompt: usize, out: RequestOutput) -> Vec<String> {
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
