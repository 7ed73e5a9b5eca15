//! The simulator's KV page map over time: each allocator's block map sampled
//! at a fixed interval of simulated time, for `pagoda sim --html` to animate
//! side by side (the same map and encoding the server's `/dashboard` draws).

use pagoda_paged_kv::{encode_id_runs, encode_runs, BlockCounts, BlockMap, BlockState, KvAllocator};
use serde_json::{json, Value};

use super::{
    contiguous_allocator, paged_allocator, simulate_with, AllocatorKind, SimConfig, SimError, SimReport,
    Trace,
};
use crate::Scheduler;

/// One allocator's KV cache at one moment of simulated time.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub time_s: f64,
    /// Every GPU block's state, as `(state, run length)` in block order.
    pub gpu_runs: Vec<(BlockState, u32)>,
    /// CPU swap blocks in use ([`BlockState::Owned`]) or not, as runs.
    pub cpu_runs: Vec<(BlockState, u32)>,
    /// Evictable cached blocks, next evicted first, as `(first id, length)` runs.
    pub eviction_order: Vec<(u32, u32)>,
    pub counts: BlockCounts,
    pub running: usize,
    pub waiting: usize,
    pub swapped: usize,
}

/// One allocator's frames and its final report.
#[derive(Clone, Debug, PartialEq)]
pub struct Animation {
    pub allocator: String,
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    pub num_cpu_blocks: usize,
    pub frames: Vec<Frame>,
    pub report: SimReport,
}

/// Most frames one allocator's animation keeps: beyond it, every other frame
/// is dropped and the interval doubles, so a long trace stays a small file.
pub const MAX_FRAMES: usize = 2000;

/// Collects a frame whenever `interval_s` of simulated time has passed.
struct FrameRecorder {
    interval_s: f64,
    next_s: f64,
    frames: Vec<Frame>,
}

impl FrameRecorder {
    fn new(interval_s: f64) -> Self {
        Self { interval_s, next_s: 0.0, frames: Vec::new() }
    }

    fn observe<A: KvAllocator>(
        &mut self,
        scheduler: &Scheduler<A>,
        now: f64,
        map: impl FnOnce() -> BlockMap,
    ) {
        if now < self.next_s {
            return;
        }
        self.next_s = now + self.interval_s;
        let map = map();
        let cpu: Vec<BlockState> = map
            .cpu_used
            .iter()
            .map(|&used| if used { BlockState::Owned } else { BlockState::Free })
            .collect();
        self.frames.push(Frame {
            time_s: now,
            gpu_runs: encode_runs(&map.gpu),
            cpu_runs: encode_runs(&cpu),
            eviction_order: encode_id_runs(&map.eviction_order),
            counts: map.counts(),
            running: scheduler.num_running(),
            waiting: scheduler.num_waiting(),
            swapped: scheduler.num_swapped(),
        });
        if self.frames.len() > MAX_FRAMES {
            let mut keep = false;
            self.frames.retain(|_| {
                keep = !keep;
                keep
            });
            self.interval_s *= 2.0;
        }
    }
}

/// Replays `trace` through each allocator of `kinds`, recording a frame of
/// its block map every `interval_s` seconds of simulated time.
pub fn animate(
    trace: &Trace,
    config: &SimConfig,
    kinds: &[AllocatorKind],
    interval_s: f64,
) -> Result<Vec<Animation>, SimError> {
    if !(interval_s.is_finite() && interval_s > 0.0) {
        return Err(SimError::InvalidOption(format!(
            "the frame interval must be a positive number of seconds, not {interval_s}"
        )));
    }
    kinds
        .iter()
        .map(|&kind| {
            let mut recorder = FrameRecorder::new(interval_s);
            let report = match kind {
                AllocatorKind::Paged => {
                    simulate_with(trace, config, paged_allocator(config)?, kind.name(), |s, now| {
                        recorder.observe(s, now, || s.allocator().block_map())
                    })?
                }
                contiguous => simulate_with(
                    trace,
                    config,
                    contiguous_allocator(contiguous, config)?,
                    kind.name(),
                    |s, now| recorder.observe(s, now, || s.allocator().block_map()),
                )?,
            };
            Ok(Animation {
                allocator: kind.name().to_string(),
                block_size: config.block_size,
                num_gpu_blocks: config.num_gpu_blocks,
                num_cpu_blocks: config.num_cpu_blocks,
                frames: recorder.frames,
                report,
            })
        })
        .collect()
}

fn runs_json(runs: &[(BlockState, u32)]) -> Value {
    Value::Array(runs.iter().map(|&(state, len)| json!([state.code().to_string(), len])).collect())
}

/// The animations as the JSON the page reads: per allocator, its frames in
/// `/v1/debug/kv`'s encoding (`gpu_runs`, `cpu_runs`, `eviction_order`).
pub fn to_json(animations: &[Animation]) -> Value {
    Value::Array(
        animations
            .iter()
            .map(|a| {
                let frames: Vec<Value> = a
                    .frames
                    .iter()
                    .map(|f| {
                        json!({
                            "t": (f.time_s * 1000.0).round() / 1000.0,
                            "gpu_runs": runs_json(&f.gpu_runs),
                            "cpu_runs": runs_json(&f.cpu_runs),
                            "eviction_order": f.eviction_order,
                            "used": f.counts.used(),
                            "owned": f.counts.owned,
                            "reserved": f.counts.reserved,
                            "running": f.running,
                            "waiting": f.waiting,
                            "swapped": f.swapped,
                        })
                    })
                    .collect();
                json!({
                    "allocator": a.allocator,
                    "block_size": a.block_size,
                    "num_gpu_blocks": a.num_gpu_blocks,
                    "num_cpu_blocks": a.num_cpu_blocks,
                    "finished": a.report.num_finished,
                    "rejected": a.report.num_rejected,
                    "sim_time_s": a.report.sim_time_s,
                    "waste": a.report.waste,
                    "max_running": a.report.max_running,
                    "frames": frames,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SyntheticTrace, Trace};
    use crate::SchedulerConfig;

    fn small() -> (Trace, SimConfig) {
        let trace = SyntheticTrace {
            num_requests: 40,
            request_rate: 4.0,
            max_model_len: 512,
            seed: 5,
            ..Default::default()
        }
        .generate()
        .unwrap();
        let config = SimConfig {
            num_gpu_blocks: 128,
            scheduler: SchedulerConfig { max_model_len: 512, ..SchedulerConfig::default() },
            ..SimConfig::default()
        };
        (trace, config)
    }

    #[test]
    fn frames_show_each_allocator_and_match_the_plain_simulation() {
        let (trace, config) = small();
        let kinds = [AllocatorKind::Paged, AllocatorKind::MaxLen];
        let animations = animate(&trace, &config, &kinds, 0.25).unwrap();
        assert_eq!(animations.len(), 2);
        for (a, kind) in animations.iter().zip(kinds) {
            assert_eq!(
                a.report,
                crate::sim::simulate(&trace, &config, kind).unwrap(),
                "observing changes nothing"
            );
            assert!(a.frames.len() > 4, "{}: {} frames", a.allocator, a.frames.len());
            for f in &a.frames {
                let total: u32 = f.gpu_runs.iter().map(|&(_, n)| n).sum();
                assert_eq!(total as usize, config.num_gpu_blocks);
            }
            assert!(a.frames.windows(2).all(|w| w[1].time_s >= w[0].time_s + 0.25 - 1e-9));
        }
        let reserved = |a: &Animation| a.frames.iter().map(|f| f.counts.reserved).max().unwrap_or(0);
        assert_eq!(reserved(&animations[0]), 0, "paging reserves nothing ahead");
        assert!(reserved(&animations[1]) > 0, "a max-length reservation shows its empty blocks");
        let json = to_json(&animations);
        assert_eq!(json[1]["allocator"], "max-len");
        assert!(json[0]["frames"][1]["gpu_runs"][0][0].is_string());
    }

    #[test]
    fn a_long_run_keeps_at_most_max_frames() {
        let (trace, config) = small();
        let animations = animate(&trace, &config, &[AllocatorKind::Paged], 1e-6).unwrap();
        assert!(animations[0].frames.len() <= MAX_FRAMES);
        assert!(animate(&trace, &config, &[AllocatorKind::Paged], 0.0).is_err());
    }
}
