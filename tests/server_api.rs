//! The OpenAI-compatible API over HTTP, against the real server serving the
//! real default model on the CPU backend. One server (with an API key) is
//! shared by every test in this file.

mod server_support;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{load_engine, GenerationRequest, SamplingParams};
use pagoda_server::ServerArgs;
use serde_json::{json, Value};
use server_support::{
    engine_config, metric, model_path, wait_for_metrics, Client, SseReader, TestServer, MODEL_NAME,
};
use tokio::sync::RwLock;

const API_KEY: &str = "test-key";

static SERVER: OnceLock<TestServer> = OnceLock::new();

/// Tests that assert on the engine's global state (blocks in use, abort
/// counts) hold this exclusively; every other test holds it shared.
static ENGINE_STATE: RwLock<()> = RwLock::const_new(());

fn client() -> Client {
    SERVER
        .get_or_init(|| {
            TestServer::start(ServerArgs { api_key: Some(API_KEY.into()), ..ServerArgs::default() })
        })
        .client()
}

fn server() -> &'static TestServer {
    client();
    SERVER.get().expect("started")
}

/// `body` with greedy decoding (and no penalty the model's defaults might add).
fn greedy(mut body: Value) -> Value {
    body["temperature"] = json!(0.0);
    body["repetition_penalty"] = json!(1.0);
    body
}

fn choices_by_index(response: &Value) -> BTreeMap<u64, Value> {
    response["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| (c["index"].as_u64().unwrap(), c.clone()))
        .collect()
}

/// Per-choice text of a streamed completion (or chat, with `field` = delta content).
fn streamed_texts(events: &[Value], chat: bool) -> BTreeMap<u64, String> {
    let mut texts: BTreeMap<u64, String> = BTreeMap::new();
    for event in events {
        for choice in event["choices"].as_array().expect("choices") {
            let piece = if chat { choice["delta"]["content"].as_str() } else { choice["text"].as_str() };
            texts.entry(choice["index"].as_u64().unwrap()).or_default().push_str(piece.unwrap_or(""));
        }
    }
    texts
}

fn streamed_finish_reasons(events: &[Value]) -> BTreeMap<u64, String> {
    let mut reasons = BTreeMap::new();
    for event in events {
        for choice in event["choices"].as_array().expect("choices") {
            if let Some(reason) = choice["finish_reason"].as_str() {
                let previous = reasons.insert(choice["index"].as_u64().unwrap(), reason.to_string());
                assert!(previous.is_none(), "two finish reasons for one choice: {events:?}");
            }
        }
    }
    reasons
}

#[tokio::test]
async fn health_version_models_and_api_key() {
    let _shared = ENGINE_STATE.read().await;
    let c = client();
    let anonymous = Client { api_key: None, ..c.clone() };
    let wrong = Client { api_key: Some("wrong".into()), ..c.clone() };

    let health = anonymous.http.get(c.url("/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let version: Value = anonymous.http.get(c.url("/version")).send().await.unwrap().json().await.unwrap();
    assert_eq!(version, json!({"version": "0.0.0-test", "git_rev": "test-rev"}));
    assert!(anonymous.metrics().await.contains("pagoda:kv_cache_blocks_total"));

    for client in [&anonymous, &wrong] {
        let response = client.get("/v1/models").send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key");
        let (status, body) =
            client.post_json("/v1/completions", &json!({"prompt": "hi", "max_tokens": 1})).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    let models: Value = c.get("/v1/models").send().await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL_NAME);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["max_model_len"], 512);
}

#[tokio::test]
async fn greedy_completion_equals_offline_generate() {
    let _shared = ENGINE_STATE.read().await;
    let c = client();
    let prompt = "The capital of France is";
    let max_tokens = 12;

    // The same prompt through `LlmEngine::generate`, on an engine of its own.
    let (reference, prompt_ids) = tokio::task::spawn_blocking(move || {
        let mut engine = load_engine(CpuBackend::new(), model_path(), engine_config(), |_, _| {}).unwrap();
        let ids = engine.tokenizer().encode(prompt, true).unwrap();
        let mut request = GenerationRequest::new("reference", ids.clone());
        request.sampling = SamplingParams::greedy();
        request.max_tokens = Some(max_tokens);
        (engine.generate(vec![request]).unwrap().remove(0), ids)
    })
    .await
    .unwrap();
    let expected = &reference.seqs[0];
    let expected_finish = expected.finish_reason.unwrap().as_str();
    assert!(!expected.text.is_empty());

    let body = greedy(json!({"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens}));
    let (status, response) = c.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["object"], "text_completion");
    assert_eq!(response["model"], MODEL_NAME);
    assert!(response["id"].as_str().unwrap().starts_with("cmpl-"));
    let choice = &response["choices"][0];
    assert_eq!(choice["text"], expected.text.as_str());
    assert_eq!(choice["finish_reason"], expected_finish);
    assert_eq!(response["usage"]["prompt_tokens"], prompt_ids.len());
    assert_eq!(response["usage"]["completion_tokens"], expected.token_ids.len());
    assert_eq!(response["usage"]["total_tokens"], prompt_ids.len() + expected.token_ids.len());

    // The prompt as token ids gives the same completion.
    let by_ids = greedy(json!({"prompt": prompt_ids, "max_tokens": max_tokens}));
    let (status, response) = c.post_json("/v1/completions", &by_ids).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["choices"][0]["text"], expected.text.as_str());

    // echo puts the prompt before the completion.
    let mut echo = body.clone();
    echo["echo"] = json!(true);
    let (status, response) = c.post_json("/v1/completions", &echo).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["choices"][0]["text"], format!("{prompt}{}", expected.text));

    // Streamed, the pieces add up to the same text; no usage unless asked.
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let streamed = c.post_stream("/v1/completions", &stream_body).await;
    assert!(streamed.done, "stream ends with [DONE]");
    // One chunk per token, as tokens are produced (clients time tokens by chunks).
    assert_eq!(streamed.events.len(), expected.token_ids.len(), "{:?}", streamed.events);
    assert_eq!(streamed_texts(&streamed.events, false)[&0], expected.text);
    assert_eq!(streamed_finish_reasons(&streamed.events)[&0], expected_finish);
    assert!(streamed.events.iter().all(|e| e.get("usage").is_none()));

    // include_usage: `usage: null` on every chunk, then a last chunk with the counts.
    stream_body["stream_options"] = json!({"include_usage": true});
    let streamed = c.post_stream("/v1/completions", &stream_body).await;
    let (last, rest) = streamed.events.split_last().unwrap();
    assert!(rest.iter().all(|e| e["usage"].is_null() && e.get("usage").is_some()));
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], prompt_ids.len());
    assert_eq!(last["usage"]["completion_tokens"], expected.token_ids.len());
}

#[tokio::test]
async fn chat_streaming_and_non_streaming_agree() {
    let _shared = ENGINE_STATE.read().await;
    let c = client();
    let body = greedy(json!({
        "model": MODEL_NAME,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}
        ],
        "max_completion_tokens": 12
    }));
    let (status, response) = c.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["object"], "chat.completion");
    assert!(response["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &response["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap().to_string();
    assert!(!content.is_empty());
    assert!(content.contains("Paris"), "{content}");
    let finish = choice["finish_reason"].as_str().unwrap().to_string();
    assert!(finish == "stop" || finish == "length");
    let completion_tokens = response["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion_tokens));
    assert!(response["usage"]["prompt_tokens"].as_u64().unwrap() > 10, "the template wraps the messages");

    // Content given as an array of text parts is the same conversation.
    let mut parts = body.clone();
    parts["messages"][1]["content"] = json!([{"type": "text", "text": "What is the capital of France?"}]);
    let (status, by_parts) = c.post_json("/v1/chat/completions", &parts).await;
    assert_eq!(status, 200, "{by_parts}");
    assert_eq!(by_parts["choices"][0]["message"]["content"], content.as_str());

    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let streamed = c.post_stream("/v1/chat/completions", &stream_body).await;
    assert!(streamed.done);
    let first = &streamed.events[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed_texts(&streamed.events, true)[&0], content);
    assert_eq!(streamed_finish_reasons(&streamed.events)[&0], finish);
    let last = streamed.events.last().unwrap();
    assert_eq!(last["usage"]["completion_tokens"], completion_tokens);

    // The legacy max_tokens caps chat too.
    let mut short = body.clone();
    short.as_object_mut().unwrap().remove("max_completion_tokens");
    short["max_tokens"] = json!(2);
    let (status, response) = c.post_json("/v1/chat/completions", &short).await;
    assert_eq!(status, 200, "{response}");
    assert!(response["usage"]["completion_tokens"].as_u64().unwrap() <= 2);
}

#[tokio::test]
async fn n_and_prompt_lists_number_choices_like_vllm() {
    let _shared = ENGINE_STATE.read().await;
    let c = client();
    let prompts = ["Hello, my name is", "The sky is"];
    let mut alone = Vec::new();
    let mut prompt_tokens = 0;
    for prompt in prompts {
        let (status, response) =
            c.post_json("/v1/completions", &greedy(json!({"prompt": prompt, "max_tokens": 5}))).await;
        assert_eq!(status, 200, "{response}");
        alone.push(response["choices"][0]["text"].as_str().unwrap().to_string());
        prompt_tokens += response["usage"]["prompt_tokens"].as_u64().unwrap();
    }

    // Two prompts, n = 2: choice p * n + i is sample i of prompt p.
    let body = greedy(json!({"prompt": prompts, "n": 2, "max_tokens": 5}));
    let (status, response) = c.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    let choices = choices_by_index(&response);
    assert_eq!(choices.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    for (index, choice) in &choices {
        assert_eq!(choice["text"], alone[*index as usize / 2].as_str(), "choice {index}");
    }
    assert_eq!(response["usage"]["prompt_tokens"], prompt_tokens, "each prompt counted once");
    let generated: u64 = 4 * 5;
    assert!(response["usage"]["completion_tokens"].as_u64().unwrap() <= generated);

    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let streamed = c.post_stream("/v1/completions", &stream_body).await;
    let texts = streamed_texts(&streamed.events, false);
    assert_eq!(texts.len(), 4);
    for (index, text) in texts {
        assert_eq!(text, alone[index as usize / 2], "streamed choice {index}");
    }
    assert_eq!(streamed_finish_reasons(&streamed.events).len(), 4);

    // Sampled chat with n = 3: three choices, reproducible with a seed.
    let chat = json!({
        "messages": [{"role": "user", "content": "Tell me a word."}],
        "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 1234
    });
    let (status, first) = c.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{first}");
    let (_, second) = c.post_json("/v1/chat/completions", &chat).await;
    let first = choices_by_index(&first);
    assert_eq!(first.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
    for (index, choice) in choices_by_index(&second) {
        assert_eq!(
            choice["message"]["content"], first[&index]["message"]["content"],
            "seeded choice {index}"
        );
    }
}

#[tokio::test]
async fn stop_strings_and_stop_token_ids() {
    let _shared = ENGINE_STATE.read().await;
    let c = client();
    let prompt = "Once upon a time, there was a";
    let base = greedy(json!({"prompt": prompt, "max_tokens": 16, "ignore_eos": true}));
    let (_, full) = c.post_json("/v1/completions", &base).await;
    let full_text = full["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the output: a word after the second.
    let (stop, cut) = full_text
        .split_whitespace()
        .skip(2)
        .map(|word| format!(" {word}"))
        .find_map(|stop| full_text.find(&stop).map(|cut| (stop, cut)))
        .unwrap_or_else(|| panic!("no word to stop at in {full_text:?}"));

    let mut body = base.clone();
    body["stop"] = json!([stop, "never-appears"]);
    let (status, response) = c.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    let choice = &response["choices"][0];
    assert_eq!(choice["text"], &full_text[..cut]);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["stop_reason"], stop.as_str());

    body["include_stop_str_in_output"] = json!(true);
    let (_, response) = c.post_json("/v1/completions", &body).await;
    assert_eq!(response["choices"][0]["text"], &full_text[..cut + stop.len()]);

    // A single stop string, streamed: the held-back text never leaks.
    let mut streamed_body = base.clone();
    streamed_body["stop"] = json!(stop);
    streamed_body["stream"] = json!(true);
    let streamed = c.post_stream("/v1/completions", &streamed_body).await;
    assert_eq!(streamed_texts(&streamed.events, false)[&0], &full_text[..cut]);
    assert_eq!(streamed_finish_reasons(&streamed.events)[&0], "stop");

    // stop_token_ids: generate through the engine to learn the token ids,
    // then stop at the first occurrence of the fourth distinct one.
    let engine = server().engine.clone();
    let ids = engine.tokenizer().encode(prompt, true).unwrap();
    let mut request = GenerationRequest::new("stop-token-probe", ids);
    request.sampling = SamplingParams::greedy();
    request.max_tokens = Some(16);
    request.ignore_eos = true;
    let mut stream = engine.submit(request).unwrap();
    let mut generated = Vec::new();
    while let Some(out) = stream.next().await {
        for delta in out.unwrap().deltas {
            generated.extend(delta.token_ids);
        }
    }
    let k = (3..generated.len()).find(|&k| !generated[..k].contains(&generated[k])).expect("a fresh token");
    let stop_id = generated[k];
    let mut body = base.clone();
    body["stop_token_ids"] = json!([stop_id]);
    let (_, response) = c.post_json("/v1/completions", &body).await;
    let choice = &response["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["stop_reason"], stop_id);
    let expected = engine.tokenizer().decode(&generated[..k], true).unwrap();
    assert_eq!(choice["text"], expected.as_str());
    assert_eq!(response["usage"]["completion_tokens"], k + 1, "the stop token counts as generated");
}

#[tokio::test]
async fn logprobs_in_both_shapes() {
    let _shared = ENGINE_STATE.read().await;
    let c = client();
    let body = greedy(
        json!({"prompt": "The capital of France is", "max_tokens": 6, "ignore_eos": true, "logprobs": 3}),
    );
    let (status, response) = c.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    let choice = &response["choices"][0];
    let text = choice["text"].as_str().unwrap();
    let logprobs = &choice["logprobs"];
    let tokens: Vec<&str> =
        logprobs["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.len(), 6);
    assert_eq!(tokens.concat(), text);
    let mut offset = 0;
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(logprobs["text_offset"][i], offset);
        offset += token.chars().count();
        let lp = logprobs["token_logprobs"][i].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = logprobs["top_logprobs"][i].as_object().unwrap();
        assert!((3..=4).contains(&top.len()), "{top:?}");
        let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!((best - lp).abs() < 1e-5, "greedy picks the most likely token");
        assert!(top.contains_key(*token));
    }

    // Streamed: the same tokens, offsets continuing across chunks.
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let streamed = c.post_stream("/v1/completions", &stream_body).await;
    let mut streamed_tokens = Vec::new();
    let mut streamed_offsets = Vec::new();
    for event in &streamed.events {
        let lp = &event["choices"][0]["logprobs"];
        streamed_tokens
            .extend(lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()));
        streamed_offsets.extend(lp["text_offset"].as_array().unwrap().clone());
    }
    assert_eq!(streamed_tokens, tokens);
    assert_eq!(&streamed_offsets, logprobs["text_offset"].as_array().unwrap());

    // Chat: logprobs true + top_logprobs k.
    let chat = greedy(json!({
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 5, "ignore_eos": true, "logprobs": true, "top_logprobs": 2
    }));
    let (status, response) = c.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{response}");
    let content = response["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    for entry in content {
        let token = entry["token"].as_str().unwrap();
        let bytes: Vec<u8> =
            entry["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(bytes, token.as_bytes());
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["token"], entry["token"], "greedy: the chosen token is the most likely");
        assert!((top[0]["logprob"].as_f64().unwrap() - entry["logprob"].as_f64().unwrap()).abs() < 1e-5);
    }
    let mut plain = chat.clone();
    plain.as_object_mut().unwrap().remove("top_logprobs");
    plain["logprobs"] = json!(false);
    let (_, response) = c.post_json("/v1/chat/completions", &plain).await;
    assert!(response["choices"][0]["logprobs"].is_null());
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let _shared = ENGINE_STATE.read().await;
    let c = client();
    let long_prompt = "word ".repeat(600);
    let chat = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        ("/v1/completions", json!({"prompt": "x", "temperature": "hot"}), 400, Some("temperature")),
        ("/v1/completions", json!({"prompt": 5}), 400, Some("prompt")),
        ("/v1/completions", json!({"max_tokens": 3}), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": "x", "stream": "yes"}), 400, Some("stream")),
        ("/v1/completions", json!({"prompt": "x", "stop": [1]}), 400, Some("stop")),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": -1}), 400, Some("max_tokens")),
        ("/v1/completions", json!({"prompt": long_prompt}), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 1000}), 400, Some("max_tokens")),
        ("/v1/completions", json!({"prompt": "x", "temperature": -0.5}), 400, Some("temperature")),
        ("/v1/completions", json!({"prompt": "x", "top_p": 1.5}), 400, Some("top_p")),
        ("/v1/completions", json!({"prompt": "x", "top_k": -5}), 400, Some("top_k")),
        ("/v1/completions", json!({"prompt": "x", "presence_penalty": 3}), 400, Some("presence_penalty")),
        ("/v1/completions", json!({"prompt": "x", "n": 100000}), 400, Some("n")),
        ("/v1/completions", json!({"prompt": "x", "logprobs": 21}), 400, Some("logprobs")),
        (
            "/v1/completions",
            json!({"prompt": "x", "min_tokens": 20, "max_tokens": 4}),
            400,
            Some("min_tokens"),
        ),
        ("/v1/completions", json!({"prompt": [999999]}), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": "x", "model": "gpt-4"}), 404, Some("model")),
        ("/v1/chat/completions", json!({"messages": "hi"}), 400, Some("messages")),
        ("/v1/chat/completions", json!({"messages": []}), 400, Some("messages")),
        ("/v1/chat/completions", chat(json!(long_prompt)), 400, Some("messages")),
        (
            "/v1/chat/completions",
            chat(json!([{"type": "image_url", "image_url": {"url": "x"}}])),
            400,
            Some("messages[0].content"),
        ),
        (
            "/v1/chat/completions",
            {
                let mut b = chat(json!("hi"));
                b["logprobs"] = json!(true);
                b["top_logprobs"] = json!(21);
                b
            },
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            {
                let mut b = chat(json!("hi"));
                b["top_logprobs"] = json!(2);
                b
            },
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            {
                let mut b = chat(json!("hi"));
                b["model"] = json!("nope");
                b
            },
            404,
            Some("model"),
        ),
    ];
    let before = c.metrics().await;
    for (path, body, status, param) in &cases {
        let (got, response) = c.post_json(path, body).await;
        assert_eq!(got, *status, "{path} {body}: {response}");
        let error = &response["error"];
        assert_eq!(error["param"].as_str(), *param, "{path} {body}: {response}");
        assert!(!error["message"].as_str().unwrap().is_empty());
        assert_eq!(error["type"], "invalid_request_error");
        if *status == 404 {
            assert_eq!(error["code"], "model_not_found");
        }
    }

    // Not JSON at all.
    for raw in ["{\"prompt\": ", "not json", "{\"prompt\": \"x\"} trailing"] {
        let (status, response) = c.post_raw("/v1/completions", raw).await;
        assert_eq!(status, 400, "{raw}: {response}");
        assert!(response["error"]["param"].is_null());
        assert_eq!(response["error"]["code"], "invalid_json");
    }

    // Unknown fields, as OpenAI clients send, are ignored.
    let (status, response) = c
        .post_json(
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 1, "user": "u", "metadata": {"k": 1}, "best_of": 1}),
        )
        .await;
    assert_eq!(status, 200, "{response}");

    // Unknown routes and methods answer in the same shape.
    let response = c.get("/v1/nothing").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 404);
    assert!(response.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let response = c.get("/v1/completions").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);

    let after = c.metrics().await;
    let label = "route=\"/v1/completions\",status=\"400\"";
    assert!(
        metric(&after, "pagoda:http_requests_total", label)
            >= metric(&before, "pagoda:http_requests_total", label) + 16.0
    );
}

#[tokio::test]
async fn thirty_two_concurrent_requests_match_their_solo_runs() {
    let _shared = ENGINE_STATE.read().await;
    let c = client();
    let prompts = [
        "The capital of France is",
        "My favourite food is",
        "def fibonacci(n):",
        "In 1492, Columbus",
        "The quick brown fox",
        "Water boils at",
        "Roses are red,",
        "The best way to learn is",
    ];
    let body = |prompt: &str| greedy(json!({"prompt": prompt, "max_tokens": 8, "ignore_eos": true}));
    let mut solo = Vec::new();
    for prompt in prompts {
        let (status, response) = c.post_json("/v1/completions", &body(prompt)).await;
        assert_eq!(status, 200, "{response}");
        solo.push(response["choices"][0]["text"].as_str().unwrap().to_string());
    }

    // 32 at once, half of them streamed.
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let c = c.clone();
            let mut request = body(prompts[i % prompts.len()]);
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let (status, response) = c.post_json("/v1/completions", &request).await;
                    assert_eq!(status, 200, "{response}");
                    response["choices"][0]["text"].as_str().unwrap().to_string()
                } else {
                    request["stream"] = json!(true);
                    let streamed = c.post_stream("/v1/completions", &request).await;
                    assert!(streamed.done);
                    streamed_texts(&streamed.events, false).remove(&0).unwrap_or_default()
                }
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let text = task.await.unwrap();
        assert_eq!(text, solo[i % prompts.len()], "request {i} (prompt {:?})", prompts[i % prompts.len()]);
    }
}

#[tokio::test]
async fn disconnects_abort_requests_and_free_their_blocks() {
    let _exclusive = ENGINE_STATE.write().await;
    let c = client();
    let idle = |m: &str| {
        metric(m, "pagoda:kv_cache_blocks_used", "") == 0.0
            && metric(m, "pagoda:num_requests_running", "") == 0.0
    };
    let before = wait_for_metrics(&c, Duration::from_secs(30), "an idle engine", idle).await;
    let aborted = |m: &str| metric(m, "pagoda:request_success_total", "finished_reason=\"abort\"");
    let aborted_before = aborted(&before);

    // Streaming: read a few chunks, then hang up.
    let body = json!({
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 400, "ignore_eos": true, "stream": true
    });
    let response = c.post("/v1/chat/completions").json(&body).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut reader = SseReader::new(response);
    let mut contents = 0;
    while contents < 3 {
        let data = reader.next_data().await.expect("the stream is still open");
        let event: Value = serde_json::from_str(&data).unwrap();
        if event["choices"][0]["delta"]["content"].as_str().is_some_and(|s| !s.is_empty()) {
            contents += 1;
        }
    }
    let during = c.metrics().await;
    assert!(metric(&during, "pagoda:kv_cache_blocks_used", "") > 0.0, "the request holds blocks");
    drop(reader);
    let after = wait_for_metrics(&c, Duration::from_secs(10), "the aborted stream to free its blocks", |m| {
        idle(m) && aborted(m) >= aborted_before + 1.0
    })
    .await;
    assert_eq!(metric(&after, "pagoda:kv_cache_blocks_used", ""), 0.0);

    // Non-streaming: the client gives up while the request runs.
    let generated_before = metric(&after, "pagoda:generation_tokens_total", "");
    let request = {
        let c = c.clone();
        tokio::spawn(async move {
            let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true});
            c.post_json("/v1/completions", &body).await
        })
    };
    wait_for_metrics(&c, Duration::from_secs(30), "the request to generate", |m| {
        metric(m, "pagoda:generation_tokens_total", "") >= generated_before + 3.0
    })
    .await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    let after =
        wait_for_metrics(&c, Duration::from_secs(10), "the abandoned request to free its blocks", |m| {
            idle(m) && aborted(m) >= aborted_before + 2.0
        })
        .await;
    assert!(
        metric(&after, "pagoda:generation_tokens_total", "") < generated_before + 400.0,
        "it did not run to the end"
    );
}

#[tokio::test]
async fn metrics_expose_engine_and_http_families() {
    let _shared = ENGINE_STATE.read().await;
    let c = client();
    let (status, _) = c.post_json("/v1/completions", &greedy(json!({"prompt": "Hi", "max_tokens": 2}))).await;
    assert_eq!(status, 200);
    let response = c.http.get(c.url("/metrics")).send().await.unwrap();
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text().await.unwrap();
    for family in [
        "pagoda:num_requests_running",
        "pagoda:num_requests_waiting",
        "pagoda:num_requests_swapped",
        "pagoda:kv_cache_blocks_total",
        "pagoda:kv_cache_blocks_used",
        "pagoda:kv_cache_blocks_free",
        "pagoda:kv_cache_blocks_cached",
        "pagoda:kv_cache_usage_perc",
        "pagoda:prefix_cache_queries_total",
        "pagoda:prefix_cache_hits_total",
        "pagoda:num_preemptions_total",
        "pagoda:prompt_tokens_total",
        "pagoda:generation_tokens_total",
        "pagoda:request_success_total{finished_reason=\"length\",model_name=\"smollm2-test\"}",
        "pagoda:time_to_first_token_seconds_bucket",
        "pagoda:inter_token_latency_seconds_bucket",
        "pagoda:time_per_output_token_seconds_bucket",
        "pagoda:e2e_request_latency_seconds_count",
        "pagoda:request_queue_time_seconds_sum",
        "pagoda:request_prefill_time_seconds_bucket",
        "pagoda:request_decode_time_seconds_bucket",
        "pagoda:request_inference_time_seconds_bucket",
        "pagoda:request_time_per_output_token_seconds_bucket",
        "pagoda:request_prompt_tokens_bucket",
        "pagoda:request_generation_tokens_bucket",
        "pagoda:request_max_num_generation_tokens_bucket",
        "pagoda:request_params_n_bucket",
        "pagoda:request_params_max_tokens_bucket",
        "pagoda:iteration_tokens_total_bucket",
        "pagoda:http_requests_total{route=\"/v1/completions\",status=\"200\"}",
        "pagoda:http_requests_in_flight",
    ] {
        assert!(text.contains(family), "missing {family}");
    }
    assert!(metric(&text, "pagoda:generation_tokens_total", "") >= 2.0);
    assert!(metric(&text, "pagoda:e2e_request_latency_seconds_count", "") >= 1.0);
    // Every engine series names the served model, as vLLM's do.
    for line in text.lines().filter(|l| l.starts_with("pagoda:") && !l.starts_with("pagoda:http_")) {
        assert!(line.contains("model_name=\"smollm2-test\""), "no model_name: {line}");
    }
}

#[tokio::test]
async fn a_request_with_n_samples_counts_once_and_its_sizes_are_recorded() {
    let _exclusive = ENGINE_STATE.write().await;
    let c = client();
    let before = c.metrics().await;
    let count = |m: &str, name: &str| metric(m, name, "");
    let body =
        json!({"prompt": "Hi", "max_tokens": 3, "n": 3, "ignore_eos": true, "temperature": 1.0, "seed": 1});
    let (status, r) = c.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{r}");
    let after = c.metrics().await;
    let success = |m: &str| metric(m, "pagoda:request_success_total", "finished_reason=\"length\"");
    assert_eq!(success(&after) - success(&before), 1.0, "one request, however many samples");
    let delta = |name: &str| count(&after, name) - count(&before, name);
    assert_eq!(delta("pagoda:request_params_n_sum"), 3.0);
    assert_eq!(delta("pagoda:request_params_max_tokens_sum"), 3.0);
    assert_eq!(delta("pagoda:request_generation_tokens_sum"), 9.0);
    assert_eq!(delta("pagoda:request_max_num_generation_tokens_sum"), 3.0);
    let prompt_tokens = r["usage"]["prompt_tokens"].as_f64().unwrap();
    assert_eq!(delta("pagoda:request_prompt_tokens_sum"), prompt_tokens);
    assert_eq!(delta("pagoda:request_inference_time_seconds_count"), 1.0);
}
