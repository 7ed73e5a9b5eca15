//! LoRA adapters on the HTTP side, as vLLM's `OpenAIServingModels` has them:
//! `--lora-modules` entries ([`LoraModulePath`]), the registry of adapter
//! names a request's `model` may give ([`LoraRegistry`]), and vLLM's
//! `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` (routed
//! only with `--allow-runtime-lora-updating`).
//!
//! Registering an adapter reads it into the engine's host cache
//! ([`LoraCache`]), which checks it against the model, so a name is listed
//! only once its adapter is known to fit. Unregistering forgets the name and
//! drops the adapter from the cache; requests already running hold their
//! adapter and finish with it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use pagoda_engine::{LoraCache, LoraRequest};
use pagoda_models::LoraAdapter;
use serde::Deserialize;

use crate::error::ApiError;
use crate::extract::{parse_json, ApiJson};
use crate::protocol::RequestBody;
use crate::state::AppState;

/// One `--lora-modules` entry (vLLM's `LoRAModulePath`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraModulePath {
    /// The name requests give as `model`.
    pub name: String,
    /// The PEFT adapter folder.
    pub path: PathBuf,
    /// The served model name /v1/models reports as its `parent` (default:
    /// the first served name; a name the server does not serve is ignored, as in vLLM).
    #[serde(default)]
    pub base_model_name: Option<String>,
}

/// Parses a `--lora-modules` value: `name=path`, or vLLM's JSON form
/// `{"name": ..., "path": ..., "base_model_name": ...}`.
pub fn parse_lora_module(value: &str) -> Result<LoraModulePath, String> {
    let trimmed = value.trim();
    let module = if trimmed.starts_with('{') {
        serde_json::from_str::<LoraModulePath>(trimmed).map_err(|e| {
            format!(
                "invalid JSON for --lora-modules: {e} (expected {{\"name\": NAME, \"path\": PATH}}, \
                 optionally with \"base_model_name\")"
            )
        })?
    } else {
        let (name, path) = trimmed.split_once('=').ok_or_else(|| {
            format!("invalid --lora-modules entry {value:?}: expected NAME=PATH or a JSON object")
        })?;
        LoraModulePath { name: name.trim().into(), path: PathBuf::from(path.trim()), base_model_name: None }
    };
    if module.name.is_empty() || module.path.as_os_str().is_empty() {
        return Err(format!(
            "invalid --lora-modules entry {value:?}: the name and the path must both be given"
        ));
    }
    Ok(module)
}

/// A registered adapter and the served model it adapts.
#[derive(Clone, Debug)]
struct Registered {
    request: LoraRequest,
    parent: String,
}

/// The id of the next adapter registered. Ids key the engine's adapter
/// cache, device slots and prefix-cache hashes, and one engine may sit under
/// more than one server state (tests build several), so they are unique in
/// the process, not per registry.
static NEXT_LORA_ID: AtomicU32 = AtomicU32::new(1);

/// The adapters a request may name, in the order they were registered.
/// Each registration gets a fresh id (never 0, never reused), so an adapter
/// registered again under an old name shares no cached KV blocks or device
/// slot with its predecessor.
#[derive(Debug)]
pub struct LoraRegistry {
    adapters: RwLock<Vec<Registered>>,
    /// The base model's served names: no adapter may take one.
    served: Vec<String>,
}

impl LoraRegistry {
    /// An empty registry beside a base model served as `served` (never empty).
    pub fn new(served: &[String]) -> Self {
        Self { adapters: RwLock::default(), served: served.to_vec() }
    }

    /// The adapter registered as `name`.
    pub fn get(&self, name: &str) -> Option<LoraRequest> {
        let adapters = self.adapters.read().unwrap_or_else(|e| e.into_inner());
        adapters.iter().find(|a| a.request.name == name).map(|a| a.request.clone())
    }

    /// Every registered adapter with its parent's served name, oldest first.
    pub fn list(&self) -> Vec<(LoraRequest, String)> {
        let adapters = self.adapters.read().unwrap_or_else(|e| e.into_inner());
        adapters.iter().map(|a| (a.request.clone(), a.parent.clone())).collect()
    }

    /// Registers the adapter in `path` as `name`: reads it into `cache`
    /// (checking it against the model), then lists it. Blocks while reading:
    /// call it off the async threads. `parent` is the served name it
    /// adapts, when given and served. Refused (400) when a name is missing,
    /// taken by the base model or another adapter, or the adapter does not
    /// load; 404 when `path` does not exist (vLLM's "No adapter found").
    pub fn register(
        &self,
        cache: &LoraCache,
        name: &str,
        path: &Path,
        parent: Option<&str>,
    ) -> Result<LoraRequest, ApiError> {
        if name.is_empty() || path.as_os_str().is_empty() {
            let param = if name.is_empty() { "lora_name" } else { "lora_path" };
            return Err(ApiError::bad_request(
                Some(param),
                "Both 'lora_name' and 'lora_path' must be provided.",
            ));
        }
        if self.served.iter().any(|s| s == name) {
            return Err(ApiError::bad_request(
                Some("lora_name"),
                format!("'{name}' is the base model's served name: an adapter needs a name of its own."),
            ));
        }
        self.check_free(name)?;
        if !path.exists() {
            return Err(ApiError::not_found(
                Some("lora_path"),
                format!("No adapter found for '{name}': {} does not exist.", path.display()),
            ));
        }
        let request = LoraRequest {
            name: name.to_string(),
            id: NEXT_LORA_ID.fetch_add(1, Ordering::Relaxed),
            path: path.to_path_buf(),
        };
        // The adapter error names the adapter and why it does not fit.
        cache.get(&request).map_err(|e| ApiError::bad_request(Some("lora_path"), e.to_string()))?;
        let parent = parent
            .filter(|p| self.served.iter().any(|s| s == p))
            .or(self.served.first().map(String::as_str))
            .unwrap_or_default();
        let mut adapters = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        // Another registration of the same name may have finished while this one read.
        if adapters.iter().any(|a| a.request.name == name) {
            drop(adapters);
            cache.remove(request.id);
            return Err(already_loaded(name));
        }
        adapters.push(Registered { request: request.clone(), parent: parent.to_string() });
        Ok(request)
    }

    fn check_free(&self, name: &str) -> Result<(), ApiError> {
        match self.get(name) {
            Some(_) => Err(already_loaded(name)),
            None => Ok(()),
        }
    }

    /// Forgets the adapter named `name` (or, without a name, the one of id
    /// `id`; with both, they must agree) and returns it. 404 when none is.
    pub fn unregister(&self, name: Option<&str>, id: Option<u32>) -> Result<LoraRequest, ApiError> {
        let name = name.filter(|n| !n.is_empty());
        if name.is_none() && id.is_none() {
            return Err(ApiError::bad_request(
                Some("lora_name"),
                "Either 'lora_name' or 'lora_int_id' must be provided.",
            ));
        }
        let mut adapters = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        let found = adapters
            .iter()
            .position(|a| name.is_none_or(|n| a.request.name == n) && id.is_none_or(|i| a.request.id == i));
        match found {
            Some(i) => Ok(adapters.remove(i).request),
            None => {
                let what = match (name, id) {
                    (Some(n), _) => format!("'{n}'"),
                    (None, Some(i)) => format!("with lora_int_id {i}"),
                    (None, None) => unreachable!("checked above"),
                };
                Err(ApiError::not_found(
                    Some(if name.is_some() { "lora_name" } else { "lora_int_id" }),
                    format!("The lora adapter {what} cannot be found."),
                ))
            }
        }
    }
}

fn already_loaded(name: &str) -> ApiError {
    ApiError::bad_request(Some("lora_name"), format!("The lora adapter '{name}' has already been loaded."))
}

/// Reads a request's adapter into the engine's host cache on a blocking
/// thread and returns it: held until the request is submitted, it cannot be
/// evicted meanwhile, so the engine's input processor (which runs on the
/// caller's thread, here an async one) finds it cached instead of reading
/// it from disk. An adapter that no longer loads is a 400 naming `model`.
pub async fn hold_adapter(
    state: &AppState,
    lora: Option<&LoraRequest>,
) -> Result<Option<Arc<LoraAdapter>>, ApiError> {
    let (Some(lora), Some(cache)) = (lora, state.engine().lora_cache()) else { return Ok(None) };
    let (lora, cache) = (lora.clone(), cache.clone());
    let adapter = tokio::task::spawn_blocking(move || cache.get(&lora))
        .await
        .map_err(|e| ApiError::internal(format!("reading the LoRA adapter failed: {e}")))??;
    Ok(Some(adapter))
}

/// vLLM's `LoadLoRAAdapterRequest`.
#[derive(Debug, Deserialize)]
pub struct LoadLoraAdapterRequest {
    #[serde(default)]
    pub lora_name: String,
    #[serde(default)]
    pub lora_path: String,
}

impl RequestBody for LoadLoraAdapterRequest {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        parse_json(bytes)
    }
}

/// vLLM's `UnloadLoRAAdapterRequest`.
#[derive(Debug, Deserialize)]
pub struct UnloadLoraAdapterRequest {
    #[serde(default)]
    pub lora_name: Option<String>,
    #[serde(default)]
    pub lora_int_id: Option<u32>,
}

impl RequestBody for UnloadLoraAdapterRequest {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        parse_json(bytes)
    }
}

/// vLLM answers a successful load or unload with a line of plain text.
fn success(message: String) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message).into_response()
}

/// POST /v1/load_lora_adapter: reads the adapter (on a blocking thread) and
/// serves it under `lora_name`.
pub async fn load_lora_adapter(
    State(state): State<AppState>,
    body: Result<ApiJson<LoadLoraAdapterRequest>, ApiError>,
) -> Response {
    let result = async {
        let ApiJson(request) = body?;
        let Some(cache) = state.engine().lora_cache().cloned() else {
            return Err(ApiError::bad_request(
                None,
                "LoRA adapters are not enabled on this server: start it with --enable-lora.",
            ));
        };
        let registry_state = state.clone();
        let (name, path) = (request.lora_name, PathBuf::from(request.lora_path));
        let loaded =
            tokio::task::spawn_blocking(move || registry_state.loras().register(&cache, &name, &path, None))
                .await
                .map_err(|e| ApiError::internal(format!("loading the LoRA adapter failed: {e}")))??;
        let path = loaded.path.display();
        tracing::info!(name = %loaded.name, path = %path, id = loaded.id, "loaded a LoRA adapter");
        Ok(success(format!("Success: LoRA adapter '{}' added successfully.", loaded.name)))
    }
    .await;
    result.unwrap_or_else(|e| {
        e.log();
        e.into_response()
    })
}

/// POST /v1/unload_lora_adapter: stops serving an adapter. Requests running
/// with it finish; new ones naming it get 404.
pub async fn unload_lora_adapter(
    State(state): State<AppState>,
    body: Result<ApiJson<UnloadLoraAdapterRequest>, ApiError>,
) -> Response {
    let result = body.and_then(|ApiJson(request)| {
        let removed = state.loras().unregister(request.lora_name.as_deref(), request.lora_int_id)?;
        if let Some(cache) = state.engine().lora_cache() {
            cache.remove(removed.id);
        }
        tracing::info!(name = %removed.name, id = removed.id, "unloaded a LoRA adapter");
        Ok(success(format!("Success: LoRA adapter '{}' removed successfully.", removed.name)))
    });
    result.unwrap_or_else(|e| {
        e.log();
        e.into_response()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_parse_as_name_equals_path() {
        let m = parse_lora_module("sql=/adapters/sql-lora").unwrap();
        assert_eq!(
            m,
            LoraModulePath { name: "sql".into(), path: "/adapters/sql-lora".into(), base_model_name: None }
        );
        // Only the first `=` splits: paths may hold more.
        assert_eq!(parse_lora_module("a=/x=y").unwrap().path, PathBuf::from("/x=y"));
    }

    #[test]
    fn modules_parse_in_vllms_json_form() {
        let m =
            parse_lora_module(r#"{"name": "sql", "path": "/a/sql", "base_model_name": "llama"}"#).unwrap();
        assert_eq!((m.name.as_str(), m.base_model_name.as_deref()), ("sql", Some("llama")));
        assert_eq!(m.path, PathBuf::from("/a/sql"));
        let m = parse_lora_module(r#" {"name": "sql", "path": "/a/sql"}"#).unwrap();
        assert_eq!(m.base_model_name, None);
    }

    #[test]
    fn malformed_modules_are_refused_with_the_expected_form() {
        for (value, says) in [
            ("sql", "expected NAME=PATH"),
            ("=/a", "must both be given"),
            ("sql=", "must both be given"),
            (r#"{"name": "sql"}"#, "missing field `path`"),
            (r#"{"name": "sql", "path": "/a", "rank": 8}"#, "unknown field `rank`"),
            (r#"{"name": "sql", "path": "/a""#, "invalid JSON"),
            (r#"{"name": "", "path": "/a"}"#, "must both be given"),
        ] {
            let e = parse_lora_module(value).expect_err(value);
            assert!(e.contains(says), "{value}: {e}");
        }
    }

    #[test]
    fn unregistering_needs_a_known_name_or_id() {
        let registry = LoraRegistry::new(&["base".into()]);
        let e = registry.unregister(None, None).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = registry.unregister(Some("nope"), None).unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.contains("'nope' cannot be found"), "{}", e.message);
        registry.adapters.write().unwrap().push(Registered {
            request: LoraRequest { name: "a".into(), id: 7, path: "/a".into() },
            parent: "base".into(),
        });
        assert_eq!(registry.unregister(Some("a"), Some(8)).unwrap_err().status, StatusCode::NOT_FOUND);
        assert_eq!(registry.unregister(None, Some(7)).unwrap().name, "a");
        assert!(registry.get("a").is_none() && registry.list().is_empty());
    }
}
