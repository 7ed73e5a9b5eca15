//! Per-token costs of the allocators: decode appends, a whole sequence's
//! life (start, append, free), prefix-cache hits, fork + copy-on-write.
//!
//! `cargo bench -p pagoda-paged-kv --bench allocator`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Bencher, Criterion, Throughput};
use pagoda_paged_kv::{
    BlockCopy, ContiguousAllocator, ContiguousConfig, KvAllocator, PagedAllocator, PagedConfig, PrefixHit,
    Reservation, SeqId, SeqStart,
};

const SEQS: usize = 64;
const PROMPT: usize = 128;
const DECODE: usize = 512;

fn paged(blocks: usize, block_size: usize, caching: bool) -> PagedAllocator {
    PagedAllocator::new(PagedConfig {
        num_gpu_blocks: blocks,
        num_cpu_blocks: 0,
        block_size,
        enable_prefix_caching: caching,
    })
    .expect("valid config")
}

fn prompt(seq: usize, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| i.wrapping_mul(31) ^ (seq as u32) << 16).collect()
}

fn start(kv: &mut impl KvAllocator, seq: usize, tokens: &[u32], max_total: usize) {
    let prefix = kv.lookup_prefix(tokens, None);
    kv.start_seq(
        SeqId(seq as u64),
        SeqStart { tokens, prefix, extra_key: None, max_total_tokens: max_total },
    )
    .expect("pool sized for the bench");
}

/// Appends one token, `token`, to each of the `SEQS` sequences.
fn decode_step(kv: &mut impl KvAllocator, token: u32, copies: &mut Vec<BlockCopy>) {
    for s in 0..SEQS {
        kv.append_slots(SeqId(s as u64), &[token], copies).expect("room");
    }
}

/// Times `DECODE` decode steps of `SEQS` sequences, started with `PROMPT`
/// tokens each in a fresh allocator from `new_kv` (setup not timed).
fn bench_decode<A: KvAllocator>(bench: &mut Bencher<'_>, new_kv: impl Fn() -> A) {
    bench.iter_batched(
        || {
            let mut kv = new_kv();
            for s in 0..SEQS {
                start(&mut kv, s, &prompt(s, PROMPT), PROMPT + DECODE);
            }
            (kv, Vec::new())
        },
        |(mut kv, mut copies)| {
            for t in 0..DECODE as u32 {
                decode_step(&mut kv, t, &mut copies);
            }
            (kv, copies)
        },
        BatchSize::LargeInput,
    );
}

/// One decode token for each of 64 sequences, 512 times.
fn decode_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_append");
    g.throughput(Throughput::Elements((SEQS * DECODE) as u64));
    for (b, caching) in [(16, false), (16, true), (8, true), (128, true)] {
        let blocks = SEQS * (PROMPT + DECODE).div_ceil(b) + 8;
        g.bench_function(format!("paged_b{b}_cache_{caching}"), |bench| {
            bench_decode(bench, || paged(blocks, b, caching));
        });
    }
    g.bench_function("contiguous_max_len_b16", |bench| {
        bench_decode(bench, || {
            ContiguousAllocator::new(ContiguousConfig {
                num_gpu_blocks: SEQS * 2048 / 16,
                num_cpu_blocks: 0,
                block_size: 16,
                reservation: Reservation::Fixed(2048),
            })
            .expect("valid config")
        });
    });
    g.finish();
}

/// A sequence's whole life: start with a prompt, decode token by token, free.
fn lifecycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("start_append_free");
    g.throughput(Throughput::Elements((SEQS * (PROMPT + DECODE)) as u64));
    let prompts: Vec<Vec<u32>> = (0..SEQS).map(|s| prompt(s, PROMPT)).collect();
    for caching in [false, true] {
        let b = 16;
        g.bench_function(format!("paged_b{b}_cache_{caching}"), |bench| {
            let mut kv = paged(SEQS * (PROMPT + DECODE).div_ceil(b) + 8, b, caching);
            let mut copies = Vec::new();
            bench.iter(|| {
                for (s, p) in prompts.iter().enumerate() {
                    start(&mut kv, s, p, PROMPT + DECODE);
                }
                for t in 0..DECODE as u32 {
                    decode_step(&mut kv, t, &mut copies);
                }
                for s in 0..SEQS {
                    kv.free(SeqId(s as u64)).expect("known");
                }
            });
        });
    }
    g.finish();
}

/// Starting a sequence whose 2048-token prompt is cached (lookup + start + free).
fn prefix_hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefix_hit");
    let len = 2048;
    g.throughput(Throughput::Elements(len as u64));
    let tokens = prompt(7, len);
    let mut kv = paged(256, 16, true);
    start(&mut kv, 0, &tokens, len);
    kv.free(SeqId(0)).expect("known");
    g.bench_function("lookup_start_free_2048_tokens_b16", |bench| {
        bench.iter(|| {
            let prefix: PrefixHit = kv.lookup_prefix(black_box(&tokens), None);
            assert_eq!(prefix.num_cached_tokens, len - 16);
            kv.start_seq(
                SeqId(1),
                SeqStart { tokens: &tokens, prefix, extra_key: None, max_total_tokens: len },
            )
            .expect("room");
            kv.free(SeqId(1)).expect("known");
        });
    });
    g.finish();
}

/// Forking 8 samples off a 1000-token sequence, each writing one token
/// (7 copy-on-write copies of the shared partial block), then freeing them.
fn fork_cow(c: &mut Criterion) {
    let mut g = c.benchmark_group("fork_cow");
    g.throughput(Throughput::Elements(8));
    let mut kv = paged(128, 16, false);
    start(&mut kv, 0, &prompt(0, 1000), 1100);
    let mut copies = Vec::new();
    g.bench_function("fork8_append_free_1000_tokens_b16", |bench| {
        bench.iter(|| {
            copies.clear();
            for child in 1..=8u64 {
                kv.fork(SeqId(0), SeqId(child)).expect("known parent");
                kv.append_slots(SeqId(child), &[1], &mut copies).expect("room");
            }
            for child in 1..=8u64 {
                kv.free(SeqId(child)).expect("known");
            }
            black_box(copies.len())
        });
    });
    g.finish();
}

criterion_group!(benches, decode_append, lifecycle, prefix_hit, fork_cow);
criterion_main!(benches);
