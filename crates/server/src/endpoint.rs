//! What the generation endpoints (/v1/completions, /v1/chat/completions)
//! share around their own logic: a fresh request id, the `request` span
//! every log line of the request sits in, the logging of how it ended, and
//! the [`PromptWorkers`] that render and tokenize prompts off the async
//! threads (refusing text too long to ever fit before tokenizing it).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::response::{IntoResponse, Response};
use pagoda_models::Tokenizer;
use serde_json::Value;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::state::AppState;

/// Runs `handler` (given the state, the parsed body, the request id and the
/// start time) inside a `request` span carrying the id and `endpoint`. A
/// body that did not parse, or an error from `handler`, is logged in that
/// span and becomes the error response.
pub async fn run_endpoint<T: crate::protocol::RequestBody, F, Fut>(
    state: AppState,
    body: Result<ApiJson<T>, ApiError>,
    id_prefix: &str,
    endpoint: &'static str,
    handler: F,
) -> Response
where
    F: FnOnce(AppState, T, String, Instant) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let started = Instant::now();
    let client_id = body.as_ref().ok().and_then(|ApiJson(request)| request.client_request_id());
    let request_id = match client_id {
        Some(id) => format!("{id_prefix}-{id}"),
        None => state.next_request_id(id_prefix),
    };
    let span = tracing::info_span!("request", request_id = %request_id, endpoint);
    let result = async {
        // Draining: refuse before the engine (whose own flag is set a moment later) sees it.
        if state.is_shutting_down() {
            return Err(ApiError::shutting_down());
        }
        let ApiJson(request) = body?;
        handler(state, request, request_id, started).await
    }
    .instrument(span.clone())
    .await;
    result.unwrap_or_else(|e| {
        span.in_scope(|| e.log());
        e.into_response()
    })
}

/// The last log line of a non-streamed request (streamed ones log theirs
/// when the stream ends or the client leaves).
pub fn log_finished(prompt_tokens: usize, completion_tokens: usize, started: Instant) {
    tracing::info!(
        prompt_tokens,
        completion_tokens,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "request finished"
    );
}

/// Where prompts are prepared (chat templates rendered, text tokenized):
/// work proportional to the prompt's size, which must never run on the
/// async workers, or one 30 MB prompt holds a worker, and `/health` with
/// it, for seconds. Every job runs on tokio's blocking threads. A job over
/// [`SMALL_JOB_BYTES`] of input also holds one of a fixed number of permits
/// (one per core), so big jobs queue among themselves, without holding a
/// thread while they wait, and never delay small ones behind them.
pub struct PromptWorkers {
    big_job_permits: Arc<Semaphore>,
    /// The most bytes of text one token can stand for (see
    /// [`max_token_bytes`]); `None` when no such bound can be proven.
    max_token_bytes: Option<usize>,
}

/// Input size (bytes) up to which a job skips the permit queue: a few
/// milliseconds of tokenization at most.
pub const SMALL_JOB_BYTES: usize = 64 << 10;

impl PromptWorkers {
    /// One permit per core; the byte bound computed once from `tokenizer`.
    pub fn new(tokenizer: &Tokenizer) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_big_jobs(cores, max_token_bytes(tokenizer))
    }

    /// At most `big_jobs` big jobs at once (at least one).
    pub fn with_big_jobs(big_jobs: usize, max_token_bytes: Option<usize>) -> Self {
        Self { big_job_permits: Arc::new(Semaphore::new(big_jobs.max(1))), max_token_bytes }
    }

    /// Refuses a text whose length alone proves it cannot fit a context of
    /// `max_model_len` tokens, before anyone spends time tokenizing it: a
    /// token stands for at most `max_token_bytes` bytes, so a text longer
    /// than `max_token_bytes * (max_model_len - 1)` bytes has at least
    /// `max_model_len` tokens, which leaves no room for output.
    pub fn check_text_fits(&self, text: &str, max_model_len: usize, param: &str) -> Result<(), ApiError> {
        let Some(per_token) = self.max_token_bytes else { return Ok(()) };
        let limit = per_token.saturating_mul(max_model_len.saturating_sub(1));
        if text.len() > limit {
            return Err(ApiError::bad_request(
                Some(param),
                format!(
                    "`{param}` is {} bytes of text, which cannot fit this model's maximum context length \
                     of {max_model_len} tokens: with at most {per_token} bytes per token, the limit is \
                     {limit} bytes.",
                    text.len()
                ),
            ));
        }
        Ok(())
    }

    /// Runs `job` on a blocking thread, once a permit is free if
    /// `input_bytes` is over [`SMALL_JOB_BYTES`]. The job is told through
    /// its [`Cancelled`] flag when the caller has gone (the client left), so
    /// a long job can stop early; it keeps its permit until it returns.
    pub async fn run<T, F>(&self, input_bytes: usize, job: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Cancelled) -> Result<T, ApiError> + Send + 'static,
    {
        let permit = if input_bytes > SMALL_JOB_BYTES {
            let permits = self.big_job_permits.clone();
            // The semaphore is never closed.
            Some(permits.acquire_owned().await.map_err(|_| ApiError::internal("prompt workers closed"))?)
        } else {
            None
        };
        let cancelled = Cancelled::default();
        let _cancel_on_drop = CancelOnDrop(cancelled.clone());
        let handle = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job(&cancelled)
        });
        handle.await.map_err(|e| ApiError::internal(format!("preparing the prompt failed: {e}")))?
    }
}

/// Set once the request that started a job has gone away.
#[derive(Clone, Debug, Default)]
pub struct Cancelled(Arc<AtomicBool>);

impl Cancelled {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The error a job returns when it stops early (nobody reads it).
    pub fn error() -> ApiError {
        ApiError::bad_request(None, "the request was cancelled")
    }
}

/// Sets the flag when the handler's future is dropped (or finishes).
struct CancelOnDrop(Cancelled);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0 .0.store(true, Ordering::Relaxed);
    }
}

/// The most bytes of input text a single token can cover, for tokenizers
/// where that is provable: a BPE model whose normalizer cannot shrink text
/// by more than a known factor and whose pre-tokenizer drops no input.
/// `None` otherwise (no byte bound is applied then).
///
/// A token covers the bytes its vocabulary string stands for: one byte per
/// character for byte-level BPE, the UTF-8 bytes of the string otherwise
/// (SentencePiece's `▁` and `<0x0A>` only overestimate), the content of an
/// added token. An unknown character becomes one token: at least 4 bytes.
/// A normalizer that rewrites characters (NFC, lowercase...) can turn a
/// 4-byte character into a 1-byte one: the bound is multiplied by that.
pub fn max_token_bytes(tokenizer: &Tokenizer) -> Option<usize> {
    let inner = tokenizer.inner()?;
    // The concrete types live in the `tokenizers` crate; their serialized
    // form (as in tokenizer.json) says what they are.
    let model = serde_json::to_value(inner.get_model()).ok()?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return None;
    }
    let normalizer = match inner.get_normalizer() {
        Some(n) => serde_json::to_value(n).ok()?,
        None => Value::Null,
    };
    let shrink = normalizer_shrink_factor(&normalizer)?;
    let pre_tokenizer = match inner.get_pre_tokenizer() {
        Some(p) => serde_json::to_value(p).ok()?,
        None => Value::Null,
    };
    if !pre_tokenizer_keeps_input(&pre_tokenizer) {
        return None;
    }
    let byte_level = mentions_byte_level(&pre_tokenizer) || mentions_byte_level(&normalizer);
    let added = inner.get_added_tokens_decoder();
    let mut longest = 4;
    for id in 0..inner.get_vocab_size(true) as u32 {
        let bytes = match added.get(&id) {
            Some(token) => token.content.len(),
            None => match inner.id_to_token(id) {
                Some(token) if byte_level => token.chars().count(),
                Some(token) => token.len(),
                None => 0,
            },
        };
        longest = longest.max(bytes);
    }
    Some(longest * shrink)
}

/// By how much a normalizer can shrink text (bytes in / bytes out), or
/// `None` when it can delete text (no bound).
fn normalizer_shrink_factor(normalizer: &Value) -> Option<usize> {
    let kind = match normalizer {
        Value::Null => return Some(1),
        n => n.get("type").and_then(Value::as_str)?,
    };
    match kind {
        "Prepend" | "ByteLevel" => Some(1),
        // A character of up to 4 bytes may become one of a single byte.
        "NFC" | "NFD" | "NFKC" | "NFKD" | "Lowercase" => Some(4),
        "Replace" => {
            let pattern = normalizer.get("pattern")?.get("String")?.as_str()?;
            let content = normalizer.get("content")?.as_str()?;
            (!content.is_empty()).then(|| pattern.len().div_ceil(content.len()).max(1))
        }
        "Sequence" => normalizer
            .get("normalizers")?
            .as_array()?
            .iter()
            .try_fold(1usize, |factor, n| Some(factor * normalizer_shrink_factor(n)?)),
        // Strip, StripAccents, Nmt, BertNormalizer, Precompiled... delete characters.
        _ => None,
    }
}

/// Whether a pre-tokenizer keeps every byte of its input in some piece.
fn pre_tokenizer_keeps_input(pre_tokenizer: &Value) -> bool {
    let kind = match pre_tokenizer {
        Value::Null => return true,
        p => p.get("type").and_then(Value::as_str).unwrap_or(""),
    };
    match kind {
        "ByteLevel" | "Metaspace" | "Digits" | "UnicodeScripts" => true,
        "Split" | "Punctuation" => pre_tokenizer.get("behavior").and_then(Value::as_str) != Some("Removed"),
        "Sequence" => pre_tokenizer
            .get("pretokenizers")
            .and_then(Value::as_array)
            .is_some_and(|all| all.iter().all(pre_tokenizer_keeps_input)),
        // Whitespace, WhitespaceSplit, BertPreTokenizer, CharDelimiterSplit drop separators.
        _ => false,
    }
}

fn mentions_byte_level(component: &Value) -> bool {
    match component.get("type").and_then(Value::as_str) {
        Some("ByteLevel") => true,
        Some("Sequence") => ["pretokenizers", "normalizers"]
            .iter()
            .filter_map(|key| component.get(*key).and_then(Value::as_array))
            .flatten()
            .any(mentions_byte_level),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_over_the_byte_bound_is_refused_and_text_at_it_is_not() {
        let workers = PromptWorkers::with_big_jobs(1, Some(10));
        // 10 bytes per token, 5 tokens of context: 4 tokens of prompt at most.
        workers.check_text_fits(&"a".repeat(40), 5, "prompt").unwrap();
        let e = workers.check_text_fits(&"a".repeat(41), 5, "prompt").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(e.message.contains("40 bytes"), "{}", e.message);
        // No provable bound: nothing is refused here.
        PromptWorkers::with_big_jobs(1, None).check_text_fits(&"a".repeat(1000), 5, "prompt").unwrap();
    }

    #[test]
    fn only_normalizers_and_pre_tokenizers_that_keep_text_allow_a_bound() {
        let llama2 = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
        assert_eq!(normalizer_shrink_factor(&llama2), Some(1));
        assert_eq!(normalizer_shrink_factor(&json!({"type": "NFC"})), Some(4));
        assert_eq!(normalizer_shrink_factor(&json!({"type": "Strip", "strip_left": true})), None);
        let deletes = json!({"type": "Replace", "pattern": {"String": "x"}, "content": ""});
        assert_eq!(normalizer_shrink_factor(&deletes), None);
        let llama3 = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false}]});
        assert!(pre_tokenizer_keeps_input(&llama3));
        assert!(mentions_byte_level(&llama3));
        assert!(!pre_tokenizer_keeps_input(&json!({"type": "Whitespace"})));
        assert!(!pre_tokenizer_keeps_input(&json!({"type": "Split", "behavior": "Removed"})));
    }
}
