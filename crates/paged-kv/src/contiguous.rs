//! The baseline without paging: one contiguous reservation per sequence.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

mod block_map;

use crate::block_pool::CpuBlockPool;
use crate::{
    check_sizes, AllocError, BlockCopy, BlockId, CpuBlockId, InvariantViolation, KvAllocator, KvConfigError,
    KvUsage, PrefixCacheStats, PrefixHit, SeqId, SeqStart, SwapIn, SwapOut, TokenId,
};

/// How much a sequence reserves when it starts (the policies of the Orca
/// baselines in the vLLM paper).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// Every sequence reserves this many tokens, the model's maximum length
    /// (FasterTransformer, Hugging Face, "Orca (Max)").
    Fixed(usize),
    /// `prompt + max new tokens` rounded up to a power of two ("Orca (Pow2)").
    NextPowerOfTwo,
    /// Exactly `prompt + max new tokens` ("Orca (Oracle)" when the request's
    /// max tokens is its true output length, as in a simulator).
    Exact,
}

/// How to build a [`ContiguousAllocator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContiguousConfig {
    pub num_gpu_blocks: usize,
    pub num_cpu_blocks: usize,
    /// Addressing granularity of the cache (the run is still contiguous).
    pub block_size: usize,
    pub reservation: Reservation,
}

#[derive(Clone, Debug)]
struct Reserved {
    /// First block of the run (meaningless while swapped).
    start: BlockId,
    /// Length of the run in blocks.
    reserved_blocks: usize,
    num_tokens: usize,
    /// `start..start + ceil(num_tokens / B)` while resident.
    table: Vec<BlockId>,
    cpu: Vec<CpuBlockId>,
    swapped: bool,
    /// The newest slot waits for its token id (`append_pending_slot`).
    pending_token: bool,
    /// Trailing slots of speculative tokens not verified yet.
    draft_slots: usize,
}

/// Contiguous max-length reservation: what engines without paging do.
///
/// Each sequence gets one run of consecutive blocks, sized by its
/// [`Reservation`], when it starts, and keeps it until it ends; runs are placed
/// first-fit. Memory is wasted three ways, which [`KvUsage`] exposes: slots
/// reserved for tokens not generated yet, slots reserved for tokens never
/// generated (internal fragmentation), and free gaps between runs too small
/// for a new run (external fragmentation). No sharing: forking is refused and
/// there is no prefix cache.
#[derive(Clone, Debug)]
pub struct ContiguousAllocator {
    config: ContiguousConfig,
    /// Free runs: start -> length, coalesced (no two adjacent).
    free_runs: BTreeMap<BlockId, usize>,
    num_free: usize,
    cpu: CpuBlockPool,
    seqs: FxHashMap<SeqId, Reserved>,
    stats: PrefixCacheStats,
}

impl ContiguousAllocator {
    pub fn new(config: ContiguousConfig) -> Result<Self, KvConfigError> {
        check_sizes(config.block_size, config.num_gpu_blocks, config.num_cpu_blocks)?;
        if config.reservation == Reservation::Fixed(0) {
            return Err(KvConfigError::EmptyReservation);
        }
        Ok(Self {
            config,
            free_runs: BTreeMap::from([(0, config.num_gpu_blocks)]),
            num_free: config.num_gpu_blocks,
            cpu: CpuBlockPool::new(config.num_cpu_blocks),
            seqs: FxHashMap::default(),
            stats: PrefixCacheStats::default(),
        })
    }

    pub fn config(&self) -> &ContiguousConfig {
        &self.config
    }

    /// Tokens reserved for a sequence that may grow to `max_total_tokens`,
    /// or `None` if the policy cannot hold it.
    pub fn reservation_tokens(&self, max_total_tokens: usize) -> Option<usize> {
        let n = max_total_tokens.max(1);
        match self.config.reservation {
            Reservation::Fixed(m) => (n <= m).then_some(m),
            Reservation::NextPowerOfTwo => n.checked_next_power_of_two(),
            Reservation::Exact => Some(n),
        }
    }

    fn largest_free_run(&self) -> usize {
        self.free_runs.values().copied().max().unwrap_or(0)
    }

    /// First fit: the lowest free run of at least `len` blocks.
    fn take_run(&mut self, len: usize) -> Result<BlockId, AllocError> {
        let found = self.free_runs.iter().find(|(_, &l)| l >= len).map(|(&s, &l)| (s, l));
        let Some((start, run)) = found else {
            return Err(if len > self.num_free {
                AllocError::OutOfBlocks { needed: len, free: self.num_free }
            } else {
                AllocError::NoContiguousRun { needed: len, largest: self.largest_free_run() }
            });
        };
        self.free_runs.remove(&start);
        if run > len {
            self.free_runs.insert(start + len as BlockId, run - len);
        }
        self.num_free -= len;
        Ok(start)
    }

    fn give_run(&mut self, start: BlockId, len: usize) {
        let mut start = start;
        let mut len = len;
        self.num_free += len;
        if let Some((&prev, &prev_len)) = self.free_runs.range(..start).next_back() {
            if prev as usize + prev_len == start as usize {
                self.free_runs.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        let end = start + len as BlockId;
        if let Some(next_len) = self.free_runs.remove(&end) {
            len += next_len;
        }
        self.free_runs.insert(start, len);
    }

    fn table_for(start: BlockId, num_blocks: usize) -> Vec<BlockId> {
        (start..start + num_blocks as BlockId).collect()
    }
}

impl KvAllocator for ContiguousAllocator {
    fn name(&self) -> &str {
        match self.config.reservation {
            Reservation::Fixed(_) => "max-len",
            Reservation::NextPowerOfTwo => "pow2",
            Reservation::Exact => "exact",
        }
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
        self.reservation_tokens(num_tokens)
            .is_some_and(|r| r.div_ceil(self.config.block_size) <= self.config.num_gpu_blocks)
    }

    fn lookup_prefix(&self, tokens: &[TokenId], _extra_key: Option<u64>) -> PrefixHit {
        PrefixHit::miss(tokens.len())
    }

    fn start_seq(&mut self, seq: SeqId, start: SeqStart<'_>) -> Result<(), AllocError> {
        if self.seqs.contains_key(&seq) {
            return Err(AllocError::SeqExists(seq));
        }
        if start.prefix.num_cached_tokens != 0 {
            return Err(AllocError::InvalidPrefixHit {
                cached: start.prefix.num_cached_tokens,
                tokens: start.tokens.len(),
            });
        }
        let n = start.tokens.len();
        let max_total = start.max_total_tokens.max(n);
        let reserved_tokens = self.reservation_tokens(max_total).ok_or(AllocError::ReservationExceeded {
            seq,
            requested: max_total,
            reserved: match self.config.reservation {
                Reservation::Fixed(m) => m,
                _ => 0,
            },
        })?;
        let reserved_blocks = reserved_tokens.div_ceil(self.config.block_size);
        let first = self.take_run(reserved_blocks)?;
        let table = Self::table_for(first, n.div_ceil(self.config.block_size));
        self.seqs.insert(
            seq,
            Reserved {
                start: first,
                reserved_blocks,
                num_tokens: n,
                table,
                cpu: Vec::new(),
                swapped: false,
                pending_token: false,
                draft_slots: 0,
            },
        );
        self.stats.num_queries += 1;
        self.stats.queried_tokens += start.prefix.num_queried_tokens as u64;
        Ok(())
    }

    fn append_slots(
        &mut self,
        seq: SeqId,
        new_tokens: &[TokenId],
        _copies: &mut Vec<BlockCopy>,
    ) -> Result<(), AllocError> {
        let b = self.config.block_size;
        let s = self.seqs.get_mut(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        crate::check_resident_and_known(seq, s.swapped, s.pending_token, s.draft_slots)?;
        let total = s.num_tokens + new_tokens.len();
        if total > s.reserved_blocks * b {
            return Err(AllocError::ReservationExceeded {
                seq,
                requested: total,
                reserved: s.reserved_blocks * b,
            });
        }
        let needed = total.div_ceil(b);
        while s.table.len() < needed {
            s.table.push(s.start + s.table.len() as BlockId);
        }
        s.num_tokens = total;
        Ok(())
    }

    fn append_pending_slot(&mut self, seq: SeqId, copies: &mut Vec<BlockCopy>) -> Result<(), AllocError> {
        // No hashing here: the id is only a placeholder for the slot count.
        self.append_slots(seq, &[0], copies)?;
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.pending_token = true;
        }
        Ok(())
    }

    fn set_pending_token(&mut self, seq: SeqId, _token: TokenId) -> Result<(), AllocError> {
        let s = self.seqs.get_mut(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        if !std::mem::take(&mut s.pending_token) {
            return Err(AllocError::NoPendingToken(seq));
        }
        Ok(())
    }

    fn append_draft_slots(
        &mut self,
        seq: SeqId,
        n: usize,
        copies: &mut Vec<BlockCopy>,
    ) -> Result<(), AllocError> {
        // The ids are placeholders: this allocator hashes nothing.
        self.append_slots(seq, &vec![0; n], copies)?;
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.draft_slots = n;
        }
        Ok(())
    }

    fn accept_draft_tokens(&mut self, seq: SeqId, accepted: &[TokenId]) -> Result<(), AllocError> {
        let b = self.config.block_size;
        let s = self.seqs.get_mut(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        crate::check_accepted(seq, accepted.len(), s.draft_slots)?;
        // The run stays reserved; only the table shrinks to the kept tokens.
        s.num_tokens -= s.draft_slots - accepted.len();
        s.draft_slots = 0;
        s.table.truncate(s.num_tokens.div_ceil(b));
        Ok(())
    }

    fn num_draft_slots(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.draft_slots)
    }

    fn fork(&mut self, _parent: SeqId, _child: SeqId) -> Result<(), AllocError> {
        Err(AllocError::ForkUnsupported)
    }

    fn free(&mut self, seq: SeqId) -> Result<(), AllocError> {
        let s = self.seqs.remove(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        if s.swapped {
            for &c in &s.cpu {
                self.cpu.release(c);
            }
        } else {
            self.give_run(s.start, s.reserved_blocks);
        }
        Ok(())
    }

    fn swap_out(&mut self, seq: SeqId, plan: &mut Vec<SwapOut>) -> Result<(), AllocError> {
        let s = self.seqs.get(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        crate::check_resident_and_known(seq, s.swapped, s.pending_token, s.draft_slots)?;
        let (first, len) = (s.start, s.reserved_blocks);
        let cpu = self.cpu.swap_out(&s.table, plan)?;
        self.give_run(first, len);
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.cpu = cpu;
            s.table.clear();
            s.swapped = true;
        }
        Ok(())
    }

    fn swap_in(
        &mut self,
        seq: SeqId,
        new_tokens: &[TokenId],
        plan: &mut Vec<SwapIn>,
    ) -> Result<(), AllocError> {
        let b = self.config.block_size;
        let s = self.seqs.get(&seq).ok_or(AllocError::UnknownSeq(seq))?;
        if !s.swapped {
            return Err(AllocError::NotSwapped(seq));
        }
        let total = s.num_tokens + new_tokens.len();
        let reserved_blocks = s.reserved_blocks;
        if total > reserved_blocks * b {
            return Err(AllocError::ReservationExceeded {
                seq,
                requested: total,
                reserved: reserved_blocks * b,
            });
        }
        let first = self.take_run(reserved_blocks)?;
        let Some(s) = self.seqs.get_mut(&seq) else { return Err(AllocError::UnknownSeq(seq)) };
        for (i, &c) in s.cpu.iter().enumerate() {
            plan.push((c, first + i as BlockId));
            self.cpu.release(c);
        }
        s.cpu.clear();
        s.swapped = false;
        s.start = first;
        s.num_tokens = total;
        s.table = Self::table_for(first, total.div_ceil(b));
        Ok(())
    }

    fn block_table(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.seqs.get(&seq).map(|s| s.table.as_slice())
    }

    fn num_tokens(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.num_tokens)
    }

    fn is_swapped(&self, seq: SeqId) -> bool {
        self.seqs.get(&seq).is_some_and(|s| s.swapped)
    }

    fn usage(&self) -> KvUsage {
        let token_slots = self.seqs.values().filter(|s| !s.swapped).map(|s| s.num_tokens).sum();
        let external_fragmentation = if self.num_free == 0 {
            0.0
        } else {
            1.0 - self.largest_free_run() as f64 / self.num_free as f64
        };
        KvUsage {
            block_size: self.config.block_size,
            num_gpu_blocks: self.config.num_gpu_blocks,
            used_blocks: self.config.num_gpu_blocks - self.num_free,
            cached_blocks: 0,
            token_slots,
            external_fragmentation,
            num_cpu_blocks: self.config.num_cpu_blocks,
            used_cpu_blocks: self.config.num_cpu_blocks - self.cpu.num_free(),
        }
    }

    fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }

    fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let b = self.config.block_size;
        let n = self.config.num_gpu_blocks;
        // Free runs and resident reservations must tile 0..n exactly.
        let mut owner = vec![0u8; n];
        let mut free_total = 0;
        let mut prev_end: Option<usize> = None;
        for (&start, &len) in &self.free_runs {
            let (s, e) = (start as usize, start as usize + len);
            if len == 0 || e > n {
                return Err(format!("free run {s}+{len} is empty or out of range").into());
            }
            if prev_end.is_some_and(|p| p >= s) {
                return Err(format!("free run at {s} overlaps or touches the previous one").into());
            }
            prev_end = Some(e);
            owner[s..e].iter_mut().for_each(|o| *o += 1);
            free_total += len;
        }
        if free_total != self.num_free {
            return Err(format!("free runs hold {free_total} blocks, counter says {}", self.num_free).into());
        }
        let mut cpu_holders = vec![0u32; self.cpu.num_blocks()];
        for (id, s) in &self.seqs {
            if s.num_tokens > s.reserved_blocks * b {
                return Err(format!("{id}: {} tokens exceed its reservation", s.num_tokens).into());
            }
            if s.swapped {
                if !s.table.is_empty() || s.cpu.len() != s.num_tokens.div_ceil(b) {
                    return Err(format!("{id}: swapped with a table or the wrong CPU block count").into());
                }
                CpuBlockPool::count_holders(*id, &s.cpu, &mut cpu_holders)?;
                continue;
            }
            let (st, e) = (s.start as usize, s.start as usize + s.reserved_blocks);
            if e > n || !s.cpu.is_empty() {
                return Err(format!("{id}: reservation out of range or CPU blocks while resident").into());
            }
            owner[st..e].iter_mut().for_each(|o| *o += 1);
            if s.table != Self::table_for(s.start, s.num_tokens.div_ceil(b)) {
                return Err(format!("{id}: table is not the prefix of its run").into());
            }
        }
        if let Some(b) = owner.iter().position(|&o| o != 1) {
            return Err(format!("block {b} is owned {} times (free runs + reservations)", owner[b]).into());
        }
        self.cpu.check(&cpu_holders)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(blocks: usize, reservation: Reservation) -> ContiguousAllocator {
        ContiguousAllocator::new(ContiguousConfig {
            num_gpu_blocks: blocks,
            num_cpu_blocks: 16,
            block_size: 4,
            reservation,
        })
        .unwrap()
    }

    fn start(kv: &mut ContiguousAllocator, seq: u64, n: usize, max_total: usize) -> Result<(), AllocError> {
        let tokens = vec![1; n];
        kv.start_seq(
            SeqId(seq),
            SeqStart {
                tokens: &tokens,
                prefix: PrefixHit::miss(n),
                extra_key: None,
                max_total_tokens: max_total,
            },
        )
    }

    #[test]
    fn reserves_the_whole_max_length_up_front() {
        let mut kv = alloc(8, Reservation::Fixed(16));
        start(&mut kv, 1, 3, 10).unwrap();
        let u = kv.usage();
        assert_eq!((u.used_blocks, u.token_slots, u.waste_slots()), (4, 3, 13));
        assert_eq!(kv.block_table(SeqId(1)).unwrap(), &[0]);
        kv.append_slots(SeqId(1), &[1; 13], &mut vec![]).unwrap();
        assert_eq!(kv.block_table(SeqId(1)).unwrap(), &[0, 1, 2, 3]);
        assert!(matches!(
            kv.append_slots(SeqId(1), &[1], &mut vec![]),
            Err(AllocError::ReservationExceeded { .. })
        ));
        assert!(!kv.can_ever_fit(17));
        assert!(kv.can_ever_fit(16));
        kv.check_invariants().unwrap();
    }

    #[test]
    fn reservation_policies() {
        let kv = alloc(64, Reservation::NextPowerOfTwo);
        assert_eq!(kv.reservation_tokens(100), Some(128));
        assert_eq!(kv.reservation_tokens(128), Some(128));
        let kv = alloc(64, Reservation::Exact);
        assert_eq!(kv.reservation_tokens(100), Some(100));
        let kv = alloc(64, Reservation::Fixed(64));
        assert_eq!(kv.reservation_tokens(100), None);
        assert!(ContiguousAllocator::new(ContiguousConfig {
            num_gpu_blocks: 1,
            num_cpu_blocks: 0,
            block_size: 4,
            reservation: Reservation::Fixed(0)
        })
        .is_err());
    }

    #[test]
    fn external_fragmentation_blocks_a_run_that_would_fit_in_total() {
        let mut kv = alloc(6, Reservation::Exact);
        for s in 0..3 {
            start(&mut kv, s, 1, 8).unwrap(); // 2 blocks each
        }
        kv.free(SeqId(0)).unwrap();
        kv.free(SeqId(2)).unwrap();
        // Free: [0, 2) and [4, 6): 4 blocks, largest run 2.
        assert_eq!(kv.usage().free_blocks(), 4);
        assert!((kv.usage().external_fragmentation - 0.5).abs() < 1e-12);
        assert_eq!(start(&mut kv, 9, 1, 12), Err(AllocError::NoContiguousRun { needed: 3, largest: 2 }));
        kv.free(SeqId(1)).unwrap();
        assert_eq!(kv.usage().external_fragmentation, 0.0, "runs coalesce");
        start(&mut kv, 9, 1, 24).unwrap();
        kv.check_invariants().unwrap();
    }

    #[test]
    fn swap_round_trip_and_fork_refused() {
        let mut kv = alloc(8, Reservation::Fixed(16));
        start(&mut kv, 1, 6, 16).unwrap();
        assert_eq!(kv.fork(SeqId(1), SeqId(2)), Err(AllocError::ForkUnsupported));
        let mut out = vec![];
        kv.swap_out(SeqId(1), &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(kv.usage().used_blocks, 0);
        start(&mut kv, 2, 1, 16).unwrap(); // takes blocks 0..4
        let mut inp = vec![];
        kv.swap_in(SeqId(1), &[1, 1, 1], &mut inp).unwrap();
        assert_eq!(inp.iter().map(|p| p.1).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(kv.block_table(SeqId(1)).unwrap(), &[4, 5, 6]);
        kv.check_invariants().unwrap();
        kv.free(SeqId(1)).unwrap();
        kv.free(SeqId(2)).unwrap();
        assert_eq!(kv.usage().free_blocks(), 8);
        kv.check_invariants().unwrap();
    }
}
