//! Multi-LoRA serving through `pagoda serve`, as vLLM spells it: adapters
//! from `--lora-modules` and `/v1/load_lora_adapter` are listed by
//! /v1/models and picked by a request's `model`; unknown names are 404s;
//! unloading an adapter lets the requests running with it finish. Synthetic
//! adapters (rank 8, every projection) on the real default model, CPU backend.

mod server_support;

use std::sync::OnceLock;

use pagoda_engine::{EngineConfig, LoraConfig};
use pagoda_server::{AppState, LoraModulePath, ServeError, ServerArgs};
use serde_json::{json, Value};
use server_support::{
    engine_config, model_path, scratch_dir, write_lora, Client, SseReader, TestServer, MODEL_NAME,
};

static LORA: OnceLock<TestServer> = OnceLock::new();
static PLAIN: OnceLock<TestServer> = OnceLock::new();

/// The adapter `--lora-modules` serves.
const ALPHA: &str = "alpha";

fn alpha_path() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    // A seed whose adapter changes the greedy text of PROMPT (any changes its logprobs).
    PATH.get_or_init(|| write_lora(ALPHA, 2))
}

/// LoRA on (two adapters on the device, two kept on the host), `alpha`
/// served from startup, runtime loading allowed.
fn lora_server() -> &'static TestServer {
    LORA.get_or_init(|| {
        let args = ServerArgs {
            lora_modules: vec![LoraModulePath {
                name: ALPHA.into(),
                path: alpha_path().to_path_buf(),
                base_model_name: None,
            }],
            allow_runtime_lora_updating: true,
            ..ServerArgs::default()
        };
        let lora = LoraConfig { max_loras: 2, max_lora_rank: 16, max_cpu_loras: 2 };
        TestServer::start_with(args, EngineConfig { lora: Some(lora), ..engine_config() })
    })
}

/// LoRA off, runtime loading not allowed.
fn plain_server() -> &'static TestServer {
    PLAIN.get_or_init(|| TestServer::start(ServerArgs::default()))
}

const PROMPT: &str = "The three most important things to know about the ocean are";

/// A greedy 16-token completion of [`PROMPT`] by `model`, with the tokens' logprobs.
fn completion(model: &str) -> Value {
    json!({"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": true,
           "logprobs": 0})
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Name three colors."}],
           "max_tokens": 16, "temperature": 0, "ignore_eos": true})
}

/// What a model made of [`PROMPT`]: the text, and the logprob of each token
/// (which any adapter changes, even where the greedy tokens stay the same).
#[derive(Debug, PartialEq)]
struct Generated {
    text: String,
    logprobs: Vec<f64>,
}

impl Generated {
    /// The same tokens, with logprobs equal up to the rounding that batching
    /// with other requests (or reusing cached prompt blocks) brings.
    fn assert_same(&self, other: &Generated, what: &str) {
        assert_eq!(self.text, other.text, "{what}");
        assert_eq!(self.logprobs.len(), other.logprobs.len(), "{what}");
        for (a, b) in self.logprobs.iter().zip(&other.logprobs) {
            assert!((a - b).abs() < 1e-3, "{what}: logprobs {:?} and {:?}", self.logprobs, other.logprobs);
        }
    }

    /// Whether some token's logprob differs beyond that rounding.
    fn differs_from(&self, other: &Generated) -> bool {
        self.text != other.text
            || self.logprobs.iter().zip(&other.logprobs).any(|(a, b)| (a - b).abs() > 1e-2)
    }
}

async fn generate(client: &Client, model: &str) -> Generated {
    let (status, body) = client.post_json("/v1/completions", &completion(model)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], model, "the response names the model asked for");
    assert_eq!(body["usage"]["completion_tokens"], 16);
    let choice = &body["choices"][0];
    let logprobs = choice["logprobs"]["token_logprobs"].as_array().expect("logprobs");
    Generated {
        text: choice["text"].as_str().expect("text").to_string(),
        logprobs: logprobs.iter().map(|l| l.as_f64().expect("a logprob")).collect(),
    }
}

async fn models(client: &Client) -> Vec<Value> {
    let response = client.get("/v1/models").send().await.expect("models");
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.expect("JSON");
    body["data"].as_array().expect("data").clone()
}

fn assert_model_not_found(status: u16, body: &Value, model: &str) {
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains(model), "{body}");
}

#[tokio::test]
async fn models_lists_adapters_after_the_base_model() {
    let data = models(&lora_server().client()).await;
    assert_eq!(data[0]["id"], MODEL_NAME);
    assert!(data[0]["parent"].is_null(), "the base model has no parent: {}", data[0]);
    let alpha = data.iter().position(|m| m["id"] == ALPHA).expect("alpha is listed");
    assert!(alpha > 0);
    assert_eq!(data[alpha]["parent"], MODEL_NAME);
    assert_eq!(data[alpha]["root"], alpha_path().display().to_string());
    assert_eq!(data[alpha]["object"], "model");
}

#[tokio::test]
async fn an_adapter_is_chosen_by_model_name() {
    let client = lora_server().client();
    let base = generate(&client, MODEL_NAME).await;
    let adapted = generate(&client, ALPHA).await;
    assert_ne!(base.text, adapted.text, "the adapter changes greedy output");
    generate(&client, ALPHA).await.assert_same(&adapted, "the same adapter, the same output");

    let (status, body) = client.post_json("/v1/chat/completions", &chat(ALPHA)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], ALPHA);
    let text = body["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let (status, base_chat) = client.post_json("/v1/chat/completions", &chat(MODEL_NAME)).await;
    assert_eq!(status, 200, "{base_chat}");
    assert_ne!(base_chat["choices"][0]["message"]["content"], text.as_str());

    // Streamed, every chunk names the adapter, and the text is the same.
    let mut streamed_chat = chat(ALPHA);
    streamed_chat["stream"] = json!(true);
    let stream = client.post_stream("/v1/chat/completions", &streamed_chat).await;
    assert!(stream.done);
    assert!(stream.events.iter().all(|e| e["model"] == ALPHA), "{:?}", stream.events);
    let streamed: String =
        stream.events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text);

    // Adapters share the base model's tokenizer.
    let (status, body) = client.post_json("/tokenize", &json!({"model": ALPHA, "prompt": "hi"})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_unknown_model_is_a_404() {
    for server in [lora_server(), plain_server()] {
        let client = server.client();
        let (status, body) = client.post_json("/v1/completions", &completion("nope")).await;
        assert_model_not_found(status, &body, "nope");
        let (status, body) = client.post_json("/v1/chat/completions", &chat("nope")).await;
        assert_model_not_found(status, &body, "nope");
        let (status, body) = client.post_json("/tokenize", &json!({"model": "nope", "prompt": "hi"})).await;
        assert_model_not_found(status, &body, "nope");
    }
    // Without LoRA, an adapter's name is just an unknown model.
    let (status, body) = plain_server().client().post_json("/v1/completions", &completion(ALPHA)).await;
    assert_model_not_found(status, &body, ALPHA);
}

#[tokio::test]
async fn runtime_updates_are_not_routed_unless_allowed() {
    let client = plain_server().client();
    let path = alpha_path().display().to_string();
    for (route, body) in [
        ("/v1/load_lora_adapter", json!({"lora_name": "x", "lora_path": path})),
        ("/v1/unload_lora_adapter", json!({"lora_name": "x"})),
    ] {
        let (status, body) = client.post_json(route, &body).await;
        assert_eq!(status, 404, "{route}: {body}");
        assert_eq!(body["error"]["code"], "unknown_url", "{route}: {body}");
    }
}

#[tokio::test]
async fn adapters_load_and_unload_at_runtime() {
    let client = lora_server().client();
    let beta = write_lora("beta", 2);
    let load = json!({"lora_name": "beta", "lora_path": beta.display().to_string()});
    let (status, text) = client.post_text("/v1/load_lora_adapter", &load).await;
    assert_eq!((status, text.as_str()), (200, "Success: LoRA adapter 'beta' added successfully."));
    let listed = models(&client).await;
    let card = listed.iter().find(|m| m["id"] == "beta").expect("beta is listed");
    assert_eq!((&card["parent"], &card["root"]), (&json!(MODEL_NAME), &json!(beta.display().to_string())));
    let adapted = generate(&client, "beta").await;
    assert!(adapted.differs_from(&generate(&client, MODEL_NAME).await), "beta is applied");

    // Refusals: a name taken, a name missing, the base model's name, a folder
    // that is no adapter (400, saying why), a path that does not exist (404, as vLLM).
    let (status, body) = client.post_json("/v1/load_lora_adapter", &load).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("has already been loaded"), "{body}");
    let (status, body) =
        client.post_json("/v1/load_lora_adapter", &json!({"lora_path": beta.display().to_string()})).await;
    assert_eq!((status, &body["error"]["param"]), (400, &json!("lora_name")), "{body}");
    let base_name = json!({"lora_name": MODEL_NAME, "lora_path": beta.display().to_string()});
    let (status, body) = client.post_json("/v1/load_lora_adapter", &base_name).await;
    assert_eq!(status, 400, "{body}");
    let broken = scratch_dir("broken");
    std::fs::write(broken.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16}"#)
        .unwrap();
    let (status, body) = client
        .post_json(
            "/v1/load_lora_adapter",
            &json!({"lora_name": "broken", "lora_path": broken.display().to_string()}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("broken") && message.contains("adapter_model.safetensors"), "{body}");
    let missing = json!({"lora_name": "missing", "lora_path": "/nonexistent/adapter"});
    let (status, body) = client.post_json("/v1/load_lora_adapter", &missing).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("/nonexistent/adapter"), "{body}");
    let names: Vec<Value> = models(&client).await.into_iter().map(|m| m["id"].clone()).collect();
    assert!(!names.contains(&json!("broken")) && !names.contains(&json!("missing")), "{names:?}");

    // Unloaded, it is gone; loaded again, it serves as before.
    let (status, text) = client.post_text("/v1/unload_lora_adapter", &json!({"lora_name": "beta"})).await;
    assert_eq!((status, text.as_str()), (200, "Success: LoRA adapter 'beta' removed successfully."));
    let (status, body) = client.post_json("/v1/completions", &completion("beta")).await;
    assert_model_not_found(status, &body, "beta");
    assert!(models(&client).await.iter().all(|m| m["id"] != "beta"));
    let (status, body) = client.post_json("/v1/unload_lora_adapter", &json!({"lora_name": "beta"})).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("'beta' cannot be found"), "{body}");
    let (status, body) = client.post_json("/v1/unload_lora_adapter", &json!({})).await;
    assert_eq!(status, 400, "{body}");

    let (status, text) = client.post_text("/v1/load_lora_adapter", &load).await;
    assert_eq!(status, 200, "{text}");
    generate(&client, "beta").await.assert_same(&adapted, "beta loaded again");
    let (status, text) = client.post_text("/v1/unload_lora_adapter", &json!({"lora_name": "beta"})).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test]
async fn unloading_an_adapter_lets_its_running_requests_finish() {
    let client = lora_server().client();
    let gamma = write_lora("gamma", 3);
    let load = json!({"lora_name": "gamma", "lora_path": gamma.display().to_string()});
    let (status, text) = client.post_text("/v1/load_lora_adapter", &load).await;
    assert_eq!(status, 200, "{text}");
    let want = generate(&client, "gamma").await;

    let mut body = completion("gamma");
    body["stream"] = json!(true);
    let response = client.post("/v1/completions").json(&body).send().await.expect("stream");
    assert_eq!(response.status().as_u16(), 200);
    let mut reader = SseReader::new(response);
    let first = reader.next_data().await.expect("a first chunk");
    let mut events = vec![first];
    // The request is running: take its adapter away.
    let (status, unloaded) =
        client.post_text("/v1/unload_lora_adapter", &json!({"lora_name": "gamma"})).await;
    assert_eq!(status, 200, "{unloaded}");
    while let Some(data) = reader.next_data().await {
        events.push(data);
    }
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "the stream completes: {events:?}");
    let mut finish = None;
    let mut got = Generated { text: String::new(), logprobs: Vec::new() };
    for data in &events[..events.len() - 1] {
        let event: Value = serde_json::from_str(data).expect("JSON event");
        assert_eq!(event["model"], "gamma");
        let choice = &event["choices"][0];
        got.text.push_str(choice["text"].as_str().unwrap_or(""));
        let logprobs = choice["logprobs"]["token_logprobs"].as_array().into_iter().flatten();
        got.logprobs.extend(logprobs.map(|l| l.as_f64().expect("a logprob")));
        finish = choice["finish_reason"].as_str().map(str::to_string).or(finish);
    }
    assert_eq!(finish.as_deref(), Some("length"));
    got.assert_same(&want, "the adapter stays applied to the end");
    let (status, body) = client.post_json("/v1/completions", &completion("gamma")).await;
    assert_model_not_found(status, &body, "gamma");
}

#[tokio::test]
async fn an_adapter_that_no_longer_loads_is_a_400_naming_model() {
    let client = lora_server().client();
    let delta = write_lora("delta", 4);
    let load = |name: &str, path: &std::path::Path| json!({"lora_name": name, "lora_path": path.display().to_string()});
    let (status, text) = client.post_text("/v1/load_lora_adapter", &load("delta", &delta)).await;
    assert_eq!(status, 200, "{text}");
    std::fs::remove_dir_all(&delta).unwrap();
    // Two newer adapters push it out of the host cache (two kept): the next
    // request naming it reads it from disk again.
    for (name, seed) in [("epsilon", 5), ("zeta", 6)] {
        let (status, text) =
            client.post_text("/v1/load_lora_adapter", &load(name, &write_lora(name, seed))).await;
        assert_eq!(status, 200, "{text}");
    }
    let (status, body) = client.post_json("/v1/completions", &completion("delta")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("delta"), "{body}");
    for name in ["delta", "epsilon", "zeta"] {
        let (status, text) = client.post_text("/v1/unload_lora_adapter", &json!({"lora_name": name})).await;
        assert_eq!(status, 200, "{text}");
    }
}

fn config_with(modules: Vec<LoraModulePath>) -> pagoda_server::ServerConfig {
    let args = ServerArgs {
        served_model_name: vec![MODEL_NAME.into()],
        lora_modules: modules,
        ..ServerArgs::default()
    };
    args.to_config(&model_path().display().to_string(), "0.0.0-test", "test-rev")
}

#[test]
fn startup_refuses_adapters_it_cannot_serve() {
    // Without LoRA in the engine.
    let module =
        LoraModulePath { name: ALPHA.into(), path: alpha_path().to_path_buf(), base_model_name: None };
    let plain = plain_server().engine.clone();
    let Err(ServeError::Lora(message)) = AppState::new(config_with(vec![module.clone()]), plain) else {
        panic!("--lora-modules without LoRA in the engine is refused")
    };
    assert!(message.contains("--enable-lora"), "{message}");

    // An adapter that does not load stops startup, naming it and why (over
    // the LoRA server's engine: its cache is the one that checks adapters).
    let broken = scratch_dir("broken-at-startup");
    std::fs::write(broken.join("adapter_config.json"), r#"{"peft_type": "PREFIX_TUNING"}"#).unwrap();
    let broken = LoraModulePath { name: "broken".into(), path: broken, base_model_name: None };
    let engine = lora_server().engine.clone();
    let Err(e) = AppState::new(config_with(vec![broken]), engine) else {
        panic!("a broken adapter is refused")
    };
    let message = e.to_string();
    assert!(message.contains("--lora-modules") && message.contains("\"broken\""), "{message}");
    assert!(message.contains("only LoRA adapters are supported"), "{message}");
}
