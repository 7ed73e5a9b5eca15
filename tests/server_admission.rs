//! Admission over HTTP: requests too big to ever run get a 400 naming the
//! limit (context length with a huge max_tokens, the KV cache, stop strings,
//! the pending-work limits), a busy server a 429 with `Retry-After`, and a
//! completion's prompts are admitted all together or not at all. The real
//! model on the CPU backend, on servers of their own.

mod server_support;

use serde_json::{json, Value};
use server_support::{Client, SseReader, TestServer};

use pagoda_engine::{MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES};
use pagoda_server::ServerArgs;

/// Posts a completion and expects a 400 naming `param`; returns the message.
async fn bad_request(c: &Client, body: Value, param: &str) -> String {
    let (status, response) = c.post_json("/v1/completions", &body).await;
    assert_eq!(status, 400, "{body}: {response}");
    assert_eq!(response["error"]["type"], "invalid_request_error", "{response}");
    assert_eq!(response["error"]["param"], param, "{response}");
    response["error"]["message"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_can_never_run_get_400_naming_the_limit() {
    let server = TestServer::start(ServerArgs::default());
    let c = server.client();

    // max_tokens near u64::MAX used to wrap around the context check.
    for max_tokens in [u64::MAX, u64::MAX - 1, 1 << 63] {
        let body = json!({"prompt": "Hi", "max_tokens": max_tokens});
        let message = bad_request(&c, body, "max_tokens").await;
        assert!(message.contains("maximum context length is 512"), "{message}");
    }

    // Stop strings: bounded in number and in length.
    let many: Vec<String> = (0..=MAX_STOP_STRINGS).map(|i| format!("stop{i}")).collect();
    let message = bad_request(&c, json!({"prompt": "Hi", "max_tokens": 1, "stop": many}), "stop").await;
    assert!(message.contains(&format!("at most {MAX_STOP_STRINGS} stop strings")), "{message}");
    let long = "x".repeat(MAX_STOP_STRING_BYTES + 1);
    let message = bad_request(&c, json!({"prompt": "Hi", "max_tokens": 1, "stop": long}), "stop").await;
    assert!(message.contains(&format!("at most {MAX_STOP_STRING_BYTES} bytes")), "{message}");

    // More KV than the whole cache (about 180 blocks): 8 samples of ~500 tokens.
    // Refused up front, streaming or not, instead of failing midway.
    for stream in [false, true] {
        let body = json!({"prompt": "Hi", "max_tokens": 500, "n": 8, "stream": stream, "ignore_eos": true});
        let message = bad_request(&c, body, "max_tokens").await;
        assert!(message.contains("KV cache"), "{message}");
    }
    assert_eq!(server.engine.num_live_requests(), 0);

    // Within every limit: served.
    let stops: Vec<String> = (0..MAX_STOP_STRINGS).map(|i| format!("{i}").repeat(100)).collect();
    let (status, response) =
        c.post_json("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4, "stop": stops})).await;
    assert_eq!(status, 200, "{response}");
}

/// Starts a streamed completion and waits for its first chunk.
async fn start_stream(c: &Client, max_tokens: usize) -> SseReader {
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": true, "stream": true});
    let response = c.post("/v1/completions").json(&body).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut reader = SseReader::new(response);
    reader.next_data().await.expect("a first chunk");
    reader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_work_is_admitted_all_or_none_with_retry_after() {
    let args = ServerArgs { max_pending_requests: 4, max_pending_seqs: 8, ..ServerArgs::default() };
    let server = TestServer::start(args);
    let c = server.client();
    let prompts = |k: usize| -> Vec<String> { (0..k).map(|i| format!("Prompt number {i}")).collect() };

    // On an idle server, more than a limit allows can never succeed: 400, not 429.
    let message = bad_request(&c, json!({"prompt": prompts(5), "max_tokens": 1}), "prompt").await;
    assert!(message.contains("--max-pending-requests 4"), "{message}");
    let message = bad_request(&c, json!({"prompt": prompts(2), "max_tokens": 1, "n": 5}), "n").await;
    assert!(message.contains("--max-pending-seqs 8"), "{message}");
    // Exactly at the limit: served.
    let (status, response) =
        c.post_json("/v1/completions", &json!({"prompt": prompts(4), "max_tokens": 2})).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["choices"].as_array().map(Vec::len), Some(4));

    // Busy: one long request is live, so four prompts more must wait.
    let long = start_stream(&c, 400).await;
    assert_eq!(server.engine.num_live_requests(), 1);
    let response =
        c.post("/v1/completions").json(&json!({"prompt": prompts(4), "max_tokens": 1})).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 429);
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    assert!(
        retry_after.as_deref().and_then(|s| s.parse::<u64>().ok()).is_some(),
        "Retry-After: {retry_after:?}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("retry later") && message.contains("--max-pending-requests"), "{message}");
    // None of the four was queued; a request that fits beside the long one runs.
    assert_eq!(server.engine.num_live_requests(), 1);
    let (status, response) =
        c.post_json("/v1/completions", &json!({"prompt": prompts(3), "max_tokens": 1})).await;
    assert_eq!(status, 200, "{response}");
    drop(long);
}
