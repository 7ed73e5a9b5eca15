//! `pagoda bench`: offline throughput (like vLLM's benchmark_throughput),
//! single-stream latency, and an online load generator against a running
//! server (like `vllm bench serve`). The offline benchmarks also report what
//! the KV cache went through (preemptions, swapping, peak occupancy, prefix
//! reuse), so a figure can be told apart from one that preempted. Every run
//! checks itself: under `ignore_eos` each request must finish with exactly its
//! `max_tokens`, or the command fails after printing and writing its figures.

mod check;
mod kv_view_cost;
mod lora;
mod serve_load;
mod workload;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use pagoda_backend::Backend;
use pagoda_engine::{GenerationRequest, LlmEngine, SamplingParams};
use serde::Serialize;

use crate::backends::{device_label, dispatch, loading_bar, BackendJob, EngineDevices};
use crate::engine_args::EngineArgs;
use check::{CompletionCheck, RequestCompletion};
pub use workload::WorkloadArgs;
use workload::WorkloadRequest;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Offline: submit every request at once and measure tokens per second.
    Throughput(ThroughputArgs),
    /// One request at a time: time to first token and decode speed.
    Latency(LatencyArgs),
    /// Online: drive a running server (Poisson arrivals or fixed concurrency).
    Serve(serve_load::ServeBenchArgs),
    /// Write a generated workload as JSONL (no model needed), for every engine
    /// of a comparison to read with --dataset.
    Workload(workload::WriteWorkloadArgs),
}

/// How the benchmark requests sample and whether they make text.
#[derive(Args, Debug, Clone, Copy)]
pub struct BenchSamplingArgs {
    /// Sampling temperature: 0 is greedy; vLLM's throughput benchmark samples at 1.0 (top-p 1).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Detokenize the outputs incrementally, as a server does (needs the model's
    /// tokenizer; a token-id model without one makes no text either way).
    #[arg(long)]
    pub detokenize: bool,
}

#[derive(Args, Debug)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub sampling: BenchSamplingArgs,
    /// Constrain every output to this JSON schema (structured outputs), to measure what
    /// the grammar costs: compare with the same run without it.
    #[arg(long)]
    pub json_schema: Option<PathBuf>,
    /// The tokenizer the grammar is built from, for a model without one (a random-weight
    /// model): a Hugging Face folder with tokenizer.json, or a model folder or GGUF file.
    #[arg(long, requires = "json_schema")]
    pub grammar_tokenizer: Option<PathBuf>,
    /// Measures what verifying K draft tokens costs: every decode carries K
    /// drafts (copies of its last token; accepted only where the model
    /// repeats it), so each step is a verification of K + 1 rows. Compare
    /// the time per step with the same run without it.
    #[arg(long, conflicts_with = "json_schema")]
    pub verify_drafts: Option<usize>,
    #[command(flatten)]
    pub lora: lora::LoraBenchArgs,
    /// Write the result as JSON here.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
    /// Build the dashboard's KV view this many times a second during the run (as the
    /// engine thread does while a /dashboard polls), and report its cost against the step time.
    #[arg(long)]
    pub kv_view_hz: Option<f64>,
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
    /// The prompt of every run: this file's text, tokenized (instead of
    /// --input-len random tokens; the prefix cache is reset between runs).
    /// For workloads whose text matters, such as speculative decoding's
    /// prompt lookup on a text to copy or edit.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// With --prompt-file: send the text as a chat user message through the
    /// model's chat template.
    #[arg(long, requires = "prompt_file")]
    pub chat: bool,
    #[command(flatten)]
    pub sampling: BenchSamplingArgs,
    /// Every run with the first synthetic adapter (see `bench throughput`).
    #[command(flatten)]
    pub lora: lora::LoraBenchArgs,
    #[arg(long)]
    pub output_json: Option<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Throughput(args) => dispatch(args.engine.device, Throughput(args)),
        BenchCommand::Latency(args) => dispatch(args.engine.device, Latency(args)),
        BenchCommand::Serve(args) => serve_load::run(args),
        BenchCommand::Workload(args) => workload::write(args),
    }
}

/// Loads the engine, reporting the cold-start time (process start is not
/// ours to see; this is load start to ready).
fn load<B: Backend>(devices: EngineDevices<B>, args: &EngineArgs) -> anyhow::Result<(LlmEngine<B>, f64)> {
    let started = Instant::now();
    let bar = loading_bar();
    let engine = devices
        .load_engine(args.model_path()?, args.engine_config()?, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .context("loading the model")?; // its errors name the file
    bar.finish_and_clear();
    Ok((engine, started.elapsed().as_secs_f64()))
}

/// A request that generates exactly `max_tokens` token ids (EOS ignored),
/// with text only under `--detokenize`.
fn bench_request(
    id: String,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: BenchSamplingArgs,
) -> GenerationRequest {
    let mut req = GenerationRequest::new(id, prompt);
    req.sampling = SamplingParams { temperature: sampling.temperature, ..SamplingParams::greedy() };
    req.max_tokens = Some(max_tokens);
    req.ignore_eos = true;
    req.detokenize = sampling.detokenize;
    req
}

/// The sampling settings a result records: `detokenized` is whether text was
/// made (asked for, and the model has a tokenizer).
#[derive(Serialize, Debug, Clone, PartialEq)]
struct SamplingReport {
    temperature: f32,
    detokenize: bool,
    detokenized: bool,
}

impl SamplingReport {
    fn of<B: Backend>(engine: &LlmEngine<B>, sampling: BenchSamplingArgs) -> Self {
        if sampling.detokenize && !engine.tokenizer().is_present() {
            eprintln!("note: --detokenize: the model has no tokenizer, so no text is made");
        }
        Self {
            temperature: sampling.temperature,
            detokenize: sampling.detokenize,
            detokenized: sampling.detokenize && engine.tokenizer().is_present(),
        }
    }
}

/// Cumulative KV-cache counters of an engine at one moment; a run's figures
/// are the difference between two snapshots.
#[derive(Clone, Copy, Debug)]
struct KvCounters {
    scheduler: pagoda_scheduler::SchedulerStats,
    swap: pagoda_paged_kv::SwapStats,
    prefix: pagoda_paged_kv::PrefixCacheStats,
}

impl KvCounters {
    fn read<B: Backend>(engine: &LlmEngine<B>) -> Self {
        let scheduler = engine.scheduler();
        Self {
            scheduler: scheduler.stats(),
            swap: scheduler.allocator().swap_stats(),
            prefix: scheduler.prefix_cache_stats(),
        }
    }
}

/// What the KV cache went through during a benchmark run.
#[derive(Serialize, Debug, Clone, PartialEq)]
struct KvCacheReport {
    /// Sequences preempted, of either kind.
    preemptions: u64,
    /// Preemptions that freed the blocks (the sequence recomputes its KV).
    recompute_preemptions: u64,
    /// Preemptions that copied the blocks to the CPU swap pool.
    swap_preemptions: u64,
    blocks_swapped_out: u64,
    /// Blocks copied back from the CPU pool (still-cached ones are reused instead).
    blocks_swapped_in: u64,
    num_gpu_blocks: usize,
    /// The most KV blocks in use at once since the engine was built (the
    /// benchmark's engine is built for the run, so this is the run's peak).
    peak_kv_blocks: usize,
    /// `peak_kv_blocks / num_gpu_blocks`.
    peak_kv_usage: f64,
    prefix_cache_queried_tokens: u64,
    prefix_cache_hit_tokens: u64,
    /// `prefix_cache_hit_tokens / prefix_cache_queried_tokens` (0 when nothing was queried).
    prefix_cache_hit_rate: f64,
}

impl KvCacheReport {
    /// The run's figures: counters since `before`, the peak since the engine was built.
    fn since<B: Backend>(engine: &LlmEngine<B>, before: &KvCounters) -> Self {
        let now = KvCounters::read(engine);
        let scheduler = engine.scheduler();
        let num_gpu_blocks = scheduler.kv_usage().num_gpu_blocks;
        let peak_kv_blocks = scheduler.allocator().peak_used_blocks();
        let queried = now.prefix.queried_tokens - before.prefix.queried_tokens;
        let hits = now.prefix.hit_tokens - before.prefix.hit_tokens;
        Self {
            preemptions: now.scheduler.num_preemptions - before.scheduler.num_preemptions,
            recompute_preemptions: now.scheduler.num_recompute_preemptions
                - before.scheduler.num_recompute_preemptions,
            swap_preemptions: now.scheduler.num_swap_preemptions - before.scheduler.num_swap_preemptions,
            blocks_swapped_out: now.swap.blocks_swapped_out - before.swap.blocks_swapped_out,
            blocks_swapped_in: now.swap.blocks_swapped_in - before.swap.blocks_swapped_in,
            num_gpu_blocks,
            peak_kv_blocks,
            peak_kv_usage: peak_kv_blocks as f64 / num_gpu_blocks.max(1) as f64,
            prefix_cache_queried_tokens: queried,
            prefix_cache_hit_tokens: hits,
            prefix_cache_hit_rate: if queried == 0 { 0.0 } else { hits as f64 / queried as f64 },
        }
    }
}

impl std::fmt::Display for KvCacheReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "preemptions:        {} (recompute {}, swap {})",
            self.preemptions, self.recompute_preemptions, self.swap_preemptions
        )?;
        writeln!(f, "swapped blocks:     {} out, {} in", self.blocks_swapped_out, self.blocks_swapped_in)?;
        writeln!(
            f,
            "peak KV cache:      {} of {} blocks ({:.1}%)",
            self.peak_kv_blocks,
            self.num_gpu_blocks,
            self.peak_kv_usage * 100.0
        )?;
        writeln!(
            f,
            "prefix cache:       {:.1}% hit rate ({} of {} prompt tokens)",
            self.prefix_cache_hit_rate * 100.0,
            self.prefix_cache_hit_tokens,
            self.prefix_cache_queried_tokens
        )
    }
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
    kv_cache: KvCacheReport,
    sampling: SamplingReport,
    /// The JSON schema every output was constrained to (`--json-schema`), if any.
    json_schema: Option<String>,
    /// Speculative decoding's counters, when it was on.
    speculative: Option<SpecReport>,
    /// Every request finished with exactly its max_tokens.
    check: CompletionCheck,
    /// `--kv-view-hz`: what building the dashboard's views cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_view: Option<kv_view_cost::KvViewCost>,
    /// `--synthetic-loras`: the adapters the requests ran with.
    #[serde(skip_serializing_if = "Option::is_none")]
    lora: Option<lora::LoraReport>,
}

struct Throughput(ThroughputArgs);

impl BackendJob for Throughput {
    type Output = ();

    fn run<B: Backend>(self, devices: EngineDevices<B>) -> anyhow::Result<()> {
        let args = self.0;
        let mut loras =
            lora::BenchLoras::write(args.lora, args.engine.model_path()?, args.engine.load_format)?;
        let (mut engine, load_s) = load(devices, &args.engine)?;
        anyhow::ensure!(
            loras.is_none() || engine.config().lora.is_some(),
            "--synthetic-loras needs --enable-lora (and --max-loras for the slots)"
        );
        if let Some(loras) = &mut loras {
            loras.preload(&engine)?;
        }
        let requests = args.workload.load(engine.info().vocab_size)?;
        let constraint = match &args.json_schema {
            Some(path) => Some(json_schema_constraint(&engine, path, args.grammar_tokenizer.as_deref())?),
            None => None,
        };
        if let Some(k) = args.verify_drafts {
            anyhow::ensure!(
                (1..=pagoda_engine::MAX_SPECULATIVE_TOKENS).contains(&k),
                "--verify-drafts must be between 1 and {}",
                pagoda_engine::MAX_SPECULATIVE_TOKENS
            );
            anyhow::ensure!(
                engine.config().speculative.is_none(),
                "--verify-drafts replaces --speculative-config"
            );
            let config = pagoda_engine::SpeculativeConfig::from_json(&format!(
                r#"{{"method": "ngram", "num_speculative_tokens": {k}, "min_acceptance_rate": 0}}"#
            ))
            .map_err(|e| anyhow::anyhow!(e))?;
            engine.set_proposer(config, Box::new(RepeatLastToken));
        }
        let probe = args.kv_view_hz.map(kv_view_cost::KvViewProbe::new).transpose()?;
        let mut result = measure_throughput(
            &mut engine,
            requests,
            load_s,
            args.sampling,
            constraint,
            probe,
            loras.as_ref(),
        )?;
        result.json_schema = args.json_schema.as_ref().map(|p| p.display().to_string());
        print!("{result}");
        if let Some(lora) = &result.lora {
            print!("{lora}");
        }
        if let Some(spec) = &result.speculative {
            spec.print();
        }
        print_timings(&engine);
        write_json(args.output_json.as_ref(), &result)?;
        result.check.ensure()
    }
}

/// `--verify-drafts`: drafts copies of the sequence's last token.
struct RepeatLastToken;

impl pagoda_engine::Proposer for RepeatLastToken {
    fn name(&self) -> &str {
        "repeat-last-token"
    }

    fn propose(
        &mut self,
        seqs: &[pagoda_engine::DraftRequest<'_>],
    ) -> Result<Vec<Vec<u32>>, pagoda_engine::EngineError> {
        Ok(seqs.iter().map(|s| s.tokens.last().map_or(Vec::new(), |&t| vec![t; s.max_drafts])).collect())
    }
}

/// The constraint of `--json-schema`: the schema compiled with the model's
/// tokenizer, or `--grammar-tokenizer`'s.
fn json_schema_constraint<B: Backend>(
    engine: &LlmEngine<B>,
    schema: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
) -> anyhow::Result<std::sync::Arc<dyn pagoda_engine::TokenConstraintFactory>> {
    let text = std::fs::read_to_string(schema).with_context(|| format!("reading {}", schema.display()))?;
    let schema_json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", schema.display()))?;
    let own;
    let tokenizer = match tokenizer {
        None => engine.tokenizer(),
        Some(path) if path.join("tokenizer.json").is_file() => {
            own = pagoda_models::Tokenizer::from_hf_dir(path)?;
            &own
        }
        Some(path) => {
            own = pagoda_models::ModelFiles::open(path)?.tokenizer;
            &own
        }
    };
    anyhow::ensure!(
        tokenizer.is_present(),
        "--json-schema needs a tokenizer: the model has none (give --grammar-tokenizer)"
    );
    let info = engine.info();
    let compiler = pagoda_structured::GrammarCompiler::new(tokenizer, &info.eos_token_ids, info.vocab_size)?;
    let grammar = compiler
        .compile(&pagoda_structured::GrammarSpec::JsonSchema(schema_json))
        .with_context(|| format!("compiling {}", schema.display()))?;
    Ok(std::sync::Arc::new(grammar))
}

/// Submits every request at once and runs the engine until all are done.
fn measure_throughput<B: Backend>(
    engine: &mut LlmEngine<B>,
    requests: Vec<WorkloadRequest>,
    load_s: f64,
    sampling: BenchSamplingArgs,
    constraint: Option<std::sync::Arc<dyn pagoda_engine::TokenConstraintFactory>>,
    mut kv_view_probe: Option<kv_view_cost::KvViewProbe>,
    loras: Option<&lora::BenchLoras>,
) -> anyhow::Result<ThroughputResult> {
    let device = device_label(engine);
    let sampling_report = SamplingReport::of(engine, sampling);
    let prompt_tokens: usize = requests.iter().map(|r| r.prompt_token_ids.len()).sum();
    let bar = indicatif::ProgressBar::new(requests.iter().map(|r| r.max_tokens as u64).sum());
    let mut completions: Vec<RequestCompletion> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| RequestCompletion {
            id: format!("bench-{i}"),
            max_tokens: r.max_tokens,
            output_tokens: 0,
            finished: false,
        })
        .collect();
    let index: std::collections::HashMap<String, usize> =
        completions.iter().enumerate().map(|(i, c)| (c.id.clone(), i)).collect();
    let steps_before = engine.metrics().engine_steps.get();
    let kv_before = KvCounters::read(engine);
    let started = Instant::now();
    for (i, (r, c)) in requests.into_iter().zip(&completions).enumerate() {
        let mut req = bench_request(c.id.clone(), r.prompt_token_ids, r.max_tokens, sampling);
        req.constraint = constraint.clone();
        req.lora = loras.map(|l| l.for_request(i));
        engine.add_request(req)?;
    }
    while engine.has_unfinished_requests() {
        let step_started = Instant::now();
        let outputs = engine.step()?;
        if let Some(probe) = &mut kv_view_probe {
            probe.stepped(step_started.elapsed());
            probe.at_step_boundary(engine);
        }
        for out in outputs {
            let n: usize = out.deltas.iter().map(|d| d.token_ids.len()).sum();
            bar.inc(n as u64);
            if let Some(c) = index.get(&out.request_id).map(|&i| &mut completions[i]) {
                c.output_tokens += n;
                c.finished |= out.finished;
            }
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    // The totals are the per-request tallies the self-check reads.
    let check = CompletionCheck::of(&completions);
    let (finished, output_tokens) = (check.finished_requests, check.output_tokens);
    let engine_steps = engine.metrics().engine_steps.get() - steps_before;
    Ok(ThroughputResult {
        device,
        num_requests: finished,
        prompt_tokens,
        output_tokens,
        elapsed_s,
        requests_per_s: finished as f64 / elapsed_s,
        output_tokens_per_s: output_tokens as f64 / elapsed_s,
        total_tokens_per_s: (prompt_tokens + output_tokens) as f64 / elapsed_s,
        load_s,
        engine_steps,
        kv_cache: KvCacheReport::since(engine, &kv_before),
        sampling: sampling_report,
        json_schema: None,
        speculative: SpecReport::of(engine),
        check,
        kv_view: kv_view_probe.map(|probe| probe.report(engine_steps)),
        lora: loras.map(|l| l.report(engine)),
    })
}

impl std::fmt::Display for ThroughputResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "device:             {}", self.device)?;
        writeln!(f, "requests:           {}", self.num_requests)?;
        writeln!(f, "prompt tokens:      {}", self.prompt_tokens)?;
        writeln!(f, "output tokens:      {}", self.output_tokens)?;
        writeln!(f, "elapsed:            {:.2} s ({} engine steps)", self.elapsed_s, self.engine_steps)?;
        writeln!(
            f,
            "throughput:         {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s",
            self.requests_per_s, self.output_tokens_per_s, self.total_tokens_per_s
        )?;
        writeln!(f, "model load:         {:.2} s", self.load_s)?;
        writeln!(
            f,
            "sampling:           temperature {}, {}",
            self.sampling.temperature,
            if self.sampling.detokenized { "detokenized" } else { "token ids only" }
        )?;
        writeln!(
            f,
            "self-check:         {}",
            if self.check.passed {
                "passed (every request produced exactly its max_tokens)"
            } else {
                "FAILED"
            }
        )?;
        write!(f, "{}", self.kv_cache)?;
        match &self.kv_view {
            Some(cost) => write!(f, "{cost}"),
            None => Ok(()),
        }
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
    /// Over all runs, the warm-up included.
    kv_cache: KvCacheReport,
    sampling: SamplingReport,
    /// Every run, the warm-up included, produced exactly --output-len tokens.
    check: CompletionCheck,
    /// `--prompt-file`, when the prompt was text.
    prompt_file: Option<String>,
    /// The token ids that prompt became (chat template and all), so that a
    /// peer engine can be given the very same prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_token_ids: Option<Vec<u32>>,
    /// Speculative decoding's counters over all runs, when it was on.
    speculative: Option<SpecReport>,
    /// `--synthetic-loras`: the adapter the runs used.
    #[serde(skip_serializing_if = "Option::is_none")]
    lora: Option<lora::LoraReport>,
}

/// What speculative decoding did in a benchmark (vLLM's spec-decode metrics).
#[derive(Serialize, Debug)]
struct SpecReport {
    config: String,
    num_drafts: u64,
    num_draft_tokens: u64,
    num_accepted_tokens: u64,
    /// Accepted drafts over drafted ones.
    acceptance_rate: f64,
    /// Tokens a verification gave on average (accepted drafts + 1).
    mean_accepted_length: f64,
    /// Per draft position: accepted / drafted there.
    acceptance_rate_per_position: Vec<f64>,
    steps_disabled_by_batch: u64,
    steps_paused_by_acceptance: u64,
    steps_paused_without_drafts: u64,
    propose_s: f64,
}

impl SpecReport {
    fn of<B: Backend>(engine: &LlmEngine<B>) -> Option<Self> {
        let stats = engine.spec_decode_stats()?;
        let config = engine
            .speculation()
            .map(|(c, proposer)| format!("{proposer}, k = {}: {c:?}", c.num_speculative_tokens))
            .unwrap_or_default();
        Some(Self {
            config,
            num_drafts: stats.num_drafts,
            num_draft_tokens: stats.num_draft_tokens,
            num_accepted_tokens: stats.num_accepted_tokens,
            acceptance_rate: stats.acceptance_rate(),
            mean_accepted_length: stats.mean_accepted_length(),
            acceptance_rate_per_position: stats
                .accepted_per_position
                .iter()
                .zip(&stats.drafted_per_position)
                .map(|(&a, &d)| if d == 0 { 0.0 } else { a as f64 / d as f64 })
                .collect(),
            steps_disabled_by_batch: stats.steps_disabled_by_batch,
            steps_paused_by_acceptance: stats.steps_paused_by_acceptance,
            steps_paused_without_drafts: stats.steps_paused_without_drafts,
            propose_s: stats.propose_time.as_secs_f64(),
        })
    }

    fn print(&self) {
        let per_position: Vec<String> =
            self.acceptance_rate_per_position.iter().map(|r| format!("{:.2}", r)).collect();
        println!(
            "speculative:    {} verifications, {} drafts, {} accepted ({:.1}%), mean accepted length {:.2}, per position [{}]",
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            self.acceptance_rate * 100.0,
            self.mean_accepted_length,
            per_position.join(", ")
        );
    }
}

/// The prompt of `--prompt-file` (with `--chat`, as a chat user message).
fn text_prompt<B: Backend>(
    engine: &LlmEngine<B>,
    path: &std::path::Path,
    chat: bool,
) -> anyhow::Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(engine.tokenizer().is_present(), "--prompt-file needs the model's tokenizer");
    crate::generate::prompt_tokens(engine, &text, chat, None)
}

struct Latency(LatencyArgs);

impl BackendJob for Latency {
    type Output = ();

    fn run<B: Backend>(self, devices: EngineDevices<B>) -> anyhow::Result<()> {
        let args = self.0;
        anyhow::ensure!(args.output_len >= 2, "--output-len must be at least 2 to time decoding");
        let mut loras =
            lora::BenchLoras::write(args.lora, args.engine.model_path()?, args.engine.load_format)?;
        let (mut engine, load_s) = load(devices, &args.engine)?;
        anyhow::ensure!(
            loras.is_none() || engine.config().lora.is_some(),
            "--synthetic-loras needs --enable-lora"
        );
        if let Some(loras) = &mut loras {
            loras.preload(&engine)?;
        }
        let device = device_label(&engine);
        let vocab = engine.info().vocab_size;
        let mut ttft = Vec::new();
        let mut decode = Vec::new();
        let mut e2e = Vec::new();
        let mut cold_start_s = f64::NAN;
        let sampling = SamplingReport::of(&engine, args.sampling);
        let mut completions = Vec::new();
        let kv_before = KvCounters::read(&engine);
        let text = match &args.prompt_file {
            Some(path) => Some(text_prompt(&engine, path, args.chat)?),
            None => None,
        };
        for iter in 0..=args.num_iters {
            // A fresh random prompt each run, so the prefix cache cannot help;
            // a text prompt is the same each run, so the cache is emptied.
            let prompt = match &text {
                Some(tokens) => {
                    engine.reset_prefix_cache();
                    tokens.clone()
                }
                None => workload::random_tokens(args.input_len, vocab, 1000 + iter as u64),
            };
            let id = format!("latency-{iter}");
            let mut req = bench_request(id.clone(), prompt, args.output_len, args.sampling);
            req.lora = loras.as_ref().map(|l| l.for_request(0));
            engine.add_request(req)?;
            let started = Instant::now();
            let mut first = None;
            let mut done =
                RequestCompletion { id, max_tokens: args.output_len, output_tokens: 0, finished: false };
            while engine.has_unfinished_requests() {
                let outs = engine.step()?;
                if first.is_none() && outs.iter().any(|o| !o.deltas.is_empty()) {
                    first = Some(started.elapsed().as_secs_f64());
                }
                for out in outs {
                    done.output_tokens += out.deltas.iter().map(|d| d.token_ids.len()).sum::<usize>();
                    done.finished |= out.finished;
                }
            }
            completions.push(done);
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
            input_len: text.as_ref().map_or(args.input_len, Vec::len),
            output_len: args.output_len,
            median_ttft_s: median(&ttft),
            median_decode_tokens_per_s: median(&decode),
            ttft_s: ttft,
            decode_tokens_per_s: decode,
            e2e_s: e2e,
            load_s,
            cold_start_s,
            kv_cache: KvCacheReport::since(&engine, &kv_before),
            sampling,
            check: CompletionCheck::of(&completions),
            prompt_file: args.prompt_file.as_ref().map(|p| p.display().to_string()),
            prompt_token_ids: text,
            speculative: SpecReport::of(&engine),
            lora: loras.as_ref().map(|l| l.report(&engine)),
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
        println!(
            "self-check:     {}",
            if result.check.passed {
                "passed (every run produced exactly --output-len tokens)"
            } else {
                "FAILED"
            }
        );
        print!("{}", result.kv_cache);
        if let Some(lora) = &result.lora {
            print!("{lora}");
        }
        if let Some(spec) = &result.speculative {
            spec.print();
        }
        print_timings(&engine);
        write_json(args.output_json.as_ref(), &result)?;
        result.check.ensure()
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
         forward {:.0}, sample {:.0} of which token masks {:.0}), wait for tokens {:.0}, update {:.0}",
        s.steps,
        ms(s.schedule),
        ms(s.prepare),
        ms(s.launch),
        ms(r.move_blocks),
        ms(r.upload),
        ms(r.forward),
        ms(r.sample),
        ms(r.token_masks),
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

#[cfg(test)]
mod tests {
    use super::*;
    use pagoda_backend_cpu_ref::CpuBackend;
    use pagoda_engine::load_engine;
    use pagoda_engine::{EngineConfig, PreemptionMode};

    const GREEDY: BenchSamplingArgs = BenchSamplingArgs { temperature: 0.0, detokenize: false };

    /// The tiny random-weight Llama of the model tests (2 layers, vocabulary 320).
    fn tiny_engine(config: EngineConfig) -> LlmEngine<CpuBackend> {
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
        load_engine(CpuBackend::new(), model, config, |_, _| {}).expect("tiny-llama loads")
    }

    /// Six requests of 24 prompt + 24 output tokens: 3 blocks of 16 each, 18 in all.
    fn six_requests() -> Vec<WorkloadRequest> {
        (0..6)
            .map(|i| WorkloadRequest {
                prompt_token_ids: workload::random_tokens(24, 320, 100 + i),
                max_tokens: 24,
            })
            .collect()
    }

    /// A KV cache of 8 blocks, which the six requests cannot share without preemption.
    fn tiny_cache(preemption_mode: PreemptionMode) -> EngineConfig {
        EngineConfig {
            block_size: 16,
            num_gpu_blocks: Some(8),
            max_model_len: Some(64),
            preemption_mode,
            ..EngineConfig::default()
        }
    }

    #[test]
    fn kv_view_probe_builds_views_between_steps_and_reports_them() {
        let mut engine = tiny_engine(tiny_cache(PreemptionMode::Recompute));
        // A rate far above the step rate: a view at (almost) every step boundary.
        let probe = kv_view_cost::KvViewProbe::new(1e6).unwrap();
        let result =
            measure_throughput(&mut engine, six_requests(), 0.0, GREEDY, None, Some(probe), None).unwrap();
        let cost = result.kv_view.as_ref().expect("a --kv-view-hz run reports the views' cost");
        assert!(cost.views_served > 1, "{cost:?}");
        assert!(cost.largest_view_used_blocks > 0 && cost.largest_view_seqs > 0, "{cost:?}");
        assert!(cost.step_time_s > 0.0 && cost.share_of_step_time >= 0.0, "{cost:?}");
        assert!(result.to_string().contains("dashboard KV view:"));
        assert!(serde_json::to_value(&result).unwrap()["kv_view"]["commit"].is_string());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(kv_view_cost::KvViewProbe::new(bad).is_err(), "{bad}");
        }
        let plain = measure_throughput(
            &mut tiny_engine(tiny_cache(PreemptionMode::Recompute)),
            six_requests(),
            0.0,
            GREEDY,
            None,
            None,
            None,
        )
        .unwrap();
        assert!(serde_json::to_value(&plain).unwrap().get("kv_view").is_none(), "absent unless asked for");
    }

    /// Runs the throughput benchmark and checks what holds for any run.
    fn run(config: EngineConfig) -> ThroughputResult {
        let mut engine = tiny_engine(config);
        let result = measure_throughput(&mut engine, six_requests(), 0.0, GREEDY, None, None, None).unwrap();
        assert_eq!((result.num_requests, result.output_tokens), (6, 6 * 24), "every request completes");
        assert!(result.check.passed, "{:?}", result.check);
        assert_eq!(result.check.expected_output_tokens, 6 * 24);
        let kv = &result.kv_cache;
        assert_eq!(kv.preemptions, kv.recompute_preemptions + kv.swap_preemptions);
        assert!(kv.peak_kv_blocks > 0 && kv.peak_kv_blocks <= kv.num_gpu_blocks, "{kv:?}");
        assert_eq!(kv.peak_kv_usage, kv.peak_kv_blocks as f64 / kv.num_gpu_blocks as f64);
        assert!(kv.prefix_cache_hit_tokens <= kv.prefix_cache_queried_tokens, "{kv:?}");
        // The text and the JSON report the same figures.
        let text = result.to_string();
        let preemptions = format!(
            "preemptions:        {} (recompute {}, swap {})",
            kv.preemptions, kv.recompute_preemptions, kv.swap_preemptions
        );
        assert!(text.contains(&preemptions), "{text}");
        assert!(text.contains(&format!(
            "swapped blocks:     {} out, {} in",
            kv.blocks_swapped_out, kv.blocks_swapped_in
        )));
        assert!(text
            .contains(&format!("peak KV cache:      {} of {} blocks", kv.peak_kv_blocks, kv.num_gpu_blocks)));
        assert!(text.contains("prefix cache:       "), "{text}");
        let json = serde_json::to_value(&result).unwrap();
        for (key, value) in [
            ("preemptions", kv.preemptions),
            ("recompute_preemptions", kv.recompute_preemptions),
            ("swap_preemptions", kv.swap_preemptions),
            ("blocks_swapped_out", kv.blocks_swapped_out),
            ("blocks_swapped_in", kv.blocks_swapped_in),
            ("peak_kv_blocks", kv.peak_kv_blocks as u64),
            ("prefix_cache_hit_tokens", kv.prefix_cache_hit_tokens),
        ] {
            assert_eq!(json["kv_cache"][key], value, "{key}");
        }
        assert_eq!(json["kv_cache"]["peak_kv_usage"], kv.peak_kv_usage);
        result
    }

    #[test]
    fn a_tiny_cache_reports_recompute_preemptions_and_a_full_peak() {
        let kv = run(tiny_cache(PreemptionMode::Recompute)).kv_cache;
        assert!(kv.recompute_preemptions > 0, "{kv:?}");
        assert_eq!((kv.swap_preemptions, kv.blocks_swapped_out, kv.blocks_swapped_in), (0, 0, 0));
        // A sequence is preempted only when no block is free: the cache was full.
        assert_eq!((kv.peak_kv_blocks, kv.num_gpu_blocks), (8, 8));
        assert_eq!(kv.peak_kv_usage, 1.0);
    }

    #[test]
    fn a_tiny_cache_in_swap_mode_reports_swapped_blocks() {
        let kv = run(tiny_cache(PreemptionMode::Swap)).kv_cache;
        assert!(kv.swap_preemptions > 0, "{kv:?}");
        assert_eq!(kv.recompute_preemptions, 0);
        // Each swap-out copies at least one block; each swapped sequence came
        // back, copying at least its partly filled last block.
        assert!(kv.blocks_swapped_out >= kv.swap_preemptions, "{kv:?}");
        assert!(kv.blocks_swapped_in > 0 && kv.blocks_swapped_in <= kv.blocks_swapped_out, "{kv:?}");
        assert_eq!(kv.peak_kv_blocks, 8);
    }

    #[test]
    fn shared_prompt_prefixes_report_prefix_cache_hits() {
        let mut engine = tiny_engine(EngineConfig { max_model_len: Some(64), ..EngineConfig::default() });
        let prefix = workload::random_tokens(32, 320, 7);
        let request = |i: u64| WorkloadRequest {
            prompt_token_ids: [prefix.clone(), workload::random_tokens(8, 320, 200 + i)].concat(),
            max_tokens: 4,
        };
        // The first request computes the shared two blocks; the next ones reuse them.
        measure_throughput(&mut engine, vec![request(0)], 0.0, GREEDY, None, None, None).unwrap();
        let kv =
            measure_throughput(&mut engine, (1..4).map(request).collect(), 0.0, GREEDY, None, None, None)
                .unwrap()
                .kv_cache;
        assert_eq!((kv.prefix_cache_queried_tokens, kv.prefix_cache_hit_tokens), (3 * 40, 3 * 32), "{kv:?}");
        assert_eq!(kv.prefix_cache_hit_rate, 0.8);
        assert_eq!(kv.preemptions, 0);
    }

    #[test]
    fn a_cache_with_room_reports_no_preemption() {
        let kv = run(EngineConfig { max_model_len: Some(64), ..EngineConfig::default() }).kv_cache;
        assert_eq!((kv.preemptions, kv.blocks_swapped_out, kv.blocks_swapped_in), (0, 0, 0), "{kv:?}");
        // All six run at once: 18 blocks, far from the default cache's size.
        assert_eq!(kv.peak_kv_blocks, 18, "{kv:?}");
        assert!(kv.peak_kv_usage < 0.5, "{kv:?}");
    }

    #[test]
    fn sampled_and_detokenized_runs_check_themselves() {
        let mut engine = tiny_engine(EngineConfig { max_model_len: Some(64), ..EngineConfig::default() });
        let sampled = BenchSamplingArgs { temperature: 1.0, detokenize: true };
        let result = measure_throughput(&mut engine, six_requests(), 0.0, sampled, None, None, None).unwrap();
        assert!(result.check.passed, "{:?}", result.check);
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["sampling"]["temperature"], 1.0);
        assert_eq!(json["sampling"]["detokenize"], true);
        assert_eq!(json["sampling"]["detokenized"], true, "tiny-llama has a tokenizer");
        assert_eq!(json["check"]["passed"], true);
        assert_eq!(json["check"]["expected_output_tokens"], 6 * 24);
        assert!(result.to_string().contains("self-check:         passed"), "{result}");
    }
}
