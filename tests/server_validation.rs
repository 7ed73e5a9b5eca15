//! Request validation and the request layer's defences, over HTTP against
//! the real server on the CPU backend: every malformed field is a 400 that
//! names it, API keys, and prompts too big to tokenize on the async workers.

mod server_support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pagoda_server::ServerArgs;
use serde_json::{json, Value};
use server_support::{Client, TestServer};

const API_KEY: &str = "validation-key";

static SERVER: OnceLock<TestServer> = OnceLock::new();

fn client() -> Client {
    SERVER
        .get_or_init(|| {
            TestServer::start(ServerArgs { api_key: Some(API_KEY.into()), ..ServerArgs::default() })
        })
        .client()
}

fn chat(mut extra: Value) -> Value {
    extra["messages"] = json!([{"role": "user", "content": "hi"}]);
    extra
}

fn weather_tool() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
}

#[tokio::test]
async fn every_malformed_field_is_a_400_naming_it() {
    let c = client();
    let cmpl = "/v1/completions";
    let chat_path = "/v1/chat/completions";
    let prompt = |extra: Value| {
        let mut body = extra;
        body["prompt"] = json!("hi");
        body
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (cmpl, prompt(json!({"best_of": "NaN"})), "best_of"),
        (cmpl, prompt(json!({"best_of": 1.5})), "best_of"),
        (cmpl, prompt(json!({"best_of": 2, "stream": true})), "best_of"),
        (cmpl, prompt(json!({"n": 2, "best_of": 1})), "best_of"),
        (cmpl, prompt(json!({"best_of": 0})), "best_of"),
        (cmpl, prompt(json!({"user": 5})), "user"),
        (cmpl, prompt(json!({"stream_options": {"include_usage": true}})), "stream_options"),
        (cmpl, prompt(json!({"stream": true, "stream_options": {"include_usage": "yes"}})), "stream_options"),
        (cmpl, prompt(json!({"max_tokens": null, "min_tokens": 100000})), "min_tokens"),
        (cmpl, prompt(json!({"seed": "x"})), "seed"),
        (cmpl, prompt(json!({"priority": 1.5})), "priority"),
        (cmpl, prompt(json!({"stop_token_ids": [-1]})), "stop_token_ids"),
        (cmpl, prompt(json!({"stop_token_ids": [999999]})), "stop_token_ids"),
        (cmpl, prompt(json!({"logit_bias": {"x": 10}})), "logit_bias"),
        (cmpl, prompt(json!({"logit_bias": {"5": 101}})), "logit_bias"),
        (cmpl, prompt(json!({"allowed_token_ids": []})), "allowed_token_ids"),
        (cmpl, prompt(json!({"allowed_token_ids": [99999999]})), "allowed_token_ids"),
        (cmpl, prompt(json!({"bad_words": [""]})), "bad_words"),
        (cmpl, prompt(json!({"echo": "yes"})), "echo"),
        (cmpl, prompt(json!({"ignore_eos": 1})), "ignore_eos"),
        (cmpl, prompt(json!({"top_k": 1.5})), "top_k"),
        (cmpl, prompt(json!({"min_p": 2})), "min_p"),
        (cmpl, prompt(json!({"frequency_penalty": -3})), "frequency_penalty"),
        (cmpl, prompt(json!({"repetition_penalty": 0})), "repetition_penalty"),
        (cmpl, prompt(json!({"temperature": 1e39})), "temperature"),
        (cmpl, prompt(json!({"max_tokens": 0})), "max_tokens"),
        (cmpl, prompt(json!({"n": 0})), "n"),
        (cmpl, prompt(json!({"logprobs": true})), "logprobs"),
        (cmpl, prompt(json!({"suffix": 5})), "suffix"),
        (cmpl, prompt(json!({"model": 5})), "model"),
        (cmpl, prompt(json!({"skip_special_tokens": "no"})), "skip_special_tokens"),
        (cmpl, prompt(json!({"include_stop_str_in_output": 0})), "include_stop_str_in_output"),
        (chat_path, chat(json!({"tool_choice": "sometimes", "tools": weather_tool()})), "tool_choice"),
        (chat_path, chat(json!({"tool_choice": 3})), "tool_choice"),
        (
            chat_path,
            chat(json!({"tool_choice": {"type": "function"}, "tools": weather_tool()})),
            "tool_choice",
        ),
        (
            chat_path,
            chat(
                json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": weather_tool()}),
            ),
            "tool_choice",
        ),
        (chat_path, chat(json!({"tool_choice": "required"})), "tool_choice"),
        (chat_path, chat(json!({"tools": "x"})), "tools"),
        (
            chat_path,
            chat(json!({"tools": [{"type": "retrieval", "function": {"name": "f"}}]})),
            "tools[0].type",
        ),
        (
            chat_path,
            chat(json!({"tools": [{"type": "function", "function": {"name": 5}}]})),
            "tools[0].function.name",
        ),
        (chat_path, chat(json!({"tools": [{"type": "function", "function": {}}]})), "tools[0].function.name"),
        (
            chat_path,
            chat(json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]})),
            "tools[0].function.parameters",
        ),
        (chat_path, json!({"messages": [{"role": "user", "content": "hi", "name": 5}]}), "messages[0].name"),
        (chat_path, json!({"messages": [{"role": 5, "content": "hi"}]}), "messages[0].role"),
        (chat_path, json!({"messages": [{"role": "", "content": "hi"}]}), "messages[0].role"),
        (chat_path, json!({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
        (
            chat_path,
            json!({"messages": [{"role": "assistant", "content": null,
                   "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (chat_path, chat(json!({"response_format": {"type": "xml"}})), "response_format.type"),
        (chat_path, chat(json!({"response_format": "text"})), "response_format"),
        (chat_path, chat(json!({"top_logprobs": 5})), "top_logprobs"),
        (chat_path, chat(json!({"logprobs": "yes"})), "logprobs"),
        (chat_path, chat(json!({"add_generation_prompt": "yes"})), "add_generation_prompt"),
        (chat_path, chat(json!({"chat_template_kwargs": []})), "chat_template_kwargs"),
        (chat_path, chat(json!({"max_completion_tokens": -1})), "max_completion_tokens"),
        (chat_path, chat(json!({"best_of": "NaN"})), "best_of"),
        (chat_path, chat(json!({"best_of": 2})), "best_of"),
        (cmpl, prompt(json!({"prompt_logprobs": -1})), "prompt_logprobs"),
        (cmpl, prompt(json!({"prompt_logprobs": 21})), "prompt_logprobs"),
        // This server does not run templates sent with requests.
        (chat_path, chat(json!({"chat_template": "{{ messages[0].content }}"})), "chat_template"),
        (cmpl, prompt(json!({"truncate_prompt_tokens": 0})), "truncate_prompt_tokens"),
        (cmpl, prompt(json!({"request_id": 5})), "request_id"),
        (cmpl, prompt(json!({"add_special_tokens": "no"})), "add_special_tokens"),
        (chat_path, chat(json!({"continue_final_message": 1})), "continue_final_message"),
        (chat_path, chat(json!({"documents": "x"})), "documents"),
    ];
    for (path, body, param) in &cases {
        let (status, response) = c.post_json(path, body).await;
        assert_eq!(status, 400, "{path} {body}: {response}");
        let error = &response["error"];
        assert_eq!(error["type"], "invalid_request_error", "{body}: {response}");
        let got = error["param"].as_str().unwrap_or_else(|| panic!("no param for {body}: {response}"));
        let names_it =
            got == *param || got.starts_with(&format!("{param}[")) || got.starts_with(&format!("{param}."));
        assert!(names_it, "{path} {body}: param {got}, expected {param}: {response}");
        assert!(!error["message"].as_str().unwrap_or("").is_empty(), "{response}");
    }
}

#[tokio::test]
async fn well_formed_tools_best_of_and_stream_options_are_accepted() {
    let c = client();
    // Tool calls are refused until they parse (tests/server_fields.rs); "none" shows the tools.
    let body = chat(json!({"max_tokens": 1, "tools": weather_tool(), "tool_choice": "none"}));
    let (status, response) = c.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    let body = json!({"prompt": "hi", "max_tokens": 1, "n": 2, "best_of": 2, "user": "u1"});
    let (status, response) = c.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["choices"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn a_401_names_the_bearer_scheme_which_is_case_insensitive() {
    let c = client();
    for key in [None, Some("wrong")] {
        let mut request = c.http.get(c.url("/v1/models"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401);
        let challenge = response.headers().get("www-authenticate").and_then(|v| v.to_str().ok());
        assert_eq!(challenge, Some("Bearer"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
    let response = c
        .http
        .get(c.url("/v1/models"))
        .header("authorization", format!("bearer {API_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

/// A text prompt whose byte length alone proves it cannot fit the context
/// (512 tokens here) is refused at once, without tokenizing 24 MB.
#[tokio::test]
async fn a_prompt_too_long_by_its_bytes_is_refused_before_tokenizing() {
    let c = client();
    let huge = "hello world ".repeat(2 << 20);
    let started = Instant::now();
    let (status, response) = c.post_json("/v1/completions", &json!({"prompt": huge, "max_tokens": 1})).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 400, "{response}");
    assert_eq!(response["error"]["param"], "prompt");
    let message = response["error"]["message"].as_str().unwrap();
    assert!(message.contains("bytes") && message.contains("512 tokens"), "{message}");
    // Tokenizing 24 MB takes several seconds; refusing it, far less.
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");

    let huge_chat = json!({"messages": [{"role": "user", "content": "hello world ".repeat(2 << 20)}]});
    let (status, response) = c.post_json("/v1/chat/completions", &huge_chat).await;
    assert_eq!(status, 400, "{response}");
    assert_eq!(response["error"]["param"], "messages");
    assert!(response["error"]["message"].as_str().unwrap().contains("bytes"), "{response}");
}

/// Requests whose prompts take seconds to tokenize (thousands of prompts that
/// each fit the context) do not hold the async workers: /health answers at
/// once while they are being tokenized.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_answers_while_big_prompts_are_tokenized() {
    let c = client();
    // Made-up words (no tokenizer cache helps), ~100 per prompt: a few
    // hundred tokens each, under the 512-token context; ~14 MB per request,
    // seconds of tokenization even on a quiet machine.
    let word = |i: u64| {
        let mut x = i.wrapping_mul(2_654_435_761) % 308_915_776;
        (0..6)
            .map(|_| {
                let c = (b'a' + (x % 26) as u8) as char;
                x /= 26;
                c
            })
            .collect::<String>()
    };
    let prompts: Vec<String> =
        (0..20_000u64).map(|p| (0..100).map(|w| word(p * 100 + w)).collect::<Vec<_>>().join(" ")).collect();
    let body = json!({"prompt": prompts, "max_tokens": 1});
    let hostile: Vec<_> = (0..4)
        .map(|_| {
            let (c, body) = (c.clone(), body.clone());
            tokio::spawn(async move { c.post_json("/v1/completions", &body).await })
        })
        .collect();
    // Let the bodies arrive and tokenization start.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        let started = Instant::now();
        let health = c.http.get(c.url("/health")).send().await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(health.status().as_u16(), 200);
        assert!(elapsed < Duration::from_secs(2), "/health took {elapsed:?} while prompts were tokenized");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The clients leave; their tokenization stops at the next prompt.
    let unfinished = hostile.iter().filter(|task| !task.is_finished()).count();
    assert!(unfinished > 0, "the load was too light to test anything");
    for task in &hostile {
        task.abort();
    }
}
