//! The GPU block pool: reference counts, the free queue and the prefix-cache
//! map from block hash to block, and the CPU pool used for swapping.

use rustc_hash::FxHashMap;

use crate::free_queue::FreeBlockQueue;
use crate::{AllocError, BlockHash, BlockId, CpuBlockId, SeqId, SwapOut};

/// Physical GPU blocks with reference counts and a prefix cache.
///
/// A block is *used* while at least one sequence holds it (`ref_cnt > 0`) and
/// *free* otherwise; every free block sits in the free queue. A full block may
/// carry a [`BlockHash`] and be findable in `cached`; it stays findable after it
/// is freed until it is handed out again (evicted), so a later request with the
/// same prefix can take it back. Freed blocks without a hash go to the head of
/// the queue (nothing is lost by reusing them), freed cached ones to the tail,
/// which makes eviction least-recently-used among cached blocks.
#[derive(Clone, Debug)]
pub(crate) struct BlockPool {
    block_size: usize,
    ref_cnt: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    /// Slots of each block that hold a token's KV (written by its sole holder).
    filled: Vec<u32>,
    free: FreeBlockQueue,
    cached: FxHashMap<BlockHash, BlockId>,
    /// Sum of `filled` over used blocks, kept incrementally for usage stats.
    used_token_slots: usize,
    num_evictions: u64,
    /// The most blocks used at once so far (a high-water mark for reports).
    peak_used: usize,
}

impl BlockPool {
    pub(crate) fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            ref_cnt: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            filled: vec![0; num_blocks],
            free: FreeBlockQueue::new_full(num_blocks),
            cached: FxHashMap::default(),
            used_token_slots: 0,
            num_evictions: 0,
            peak_used: 0,
        }
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    pub(crate) fn num_free(&self) -> usize {
        self.free.len()
    }

    pub(crate) fn num_cached(&self) -> usize {
        self.cached.len()
    }

    pub(crate) fn used_token_slots(&self) -> usize {
        self.used_token_slots
    }

    pub(crate) fn num_evictions(&self) -> u64 {
        self.num_evictions
    }

    pub(crate) fn peak_used(&self) -> usize {
        self.peak_used
    }

    /// Blocks only become used in `allocate` and `acquire`, so updating the
    /// high-water mark there sees every peak.
    fn note_used(&mut self) {
        self.peak_used = self.peak_used.max(self.num_blocks() - self.num_free());
    }

    pub(crate) fn ref_cnt(&self, block: BlockId) -> u32 {
        self.ref_cnt[block as usize]
    }

    pub(crate) fn hash_of(&self, block: BlockId) -> Option<BlockHash> {
        self.hash[block as usize]
    }

    pub(crate) fn filled(&self, block: BlockId) -> u32 {
        self.filled[block as usize]
    }

    pub(crate) fn lookup(&self, hash: BlockHash) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    /// Takes the head of the free queue, evicting its cached hash if it has
    /// one. The block comes back empty with one reference.
    pub(crate) fn allocate(&mut self) -> Option<BlockId> {
        let block = self.free.pop_front()?;
        let b = block as usize;
        if let Some(h) = self.hash[b].take() {
            self.cached.remove(&h);
            self.num_evictions += 1;
        }
        self.ref_cnt[b] = 1;
        self.filled[b] = 0;
        self.note_used();
        Some(block)
    }

    /// Adds a holder to a block, taking it out of the free queue if it was free
    /// (a prefix-cache hit on a freed block, or sharing a used one).
    pub(crate) fn acquire(&mut self, block: BlockId) {
        let b = block as usize;
        if self.ref_cnt[b] == 0 {
            self.free.remove(block);
            self.used_token_slots += self.filled[b] as usize;
        }
        self.ref_cnt[b] += 1;
        self.note_used();
    }

    /// Drops a holder; the last one returns the block to the free queue.
    pub(crate) fn release(&mut self, block: BlockId) {
        let b = block as usize;
        debug_assert!(self.ref_cnt[b] > 0, "release of free block {block}");
        self.ref_cnt[b] -= 1;
        if self.ref_cnt[b] == 0 {
            self.used_token_slots -= self.filled[b] as usize;
            if self.hash[b].is_some() {
                self.free.push_back(block);
            } else {
                self.free.push_front(block);
            }
        }
    }

    /// Records `n` more tokens written into a used block.
    pub(crate) fn add_filled(&mut self, block: BlockId, n: usize) {
        let b = block as usize;
        debug_assert!(self.ref_cnt[b] > 0);
        self.filled[b] += n as u32;
        debug_assert!(self.filled[b] as usize <= self.block_size);
        self.used_token_slots += n;
    }

    /// Records `n` tokens removed from the end of a used block (rejected
    /// speculative tokens). Only unhashed blocks lose tokens.
    pub(crate) fn remove_filled(&mut self, block: BlockId, n: usize) {
        let b = block as usize;
        debug_assert!(self.ref_cnt[b] > 0 && self.hash[b].is_none());
        debug_assert!(self.filled[b] as usize >= n);
        self.filled[b] -= n as u32;
        self.used_token_slots -= n;
    }

    /// Makes a full block findable under `hash`, unless the block already has
    /// a hash or another block already holds these contents (then the first
    /// one stays the cached copy and this one is freed as plain memory).
    pub(crate) fn register(&mut self, block: BlockId, hash: BlockHash) {
        let b = block as usize;
        if self.hash[b].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.hash[b] = Some(hash);
        self.cached.insert(hash, block);
    }

    /// Free blocks, the next one to be handed out first (uncached ones, then
    /// cached ones least recently used first).
    pub(crate) fn free_in_eviction_order(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.free.iter()
    }

    /// Forgets every cached hash of a free block (used blocks keep theirs,
    /// since their holders may still register children of them).
    pub(crate) fn evict_all_free(&mut self) -> usize {
        let free: Vec<BlockId> = self.free.iter().collect();
        let mut n = 0;
        for block in free {
            if let Some(h) = self.hash[block as usize].take() {
                self.cached.remove(&h);
                n += 1;
            }
        }
        // Uncached blocks belong at the head; order among them does not matter.
        n
    }

    /// Checks reference counts against `holders[b]` (how many sequences hold
    /// block `b`), and the free queue and cache map against each other.
    pub(crate) fn check(&self, holders: &[u32]) -> Result<(), String> {
        self.free.check()?;
        let mut used_slots = 0usize;
        for (b, (&refs, &held)) in self.ref_cnt.iter().zip(holders).enumerate() {
            let block = b as BlockId;
            if refs != held {
                return Err(format!("block {b}: ref count {refs} but {held} holders"));
            }
            if (refs == 0) != self.free.contains(block) {
                return Err(format!(
                    "block {b}: ref count {refs} but in free queue = {}",
                    self.free.contains(block)
                ));
            }
            if self.filled[b] as usize > self.block_size {
                return Err(format!("block {b}: {} filled slots > block size", self.filled[b]));
            }
            if let Some(h) = self.hash[b] {
                if self.cached.get(&h) != Some(&block) {
                    return Err(format!("block {b}: has a hash that the cache map does not point back at"));
                }
                if self.filled[b] as usize != self.block_size {
                    return Err(format!("block {b}: cached but only {} slots filled", self.filled[b]));
                }
            }
            if refs > 0 {
                used_slots += self.filled[b] as usize;
            }
        }
        for (h, &block) in &self.cached {
            if self.hash[block as usize] != Some(*h) {
                return Err(format!("cache map entry points at block {block}, which has another hash"));
            }
        }
        if used_slots != self.used_token_slots {
            return Err(format!(
                "used token slots {} but counter says {}",
                used_slots, self.used_token_slots
            ));
        }
        Ok(())
    }
}

/// Host (CPU) blocks that swapped-out sequences occupy. No caching, no
/// sharing: each CPU block has at most one holder.
#[derive(Clone, Debug)]
pub(crate) struct CpuBlockPool {
    free: Vec<CpuBlockId>,
    in_use: Vec<bool>,
}

impl CpuBlockPool {
    pub(crate) fn new(num_blocks: usize) -> Self {
        // Reversed so that pops hand out low ids first (easier to read in tests).
        Self { free: (0..num_blocks as CpuBlockId).rev().collect(), in_use: vec![false; num_blocks] }
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.in_use.len()
    }

    pub(crate) fn num_free(&self) -> usize {
        self.free.len()
    }

    pub(crate) fn allocate(&mut self) -> Option<CpuBlockId> {
        let block = self.free.pop()?;
        self.in_use[block as usize] = true;
        Some(block)
    }

    pub(crate) fn release(&mut self, block: CpuBlockId) {
        debug_assert!(self.in_use[block as usize]);
        self.in_use[block as usize] = false;
        self.free.push(block);
    }

    /// Gives each block of `gpu`, in order, a CPU block to be copied to,
    /// pushing the `(gpu, cpu)` copies onto `plan`; returns the CPU blocks.
    /// All or nothing: when too few are free, nothing changes.
    pub(crate) fn swap_out(
        &mut self,
        gpu: &[BlockId],
        plan: &mut Vec<SwapOut>,
    ) -> Result<Vec<CpuBlockId>, AllocError> {
        let needed = gpu.len();
        if needed > self.num_free() {
            return Err(AllocError::OutOfCpuBlocks { needed, free: self.num_free() });
        }
        let mut cpu = Vec::with_capacity(needed);
        for &g in gpu {
            let c = self.allocate().expect("free CPU block count was checked");
            plan.push((g, c));
            cpu.push(c);
        }
        Ok(cpu)
    }

    /// Counts `seq` as a holder of each of `blocks` in `holders` (indexed by
    /// CPU block), for [`Self::check`]; an out-of-range block is an error.
    pub(crate) fn count_holders(
        seq: SeqId,
        blocks: &[CpuBlockId],
        holders: &mut [u32],
    ) -> Result<(), String> {
        for &c in blocks {
            match holders.get_mut(c as usize) {
                Some(h) => *h += 1,
                None => return Err(format!("{seq}: CPU block {c} out of range")),
            }
        }
        Ok(())
    }

    /// Checks that `holders[b]` is 1 exactly for the blocks in use.
    pub(crate) fn check(&self, holders: &[u32]) -> Result<(), String> {
        let mut in_free = vec![false; self.num_blocks()];
        for &b in &self.free {
            if std::mem::replace(&mut in_free[b as usize], true) {
                return Err(format!("cpu block {b} twice in the free list"));
            }
        }
        for (b, (&in_use, &held)) in self.in_use.iter().zip(holders).enumerate() {
            if held != u32::from(in_use) || in_free[b] == in_use {
                return Err(format!(
                    "cpu block {b}: in use = {in_use}, {held} holders, in free list = {}",
                    in_free[b]
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_cached_blocks_are_evicted_last_and_in_lru_order() {
        let mut pool = BlockPool::new(4, 2);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        let c = pool.allocate().unwrap();
        for &x in &[a, b] {
            pool.add_filled(x, 2);
        }
        pool.register(a, BlockHash(1));
        pool.register(b, BlockHash(2));
        pool.release(a); // cached: tail
        pool.release(c); // uncached: head
        pool.release(b); // cached: tail, after a
        assert_eq!(pool.lookup(BlockHash(1)), Some(a));
        // Order now: c, 3, a, b.
        assert_eq!(pool.allocate(), Some(c));
        assert_eq!(pool.allocate(), Some(3));
        assert_eq!(pool.allocate(), Some(a));
        assert_eq!(pool.lookup(BlockHash(1)), None, "a was evicted");
        assert_eq!(pool.lookup(BlockHash(2)), Some(b));
        assert_eq!(pool.num_evictions(), 1);
    }

    #[test]
    fn a_cache_hit_takes_a_free_block_back() {
        let mut pool = BlockPool::new(2, 1);
        let a = pool.allocate().unwrap();
        pool.add_filled(a, 1);
        pool.register(a, BlockHash(9));
        pool.release(a);
        assert_eq!(pool.num_free(), 2);
        pool.acquire(a);
        assert_eq!(pool.num_free(), 1);
        assert_eq!(pool.ref_cnt(a), 1);
        assert_eq!(pool.used_token_slots(), 1);
        pool.check(&[1, 0]).unwrap();
    }

    #[test]
    fn duplicate_contents_keep_the_first_cached_copy() {
        let mut pool = BlockPool::new(2, 1);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        pool.add_filled(a, 1);
        pool.add_filled(b, 1);
        pool.register(a, BlockHash(5));
        pool.register(b, BlockHash(5));
        assert_eq!(pool.lookup(BlockHash(5)), Some(a));
        assert_eq!(pool.hash_of(b), None);
        pool.check(&[1, 1]).unwrap();
    }
}
