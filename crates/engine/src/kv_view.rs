//! A live view of the engine for the dashboard: which physical KV blocks hold
//! what, who is running, waiting or swapped and how far along, and the
//! cumulative counters the page turns into rates and charts.
//!
//! The engine loop pays nothing while nobody watches: a view is built only
//! when the server asks for one (a command on the engine's channel, answered
//! at the next step boundary), and [`KvViewSource`] hands out the last view
//! again when it is younger than [`KvViewSource::MIN_INTERVAL`], so however
//! many pages poll, the engine builds at most ten views a second. Building one
//! is O(KV pool + live sequences); `pagoda bench throughput --kv-view-hz`
//! measures its cost against the step time (BENCHMARKS.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pagoda_backend::Backend;
use pagoda_paged_kv::{
    encode_id_runs, encode_runs, BlockCounts, BlockState, PagedAllocator, PrefixCacheStats,
};
use pagoda_scheduler::{RequestId, Scheduler, SeqStatus};

use crate::engine::LlmEngine;
use crate::runner::PhaseTotal;

/// The engine at one step boundary, encoded compactly: block states as runs
/// (`(state, length)`), block lists as runs of consecutive ids (`(first,
/// length)`).
#[derive(Clone, Debug, PartialEq)]
pub struct KvView {
    /// Increases by one with every view built (a repeated view keeps its id).
    pub view_id: u64,
    /// Engine steps run so far.
    pub engine_steps: u64,
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    pub num_cpu_blocks: usize,
    /// Every GPU block's state, in block order, as runs.
    pub gpu_runs: Vec<(BlockState, u32)>,
    /// Every CPU swap block, as runs of [`BlockState::Owned`] (holding a
    /// swapped-out sequence's block) and [`BlockState::Free`].
    pub cpu_runs: Vec<(BlockState, u32)>,
    /// Blocks by state (`cpu_used` included), as the runs count them.
    pub counts: BlockCounts,
    /// The evictable cached blocks, least recently used (next evicted) first.
    pub eviction_order: Vec<(u32, u32)>,
    /// Every live sequence: running, then swapped, then waiting.
    pub seqs: Vec<SeqView>,
    /// Prefix-cache counters since the engine started.
    pub prefix_cache: PrefixCacheStats,
    /// Preemptions since the engine started.
    pub preemptions: u64,
    /// Host time and tokens of the steps that only decoded, and of the steps
    /// with prompt tokens, since the engine started.
    pub decode_steps: PhaseTotal,
    pub prefill_steps: PhaseTotal,
    /// How long building this view took on the engine thread.
    pub build_time: Duration,
}

/// One live sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqView {
    /// The client's request id.
    pub request_id: String,
    /// Which of the request's `n` samples.
    pub sample_index: usize,
    pub status: SeqStatus,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV is computed (or scheduled to be).
    pub prompt_tokens_computed: usize,
    pub output_tokens: usize,
    /// Its GPU block table (logical block `i` is the `i`-th id), as runs.
    pub gpu_blocks: Vec<(u32, u32)>,
    /// The CPU blocks holding it while swapped out, as runs.
    pub cpu_blocks: Vec<(u32, u32)>,
}

impl KvView {
    /// Builds a view of `scheduler` (and its allocator), naming each
    /// sequence by its request's client id from `request_ids`; sequences of
    /// requests not listed are left out.
    pub fn capture<'a>(
        scheduler: &Scheduler<PagedAllocator>,
        request_ids: impl IntoIterator<Item = (&'a str, RequestId)>,
        decode_steps: PhaseTotal,
        prefill_steps: PhaseTotal,
        view_id: u64,
    ) -> Self {
        let started = Instant::now();
        let map = scheduler.allocator().block_map();
        let gpu_runs = encode_runs(&map.gpu);
        let cpu_states: Vec<BlockState> = map
            .cpu_used
            .iter()
            .map(|&used| if used { BlockState::Owned } else { BlockState::Free })
            .collect();
        let mut seqs = Vec::new();
        for (client_id, request_id) in request_ids {
            for &seq_id in scheduler.request_seqs(request_id) {
                let Some(seq) = scheduler.seq(seq_id) else { continue };
                let tables = map.seqs.binary_search_by_key(&seq_id, |s| s.seq).ok().map(|i| &map.seqs[i]);
                let prompt_tokens = seq.prompt_token_ids().len();
                seqs.push(SeqView {
                    request_id: client_id.to_string(),
                    sample_index: seq.sample_index(),
                    status: seq.status(),
                    prompt_tokens,
                    prompt_tokens_computed: seq.num_computed_tokens().min(prompt_tokens),
                    output_tokens: seq.output_token_ids().len(),
                    gpu_blocks: tables.map(|t| encode_id_runs(&t.gpu)).unwrap_or_default(),
                    cpu_blocks: tables.map(|t| encode_id_runs(&t.cpu)).unwrap_or_default(),
                });
            }
        }
        let queue_order = |s: &SeqView| match s.status {
            SeqStatus::Running => 0,
            SeqStatus::Swapped => 1,
            SeqStatus::Waiting => 2,
        };
        seqs.sort_by(|a, b| {
            (queue_order(a), &a.request_id, a.sample_index).cmp(&(
                queue_order(b),
                &b.request_id,
                b.sample_index,
            ))
        });
        let view = Self {
            view_id,
            engine_steps: scheduler.stats().num_steps,
            block_size: map.block_size,
            num_gpu_blocks: map.gpu.len(),
            num_cpu_blocks: map.cpu_used.len(),
            counts: map.counts(),
            gpu_runs,
            cpu_runs: encode_runs(&cpu_states),
            eviction_order: encode_id_runs(&map.eviction_order),
            seqs,
            prefix_cache: scheduler.prefix_cache_stats(),
            preemptions: scheduler.stats().num_preemptions,
            decode_steps,
            prefill_steps,
            build_time: Duration::ZERO,
        };
        Self { build_time: started.elapsed(), ..view }
    }

    /// Live sequences by queue: `(running, waiting, swapped)`.
    pub fn queue_lengths(&self) -> (usize, usize, usize) {
        let count = |status| self.seqs.iter().filter(|s| s.status == status).count();
        (count(SeqStatus::Running), count(SeqStatus::Waiting), count(SeqStatus::Swapped))
    }
}

/// Builds views on the engine thread, at most one per [`Self::MIN_INTERVAL`].
#[derive(Debug, Default)]
pub struct KvViewSource {
    last: Option<(Instant, Arc<KvView>)>,
    built: u64,
}

impl KvViewSource {
    /// A newer view than this is handed out again instead of rebuilt: ten
    /// views a second at most, however many viewers ask.
    pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

    /// The engine as it is now, or the last view if it is recent enough.
    pub fn view<B: Backend>(&mut self, engine: &LlmEngine<B>) -> Arc<KvView> {
        let now = Instant::now();
        if let Some((at, view)) = &self.last {
            if now.duration_since(*at) < Self::MIN_INTERVAL {
                return view.clone();
            }
        }
        self.built += 1;
        let timings = engine.runner().timings();
        let view = Arc::new(KvView::capture(
            engine.scheduler(),
            engine.live_requests(),
            timings.decode_only,
            timings.with_prefill,
            self.built,
        ));
        self.last = Some((now, view.clone()));
        view
    }
}

#[cfg(test)]
mod tests {
    use pagoda_paged_kv::{count_runs, decode_id_runs, decode_runs, KvAllocator, PagedConfig};
    use pagoda_scheduler::{NewRequest, PreemptionMode, SchedulerConfig, SeqId, TokenId};

    use super::*;

    /// A scheduler over a pool small enough that six requests preempt each
    /// other (by swapping), with prefix caching on and a shared prompt prefix.
    fn scripted_scheduler() -> Scheduler<PagedAllocator> {
        let kv = PagedAllocator::new(PagedConfig {
            num_gpu_blocks: 24,
            num_cpu_blocks: 32,
            block_size: 4,
            enable_prefix_caching: true,
        })
        .unwrap();
        let config = SchedulerConfig {
            max_model_len: 64,
            max_num_batched_tokens: 32,
            max_num_seqs: 8,
            preemption_mode: PreemptionMode::Swap,
            ..SchedulerConfig::default()
        };
        let mut scheduler = Scheduler::new(config, kv).unwrap();
        for i in 0..6u64 {
            let prompt: Vec<TokenId> = (1..=8).chain((0..6).map(|t| 100 * i as u32 + t)).collect();
            let mut request = NewRequest::new(RequestId(i), prompt, 24);
            request.ignore_eos = true;
            request.n = if i == 2 { 2 } else { 1 };
            scheduler.add_request(request).unwrap();
        }
        scheduler
    }

    fn client_ids(scheduler: &Scheduler<PagedAllocator>) -> Vec<(String, RequestId)> {
        (0..6u64)
            .map(RequestId)
            .filter(|&id| !scheduler.request_seqs(id).is_empty())
            .map(|id| (format!("req-{}", id.0), id))
            .collect()
    }

    /// At every step of the run: the view's blocks by state equal the
    /// allocator's own counts, its runs decode to the allocator's block map,
    /// its queues to the scheduler's, and its tables to the allocator's.
    #[test]
    fn view_matches_the_allocator_at_every_step() {
        let mut scheduler = scripted_scheduler();
        let (mut saw_shared, mut saw_swapped, mut saw_cached) = (false, false, false);
        for step in 0..400 {
            let ids = client_ids(&scheduler);
            let view = KvView::capture(
                &scheduler,
                ids.iter().map(|(s, id)| (s.as_str(), *id)),
                PhaseTotal::default(),
                PhaseTotal::default(),
                step,
            );
            let usage = scheduler.kv_usage();
            let allocator = scheduler.allocator();
            let counts = count_runs(&view.gpu_runs);
            assert_eq!(counts.used(), usage.used_blocks, "step {step}: used");
            assert_eq!(counts.free + counts.cached, allocator.num_free_blocks(), "step {step}: free");
            assert_eq!(count_runs(&view.cpu_runs).owned, usage.used_cpu_blocks, "step {step}: CPU");
            assert_eq!(view.counts, allocator.block_map().counts(), "step {step}");
            assert_eq!(decode_runs(&view.gpu_runs), allocator.block_map().gpu, "step {step}");
            assert_eq!(view.num_gpu_blocks, 24);
            let (running, waiting, swapped) = view.queue_lengths();
            assert_eq!(
                (running, waiting, swapped),
                (scheduler.num_running(), scheduler.num_waiting(), scheduler.num_swapped()),
                "step {step}: queues"
            );
            let shared = (0..24).filter(|&b| allocator.ref_count(b) > 1).count();
            assert_eq!(counts.shared, shared, "step {step}: shared blocks");
            for (client, id) in &ids {
                let seqs = scheduler.request_seqs(*id);
                assert_eq!(
                    view.seqs.iter().filter(|s| &s.request_id == client).count(),
                    seqs.len(),
                    "step {step}: {client}"
                );
                for &seq_id in seqs {
                    let seq = scheduler.seq(seq_id).unwrap();
                    let seq_view = view
                        .seqs
                        .iter()
                        .find(|s| &s.request_id == client && s.sample_index == seq.sample_index())
                        .unwrap();
                    assert_eq!(seq_view.status, seq.status(), "step {step}: {client}");
                    assert_eq!(seq_view.output_tokens, seq.output_token_ids().len(), "step {step}");
                    let table = allocator.block_table(seq_id).unwrap_or(&[]);
                    assert_eq!(decode_id_runs(&seq_view.gpu_blocks), table, "step {step}: {client}");
                }
            }
            saw_shared |= counts.shared > 0;
            saw_swapped |= swapped > 0;
            saw_cached |= counts.cached > 0;
            if !scheduler.has_unfinished() {
                break;
            }
            let out = scheduler.schedule().unwrap();
            let sampled: Vec<(SeqId, TokenId)> = out.sampling_seqs().map(|s| (s, 7)).collect();
            scheduler.update_from_output(&out, &sampled).unwrap();
        }
        assert!(!scheduler.has_unfinished(), "the scripted run finishes");
        assert!(
            saw_shared && saw_swapped && saw_cached,
            "shared {saw_shared}, swapped {saw_swapped}, cached {saw_cached}"
        );
    }
}
