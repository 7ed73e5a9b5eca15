//! What a viewer's block map costs as the pool grows: `PagedAllocator::block_map`
//! and the run-length encoding the dashboard's `/v1/debug/kv` sends, on pools of
//! 1,456 blocks (the default model's 1 GiB CPU cache) up to 131,072 (a large GPU's),
//! three quarters held by 256 sequences, the rest partly cached.
//!
//! `cargo bench -p pagoda-paged-kv --bench block_map`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pagoda_paged_kv::{
    encode_id_runs, encode_runs, KvAllocator, PagedAllocator, PagedConfig, SeqId, SeqStart,
};

const BLOCK_SIZE: usize = 16;
const SEQS: usize = 256;

/// A pool of `blocks` with `SEQS` live sequences holding 3/4 of it, and the
/// prompts of as many finished ones left cached.
fn busy_pool(blocks: usize) -> PagedAllocator {
    let mut kv = PagedAllocator::new(PagedConfig {
        num_gpu_blocks: blocks,
        num_cpu_blocks: 0,
        block_size: BLOCK_SIZE,
        enable_prefix_caching: true,
    })
    .expect("valid config");
    let per_seq = (blocks * 3 / 4 / SEQS).max(1) * BLOCK_SIZE;
    let cached_per_seq = (blocks / 8 / SEQS).max(1) * BLOCK_SIZE;
    let start = |kv: &mut PagedAllocator, id: usize, len: usize| {
        let tokens: Vec<u32> = (0..len as u32).map(|t| t ^ ((id as u32) << 20)).collect();
        let prefix = kv.lookup_prefix(&tokens, None);
        kv.start_seq(
            SeqId(id as u64),
            SeqStart { tokens: &tokens, prefix, extra_key: None, max_total_tokens: len },
        )
        .expect("sized to fit");
    };
    for id in 0..SEQS {
        start(&mut kv, SEQS + id, cached_per_seq);
        kv.free(SeqId((SEQS + id) as u64)).expect("known");
    }
    for id in 0..SEQS {
        start(&mut kv, id, per_seq);
    }
    kv
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("block_map");
    for blocks in [1456, 16_384, 131_072] {
        let kv = busy_pool(blocks);
        group.bench_function(format!("map+encode/{blocks}"), |b| {
            b.iter(|| {
                let map = black_box(&kv).block_map();
                let runs = encode_runs(&map.gpu);
                let tables: usize = map.seqs.iter().map(|s| encode_id_runs(&s.gpu).len()).sum();
                black_box((runs.len(), tables, encode_id_runs(&map.eviction_order).len()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
