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
    // During the drain the server still accepts connections and answers 503.
    // (The signal reaches the server asynchronously: poll until /health turns.)
    let mut health_status = 200;
    for _ in 0..100 {
        let health = c.http.get(c.url("/health")).send().await.expect("still accepting during the drain");
        health_status = health.status().as_u16();
        if health_status != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health_status, 503);
    let (status, response) = c.post_json("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1})).await;
    assert_eq!(status, 503, "{response}");
    assert_eq!(response["error"]["code"], "service_unavailable");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_streamed_request_cut_by_shutdown_gets_503() {
    let args = ServerArgs { shutdown_grace_secs: 1, ..ServerArgs::default() };
    let server = TestServer::start(args);
    let c = server.client();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": true});
    let request = tokio::spawn({
        let c = c.clone();
        async move { c.post_json("/v1/completions", &body).await }
    });
    while server.engine.num_live_requests() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.signal_shutdown();
    let (status, response) = request.await.unwrap();
    assert_eq!(status, 503, "partial text is not a success: {response}");
    assert_eq!(response["error"]["code"], "service_unavailable");
}

/// `pagoda serve` as a child process, so that real signals can be sent.
#[test]
fn a_second_signal_exits_at_once() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"])
        .args(["--max-model-len", "512", "--kv-cache-memory", "128MiB", "--shutdown-grace-secs", "600"])
        .arg("--model")
        .arg(server_support::model_path())
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("pagoda serve starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("a log line naming the address").unwrap();
        if let Some(rest) = line.split("\"addr\":\"").nth(1) {
            break rest.split('"').next().unwrap().to_string();
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let c = Client { http: reqwest::Client::new(), base_url: format!("http://{addr}"), api_key: None };
        // A long request keeps the drain going (grace 600 s).
        let (_reader, _) = start_stream(&c, 480).await;
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let mut draining = false;
        for _ in 0..100 {
            if let Ok(health) = c.http.get(c.url("/health")).send().await {
                if health.status().as_u16() == 503 {
                    draining = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(draining, "/health answers 503 during the drain");
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the second SIGTERM did not end the process");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a forced exit reports failure: {status}");
}
