//! A picture of the KV cache: the state of every physical block, for the
//! server's live page map (`GET /v1/debug/kv`, `/dashboard`) and the
//! simulator's animation (`pagoda sim --html`).
//!
//! Each allocator fills a [`BlockMap`] with an inherent `block_map()` method
//! (not part of [`crate::KvAllocator`]: only viewers need it). A map is O(pool
//! size) to build, so callers take one a few times a second, never per step.
//! [`encode_runs`] and [`encode_id_runs`] make it compact for the wire: a
//! cache is mostly long runs of one state, and block tables mostly runs of
//! consecutive ids.

use crate::{BlockId, CpuBlockId, SeqId};

/// What a physical GPU block holds right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockState {
    /// Free and holding nothing reusable: handed out first.
    Free,
    /// Held by exactly one sequence.
    Owned,
    /// Held by several sequences (copy-on-write forks, or a prefix-cache hit
    /// on a block a running sequence holds): reference count > 1.
    Shared,
    /// Free, but still holding a full block of some prefix that a new request
    /// can reuse; evicted in LRU order ([`BlockMap::eviction_order`]).
    Cached,
    /// Reserved by a sequence for tokens it has not written yet (contiguous
    /// reservations only; a paged sequence holds only blocks it writes).
    Reserved,
}

impl BlockState {
    pub const ALL: [BlockState; 5] =
        [BlockState::Free, BlockState::Owned, BlockState::Shared, BlockState::Cached, BlockState::Reserved];

    /// The one-letter code of the wire encoding (`f`, `o`, `s`, `c`, `r`).
    pub fn code(self) -> char {
        match self {
            BlockState::Free => 'f',
            BlockState::Owned => 'o',
            BlockState::Shared => 's',
            BlockState::Cached => 'c',
            BlockState::Reserved => 'r',
        }
    }

    /// The state of a wire code, `None` for anything else.
    pub fn from_code(code: char) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }
}

/// One sequence's blocks, as the allocator holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqBlockMap {
    pub seq: SeqId,
    /// GPU block table: logical block `i` is physical block `gpu[i]` (empty
    /// while swapped out).
    pub gpu: Vec<BlockId>,
    /// CPU blocks holding the sequence while it is swapped out (else empty).
    pub cpu: Vec<CpuBlockId>,
    /// Tokens the sequence holds slots for.
    pub num_tokens: usize,
}

/// The state of every block of an allocator at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockMap {
    pub block_size: usize,
    /// One entry per GPU block, indexed by [`BlockId`].
    pub gpu: Vec<BlockState>,
    /// One entry per CPU swap block: whether a swapped-out sequence holds it.
    pub cpu_used: Vec<bool>,
    /// How many sequences hold each GPU block (0 for free and cached ones).
    pub ref_counts: Vec<u32>,
    /// The [`BlockState::Cached`] blocks, the next one to be evicted first
    /// (least recently used first).
    pub eviction_order: Vec<BlockId>,
    /// Every sequence the allocator knows, in ascending [`SeqId`] order.
    pub seqs: Vec<SeqBlockMap>,
}

/// How many blocks are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    pub free: usize,
    pub owned: usize,
    pub shared: usize,
    pub cached: usize,
    pub reserved: usize,
    /// CPU swap blocks in use.
    pub cpu_used: usize,
}

impl BlockCounts {
    /// Blocks held by some sequence (owned, shared or reserved): the
    /// allocator's `used_blocks`.
    pub fn used(&self) -> usize {
        self.owned + self.shared + self.reserved
    }

    fn add(&mut self, state: BlockState, n: usize) {
        match state {
            BlockState::Free => self.free += n,
            BlockState::Owned => self.owned += n,
            BlockState::Shared => self.shared += n,
            BlockState::Cached => self.cached += n,
            BlockState::Reserved => self.reserved += n,
        }
    }
}

impl BlockMap {
    pub fn counts(&self) -> BlockCounts {
        let mut counts = BlockCounts::default();
        for &state in &self.gpu {
            counts.add(state, 1);
        }
        counts.cpu_used = self.cpu_used.iter().filter(|&&used| used).count();
        counts
    }
}

/// `states` as `(state, run length)` pairs, in block order.
pub fn encode_runs(states: &[BlockState]) -> Vec<(BlockState, u32)> {
    let mut runs: Vec<(BlockState, u32)> = Vec::new();
    for &state in states {
        match runs.last_mut() {
            Some((last, len)) if *last == state => *len += 1,
            _ => runs.push((state, 1)),
        }
    }
    runs
}

/// The states [`encode_runs`] encoded.
pub fn decode_runs(runs: &[(BlockState, u32)]) -> Vec<BlockState> {
    runs.iter().flat_map(|&(state, len)| std::iter::repeat_n(state, len as usize)).collect()
}

/// Block counts by state, read from runs without expanding them.
pub fn count_runs(runs: &[(BlockState, u32)]) -> BlockCounts {
    let mut counts = BlockCounts::default();
    for &(state, len) in runs {
        counts.add(state, len as usize);
    }
    counts
}

/// `ids` as `(first id, run length)` pairs of consecutive ids, in order.
pub fn encode_id_runs(ids: &[u32]) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &id in ids {
        match runs.last_mut() {
            Some((first, len)) if first.checked_add(*len) == Some(id) => *len += 1,
            _ => runs.push((id, 1)),
        }
    }
    runs
}

/// The ids [`encode_id_runs`] encoded.
pub fn decode_id_runs(runs: &[(u32, u32)]) -> Vec<u32> {
    runs.iter().flat_map(|&(first, len)| (0..len).map(move |i| first.wrapping_add(i))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use BlockState::*;

    #[test]
    fn state_runs_round_trip_and_count() {
        let states = [Free, Free, Owned, Shared, Shared, Shared, Cached, Free];
        let runs = encode_runs(&states);
        assert_eq!(runs, vec![(Free, 2), (Owned, 1), (Shared, 3), (Cached, 1), (Free, 1)]);
        assert_eq!(decode_runs(&runs), states);
        let counts = count_runs(&runs);
        assert_eq!((counts.free, counts.owned, counts.shared, counts.cached), (3, 1, 3, 1));
        assert!(encode_runs(&[]).is_empty());
    }

    #[test]
    fn id_runs_join_consecutive_ids_only() {
        let ids = [4, 5, 6, 9, 8, 0, u32::MAX, 0];
        let runs = encode_id_runs(&ids);
        assert_eq!(runs, vec![(4, 3), (9, 1), (8, 1), (0, 1), (u32::MAX, 1), (0, 1)]);
        assert_eq!(decode_id_runs(&runs), ids);
    }

    #[test]
    fn codes_round_trip() {
        for state in BlockState::ALL {
            assert_eq!(BlockState::from_code(state.code()), Some(state));
        }
        assert_eq!(BlockState::from_code('x'), None);
    }
}
