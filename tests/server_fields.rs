//! The request surface over HTTP, against the real server on the CPU
//! backend and the default model: every field OpenAI or vLLM defines either
//! works (the walk sends each and expects a response; the tests below check
//! what the newer ones do) or is refused with a 400 naming it. Also vLLM's
//! /tokenize and /detokenize, and templates chosen by the server or request.

mod server_support;

use std::sync::OnceLock;

use pagoda_server::fields::{fields, Endpoint, Support};
use pagoda_server::ServerArgs;
use serde_json::{json, Value};
use server_support::{Client, TestServer, MODEL_NAME};

static SERVER: OnceLock<TestServer> = OnceLock::new();

fn client() -> Client {
    SERVER
        .get_or_init(|| {
            TestServer::start(ServerArgs { trust_request_chat_template: true, ..ServerArgs::default() })
        })
        .client()
}

const CMPL: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

/// A short request of `endpoint` with `example`'s fields on top.
fn request(endpoint: Endpoint, example: &str) -> Value {
    let mut body = match endpoint {
        Endpoint::Completions => {
            json!({"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0})
        }
        Endpoint::Chat => {
            json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0})
        }
    };
    let example: Value =
        serde_json::from_str(&example.replace("{model}", MODEL_NAME)).expect("example is JSON");
    for (key, value) in example.as_object().expect("example is an object") {
        body[key] = value.clone();
    }
    body
}

#[tokio::test]
async fn every_field_works_or_is_refused_by_name() {
    let c = client();
    for (endpoint, path) in [(Endpoint::Completions, CMPL), (Endpoint::Chat, CHAT)] {
        for field in fields(endpoint) {
            let body = request(endpoint, field.example);
            let streamed = body["stream"] == json!(true);
            match field.support {
                Support::Refused(_) => {
                    let (status, response) = c.post_json(path, &body).await;
                    assert_eq!(status, 400, "{path} {}: {response}", field.name);
                    assert_eq!(response["error"]["param"], field.name, "{path}: {response}");
                }
                Support::Works | Support::Inert(_) if streamed => {
                    let events = c.post_stream(path, &body).await;
                    assert!(events.done, "{path} {}: the stream did not finish", field.name);
                }
                Support::Works | Support::Inert(_) => {
                    let (status, response) = c.post_json(path, &body).await;
                    assert_eq!(status, 200, "{path} {}: {response}", field.name);
                    assert!(!response["choices"].as_array().expect("choices").is_empty());
                }
            }
        }
    }
}

/// The token ids /tokenize gives for `body`.
async fn tokenize(c: &Client, body: Value) -> Vec<u64> {
    let (status, response) = c.post_json("/tokenize", &body).await;
    assert_eq!(status, 200, "{response}");
    let tokens: Vec<u64> =
        response["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    assert_eq!(response["count"], tokens.len());
    assert_eq!(response["max_model_len"], 512);
    tokens
}

#[tokio::test]
async fn truncate_prompt_tokens_keeps_the_last_tokens() {
    let c = client();
    let prompt = "one two three four five six seven eight nine ten";
    let all = tokenize(&c, json!({"prompt": prompt})).await;
    let (status, r) = c
        .post_json(
            CMPL,
            &json!({"prompt": prompt, "max_tokens": 1, "truncate_prompt_tokens": 3, "echo": true}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], 3);
    // Echo shows what the model saw: the last three tokens.
    let (_, kept) = c.post_json("/detokenize", &json!({"tokens": all[all.len() - 3..]})).await;
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(kept["prompt"].as_str().unwrap()), "{text:?} vs {kept}");
    // Chat truncates the rendered conversation the same way.
    let (status, r) = c
        .post_json(
            CHAT,
            &json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "truncate_prompt_tokens": 5}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], 5);
    // A prompt longer than the context is fine when truncated into it.
    let long = "word ".repeat(2000);
    let (status, r) =
        c.post_json(CMPL, &json!({"prompt": long, "max_tokens": 1, "truncate_prompt_tokens": 100})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], 100);
    let (status, r) = c.post_json(CMPL, &json!({"prompt": "x", "truncate_prompt_tokens": 513})).await;
    assert_eq!((status, r["error"]["param"].as_str()), (400, Some("truncate_prompt_tokens")), "{r}");
}

#[tokio::test]
async fn a_client_request_id_names_the_response() {
    let c = client();
    let (status, r) =
        c.post_json(CMPL, &request(Endpoint::Completions, r#"{"request_id": "abc-123"}"#)).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["id"], "cmpl-abc-123");
    let (_, r) = c.post_json(CHAT, &request(Endpoint::Chat, r#"{"request_id": "abc-123"}"#)).await;
    assert_eq!(r["id"], "chatcmpl-abc-123");
    let (status, r) = c.post_json(CMPL, &request(Endpoint::Completions, r#"{"request_id": ""}"#)).await;
    assert_eq!((status, r["error"]["param"].as_str()), (400, Some("request_id")), "{r}");
}

#[tokio::test]
async fn tokens_can_be_named_by_id_in_logprobs() {
    let c = client();
    let body = request(Endpoint::Completions, r#"{"logprobs": 2, "return_tokens_as_token_ids": true}"#);
    let (status, r) = c.post_json(CMPL, &body).await;
    assert_eq!(status, 200, "{r}");
    let logprobs = &r["choices"][0]["logprobs"];
    let is_id = |t: &str| t.strip_prefix("token_id:").is_some_and(|n| n.parse::<u32>().is_ok());
    for token in logprobs["tokens"].as_array().unwrap() {
        assert!(is_id(token.as_str().unwrap()), "{logprobs}");
    }
    for top in logprobs["top_logprobs"].as_array().unwrap() {
        assert!(top.as_object().unwrap().keys().all(|k| is_id(k)), "{logprobs}");
    }
    let body = request(
        Endpoint::Chat,
        r#"{"logprobs": true, "top_logprobs": 1, "return_tokens_as_token_ids": true}"#,
    );
    let (_, r) = c.post_json(CHAT, &body).await;
    for entry in r["choices"][0]["logprobs"]["content"].as_array().unwrap() {
        assert!(is_id(entry["token"].as_str().unwrap()), "{entry}");
    }
}

#[tokio::test]
async fn continuous_usage_stats_put_counts_in_every_chunk() {
    let c = client();
    for (endpoint, path) in [(Endpoint::Completions, CMPL), (Endpoint::Chat, CHAT)] {
        let body = request(
            endpoint,
            r#"{"max_tokens": 4, "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true, "continuous_usage_stats": true}}"#,
        );
        let events = c.post_stream(path, &body).await;
        let mut last_completion_tokens = 0;
        for event in &events.events {
            let usage = &event["usage"];
            assert!(usage.is_object(), "{path}: a chunk without counts: {event}");
            let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
            assert!(completion_tokens >= last_completion_tokens, "{path}: counts went back: {event}");
            assert_eq!(usage["total_tokens"], usage["prompt_tokens"].as_u64().unwrap() + completion_tokens);
            last_completion_tokens = completion_tokens;
        }
        assert_eq!(last_completion_tokens, 4, "{path}");
    }
}

#[tokio::test]
async fn continue_final_message_leaves_the_assistant_turn_open() {
    let c = client();
    let messages = json!([
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"}
    ]);
    let open = tokenize(&c, json!({"messages": messages, "continue_final_message": true})).await;
    let closed = tokenize(&c, json!({"messages": messages, "add_generation_prompt": false})).await;
    // The closed rendering is the open one plus the end of the turn.
    assert!(closed.len() > open.len() && closed.starts_with(&open), "{open:?} vs {closed:?}");
    let (_, text) = c.post_json("/detokenize", &json!({"tokens": open})).await;
    assert!(text["prompt"].as_str().unwrap().ends_with("The capital of France is"), "{text}");
    let (status, r) = c
        .post_json(
            CHAT,
            &json!({"messages": messages, "continue_final_message": true, "max_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], open.len());
    // Continuing and opening a new turn at once is a contradiction.
    let body = json!({"messages": messages, "continue_final_message": true, "add_generation_prompt": true});
    let (status, r) = c.post_json(CHAT, &body).await;
    assert_eq!((status, r["error"]["param"].as_str()), (400, Some("continue_final_message")), "{r}");
}

#[tokio::test]
async fn a_request_template_and_documents_render_the_prompt() {
    let c = client();
    let template = "{% for d in documents %}[{{ d.text }}]{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}";
    let body = json!({
        "messages": [{"role": "user", "content": "Question?"}],
        "chat_template": template,
        "documents": [{"title": "a", "text": "Paris is in France."}],
        "max_tokens": 1,
    });
    let expected =
        tokenize(&c, json!({"prompt": "[Paris is in France.]Question?", "add_special_tokens": false})).await;
    let mut tokenize_body = body.clone();
    tokenize_body.as_object_mut().unwrap().remove("max_tokens");
    assert_eq!(tokenize(&c, tokenize_body).await, expected);
    let (status, r) = c.post_json(CHAT, &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], expected.len());
    let (status, r) = c
        .post_json(
            CHAT,
            &json!({"messages": [{"role": "user", "content": "x"}], "chat_template": "{% if %}"}),
        )
        .await;
    assert_eq!((status, r["error"]["param"].as_str()), (400, Some("chat_template")), "{r}");
}

#[tokio::test]
async fn tool_choice_auto_needs_the_server_flags_and_the_others_work() {
    // This server runs without --enable-auto-tool-choice: "auto" (also `tools` without
    // `tool_choice`) is refused by name, as vLLM does; required, named and none work.
    let c = client();
    let tools =
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    for choice in [json!(null), json!("auto")] {
        let mut body = request(Endpoint::Chat, "{}");
        body["tools"] = tools.clone();
        if !choice.is_null() {
            body["tool_choice"] = choice.clone();
        }
        let (status, r) = c.post_json(CHAT, &body).await;
        assert_eq!((status, r["error"]["param"].as_str()), (400, Some("tool_choice")), "{choice}: {r}");
    }
    for choice in
        [json!("none"), json!("required"), json!({"type": "function", "function": {"name": "get_weather"}})]
    {
        let mut body = request(Endpoint::Chat, "{}");
        body["tools"] = tools.clone();
        body["tool_choice"] = choice.clone();
        let (status, r) = c.post_json(CHAT, &body).await;
        assert_eq!(status, 200, "{choice}: {r}");
    }
}

#[tokio::test]
async fn tokenize_and_detokenize_round_trip() {
    let c = client();
    let text = "Hello, paged attention!";
    let ids = tokenize(&c, json!({"prompt": text})).await;
    let (status, r) = c.post_json("/detokenize", &json!({"tokens": ids, "model": MODEL_NAME})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["prompt"], text);
    let (_, r) = c.post_json("/tokenize", &json!({"prompt": text, "return_token_strs": true})).await;
    assert_eq!(r["token_strs"].as_array().unwrap().len(), ids.len());
    // The chat form tokenizes what /v1/chat/completions runs.
    let messages = json!([{"role": "user", "content": "Say hi."}]);
    let chat_ids = tokenize(&c, json!({"messages": messages})).await;
    let (_, r) = c.post_json(CHAT, &json!({"messages": messages, "max_tokens": 1})).await;
    assert_eq!(r["usage"]["prompt_tokens"], chat_ids.len());
    let bad = [
        (json!({"tokens": [99999999]}), "/detokenize", "tokens[0]"),
        (json!({"prompt": "x", "messages": messages}), "/tokenize", "prompt"),
        (json!({}), "/tokenize", "prompt"),
        (json!({"prompt": "x", "model": "other"}), "/tokenize", "model"),
    ];
    for (body, path, param) in bad {
        let (status, r) = c.post_json(path, &body).await;
        assert!(status == 400 || status == 404, "{path} {body}: {r}");
        assert_eq!(r["error"]["param"], param, "{path} {body}: {r}");
    }
}

#[tokio::test]
async fn the_server_chat_template_replaces_the_models() {
    static PLAIN: OnceLock<TestServer> = OnceLock::new();
    let c = PLAIN
        .get_or_init(|| {
            TestServer::start(ServerArgs {
                chat_template: Some(
                    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}".into(),
                ),
                ..ServerArgs::default()
            })
        })
        .client();
    let ids = tokenize(&c, json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    let (_, r) = c.post_json("/detokenize", &json!({"tokens": ids})).await;
    assert_eq!(r["prompt"], "<user>hi");
    // This server does not trust request templates.
    let body = json!({"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"});
    let (status, r) = c.post_json(CHAT, &body).await;
    assert_eq!((status, r["error"]["param"].as_str()), (400, Some("chat_template")), "{r}");
}

/// A CORS preflight from `origin` for a chat request; the response's
/// allow-origin header, if any.
async fn preflight(c: &Client, origin: &str) -> (u16, Option<String>) {
    let response = c
        .http
        .request(reqwest::Method::OPTIONS, c.url(CHAT))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type")
        .send()
        .await
        .expect("preflight sent");
    let allowed =
        response.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string());
    (response.status().as_u16(), allowed)
}

#[tokio::test]
async fn browsers_may_call_the_api_from_the_allowed_origins() {
    // By default any origin (vLLM's default), preflights answered without the API key.
    let c = client();
    assert_eq!(preflight(&c, "http://ui.example").await, (200, Some("*".into())));
    let response =
        c.post(CMPL).header("origin", "http://ui.example").json(&request(Endpoint::Completions, "{}"));
    let response = response.send().await.unwrap();
    assert_eq!(response.headers().get("access-control-allow-origin").unwrap(), "*");

    static LISTED: OnceLock<TestServer> = OnceLock::new();
    let c = LISTED
        .get_or_init(|| {
            TestServer::start(ServerArgs {
                api_key: Some("cors-key".into()),
                allowed_origins: pagoda_server::JsonList(vec!["http://ui.example".into()]),
                ..ServerArgs::default()
            })
        })
        .client();
    assert_eq!(preflight(&c, "http://ui.example").await, (200, Some("http://ui.example".into())));
    assert_eq!(preflight(&c, "http://other.example").await.1, None);
    // An error (here a missing API key) carries the header too, so the page can read it.
    let response =
        c.http.post(c.url(CMPL)).header("origin", "http://ui.example").json(&json!({})).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(response.headers().get("access-control-allow-origin").unwrap(), "http://ui.example");
}

/// The greedy first token of `prompt` under `extra` fields, by id.
async fn first_token(c: &Client, extra: Value) -> u32 {
    let mut body = json!({"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0,
                          "logprobs": 0, "return_tokens_as_token_ids": true});
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    let (status, r) = c.post_json(CMPL, &body).await;
    assert_eq!(status, 200, "{r}");
    let token = r["choices"][0]["logprobs"]["tokens"][0].as_str().unwrap();
    token.strip_prefix("token_id:").unwrap().parse().unwrap()
}

#[tokio::test]
async fn logit_bias_allowed_tokens_and_bad_words_steer_the_choice() {
    let c = client();
    let greedy = first_token(&c, json!({})).await;
    let other = if greedy == 1000 { 1001 } else { 1000 };
    // A bias of +100 makes any token win; -100 makes the greedy one lose.
    assert_eq!(first_token(&c, json!({"logit_bias": {other.to_string(): 100}})).await, other);
    assert_ne!(first_token(&c, json!({"logit_bias": {greedy.to_string(): -100}})).await, greedy);
    let allowed = first_token(&c, json!({"allowed_token_ids": [other, other + 1]})).await;
    assert!(allowed == other || allowed == other + 1, "{allowed}");
    // Banning the greedy token's word (as text) changes the choice.
    let (_, word) = c.post_json("/detokenize", &json!({"tokens": [greedy]})).await;
    let word = word["prompt"].as_str().unwrap().trim().to_string();
    assert!(!word.is_empty());
    assert_ne!(first_token(&c, json!({"bad_words": [word]})).await, greedy);
}

#[tokio::test]
async fn requests_share_cached_prefixes_only_within_a_cache_salt() {
    // A server of its own: the prefix-cache counters see this test's requests alone.
    static SALTED: OnceLock<TestServer> = OnceLock::new();
    let c = SALTED.get_or_init(|| TestServer::start(ServerArgs::default())).client();
    let prompt = "A long shared system prompt that fills several KV blocks of sixteen tokens each, \
                  so that a second request can find them in the prefix cache. "
        .repeat(2);
    let hits = || async { server_support::metric(&c.metrics().await, "pagoda:prefix_cache_hits_total", "") };
    let run = |salt: Option<&str>| {
        let mut body = json!({"prompt": prompt, "max_tokens": 1});
        if let Some(salt) = salt {
            body["cache_salt"] = json!(salt);
        }
        let c = c.clone();
        async move {
            let (status, r) = c.post_json(CMPL, &body).await;
            assert_eq!(status, 200, "{r}");
        }
    };
    run(Some("tenant-a")).await;
    let before = hits().await;
    run(Some("tenant-b")).await;
    run(None).await;
    assert_eq!(hits().await, before, "another salt, or none, found tenant-a's blocks");
    run(Some("tenant-a")).await;
    assert!(hits().await > before, "the same salt shares its prefix");
    let (status, r) = c.post_json(CMPL, &json!({"prompt": "x", "cache_salt": ""})).await;
    assert_eq!((status, r["error"]["param"].as_str()), (400, Some("cache_salt")), "{r}");
}

#[tokio::test]
async fn chat_echo_starts_the_reply_with_the_last_message_of_its_role() {
    let c = client();
    let continued = json!({
        "messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite colour is"}],
        "continue_final_message": true, "echo": true, "max_tokens": 4, "temperature": 0
    });
    let (status, r) = c.post_json(CHAT, &continued).await;
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    let mut plain = continued.clone();
    plain["echo"] = json!(false);
    let (_, p) = c.post_json(CHAT, &plain).await;
    let generated = p["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(text, format!("My favourite colour is{generated}"), "{r}");
    // Streamed: the first chunk carries the echoed text.
    let mut streamed = continued.clone();
    streamed["stream"] = json!(true);
    let events = c.post_stream(CHAT, &streamed).await;
    let joined: String =
        events.events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(joined, text);
    // A reply to a user message (generation prompt added) echoes nothing: the roles differ.
    let asked = json!({"messages": [{"role": "user", "content": "hi"}], "echo": true, "max_tokens": 3, "temperature": 0});
    let (_, r) = c.post_json(CHAT, &asked).await;
    let mut no_echo = asked.clone();
    no_echo["echo"] = json!(false);
    let (_, p) = c.post_json(CHAT, &no_echo).await;
    assert_eq!(r["choices"][0]["message"]["content"], p["choices"][0]["message"]["content"]);
}
