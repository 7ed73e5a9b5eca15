//! The engine on its own thread, driven through channels: the HTTP side
//! submits requests and receives their outputs as a stream, while the engine
//! loop keeps stepping as long as any request is live (continuous batching
//! across clients). Dropping a stream before it finishes aborts its request,
//! which frees its KV blocks at the next loop turn.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagoda_backend::Backend;
use pagoda_models::{ChatTemplate, Tokenizer};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::engine::LlmEngine;
use crate::error::EngineError;
use crate::input::{EngineCoreRequest, InputProcessor, ModelInfo};
use crate::kv_view::{KvView, KvViewSource};
use crate::metrics::EngineMetrics;
use crate::request::{GenerationRequest, RequestOutput};

/// Why a request was not accepted.
#[derive(Debug, Error)]
pub enum SubmitError {
    /// The pending work is at a limit: try again later (HTTP 429). A request
    /// over a limit on its own is [`SubmitError::Invalid`] instead: it could
    /// never be admitted.
    #[error(
        "the server is busy: {in_use} of {limit} pending {what} are taken and this request needs \
         {needed} ({flag}); retry later"
    )]
    Overloaded { what: &'static str, flag: &'static str, in_use: usize, needed: usize, limit: usize },
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

type OutputSender = mpsc::UnboundedSender<Result<RequestOutput, StreamError>>;

/// A request on its way to the engine thread (processed: the engine thread
/// checks nothing again).
struct Admitted {
    request: EngineCoreRequest,
    outputs: OutputSender,
    /// What it counts against the pending limits until it ends.
    work: PendingWork,
}

enum Command {
    /// The requests of one API call: added in one loop turn, all or none.
    Add {
        batch: Vec<Admitted>,
        arrived: Instant,
    },
    Abort(String),
    /// A view of the KV cache and the queues for the dashboard, answered at
    /// the next step boundary.
    KvView(oneshot::Sender<Arc<KvView>>),
    Shutdown {
        grace: Duration,
    },
}

/// Options of the async engine: bounds on the work live at once (queued or
/// running). A submission over a bound gets [`SubmitError::Overloaded`]
/// while other work is live, and [`SubmitError::Invalid`] if it is over the
/// bound on its own.
#[derive(Clone, Debug)]
pub struct AsyncEngineOptions {
    /// Most live engine requests (one per prompt).
    pub max_pending_requests: usize,
    /// Most live sequences: each request counts its `n`.
    pub max_pending_seqs: usize,
    /// Most live tokens: each request counts its prompt plus `n` times its
    /// `max_tokens` (up to the context length when unset). `None`:
    /// `max_pending_requests` times the context length, so that only
    /// `n > 1` requests can reach it before the request bound.
    pub max_pending_tokens: Option<usize>,
}

impl Default for AsyncEngineOptions {
    fn default() -> Self {
        Self {
            max_pending_requests: 1024,
            max_pending_seqs: DEFAULT_MAX_PENDING_SEQS,
            max_pending_tokens: None,
        }
    }
}

/// Default of [`AsyncEngineOptions::max_pending_seqs`]: four times the
/// default request bound, room for `n > 1` without letting one request's
/// fan-out (prompts x n) queue tens of thousands of sequences.
pub const DEFAULT_MAX_PENDING_SEQS: usize = 4096;

/// The work of live requests, as the pending limits count it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PendingWork {
    requests: usize,
    seqs: usize,
    tokens: usize,
}

impl PendingWork {
    /// A processed request's work. Saturating: the sums only meet limits.
    fn of(request: &EngineCoreRequest) -> Self {
        let prompt = request.prompt_token_ids().len();
        Self {
            requests: 1,
            seqs: request.n(),
            tokens: prompt.saturating_add(request.n().saturating_mul(request.max_tokens())),
        }
    }

    fn plus(self, other: Self) -> Self {
        Self {
            requests: self.requests.saturating_add(other.requests),
            seqs: self.seqs.saturating_add(other.seqs),
            tokens: self.tokens.saturating_add(other.tokens),
        }
    }

    fn minus(self, other: Self) -> Self {
        Self {
            requests: self.requests.saturating_sub(other.requests),
            seqs: self.seqs.saturating_sub(other.seqs),
            tokens: self.tokens.saturating_sub(other.tokens),
        }
    }
}

struct Shared {
    /// The work of every request submitted and not yet ended.
    pending: Mutex<PendingWork>,
    shutting_down: AtomicBool,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, PendingWork> {
        // The counters stay consistent even if a holder panicked.
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn release(&self, work: PendingWork) {
        let mut pending = self.pending();
        *pending = pending.minus(work);
    }
}

/// A handle on the engine thread. Cheap to share behind an `Arc`.
pub struct AsyncEngine {
    commands: std_mpsc::Sender<Command>,
    /// The engine's own: requests are checked on the caller's thread.
    input: Arc<InputProcessor>,
    tokenizer: Tokenizer,
    chat_template: Option<Arc<ChatTemplate>>,
    metrics: Arc<EngineMetrics>,
    shared: Arc<Shared>,
    limits: PendingWork,
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

/// One pending limit, for messages.
struct Limit {
    what: &'static str,
    flag: &'static str,
    /// The request parameter that makes a request big in this measure.
    param: &'static str,
    in_use: usize,
    needed: usize,
    limit: usize,
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
        let shared = Arc::new(Shared {
            pending: Mutex::new(PendingWork::default()),
            shutting_down: AtomicBool::new(false),
        });
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
                    engine.input_processor().clone(),
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
        let (input, tokenizer, chat_template, metrics) = ready_rx
            .recv()
            .map_err(|_| EngineError::Internal("the engine thread died while starting".into()))??;
        let limits = PendingWork {
            requests: options.max_pending_requests,
            seqs: options.max_pending_seqs,
            tokens: options
                .max_pending_tokens
                .unwrap_or(options.max_pending_requests.saturating_mul(input.info().max_model_len)),
        };
        Ok(Self {
            commands,
            input,
            tokenizer,
            chat_template,
            metrics,
            shared,
            limits,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        self.input.info()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The host cache of LoRA adapters, when the engine serves them
    /// ([`crate::EngineConfig::lora`]): loading an adapter into it checks it
    /// against the model.
    pub fn lora_cache(&self) -> Option<&Arc<crate::LoraCache>> {
        self.input.lora_cache()
    }

    pub fn chat_template(&self) -> Option<&Arc<ChatTemplate>> {
        self.chat_template.as_ref()
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    /// Live requests (queued or running).
    pub fn num_live_requests(&self) -> usize {
        self.shared.pending().requests
    }

    /// Live sequences (each live request's `n`).
    pub fn num_live_seqs(&self) -> usize {
        self.shared.pending().seqs
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::SeqCst)
    }

    /// Checks and queues a request; its outputs arrive on the stream.
    pub fn submit(&self, request: GenerationRequest) -> Result<RequestStream, SubmitError> {
        let mut streams = self.submit_all(vec![request])?;
        streams.pop().ok_or_else(|| SubmitError::Invalid(EngineError::Internal("no stream".into())))
    }

    /// Checks (on this thread: errors are early 400s) and queues the
    /// requests of one API call (e.g. a completion with several prompts)
    /// together: all are admitted, in one engine loop turn, or none. Their
    /// work is counted against the pending limits as one; with several
    /// requests, errors name the failing one as `prompt {i}`.
    pub fn submit_all(&self, requests: Vec<GenerationRequest>) -> Result<Vec<RequestStream>, SubmitError> {
        if self.is_shutting_down() {
            return Err(SubmitError::ShuttingDown);
        }
        let several = requests.len() > 1;
        let mut needed = PendingWork::default();
        let mut processed = Vec::with_capacity(requests.len());
        for (i, request) in requests.into_iter().enumerate() {
            let request = self
                .input
                .process(request)
                .map_err(|e| SubmitError::Invalid(if several { for_prompt(e, i) } else { e }))?;
            needed = needed.plus(PendingWork::of(&request));
            processed.push(request);
        }
        if processed.is_empty() {
            return Ok(Vec::new());
        }
        self.reserve(needed)?;
        let mut streams = Vec::with_capacity(processed.len());
        let mut batch = Vec::with_capacity(processed.len());
        for request in processed {
            let (tx, rx) = mpsc::unbounded_channel();
            let work = PendingWork::of(&request);
            streams.push(RequestStream {
                request_id: request.request_id().to_string(),
                outputs: rx,
                commands: self.commands.clone(),
                finished: false,
            });
            batch.push(Admitted { request, outputs: tx, work });
        }
        if self.commands.send(Command::Add { batch, arrived: Instant::now() }).is_err() {
            self.shared.release(needed);
            // The engine is gone: nothing to abort.
            for stream in &mut streams {
                stream.finished = true;
            }
            return Err(SubmitError::ShuttingDown);
        }
        Ok(streams)
    }

    /// Counts `needed` as pending if every limit allows it. Refuses as
    /// invalid what no limit could ever allow, and as overloaded what only
    /// the work already live keeps out.
    fn reserve(&self, needed: PendingWork) -> Result<(), SubmitError> {
        let mut pending = self.shared.pending();
        let limits = [
            Limit {
                what: "requests",
                flag: "--max-pending-requests",
                param: "prompt",
                in_use: pending.requests,
                needed: needed.requests,
                limit: self.limits.requests,
            },
            Limit {
                what: "sequences",
                flag: "--max-pending-seqs",
                param: "n",
                in_use: pending.seqs,
                needed: needed.seqs,
                limit: self.limits.seqs,
            },
            Limit {
                what: "tokens",
                flag: "--max-pending-tokens",
                param: "max_tokens",
                in_use: pending.tokens,
                needed: needed.tokens,
                limit: self.limits.tokens,
            },
        ];
        if let Some(l) = limits.iter().find(|l| l.needed > l.limit) {
            let hint = match l.what {
                "requests" => "send fewer prompts per request",
                "sequences" => "lower n, or send fewer prompts per request",
                _ => "lower max_tokens or n, or send fewer or shorter prompts",
            };
            return Err(SubmitError::Invalid(EngineError::invalid(
                Some(l.param),
                format!(
                    "this request needs {} pending {}, more than the server ever admits at once ({} {}): {hint}",
                    l.needed, l.what, l.flag, l.limit
                ),
            )));
        }
        if let Some(l) = limits.iter().find(|l| l.in_use.saturating_add(l.needed) > l.limit) {
            return Err(SubmitError::Overloaded {
                what: l.what,
                flag: l.flag,
                in_use: l.in_use,
                needed: l.needed,
                limit: l.limit,
            });
        }
        *pending = pending.plus(needed);
        Ok(())
    }

    /// A view of the KV cache and the queues, built by the engine thread at
    /// its next step boundary (or its last one, when younger than
    /// [`KvViewSource::MIN_INTERVAL`]); `None` once the engine has stopped.
    pub async fn kv_view(&self) -> Option<Arc<KvView>> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::KvView(tx)).ok()?;
        rx.await.ok()
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

/// Where each live request's outputs go, and the work it counts.
type Senders = HashMap<String, (OutputSender, PendingWork)>;

fn engine_loop<B: Backend>(mut engine: LlmEngine<B>, commands: std_mpsc::Receiver<Command>, shared: &Shared) {
    let mut senders: Senders = Senders::new();
    let mut deadline: Option<Instant> = None;
    let mut views = KvViewSource::default();
    loop {
        // Idle: sleep until a command arrives. Busy: take what is there.
        if !engine.has_unfinished_requests() {
            if deadline.is_some() {
                break;
            }
            match commands.recv() {
                Ok(cmd) => handle_command(cmd, &mut engine, &mut senders, &mut deadline, &mut views, shared),
                Err(_) => break,
            }
        }
        while let Ok(cmd) = commands.try_recv() {
            handle_command(cmd, &mut engine, &mut senders, &mut deadline, &mut views, shared);
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
                    let delivered = senders.get(&id).is_some_and(|(tx, _)| tx.send(Ok(out)).is_ok());
                    if finished {
                        if let Some((_, work)) = senders.remove(&id) {
                            shared.release(work);
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
                    if let Some((tx, work)) = senders.remove(&id) {
                        let _ = tx.send(Err(StreamError(format!("engine error: {e}"))));
                        shared.release(work);
                    }
                }
            }
        }
    }
    // Anything still queued when the loop ends is told so.
    while let Ok(cmd) = commands.try_recv() {
        if let Command::Add { batch, .. } = cmd {
            for admitted in batch {
                let _ = admitted.outputs.send(Err(StreamError("the server is shutting down".into())));
                shared.release(admitted.work);
            }
        }
    }
}

fn handle_command<B: Backend>(
    cmd: Command,
    engine: &mut LlmEngine<B>,
    senders: &mut Senders,
    deadline: &mut Option<Instant>,
    views: &mut KvViewSource,
    shared: &Shared,
) {
    match cmd {
        Command::Add { batch, arrived } => {
            // All or none: a refusal (a request id already live, say)
            // takes back the requests of the batch added before it.
            let mut added = Vec::with_capacity(batch.len());
            let mut refused = None;
            let mut batch = batch.into_iter();
            for Admitted { request, outputs, work } in batch.by_ref() {
                let id = request.request_id().to_string();
                match engine.add_processed(request, arrived) {
                    Ok(()) => added.push((id, outputs, work)),
                    Err(e) => {
                        let _ = outputs.send(Err(StreamError(e.to_string())));
                        shared.release(work);
                        refused = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = refused {
                for (id, outputs, work) in added {
                    engine.abort_request(&id);
                    let _ = outputs.send(Err(StreamError(e.to_string())));
                    shared.release(work);
                }
                for admitted in batch {
                    let _ = admitted.outputs.send(Err(StreamError(e.to_string())));
                    shared.release(admitted.work);
                }
                return;
            }
            for (id, outputs, work) in added {
                senders.insert(id, (outputs, work));
            }
        }
        Command::Abort(id) => finish_abort(&id, engine, senders, shared),
        Command::KvView(reply) => {
            let _ = reply.send(views.view(engine));
        }
        Command::Shutdown { grace } => {
            let d = Instant::now() + grace;
            *deadline = Some(deadline.map_or(d, |old| old.min(d)));
        }
    }
}

/// Names the failing request of a batch in a client error.
fn for_prompt(e: EngineError, index: usize) -> EngineError {
    match e {
        EngineError::InvalidRequest { param, message } => {
            EngineError::InvalidRequest { param, message: format!("prompt {index}: {message}") }
        }
        other => other,
    }
}

fn finish_abort<B: Backend>(id: &str, engine: &mut LlmEngine<B>, senders: &mut Senders, shared: &Shared) {
    let last = engine.abort_request(id);
    if let Some((tx, work)) = senders.remove(id) {
        if let Some(out) = last {
            let _ = tx.send(Ok(out));
        }
        shared.release(work);
    }
}
