//! Command-line options of the simulator, shared by the `sim` example and
//! `pagoda sim` (flatten [`SimArgs`] into a clap command and call [`run_cli`]).

use std::fmt::Write as _;
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use super::{
    compare, format_table, to_csv, AllocatorKind, SimConfig, SimError, StepCostModel, SyntheticTrace, Trace,
};
use crate::{PreemptionMode, SchedulerConfig};

/// Simulate KV allocators side by side on one request trace.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct SimArgs {
    /// Replay this JSONL trace (one {"arrival", "prompt_len", "output_len"}
    /// object per line) instead of generating one.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Generated trace: number of requests.
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,
    /// Generated trace: mean arrivals per second (Poisson); "inf" sends all at once.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Generated trace: mean prompt length (log-normal).
    #[arg(long, default_value_t = 161.0)]
    pub mean_prompt: f64,
    /// Generated trace: mean output length (log-normal).
    #[arg(long, default_value_t = 338.0)]
    pub mean_output: f64,
    /// Generated trace: log-space standard deviation of prompt lengths.
    #[arg(long, default_value_t = 1.0)]
    pub sigma_prompt: f64,
    /// Generated trace: log-space standard deviation of output lengths.
    #[arg(long, default_value_t = 1.0)]
    pub sigma_output: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the trace used to this JSONL file.
    #[arg(long)]
    pub write_trace: Option<PathBuf>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV cache size in blocks, the same for every allocator.
    #[arg(long, default_value_t = 960)]
    pub gpu_blocks: usize,
    /// CPU swap pool size in blocks.
    #[arg(long, default_value_t = 0)]
    pub cpu_blocks: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_model_len: usize,
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Preempt by swapping to the CPU pool instead of recomputing.
    #[arg(long)]
    pub swap: bool,
    /// Enable prefix caching in the paged allocator.
    #[arg(long)]
    pub prefix_caching: bool,
    /// Allocators to compare: paged, max-len, pow2, exact.
    #[arg(long, value_delimiter = ',', default_value = "paged,max-len,pow2,exact")]
    pub allocators: Vec<String>,
    /// Write the results as CSV to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Step cost: fixed milliseconds per step.
    #[arg(long, default_value_t = 15.0)]
    pub step_overhead_ms: f64,
    /// Step cost: microseconds per batched token.
    #[arg(long, default_value_t = 100.0)]
    pub per_token_us: f64,
    /// Step cost: microseconds per context token read by attention.
    #[arg(long, default_value_t = 0.5)]
    pub per_context_token_us: f64,
}

impl SimArgs {
    pub fn sim_config(&self) -> SimConfig {
        SimConfig {
            block_size: self.block_size,
            num_gpu_blocks: self.gpu_blocks,
            num_cpu_blocks: self.cpu_blocks,
            enable_prefix_caching: self.prefix_caching,
            scheduler: SchedulerConfig {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
                max_model_len: self.max_model_len,
                preemption_mode: if self.swap { PreemptionMode::Swap } else { PreemptionMode::Recompute },
                ..SchedulerConfig::default()
            },
            cost: StepCostModel {
                step_overhead_s: self.step_overhead_ms * 1e-3,
                per_batched_token_s: self.per_token_us * 1e-6,
                per_context_token_s: self.per_context_token_us * 1e-6,
                ..StepCostModel::default()
            },
            ..SimConfig::default()
        }
    }

    pub fn load_trace(&self) -> Result<Trace, SimError> {
        match &self.trace {
            Some(path) => {
                let f = File::open(path).map_err(|e| SimError::Io(format!("{}: {e}", path.display())))?;
                Trace::from_jsonl(BufReader::new(f))
            }
            None => SyntheticTrace {
                num_requests: self.requests,
                request_rate: self.rate,
                mean_prompt_len: self.mean_prompt,
                mean_output_len: self.mean_output,
                sigma_prompt: self.sigma_prompt,
                sigma_output: self.sigma_output,
                max_model_len: self.max_model_len,
                seed: self.seed,
            }
            .generate(),
        }
    }
}

/// Runs the comparison the arguments describe, writes the optional files,
/// and returns the text to print (a description of the setup and the table).
pub fn run_cli(args: &SimArgs) -> Result<String, SimError> {
    let kinds =
        args.allocators.iter().map(|a| AllocatorKind::parse(a.trim())).collect::<Result<Vec<_>, _>>()?;
    let trace = args.load_trace()?;
    if let Some(path) = &args.write_trace {
        let f = File::create(path).map_err(|e| SimError::Io(format!("{}: {e}", path.display())))?;
        trace.write_jsonl(std::io::BufWriter::new(f))?;
    }
    let config = args.sim_config();
    let reports = compare(&trace, &config, &kinds)?;
    if let Some(path) = &args.csv {
        std::fs::write(path, to_csv(&reports))
            .map_err(|e| SimError::Io(format!("{}: {e}", path.display())))?;
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "trace: {} requests, mean prompt {:.1}, mean output {:.1} tokens, last arrival {:.1} s",
        trace.requests.len(),
        trace.mean_prompt_len(),
        trace.mean_output_len(),
        trace.requests.last().map_or(0.0, |r| r.arrival)
    );
    let _ = writeln!(
        s,
        "KV cache: {} blocks x {} tokens = {} token slots; max_model_len {}, max_num_seqs {}, \
         max_num_batched_tokens {}, preemption {}\n",
        config.num_gpu_blocks,
        config.block_size,
        config.num_gpu_blocks * config.block_size,
        config.scheduler.max_model_len,
        config.scheduler.max_num_seqs,
        config.scheduler.max_num_batched_tokens,
        if args.swap { "swap" } else { "recompute" }
    );
    s.push_str(&format_table(&reports));
    s.push_str(
        "\nutil = pool share holding tokens; waste = reserved-but-empty share of reserved memory; \
         xfrag = free share outside the largest free run\n(time-averaged); lat = mean (finish - arrival) / output tokens.\n",
    );
    Ok(s)
}
