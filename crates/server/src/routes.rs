//! The router, the small endpoints (/v1/models, /health, /version,
//! /metrics) and the middleware: API-key check and HTTP metrics. The
//! router owns the [`PromptWorkers`] the generation endpoints share.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use prometheus::IntGauge;
use tower_http::cors::{self, AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use crate::config::CorsConfig;
use crate::endpoint::PromptWorkers;
use crate::error::ApiError;
use crate::protocol::{ModelCard, ModelList};
use crate::state::{unix_now, AppState};
use crate::{chat, completions, lora, tokenize};

/// Largest request body (long prompts as token-id lists are big).
const MAX_BODY_BYTES: usize = 32 << 20;

/// The whole API. /v1 routes (the LoRA load and unload routes only with
/// `--allow-runtime-lora-updating`), /tokenize and /detokenize require the API key when one is configured;
/// /health, /version and /metrics never do (probes and scrapers), nor do /dashboard and
/// /v1/debug/kv (served unless `--disable-dashboard`).
pub fn router(state: AppState) -> Router {
    let workers = Arc::new(PromptWorkers::new(state.engine().tokenizer()));
    let v1 = Router::new()
        .route("/v1/completions", post(completions::create_completion))
        .route("/v1/chat/completions", post(chat::create_chat_completion))
        .route("/v1/models", get(list_models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize));
    // vLLM routes these only when runtime updating is allowed; elsewhere they are unknown URLs.
    let v1 = if state.config().allow_runtime_lora_updating {
        v1.route("/v1/load_lora_adapter", post(lora::load_lora_adapter))
            .route("/v1/unload_lora_adapter", post(lora::unload_lora_adapter))
    } else {
        v1
    };
    let v1 = v1.route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    let api = Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics));
    // The dashboard follows /metrics' rules: no API key.
    let api = if state.config().dashboard { api.merge(crate::dashboard::routes()) } else { api };
    // --root-path: behind a proxy that forwards the prefix, every route
    // answers under it too (as vLLM's FastAPI `root_path` accepts both).
    let api = match state.config().root_path.clone() {
        Some(prefix) => Router::new().merge(api.clone()).nest(&prefix, api),
        None => api,
    };
    api.fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(Extension(workers))
        .layer(middleware::from_fn_with_state(state.clone(), track_http))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outermost: preflights are answered before the API key is asked
        // for, and errors carry the CORS headers too (browsers drop them otherwise).
        .layer(cors_layer(&state.config().cors))
        .with_state(state)
}

/// The CORS layer of `--allowed-origins`, `--allowed-methods`,
/// `--allowed-headers` and `--allowed-credentials`. `*` allows any; with
/// credentials, a browser refuses a literal `*`, so the request's own
/// origin, method or headers are echoed instead (as Starlette does for vLLM).
fn cors_layer(cors: &CorsConfig) -> CorsLayer {
    let any = |list: &[String]| list.iter().any(|s| s == "*");
    let values = |list: &[String], what: &str| -> Vec<HeaderValue> {
        list.iter()
            .filter_map(|s| {
                HeaderValue::from_str(s)
                    .map_err(|_| tracing::warn!(value = %s, "ignoring an invalid CORS {what}"))
                    .ok()
            })
            .collect()
    };
    let mut layer = CorsLayer::new().allow_credentials(cors.credentials);
    layer = match (any(&cors.origins), cors.credentials) {
        (true, false) => layer.allow_origin(cors::Any),
        (true, true) => layer.allow_origin(AllowOrigin::mirror_request()),
        (false, _) => layer.allow_origin(values(&cors.origins, "origin")),
    };
    layer = match (any(&cors.methods), cors.credentials) {
        (true, false) => layer.allow_methods(cors::Any),
        (true, true) => layer.allow_methods(AllowMethods::mirror_request()),
        (false, _) => layer.allow_methods(
            cors.methods.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok()).collect::<Vec<_>>(),
        ),
    };
    match (any(&cors.headers), cors.credentials) {
        (true, false) => layer.allow_headers(cors::Any),
        (true, true) => layer.allow_headers(AllowHeaders::mirror_request()),
        (false, _) => layer.allow_headers(
            values(&cors.headers, "header")
                .into_iter()
                .filter_map(|v| HeaderName::from_bytes(v.as_bytes()).ok())
                .collect::<Vec<_>>(),
        ),
    }
}

/// The base model under each served name, then the LoRA adapters in the
/// order they were registered, each naming its base model as `parent`.
async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let config = state.config();
    let created = unix_now();
    let max_model_len = state.engine().info().max_model_len;
    let card = |id: String, root: String, parent: Option<String>| ModelCard {
        id,
        object: "model",
        created,
        owned_by: "pagoda",
        root,
        parent,
        max_model_len,
    };
    let mut data: Vec<ModelCard> = config
        .served_model_names
        .iter()
        .map(|id| card(id.clone(), config.model_root.clone(), None))
        .collect();
    data.extend(
        state
            .loras()
            .list()
            .into_iter()
            .map(|(lora, parent)| card(lora.name, lora.path.display().to_string(), Some(parent))),
    );
    Json(ModelList { object: "list", data })
}

async fn health(State(state): State<AppState>) -> Response {
    if state.is_shutting_down() {
        ApiError::shutting_down().into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn version(State(state): State<AppState>) -> Json<serde_json::Value> {
    let config = state.config();
    Json(serde_json::json!({ "version": config.version, "git_rev": config.git_rev }))
}

async fn metrics(State(state): State<AppState>) -> Response {
    // vLLM's series carry the served model's name; so do ours.
    let model_name = state.config().model_name();
    let mut text = state.engine().metrics().render_labelled(&[("model_name", model_name)]);
    text.push_str(&state.http_metrics().render());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

async fn require_api_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.config().api_key {
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
        // An empty configured key (refused at startup) authorizes nobody.
        if key.is_empty() || !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            let mut response = ApiError::unauthorized().into_response();
            // RFC 6750: a 401 names the scheme the client should use.
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

/// The token of an `Authorization: Bearer <token>` header (the scheme name
/// is case-insensitive, RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without an early exit, so response timing does not leak how
/// much of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts responses by route and status, and requests in flight until their
/// body (a whole stream, for SSE) is done or dropped.
async fn track_http(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let metrics = state.http_metrics();
    let guard = InFlight::new(metrics.in_flight.clone());
    let response = next.run(request).await;
    metrics.requests.with_label_values(&[route.as_str(), response.status().as_str()]).inc();
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, GuardedBody::wrap(body, guard))
}

struct InFlight(IntGauge);

impl InFlight {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A response body that holds `guard` until the body is done or dropped
/// (for SSE, the whole stream): in-flight gauges and busy markers end with
/// the response, not when the handler returns.
pub(crate) struct GuardedBody<G> {
    inner: Body,
    _guard: G,
}

impl<G: Send + Unpin + 'static> GuardedBody<G> {
    pub(crate) fn wrap(inner: Body, guard: G) -> Body {
        Body::new(Self { inner, _guard: guard })
    }
}

impl<G: Send + Unpin + 'static> http_body::Body for GuardedBody<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, constant_time_eq};

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer k"), Some("k"));
        assert_eq!(bearer_token("bearer  k "), Some("k"));
        assert_eq!(bearer_token("Basic k"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
