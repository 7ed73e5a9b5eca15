//! Pagoda's OpenAI-compatible HTTP server (axum): `/v1/completions` and
//! `/v1/chat/completions` (streamed as Server-Sent Events or not),
//! `/v1/models`, vLLM's `/tokenize` and `/detokenize`, `/health`, `/version`
//! and Prometheus `/metrics`, over an [`AsyncEngine`] running on its own
//! thread.
//!
//! - Every request field OpenAI or vLLM defines either works or is refused
//!   with a 400 naming it ([`fields`] holds the table).
//! - Errors use OpenAI's JSON shape and status codes ([`ApiError`]): 400 for
//!   bad input (naming the field), 401 for a wrong API key, 404 for an unknown
//!   model, 429 when the waiting queue is full, 503 while shutting down.
//! - A client that disconnects aborts its request: the response owns the
//!   engine's [`RequestStream`](pagoda_engine::RequestStream)s, and dropping
//!   them frees the request's KV blocks.
//! - [`serve`] stops on its `shutdown` future (the CLI passes
//!   [`shutdown_signal`]: SIGTERM or Ctrl-C; a second one exits at once),
//!   gives in-flight requests [`ServerConfig::shutdown_grace`] to finish,
//!   then aborts the rest (a non-streamed one so cut gets 503). It keeps
//!   accepting during the drain: new requests and /health get 503.
//! - Connections are capped and timed out (`connections`): see
//!   [`ConnectionLimits`].
//! - LoRA adapters (`--lora-modules`, and at runtime vLLM's
//!   `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`) are served under
//!   their own names: a request's `model` picks one ([`LoraModulePath`]).
//! - `/dashboard` draws the KV page map, the queues and the step timeline
//!   live from `/v1/debug/kv` and `/metrics` ([`dashboard`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use pagoda_backend_cpu_ref::CpuBackend;
//! use pagoda_engine::{load_engine, AsyncEngine, EngineConfig};
//! use pagoda_server::{serve, shutdown_signal, ServerArgs};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let args = ServerArgs { port: 8000, ..ServerArgs::default() };
//! let model = "models/smollm2-135m-instruct";
//! let engine = AsyncEngine::start(
//!     move || load_engine(CpuBackend::new(), model, EngineConfig::default(), |_, _| {}),
//!     args.engine_options(),
//! )?;
//! let config = args.to_config(model, env!("CARGO_PKG_VERSION"), "unknown");
//! serve(config, Arc::new(engine), shutdown_signal()).await?;
//! # Ok(())
//! # }
//! ```

mod chat;
mod completions;
mod config;
mod connections;
pub mod dashboard;
mod endpoint;
mod error;
mod extract;
pub mod fields;
mod logprobs;
mod lora;
mod params;
pub mod protocol;
mod routes;
mod state;
mod streaming;
mod structured;
mod tokenize;
mod tools;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pagoda_engine::AsyncEngine;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{init_tracing, CorsConfig, JsonList, LogFormat, ServerArgs, ServerConfig};
pub use connections::{ConnectionLimits, MAX_HEADER_BYTES, MAX_URI_BYTES};
pub use error::{ApiError, ServeError};
pub use lora::{parse_lora_module, LoraModulePath};
pub use routes::router;
pub use state::AppState;

/// How long connections may stay open after the engine has stopped (time
/// for the last events to reach clients) before the server exits anyway.
const DRAIN_MARGIN: Duration = Duration::from_secs(5);

/// Binds `config.host:config.port`.
pub async fn bind(config: &ServerConfig) -> Result<TcpListener, ServeError> {
    let addr = format!("{}:{}", config.host, config.port);
    TcpListener::bind(&addr).await.map_err(|source| ServeError::Bind { addr, source })
}

/// Binds and serves until `shutdown` resolves, then shuts down gracefully:
/// lets in-flight requests run for up to `config.shutdown_grace` while
/// answering new ones with 503, aborts the rest, stops the engine, and
/// stops accepting connections.
pub async fn serve(
    config: ServerConfig,
    engine: Arc<AsyncEngine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = bind(&config).await?;
    serve_on(listener, config, engine, shutdown).await
}

/// [`serve`] on a listener already bound (tests bind port 0 and read the
/// address back with [`TcpListener::local_addr`]).
pub async fn serve_on(
    listener: TcpListener,
    config: ServerConfig,
    engine: Arc<AsyncEngine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map(|a: SocketAddr| a.to_string()).unwrap_or_default();
    let grace = config.shutdown_grace;
    let limits = config.connection_limits;
    // Reads the --lora-modules adapters: file I/O, off the async threads.
    let state_engine = engine.clone();
    let state = tokio::task::spawn_blocking(move || AppState::new(config, state_engine))
        .await
        .map_err(|e| ServeError::Io(std::io::Error::other(e)))??;
    let app = router(state.clone());
    tracing::info!(addr = %addr, model = state.config().model_name(), "serving the OpenAI-compatible API");

    let (engine_stopped_tx, mut engine_stopped) = watch::channel(false);
    // Accepting goes on through the drain, so clients get 503s rather than
    // refused connections until the engine has stopped.
    let drained = async move {
        shutdown.await;
        tracing::info!(grace_secs = grace.as_secs_f64(), "shutting down: finishing in-flight requests");
        state.begin_shutdown();
        // `AsyncEngine::shutdown` blocks until the engine thread has joined.
        tokio::task::spawn_blocking(move || {
            engine.shutdown(grace);
            let _ = engine_stopped_tx.send(true);
        });
        let _ = engine_stopped.wait_for(|&s| s).await;
    };
    // Once the engine has stopped, every stream has had its last event; a
    // client still not done after the margin is not waited for.
    connections::serve_until(listener, app, limits, drained, DRAIN_MARGIN).await;
    tracing::info!("server stopped");
    Ok(())
}

/// Exit status after a second SIGTERM or Ctrl-C (128 + SIGINT, as shells report an interrupt).
const FORCED_EXIT_STATUS: i32 = 130;

/// Resolves on the first SIGTERM or Ctrl-C (SIGINT); from then on a second
/// one exits the process at once, without waiting for the drain.
pub async fn shutdown_signal() {
    next_signal().await;
    tokio::spawn(async {
        next_signal().await;
        tracing::warn!("second shutdown signal: exiting without waiting for in-flight requests");
        std::process::exit(FORCED_EXIT_STATUS);
    });
}

/// Resolves on the next SIGTERM or Ctrl-C (SIGINT).
async fn next_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("received Ctrl-C"),
        _ = terminate => tracing::info!("received SIGTERM"),
    }
}
