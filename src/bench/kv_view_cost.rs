//! `pagoda bench throughput --kv-view-hz N`: what the dashboard costs the
//! engine loop. While the benchmark steps the engine, the dashboard's KV view
//! is built N times a second, on the same thread and through the same
//! `KvViewSource` the engine thread answers `/v1/debug/kv` with, and each
//! build is timed against the time the loop spends stepping.

use std::time::{Duration, Instant};

use pagoda_backend::Backend;
use pagoda_engine::{KvViewSource, LlmEngine};
use serde::Serialize;

/// Builds KV views at a fixed rate between engine steps and times them.
pub(super) struct KvViewProbe {
    hz: f64,
    period: Duration,
    next_at: Instant,
    source: KvViewSource,
    builds: Vec<Duration>,
    /// Time inside `LlmEngine::step`, the loop's own work.
    step_time: Duration,
    largest_view_blocks: usize,
    largest_view_seqs: usize,
}

impl KvViewProbe {
    /// A probe building `hz` views a second (at most one per step boundary).
    pub(super) fn new(hz: f64) -> anyhow::Result<Self> {
        anyhow::ensure!(hz.is_finite() && hz > 0.0, "--kv-view-hz must be a positive number, not {hz}");
        Ok(Self {
            hz,
            period: Duration::from_secs_f64(1.0 / hz),
            next_at: Instant::now(),
            source: KvViewSource::default(),
            builds: Vec::new(),
            step_time: Duration::ZERO,
            largest_view_blocks: 0,
            largest_view_seqs: 0,
        })
    }

    /// Counts one step's duration.
    pub(super) fn stepped(&mut self, took: Duration) {
        self.step_time += took;
    }

    /// At a step boundary: builds a view if one is due, as the engine thread
    /// does when a dashboard asks.
    pub(super) fn at_step_boundary<B: Backend>(&mut self, engine: &LlmEngine<B>) {
        let now = Instant::now();
        if now < self.next_at {
            return;
        }
        self.next_at = now + self.period;
        let view = self.source.view(engine);
        self.builds.push(now.elapsed());
        self.largest_view_blocks = self.largest_view_blocks.max(view.counts.used());
        self.largest_view_seqs = self.largest_view_seqs.max(view.seqs.len());
    }

    pub(super) fn report(&self, engine_steps: u64) -> KvViewCost {
        let total: Duration = self.builds.iter().sum();
        let mut sorted = self.builds.clone();
        sorted.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mean_build_us = if sorted.is_empty() { 0.0 } else { us(total) / sorted.len() as f64 };
        let mean_step_ms =
            if engine_steps == 0 { 0.0 } else { self.step_time.as_secs_f64() * 1e3 / engine_steps as f64 };
        KvViewCost {
            hz: self.hz,
            views_served: sorted.len(),
            mean_build_us,
            p50_build_us: sorted.get(sorted.len() / 2).map_or(0.0, |&d| us(d)),
            max_build_us: sorted.last().map_or(0.0, |&d| us(d)),
            total_build_s: total.as_secs_f64(),
            step_time_s: self.step_time.as_secs_f64(),
            mean_step_ms,
            share_of_step_time: if self.step_time.is_zero() {
                0.0
            } else {
                total.as_secs_f64() / self.step_time.as_secs_f64()
            },
            largest_view_used_blocks: self.largest_view_blocks,
            largest_view_seqs: self.largest_view_seqs,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            commit: env!("PAGODA_GIT_REV").to_string(),
        }
    }
}

/// What building the dashboard's views cost during a run.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub(super) struct KvViewCost {
    /// Views asked for per second (above 10, `KvViewSource` hands out its last
    /// view again instead of building one: the server's cap).
    pub hz: f64,
    pub views_served: usize,
    pub mean_build_us: f64,
    pub p50_build_us: f64,
    pub max_build_us: f64,
    pub total_build_s: f64,
    /// Time spent inside engine steps.
    pub step_time_s: f64,
    pub mean_step_ms: f64,
    /// `total_build_s / step_time_s`: the loop's time given to views (the
    /// issue's bound is 1% at 10 views a second).
    pub share_of_step_time: f64,
    pub largest_view_used_blocks: usize,
    pub largest_view_seqs: usize,
    /// The command line and the build's git revision, for the record.
    pub command: String,
    pub commit: String,
}

impl std::fmt::Display for KvViewCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "dashboard KV view:  {} served at {} Hz, mean {:.1} us (p50 {:.1}, max {:.1}); \
             {:.4}% of {:.1} s of step time (mean step {:.1} ms)",
            self.views_served,
            self.hz,
            self.mean_build_us,
            self.p50_build_us,
            self.max_build_us,
            100.0 * self.share_of_step_time,
            self.step_time_s,
            self.mean_step_ms
        )
    }
}
