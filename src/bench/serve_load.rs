//! `pagoda bench serve`: an online load generator against a running
//! OpenAI-compatible server (Pagoda's or any other, vLLM's among them),
//! reporting what `vllm bench serve` reports. It checks itself like the
//! offline benchmarks: every request must succeed with exactly its
//! `max_tokens` (by the server's usage count), or the command fails after
//! printing and writing its figures.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;

use super::check::{CompletionCheck, RequestCompletion};
use super::workload::{WorkloadArgs, WorkloadRequest};

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Model name to send (default: the first the server lists).
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer token, if the server wants one.
    #[arg(long, env = "PAGODA_API_KEY")]
    pub api_key: Option<String>,
    /// Mean request arrivals per second (Poisson); "inf" sends all at once.
    #[arg(long, default_value = "inf")]
    pub request_rate: f64,
    /// At most this many requests in flight.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Generated prompts draw token ids below this (the model's vocabulary size or less).
    #[arg(long, default_value_t = 32000)]
    pub vocab_size: usize,
    /// Sampling temperature sent with every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Also report TTFT separately for requests whose prompt has at most this
    /// many tokens ("short") and for the others ("long"). Default: the short
    /// prompt length of a generated mixed workload (--short-fraction).
    #[arg(long)]
    pub split_ttft_at: Option<usize>,
    #[arg(long)]
    pub output_json: Option<PathBuf>,
}

/// Timings of one request.
#[derive(Debug, Default, Clone)]
struct RequestTiming {
    ok: bool,
    error: Option<String>,
    prompt_tokens: usize,
    max_tokens: usize,
    output_tokens: usize,
    ttft: f64,
    itl: Vec<f64>,
    e2e: f64,
}

#[derive(Serialize, Debug)]
struct Percentiles {
    mean_ms: f64,
    median_ms: f64,
    p99_ms: f64,
}

#[derive(Serialize, Debug)]
struct ServeResult {
    successful_requests: usize,
    failed_requests: usize,
    duration_s: f64,
    total_input_tokens: usize,
    total_output_tokens: usize,
    request_throughput: f64,
    output_throughput: f64,
    total_token_throughput: f64,
    ttft: Percentiles,
    tpot: Percentiles,
    itl: Percentiles,
    e2el: Percentiles,
    request_rate: f64,
    max_concurrency: Option<usize>,
    temperature: f32,
    /// Every request succeeded with exactly its max_tokens.
    check: CompletionCheck,
    /// TTFT by prompt length class, when asked for (`--split-ttft-at`).
    #[serde(skip_serializing_if = "Option::is_none")]
    ttft_by_prompt_length: Option<TtftByLength>,
}

/// TTFT of requests with short prompts (at most `split_at` tokens) and of
/// the others, reported apart: a short request's wait beside long prompts is
/// what an average over both hides.
#[derive(Serialize, Debug)]
struct TtftByLength {
    split_at: usize,
    short_requests: usize,
    long_requests: usize,
    short: Percentiles,
    long: Percentiles,
}

impl TtftByLength {
    fn of(timings: &[&RequestTiming], split_at: usize) -> Self {
        let (short, long): (Vec<&RequestTiming>, Vec<&RequestTiming>) =
            timings.iter().partition(|t| t.prompt_tokens <= split_at);
        Self {
            split_at,
            short_requests: short.len(),
            long_requests: long.len(),
            short: percentiles(short.iter().map(|t| t.ttft).collect()),
            long: percentiles(long.iter().map(|t| t.ttft).collect()),
        }
    }
}

pub fn run(args: ServeBenchArgs) -> anyhow::Result<()> {
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        bail!("--request-rate must be positive (or inf)");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: ServeBenchArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
    let base = args.base_url.trim_end_matches('/').to_string();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&client, &base, args.api_key.as_deref()).await?,
    };
    let requests = args.workload.load(args.vocab_size)?;
    let total = requests.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    let limit = Arc::new(tokio::sync::Semaphore::new(args.max_concurrency.unwrap_or(usize::MAX >> 4)));
    let mut rng = StdRng::seed_from_u64(args.workload.workload_seed ^ 0x5eed);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for req in requests {
        if args.request_rate.is_finite() {
            // Exponential gaps make a Poisson process.
            let gap = -(1.0 - rng.random::<f64>()).ln() / args.request_rate;
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        }
        let permit = limit.clone().acquire_owned().await?;
        let (client, base, model, key, bar) =
            (client.clone(), base.clone(), model.clone(), args.api_key.clone(), bar.clone());
        let temperature = args.temperature;
        tasks.push(tokio::spawn(async move {
            let timing = one_request(&client, &base, &model, key.as_deref(), req, temperature).await;
            bar.inc(1);
            drop(permit);
            timing
        }));
    }
    let mut timings = Vec::with_capacity(total);
    for t in tasks {
        timings.push(t.await?);
    }
    let duration_s = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let ok: Vec<&RequestTiming> = timings.iter().filter(|t| t.ok).collect();
    if let Some(err) = timings.iter().find_map(|t| t.error.as_ref()) {
        eprintln!("first error: {err}");
    }
    let input: usize = ok.iter().map(|t| t.prompt_tokens).sum();
    let output: usize = ok.iter().map(|t| t.output_tokens).sum();
    let tpots: Vec<f64> = ok
        .iter()
        .filter(|t| t.output_tokens > 1)
        .map(|t| (t.e2e - t.ttft) / (t.output_tokens - 1) as f64)
        .collect();
    let result = ServeResult {
        successful_requests: ok.len(),
        failed_requests: timings.len() - ok.len(),
        duration_s,
        total_input_tokens: input,
        total_output_tokens: output,
        request_throughput: ok.len() as f64 / duration_s,
        output_throughput: output as f64 / duration_s,
        total_token_throughput: (input + output) as f64 / duration_s,
        ttft: percentiles(ok.iter().map(|t| t.ttft).collect()),
        tpot: percentiles(tpots),
        itl: percentiles(ok.iter().flat_map(|t| t.itl.iter().copied()).collect()),
        e2el: percentiles(ok.iter().map(|t| t.e2e).collect()),
        request_rate: args.request_rate,
        max_concurrency: args.max_concurrency,
        temperature: args.temperature,
        check: CompletionCheck::of(&completions(&timings)),
        ttft_by_prompt_length: split_ttft_at(&args).map(|at| TtftByLength::of(&ok, at)),
    };
    print_result(&result);
    super::write_json(args.output_json.as_ref(), &result)?;
    if result.successful_requests == 0 {
        bail!("no request succeeded");
    }
    result.check.ensure()
}

/// The requests as the self-check sees them: a failed one did not finish.
fn completions(timings: &[RequestTiming]) -> Vec<RequestCompletion> {
    timings
        .iter()
        .enumerate()
        .map(|(i, t)| RequestCompletion {
            id: format!("request {i}"),
            max_tokens: t.max_tokens,
            output_tokens: t.output_tokens,
            finished: t.ok,
        })
        .collect()
}

/// Where TTFT is split by prompt length: as asked, else at the short prompt
/// length of a generated mixed workload.
fn split_ttft_at(args: &ServeBenchArgs) -> Option<usize> {
    let w = &args.workload;
    let mixed = w.dataset.is_none() && w.short_fraction > 0.0;
    args.split_ttft_at.or(mixed.then_some(w.short_input_len))
}

async fn first_model(client: &reqwest::Client, base: &str, key: Option<&str>) -> anyhow::Result<String> {
    let mut req = client.get(format!("{base}/v1/models"));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let body: serde_json::Value =
        req.send().await.context("GET /v1/models")?.error_for_status()?.json().await?;
    body["data"][0]["id"].as_str().map(str::to_string).context("the server lists no model")
}

async fn one_request(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    key: Option<&str>,
    req: WorkloadRequest,
    temperature: f32,
) -> RequestTiming {
    let mut timing = RequestTiming {
        prompt_tokens: req.prompt_token_ids.len(),
        max_tokens: req.max_tokens,
        ..Default::default()
    };
    let body = json!({
        "model": model,
        "prompt": req.prompt_token_ids,
        "max_tokens": req.max_tokens,
        "temperature": temperature,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let mut http = client.post(format!("{base}/v1/completions")).json(&body);
    if let Some(key) = key {
        http = http.bearer_auth(key);
    }
    let result: anyhow::Result<()> = async {
        let mut response = http.send().await?;
        if !response.status().is_success() {
            bail!("HTTP {}: {}", response.status(), response.text().await.unwrap_or_default());
        }
        let mut buffer = String::new();
        let mut last = None::<f64>;
        let mut chunks = 0usize;
        while let Some(bytes) = response.chunk().await? {
            buffer.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                for data in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                    let data = data.trim();
                    if data == "[DONE]" {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(data)?;
                    if let Some(err) = v.get("error") {
                        bail!("error event: {err}");
                    }
                    if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                        timing.output_tokens = n as usize;
                    }
                    if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                        let now = started.elapsed().as_secs_f64();
                        match last {
                            None => timing.ttft = now,
                            Some(prev) => timing.itl.push(now - prev),
                        }
                        last = Some(now);
                        chunks += 1;
                    }
                }
            }
        }
        if timing.output_tokens == 0 {
            timing.output_tokens = chunks;
        }
        Ok(())
    }
    .await;
    timing.e2e = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => timing.ok = true,
        Err(e) => timing.error = Some(format!("{e:#}")),
    }
    timing
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles { mean_ms: f64::NAN, median_ms: f64::NAN, p99_ms: f64::NAN };
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] * 1e3;
    Percentiles {
        mean_ms: v.iter().sum::<f64>() / v.len() as f64 * 1e3,
        median_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

fn print_result(r: &ServeResult) {
    println!("============ Serving Benchmark Result ============");
    println!("{:<40}{:>10}", "Successful requests:", r.successful_requests);
    println!("{:<40}{:>10}", "Failed requests:", r.failed_requests);
    println!("{:<40}{:>10.2}", "Benchmark duration (s):", r.duration_s);
    println!("{:<40}{:>10}", "Total input tokens:", r.total_input_tokens);
    println!("{:<40}{:>10}", "Total generated tokens:", r.total_output_tokens);
    println!("{:<40}{:>10.2}", "Request throughput (req/s):", r.request_throughput);
    println!("{:<40}{:>10.2}", "Output token throughput (tok/s):", r.output_throughput);
    println!("{:<40}{:>10.2}", "Total Token throughput (tok/s):", r.total_token_throughput);
    println!(
        "{:<40}{:>10}",
        "Self-check (max_tokens each):",
        if r.check.passed { "passed" } else { "FAILED" }
    );
    for (name, p) in [("TTFT", &r.ttft), ("TPOT", &r.tpot), ("ITL", &r.itl), ("E2EL", &r.e2el)] {
        println!("{:<40}{:>10.2}", format!("Mean {name} (ms):"), p.mean_ms);
        println!("{:<40}{:>10.2}", format!("Median {name} (ms):"), p.median_ms);
        println!("{:<40}{:>10.2}", format!("P99 {name} (ms):"), p.p99_ms);
    }
    if let Some(split) = &r.ttft_by_prompt_length {
        let at = split.split_at;
        for (class, n, p) in
            [("short", split.short_requests, &split.short), ("long", split.long_requests, &split.long)]
        {
            let bound = if class == "short" { format!("<= {at}") } else { format!("> {at}") };
            println!("{:-^50}", format!(" TTFT, {n} {class} prompts ({bound} tokens) "));
            println!("{:<40}{:>10.2}", "Mean TTFT (ms):", p.mean_ms);
            println!("{:<40}{:>10.2}", "Median TTFT (ms):", p.median_ms);
            println!("{:<40}{:>10.2}", "P99 TTFT (ms):", p.p99_ms);
        }
    }
    println!("==================================================");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(prompt_tokens: usize, ttft: f64) -> RequestTiming {
        RequestTiming { ok: true, prompt_tokens, ttft, ..Default::default() }
    }

    #[test]
    fn ttft_is_split_by_prompt_length() {
        let timings = [timing(8, 0.1), timing(1000, 5.0), timing(8, 0.3), timing(9, 2.0)];
        let refs: Vec<&RequestTiming> = timings.iter().collect();
        let split = TtftByLength::of(&refs, 8);
        assert_eq!((split.short_requests, split.long_requests), (2, 2));
        assert!((split.short.mean_ms - 200.0).abs() < 1e-9);
        assert!((split.long.median_ms - 5000.0).abs() < 1e-9);
        let json = serde_json::to_value(&split).unwrap();
        assert_eq!(json["short"]["p99_ms"], 300.0);
    }

    #[test]
    fn failed_and_short_requests_fail_the_check() {
        let done = |max_tokens, output_tokens, ok| RequestTiming {
            ok,
            max_tokens,
            output_tokens,
            ..Default::default()
        };
        assert!(CompletionCheck::of(&completions(&[done(4, 4, true), done(8, 8, true)])).passed);
        let failed = CompletionCheck::of(&completions(&[done(4, 4, true), done(8, 0, false)]));
        assert!(
            !failed.passed && failed.message.contains("unfinished: request 1 (0 of 8 tokens)"),
            "{failed:?}"
        );
        let short = CompletionCheck::of(&completions(&[done(4, 3, true)]));
        assert!(!short.passed && short.message.contains("request 0 (3 of 4 tokens)"), "{short:?}");
    }
}
