//! [`PagedAllocator::block_map`]: the state of every block, for viewers.

use crate::block_map::{BlockMap, BlockState, SeqBlockMap};
use crate::PagedAllocator;

impl PagedAllocator {
    /// Every GPU block's state (free, owned, shared copy-on-write, or cached
    /// and evictable, with the eviction order), every CPU swap block's use,
    /// and every sequence's tables. O(pool size + tables): for viewers a few
    /// times a second, not for the step loop.
    pub fn block_map(&self) -> BlockMap {
        let num_gpu = self.pool.num_blocks();
        let ref_counts: Vec<u32> = (0..num_gpu as u32).map(|b| self.pool.ref_cnt(b)).collect();
        let mut gpu: Vec<BlockState> = ref_counts
            .iter()
            .map(|&refs| match refs {
                0 => BlockState::Free,
                1 => BlockState::Owned,
                _ => BlockState::Shared,
            })
            .collect();
        // Free blocks with a hash are the evictable prefix cache; the free
        // queue holds them behind the uncached ones, least recently used first.
        let eviction_order: Vec<u32> =
            self.pool.free_in_eviction_order().filter(|&b| self.pool.hash_of(b).is_some()).collect();
        for &b in &eviction_order {
            gpu[b as usize] = BlockState::Cached;
        }
        let mut cpu_used = vec![false; self.cpu.num_blocks()];
        let mut seqs: Vec<SeqBlockMap> = self
            .seqs
            .iter()
            .map(|(&seq, s)| {
                for &c in &s.cpu {
                    cpu_used[c as usize] = true;
                }
                SeqBlockMap { seq, gpu: s.gpu.clone(), cpu: s.cpu.clone(), num_tokens: s.num_tokens }
            })
            .collect();
        seqs.sort_unstable_by_key(|s| s.seq);
        BlockMap { block_size: self.config.block_size, gpu, cpu_used, ref_counts, eviction_order, seqs }
    }
}
