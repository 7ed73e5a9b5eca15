//! `pagoda bench`: offline throughput (like vLLM's benchmark_throughput),
//! single-stream latency, and an online load generator against a running
//! server (like `vllm bench serve`).

mod serve_load;
mod workload;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use pagoda_backend::Backend;
use pagoda_engine::{load_engine, GenerationRequest, LlmEngine, SamplingParams};
use serde::Serialize;

use crate::backends::{dispatch, loading_bar, BackendJob};
use crate::engine_args::EngineArgs;
pub use workload::WorkloadArgs;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Offline: submit every request at once and measure tokens per second.
    Throughput(ThroughputArgs),
    /// One request at a time: time to first token and decode speed.
    Latency(LatencyArgs),
    /// Online: drive a running server (Poisson arrivals or fixed concurrency).
    Serve(serve_load::ServeBenchArgs),
}

#[derive(Args, Debug)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Write the result as JSON here.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, default_value_t = 512)]
    pub input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Timed runs (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    pub num_iters: usize,
    #[arg(long)]
    pub output_json: Option<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Throughput(args) => dispatch(args.engine.device, Throughput(args)),
        BenchCommand::Latency(args) => dispatch(args.engine.device, Latency(args)),
        BenchCommand::Serve(args) => serve_load::run(args),
    }
}

/// Loads the engine, reporting the cold-start time (process start is not
/// ours to see; this is load start to ready).
fn load<B: Backend>(backend: B, args: &EngineArgs) -> anyhow::Result<(LlmEngine<B>, f64)> {
    let started = Instant::now();
    let bar = loading_bar();
    let engine = load_engine(backend, &args.model, args.engine_config()?, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("loading {}", args.model.display()))?;
    bar.finish_and_clear();
    Ok((engine, started.elapsed().as_secs_f64()))
}

/// A request that generates exactly `max_tokens` token ids and no text.
fn bench_request(id: String, prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    let mut req = GenerationRequest::new(id, prompt);
    req.sampling = SamplingParams::greedy();
    req.max_tokens = Some(max_tokens);
    req.ignore_eos = true;
    req.detokenize = false;
    req
}

#[derive(Serialize, Debug)]
struct ThroughputResult {
    device: String,
    num_requests: usize,
    prompt_tokens: usize,
    output_tokens: usize,
    elapsed_s: f64,
    requests_per_s: f64,
    output_tokens_per_s: f64,
    total_tokens_per_s: f64,
    load_s: f64,
    engine_steps: u64,
}

struct Throughput(ThroughputArgs);

impl BackendJob for Throughput {
    type Output = ();

    fn run<B: Backend, F>(self, make_backend: F) -> anyhow::Result<()>
    where
        F: FnOnce() -> anyhow::Result<B> + Send + 'static,
    {
        let args = self.0;
        let (mut engine, load_s) = load(make_backend()?, &args.engine)?;
        let device = engine.runner().backend().name();
        let requests = args.workload.load(engine.info().vocab_size)?;
        let prompt_tokens: usize = requests.iter().map(|r| r.prompt_token_ids.len()).sum();
        let bar = indicatif::ProgressBar::new(requests.iter().map(|r| r.max_tokens as u64).sum());
        let steps_before = engine.metrics().engine_steps.get();
        let started = Instant::now();
        for (i, r) in requests.into_iter().enumerate() {
            engine.add_request(bench_request(format!("bench-{i}"), r.prompt_token_ids, r.max_tokens))?;
        }
        let mut output_tokens = 0usize;
        let mut finished = 0usize;
        while engine.has_unfinished_requests() {
            for out in engine.step()? {
                let n: usize = out.deltas.iter().map(|d| d.token_ids.len()).sum();
                output_tokens += n;
                bar.inc(n as u64);
                finished += out.finished as usize;
            }
        }
        let elapsed_s = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let result = ThroughputResult {
            device,
            num_requests: finished,
            prompt_tokens,
            output_tokens,
            elapsed_s,
            requests_per_s: finished as f64 / elapsed_s,
            output_tokens_per_s: output_tokens as f64 / elapsed_s,
            total_tokens_per_s: (prompt_tokens + output_tokens) as f64 / elapsed_s,
            load_s,
            engine_steps: engine.metrics().engine_steps.get() - steps_before,
        };
        println!("device:             {}", result.device);
        println!("requests:           {}", result.num_requests);
        println!("prompt tokens:      {}", result.prompt_tokens);
        println!("output tokens:      {}", result.output_tokens);
        println!("elapsed:            {:.2} s ({} engine steps)", result.elapsed_s, result.engine_steps);
        println!(
            "throughput:         {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s",
            result.requests_per_s, result.output_tokens_per_s, result.total_tokens_per_s
        );
        println!("model load:         {:.2} s", result.load_s);
        print_timings(&engine);
        write_json(args.output_json.as_ref(), &result)
    }
}

#[derive(Serialize, Debug)]
struct LatencyResult {
    device: String,
    input_len: usize,
    output_len: usize,
    ttft_s: Vec<f64>,
    decode_tokens_per_s: Vec<f64>,
    e2e_s: Vec<f64>,
    median_ttft_s: f64,
    median_decode_tokens_per_s: f64,
    load_s: f64,
    /// Process start to the first token of the first (warm-up) request.
    cold_start_s: f64,
}

struct Latency(LatencyArgs);

impl BackendJob for Latency {
    type Output = ();

    fn run<B: Backend, F>(self, make_backend: F) -> anyhow::Result<()>
    where
        F: FnOnce() -> anyhow::Result<B> + Send + 'static,
    {
        let args = self.0;
        anyhow::ensure!(args.output_len >= 2, "--output-len must be at least 2 to time decoding");
        let (mut engine, load_s) = load(make_backend()?, &args.engine)?;
        let device = engine.runner().backend().name();
        let vocab = engine.info().vocab_size;
        let mut ttft = Vec::new();
        let mut decode = Vec::new();
        let mut e2e = Vec::new();
        let mut cold_start_s = f64::NAN;
        for iter in 0..=args.num_iters {
            // A fresh random prompt each run, so the prefix cache cannot help.
            let prompt = workload::random_tokens(args.input_len, vocab, 1000 + iter as u64);
            engine.add_request(bench_request(format!("latency-{iter}"), prompt, args.output_len))?;
            let started = Instant::now();
            let mut first = None;
            while engine.has_unfinished_requests() {
                let outs = engine.step()?;
                if first.is_none() && outs.iter().any(|o| !o.deltas.is_empty()) {
                    first = Some(started.elapsed().as_secs_f64());
                }
            }
            let total = started.elapsed().as_secs_f64();
            let first = first.unwrap_or(total);
            if iter == 0 {
                let process_start = crate::PROCESS_START.get().copied().unwrap_or(started);
                cold_start_s = (started - process_start).as_secs_f64() + first;
            }
            if iter > 0 {
                ttft.push(first);
                decode.push((args.output_len - 1) as f64 / (total - first));
                e2e.push(total);
            }
        }
        let result = LatencyResult {
            device,
            input_len: args.input_len,
            output_len: args.output_len,
            median_ttft_s: median(&ttft),
            median_decode_tokens_per_s: median(&decode),
            ttft_s: ttft,
            decode_tokens_per_s: decode,
            e2e_s: e2e,
            load_s,
            cold_start_s,
        };
        println!("device:         {}", result.device);
        println!("prompt/output:  {} / {} tokens", result.input_len, result.output_len);
        println!("TTFT (median):  {:.1} ms", result.median_ttft_s * 1e3);
        println!(
            "decode:         {:.1} tok/s ({:.2} ms/token, median)",
            result.median_decode_tokens_per_s,
            1e3 / result.median_decode_tokens_per_s
        );
        println!("model load:     {:.2} s", result.load_s);
        println!("cold start:     {:.2} s (process start to the first token)", result.cold_start_s);
        print_timings(&engine);
        write_json(args.output_json.as_ref(), &result)
    }
}

/// Where the engine's steps spent their time (host wall clock; on a device,
/// launching only enqueues, and waiting for tokens is where the host idles
/// while the device works: under asynchronous scheduling, with the next step
/// already enqueued).
fn print_timings<B: Backend>(engine: &LlmEngine<B>) {
    let s = engine.step_timings();
    let r = engine.runner().timings();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "step time (ms):     {} steps: schedule {:.0}, prepare {:.0}, launch {:.0} (blocks {:.0}, upload {:.0}, \
         forward {:.0}, sample {:.0}), wait for tokens {:.0}, update {:.0}",
        s.steps,
        ms(s.schedule),
        ms(s.prepare),
        ms(s.launch),
        ms(r.move_blocks),
        ms(r.upload),
        ms(r.forward),
        ms(r.sample),
        ms(s.wait),
        ms(s.update)
    );
    let g = r.graphs;
    if g.warmups + g.replays + g.failed > 0 {
        println!(
            "decode graphs:      {} replays, {} captured, {} warm-up steps, {} failed captures",
            g.replays, g.captures, g.warmups, g.failed
        );
    }
    for (name, p) in [("decode-only steps", r.decode_only), ("steps with prefill", r.with_prefill)] {
        if p.steps > 0 {
            println!(
                "{name:<19} {} steps, {} tokens, {:.0} ms launching and waiting ({:.2} ms per step)",
                p.steps,
                p.tokens,
                ms(p.time),
                ms(p.time) / p.steps as f64
            );
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn write_json(path: Option<&PathBuf>, value: &impl Serialize) -> anyhow::Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
