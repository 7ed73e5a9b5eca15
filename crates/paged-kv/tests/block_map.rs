//! The block map viewers draw (`/v1/debug/kv`, `pagoda sim --html`) against
//! the allocator's own accounting, at every step of scripted runs.

use pagoda_paged_kv::{
    count_runs, decode_id_runs, decode_runs, encode_id_runs, encode_runs, BlockCounts, BlockMap, BlockState,
    ContiguousAllocator, ContiguousConfig, KvAllocator, PagedAllocator, PagedConfig, Reservation, SeqId,
    SeqStart,
};

/// Checks a paged allocator's map against its counters, tables and ref counts,
/// and the run-length encoding against the map.
fn check_paged(kv: &PagedAllocator, step: &str) -> BlockMap {
    let map = kv.block_map();
    let counts = map.counts();
    let usage = kv.usage();
    assert_eq!(map.gpu.len(), usage.num_gpu_blocks, "{step}");
    assert_eq!(counts.used(), usage.used_blocks, "{step}: used blocks");
    assert_eq!(counts.free + counts.cached, kv.num_free_blocks(), "{step}: free blocks");
    assert_eq!(counts.cpu_used, usage.used_cpu_blocks, "{step}: CPU blocks");
    assert_eq!(counts.reserved, 0, "{step}: paging reserves nothing");
    assert!(counts.cached <= usage.cached_blocks, "{step}: evictable cached blocks are cached");
    if kv.num_seqs() == 0 {
        assert_eq!(
            counts.cached, usage.cached_blocks,
            "{step}: with no holder every cached block is evictable"
        );
    }
    for (b, &state) in map.gpu.iter().enumerate() {
        let refs = kv.ref_count(b as u32);
        assert_eq!(map.ref_counts[b], refs, "{step}: block {b}");
        let expected = match refs {
            0 => [BlockState::Free, BlockState::Cached].contains(&state),
            1 => state == BlockState::Owned,
            _ => state == BlockState::Shared,
        };
        assert!(expected, "{step}: block {b} with {refs} holders drawn as {state:?}");
    }
    let mut order = map.eviction_order.clone();
    assert_eq!(order.len(), counts.cached, "{step}");
    assert!(order.iter().all(|&b| map.gpu[b as usize] == BlockState::Cached), "{step}");
    order.sort_unstable();
    order.dedup();
    assert_eq!(order.len(), counts.cached, "{step}: eviction order lists each block once");
    assert_eq!(map.seqs.len(), kv.num_seqs(), "{step}");
    for s in &map.seqs {
        assert_eq!(Some(s.gpu.as_slice()), kv.block_table(s.seq), "{step}: {}", s.seq);
        assert_eq!(Some(s.num_tokens), kv.num_tokens(s.seq), "{step}: {}", s.seq);
        assert_eq!(s.cpu.is_empty(), !kv.is_swapped(s.seq), "{step}: {}", s.seq);
    }
    check_encoding(&map, step);
    map
}

fn check_encoding(map: &BlockMap, step: &str) {
    let runs = encode_runs(&map.gpu);
    assert_eq!(decode_runs(&runs), map.gpu, "{step}: state runs round-trip");
    assert_eq!(count_runs(&runs), BlockCounts { cpu_used: 0, ..map.counts() }, "{step}: counts from runs");
    for s in &map.seqs {
        assert_eq!(decode_id_runs(&encode_id_runs(&s.gpu)), s.gpu, "{step}: table runs round-trip");
    }
    assert_eq!(decode_id_runs(&encode_id_runs(&map.eviction_order)), map.eviction_order, "{step}");
}

fn start(kv: &mut impl KvAllocator, seq: u64, tokens: &[u32], max_total_tokens: usize) {
    let prefix = kv.lookup_prefix(tokens, None);
    kv.start_seq(SeqId(seq), SeqStart { tokens, prefix, extra_key: None, max_total_tokens }).unwrap();
}

#[test]
fn paged_map_matches_the_allocator_at_every_step() {
    let mut kv = PagedAllocator::new(PagedConfig {
        num_gpu_blocks: 16,
        num_cpu_blocks: 8,
        block_size: 4,
        enable_prefix_caching: true,
    })
    .unwrap();
    let mut copies = Vec::new();
    let mut swaps_out = Vec::new();
    let mut swaps_in = Vec::new();
    let prompt: Vec<u32> = (1..=10).collect();
    check_paged(&kv, "empty");

    start(&mut kv, 0, &prompt, 32);
    let map = check_paged(&kv, "seq 0 prefilled");
    assert_eq!(map.counts().owned, 3);

    kv.append_slots(SeqId(0), &[11], &mut copies).unwrap();
    kv.fork(SeqId(0), SeqId(1)).unwrap();
    let map = check_paged(&kv, "forked");
    assert_eq!(map.counts().shared, 3, "a fork shares every block");

    kv.append_slots(SeqId(1), &[13], &mut copies).unwrap();
    let map = check_paged(&kv, "copy on write");
    assert_eq!(copies.len(), 1, "the shared, partly filled last block was copied");
    assert_eq!((map.counts().shared, map.counts().owned), (2, 2));

    // A second request with the same first 8 tokens reuses two cached blocks.
    let other: Vec<u32> = (1..=8).chain([99, 98, 97]).collect();
    start(&mut kv, 2, &other, 32);
    let map = check_paged(&kv, "prefix hit");
    assert_eq!(map.ref_counts[kv.block_table(SeqId(2)).unwrap()[0] as usize], 3);

    kv.swap_out(SeqId(2), &mut swaps_out).unwrap();
    let map = check_paged(&kv, "swapped out");
    assert_eq!(map.counts().cpu_used, 3);

    kv.free(SeqId(0)).unwrap();
    check_paged(&kv, "seq 0 freed");
    kv.free(SeqId(1)).unwrap();
    let map = check_paged(&kv, "seq 1 freed");
    assert!(map.counts().cached >= 2, "freed full blocks stay cached: {:?}", map.counts());

    kv.swap_in(SeqId(2), &[], &mut swaps_in).unwrap();
    check_paged(&kv, "swapped in");
    kv.free(SeqId(2)).unwrap();
    let map = check_paged(&kv, "all freed");
    let freed_first = map.eviction_order.first().copied();

    // A long prompt needs every block: the cached ones are evicted, oldest first.
    let long: Vec<u32> = (1000..1000 + 60).collect();
    start(&mut kv, 3, &long, 64);
    let map = check_paged(&kv, "evicting");
    assert!(map.eviction_order.len() < 16 && freed_first.is_some());
    kv.free(SeqId(3)).unwrap();
    check_paged(&kv, "end");
}

#[test]
fn contiguous_map_shows_reserved_runs() {
    let mut kv = ContiguousAllocator::new(ContiguousConfig {
        num_gpu_blocks: 16,
        num_cpu_blocks: 8,
        block_size: 4,
        reservation: Reservation::Fixed(24),
    })
    .unwrap();
    let mut copies = Vec::new();
    for (seq, step) in [(0u64, "seq 0"), (1, "seq 1")] {
        start(&mut kv, seq, &[1, 2, 3, 4, 5], 24);
        let map = kv.block_map();
        let counts = map.counts();
        assert_eq!(counts.used(), kv.usage().used_blocks, "{step}");
        assert_eq!(counts.owned, 2 * (seq as usize + 1), "{step}: written blocks");
        assert_eq!(counts.reserved, 4 * (seq as usize + 1), "{step}: the rest of each 6-block run");
        check_encoding(&map, step);
    }
    kv.append_slots(SeqId(0), &[6, 7, 8, 9], &mut copies).unwrap();
    let counts = kv.block_map().counts();
    assert_eq!((counts.owned, counts.reserved), (5, 7));
    let mut plan = Vec::new();
    kv.swap_out(SeqId(1), &mut plan).unwrap();
    let counts = kv.block_map().counts();
    assert_eq!((counts.used(), counts.cpu_used), (kv.usage().used_blocks, kv.usage().used_cpu_blocks));
    kv.free(SeqId(0)).unwrap();
    kv.free(SeqId(1)).unwrap();
    assert_eq!(kv.block_map().counts().free, 16);
}
