//! Cost of one scheduling step with many running sequences.
//!
//! `cargo bench -p pagoda-scheduler --bench schedule`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use pagoda_paged_kv::{PagedAllocator, PagedConfig};
use pagoda_scheduler::{NewRequest, RequestId, Scheduler, SchedulerConfig, SeqId, TokenId};

const BLOCK: usize = 16;

/// `seqs` running sequences with `context`-token prompts, already prefilled,
/// and room for `steps` more decode steps.
fn decoding(seqs: usize, context: usize, steps: usize) -> Scheduler<PagedAllocator> {
    let blocks = seqs * (context + steps + 1).div_ceil(BLOCK) + 16;
    let kv = PagedAllocator::new(PagedConfig {
        num_gpu_blocks: blocks,
        num_cpu_blocks: 0,
        block_size: BLOCK,
        enable_prefix_caching: true,
    })
    .expect("valid config");
    let config = SchedulerConfig {
        max_num_batched_tokens: seqs * context,
        max_num_seqs: seqs,
        max_model_len: context + steps + 16,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(config, kv).expect("valid config");
    for r in 0..seqs {
        let prompt = (0..context as u32).map(|t| t ^ ((r as u32) << 20)).collect();
        s.add_request(NewRequest {
            ignore_eos: true,
            ..NewRequest::new(RequestId(r as u64), prompt, steps + 8)
        })
        .expect("fits");
    }
    let out = s.schedule().expect("prefill step");
    let sampled: Vec<(SeqId, TokenId)> = out.sampling_seqs().map(|id| (id, 1)).collect();
    s.update_from_output(&out, &sampled).expect("valid");
    assert_eq!(s.num_running(), seqs);
    s
}

fn schedule_decodes(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_step");
    for (seqs, context) in [(256, 512), (256, 2048), (64, 512)] {
        // schedule() alone, timed; update_from_output runs untimed between.
        g.bench_function(format!("schedule_{seqs}seqs_ctx{context}"), |bench| {
            bench.iter_custom(|iters| {
                let mut s = decoding(seqs, context, iters as usize);
                let mut total = Duration::ZERO;
                let mut sampled = Vec::with_capacity(seqs);
                for _ in 0..iters {
                    let t = Instant::now();
                    let out = s.schedule().expect("step");
                    total += t.elapsed();
                    assert_eq!(out.scheduled.len(), seqs);
                    sampled.clear();
                    sampled.extend(out.sampling_seqs().map(|id| (id, 1)));
                    s.update_from_output(&out, &sampled).expect("valid");
                }
                total
            });
        });
        // The whole scheduler side of a step: schedule + update_from_output.
        g.bench_function(format!("schedule_and_update_{seqs}seqs_ctx{context}"), |bench| {
            bench.iter_custom(|iters| {
                let mut s = decoding(seqs, context, iters as usize);
                let mut sampled = Vec::with_capacity(seqs);
                let t = Instant::now();
                for _ in 0..iters {
                    let out = s.schedule().expect("step");
                    sampled.clear();
                    sampled.extend(out.sampling_seqs().map(|id| (id, 1)));
                    s.update_from_output(&out, &sampled).expect("valid");
                }
                t.elapsed()
            });
        });
    }
    g.finish();
}

criterion_group!(benches, schedule_decodes);
criterion_main!(benches);
