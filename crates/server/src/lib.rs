//! Pagoda's OpenAI-compatible HTTP server (axum): `/v1/completions` and
//! `/v1/chat/completions` (streamed as Server-Sent Events or not),
//! `/v1/models`, `/health`, `/version` and Prometheus `/metrics`, over an
//! [`AsyncEngine`] running on its own thread.
//!
//! - Errors use OpenAI's JSON shape and status codes ([`ApiError`]): 400 for
//!   bad input (naming the field), 401 for a wrong API key, 404 for an unknown
//!   model, 429 when the waiting queue is full, 503 while shutting down.
//! - A client that disconnects aborts its request: the response owns the
//!   engine's [`RequestStream`](pagoda_engine::RequestStream)s, and dropping
//!   them frees the request's KV blocks.
//! - [`serve`] stops on its `shutdown` future (the CLI passes
//!   [`shutdown_signal`]: SIGTERM or Ctrl-C), gives in-flight requests
//!   [`ServerConfig::shutdown_grace`] to finish, then aborts the rest.
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
mod endpoint;
mod error;
mod extract;
mod logprobs;
mod params;
pub mod protocol;
mod routes;
mod state;
mod streaming;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pagoda_engine::AsyncEngine;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{init_tracing, LogFormat, ServerArgs, ServerConfig};
pub use error::{ApiError, ServeError};
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
/// stops accepting connections, lets in-flight requests run for up to
/// `config.shutdown_grace`, aborts the rest, and stops the engine.
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
    let state = AppState::new(config, engine.clone());
    let app = router(state.clone());
    tracing::info!(addr = %addr, model = state.config().model_name(), "serving the OpenAI-compatible API");

    let (engine_stopped_tx, engine_stopped) = watch::channel(false);
    let on_signal = async move {
        shutdown.await;
        tracing::info!(grace_secs = grace.as_secs_f64(), "shutting down: finishing in-flight requests");
        state.begin_shutdown();
        // `AsyncEngine::shutdown` blocks until the engine thread has joined.
        tokio::task::spawn_blocking(move || {
            engine.shutdown(grace);
            let _ = engine_stopped_tx.send(true);
        });
    };
    let serving = axum::serve(listener, app).with_graceful_shutdown(on_signal).into_future();
    let mut stopped = engine_stopped.clone();
    let drained_or_overdue = async move {
        // Once the engine has stopped, every stream has had its last event;
        // a client still not done after the margin is not waited for.
        let _ = stopped.wait_for(|&s| s).await;
        tokio::time::sleep(DRAIN_MARGIN).await;
    };
    tokio::select! {
        result = serving => result?,
        _ = drained_or_overdue => tracing::warn!("connections still open after shutdown; closing them"),
    }
    // The serve loop only returns after the signal, so the engine is stopping.
    let mut stopped = engine_stopped;
    let _ = stopped.wait_for(|&s| s).await;
    tracing::info!("server stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
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
