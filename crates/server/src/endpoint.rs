//! What the generation endpoints (/v1/completions, /v1/chat/completions)
//! share around their own logic: a fresh request id, the `request` span
//! every log line of the request sits in, and the logging of how it ended.

use std::future::Future;
use std::time::Instant;

use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::state::AppState;

/// Runs `handler` (given the state, the parsed body, the request id and the
/// start time) inside a `request` span carrying the id and `endpoint`. A
/// body that did not parse, or an error from `handler`, is logged in that
/// span and becomes the error response.
pub async fn run_endpoint<T, F, Fut>(
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
    let request_id = state.next_request_id(id_prefix);
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
