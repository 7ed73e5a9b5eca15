//! The connection layer (D1, D12 of issue 13): the connection cap, the
//! header-read, keep-alive and body timeouts, and JSON bodies on errors
//! raised before routing; raw TCP clients, the real model on the CPU.

mod server_support;

use std::time::{Duration, Instant};

use pagoda_server::{ServerArgs, MAX_URI_BYTES};
use serde_json::Value;
use server_support::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous bound for "closed by the server", for slow CI machines.
const CLOSE_BOUND: Duration = Duration::from_secs(20);

fn addr(server: &TestServer) -> String {
    server.base_url.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (or `bound` passes):
/// everything received, and whether it closed.
async fn read_to_close(stream: &mut TcpStream, bound: Duration) -> (String, bool) {
    let mut received = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + bound;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&received).into_owned(), true),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `request` on a fresh connection and reads the whole answer: (status, JSON body).
async fn raw_exchange(server: &TestServer, request: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr(server)).await.unwrap();
    stream.write_all(request).await.unwrap();
    let (text, closed) = read_to_close(&mut stream, CLOSE_BOUND).await;
    assert!(closed, "the server closes after an error: {text}");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head: {text:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {body:?}"));
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_cannot_exhaust_connections_or_starve_health() {
    let args = ServerArgs {
        max_connections: 4,
        header_read_timeout_secs: 60,
        timeout_keep_alive: 60,
        ..ServerArgs::default()
    };
    let server = TestServer::start(args);
    let c = server.client();
    let mut half_sent = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        half_sent.push(stream);
        // Let the server take each in turn.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..3 {
        let health = tokio::time::timeout(CLOSE_BOUND, c.http.get(c.url("/health")).send()).await;
        let health = health.expect("/health answers while half-sent requests hold connections").unwrap();
        assert_eq!(health.status().as_u16(), 200);
    }
    // The older half-sent connections were closed to keep within the cap.
    let mut still_open = 0;
    for stream in &mut half_sent {
        let (_, closed) = read_to_close(stream, Duration::from_millis(200)).await;
        still_open += usize::from(!closed);
    }
    assert!(still_open <= 4, "{still_open} half-sent connections still open over a cap of 4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_is_closed_after_the_header_timeout() {
    let args = ServerArgs { header_read_timeout_secs: 1, timeout_keep_alive: 60, ..ServerArgs::default() };
    let server = TestServer::start(args);
    let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
    stream.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let (_, closed) = read_to_close(&mut stream, CLOSE_BOUND).await;
    assert!(closed, "a half-sent request is closed after --header-read-timeout-secs");

    // A silent connection is closed after the keep-alive timeout.
    let args = ServerArgs { header_read_timeout_secs: 60, timeout_keep_alive: 1, ..ServerArgs::default() };
    let server = TestServer::start(args);
    let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
    let (_, closed) = read_to_close(&mut stream, CLOSE_BOUND).await;
    assert!(closed, "an idle connection is closed after --timeout-keep-alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_gets_408() {
    let args = ServerArgs { request_body_timeout_secs: 1, ..ServerArgs::default() };
    let server = TestServer::start(args);
    let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
    stream
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        .await
        .unwrap();
    let (text, _) = read_to_close(&mut stream, CLOSE_BOUND).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body: Value = serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["error"]["code"], "request_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_before_routing_have_openai_json_bodies() {
    let server = TestServer::start(ServerArgs::default());
    // A malformed request line: hyper's own 400, rewritten.
    let (status, body) = raw_exchange(&server, b"NOT AN HTTP REQUEST\r\n\r\n").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "malformed_request");
    // A URL over our limit.
    let long = format!("GET /v1/models?q={} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(MAX_URI_BYTES));
    let (status, body) = raw_exchange(&server, long.as_bytes()).await;
    assert_eq!(status, 414);
    assert_eq!(body["error"]["code"], "uri_too_long");
    // Headers over our limit, and past hyper's own buffer.
    for size in [100 << 10, 600 << 10] {
        let big = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(size));
        let (status, body) = raw_exchange(&server, big.as_bytes()).await;
        assert_eq!(status, 431, "{size} bytes of headers");
        assert_eq!(body["error"]["code"], "headers_too_large");
    }
    // Still serving.
    let c = server.client();
    assert_eq!(c.http.get(c.url("/health")).send().await.unwrap().status().as_u16(), 200);
}
