//! From engine streams to API responses: merging the streams of a request's
//! prompts, folding them for non-streaming responses, and driving
//! Server-Sent Events for streaming ones.
//!
//! Disconnects: the SSE body owns the [`RequestStream`]s, so when the client
//! goes away hyper drops the body, the streams drop, and the engine aborts
//! their requests and frees their KV blocks. A non-streaming handler's future
//! owns them the same way and is dropped when its connection closes.

use std::convert::Infallible;
use std::time::Instant;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use pagoda_engine::{CompletedRequest, FinishReason, RequestOutput, RequestStream};
use tracing::Instrument;

use crate::error::ApiError;
use crate::params::StreamMode;
use crate::protocol::{Usage, UsageField};

/// One event of a request's merged streams.
pub enum Update {
    /// An output of the prompt at this index.
    Output(usize, RequestOutput),
    /// The engine failed the request, or stopped before it finished.
    Failed(ApiError),
}

fn prompt_updates(prompt: usize, stream: RequestStream) -> impl Stream<Item = Update> + Send {
    stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match stream.next().await {
            Some(Ok(out)) => {
                // The finished stream is dropped here; it sends no abort.
                let rest = if out.finished { None } else { Some(stream) };
                Some((Update::Output(prompt, out), rest))
            }
            Some(Err(e)) => Some((Update::Failed(e.into()), None)),
            None => Some((
                Update::Failed(ApiError::internal("the engine stopped before the request finished")),
                None,
            )),
        }
    })
}

/// The updates of every prompt's stream, interleaved as they arrive.
pub fn merge(streams: Vec<RequestStream>) -> BoxStream<'static, Update> {
    stream::select_all(streams.into_iter().enumerate().map(|(i, s)| prompt_updates(i, s).boxed())).boxed()
}

/// Waits for every prompt (each with `n` samples) to finish; results are in
/// prompt order.
pub async fn collect(streams: Vec<RequestStream>, n: usize) -> Result<Vec<CompletedRequest>, ApiError> {
    let mut done: Vec<CompletedRequest> =
        streams.iter().map(|s| CompletedRequest::new(s.request_id().to_string(), n)).collect();
    let mut updates = merge(streams);
    while let Some(update) = updates.next().await {
        match update {
            Update::Output(i, out) => done[i].absorb(out),
            Update::Failed(e) => return Err(e),
        }
    }
    // Aborted while the client waits means the shutdown grace ran out: the
    // text is partial, so no 200 (a client that left never sees this).
    if done.iter().flat_map(|r| &r.seqs).any(|s| s.finish_reason == Some(FinishReason::Abort)) {
        return Err(ApiError {
            message: "The server is shutting down and aborted the request before it finished.".into(),
            ..ApiError::shutting_down()
        });
    }
    Ok(done)
}

/// Turns a request's updates into the JSON payloads of its SSE events.
pub trait ChunkWriter: Send + 'static {
    /// Events before any output (chat's role chunks).
    fn start(&mut self) -> Vec<String>;
    fn output(&mut self, prompt: usize, out: RequestOutput) -> Vec<String>;
    /// Events after the last output (the usage chunk), before `[DONE]`.
    fn end(&mut self) -> Vec<String>;
    /// (prompt tokens, completion tokens) so far, for the log line.
    fn usage(&self) -> (usize, usize);
}

/// The token counts of a streamed response and whether the client asked for
/// them (`stream_options.include_usage`): then every chunk carries
/// `usage: null` (or, with vLLM's `continuous_usage_stats`, the counts so
/// far) and a last chunk carries the counts; otherwise no chunk has `usage`.
pub struct StreamUsage {
    pub include_usage: bool,
    pub continuous: bool,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl StreamUsage {
    pub fn new(mode: StreamMode, prompt_tokens: usize) -> Self {
        Self {
            include_usage: mode.include_usage,
            continuous: mode.continuous_usage,
            prompt_tokens,
            completion_tokens: 0,
        }
    }

    /// The `usage` of a chunk before the end.
    pub fn pending(&self) -> UsageField {
        match (self.include_usage, self.continuous) {
            (true, true) => UsageField::Counts(Usage::new(self.prompt_tokens, self.completion_tokens)),
            (true, false) => UsageField::Null,
            (false, _) => UsageField::Absent,
        }
    }

    /// The `usage` of the last chunk, when there is to be one.
    pub fn last(&self) -> Option<UsageField> {
        self.include_usage.then(|| UsageField::Counts(Usage::new(self.prompt_tokens, self.completion_tokens)))
    }

    /// (prompt tokens, completion tokens), as [`ChunkWriter::usage`] wants.
    pub fn counts(&self) -> (usize, usize) {
        (self.prompt_tokens, self.completion_tokens)
    }
}

/// Logs how a streamed request ended, including when the client left early
/// (the body was dropped before the last event).
struct StreamLog {
    started: Instant,
    completed: bool,
    span: tracing::Span,
    usage: (usize, usize),
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        let _enter = self.span.enter();
        let elapsed_ms = self.started.elapsed().as_millis() as u64;
        let (prompt_tokens, completion_tokens) = self.usage;
        if self.completed {
            tracing::info!(prompt_tokens, completion_tokens, elapsed_ms, "stream finished");
        } else {
            tracing::info!(
                prompt_tokens,
                completion_tokens,
                elapsed_ms,
                "client disconnected; request aborted"
            );
        }
    }
}

/// The SSE response: `data: {chunk}` events, then `data: [DONE]`. An engine
/// failure midway becomes a `data: {"error": ...}` event before `[DONE]`.
pub fn sse_response<W: ChunkWriter>(
    updates: BoxStream<'static, Update>,
    writer: W,
    started: Instant,
) -> Response {
    struct Driver<W> {
        updates: BoxStream<'static, Update>,
        writer: W,
        started: bool,
        done: bool,
        log: StreamLog,
    }
    let span = tracing::Span::current();
    let driver = Driver {
        updates,
        writer,
        started: false,
        done: false,
        log: StreamLog { started, completed: false, span: span.clone(), usage: (0, 0) },
    };
    let events = stream::unfold(driver, move |mut d| {
        async move {
            if d.done {
                return None;
            }
            if !d.started {
                d.started = true;
                let start = d.writer.start();
                return Some((start, d));
            }
            let batch = match d.updates.next().await {
                Some(Update::Output(prompt, out)) => d.writer.output(prompt, out),
                Some(Update::Failed(e)) => {
                    tracing::error!(error = %e.message, "request failed in the engine");
                    d.done = true;
                    d.log.completed = true;
                    vec![e.to_json(), "[DONE]".to_string()]
                }
                None => {
                    d.done = true;
                    d.log.completed = true;
                    let mut end = d.writer.end();
                    end.push("[DONE]".to_string());
                    end
                }
            };
            d.log.usage = d.writer.usage();
            Some((batch, d))
        }
        .instrument(span.clone())
    })
    .flat_map(|batch| {
        stream::iter(batch.into_iter().map(|data| Ok::<_, Infallible>(Event::default().data(data))))
    });
    Sse::new(events).into_response()
}

/// Serializes a response object; our types always serialize.
pub fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
