//! Overload (429 beyond --max-pending-requests) and graceful shutdown, on
//! a server of their own: the real model on the CPU backend.

mod server_support;

use std::time::Duration;

use pagoda_server::{serve_on, ServerArgs};
use serde_json::{json, Value};
use server_support::{metric, Client, SseReader, TestServer};

/// Reads a completion stream to its end: (text, finish reason, saw `[DONE]`).
async fn drain(mut reader: SseReader, mut text: String) -> (String, Option<String>, bool) {
    let mut finish = None;
    while let Some(data) = reader.next_data().await {
        if data == "[DONE]" {
            return (text, finish, true);
        }
        let event: Value = serde_json::from_str(&data).unwrap();
        assert!(event.get("error").is_none(), "{event}");
        text.push_str(event["choices"][0]["text"].as_str().unwrap_or(""));
        if let Some(reason) = event["choices"][0]["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    (text, finish, false)
}

/// Starts a streamed completion and waits for its first token.
async fn start_stream(c: &Client, max_tokens: usize) -> (SseReader, String) {
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": true, "stream": true});
    let response = c.post("/v1/completions").json(&body).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut reader = SseReader::new(response);
    let first = reader.next_data().await.expect("a first token");
    let event: Value = serde_json::from_str(&first).unwrap();
    let text = event["choices"][0]["text"].as_str().unwrap_or("").to_string();
    (reader, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_429_and_shutdown_is_graceful() {
    let args = ServerArgs { max_pending_requests: 2, shutdown_grace_secs: 4, ..ServerArgs::default() };
    let server = TestServer::start(args.clone());
    let c = server.client();

    // A second front end on the same engine that never stops by itself, to
    // see what clients get once the engine is shutting down.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let observer = Client { base_url: format!("http://{}", listener.local_addr().unwrap()), ..c.clone() };
    let config = args.to_config("observer", "0.0.0-test", "test-rev");
    tokio::spawn(serve_on(listener, config, server.engine.clone(), std::future::pending()));
    let health = observer.http.get(observer.url("/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);

    // Two requests in flight fill the queue: a long one and a short one.
    let (long, long_text) = start_stream(&c, 400).await;
    let (short, short_text) = start_stream(&c, 12).await;
    assert_eq!(server.engine.num_live_requests(), 2);
    let (status, response) = c.post_json("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1})).await;
    assert_eq!(status, 429, "{response}");
    assert_eq!(response["error"]["type"], "rate_limit_error");
    assert_eq!(response["error"]["code"], "rate_limit_exceeded");
    let metrics = c.metrics().await;
    assert_eq!(
        metric(&metrics, "pagoda:http_requests_total", "route=\"/v1/completions\",status=\"429\""),
        1.0
    );

    // SIGTERM: the short request finishes within the grace period, the long
    // one is aborted when it ends; both streams close cleanly with [DONE].
    server.signal_shutdown();
    let long = tokio::spawn(drain(long, long_text));
    let (text, finish, done) = drain(short, short_text).await;
    assert!(done);
    assert_eq!(finish.as_deref(), Some("length"), "the short request ran to its end: {text:?}");
    let (text, finish, done) = long.await.unwrap();
    assert!(done);
    assert_eq!(finish.as_deref(), Some("abort"), "the long request was cut at the grace period");
    assert!(!text.is_empty());

    let stopped = tokio::task::spawn_blocking(move || {
        let result = server.wait_stopped(Duration::from_secs(30));
        (result, server)
    });
    let (result, server) = stopped.await.unwrap();
    result.expect("serve_on returns cleanly");
    assert!(server.engine.is_shutting_down());
    assert_eq!(server.engine.num_live_requests(), 0);

    // The listener is closed; clients still connected elsewhere get 503s.
    assert!(c.http.get(c.url("/health")).send().await.is_err(), "no longer accepting connections");
    let health = observer.http.get(observer.url("/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    let (status, response) =
        observer.post_json("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1})).await;
    assert_eq!(status, 503, "{response}");
    assert_eq!(response["error"]["code"], "service_unavailable");
}
