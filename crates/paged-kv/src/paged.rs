//! The paged allocator: PagedAttention-style block tables with copy-on-write
//! sharing, automatic prefix caching and swapping.

use rustc_hash::FxHashMap;

mod block_map;

use crate::block_pool::{BlockPool, CpuBlockPool};
use crate::{
    check_sizes, AllocError, BlockCopy, BlockHash, BlockId, CpuBlockId, InvariantViolation, KvAllocator,
    KvConfigError, KvUsage, PrefixCacheStats, PrefixHit, SeqId, SeqStart, SwapIn, SwapOut, TokenId,
};

/// How to build a [`PagedAllocator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedConfig {
    pub num_gpu_blocks: usize,
    pub num_cpu_blocks: usize,
    /// Token slots per block (8, 16, 32, 64 or 128 are usual).
    pub block_size: usize,
    /// Hash full blocks and reuse them across sequences.
    pub enable_prefix_caching: bool,
}

/// Swap traffic, cumulative since the allocator was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwapStats {
    /// GPU blocks copied to the CPU pool by swap-outs.
    pub blocks_swapped_out: u64,
    /// CPU blocks copied back by swap-ins (blocks still cached on the GPU
    /// are taken back instead, and not counted).
    pub blocks_swapped_in: u64,
}

/// One sequence's view of the cache.
#[derive(Clone, Debug)]
struct SeqBlocks {
    /// GPU block table; empty while swapped out.
    gpu: Vec<BlockId>,
    /// CPU blocks; non-empty only while swapped out.
    cpu: Vec<CpuBlockId>,
    swapped: bool,
    num_tokens: usize,
    /// Chained hashes of the full blocks (prefix caching only).
    hashes: Vec<BlockHash>,
    /// Tokens of the partly filled last block (prefix caching only).
    partial: Vec<TokenId>,
    extra_key: Option<u64>,
    /// The newest slot's token id is not known yet (`append_pending_slot`):
    /// `hashes` and `partial` cover every token but that one.
    pending_token: bool,
    /// Trailing slots holding speculative tokens not verified yet
    /// (`append_draft_slots`): counted in `num_tokens` and filled in their
    /// blocks, never hashed.
    draft_slots: usize,
}

/// Paged KV allocation over a fixed pool of GPU blocks and a CPU swap pool.
///
/// Invariants (checked by [`KvAllocator::check_invariants`]): a block's
/// reference count equals the number of sequences whose table holds it; free
/// blocks are exactly those with no holder; a sequence's table covers exactly
/// its tokens; only a partly filled last block is ever written, and only by
/// its sole holder (others get a copy first); a cached block's hash is the
/// chained hash of the tokens every holder has in it.
#[derive(Clone, Debug)]
pub struct PagedAllocator {
    config: PagedConfig,
    pool: BlockPool,
    cpu: CpuBlockPool,
    seqs: FxHashMap<SeqId, SeqBlocks>,
    stats: PrefixCacheStats,
    swap_stats: SwapStats,
}

impl PagedAllocator {
    pub fn new(config: PagedConfig) -> Result<Self, KvConfigError> {
        check_sizes(config.block_size, config.num_gpu_blocks, config.num_cpu_blocks)?;
        Ok(Self {
            config,
            pool: BlockPool::new(config.num_gpu_blocks, config.block_size),
            cpu: CpuBlockPool::new(config.num_cpu_blocks),
            seqs: FxHashMap::default(),
            stats: PrefixCacheStats::default(),
            swap_stats: SwapStats::default(),
        })
    }

    pub fn config(&self) -> &PagedConfig {
        &self.config
    }

    /// Free GPU blocks, counting evictable cached ones.
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// How many sequences hold `block` (0 if free or out of range).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        if (block as usize) < self.pool.num_blocks() {
            self.pool.ref_cnt(block)
        } else {
            0
        }
    }

    /// The most GPU blocks held at once since the allocator was built.
    pub fn peak_used_blocks(&self) -> usize {
        self.pool.peak_used()
    }

    /// Blocks copied out to and back from the CPU pool so far.
    pub fn swap_stats(&self) -> SwapStats {
        self.swap_stats
    }

    /// Sequences currently known (resident or swapped).
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.config.block_size)
    }

    /// Gives a resident sequence slots for `n` more tokens (a private copy of
    /// a shared, partly filled last block first) and returns where they start.
    /// The caller records what the slots hold.
    fn grow(&mut self, seq: SeqId, n: usize, copies: &mut Vec<BlockCopy>) -> Result<usize, AllocError> {
        let b = self.config.block_size;
        let s = self.seqs.get_mut(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        crate::check_resident_and_known(seq, s.swapped, s.pending_token, s.draft_slots)?;
        let cur = s.num_tokens;
        if n == 0 {
            return Ok(cur);
        }
        let total = cur + n;
        let new_blocks = total.div_ceil(b) - s.gpu.len();
        // Writing into a partly filled block that others hold: copy it first.
        let copy_last = cur % b != 0 && s.gpu.last().is_some_and(|&last| self.pool.ref_cnt(last) > 1);
        let needed = new_blocks + usize::from(copy_last);
        if needed > self.pool.num_free() {
            return Err(AllocError::OutOfBlocks { needed, free: self.pool.num_free() });
        }
        if copy_last {
            if let Some(last) = s.gpu.last_mut() {
                let old = *last;
                let new = Self::take_free_block(&mut self.pool);
                self.pool.add_filled(new, cur % b);
                self.pool.release(old);
                copies.push((old, new));
                *last = new;
            }
        }
        for _ in 0..new_blocks {
            s.gpu.push(Self::take_free_block(&mut self.pool));
        }
        s.num_tokens = total;
        Ok(cur)
    }

    fn take_free_block(pool: &mut BlockPool) -> BlockId {
        // Every caller has checked the free count first.
        pool.allocate().expect("free block count was checked before allocating")
    }
}

/// Records `tokens` written at positions `start..` of `table`: fill counts, and
/// with caching, hashes (and registers) every block they complete.
fn write_tokens(
    pool: &mut BlockPool,
    seq: &mut SeqBlocks,
    start: usize,
    tokens: &[TokenId],
    block_size: usize,
    caching: bool,
) {
    fill_slots(pool, seq, start, tokens.len(), block_size);
    if caching {
        hash_tokens(pool, seq, start, tokens, block_size);
    }
}

/// Counts `count` slots from position `start` as filled in their blocks.
fn fill_slots(pool: &mut BlockPool, seq: &SeqBlocks, start: usize, count: usize, block_size: usize) {
    for (index, n) in block_runs(start..start + count, block_size) {
        pool.add_filled(seq.gpu[index], n);
    }
}

/// The positions `range` split by block: `(block index in the table, how
/// many of the positions it holds)`, in order.
fn block_runs(range: std::ops::Range<usize>, block_size: usize) -> impl Iterator<Item = (usize, usize)> {
    let end = range.end;
    let mut pos = range.start;
    std::iter::from_fn(move || {
        (pos < end).then(|| {
            let stop = ((pos / block_size + 1) * block_size).min(end);
            let run = (pos / block_size, stop - pos);
            pos = stop;
            run
        })
    })
}

/// Extends the sequence's hash chain with `tokens` (at positions `start..`),
/// registering every block they complete in the prefix cache.
fn hash_tokens(
    pool: &mut BlockPool,
    seq: &mut SeqBlocks,
    start: usize,
    tokens: &[TokenId],
    block_size: usize,
) {
    let mut rest = tokens;
    let mut pos = start;
    while !rest.is_empty() {
        let take = (block_size - seq.partial.len()).min(rest.len());
        let (now, later) = rest.split_at(take);
        let full = if seq.partial.is_empty() && take == block_size {
            Some(BlockHash::chain(seq.hashes.last().copied(), now, seq.extra_key))
        } else {
            seq.partial.extend_from_slice(now);
            (seq.partial.len() == block_size)
                .then(|| BlockHash::chain(seq.hashes.last().copied(), &seq.partial, seq.extra_key))
        };
        if let Some(hash) = full {
            seq.partial.clear();
            seq.hashes.push(hash);
            pool.register(seq.gpu[pos / block_size], hash);
        }
        pos += take;
        rest = later;
    }
}

impl KvAllocator for PagedAllocator {
    fn name(&self) -> &str {
        "paged"
    }

    fn block_size(&self) -> usize {
        self.config.block_size
    }

    fn num_gpu_blocks(&self) -> usize {
        self.config.num_gpu_blocks
    }

    fn num_cpu_blocks(&self) -> usize {
        self.config.num_cpu_blocks
    }

    fn can_ever_fit(&self, num_tokens: usize) -> bool {
        self.blocks_for(num_tokens) <= self.config.num_gpu_blocks
    }

    fn lookup_prefix(&self, tokens: &[TokenId], extra_key: Option<u64>) -> PrefixHit {
        let mut hit = PrefixHit::miss(tokens.len());
        if !self.config.enable_prefix_caching {
            return hit;
        }
        let b = self.config.block_size;
        // Keep the last token out: its logits are needed, so it is computed.
        let max_blocks = tokens.len().saturating_sub(1) / b;
        let mut parent = None;
        for chunk in tokens.chunks_exact(b).take(max_blocks) {
            let hash = BlockHash::chain(parent, chunk, extra_key);
            let Some(block) = self.pool.lookup(hash) else { break };
            hit.blocks.push(block);
            hit.hashes.push(hash);
            parent = Some(hash);
        }
        hit.num_cached_tokens = hit.blocks.len() * b;
        hit
    }

    fn start_seq(&mut self, seq: SeqId, start: SeqStart<'_>) -> Result<(), AllocError> {
        if self.seqs.contains_key(&seq) {
            return Err(AllocError::SeqExists(seq));
        }
        let b = self.config.block_size;
        let hit = start.prefix;
        let n = start.tokens.len();
        if hit.num_cached_tokens > n
            || hit.blocks.len() * b != hit.num_cached_tokens
            || hit.hashes.len() != hit.blocks.len()
        {
            return Err(AllocError::InvalidPrefixHit { cached: hit.num_cached_tokens, tokens: n });
        }
        let mut free_hits = 0;
        for (&block, &hash) in hit.blocks.iter().zip(&hit.hashes) {
            if (block as usize) >= self.pool.num_blocks() || self.pool.hash_of(block) != Some(hash) {
                return Err(AllocError::StalePrefixHit { block });
            }
            free_hits += usize::from(self.pool.ref_cnt(block) == 0);
        }
        let new_blocks = self.blocks_for(n) - hit.blocks.len();
        let needed = new_blocks + free_hits;
        if needed > self.pool.num_free() {
            return Err(AllocError::OutOfBlocks { needed, free: self.pool.num_free() });
        }

        for &block in &hit.blocks {
            self.pool.acquire(block);
        }
        let mut gpu = hit.blocks;
        gpu.reserve(new_blocks);
        for _ in 0..new_blocks {
            gpu.push(Self::take_free_block(&mut self.pool));
        }
        let mut state = SeqBlocks {
            gpu,
            cpu: Vec::new(),
            swapped: false,
            num_tokens: n,
            hashes: hit.hashes,
            partial: Vec::new(),
            extra_key: start.extra_key,
            pending_token: false,
            draft_slots: 0,
        };
        let cached = hit.num_cached_tokens;
        write_tokens(
            &mut self.pool,
            &mut state,
            cached,
            &start.tokens[cached..],
            b,
            self.config.enable_prefix_caching,
        );
        self.seqs.insert(seq, state);
        self.stats.num_queries += 1;
        self.stats.queried_tokens += hit.num_queried_tokens as u64;
        self.stats.hit_tokens += cached as u64;
        Ok(())
    }

    fn append_slots(
        &mut self,
        seq: SeqId,
        new_tokens: &[TokenId],
        copies: &mut Vec<BlockCopy>,
    ) -> Result<(), AllocError> {
        let (b, caching) = (self.config.block_size, self.config.enable_prefix_caching);
        let cur = self.grow(seq, new_tokens.len(), copies)?;
        if let Some(s) = self.seqs.get_mut(&seq) {
            write_tokens(&mut self.pool, s, cur, new_tokens, b, caching);
        }
        Ok(())
    }

    fn append_pending_slot(&mut self, seq: SeqId, copies: &mut Vec<BlockCopy>) -> Result<(), AllocError> {
        let b = self.config.block_size;
        let cur = self.grow(seq, 1, copies)?;
        if let Some(s) = self.seqs.get_mut(&seq) {
            fill_slots(&mut self.pool, s, cur, 1, b);
            s.pending_token = true;
        }
        Ok(())
    }

    fn set_pending_token(&mut self, seq: SeqId, token: TokenId) -> Result<(), AllocError> {
        let b = self.config.block_size;
        let s = self.seqs.get_mut(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        if !s.pending_token {
            return Err(AllocError::NoPendingToken(seq));
        }
        s.pending_token = false;
        if self.config.enable_prefix_caching {
            let pos = s.num_tokens - 1;
            hash_tokens(&mut self.pool, s, pos, &[token], b);
        }
        Ok(())
    }

    fn append_draft_slots(
        &mut self,
        seq: SeqId,
        n: usize,
        copies: &mut Vec<BlockCopy>,
    ) -> Result<(), AllocError> {
        let b = self.config.block_size;
        let cur = self.grow(seq, n, copies)?;
        if let Some(s) = self.seqs.get_mut(&seq) {
            fill_slots(&mut self.pool, s, cur, n, b);
            s.draft_slots = n;
        }
        Ok(())
    }

    fn accept_draft_tokens(&mut self, seq: SeqId, accepted: &[TokenId]) -> Result<(), AllocError> {
        let b = self.config.block_size;
        let s = self.seqs.get_mut(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        crate::check_accepted(seq, accepted.len(), s.draft_slots)?;
        let verified = s.num_tokens - s.draft_slots;
        let keep = verified + accepted.len();
        // Unfill the rejected slots block by block, then drop the blocks
        // that hold none of the kept tokens (private and unhashed: a draft
        // block was allocated, or copied on write, by `append_draft_slots`).
        for (index, n) in block_runs(keep..s.num_tokens, b) {
            self.pool.remove_filled(s.gpu[index], n);
        }
        while s.gpu.len() > keep.div_ceil(b) {
            if let Some(block) = s.gpu.pop() {
                self.pool.release(block);
            }
        }
        s.num_tokens = keep;
        s.draft_slots = 0;
        if self.config.enable_prefix_caching {
            hash_tokens(&mut self.pool, s, verified, accepted, b);
        }
        Ok(())
    }

    fn num_draft_slots(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.draft_slots)
    }

    fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), AllocError> {
        if self.seqs.contains_key(&child) {
            return Err(AllocError::SeqExists(child));
        }
        let p = self.seqs.get(&parent).ok_or(AllocError::UnknownSeq(parent))?;
        crate::check_resident_and_known(parent, p.swapped, p.pending_token, p.draft_slots)?;
        let state = p.clone();
        for &block in &state.gpu {
            self.pool.acquire(block);
        }
        self.seqs.insert(child, state);
        Ok(())
    }

    fn free(&mut self, seq: SeqId) -> Result<(), AllocError> {
        let s = self.seqs.remove(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        // Last blocks first, so that a sequence's tail is evicted before its
        // head (heads are the prefixes other requests are likeliest to share).
        for &block in s.gpu.iter().rev() {
            self.pool.release(block);
        }
        for &block in &s.cpu {
            self.cpu.release(block);
        }
        Ok(())
    }

    fn swap_out(&mut self, seq: SeqId, plan: &mut Vec<SwapOut>) -> Result<(), AllocError> {
        let s = self.seqs.get_mut(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        crate::check_resident_and_known(seq, s.swapped, s.pending_token, s.draft_slots)?;
        // Resident, so `s.cpu` is empty.
        s.cpu = self.cpu.swap_out(&s.gpu, plan)?;
        self.swap_stats.blocks_swapped_out += s.cpu.len() as u64;
        for &gpu in s.gpu.iter().rev() {
            self.pool.release(gpu);
        }
        s.gpu.clear();
        s.swapped = true;
        Ok(())
    }

    fn swap_in(
        &mut self,
        seq: SeqId,
        new_tokens: &[TokenId],
        plan: &mut Vec<SwapIn>,
    ) -> Result<(), AllocError> {
        let b = self.config.block_size;
        let caching = self.config.enable_prefix_caching;
        let s = self.seqs.get_mut(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        if !s.swapped {
            return Err(AllocError::NotSwapped(seq));
        }
        // Full blocks whose contents are still cached on the GPU are taken
        // back from the cache instead of copied.
        let reuse: Vec<Option<BlockId>> = (0..s.cpu.len())
            .map(|i| if caching { s.hashes.get(i).and_then(|&h| self.pool.lookup(h)) } else { None })
            .collect();
        let copied = reuse.iter().filter(|r| r.is_none()).count();
        let free_hits = reuse.iter().flatten().filter(|&&blk| self.pool.ref_cnt(blk) == 0).count();
        let total = s.num_tokens + new_tokens.len();
        let appended = total.div_ceil(b) - s.cpu.len();
        let needed = copied + free_hits + appended;
        if needed > self.pool.num_free() {
            return Err(AllocError::OutOfBlocks { needed, free: self.pool.num_free() });
        }
        // Take every reused block out of the free queue before allocating:
        // an allocation could otherwise evict a block about to be reused.
        for &gpu in reuse.iter().flatten() {
            self.pool.acquire(gpu);
        }
        for (i, (&cpu, hit)) in s.cpu.iter().zip(&reuse).enumerate() {
            let gpu = match *hit {
                Some(gpu) => gpu,
                None => {
                    let gpu = Self::take_free_block(&mut self.pool);
                    self.pool.add_filled(gpu, (s.num_tokens - i * b).min(b));
                    if let Some(&h) = s.hashes.get(i) {
                        self.pool.register(gpu, h);
                    }
                    plan.push((cpu, gpu));
                    self.swap_stats.blocks_swapped_in += 1;
                    gpu
                }
            };
            s.gpu.push(gpu);
            self.cpu.release(cpu);
        }
        s.cpu.clear();
        s.swapped = false;
        for _ in 0..appended {
            s.gpu.push(Self::take_free_block(&mut self.pool));
        }
        let cur = s.num_tokens;
        write_tokens(&mut self.pool, s, cur, new_tokens, b, caching);
        s.num_tokens = total;
        Ok(())
    }

    fn block_table(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.seqs.get(&seq).map(|s| s.gpu.as_slice())
    }

    fn num_tokens(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.num_tokens)
    }

    fn is_swapped(&self, seq: SeqId) -> bool {
        self.seqs.get(&seq).is_some_and(|s| s.swapped)
    }

    fn usage(&self) -> KvUsage {
        KvUsage {
            block_size: self.config.block_size,
            num_gpu_blocks: self.config.num_gpu_blocks,
            used_blocks: self.config.num_gpu_blocks - self.pool.num_free(),
            cached_blocks: self.pool.num_cached(),
            token_slots: self.pool.used_token_slots(),
            external_fragmentation: 0.0,
            num_cpu_blocks: self.config.num_cpu_blocks,
            used_cpu_blocks: self.config.num_cpu_blocks - self.cpu.num_free(),
        }
    }

    fn prefix_cache_stats(&self) -> PrefixCacheStats {
        PrefixCacheStats { num_evictions: self.pool.num_evictions(), ..self.stats }
    }

    fn reset_prefix_cache(&mut self) -> usize {
        self.pool.evict_all_free()
    }

    fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let b = self.config.block_size;
        let mut gpu_holders = vec![0u32; self.pool.num_blocks()];
        let mut cpu_holders = vec![0u32; self.cpu.num_blocks()];
        for (&id, s) in &self.seqs {
            let expected_blocks = s.num_tokens.div_ceil(b);
            let (held, other) = if s.swapped { (&s.cpu, &s.gpu) } else { (&s.gpu, &s.cpu) };
            if held.len() != expected_blocks || !other.is_empty() {
                return Err(format!(
                    "{id}: {} tokens but {} GPU and {} CPU blocks (swapped = {})",
                    s.num_tokens,
                    s.gpu.len(),
                    s.cpu.len(),
                    s.swapped
                )
                .into());
            }
            let mut seen = rustc_hash::FxHashSet::default();
            for (i, &block) in s.gpu.iter().enumerate() {
                if block as usize >= gpu_holders.len() || !seen.insert(block) {
                    return Err(format!("{id}: block {block} out of range or held twice").into());
                }
                gpu_holders[block as usize] += 1;
                let expected_fill = (s.num_tokens - i * b).min(b) as u32;
                if self.pool.filled(block) != expected_fill {
                    return Err(format!(
                        "{id}: block {block} at index {i} has {} filled slots, expected {expected_fill}",
                        self.pool.filled(block)
                    )
                    .into());
                }
                if let (Some(cached), Some(own)) = (self.pool.hash_of(block), s.hashes.get(i)) {
                    if cached != *own {
                        return Err(format!("{id}: block {block} is cached under another prefix").into());
                    }
                }
                if self.pool.hash_of(block).is_some() && i >= s.hashes.len() {
                    return Err(
                        format!("{id}: block {block} is cached but not full for this sequence").into()
                    );
                }
            }
            CpuBlockPool::count_holders(id, &s.cpu, &mut cpu_holders)?;
            let known = s.num_tokens - usize::from(s.pending_token) - s.draft_slots;
            if self.config.enable_prefix_caching
                && (s.hashes.len() != known / b || s.partial.len() != known % b)
            {
                return Err(format!(
                    "{id}: {} hashes and {} partial tokens for {known} known tokens",
                    s.hashes.len(),
                    s.partial.len(),
                )
                .into());
            }
            if s.pending_token && (s.swapped || s.num_tokens == 0) {
                return Err(format!("{id}: a pending slot while swapped or empty").into());
            }
            if s.draft_slots > 0 && (s.swapped || s.pending_token || s.draft_slots > s.num_tokens) {
                return Err(
                    format!("{id}: {} draft slots while swapped, pending or short", s.draft_slots).into()
                );
            }
        }
        self.pool.check(&gpu_holders)?;
        self.cpu.check(&cpu_holders)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PrefixHit;

    fn alloc(blocks: usize, cpu: usize, b: usize, caching: bool) -> PagedAllocator {
        PagedAllocator::new(PagedConfig {
            num_gpu_blocks: blocks,
            num_cpu_blocks: cpu,
            block_size: b,
            enable_prefix_caching: caching,
        })
        .unwrap()
    }

    fn start(kv: &mut PagedAllocator, seq: u64, tokens: &[u32]) -> Result<usize, AllocError> {
        let prefix = kv.lookup_prefix(tokens, None);
        let cached = prefix.num_cached_tokens;
        kv.start_seq(SeqId(seq), SeqStart { tokens, prefix, extra_key: None, max_total_tokens: 1 << 20 })?;
        Ok(cached)
    }

    #[test]
    fn rejects_bad_configs() {
        let ok =
            PagedConfig { num_gpu_blocks: 4, num_cpu_blocks: 0, block_size: 16, enable_prefix_caching: true };
        assert!(PagedAllocator::new(ok).is_ok());
        assert!(matches!(
            PagedAllocator::new(PagedConfig { block_size: 0, ..ok }),
            Err(KvConfigError::BlockSize { .. })
        ));
        assert!(matches!(
            PagedAllocator::new(PagedConfig { num_gpu_blocks: 0, ..ok }),
            Err(KvConfigError::NumGpuBlocks { .. })
        ));
    }

    #[test]
    fn blocks_are_allocated_as_tokens_arrive() {
        let mut kv = alloc(4, 0, 4, false);
        start(&mut kv, 1, &[1, 2, 3]).unwrap();
        assert_eq!(kv.block_table(SeqId(1)).unwrap().len(), 1);
        let mut copies = vec![];
        kv.append_slots(SeqId(1), &[4], &mut copies).unwrap();
        assert_eq!(kv.block_table(SeqId(1)).unwrap().len(), 1);
        kv.append_slots(SeqId(1), &[5], &mut copies).unwrap();
        assert_eq!(kv.block_table(SeqId(1)).unwrap().len(), 2);
        assert!(copies.is_empty());
        let u = kv.usage();
        assert_eq!((u.used_blocks, u.token_slots, u.waste_slots()), (2, 5, 3));
        kv.check_invariants().unwrap();
        kv.free(SeqId(1)).unwrap();
        assert_eq!(kv.num_free_blocks(), 4);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn a_pending_slot_is_hashed_once_its_token_is_known() {
        let mut kv = alloc(8, 4, 4, true);
        start(&mut kv, 1, &[1, 2, 3]).unwrap();
        let mut copies = vec![];
        kv.append_pending_slot(SeqId(1), &mut copies).unwrap();
        assert_eq!(kv.num_tokens(SeqId(1)), Some(4));
        kv.check_invariants().unwrap();
        // Not hashed yet: a prompt with the same first block misses.
        assert_eq!(kv.lookup_prefix(&[1, 2, 3, 9, 5], None).num_cached_tokens, 0);
        // The sequence cannot grow, fork or swap until the token is known.
        assert_eq!(kv.append_slots(SeqId(1), &[5], &mut copies), Err(AllocError::PendingToken(SeqId(1))));
        assert_eq!(kv.append_pending_slot(SeqId(1), &mut copies), Err(AllocError::PendingToken(SeqId(1))));
        assert_eq!(kv.fork(SeqId(1), SeqId(2)), Err(AllocError::PendingToken(SeqId(1))));
        assert_eq!(kv.swap_out(SeqId(1), &mut vec![]), Err(AllocError::PendingToken(SeqId(1))));
        kv.set_pending_token(SeqId(1), 9).unwrap();
        assert_eq!(kv.set_pending_token(SeqId(1), 9), Err(AllocError::NoPendingToken(SeqId(1))));
        kv.check_invariants().unwrap();
        assert_eq!(kv.lookup_prefix(&[1, 2, 3, 9, 5], None).num_cached_tokens, 4);
        kv.append_slots(SeqId(1), &[5], &mut copies).unwrap();
        assert!(copies.is_empty());
        kv.check_invariants().unwrap();
    }

    #[test]
    fn out_of_blocks_changes_nothing() {
        let mut kv = alloc(2, 0, 4, false);
        start(&mut kv, 1, &[1; 6]).unwrap();
        let before = kv.usage();
        assert_eq!(
            kv.append_slots(SeqId(1), &[1; 3], &mut vec![]),
            Err(AllocError::OutOfBlocks { needed: 1, free: 0 })
        );
        assert_eq!(kv.usage(), before);
        assert_eq!(kv.num_tokens(SeqId(1)), Some(6));
        assert!(matches!(start(&mut kv, 2, &[1]), Err(AllocError::OutOfBlocks { .. })));
        assert!(kv.block_table(SeqId(2)).is_none());
        kv.check_invariants().unwrap();
    }

    #[test]
    fn fork_shares_and_copy_on_write_replaces_only_the_last_block() {
        let mut kv = alloc(8, 0, 4, false);
        start(&mut kv, 1, &[1, 2, 3, 4, 5, 6]).unwrap();
        kv.fork(SeqId(1), SeqId(2)).unwrap();
        kv.fork(SeqId(1), SeqId(3)).unwrap();
        let table = kv.block_table(SeqId(1)).unwrap().to_vec();
        assert_eq!(kv.ref_count(table[0]), 3);
        assert_eq!(kv.usage().used_blocks, 2);
        let mut copies = vec![];
        kv.append_slots(SeqId(2), &[7], &mut copies).unwrap();
        let t2 = kv.block_table(SeqId(2)).unwrap().to_vec();
        assert_eq!(t2[0], table[0], "full blocks stay shared");
        assert_ne!(t2[1], table[1]);
        assert_eq!(copies, vec![(table[1], t2[1])]);
        kv.append_slots(SeqId(3), &[7], &mut copies).unwrap();
        assert_eq!(copies.len(), 2);
        // SeqId(1) is now the only holder of the original last block: no copy.
        kv.append_slots(SeqId(1), &[7], &mut copies).unwrap();
        assert_eq!(copies.len(), 2);
        assert_eq!(kv.block_table(SeqId(1)).unwrap(), &table[..]);
        kv.check_invariants().unwrap();
        for s in 1..=3 {
            kv.free(SeqId(s)).unwrap();
        }
        assert_eq!(kv.num_free_blocks(), 8);
    }

    #[test]
    fn fork_of_a_block_aligned_sequence_needs_no_copy() {
        let mut kv = alloc(8, 0, 4, false);
        start(&mut kv, 1, &[1; 8]).unwrap();
        kv.fork(SeqId(1), SeqId(2)).unwrap();
        let mut copies = vec![];
        kv.append_slots(SeqId(2), &[1], &mut copies).unwrap();
        kv.append_slots(SeqId(1), &[1], &mut copies).unwrap();
        assert!(copies.is_empty());
        assert_eq!(kv.usage().used_blocks, 4);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn prefix_cache_reuses_full_blocks_and_keeps_the_last_token_uncached() {
        let mut kv = alloc(16, 0, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        assert_eq!(start(&mut kv, 1, &prompt).unwrap(), 0);
        let t1 = kv.block_table(SeqId(1)).unwrap().to_vec();
        // Same 8-token prefix, different tail.
        let mut other = prompt[..8].to_vec();
        other.extend([99, 98, 97]);
        assert_eq!(start(&mut kv, 2, &other).unwrap(), 8);
        let t2 = kv.block_table(SeqId(2)).unwrap().to_vec();
        assert_eq!(t2[..2], t1[..2]);
        assert_ne!(t2[2], t1[2]);
        // A prompt of exactly two cached blocks reuses only one.
        assert_eq!(start(&mut kv, 3, &prompt[..8]).unwrap(), 4);
        // A different extra key shares nothing.
        let prefix = kv.lookup_prefix(&prompt, Some(7));
        assert_eq!(prefix.num_cached_tokens, 0);
        let stats = kv.prefix_cache_stats();
        assert_eq!((stats.num_queries, stats.queried_tokens, stats.hit_tokens), (3, 29, 12));
        kv.check_invariants().unwrap();
    }

    #[test]
    fn freed_cached_blocks_are_reused_until_evicted() {
        let mut kv = alloc(4, 0, 4, true);
        let prompt: Vec<u32> = (0..9).collect();
        start(&mut kv, 1, &prompt).unwrap();
        let t1 = kv.block_table(SeqId(1)).unwrap().to_vec();
        kv.free(SeqId(1)).unwrap();
        assert_eq!(kv.usage().cached_blocks, 2);
        assert_eq!(start(&mut kv, 2, &prompt).unwrap(), 8);
        assert_eq!(kv.block_table(SeqId(2)).unwrap()[..2], t1[..2]);
        kv.free(SeqId(2)).unwrap();
        // Fill the pool with unrelated tokens: the cached blocks are evicted.
        start(&mut kv, 3, &[50; 16]).unwrap();
        assert_eq!(kv.usage().cached_blocks, 4, "only the new full blocks are cached");
        kv.free(SeqId(3)).unwrap();
        assert_eq!(kv.lookup_prefix(&prompt, None).num_cached_tokens, 0);
        assert!(kv.prefix_cache_stats().num_evictions >= 2);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn stale_prefix_hits_are_refused() {
        let mut kv = alloc(2, 0, 2, true);
        start(&mut kv, 1, &[1, 2, 3]).unwrap();
        kv.free(SeqId(1)).unwrap();
        let hit = kv.lookup_prefix(&[1, 2, 3], None);
        assert_eq!(hit.num_cached_tokens, 2);
        start(&mut kv, 2, &[9, 9, 9, 9]).unwrap(); // evicts the cached block
        let err = kv.start_seq(
            SeqId(3),
            SeqStart { tokens: &[1, 2, 3], prefix: hit, extra_key: None, max_total_tokens: 3 },
        );
        assert!(matches!(err, Err(AllocError::StalePrefixHit { .. })));
        kv.check_invariants().unwrap();
    }

    #[test]
    fn generated_tokens_fill_and_register_blocks() {
        let mut kv = alloc(8, 0, 4, true);
        start(&mut kv, 1, &[1, 2, 3]).unwrap();
        for t in 4..=9 {
            kv.append_slots(SeqId(1), &[t], &mut vec![]).unwrap();
        }
        let all: Vec<u32> = (1..=9).collect();
        assert_eq!(kv.lookup_prefix(&all, None).num_cached_tokens, 8);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn swap_out_and_in_round_trip() {
        let mut kv = alloc(4, 4, 4, false);
        start(&mut kv, 1, &[1; 6]).unwrap();
        let table = kv.block_table(SeqId(1)).unwrap().to_vec();
        let mut out = vec![];
        kv.swap_out(SeqId(1), &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out.iter().map(|p| p.0).collect::<Vec<_>>(), table);
        assert!(kv.is_swapped(SeqId(1)));
        assert_eq!(kv.num_free_blocks(), 4);
        assert_eq!(kv.append_slots(SeqId(1), &[1], &mut vec![]), Err(AllocError::Swapped(SeqId(1))));
        kv.check_invariants().unwrap();
        let mut inp = vec![];
        kv.swap_in(SeqId(1), &[1, 1, 1], &mut inp).unwrap();
        assert_eq!(inp.len(), 2);
        assert_eq!(kv.block_table(SeqId(1)).unwrap().len(), 3);
        assert_eq!(kv.num_tokens(SeqId(1)), Some(9));
        assert_eq!(kv.usage().used_cpu_blocks, 0);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn swap_traffic_and_peak_occupancy_are_counted() {
        let mut kv = alloc(8, 8, 4, true);
        assert_eq!((kv.peak_used_blocks(), kv.swap_stats()), (0, SwapStats::default()));
        let prompt: Vec<u32> = (0..10).collect();
        start(&mut kv, 1, &prompt).unwrap();
        start(&mut kv, 2, &prompt).unwrap(); // shares the two full blocks: 4 used
        assert_eq!(kv.peak_used_blocks(), 4);
        let mut out = vec![];
        kv.swap_out(SeqId(1), &mut out).unwrap();
        kv.free(SeqId(2)).unwrap();
        assert_eq!(kv.usage().used_blocks, 0);
        assert_eq!(kv.peak_used_blocks(), 4, "the peak outlives the blocks");
        // Seq 2's full blocks are still cached: only the partial block is copied back.
        kv.swap_in(SeqId(1), &[10], &mut vec![]).unwrap();
        assert_eq!(kv.swap_stats(), SwapStats { blocks_swapped_out: 3, blocks_swapped_in: 1 });
        start(&mut kv, 3, &[7; 20]).unwrap();
        assert_eq!(kv.peak_used_blocks(), kv.usage().used_blocks);
        assert_eq!(kv.peak_used_blocks(), 3 + 5);
    }

    #[test]
    fn swap_needs_room_on_both_sides() {
        let mut kv = alloc(2, 1, 4, false);
        start(&mut kv, 1, &[1; 6]).unwrap();
        assert_eq!(
            kv.swap_out(SeqId(1), &mut vec![]),
            Err(AllocError::OutOfCpuBlocks { needed: 2, free: 1 })
        );
        let mut kv = alloc(2, 4, 4, false);
        start(&mut kv, 1, &[1; 6]).unwrap();
        kv.swap_out(SeqId(1), &mut vec![]).unwrap();
        start(&mut kv, 2, &[2]).unwrap();
        let mut plan = vec![];
        assert!(matches!(kv.swap_in(SeqId(1), &[1], &mut plan), Err(AllocError::OutOfBlocks { .. })));
        assert!(plan.is_empty());
        assert!(kv.is_swapped(SeqId(1)));
        kv.check_invariants().unwrap();
    }

    #[test]
    fn swap_in_takes_cached_blocks_back_instead_of_copying() {
        let mut kv = alloc(8, 8, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        start(&mut kv, 1, &prompt).unwrap();
        start(&mut kv, 2, &prompt).unwrap(); // shares the two full blocks
        let mut out = vec![];
        kv.swap_out(SeqId(1), &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let mut inp = vec![];
        kv.swap_in(SeqId(1), &[10], &mut inp).unwrap();
        assert_eq!(inp.len(), 1, "only the partial block is copied back");
        assert_eq!(kv.block_table(SeqId(1)).unwrap()[..2], kv.block_table(SeqId(2)).unwrap()[..2]);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn swap_in_never_allocates_a_block_it_is_about_to_reuse() {
        // Arrange the free queue so that the cached block swap-in reuses for
        // index 1 sits at the head while index 0 must be copied.
        let mut kv = alloc(4, 4, 2, true);
        let miss = |tokens| SeqStart {
            tokens,
            prefix: PrefixHit::miss(tokens.len()),
            extra_key: None,
            max_total_tokens: 64,
        };
        let (c, a, g) = ([1, 2, 5], [1, 2, 3, 4], [9; 6]);
        kv.start_seq(SeqId(1), miss(&c)).unwrap(); // blocks 0 (cached [1, 2]), 1
        kv.start_seq(SeqId(2), miss(&a)).unwrap(); // blocks 2 (duplicate, uncached), 3
        kv.free(SeqId(1)).unwrap();
        kv.swap_out(SeqId(2), &mut vec![]).unwrap();
        kv.start_seq(SeqId(3), miss(&g)).unwrap(); // evicts block 0's [1, 2]
        kv.free(SeqId(3)).unwrap(); // free queue: 3 (cached [3, 4]), then 0, 1, 2
        let mut plan = vec![];
        kv.swap_in(SeqId(2), &[], &mut plan).unwrap();
        let table = kv.block_table(SeqId(2)).unwrap().to_vec();
        assert_eq!(table[1], 3, "the cached block is reused");
        assert_ne!(table[0], table[1]);
        assert_eq!(plan, vec![(plan[0].0, table[0])]);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn unknown_and_duplicate_sequences_are_errors() {
        let mut kv = alloc(4, 0, 4, false);
        assert_eq!(kv.free(SeqId(9)), Err(AllocError::UnknownSeq(SeqId(9))));
        assert_eq!(kv.append_slots(SeqId(9), &[1], &mut vec![]), Err(AllocError::UnknownSeq(SeqId(9))));
        start(&mut kv, 1, &[1]).unwrap();
        assert_eq!(start(&mut kv, 1, &[1]), Err(AllocError::SeqExists(SeqId(1))));
        assert_eq!(kv.fork(SeqId(1), SeqId(1)), Err(AllocError::SeqExists(SeqId(1))));
        assert_eq!(kv.swap_in(SeqId(1), &[], &mut vec![]), Err(AllocError::NotSwapped(SeqId(1))));
    }

    #[test]
    fn reset_prefix_cache_forgets_free_cached_blocks() {
        let mut kv = alloc(6, 0, 2, true);
        start(&mut kv, 1, &[1, 2, 3, 4, 5]).unwrap();
        start(&mut kv, 2, &[7, 8, 9]).unwrap();
        kv.free(SeqId(1)).unwrap();
        assert_eq!(kv.usage().cached_blocks, 3);
        assert_eq!(kv.reset_prefix_cache(), 2);
        assert_eq!(kv.usage().cached_blocks, 1, "the used block keeps its hash");
        kv.check_invariants().unwrap();
    }
}
