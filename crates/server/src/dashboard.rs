//! The live dashboard: `GET /dashboard`, one page (HTML, CSS and a
//! dependency-free script, all embedded in the binary) that draws the KV page
//! map, the queues and the step timeline, and `GET /v1/debug/kv`, the compact
//! JSON view of the KV cache it polls several times a second. Both follow
//! /metrics' rules (no API key) and are left out with `--disable-dashboard`.
//!
//! The handler never blocks the engine: it asks the engine thread for a view
//! (answered at the next step boundary, rebuilt at most ten times a second
//! however many pages poll; see `pagoda_engine::KvViewSource`) and awaits it.

use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use pagoda_engine::{KvView, SeqStatus};
use serde::Serialize;

use crate::error::ApiError;
use crate::state::AppState;

/// The page, its stylesheet, and its scripts: the KV map drawing (shared with
/// `pagoda sim --html`) and the page's own polling and charts.
const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");
const DASHBOARD_CSS: &str = include_str!("../assets/dashboard.css");
const DASHBOARD_JS: &str = include_str!("../assets/dashboard.js");
/// Draws a KV page map on a canvas from `/v1/debug/kv`'s encoding; the
/// simulator's animation embeds it too.
pub const KV_MAP_JS: &str = include_str!("../assets/kv_map.js");

/// The dashboard's routes, to merge into the API router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/dashboard.css", get(|| asset("text/css; charset=utf-8", DASHBOARD_CSS)))
        .route("/dashboard/dashboard.js", get(|| asset("text/javascript; charset=utf-8", DASHBOARD_JS)))
        .route("/dashboard/kv_map.js", get(|| asset("text/javascript; charset=utf-8", KV_MAP_JS)))
        .route("/v1/debug/kv", get(debug_kv))
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", DASHBOARD_HTML).await
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    // Embedded in the binary: a new build brings new files, so caching is left to revalidation.
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// What `/v1/debug/kv` may be asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KvQuery {
    /// List the live sequences and their block tables (`seqs=false` leaves
    /// them out, for a viewer that only wants the map).
    seqs: bool,
}

impl KvQuery {
    /// Parses `seqs=true|false`; anything else is refused by name.
    fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut parsed = Self { seqs: true };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "seqs" => {
                    parsed.seqs = match value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        other => {
                            return Err(ApiError::bad_request(
                                Some("seqs"),
                                format!("seqs must be true or false, not {other:?}"),
                            ))
                        }
                    }
                }
                other => {
                    return Err(ApiError::bad_request(
                        Some(other),
                        format!("unknown query parameter {other:?} (the only one is seqs=true|false)"),
                    ))
                }
            }
        }
        Ok(parsed)
    }
}

async fn debug_kv(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let query = match KvQuery::parse(query.as_deref()) {
        Ok(query) => query,
        Err(e) => return e.into_response(),
    };
    match state.engine().kv_view().await {
        Some(view) => axum::Json(KvViewJson::of(&view, query.seqs)).into_response(),
        None => ApiError::shutting_down().into_response(),
    }
}

/// `/v1/debug/kv`'s body. Block states are runs `[code, length]` in block
/// order (`f` free, `o` owned by one sequence, `s` shared copy-on-write, `c`
/// cached and evictable, `r` reserved); block lists are runs `[first id,
/// length]` of consecutive ids.
#[derive(Debug, Serialize)]
pub(crate) struct KvViewJson<'a> {
    object: &'static str,
    view_id: u64,
    engine_steps: u64,
    block_size: usize,
    num_gpu_blocks: usize,
    num_cpu_blocks: usize,
    gpu_runs: Vec<(char, u32)>,
    cpu_runs: Vec<(char, u32)>,
    counts: CountsJson,
    eviction_order: &'a [(u32, u32)],
    queues: QueuesJson,
    /// `None` when asked with `seqs=false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    seqs: Option<Vec<SeqJson<'a>>>,
    prefix_cache: PrefixJson,
    preemptions: u64,
    steps: StepsJson,
    /// Microseconds the engine thread spent building the view.
    build_us: u64,
}

#[derive(Debug, Serialize)]
struct CountsJson {
    free: usize,
    owned: usize,
    shared: usize,
    cached: usize,
    reserved: usize,
    /// Owned + shared + reserved: /metrics' `kv_cache_blocks_used`.
    used: usize,
    cpu_used: usize,
}

#[derive(Debug, Serialize)]
struct QueuesJson {
    running: usize,
    waiting: usize,
    swapped: usize,
}

#[derive(Debug, Serialize)]
struct SeqJson<'a> {
    request_id: &'a str,
    sample_index: usize,
    status: &'static str,
    prompt_tokens: usize,
    prompt_tokens_computed: usize,
    output_tokens: usize,
    gpu_blocks: &'a [(u32, u32)],
    cpu_blocks: &'a [(u32, u32)],
}

#[derive(Debug, Serialize)]
struct PrefixJson {
    queried_tokens: u64,
    hit_tokens: u64,
    hit_rate: f64,
    evictions: u64,
}

#[derive(Debug, Serialize)]
struct StepsJson {
    decode: PhaseJson,
    prefill: PhaseJson,
}

/// Steps of one kind since the engine started: how many, their tokens, and
/// their host time in seconds.
#[derive(Debug, Serialize)]
struct PhaseJson {
    steps: u64,
    tokens: u64,
    seconds: f64,
}

impl From<pagoda_engine::PhaseTotal> for PhaseJson {
    fn from(total: pagoda_engine::PhaseTotal) -> Self {
        Self { steps: total.steps, tokens: total.tokens, seconds: total.time.as_secs_f64() }
    }
}

fn status_name(status: SeqStatus) -> &'static str {
    match status {
        SeqStatus::Running => "running",
        SeqStatus::Waiting => "waiting",
        SeqStatus::Swapped => "swapped",
    }
}

impl<'a> KvViewJson<'a> {
    pub(crate) fn of(view: &'a KvView, with_seqs: bool) -> Self {
        let runs = |runs: &[(pagoda_engine::BlockState, u32)]| -> Vec<(char, u32)> {
            runs.iter().map(|&(state, len)| (state.code(), len)).collect()
        };
        let (running, waiting, swapped) = view.queue_lengths();
        let c = view.counts;
        Self {
            object: "kv_view",
            view_id: view.view_id,
            engine_steps: view.engine_steps,
            block_size: view.block_size,
            num_gpu_blocks: view.num_gpu_blocks,
            num_cpu_blocks: view.num_cpu_blocks,
            gpu_runs: runs(&view.gpu_runs),
            cpu_runs: runs(&view.cpu_runs),
            counts: CountsJson {
                free: c.free,
                owned: c.owned,
                shared: c.shared,
                cached: c.cached,
                reserved: c.reserved,
                used: c.used(),
                cpu_used: c.cpu_used,
            },
            eviction_order: &view.eviction_order,
            queues: QueuesJson { running, waiting, swapped },
            seqs: with_seqs.then(|| {
                view.seqs
                    .iter()
                    .map(|s| SeqJson {
                        request_id: &s.request_id,
                        sample_index: s.sample_index,
                        status: status_name(s.status),
                        prompt_tokens: s.prompt_tokens,
                        prompt_tokens_computed: s.prompt_tokens_computed,
                        output_tokens: s.output_tokens,
                        gpu_blocks: &s.gpu_blocks,
                        cpu_blocks: &s.cpu_blocks,
                    })
                    .collect()
            }),
            prefix_cache: PrefixJson {
                queried_tokens: view.prefix_cache.queried_tokens,
                hit_tokens: view.prefix_cache.hit_tokens,
                hit_rate: view.prefix_cache.hit_rate(),
                evictions: view.prefix_cache.num_evictions,
            },
            preemptions: view.preemptions,
            steps: StepsJson { decode: view.decode_steps.into(), prefill: view.prefill_steps.into() },
            build_us: u64::try_from(view.build_time.as_micros()).unwrap_or(u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_accepts_seqs_and_refuses_the_rest_by_name() {
        assert_eq!(KvQuery::parse(None).unwrap(), KvQuery { seqs: true });
        assert_eq!(KvQuery::parse(Some("")).unwrap(), KvQuery { seqs: true });
        assert_eq!(KvQuery::parse(Some("seqs=false")).unwrap(), KvQuery { seqs: false });
        assert_eq!(KvQuery::parse(Some("seqs=1&")).unwrap(), KvQuery { seqs: true });
        let bad = KvQuery::parse(Some("seqs=maybe")).unwrap_err();
        assert!(bad.to_string().contains("\"maybe\""), "{bad}");
        let unknown = KvQuery::parse(Some("seqs=true&tables=0")).unwrap_err();
        assert!(unknown.to_string().contains("\"tables\""), "{unknown}");
        assert!(KvQuery::parse(Some("seqs")).is_err(), "a name without a value is not a boolean");
    }
}
