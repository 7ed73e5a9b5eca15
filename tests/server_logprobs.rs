//! Prompt logprobs, echo with logprobs, best_of, --max-logprobs and
//! --root-path over HTTP, against the real server serving the real default
//! model on the CPU backend (one server, with `--max-logprobs 5` and
//! `--root-path /proxy`, shared by the tests of this file).

mod server_support;

use std::sync::OnceLock;

use pagoda_server::ServerArgs;
use serde_json::{json, Value};
use server_support::{Client, TestServer};

static SERVER: OnceLock<TestServer> = OnceLock::new();

fn client() -> Client {
    SERVER
        .get_or_init(|| {
            TestServer::start(ServerArgs {
                max_logprobs: 5,
                root_path: Some("/proxy".into()),
                ..ServerArgs::default()
            })
        })
        .client()
}

fn greedy(mut body: Value) -> Value {
    body["temperature"] = json!(0.0);
    body["repetition_penalty"] = json!(1.0);
    body
}

fn param(response: &Value) -> &str {
    response["error"]["param"].as_str().unwrap_or_default()
}

const PROMPT: &str = "The capital of France is";

/// lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens 0.
#[tokio::test]
async fn echo_with_logprobs_and_no_tokens_returns_the_prompt_and_its_logprobs() {
    let c = client();
    let body = greedy(json!({"prompt": PROMPT, "max_tokens": 0, "echo": true, "logprobs": 2}));
    let (status, response) = c.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    let choice = &response["choices"][0];
    assert_eq!(choice["text"], PROMPT);
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let num_prompt = response["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(tokens.len(), num_prompt, "only the prompt's tokens");
    assert_eq!(tokens.concat(), PROMPT);
    assert_eq!(response["usage"]["completion_tokens"], 0);
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    let mut offset = 0;
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(lp["text_offset"][i], offset);
        offset += token.chars().count();
        if i == 0 {
            continue;
        }
        let logprob = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(logprob < 0.0, "{logprob}");
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!((2..=3).contains(&top.len()), "{top:?}");
        assert!(top.contains_key(*token));
    }

    // The same numbers as vLLM's prompt_logprobs, and with tokens generated after them.
    let mut body = body.clone();
    body["max_tokens"] = json!(2);
    body["ignore_eos"] = json!(true);
    body["prompt_logprobs"] = json!(1);
    let (status, response) = c.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    let choice = &response["choices"][0];
    let tokens = choice["logprobs"]["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), num_prompt + 2);
    let text: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(choice["text"].as_str().unwrap(), text);
    let prompt_logprobs = choice["prompt_logprobs"].as_array().unwrap();
    assert_eq!(prompt_logprobs.len(), num_prompt);
    assert!(prompt_logprobs[0].is_null());
    for (i, entry) in prompt_logprobs.iter().enumerate().skip(1) {
        let entry = entry.as_object().unwrap();
        assert!((1..=2).contains(&entry.len()), "the token and its top 1: {entry:?}");
        let (_, first) = entry.iter().next().unwrap();
        assert_eq!(first["decoded_token"], tokens[i], "the prompt token comes first");
        assert!(first["rank"].as_u64().unwrap() >= 1);
        let echoed = choice["logprobs"]["token_logprobs"][i].as_f64().unwrap();
        assert!((first["logprob"].as_f64().unwrap() - echoed).abs() < 1e-6);
    }
}

#[tokio::test]
async fn prompt_logprobs_on_chat_and_refused_with_stream() {
    let c = client();
    let body = greedy(json!({
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "prompt_logprobs": 2
    }));
    let (status, response) = c.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    let entries = response["prompt_logprobs"].as_array().expect("prompt_logprobs on the response");
    assert_eq!(entries.len() as u64, response["usage"]["prompt_tokens"].as_u64().unwrap());
    assert!(entries[0].is_null() && entries[1..].iter().all(Value::is_object));

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, response) = c.post_json("/v1/chat/completions", &streamed).await;
    assert_eq!((status, param(&response)), (400, "prompt_logprobs"), "{response}");
    let completion = json!({"prompt": PROMPT, "prompt_logprobs": 1, "stream": true});
    let (status, response) = c.post_json("/v1/completions", &completion).await;
    assert_eq!((status, param(&response)), (400, "prompt_logprobs"), "{response}");
}

#[tokio::test]
async fn best_of_returns_the_n_most_likely_samples() {
    let c = client();
    let body =
        json!({"prompt": PROMPT, "max_tokens": 4, "best_of": 3, "n": 1, "temperature": 1.0, "seed": 5});
    let (status, response) = c.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    let choices = response["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert!(choices[0]["logprobs"].is_null(), "not asked for");

    // The one returned is the most likely of the three: compare with n = 3.
    let mut all = body.clone();
    all["n"] = json!(3);
    all["logprobs"] = json!(0);
    let mut best = body.clone();
    best["logprobs"] = json!(0);
    let (_, every) = c.post_json("/v1/completions", &all).await;
    let (_, picked) = c.post_json("/v1/completions", &best).await;
    let total = |choice: &Value| -> f64 {
        choice["logprobs"]["token_logprobs"].as_array().unwrap().iter().map(|l| l.as_f64().unwrap()).sum()
    };
    let best_total = every["choices"].as_array().unwrap().iter().map(total).fold(f64::MIN, f64::max);
    assert!((total(&picked["choices"][0]) - best_total).abs() < 1e-4, "{every} {picked}");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, response) = c.post_json("/v1/completions", &streamed).await;
    assert_eq!((status, param(&response)), (400, "best_of"), "{response}");
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "best_of": 2});
    let (status, response) = c.post_json("/v1/chat/completions", &chat).await;
    assert_eq!((status, param(&response)), (400, "best_of"), "{response}");
}

#[tokio::test]
async fn max_logprobs_refuses_more_by_name() {
    let c = client();
    let cases = [
        ("/v1/completions", json!({"prompt": PROMPT, "logprobs": 6}), "logprobs"),
        ("/v1/completions", json!({"prompt": PROMPT, "prompt_logprobs": 6}), "prompt_logprobs"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 6}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "prompt_logprobs": 6}),
            "prompt_logprobs",
        ),
    ];
    for (path, body, field) in cases {
        let (status, response) = c.post_json(path, &body).await;
        assert_eq!((status, param(&response)), (400, field), "{response}");
        assert!(response["error"]["message"].as_str().unwrap().contains("max-logprobs"), "{response}");
    }
    let (status, response) =
        c.post_json("/v1/completions", &json!({"prompt": PROMPT, "logprobs": 5, "max_tokens": 1})).await;
    assert_eq!(status, 200, "{response}");
}

#[tokio::test]
async fn root_path_serves_under_the_prefix_and_at_the_root() {
    let c = client();
    for path in ["/v1/completions", "/proxy/v1/completions"] {
        let (status, response) = c.post_json(path, &json!({"prompt": PROMPT, "max_tokens": 1})).await;
        assert_eq!(status, 200, "{path}: {response}");
    }
    for path in ["/v1/models", "/proxy/v1/models", "/proxy/health"] {
        let status = c.get(path).send().await.unwrap().status().as_u16();
        assert_eq!(status, 200, "{path}");
    }
    let status = c.get("/elsewhere/v1/models").send().await.unwrap().status().as_u16();
    assert_eq!(status, 404);
}
