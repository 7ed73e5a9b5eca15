//! `/dashboard` and `/v1/debug/kv` on the real server (default model, CPU):
//! served without the API key (as /metrics is), embedded assets, the KV
//! view's encoding in agreement with /metrics, bad query parameters refused
//! by name, and both routes gone under `--disable-dashboard`. The page itself
//! is checked in a browser by scripts/dashboard-check.sh.

mod server_support;

use pagoda_server::ServerArgs;
use serde_json::{json, Value};
use server_support::TestServer;

const API_KEY: &str = "dashboard-key";

async fn get(url: &str) -> (u16, String, String) {
    let response = reqwest::get(url).await.expect("request sent");
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    (status, content_type, response.text().await.expect("body"))
}

/// Blocks by state, from `[code, length]` runs.
fn count_runs(runs: &Value) -> std::collections::BTreeMap<String, u64> {
    let mut counts = std::collections::BTreeMap::new();
    for run in runs.as_array().expect("runs") {
        *counts.entry(run[0].as_str().expect("code").to_string()).or_insert(0) +=
            run[1].as_u64().expect("length");
    }
    counts
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_and_kv_view_need_no_key_and_agree_with_metrics() {
    let server = TestServer::start(ServerArgs { api_key: Some(API_KEY.into()), ..ServerArgs::default() });
    let base = server.base_url.clone();

    let (status, content_type, page) = get(&format!("{base}/dashboard")).await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(page.contains("gpu-map") && !page.contains("http://") && !page.contains("https://"), "no CDN");
    for asset in ["dashboard.js", "kv_map.js", "dashboard.css"] {
        let (status, _, body) = get(&format!("{base}/dashboard/{asset}")).await;
        assert_eq!(status, 200, "{asset}");
        assert!(!body.is_empty());
    }
    let (status, _, _) = get(&format!("{base}/v1/models")).await;
    assert_eq!(status, 401, "the API itself still needs the key");

    // One request through, so the view has cached blocks and counters to show.
    let client = server.client();
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(6);
    let (status, _) = client.post_json("/v1/completions", &json!({"prompt": prompt, "max_tokens": 8})).await;
    assert_eq!(status, 200);

    let (status, content_type, body) = get(&format!("{base}/v1/debug/kv")).await;
    assert_eq!(status, 200, "{body}");
    assert!(content_type.starts_with("application/json"));
    let view: Value = serde_json::from_str(&body).expect("JSON");
    let (_, _, metrics) = get(&format!("{base}/metrics")).await;
    let counts = count_runs(&view["gpu_runs"]);
    let total: u64 = counts.values().sum();
    assert_eq!(total, view["num_gpu_blocks"].as_u64().unwrap());
    assert_eq!(total as f64, metric(&metrics, "pagoda:kv_cache_blocks_total"));
    let used = counts.get("o").unwrap_or(&0) + counts.get("s").unwrap_or(&0);
    assert_eq!(used, view["counts"]["used"].as_u64().unwrap());
    assert_eq!(used as f64, metric(&metrics, "pagoda:kv_cache_blocks_used"));
    let cached = *counts.get("c").unwrap_or(&0);
    assert!(cached > 0, "the finished request's full blocks stay cached: {body}");
    assert_eq!(
        cached as f64,
        metric(&metrics, "pagoda:kv_cache_blocks_cached"),
        "idle: all cached blocks are evictable"
    );
    assert_eq!(
        (counts.get("f").unwrap_or(&0) + cached) as f64,
        metric(&metrics, "pagoda:kv_cache_blocks_free")
    );
    let evictable: u64 =
        view["eviction_order"].as_array().unwrap().iter().map(|r| r[1].as_u64().unwrap()).sum();
    assert_eq!(evictable, cached);
    assert_eq!(view["seqs"], json!([]), "nothing is live");
    assert_eq!(view["queues"], json!({"running": 0, "waiting": 0, "swapped": 0}));
    assert_eq!(
        view["prefix_cache"]["queried_tokens"].as_f64().unwrap(),
        metric(&metrics, "pagoda:prefix_cache_queries_total")
    );
    assert!(view["steps"]["prefill"]["steps"].as_u64().unwrap() > 0);

    let (_, _, lean) = get(&format!("{base}/v1/debug/kv?seqs=false")).await;
    let lean: Value = serde_json::from_str(&lean).unwrap();
    assert!(lean.get("seqs").is_none() && lean.get("gpu_runs").is_some());
    for (query, param) in [("seqs=maybe", "seqs"), ("tables=1", "tables")] {
        let (status, _, body) = get(&format!("{base}/v1/debug/kv?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["param"], param, "{body}");
    }
    server.signal_shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn disable_dashboard_leaves_both_routes_out() {
    let server = TestServer::start(ServerArgs { disable_dashboard: true, ..ServerArgs::default() });
    for path in ["/dashboard", "/dashboard/dashboard.js", "/v1/debug/kv"] {
        let (status, _, _) = get(&format!("{}{path}", server.base_url)).await;
        assert_eq!(status, 404, "{path}");
    }
    let (status, _, _) = get(&format!("{}/metrics", server.base_url)).await;
    assert_eq!(status, 200);
    server.signal_shutdown();
}
