//! [`ContiguousAllocator::block_map`]: the state of every block, for viewers
//! (the simulator's paged-vs-contiguous animation).

use crate::block_map::{BlockMap, BlockState, SeqBlockMap};
use crate::ContiguousAllocator;

impl ContiguousAllocator {
    /// Every GPU block's state: free, owned (written by its sequence) or
    /// reserved (inside a sequence's run but not written yet); every CPU swap
    /// block's use; every sequence's tables. O(pool size), for viewers.
    pub fn block_map(&self) -> BlockMap {
        let num_gpu = self.config.num_gpu_blocks;
        let mut gpu = vec![BlockState::Free; num_gpu];
        let mut ref_counts = vec![0u32; num_gpu];
        let mut cpu_used = vec![false; self.cpu.num_blocks()];
        let mut seqs = Vec::with_capacity(self.seqs.len());
        for (&seq, s) in &self.seqs {
            if s.swapped {
                for &c in &s.cpu {
                    cpu_used[c as usize] = true;
                }
            } else {
                let start = s.start as usize;
                for b in start..start + s.reserved_blocks {
                    let written = b - start < s.table.len();
                    gpu[b] = if written { BlockState::Owned } else { BlockState::Reserved };
                    ref_counts[b] = 1;
                }
            }
            seqs.push(SeqBlockMap {
                seq,
                gpu: s.table.clone(),
                cpu: s.cpu.clone(),
                num_tokens: s.num_tokens,
            });
        }
        seqs.sort_unstable_by_key(|s| s.seq);
        BlockMap {
            block_size: self.config.block_size,
            gpu,
            cpu_used,
            ref_counts,
            eviction_order: Vec::new(),
            seqs,
        }
    }
}
