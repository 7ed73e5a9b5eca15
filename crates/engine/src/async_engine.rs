//! The engine on its own thread, driven through channels: the HTTP side
//! submits requests and receives their outputs as a stream, while the engine
//! loop keeps stepping as long as any request is live (continuous batching
//! across clients). Dropping a stream before it finishes aborts its request,
//! which frees its KV blocks at the next loop turn.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagoda_backend::Backend;
use pagoda_models::{ChatTemplate, Tokenizer};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::engine::{validate_request, LlmEngine, ModelInfo};
use crate::error::EngineError;
use crate::metrics::EngineMetrics;
use crate::request::{GenerationRequest, RequestOutput};

/// Why a request was not accepted.
#[derive(Debug, Error)]
pub enum SubmitError {
    /// Too many requests are waiting: try again later (HTTP 429).
    #[error("the server is overloaded: {0} requests are already queued; retry later")]
    Overloaded(usize),
    /// The engine is shutting down or has stopped (HTTP 503).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The request itself is wrong (HTTP 400).
    #[error(transparent)]
    Invalid(EngineError),
}

/// A failure of the engine while a request was in flight (HTTP 500 / an
/// error event on a stream).
#[derive(Clone, Debug, Error)]
#[error("{0}")]
pub struct StreamError(pub String);

enum Command {
    Add {
        request: GenerationRequest,
        arrived: Instant,
        outputs: mpsc::UnboundedSender<Result<RequestOutput, StreamError>>,
    },
    Abort(String),
    Shutdown {
        grace: Duration,
    },
}

/// Options of the async engine.
#[derive(Clone, Debug)]
pub struct AsyncEngineOptions {
    /// Most live requests (queued or running) before new ones get
    /// [`SubmitError::Overloaded`].
    pub max_pending_requests: usize,
}

impl Default for AsyncEngineOptions {
    fn default() -> Self {
        Self { max_pending_requests: 1024 }
    }
}

struct Shared {
    live_requests: AtomicUsize,
    shutting_down: AtomicBool,
}

/// A handle on the engine thread. Cheap to share behind an `Arc`.
pub struct AsyncEngine {
    commands: std_mpsc::Sender<Command>,
    info: ModelInfo,
    max_num_seqs: usize,
    tokenizer: Tokenizer,
    chat_template: Option<Arc<ChatTemplate>>,
    metrics: Arc<EngineMetrics>,
    shared: Arc<Shared>,
    options: AsyncEngineOptions,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The outputs of one request, in order; the last has `finished == true`.
/// Dropping it early aborts the request.
pub struct RequestStream {
    request_id: String,
    outputs: mpsc::UnboundedReceiver<Result<RequestOutput, StreamError>>,
    commands: std_mpsc::Sender<Command>,
    finished: bool,
}

impl RequestStream {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The next update, or `None` once the request has finished (or the
    /// engine is gone).
    pub async fn next(&mut self) -> Option<Result<RequestOutput, StreamError>> {
        if self.finished {
            return None;
        }
        let item = self.outputs.recv().await;
        match &item {
            Some(Ok(out)) if out.finished => self.finished = true,
            Some(Err(_)) | None => self.finished = true,
            _ => {}
        }
        item
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away: free its blocks now, not when it would have finished.
            let _ = self.commands.send(Command::Abort(self.request_id.clone()));
        }
    }
}

impl AsyncEngine {
    /// Starts the engine thread. `build` runs on that thread (device
    /// contexts are per thread) and its error, if any, is returned here.
    pub fn start<B, F>(build: F, options: AsyncEngineOptions) -> Result<Self, EngineError>
    where
        B: Backend,
        F: FnOnce() -> Result<LlmEngine<B>, EngineError> + Send + 'static,
    {
        let (commands, command_rx) = std_mpsc::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let shared =
            Arc::new(Shared { live_requests: AtomicUsize::new(0), shutting_down: AtomicBool::new(false) });
        let loop_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pagoda-engine".into())
            .spawn(move || {
                let engine = match build() {
                    Ok(engine) => engine,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let handshake = (
                    engine.info().clone(),
                    engine.config().max_num_seqs,
                    engine.tokenizer().clone(),
                    engine.chat_template().cloned(),
                    engine.metrics(),
                );
                if ready_tx.send(Ok(handshake)).is_err() {
                    return;
                }
                engine_loop(engine, command_rx, &loop_shared);
            })
            .map_err(|e| EngineError::Internal(format!("cannot start the engine thread: {e}")))?;
        let (info, max_num_seqs, tokenizer, chat_template, metrics) = ready_rx
            .recv()
            .map_err(|_| EngineError::Internal("the engine thread died while starting".into()))??;
        Ok(Self {
            commands,
            info,
            max_num_seqs,
            tokenizer,
            chat_template,
            metrics,
            shared,
            options,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn chat_template(&self) -> Option<&Arc<ChatTemplate>> {
        self.chat_template.as_ref()
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    /// Live requests (queued or running).
    pub fn num_live_requests(&self) -> usize {
        self.shared.live_requests.load(Ordering::SeqCst)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::SeqCst)
    }

    /// Validates and queues a request; its outputs arrive on the stream.
    pub fn submit(&self, mut request: GenerationRequest) -> Result<RequestStream, SubmitError> {
        if self.is_shutting_down() {
            return Err(SubmitError::ShuttingDown);
        }
        validate_request(&self.info, self.max_num_seqs, &mut request).map_err(SubmitError::Invalid)?;
        let live = self.shared.live_requests.fetch_add(1, Ordering::SeqCst);
        if live >= self.options.max_pending_requests {
            self.shared.live_requests.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Overloaded(live));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let request_id = request.request_id.clone();
        if self.commands.send(Command::Add { request, arrived: Instant::now(), outputs: tx }).is_err() {
            self.shared.live_requests.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(RequestStream { request_id, outputs: rx, commands: self.commands.clone(), finished: false })
    }

    /// Aborts a request by id (no-op if it already finished).
    pub fn abort(&self, request_id: &str) {
        let _ = self.commands.send(Command::Abort(request_id.to_string()));
    }

    /// Stops accepting requests, lets in-flight ones run for up to `grace`,
    /// aborts what is left, and joins the engine thread.
    pub fn shutdown(&self, grace: Duration) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let _ = self.commands.send(Command::Shutdown { grace });
        let handle = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for AsyncEngine {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

type Senders = std::collections::HashMap<String, mpsc::UnboundedSender<Result<RequestOutput, StreamError>>>;

fn engine_loop<B: Backend>(mut engine: LlmEngine<B>, commands: std_mpsc::Receiver<Command>, shared: &Shared) {
    let mut senders: Senders = Senders::new();
    let mut deadline: Option<Instant> = None;
    loop {
        // Idle: sleep until a command arrives. Busy: take what is there.
        if !engine.has_unfinished_requests() {
            if deadline.is_some() {
                break;
            }
            match commands.recv() {
                Ok(cmd) => handle_command(cmd, &mut engine, &mut senders, &mut deadline, shared),
                Err(_) => break,
            }
        }
        while let Ok(cmd) = commands.try_recv() {
            handle_command(cmd, &mut engine, &mut senders, &mut deadline, shared);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let ids: Vec<String> = senders.keys().cloned().collect();
            for id in ids {
                finish_abort(&id, &mut engine, &mut senders, shared);
            }
            break;
        }
        if !engine.has_unfinished_requests() {
            continue;
        }
        match engine.step() {
            Ok(outputs) => {
                for out in outputs {
                    let id = out.request_id.clone();
                    let finished = out.finished;
                    let delivered = senders.get(&id).is_some_and(|tx| tx.send(Ok(out)).is_ok());
                    if finished {
                        if senders.remove(&id).is_some() {
                            shared.live_requests.fetch_sub(1, Ordering::SeqCst);
                        }
                    } else if !delivered {
                        // The receiver is gone: the client disconnected.
                        finish_abort(&id, &mut engine, &mut senders, shared);
                    }
                }
            }
            Err(e) => {
                // A failed step fails every request in flight, loudly, and the
                // engine carries on with new ones.
                tracing::error!(error = %e, "engine step failed; aborting all requests in flight");
                let ids: Vec<String> = senders.keys().cloned().collect();
                for id in ids {
                    engine.abort_request(&id);
                    if let Some(tx) = senders.remove(&id) {
                        let _ = tx.send(Err(StreamError(format!("engine error: {e}"))));
                        shared.live_requests.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
        }
    }
    // Anything still queued when the loop ends is told so.
    while let Ok(cmd) = commands.try_recv() {
        if let Command::Add { outputs, .. } = cmd {
            let _ = outputs.send(Err(StreamError("the server is shutting down".into())));
            shared.live_requests.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn handle_command<B: Backend>(
    cmd: Command,
    engine: &mut LlmEngine<B>,
    senders: &mut Senders,
    deadline: &mut Option<Instant>,
    shared: &Shared,
) {
    match cmd {
        Command::Add { mut request, arrived, outputs } => {
            let id = request.request_id.clone();
            match engine.add_request_at(&mut request, arrived) {
                Ok(()) => {
                    senders.insert(id, outputs);
                }
                Err(e) => {
                    let _ = outputs.send(Err(StreamError(e.to_string())));
                    shared.live_requests.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        Command::Abort(id) => finish_abort(&id, engine, senders, shared),
        Command::Shutdown { grace } => {
            let d = Instant::now() + grace;
            *deadline = Some(deadline.map_or(d, |old| old.min(d)));
        }
    }
}

fn finish_abort<B: Backend>(id: &str, engine: &mut LlmEngine<B>, senders: &mut Senders, shared: &Shared) {
    let last = engine.abort_request(id);
    if let Some(tx) = senders.remove(id) {
        if let Some(out) = last {
            let _ = tx.send(Ok(out));
        }
        shared.live_requests.fetch_sub(1, Ordering::SeqCst);
    }
}
