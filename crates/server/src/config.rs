//! The server's command-line options (flattened into `pagoda serve` next to
//! the engine's), the [`ServerConfig`] built from them, and logging setup.

use std::time::Duration;

use pagoda_engine::{AsyncEngineOptions, DEFAULT_MAX_PENDING_SEQS};

use pagoda_tool_calls::ToolParserKind;

use crate::connections::ConnectionLimits;
use crate::lora::{parse_lora_module, LoraModulePath};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (with the current span's fields, e.g. the request id).
    Json,
}

/// HTTP server options of `pagoda serve` (vLLM's names where they mean the same).
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on /v1 endpoints. An empty key
    /// is refused (leave the option out to serve without one).
    #[arg(long, env = "PAGODA_API_KEY", hide_env_values = true, value_parser = parse_api_key)]
    pub api_key: Option<String>,
    /// Model name(s) clients use in `model`; the first is reported in responses.
    /// Defaults to the --model argument.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Most requests queued or running at once (a completion counts one per
    /// prompt); beyond it requests get 429, and a request over it alone 400.
    #[arg(long, default_value_t = 1024)]
    pub max_pending_requests: usize,
    /// Most sequences queued or running at once (prompts x n), as above.
    #[arg(long, default_value_t = DEFAULT_MAX_PENDING_SEQS)]
    pub max_pending_seqs: usize,
    /// Most tokens of work queued or running at once (per prompt: its tokens
    /// plus n x max_tokens), as above. Default: --max-pending-requests x max-model-len.
    #[arg(long)]
    pub max_pending_tokens: Option<usize>,
    /// On SIGTERM or Ctrl-C, how long in-flight requests may run before they are aborted.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Most open client connections. At the cap a new connection displaces the one idle
    /// longest (no request in progress); when every connection is busy it gets 503.
    /// Lowered, with a warning, to what the open-file limit allows.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// Seconds a client has to send a request's headers once the server waits for them.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_secs: u64,
    /// Seconds an idle connection (no request in progress, nothing received) stays open
    /// (uvicorn's and vLLM's `--timeout-keep-alive`).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_keep_alive: u64,
    /// Seconds a client has to send a whole request body once its headers arrived (408 after).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_body_timeout_secs: u64,
    /// The chat template to use instead of the model's: a file, or the template itself
    /// (vLLM's --chat-template).
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Let requests bring their own `chat_template` (vLLM's flag: a template is code
    /// the server runs, so it is off by default).
    #[arg(long)]
    pub trust_request_chat_template: bool,
    /// Let the model decide when to call tools (`tool_choice` "auto", the default when a
    /// request has `tools`): its output is parsed for calls by --tool-call-parser (vLLM's flag).
    #[arg(long, requires = "tool_call_parser")]
    pub enable_auto_tool_choice: bool,
    /// How tool calls are written in the model's output: hermes (`<tool_call>` JSON, also
    /// SmolLM2's and Qwen's), llama3_json, mistral (vLLM's names).
    #[arg(long, value_parser = parse_tool_call_parser)]
    pub tool_call_parser: Option<ToolParserKind>,
    /// Origins a browser may call the API from (CORS), as a JSON list; `["*"]` allows any (vLLM's default).
    #[arg(long, default_value = r#"["*"]"#, value_parser = parse_json_list)]
    pub allowed_origins: JsonList,
    /// Methods allowed in cross-origin requests, as a JSON list.
    #[arg(long, default_value = r#"["*"]"#, value_parser = parse_json_list)]
    pub allowed_methods: JsonList,
    /// Headers allowed in cross-origin requests, as a JSON list.
    #[arg(long, default_value = r#"["*"]"#, value_parser = parse_json_list)]
    pub allowed_headers: JsonList,
    /// Allow credentials (cookies, authorization headers) in cross-origin requests.
    #[arg(long)]
    pub allowed_credentials: bool,
    /// Most top alternatives a request may ask for per token (`logprobs`,
    /// `top_logprobs`, `prompt_logprobs`; vLLM's flag and default). The top
    /// alternatives of generated tokens stay capped at 20 by the sampler.
    #[arg(long, default_value_t = 20)]
    pub max_logprobs: usize,
    /// The path prefix a reverse proxy serves the API under (vLLM's, FastAPI's
    /// `root_path`): every route answers both at `/` and under this prefix.
    #[arg(long)]
    pub root_path: Option<String>,
    /// Leave out the live dashboard (`/dashboard`) and the KV view it polls
    /// (`/v1/debug/kv`); both are served by default, without an API key, as /metrics is.
    #[arg(long)]
    pub disable_dashboard: bool,
    /// LoRA adapters to serve, each as NAME=PATH (a PEFT folder) or vLLM's JSON form
    /// '{"name": NAME, "path": PATH, "base_model_name": SERVED_NAME}'; a request runs with
    /// one by naming it in `model`. Needs --enable-lora. Each is read at startup: one that
    /// does not fit the model stops the server.
    #[arg(long, num_args = 1.., value_name = "NAME=PATH", value_parser = parse_lora_module)]
    pub lora_modules: Vec<LoraModulePath>,
    /// Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter, which add and remove
    /// adapters while the server runs (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING=True turns it on too).
    #[arg(
        long,
        env = "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
        num_args = 0,
        default_value = "false",
        default_missing_value = "true",
        value_parser = parse_env_flag,
        action = clap::ArgAction::Set
    )]
    pub allow_runtime_lora_updating: bool,
}

/// A switch set from the environment the way vLLM reads its variables:
/// `1` or `true` (any case, spaces around ignored) is on, anything else off.
fn parse_env_flag(value: &str) -> Result<bool, String> {
    Ok(matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true"))
}

/// A list of strings given as JSON on the command line (vLLM's CORS flags take them so).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonList(pub Vec<String>);

impl JsonList {
    /// `["*"]`.
    pub fn any() -> Self {
        Self(vec!["*".into()])
    }
}

fn parse_tool_call_parser(value: &str) -> Result<ToolParserKind, String> {
    ToolParserKind::from_name(value).ok_or_else(|| {
        format!("unknown tool-call parser `{value}` (one of: {})", ToolParserKind::names().join(", "))
    })
}

/// `prefix`, `/prefix/` and `/prefix` all mean `/prefix`; empty or `/` mean none.
fn normalize_root_path(path: Option<&str>) -> Option<String> {
    let trimmed = path?.trim().trim_matches('/');
    (!trimmed.is_empty()).then(|| format!("/{trimmed}"))
}

fn parse_json_list(value: &str) -> Result<JsonList, String> {
    serde_json::from_str(value)
        .map(JsonList)
        .map_err(|e| format!("expected a JSON list of strings, such as '[\"*\"]': {e}"))
}

/// Who may call the API from a browser (CORS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorsConfig {
    pub origins: Vec<String>,
    pub methods: Vec<String>,
    pub headers: Vec<String>,
    pub credentials: bool,
}

/// An API key must have a non-blank value: an empty one (`--api-key ""`, or
/// `PAGODA_API_KEY=` set but empty) would otherwise turn authentication off
/// unnoticed.
fn parse_api_key(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err(
            "the API key is empty; give a real key, or leave out --api-key and unset PAGODA_API_KEY \
                    to serve without authentication"
                .into(),
        );
    }
    Ok(value.to_string())
}

impl Default for ServerArgs {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 8000,
            api_key: None,
            served_model_name: Vec::new(),
            max_pending_requests: 1024,
            max_pending_seqs: DEFAULT_MAX_PENDING_SEQS,
            max_pending_tokens: None,
            shutdown_grace_secs: 30,
            log_format: LogFormat::Text,
            max_connections: 2048,
            header_read_timeout_secs: 10,
            timeout_keep_alive: 5,
            request_body_timeout_secs: 60,
            chat_template: None,
            trust_request_chat_template: false,
            enable_auto_tool_choice: false,
            tool_call_parser: None,
            allowed_origins: JsonList::any(),
            allowed_methods: JsonList::any(),
            allowed_headers: JsonList::any(),
            allowed_credentials: false,
            max_logprobs: 20,
            root_path: None,
            disable_dashboard: false,
            lora_modules: Vec::new(),
            allow_runtime_lora_updating: false,
        }
    }
}

impl ServerArgs {
    /// The async engine's options these arguments imply (pass them to
    /// `AsyncEngine::start`: the waiting-queue bound lives in the engine).
    pub fn engine_options(&self) -> AsyncEngineOptions {
        AsyncEngineOptions {
            max_pending_requests: self.max_pending_requests,
            max_pending_seqs: self.max_pending_seqs,
            max_pending_tokens: self.max_pending_tokens,
        }
    }

    /// The server configuration. `model` is the --model argument (the
    /// default served name, as in vLLM); `version` and `git_rev` are what
    /// /version reports (the binary's `CARGO_PKG_VERSION` and build rev).
    pub fn to_config(&self, model: &str, version: &str, git_rev: &str) -> ServerConfig {
        let served_model_names = if self.served_model_name.is_empty() {
            vec![model.to_string()]
        } else {
            self.served_model_name.clone()
        };
        ServerConfig {
            host: self.host.clone(),
            port: self.port,
            // Kept even if empty (only possible when built in code): an
            // empty key then authorizes nobody, rather than everybody.
            api_key: self.api_key.clone(),
            served_model_names,
            model_root: model.to_string(),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            version: version.to_string(),
            git_rev: git_rev.to_string(),
            connection_limits: self.connection_limits(),
            chat_template: self.chat_template.clone(),
            trust_request_chat_template: self.trust_request_chat_template,
            enable_auto_tool_choice: self.enable_auto_tool_choice,
            tool_call_parser: self.tool_call_parser,
            cors: CorsConfig {
                origins: self.allowed_origins.0.clone(),
                methods: self.allowed_methods.0.clone(),
                headers: self.allowed_headers.0.clone(),
                credentials: self.allowed_credentials,
            },
            max_logprobs: self.max_logprobs,
            root_path: normalize_root_path(self.root_path.as_deref()),
            dashboard: !self.disable_dashboard,
            lora_modules: self.lora_modules.clone(),
            allow_runtime_lora_updating: self.allow_runtime_lora_updating,
        }
    }

    /// The connection layer's limits these arguments set.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            keep_alive_timeout: Duration::from_secs(self.timeout_keep_alive),
            request_body_timeout: Duration::from_secs(self.request_body_timeout_secs),
        }
    }
}

/// Everything the HTTP side needs besides the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// Never empty; the first is the name responses carry.
    pub served_model_names: Vec<String>,
    /// Where the model came from (/v1/models' `root`).
    pub model_root: String,
    pub shutdown_grace: Duration,
    pub version: String,
    pub git_rev: String,
    /// Connection cap and timeouts.
    pub connection_limits: ConnectionLimits,
    /// --chat-template: a file or the template itself, replacing the model's.
    pub chat_template: Option<String>,
    /// Whether a request may bring its own `chat_template`.
    pub trust_request_chat_template: bool,
    /// `tool_choice` "auto" is allowed (and parsed with `tool_call_parser`).
    pub enable_auto_tool_choice: bool,
    /// How tool calls are parsed from output, when auto tool choice is on.
    pub tool_call_parser: Option<ToolParserKind>,
    /// Cross-origin access.
    pub cors: CorsConfig,
    /// --max-logprobs: most top alternatives a request may ask for per token.
    pub max_logprobs: usize,
    /// --root-path, as `/prefix` (no trailing slash); `None` when absent or `/`.
    pub root_path: Option<String>,
    /// Serve `/dashboard` and `/v1/debug/kv` (off with `--disable-dashboard`).
    pub dashboard: bool,
    /// --lora-modules: adapters registered at startup (the engine must serve LoRA).
    pub lora_modules: Vec<LoraModulePath>,
    /// Route /v1/load_lora_adapter and /v1/unload_lora_adapter.
    pub allow_runtime_lora_updating: bool,
}

impl ServerConfig {
    /// The name responses report.
    pub fn model_name(&self) -> &str {
        self.served_model_names.first().map(String::as_str).unwrap_or("")
    }

    /// Whether `name` is one of the served names.
    pub fn serves(&self, name: &str) -> bool {
        self.served_model_names.iter().any(|n| n == name)
    }
}

/// Installs the global tracing subscriber: level from `RUST_LOG` (default
/// `info`), lines as text or JSON. A second call keeps the first subscriber.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // An error means a subscriber is already set (tests, or a second call): keep it.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerArgs,
    }

    #[test]
    fn defaults_match_clap_defaults() {
        let cli = Cli::try_parse_from(["pagoda"]).unwrap();
        // The environment may carry PAGODA_API_KEY and VLLM_ALLOW_RUNTIME_LORA_UPDATING.
        let expected = ServerArgs {
            api_key: cli.server.api_key.clone(),
            allow_runtime_lora_updating: cli.server.allow_runtime_lora_updating,
            ..ServerArgs::default()
        };
        assert_eq!(cli.server, expected);
    }

    #[test]
    fn parses_every_option() {
        let cli = Cli::try_parse_from([
            "pagoda",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--api-key",
            "k",
            "--served-model-name",
            "a",
            "b",
            "--max-pending-requests",
            "2",
            "--max-pending-seqs",
            "8",
            "--max-pending-tokens",
            "1000",
            "--shutdown-grace-secs",
            "5",
            "--log-format",
            "json",
            "--max-connections",
            "7",
            "--header-read-timeout-secs",
            "3",
            "--timeout-keep-alive",
            "4",
            "--request-body-timeout-secs",
            "9",
            "--max-logprobs",
            "5",
            "--root-path",
            "/api/v2/",
        ])
        .unwrap();
        let config = cli.server.to_config("models/x", "0.1.0", "abc");
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(config.port, 0);
        assert_eq!(config.api_key.as_deref(), Some("k"));
        assert_eq!(config.model_name(), "a");
        assert!(config.serves("b") && !config.serves("models/x"));
        assert_eq!(config.shutdown_grace, Duration::from_secs(5));
        let options = cli.server.engine_options();
        assert_eq!(
            (options.max_pending_requests, options.max_pending_seqs, options.max_pending_tokens),
            (2, 8, Some(1000))
        );
        assert_eq!(cli.server.log_format, LogFormat::Json);
        let limits = config.connection_limits;
        assert_eq!(limits.max_connections, 7);
        assert_eq!(limits.header_read_timeout, Duration::from_secs(3));
        assert_eq!(limits.keep_alive_timeout, Duration::from_secs(4));
        assert_eq!(limits.request_body_timeout, Duration::from_secs(9));
        assert_eq!((config.max_logprobs, config.root_path.as_deref()), (5, Some("/api/v2")));
    }

    #[test]
    fn zero_limits_are_refused() {
        for flag in [
            "--max-connections",
            "--header-read-timeout-secs",
            "--timeout-keep-alive",
            "--request-body-timeout-secs",
        ] {
            let err = Cli::try_parse_from(["pagoda", flag, "0"]).err().expect("0 is refused");
            assert!(err.to_string().contains(flag), "{err}");
        }
    }

    #[test]
    fn an_empty_api_key_is_refused() {
        for empty in ["", "  "] {
            let e = Cli::try_parse_from(["pagoda", "--api-key", empty]).err().expect("refused");
            assert!(e.to_string().contains("the API key is empty"), "{e}");
        }
    }

    #[test]
    fn lora_flags_parse_in_both_forms() {
        let cli = Cli::try_parse_from([
            "pagoda",
            "--lora-modules",
            "sql=/adapters/sql",
            r#"{"name": "chat", "path": "/adapters/chat", "base_model_name": "base"}"#,
            "--allow-runtime-lora-updating",
        ])
        .unwrap();
        let config = cli.server.to_config("m", "0", "r");
        let names: Vec<&str> = config.lora_modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["sql", "chat"]);
        assert_eq!(config.lora_modules[0].path, std::path::PathBuf::from("/adapters/sql"));
        assert_eq!(config.lora_modules[1].base_model_name.as_deref(), Some("base"));
        assert!(config.allow_runtime_lora_updating);
        // Repeating the flag adds to the list, as vLLM's does.
        let cli =
            Cli::try_parse_from(["pagoda", "--lora-modules", "a=/a", "--lora-modules", "b=/b"]).unwrap();
        assert_eq!(cli.server.lora_modules.len(), 2);
        for bad in
            [&["--lora-modules"][..], &["--lora-modules", "sql"], &["--lora-modules", r#"{"name": "x"}"#]]
        {
            let e = Cli::try_parse_from(std::iter::once("pagoda").chain(bad.iter().copied())).err();
            assert!(e.is_some(), "{bad:?} is refused");
        }
    }

    #[test]
    fn runtime_lora_updating_reads_like_vllms_variable() {
        for (value, on) in
            [("True", true), ("1", true), (" true ", true), ("0", false), ("False", false), ("", false)]
        {
            assert_eq!(parse_env_flag(value), Ok(on), "{value:?}");
        }
        // Run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (or 0) to check the variable is read.
        let from_env =
            std::env::var("VLLM_ALLOW_RUNTIME_LORA_UPDATING").is_ok_and(|v| parse_env_flag(&v) == Ok(true));
        let cli = Cli::try_parse_from(["pagoda"]).unwrap();
        assert_eq!(
            cli.server.allow_runtime_lora_updating, from_env,
            "off by default, else as the variable says"
        );
        assert!(
            Cli::try_parse_from(["pagoda", "--allow-runtime-lora-updating"])
                .unwrap()
                .server
                .allow_runtime_lora_updating
        );
        let e = Cli::try_parse_from(["pagoda", "--allow-runtime-lora-updating", "yes"]).err();
        assert!(e.is_some(), "the flag takes no value");
    }

    #[test]
    fn model_path_is_the_default_name() {
        let config = ServerArgs::default().to_config("models/smollm2", "0.1.0", "abc");
        assert_eq!(config.served_model_names, vec!["models/smollm2".to_string()]);
        assert_eq!(config.version, "0.1.0");
        assert_eq!((config.max_logprobs, config.root_path), (20, None), "vLLM's defaults");
        for none in ["", "/", " "] {
            let args = ServerArgs { root_path: Some(none.into()), ..ServerArgs::default() };
            assert_eq!(args.to_config("m", "0", "r").root_path, None);
        }
    }
}
