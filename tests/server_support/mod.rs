//! Shared by the server integration tests (tests/server_*.rs): the real
//! server on a loopback port 0, serving the real default model on the CPU
//! backend, and a small HTTP/SSE client over reqwest.

#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{load_engine, AsyncEngine, EngineConfig};
use pagoda_server::{serve_on, ServeError, ServerArgs};
use serde_json::Value;

pub const MODEL_NAME: &str = "smollm2-test";

/// The model the tests run: $PAGODA_TEST_MODEL, else the default folder.
pub fn model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("PAGODA_TEST_MODEL") {
        return PathBuf::from(path);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m-instruct");
    let has_weights = std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    assert!(
        has_weights,
        "the test model is missing from {}: run scripts/fetch-model.sh (or set PAGODA_TEST_MODEL)",
        dir.display()
    );
    dir
}

/// The test model's configuration (what LoRA adapters are written for).
pub fn model_config() -> pagoda_models::ModelConfig {
    static CONFIG: std::sync::OnceLock<pagoda_models::ModelConfig> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| pagoda_models::ModelFiles::open(model_path()).expect("the test model opens").config)
        .clone()
}

/// Writes a synthetic PEFT adapter for the test model (rank 8, alpha 16,
/// every projection, `B` entries up to 0.05: enough to change greedy output)
/// into a fresh folder of this test binary's scratch space, and returns it.
pub fn write_lora(name: &str, seed: u64) -> PathBuf {
    let dir = scratch_dir(name);
    pagoda_models::SyntheticLora {
        seed,
        rank: 8,
        alpha: 16.0,
        use_rslora: false,
        modules: pagoda_models::LoraModule::ALL.to_vec(),
        b_amp: 0.05,
    }
    .write(&dir, &model_config(), &model_path().display().to_string())
    .expect("the adapter is written");
    dir
}

/// An empty folder `name` in this test binary's scratch space (under Cargo's
/// temporary directory for tests), emptied first if it exists: each run
/// reuses the last one's folders rather than piling up adapters.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(env!("CARGO_CRATE_NAME")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

/// A small engine: 128 MiB of KV cache (~180 blocks of 16 tokens) and a
/// 512-token context, so "prompt too long" is cheap to provoke.
pub fn engine_config() -> EngineConfig {
    EngineConfig {
        kv_cache_memory_bytes: Some(128 << 20),
        max_model_len: Some(512),
        ..EngineConfig::default()
    }
}

/// A server running on its own thread and runtime (so it outlives each
/// test's runtime and can be shared by the tests of a file).
pub struct TestServer {
    pub base_url: String,
    pub api_key: Option<String>,
    pub engine: Arc<AsyncEngine>,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    finished: Mutex<Option<std::sync::mpsc::Receiver<Result<(), ServeError>>>>,
}

impl TestServer {
    pub fn start(args: ServerArgs) -> Self {
        Self::start_with(args, engine_config())
    }

    /// A server over an engine of the given configuration.
    pub fn start_with(mut args: ServerArgs, engine_config: EngineConfig) -> Self {
        let model = model_path();
        if args.served_model_name.is_empty() {
            args.served_model_name = vec![MODEL_NAME.to_string()];
        }
        let engine = AsyncEngine::start(
            move || load_engine(CpuBackend::new(), &model, engine_config, |_, _| {}),
            args.engine_options(),
        )
        .expect("the test model loads");
        let engine = Arc::new(engine);
        let config = args.to_config(&model_path().display().to_string(), "0.0.0-test", "test-rev");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("local address");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let serving_engine = engine.clone();
        std::thread::Builder::new()
            .name("test-server".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("server runtime");
                let result = runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    serve_on(listener, config, serving_engine, async move {
                        let _ = stop_rx.await;
                    })
                    .await
                });
                let _ = done_tx.send(result);
            })
            .expect("server thread");
        Self {
            base_url: format!("http://{addr}"),
            api_key: args.api_key.clone(),
            engine,
            stop: Mutex::new(Some(stop_tx)),
            finished: Mutex::new(Some(done_rx)),
        }
    }

    pub fn client(&self) -> Client {
        Client {
            http: reqwest::Client::new(),
            base_url: self.base_url.clone(),
            api_key: self.api_key.clone(),
        }
    }

    /// Sends the shutdown signal (as SIGTERM would).
    pub fn signal_shutdown(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }

    /// Waits (blocking) for `serve_on` to return.
    pub fn wait_stopped(&self, timeout: Duration) -> Result<(), ServeError> {
        let rx = self.finished.lock().unwrap().take().expect("wait_stopped called once");
        rx.recv_timeout(timeout).expect("the server stops in time")
    }
}

/// An HTTP client for one server (sends the API key when it has one).
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub base_url: String,
    pub api_key: Option<String>,
}

/// A finished SSE response: the JSON payloads in order, and whether it
/// ended with `data: [DONE]`.
#[derive(Debug)]
pub struct SseEvents {
    pub events: Vec<Value>,
    pub done: bool,
}

impl Client {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.post(self.url(path));
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.get(self.url(path));
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// POSTs `body`; returns the status and the JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self.post(path).json(body).send().await.expect("request sent");
        let status = response.status().as_u16();
        let text = response.text().await.expect("response body");
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, json)
    }

    /// POSTs raw bytes as JSON.
    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let response = self
            .post(path)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        let text = response.text().await.expect("response body");
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, json)
    }

    /// POSTs a streaming request and reads the whole event stream.
    pub async fn post_stream(&self, path: &str, body: &Value) -> SseEvents {
        let response = self.post(path).json(body).send().await.expect("request sent");
        assert_eq!(response.status().as_u16(), 200, "stream status");
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(content_type.starts_with("text/event-stream"), "content type {content_type}");
        let mut reader = SseReader::new(response);
        let mut events = Vec::new();
        let mut done = false;
        while let Some(data) = reader.next_data().await {
            assert!(!done, "data after [DONE]: {data}");
            if data == "[DONE]" {
                done = true;
            } else {
                events
                    .push(serde_json::from_str(&data).unwrap_or_else(|e| panic!("bad event ({e}): {data}")));
            }
        }
        SseEvents { events, done }
    }

    /// POSTs `body` to an endpoint that answers success in plain text
    /// (vLLM's LoRA load and unload); returns the status and the body as it came.
    pub async fn post_text(&self, path: &str, body: &Value) -> (u16, String) {
        let response = self.post(path).json(body).send().await.expect("request sent");
        let status = response.status().as_u16();
        (status, response.text().await.expect("response body"))
    }

    pub async fn metrics(&self) -> String {
        self.http.get(self.url("/metrics")).send().await.expect("metrics").text().await.expect("metrics body")
    }
}

/// Reads `data:` payloads from an SSE response as they arrive.
pub struct SseReader {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    /// Bytes not yet split into events (a chunk may end inside a character).
    buffer: Vec<u8>,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: response.bytes_stream().map(|chunk| chunk.map(|b| b.to_vec())).boxed(),
            buffer: Vec::new(),
        }
    }

    /// The next event's data, or `None` at the end of the body.
    pub async fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let event = String::from_utf8(event).expect("SSE events are UTF-8");
                let data: Vec<&str> =
                    event.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.trim_start()).collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Some(data.join("\n"));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => panic!("stream broke: {e}"),
                None => return None,
            }
        }
    }
}

/// The value of the series `name` whose labels include every `key="value"`
/// pair of `labels` (comma-separated, as Prometheus writes them; pass "" for
/// any). Missing series read as 0.
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    let wanted: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let have: Vec<&str> = series_labels.split(',').collect();
            (series_name == name && wanted.iter().all(|w| have.contains(w)))
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Polls /metrics until `done` holds (or panics after `timeout`).
pub async fn wait_for_metrics(
    client: &Client,
    timeout: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let text = client.metrics().await;
        if done(&text) {
            return text;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}; metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
