//! What every handler shares: the engine handle, the configuration, the
//! HTTP-level metrics and the request-id source.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pagoda_engine::{AsyncEngine, LoraRequest};
use pagoda_models::ChatTemplate;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::config::ServerConfig;
use crate::error::{ApiError, ServeError};
use crate::lora::LoraRegistry;

/// --chat-template's template: the file `arg` names, or `arg` itself when it
/// reads as a template (vLLM accepts both), compiled with the model's
/// special tokens.
fn server_chat_template(arg: &str, model: Option<&Arc<ChatTemplate>>) -> Result<ChatTemplate, ServeError> {
    let path = std::path::Path::new(arg);
    let source = if path.is_file() {
        std::fs::read_to_string(path)
            .map_err(|e| ServeError::ChatTemplate(format!("cannot read {arg}: {e}")))?
    } else if arg.contains("{{") || arg.contains("{%") {
        arg.to_string()
    } else {
        return Err(ServeError::ChatTemplate(format!("{arg} is neither a file nor a template")));
    };
    let compiled = match model {
        Some(model) => model.with_source(&source),
        None => ChatTemplate::new(&source, None, None),
    };
    compiled.map_err(|e| ServeError::ChatTemplate(e.to_string()))
}

/// Handler state; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<AsyncEngine>,
    config: ServerConfig,
    /// --chat-template's, else the model's.
    chat_template: Option<Arc<ChatTemplate>>,
    http_metrics: HttpMetrics,
    next_id: AtomicU64,
    /// Makes ids differ between server runs (logs from restarts don't collide).
    id_salt: u64,
    /// Keys the hash of requests' `cache_salt`s: a client cannot make another
    /// salt's hash without knowing this.
    cache_salt_key: RandomState,
    shutting_down: AtomicBool,
    /// The structured-output grammar compiler, built on first use.
    grammars: crate::structured::Grammars,
    /// The LoRA adapters requests may name.
    loras: LoraRegistry,
}

impl AppState {
    /// Fails when --chat-template names neither a readable file nor a
    /// template that compiles, or when a --lora-modules adapter cannot be
    /// served (LoRA is off in the engine, or the adapter does not load or
    /// fit the model). Reads those adapters: blocks while it does.
    pub fn new(config: ServerConfig, engine: Arc<AsyncEngine>) -> Result<Self, ServeError> {
        let id_salt = RandomState::new().hash_one(SystemTime::now());
        let chat_template = match &config.chat_template {
            None => engine.chat_template().cloned(),
            Some(arg) => Some(Arc::new(server_chat_template(arg, engine.chat_template())?)),
        };
        let loras = LoraRegistry::new(&config.served_model_names);
        if !config.lora_modules.is_empty() {
            let cache = engine.lora_cache().ok_or_else(|| {
                ServeError::Lora("LoRA is not enabled in the engine: add --enable-lora".into())
            })?;
            for module in &config.lora_modules {
                let parent = module.base_model_name.as_deref();
                if parent.is_some_and(|p| !config.serves(p)) {
                    tracing::warn!(
                        adapter = %module.name,
                        base_model_name = parent,
                        "base_model_name is not a served model name: ignored"
                    );
                }
                let lora = loras
                    .register(cache, &module.name, &module.path, parent)
                    // The message names the adapter.
                    .map_err(|e| ServeError::Lora(e.message))?;
                tracing::info!(
                    name = %lora.name,
                    path = %lora.path.display(),
                    id = lora.id,
                    "serving a LoRA adapter"
                );
            }
        }
        if config.allow_runtime_lora_updating {
            tracing::warn!(
                "runtime LoRA updating is on: any client with access to the API may load adapters from this \
                 machine's files (/v1/load_lora_adapter)"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                config,
                chat_template,
                http_metrics: HttpMetrics::new(),
                next_id: AtomicU64::new(0),
                id_salt,
                cache_salt_key: RandomState::new(),
                shutting_down: AtomicBool::new(false),
                grammars: crate::structured::Grammars::default(),
                loras,
            }),
        })
    }

    /// The engine's key for a request's `cache_salt` (vLLM's: a non-empty string).
    pub fn cache_salt(&self, salt: Option<&str>) -> Result<Option<u64>, ApiError> {
        match salt {
            None => Ok(None),
            Some("") => {
                Err(ApiError::bad_request(Some("cache_salt"), "cache_salt must be a non-empty string"))
            }
            Some(salt) => Ok(Some(self.inner.cache_salt_key.hash_one(salt))),
        }
    }

    /// The template chat requests render with, unless they bring their own.
    pub fn chat_template(&self) -> Option<&Arc<ChatTemplate>> {
        self.inner.chat_template.as_ref()
    }

    pub fn engine(&self) -> &Arc<AsyncEngine> {
        &self.inner.engine
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    pub fn grammars(&self) -> &crate::structured::Grammars {
        &self.inner.grammars
    }

    pub fn http_metrics(&self) -> &HttpMetrics {
        &self.inner.http_metrics
    }

    /// A fresh request id such as `cmpl-6f1c...-2a`.
    pub fn next_request_id(&self, prefix: &str) -> String {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:016x}{n:x}", self.inner.id_salt)
    }

    /// Marks the server as draining: /health turns 503.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst) || self.inner.engine.is_shutting_down()
    }

    /// The LoRA adapters requests may name.
    pub fn loras(&self) -> &LoraRegistry {
        &self.inner.loras
    }

    /// The adapter a request's `model` names: `None` for the base model
    /// (also when `model` is absent), 404 for a name the server does not serve.
    pub fn resolve_model(&self, model: Option<&str>) -> Result<Option<LoraRequest>, ApiError> {
        match model {
            None => Ok(None),
            Some(name) if self.config().serves(name) => Ok(None),
            Some(name) => self.loras().get(name).map(Some).ok_or_else(|| ApiError::model_not_found(name)),
        }
    }

    /// Checks a request's `model` field: the base model or an adapter (whose
    /// tokenizer is the base model's).
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        self.resolve_model(model).map(|_| ())
    }

    /// The name a response reports: the adapter's, else the first served name.
    pub fn response_model(&self, lora: Option<&LoraRequest>) -> String {
        lora.map_or_else(|| self.config().model_name().to_string(), |l| l.name.clone())
    }
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// HTTP-level Prometheus metrics, rendered after the engine's at /metrics.
pub struct HttpMetrics {
    registry: Registry,
    /// Responses by route and status code.
    pub requests: IntCounterVec,
    /// Requests being handled (streams count until their last event).
    pub in_flight: IntGauge,
}

impl HttpMetrics {
    fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("pagoda:http_requests_total", "HTTP responses by route and status code."),
            &["route", "status"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::new("pagoda:http_requests_in_flight", "HTTP requests being handled.")
            .expect("valid metric");
        registry.register(Box::new(requests.clone())).expect("unique metric");
        registry.register(Box::new(in_flight.clone())).expect("unique metric");
        Self { registry, requests, in_flight }
    }

    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
