//! Speculative decoding through `pagoda serve`: a server with n-gram prompt
//! lookup (`--speculative-config`) answers completions and streamed chats
//! with the text, tokens and logprobs of a server without it, and counts its
//! drafts at /metrics (the real default model on the CPU backend).

mod server_support;

use std::sync::OnceLock;

use pagoda_engine::SpeculativeConfig;
use pagoda_server::ServerArgs;
use serde_json::{json, Value};
use server_support::{engine_config, metric, Client, TestServer};

static PLAIN: OnceLock<TestServer> = OnceLock::new();
static SPECULATIVE: OnceLock<TestServer> = OnceLock::new();

fn plain() -> Client {
    PLAIN.get_or_init(|| TestServer::start(ServerArgs::default())).client()
}

fn speculative() -> Client {
    SPECULATIVE
        .get_or_init(|| {
            let spec = SpeculativeConfig::from_json(
                r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1, "min_acceptance_rate": 0}"#,
            )
            .expect("config");
            TestServer::start_with(ServerArgs::default(), pagoda_engine::EngineConfig {
                speculative: Some(spec),
                ..engine_config()
            })
        })
        .client()
}

/// A prompt whose answer repeats it (prompt lookup drafts from it).
const COPY: &str = "Repeat exactly: the quick brown fox jumps over the lazy dog, \
the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog.";

fn tokens_and_logprobs(response: &Value) -> (String, Vec<String>, Vec<f64>) {
    let choice = &response["choices"][0];
    let lp = &choice["logprobs"];
    let tokens =
        lp["tokens"].as_array().expect("tokens").iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let logprobs =
        lp["token_logprobs"].as_array().expect("logprobs").iter().map(|x| x.as_f64().unwrap()).collect();
    (choice["text"].as_str().expect("text").to_string(), tokens, logprobs)
}

#[tokio::test]
async fn completions_and_streamed_chats_are_those_of_plain_decoding() {
    let (plain, spec) = (plain(), speculative());
    for body in [
        json!({"prompt": COPY, "max_tokens": 40, "temperature": 0, "logprobs": 1, "ignore_eos": true}),
        json!({"prompt": COPY, "max_tokens": 40, "temperature": 0.9, "top_p": 0.95, "seed": 7,
               "frequency_penalty": 0.4, "logprobs": 1, "ignore_eos": true}),
    ] {
        let (status, want) = plain.post_json("/v1/completions", &body).await;
        assert_eq!(status, 200, "{want}");
        let (status, got) = spec.post_json("/v1/completions", &body).await;
        assert_eq!(status, 200, "{got}");
        let (want_text, want_tokens, want_lp) = tokens_and_logprobs(&want);
        let (got_text, got_tokens, got_lp) = tokens_and_logprobs(&got);
        assert_eq!(got_text, want_text, "{body}");
        assert_eq!(got_tokens, want_tokens);
        for (g, w) in got_lp.iter().zip(&want_lp) {
            assert!((g - w).abs() < 1e-3, "logprob {g} vs {w}");
        }
        assert_eq!(got["usage"], want["usage"]);
    }
    let chat = json!({"messages": [{"role": "user", "content": COPY}], "max_tokens": 40, "temperature": 0,
                      "stream": true});
    let text = |events: &[Value]| -> String {
        events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect()
    };
    let want = plain.post_stream("/v1/chat/completions", &chat).await;
    let got = spec.post_stream("/v1/chat/completions", &chat).await;
    assert!(want.done && got.done);
    let answer = text(&got.events);
    assert_eq!(answer, text(&want.events));

    let metrics = spec.metrics().await;
    let drafts = metric(&metrics, "pagoda:spec_decode_num_drafts_total", "");
    let drafted = metric(&metrics, "pagoda:spec_decode_num_draft_tokens_total", "");
    let accepted = metric(&metrics, "pagoda:spec_decode_num_accepted_tokens_total", "");
    assert!(
        drafts > 0.0 && accepted > 0.0 && accepted <= drafted,
        "{drafts} verifications, {drafted} drafts, {accepted} accepted; the chat answer: {answer:?}"
    );
    assert!(metric(&metrics, "pagoda:spec_decode_num_accepted_tokens_per_pos_total", "position=\"0\"") > 0.0);
    assert_eq!(metric(&plain.metrics().await, "pagoda:spec_decode_num_drafts_total", ""), 0.0);
}
