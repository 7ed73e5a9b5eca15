//! The connection layer under the router: an accept loop on hyper's HTTP/1
//! server with the limits `axum::serve` lacks.
//!
//! - A connection cap ([`ConnectionLimits::max_connections`]). At the cap a
//!   new connection displaces the connection idle longest (one with no
//!   request in progress: still sending its headers, or kept alive between
//!   requests), so half-sent requests cannot lock health checks out. When
//!   every connection has a request in progress, the newcomer gets a 503
//!   (`too_many_connections`, `Retry-After: 1`) and is closed.
//! - Timeouts: headers must arrive within the header-read timeout (hyper's
//!   own, counted from when the connection starts waiting for a request); a
//!   connection with no request in progress that receives nothing for the
//!   keep-alive timeout is closed; a request body must arrive within the body
//!   timeout once its headers did (408).
//! - Errors raised before routing carry OpenAI's JSON error body: a URL or
//!   headers over this layer's limits (414, 431), and hyper's own automatic
//!   responses (400 for a malformed request, 414, 431 past hyper's buffer) on
//!   a connection's first request, rewritten on their way out. On a later
//!   request of a kept-alive connection hyper's response keeps its empty
//!   body: the bytes hyper writes then may start with the previous
//!   response's tail, so its error head cannot be recognised safely.
//! - Shutdown: [`serve_until`] accepts until told to stop, then closes idle
//!   connections and gives busy ones a margin to finish.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::error::ApiError;
use crate::routes::GuardedBody;

/// Connection cap and timeouts (`pagoda serve` flags of the same names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most open client connections (`--max-connections`).
    pub max_connections: usize,
    /// Time to receive a request's headers (`--header-read-timeout-secs`).
    pub header_read_timeout: Duration,
    /// Time an idle connection stays open (`--timeout-keep-alive`).
    pub keep_alive_timeout: Duration,
    /// Time to receive a request's body once its headers arrived (`--request-body-timeout-secs`).
    pub request_body_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 2048,
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            request_body_timeout: Duration::from_secs(60),
        }
    }
}

/// Longest request target (path and query) served; longer gets 414.
pub const MAX_URI_BYTES: usize = 16 << 10;
/// Most header bytes (names and values) served; more gets 431.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// File descriptors kept for everything but client connections (model
/// files, the listener, logs), when the cap is fitted to the open-file limit.
const RESERVED_FDS: u64 = 128;
/// Most connections closed gently at once (after a refusal or a rewritten
/// error); beyond it they are just dropped.
const MAX_LINGERING: usize = 256;
/// How long a connection closed on an error may still send (its bytes are
/// discarded): closing with unread bytes would reset the connection, and
/// the client could lose the error response.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_MAX_BYTES: usize = 1 << 20;
/// Pause after a failed accept that is not about the one connection (such
/// as running out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections on `listener` and serves `app` on each until
/// `stop_accepting` resolves; then closes the listener, closes idle
/// connections, lets busy ones finish their responses for up to
/// `drain_margin`, and drops what is left.
pub async fn serve_until(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    stop_accepting: impl Future<Output = ()>,
    drain_margin: Duration,
) {
    let limits = limits.within_fd_limit();
    let registry = Arc::new(Registry::new(limits.max_connections));
    let (closing_tx, closing) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(stop_accepting);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop_accepting => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Token streams are many small writes: don't hold them back (uvicorn does the same).
                    let _ = stream.set_nodelay(true);
                    match registry.admit() {
                        Admission::Open(conn) => {
                            let task = serve_connection(
                                stream,
                                conn,
                                registry.clone(),
                                app.clone(),
                                limits,
                                closing.clone(),
                            );
                            tasks.spawn(task);
                        }
                        Admission::Full => refuse(stream, &registry),
                    }
                }
                Err(e) if is_per_connection_error(&e) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let all_closed = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(drain_margin, all_closed).await.is_err() {
        tracing::warn!(open = tasks.len(), "connections still open after shutdown; closing them");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Errors of `accept` that concern one connection only (the client gave up
/// before we took it): not worth a pause or a warning.
fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

impl ConnectionLimits {
    /// These limits with the cap lowered, with a warning, to what the
    /// process's open-file limit allows (after raising the soft limit toward
    /// the hard one, as servers commonly do).
    fn within_fd_limit(mut self) -> Self {
        let wanted = u64::try_from(self.max_connections).unwrap_or(u64::MAX).saturating_add(RESERVED_FDS);
        if let Some(allowed) = raise_open_file_limit(wanted) {
            let cap = usize::try_from(allowed.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(usize::MAX);
            if cap < self.max_connections {
                tracing::warn!(
                    requested = self.max_connections,
                    cap,
                    open_file_limit = allowed,
                    "--max-connections lowered to fit the open-file limit (raise it with `ulimit -n`)"
                );
                self.max_connections = cap;
            }
        }
        self
    }
}

/// Raises the soft open-file limit toward `wanted` (at most the hard limit);
/// returns the soft limit in force, or `None` where it cannot be read.
#[cfg(unix)]
fn raise_open_file_limit(wanted: u64) -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < wanted && limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: wanted.min(limit.rlim_max), rlim_max: limit.rlim_max };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    // rlim_t is u64 on Linux and macOS.
    Some(limit.rlim_cur)
}

#[cfg(not(unix))]
fn raise_open_file_limit(_wanted: u64) -> Option<u64> {
    None
}

/// The open connections, for the cap and for choosing whom to displace.
struct Registry {
    epoch: Instant,
    max_connections: usize,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    /// Permits for connections being closed gently (bounded: each holds a socket).
    lingering: Arc<Semaphore>,
}

enum Admission {
    Open(Arc<ConnState>),
    /// At the cap with every connection busy.
    Full,
}

impl Registry {
    fn new(max_connections: usize) -> Self {
        Self {
            epoch: Instant::now(),
            max_connections: max_connections.max(1),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
        }
    }

    /// Registers a new connection; at the cap, first evicts the connection
    /// idle longest, or refuses when none is idle.
    fn admit(&self) -> Admission {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= self.max_connections {
            let victim = open
                .values()
                .filter(|c| c.in_progress() == 0)
                .min_by_key(|c| c.idle_since.load(Ordering::SeqCst))
                .map(|c| c.id);
            match victim.and_then(|id| open.remove(&id)) {
                Some(victim) => victim.evicted.notify_one(),
                None => return Admission::Full,
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnState::new(id, self.epoch));
        open.insert(id, conn.clone());
        Admission::Open(conn)
    }

    /// Forgets a closed connection (a no-op for an evicted one).
    fn release(&self, id: u64) {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
    }

    fn open_count(&self) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn linger_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.lingering.clone().try_acquire_owned().ok()
    }
}

/// What the connection's task, its I/O and its requests share.
struct ConnState {
    id: u64,
    epoch: Instant,
    /// Requests whose response is not done yet.
    in_progress: AtomicUsize,
    /// Request heads received so far.
    requests_seen: AtomicU64,
    /// When (ms since `epoch`) the connection last became idle: accepted,
    /// or its last response done. The cap displaces the smallest first.
    idle_since: AtomicU64,
    /// When (ms since `epoch`) a byte was last received or sent.
    last_activity: AtomicU64,
    /// Set by the registry when the connection is displaced.
    evicted: Notify,
}

impl ConnState {
    fn new(id: u64, epoch: Instant) -> Self {
        let now = epoch.elapsed().as_millis() as u64;
        Self {
            id,
            epoch,
            in_progress: AtomicUsize::new(0),
            requests_seen: AtomicU64::new(0),
            idle_since: AtomicU64::new(now),
            last_activity: AtomicU64::new(now),
            evicted: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_activity.store(self.now_ms(), Ordering::Relaxed);
    }

    fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::SeqCst)
    }

    /// When the keep-alive timeout would close the connection if nothing
    /// happens meanwhile (a busy connection is looked at again a timeout later).
    fn idle_deadline(&self, keep_alive: Duration) -> tokio::time::Instant {
        let from = if self.in_progress() == 0 {
            self.epoch + Duration::from_millis(self.last_activity.load(Ordering::Relaxed))
        } else {
            Instant::now()
        };
        tokio::time::Instant::from_std(from + keep_alive)
    }

    fn idle_for(&self) -> Duration {
        if self.in_progress() > 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(self.now_ms().saturating_sub(self.last_activity.load(Ordering::Relaxed)))
    }
}

/// Serves one connection until it closes, idles out, is displaced, or the
/// server stops.
async fn serve_connection(
    stream: TcpStream,
    conn: Arc<ConnState>,
    registry: Arc<Registry>,
    app: Router,
    limits: ConnectionLimits,
    mut closing: watch::Receiver<bool>,
) {
    let io = TokioIo::new(ConnIo::new(stream, conn.clone(), registry.clone()));
    let service = ConnService { app, conn: conn.clone(), body_timeout: limits.request_body_timeout };
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut shutting_down = false;
    loop {
        let idle_deadline = conn.idle_deadline(limits.keep_alive_timeout);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = conn.evicted.notified() => {
                if conn.in_progress() == 0 {
                    tracing::debug!("closing an idle connection to admit a new one");
                    break;
                }
                // A request arrived just as it was chosen: finish it, then close.
                connection.as_mut().graceful_shutdown();
            }
            _ = closing.changed(), if !shutting_down => {
                shutting_down = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(idle_deadline) => {
                if conn.idle_for() >= limits.keep_alive_timeout {
                    tracing::debug!("closing a connection idle for the keep-alive timeout");
                    break;
                }
            }
        }
    }
    registry.release(conn.id);
}

/// Answers a connection over the cap with a 503 and closes it.
fn refuse(stream: TcpStream, registry: &Registry) {
    tracing::warn!(
        max_connections = registry.max_connections,
        "connection refused: every connection is busy"
    );
    let Some(permit) = registry.linger_permit() else {
        return; // Dropped: closed at once.
    };
    let error = ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "The server has {} connections open, all busy (--max-connections); retry later.",
            registry.open_count()
        ),
        kind: "server_error",
        param: None,
        code: Some("too_many_connections"),
    };
    let response = raw_error_response(&error, "retry-after: 1\r\n");
    tokio::spawn(async move {
        close_gently(stream, response).await;
        drop(permit);
    });
}

/// Writes `response`, ends our side, and reads (discarding) what the
/// client still sends, for a bounded time, before closing.
async fn close_gently(mut stream: TcpStream, response: Vec<u8>) {
    let _ = tokio::time::timeout(LINGER, async {
        if stream.write_all(&response).await.is_err() {
            return;
        }
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut discarded = 0;
        while discarded < LINGER_MAX_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    })
    .await;
}

/// A whole HTTP/1.1 response carrying `error`'s JSON body, closing the connection.
fn raw_error_response(error: &ApiError, extra_headers: &str) -> Vec<u8> {
    let body = error.to_json();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra_headers}\r\n{body}",
        error.status.as_u16(),
        error.status.canonical_reason().unwrap_or(""),
        body.len(),
    )
    .into_bytes()
}

/// The error for a request hyper refused before routing, by the status hyper chose.
fn pre_routing_error(status: StatusCode) -> ApiError {
    let (message, code) = match status {
        StatusCode::BAD_REQUEST => (
            "Malformed HTTP request: the request line or a header cannot be parsed.".to_string(),
            "malformed_request",
        ),
        StatusCode::URI_TOO_LONG => {
            (format!("The URL is too long (at most {MAX_URI_BYTES} bytes)."), "uri_too_long")
        }
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            format!("The request headers are too large (at most {MAX_HEADER_BYTES} bytes and 100 headers)."),
            "headers_too_large",
        ),
        other => (format!("The HTTP request was refused: {other}."), "bad_http_request"),
    };
    ApiError { status, message, kind: "invalid_request_error", param: None, code: Some(code) }
}

/// The status of the response hyper starts writing in `bytes`, when it is
/// one of its automatic client errors ("HTTP/1.1 431 ...").
fn automatic_error_status(bytes: &[u8]) -> Option<StatusCode> {
    if bytes.len() < 12 || !bytes.starts_with(b"HTTP/1.") || bytes[8] != b' ' {
        return None;
    }
    let code = std::str::from_utf8(&bytes[9..12]).ok()?.parse::<u16>().ok()?;
    StatusCode::from_u16(code).ok().filter(StatusCode::is_client_error)
}

/// The connection's socket as hyper sees it: records activity for the
/// keep-alive timeout, and replaces hyper's bare error response on the
/// connection's first request with one carrying a JSON body.
struct ConnIo {
    /// `None` only once handed to a lingering close in `drop`.
    stream: Option<TcpStream>,
    conn: Arc<ConnState>,
    registry: Arc<Registry>,
    /// Our response replacing hyper's, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl ConnIo {
    fn new(stream: TcpStream, conn: Arc<ConnState>, registry: Arc<Registry>) -> Self {
        Self { stream: Some(stream), conn, registry, replacement: None }
    }

    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.stream.as_mut().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// Writes what is left of the replacement response.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((bytes, written)) = self.replacement.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let Some(stream) = self.stream.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        while *written < bytes.len() {
            let n = ready!(Pin::new(&mut *stream).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(this.stream()?).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.conn.touch();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Before any request head has reached the service, whatever hyper
        // writes is its own response to a request it could not parse.
        if this.replacement.is_none() && this.conn.requests_seen.load(Ordering::SeqCst) == 0 {
            if let Some(status) = automatic_error_status(buf) {
                let error = pre_routing_error(status);
                tracing::info!(status = status.as_u16(), error = %error.message, "request rejected before routing");
                this.replacement = Some((raw_error_response(&error, ""), 0));
            }
        }
        if this.replacement.is_some() {
            ready!(this.poll_replacement(cx))?;
            // hyper's own bytes are dropped.
            return Poll::Ready(Ok(buf.len()));
        }
        let n = ready!(Pin::new(this.stream()?).poll_write(cx, buf))?;
        this.conn.touch();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(this.stream()?).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(this.stream()?).poll_shutdown(cx)
    }
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        // After an error response the client may still be sending the
        // request hyper refused: close gently so it gets to read our answer.
        let Some((bytes, written)) = self.replacement.take() else {
            return;
        };
        let (Some(stream), Ok(runtime)) = (self.stream.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        if let Some(permit) = self.registry.linger_permit() {
            let rest = bytes[written.min(bytes.len())..].to_vec();
            runtime.spawn(async move {
                close_gently(stream, rest).await;
                drop(permit);
            });
        }
    }
}

/// The per-connection service hyper calls with each request head: enforces
/// the URL and header limits and the body timeout, counts the request as in
/// progress until its response body is done, and runs the router.
#[derive(Clone)]
struct ConnService {
    app: Router,
    conn: Arc<ConnState>,
    body_timeout: Duration,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.conn.requests_seen.fetch_add(1, Ordering::SeqCst);
        let busy = Busy::new(self.conn.clone());
        if let Some(error) = head_limit_error(&request) {
            tracing::info!(status = error.status.as_u16(), error = %error.message, "request rejected before routing");
            let response = closing_connection(error.into_response());
            return Box::pin(std::future::ready(Ok(with_busy(response, busy))));
        }
        let expired = Arc::new(AtomicBool::new(false));
        let deadline = tokio::time::Instant::now() + self.body_timeout;
        let request = request.map(|inner| {
            Body::new(TimedBody { inner, deadline, sleep: None, expired: expired.clone(), done: false })
        });
        let app = self.app.clone();
        let body_timeout = self.body_timeout;
        Box::pin(async move {
            let response = match app.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let response = if expired.load(Ordering::SeqCst) {
                // The handler saw a failed body read; the client should see why.
                let error = ApiError {
                    status: StatusCode::REQUEST_TIMEOUT,
                    message: format!(
                        "The request body did not arrive within {} s (--request-body-timeout-secs).",
                        body_timeout.as_secs()
                    ),
                    kind: "invalid_request_error",
                    param: None,
                    code: Some("request_timeout"),
                };
                tracing::info!(status = 408, "request body timed out");
                closing_connection(error.into_response())
            } else {
                response
            };
            Ok(with_busy(response, busy))
        })
    }
}

/// A 414 or 431 for a request target or headers over this layer's limits.
fn head_limit_error<B>(request: &Request<B>) -> Option<ApiError> {
    let uri = request.uri();
    let uri_bytes = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, str::len);
    if uri_bytes > MAX_URI_BYTES {
        return Some(pre_routing_error(StatusCode::URI_TOO_LONG));
    }
    let header_bytes: usize =
        request.headers().iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Some(pre_routing_error(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
    }
    None
}

/// Asks hyper to close the connection after this response (the rest of the
/// request may never have been read).
fn closing_connection(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn with_busy(response: Response<Body>, busy: Busy) -> Response<Body> {
    response.map(|inner| GuardedBody::wrap(inner, busy))
}

/// Counts a request as in progress on its connection while alive.
struct Busy(Arc<ConnState>);

impl Busy {
    fn new(conn: Arc<ConnState>) -> Self {
        conn.in_progress.fetch_add(1, Ordering::SeqCst);
        Self(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.in_progress.fetch_sub(1, Ordering::SeqCst) == 1 {
            let now = self.0.now_ms();
            self.0.idle_since.store(now, Ordering::SeqCst);
            self.0.last_activity.store(now, Ordering::Relaxed);
        }
    }
}

/// A request body that fails once its deadline passes before it is whole.
struct TimedBody {
    inner: Incoming,
    deadline: tokio::time::Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set when the deadline cut the body, for the service to answer 408.
    expired: Arc<AtomicBool>,
    done: bool,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(frame)) => return Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => {}
        }
        let deadline = this.deadline;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            this.done = true;
            this.expired.store(true, Ordering::SeqCst);
            let e = io::Error::new(io::ErrorKind::TimedOut, "the request body did not arrive in time");
            return Poll::Ready(Some(Err(e.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(registry: &Registry) -> Arc<ConnState> {
        match registry.admit() {
            Admission::Open(conn) => {
                conn.in_progress.fetch_add(1, Ordering::SeqCst);
                conn
            }
            Admission::Full => panic!("refused below the cap"),
        }
    }

    fn idle(registry: &Registry) -> Arc<ConnState> {
        match registry.admit() {
            Admission::Open(conn) => conn,
            Admission::Full => panic!("refused"),
        }
    }

    #[test]
    fn at_the_cap_the_longest_idle_connection_makes_room() {
        let registry = Registry::new(3);
        let oldest_idle = idle(&registry);
        let _busy = busy(&registry);
        let newer_idle = idle(&registry);
        newer_idle.idle_since.store(oldest_idle.idle_since.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
        let _newcomer = idle(&registry);
        assert_eq!(registry.open_count(), 3);
        let open = registry.open.lock().unwrap();
        assert!(!open.contains_key(&oldest_idle.id), "the longest idle was displaced");
        assert!(open.contains_key(&newer_idle.id));
    }

    #[test]
    fn at_the_cap_with_every_connection_busy_newcomers_are_refused() {
        let registry = Registry::new(2);
        let first = busy(&registry);
        let _second = busy(&registry);
        assert!(matches!(registry.admit(), Admission::Full));
        registry.release(first.id);
        assert!(matches!(registry.admit(), Admission::Open(_)));
    }

    #[test]
    fn recognises_hypers_automatic_errors() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(automatic_error_status(head), Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        assert_eq!(automatic_error_status(b"HTTP/1.0 400 Bad Request\r\n"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(automatic_error_status(b"HTTP/1.1 200 OK\r\n\r\n"), None);
        assert_eq!(automatic_error_status(b"data: x"), None);
        assert_eq!(automatic_error_status(b"HTTP/1.1 4"), None);
    }

    #[test]
    fn raw_error_responses_carry_the_json_body() {
        let response = raw_error_response(&pre_routing_error(StatusCode::URI_TOO_LONG), "");
        let text = String::from_utf8(response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "uri_too_long");
        assert_eq!(json["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn head_limits() {
        let ok = Request::builder().uri("/v1/models").body(()).unwrap();
        assert!(head_limit_error(&ok).is_none());
        let long =
            Request::builder().uri(format!("/v1/models?q={}", "a".repeat(MAX_URI_BYTES))).body(()).unwrap();
        assert_eq!(head_limit_error(&long).unwrap().status, StatusCode::URI_TOO_LONG);
        let big = Request::builder().uri("/").header("x-big", "b".repeat(MAX_HEADER_BYTES)).body(()).unwrap();
        assert_eq!(head_limit_error(&big).unwrap().status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
}
