//! A trace-driven simulator of the scheduler over different KV allocators:
//! the research use of this crate.
//!
//! It replays a request trace (arrival time, prompt length, output length)
//! through the real [`Scheduler`] and a real [`KvAllocator`], with a simple
//! step-cost model standing in for the GPU, and reports, per allocator, KV
//! memory utilisation and waste, concurrency, preemptions and throughput in
//! simulated time. Run it with
//! `cargo run --release -p pagoda-scheduler --example sim -- --help`.
//!
//! # What "waste" means
//! At every step the allocator reports its *reserved* slots (slots of blocks
//! held by some sequence: whole blocks for paging, whole reservations for the
//! contiguous baselines) and its *token* slots (slots holding a token's KV).
//! Waste is reserved-but-empty memory as a share of reserved memory,
//! averaged over simulated time:
//!
//! `waste = Σ_steps dt · (reserved − tokens) / Σ_steps dt · reserved`
//!
//! For paging that is only the unfilled tail of each sequence's last block;
//! for a max-length reservation it is everything a sequence reserved but has
//! not (yet, or ever) written: the paper's "reservation" and "internal
//! fragmentation" together. External fragmentation (free memory in gaps too
//! small for a new reservation) is reported separately as the time-averaged
//! share of *free* blocks outside the largest free run; paging has none.
//! `util` is the time-averaged share of the whole pool holding tokens.

pub mod animation;
#[cfg(feature = "cli")]
mod args;
mod trace;

use std::fmt::Write as _;

use pagoda_paged_kv::{
    ContiguousAllocator, ContiguousConfig, KvAllocator, KvConfigError, PagedAllocator, PagedConfig,
    Reservation,
};
use thiserror::Error;

#[cfg(feature = "cli")]
pub use args::{run_cli, SimArgs};
pub use trace::{SyntheticTrace, Trace, TraceRequest};

use crate::{
    AddRequestError, ConfigError, NewRequest, RequestId, Scheduler, SchedulerConfig, SchedulerError,
    SchedulerOutput, SeqId, TokenId, UpdateError,
};

/// Why a simulation could not run.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum SimError {
    #[error("invalid trace: {0}")]
    InvalidTrace(String),
    #[error("trace line {line}: {message}")]
    TraceLine { line: usize, message: String },
    #[error("{0}")]
    InvalidOption(String),
    #[error("I/O: {0}")]
    Io(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    KvConfig(#[from] KvConfigError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Update(#[from] UpdateError),
    #[error("the simulation made no progress at step {step} ({unfinished} requests unfinished)")]
    Stalled { step: u64, unfinished: usize },
    #[error("unknown allocator {0:?} (expected paged, max-len, pow2 or exact)")]
    UnknownAllocator(String),
}

/// Which allocator to simulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocatorKind {
    /// [`PagedAllocator`].
    Paged,
    /// [`ContiguousAllocator`] reserving `max_model_len` per sequence.
    MaxLen,
    /// [`ContiguousAllocator`] reserving prompt + output rounded up to a power of two.
    Pow2,
    /// [`ContiguousAllocator`] reserving exactly prompt + output (an oracle).
    Exact,
}

impl AllocatorKind {
    pub const ALL: [AllocatorKind; 4] =
        [AllocatorKind::Paged, AllocatorKind::MaxLen, AllocatorKind::Pow2, AllocatorKind::Exact];

    pub fn name(self) -> &'static str {
        match self {
            AllocatorKind::Paged => "paged",
            AllocatorKind::MaxLen => "max-len",
            AllocatorKind::Pow2 => "pow2",
            AllocatorKind::Exact => "exact",
        }
    }

    pub fn parse(s: &str) -> Result<Self, SimError> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| SimError::UnknownAllocator(s.to_string()))
    }
}

/// Time one step takes: a fixed cost (reading the weights), plus compute per
/// batched token, plus attention's reads of the context, plus block moves.
///
/// The defaults are rough figures for a 13B model on one A100 (the vLLM
/// paper's OPT-13B setting): 26 GB of weights at ~1.7 TB/s, ~26 GFLOP per
/// token, ~800 KB of KV per token, swaps over PCIe at ~25 GB/s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCostModel {
    pub step_overhead_s: f64,
    pub per_batched_token_s: f64,
    pub per_context_token_s: f64,
    /// Per block and per token of the block (scaled by the block size).
    pub per_swapped_token_s: f64,
    pub per_copied_token_s: f64,
}

impl Default for StepCostModel {
    fn default() -> Self {
        Self {
            step_overhead_s: 15e-3,
            per_batched_token_s: 0.1e-3,
            per_context_token_s: 0.5e-6,
            per_swapped_token_s: 32e-6,
            per_copied_token_s: 0.5e-6,
        }
    }
}

impl StepCostModel {
    pub fn step_time(&self, out: &SchedulerOutput, block_size: usize) -> f64 {
        let context: usize = out.scheduled.iter().map(|e| e.seq_len()).sum();
        let swapped = (out.blocks_to_swap_in.len() + out.blocks_to_swap_out.len()) * block_size;
        let copied = out.blocks_to_copy.len() * block_size;
        self.step_overhead_s
            + self.per_batched_token_s * out.num_batched_tokens as f64
            + self.per_context_token_s * context as f64
            + self.per_swapped_token_s * swapped as f64
            + self.per_copied_token_s * copied as f64
    }
}

/// Everything about the simulated server but the trace and the allocator.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    pub block_size: usize,
    /// The KV cache size, the same for every allocator.
    pub num_gpu_blocks: usize,
    pub num_cpu_blocks: usize,
    /// Paged allocator only (the trace's prompts share nothing, so this
    /// mostly measures the bookkeeping).
    pub enable_prefix_caching: bool,
    pub scheduler: SchedulerConfig,
    pub cost: StepCostModel,
    /// Give up after this many steps.
    pub max_steps: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            // 15,360 token slots: about the KV space OPT-13B leaves on a 40 GB A100.
            num_gpu_blocks: 960,
            num_cpu_blocks: 0,
            enable_prefix_caching: false,
            scheduler: SchedulerConfig::default(),
            cost: StepCostModel::default(),
            max_steps: 10_000_000,
        }
    }
}

/// The results of one simulation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SimReport {
    pub allocator: String,
    pub num_requests: usize,
    pub num_finished: usize,
    /// Refused at admission (could never fit under this allocator).
    pub num_rejected: usize,
    pub num_steps: u64,
    /// Simulated seconds until the last request finished.
    pub sim_time_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Mean over requests of (finish − arrival) / output tokens, as in the paper.
    pub mean_normalized_latency_s: f64,
    /// Time-averaged share of the pool holding tokens' KV.
    pub kv_utilization: f64,
    /// Time-averaged share of the pool reserved by sequences.
    pub kv_reserved: f64,
    /// Reserved-but-empty share of reserved memory (see the module docs).
    pub waste: f64,
    /// Time-averaged share of free blocks outside the largest free run.
    pub external_fragmentation: f64,
    pub max_running: usize,
    /// Time-averaged number of sequences holding KV memory.
    pub mean_running: f64,
    /// Mean sequences per step.
    pub mean_batch_size: f64,
    pub num_preemptions: u64,
    pub num_swap_preemptions: u64,
}

/// Builds the allocator `kind` for `config`.
pub fn build_allocator(kind: AllocatorKind, config: &SimConfig) -> Result<Box<dyn KvAllocator>, SimError> {
    Ok(match kind {
        AllocatorKind::Paged => Box::new(paged_allocator(config)?),
        contiguous => Box::new(contiguous_allocator(contiguous, config)?),
    })
}

/// The paged allocator of `config`.
pub fn paged_allocator(config: &SimConfig) -> Result<PagedAllocator, SimError> {
    Ok(PagedAllocator::new(PagedConfig {
        num_gpu_blocks: config.num_gpu_blocks,
        num_cpu_blocks: config.num_cpu_blocks,
        block_size: config.block_size,
        enable_prefix_caching: config.enable_prefix_caching,
    })?)
}

/// The contiguous allocator `kind` of `config` (`kind` must not be
/// [`AllocatorKind::Paged`], which is refused as unknown here).
pub fn contiguous_allocator(
    kind: AllocatorKind,
    config: &SimConfig,
) -> Result<ContiguousAllocator, SimError> {
    let reservation = match kind {
        AllocatorKind::Paged => return Err(SimError::UnknownAllocator("paged is not contiguous".into())),
        AllocatorKind::MaxLen => Reservation::Fixed(config.scheduler.max_model_len),
        AllocatorKind::Pow2 => Reservation::NextPowerOfTwo,
        AllocatorKind::Exact => Reservation::Exact,
    };
    Ok(ContiguousAllocator::new(ContiguousConfig {
        num_gpu_blocks: config.num_gpu_blocks,
        num_cpu_blocks: config.num_cpu_blocks,
        block_size: config.block_size,
        reservation,
    })?)
}

/// Prompt token ids for request `i`: distinct across requests, so that
/// nothing is shared by accident.
fn prompt_tokens(i: usize, len: usize) -> Vec<TokenId> {
    let base = (i as u32).wrapping_mul(0x9e37_79b9);
    (0..len as u32).map(|p| base ^ p.wrapping_mul(0x85eb_ca6b)).collect()
}

/// Replays `trace` through a scheduler over `kind`.
pub fn simulate(trace: &Trace, config: &SimConfig, kind: AllocatorKind) -> Result<SimReport, SimError> {
    simulate_with(trace, config, build_allocator(kind, config)?, kind.name(), |_, _| {})
}

/// Replays `trace` through a scheduler over `kv` (reported as `name`),
/// calling `observe(scheduler, simulated time)` after every step, e.g. to
/// record the allocator's block map ([`animation`]).
pub fn simulate_with<A: KvAllocator>(
    trace: &Trace,
    config: &SimConfig,
    kv: A,
    name: &str,
    mut observe: impl FnMut(&Scheduler<A>, f64),
) -> Result<SimReport, SimError> {
    let mut sched = Scheduler::new(config.scheduler.clone(), kv)?;
    let pool_slots = (config.num_gpu_blocks * config.block_size) as f64;
    let mut report =
        SimReport { allocator: name.to_string(), num_requests: trace.requests.len(), ..Default::default() };

    let mut now = 0.0f64;
    let mut next = 0;
    let (mut time, mut reserved_t, mut tokens_t, mut frag_t, mut running_t) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut batch_sum = 0usize;
    let mut latency_sum = 0.0;
    let mut output_tokens = 0usize;
    let mut sampled: Vec<(SeqId, TokenId)> = Vec::new();
    loop {
        while next < trace.requests.len() && trace.requests[next].arrival <= now {
            let r = trace.requests[next];
            let mut req =
                NewRequest::new(RequestId(next as u64), prompt_tokens(next, r.prompt_len), r.output_len);
            req.ignore_eos = true;
            req.arrival = r.arrival;
            match sched.add_request(req) {
                Ok(()) => {}
                Err(AddRequestError::CannotFit { .. } | AddRequestError::PromptTooLong { .. }) => {
                    report.num_rejected += 1;
                }
                Err(e) => return Err(SimError::InvalidTrace(format!("request {next}: {e}"))),
            }
            next += 1;
        }
        if !sched.has_unfinished() {
            match trace.requests.get(next) {
                Some(r) => {
                    now = now.max(r.arrival);
                    continue;
                }
                None => break,
            }
        }
        let out = sched.schedule()?;
        if out.is_empty() {
            // Nothing can run until more requests arrive (cannot happen with
            // requests that fit, but do not spin if it does).
            match trace.requests.get(next) {
                Some(r) if r.arrival > now => {
                    now = r.arrival;
                    continue;
                }
                _ => {
                    return Err(SimError::Stalled {
                        step: report.num_steps,
                        unfinished: sched.num_unfinished_requests(),
                    })
                }
            }
        }
        let dt = config.cost.step_time(&out, config.block_size);
        let usage = sched.kv_usage();
        time += dt;
        reserved_t += dt * usage.reserved_slots() as f64;
        tokens_t += dt * usage.token_slots as f64;
        frag_t += dt * usage.external_fragmentation;
        running_t += dt * sched.num_running() as f64;
        report.max_running = report.max_running.max(sched.num_running());
        batch_sum += out.scheduled.len();
        report.num_steps += 1;
        if report.num_steps > config.max_steps {
            return Err(SimError::Stalled {
                step: report.num_steps,
                unfinished: sched.num_unfinished_requests(),
            });
        }
        now += dt;

        sampled.clear();
        sampled.extend(out.sampling_seqs().map(|s| (s, (s.0 % 30_000) as TokenId + 1)));
        for u in sched.update_from_output(&out, &sampled)? {
            output_tokens += 1;
            if u.finish_reason.is_some() {
                let r = &trace.requests[u.request_id.0 as usize];
                latency_sum += (now - r.arrival) / r.output_len as f64;
                report.num_finished += 1;
            }
        }
        observe(&sched, now);
    }

    let per_time = |x: f64| if time > 0.0 { x / time } else { 0.0 };
    report.sim_time_s = now;
    report.requests_per_s = if now > 0.0 { report.num_finished as f64 / now } else { 0.0 };
    report.output_tokens_per_s = if now > 0.0 { output_tokens as f64 / now } else { 0.0 };
    report.mean_normalized_latency_s =
        if report.num_finished > 0 { latency_sum / report.num_finished as f64 } else { 0.0 };
    report.kv_utilization = per_time(tokens_t) / pool_slots;
    report.kv_reserved = per_time(reserved_t) / pool_slots;
    report.waste = if reserved_t > 0.0 { 1.0 - tokens_t / reserved_t } else { 0.0 };
    report.external_fragmentation = per_time(frag_t);
    report.mean_running = per_time(running_t);
    report.mean_batch_size =
        if report.num_steps > 0 { batch_sum as f64 / report.num_steps as f64 } else { 0.0 };
    let stats = sched.stats();
    report.num_preemptions = stats.num_preemptions;
    report.num_swap_preemptions = stats.num_swap_preemptions;
    Ok(report)
}

/// Simulates each allocator on the same trace.
pub fn compare(
    trace: &Trace,
    config: &SimConfig,
    kinds: &[AllocatorKind],
) -> Result<Vec<SimReport>, SimError> {
    kinds.iter().map(|&k| simulate(trace, config, k)).collect()
}

/// A fixed-width table, one row per report.
pub fn format_table(reports: &[SimReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:>6} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "alloc",
        "done",
        "reject",
        "util%",
        "waste%",
        "xfrag%",
        "max_run",
        "avg_run",
        "preempt",
        "req/s",
        "out_tok/s",
        "lat_s/tok",
        "sim_s"
    );
    for r in reports {
        let _ = writeln!(
            s,
            "{:<8} {:>6} {:>6} {:>7.1} {:>7.1} {:>7.1} {:>8} {:>8.1} {:>8} {:>9.3} {:>9.1} {:>9.4} {:>9.1}",
            r.allocator,
            r.num_finished,
            r.num_rejected,
            100.0 * r.kv_utilization,
            100.0 * r.waste,
            100.0 * r.external_fragmentation,
            r.max_running,
            r.mean_running,
            r.num_preemptions,
            r.requests_per_s,
            r.output_tokens_per_s,
            r.mean_normalized_latency_s,
            r.sim_time_s
        );
    }
    s
}

/// The reports as CSV (header line first).
pub fn to_csv(reports: &[SimReport]) -> String {
    let mut s = String::from(
        "allocator,num_requests,num_finished,num_rejected,num_steps,sim_time_s,requests_per_s,\
         output_tokens_per_s,mean_normalized_latency_s,kv_utilization,kv_reserved,waste,\
         external_fragmentation,max_running,mean_running,mean_batch_size,num_preemptions,num_swap_preemptions\n",
    );
    for r in reports {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{},{:.6},{:.6},{},{}",
            r.allocator,
            r.num_requests,
            r.num_finished,
            r.num_rejected,
            r.num_steps,
            r.sim_time_s,
            r.requests_per_s,
            r.output_tokens_per_s,
            r.mean_normalized_latency_s,
            r.kv_utilization,
            r.kv_reserved,
            r.waste,
            r.external_fragmentation,
            r.max_running,
            r.mean_running,
            r.mean_batch_size,
            r.num_preemptions,
            r.num_swap_preemptions
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_config() -> SimConfig {
        SimConfig {
            num_gpu_blocks: 512,
            scheduler: SchedulerConfig { max_model_len: 1024, ..SchedulerConfig::default() },
            ..SimConfig::default()
        }
    }

    fn small_trace() -> Trace {
        SyntheticTrace {
            num_requests: 150,
            request_rate: f64::INFINITY,
            max_model_len: 1024,
            seed: 3,
            ..Default::default()
        }
        .generate()
        .unwrap()
    }

    #[test]
    fn paging_wastes_little_and_max_length_reservation_wastes_most() {
        let reports = compare(&small_trace(), &small_config(), &AllocatorKind::ALL).unwrap();
        let by = |k: AllocatorKind| reports.iter().find(|r| r.allocator == k.name()).unwrap();
        for r in &reports {
            assert_eq!(r.num_finished + r.num_rejected, r.num_requests, "{r:?}");
            assert_eq!(r.num_rejected, 0);
        }
        let (paged, max_len, exact) =
            (by(AllocatorKind::Paged), by(AllocatorKind::MaxLen), by(AllocatorKind::Exact));
        assert!(paged.waste < 0.04, "paged waste {}", paged.waste);
        assert!(max_len.waste > 0.5, "max-len waste {}", max_len.waste);
        assert!(exact.waste < max_len.waste && exact.waste > paged.waste);
        assert_eq!(paged.external_fragmentation, 0.0);
        assert!(
            paged.max_running > 3 * max_len.max_running,
            "{} vs {}",
            paged.max_running,
            max_len.max_running
        );
        assert!(paged.output_tokens_per_s > max_len.output_tokens_per_s);
        let table = format_table(&reports);
        assert_eq!(table.lines().count(), 5);
        assert_eq!(to_csv(&reports).lines().count(), 5);
    }

    #[test]
    fn same_inputs_same_report() {
        let (t, c) = (small_trace(), small_config());
        assert_eq!(
            simulate(&t, &c, AllocatorKind::Paged).unwrap(),
            simulate(&t, &c, AllocatorKind::Paged).unwrap()
        );
    }

    #[test]
    fn requests_that_cannot_fit_are_counted_as_rejected() {
        let trace = Trace { requests: vec![TraceRequest { arrival: 0.0, prompt_len: 100, output_len: 50 }] };
        let config = SimConfig { num_gpu_blocks: 32, ..small_config() };
        let r = simulate(&trace, &config, AllocatorKind::Paged).unwrap();
        assert_eq!((r.num_finished, r.num_rejected), (1, 0));
        let r = simulate(&trace, &config, AllocatorKind::MaxLen).unwrap();
        assert_eq!(
            (r.num_finished, r.num_rejected),
            (0, 1),
            "a 1024-token reservation needs 64 blocks of 16"
        );
    }

    #[test]
    fn allocator_names_parse() {
        for k in AllocatorKind::ALL {
            assert_eq!(AllocatorKind::parse(k.name()).unwrap(), k);
        }
        assert!(AllocatorKind::parse("buddy").is_err());
    }
}
