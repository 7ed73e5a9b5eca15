//! KV-cache memory management for Pagoda: which physical cache blocks hold
//! which sequence's keys and values.
//!
//! The KV cache is carved into blocks of `block_size` token slots. A sequence
//! owns a *block table* (logical block `i` -> physical [`BlockId`]); token at
//! position `p` lives in slot `table[p / B] * B + p % B`. This crate decides
//! the tables; it never touches tensors. What it gives a runner are plans:
//! block tables, slot mappings, and lists of block copies (copy-on-write, swap
//! out to a CPU pool, swap in).
//!
//! Two allocators implement the [`KvAllocator`] trait, so that a scheduler (or
//! a researcher's simulator) can swap the policy:
//! - [`PagedAllocator`]: PagedAttention-style paging. Blocks are handed out one
//!   at a time as a sequence grows, shared copy-on-write between forked
//!   sequences, and full blocks are cached by a chained [`BlockHash`] so that a
//!   new request reuses the longest cached prefix (automatic prefix caching).
//!   Freed cached blocks stay reusable until evicted in LRU order.
//! - [`ContiguousAllocator`]: the baseline of engines without paging
//!   (Hugging Face / FasterTransformer / Orca style): each sequence reserves one
//!   contiguous run of blocks for its maximum length when it starts.
//!
//! [`KvUsage`] reports blocks used/free/cached, internal waste (reserved slots
//! holding no token) and external fragmentation, for both.
//!
//! ```
//! use pagoda_paged_kv::{KvAllocator, PagedAllocator, PagedConfig, SeqId, SeqStart};
//!
//! let mut kv = PagedAllocator::new(PagedConfig {
//!     num_gpu_blocks: 8,
//!     num_cpu_blocks: 4,
//!     block_size: 4,
//!     enable_prefix_caching: true,
//! })?;
//! let prompt = [1, 2, 3, 4, 5, 6];
//! let hit = kv.lookup_prefix(&prompt, None); // nothing cached yet
//! let start = SeqStart { tokens: &prompt, prefix: hit, extra_key: None, max_total_tokens: 16 };
//! kv.start_seq(SeqId(0), start)?;
//! assert_eq!(kv.block_table(SeqId(0)).unwrap().len(), 2);
//!
//! let mut copies = Vec::new();
//! kv.append_slots(SeqId(0), &[7], &mut copies)?; // one decode step
//! kv.fork(SeqId(0), SeqId(1))?; // SeqId(1) shares every block
//! kv.append_slots(SeqId(1), &[8], &mut copies)?; // writes the shared last block:
//! assert_eq!(copies.len(), 1); // ... so it gets a private copy first
//!
//! kv.free(SeqId(0))?;
//! kv.free(SeqId(1))?;
//! // The full first block [1, 2, 3, 4] stays cached after its holders left.
//! assert_eq!(kv.lookup_prefix(&[1, 2, 3, 4, 9], None).num_cached_tokens, 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Ordering contract for runners
//! The plans of one scheduling step are executed as: swap-outs, then swap-ins,
//! then block copies, then the forward pass (which writes the new tokens' KV
//! through the slot mapping, all tokens of a layer before that layer's
//! attention). An allocator may therefore hand out, within one step, a block
//! that a swap-out of that step reads from, and a newly cached full block may
//! be hit by another sequence scheduled in the same step.

mod block_map;
mod block_pool;
mod contiguous;
mod error;
mod free_queue;
mod hash;
mod paged;

pub use block_map::{
    count_runs, decode_id_runs, decode_runs, encode_id_runs, encode_runs, BlockCounts, BlockMap, BlockState,
    SeqBlockMap,
};
pub use contiguous::{ContiguousAllocator, ContiguousConfig, Reservation};
pub use error::{AllocError, InvariantViolation, KvConfigError};
pub use hash::BlockHash;
pub use paged::{PagedAllocator, PagedConfig, SwapStats};

use std::fmt;

/// A physical block of the GPU KV cache.
pub type BlockId = u32;
/// A physical block of the CPU swap pool.
pub type CpuBlockId = u32;
/// A token id in the model's vocabulary.
pub type TokenId = u32;
/// `(src, dst)`: copy GPU block `src` over GPU block `dst`.
pub type BlockCopy = (BlockId, BlockId);
/// `(gpu, cpu)`: copy GPU block `gpu` to CPU block `cpu`.
pub type SwapOut = (BlockId, CpuBlockId);
/// `(cpu, gpu)`: copy CPU block `cpu` to GPU block `gpu`.
pub type SwapIn = (CpuBlockId, BlockId);

/// Largest block size an allocator accepts.
pub const MAX_BLOCK_SIZE: usize = 1024;

/// One sequence of tokens whose KV the cache holds (a request has one, or
/// several when it samples in parallel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {}", self.0)
    }
}

/// The cache slot of position `pos` through `table`: `table[pos / B] * B + pos % B`.
/// `None` when the table does not reach `pos`.
#[inline]
pub fn slot_of(table: &[BlockId], block_size: usize, pos: usize) -> Option<i64> {
    let block = *table.get(pos / block_size)?;
    Some(block as i64 * block_size as i64 + (pos % block_size) as i64)
}

/// The longest cached prefix of a token sequence, as found by
/// [`KvAllocator::lookup_prefix`]; hand it to [`KvAllocator::start_seq`] in the
/// same scheduling step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixHit {
    /// The cached blocks, in order (block `i` holds tokens `i*B..(i+1)*B`).
    pub blocks: Vec<BlockId>,
    /// Their hashes (the chain continues from the last one).
    pub hashes: Vec<BlockHash>,
    /// `blocks.len() * block_size`: tokens whose KV need not be computed.
    pub num_cached_tokens: usize,
    /// How many tokens the lookup was for (for hit-rate statistics).
    pub num_queried_tokens: usize,
}

impl PrefixHit {
    /// No cached prefix, for a lookup of `num_queried_tokens` tokens.
    pub fn miss(num_queried_tokens: usize) -> Self {
        Self { num_queried_tokens, ..Self::default() }
    }
}

/// What [`KvAllocator::start_seq`] needs to give a new sequence its blocks.
#[derive(Clone, Debug)]
pub struct SeqStart<'a> {
    /// The tokens to hold now: the cached prefix first, then the tokens whose
    /// KV is computed in this step. Their ids must be final (they are hashed).
    pub tokens: &'a [TokenId],
    /// From [`KvAllocator::lookup_prefix`] over (a superset of) `tokens`, or
    /// [`PrefixHit::miss`].
    pub prefix: PrefixHit,
    /// Salt folded into every block hash (LoRA adapter, cache isolation).
    pub extra_key: Option<u64>,
    /// The most tokens this sequence can ever hold (prompt + max new tokens,
    /// capped by the model's length). Reservation allocators reserve it.
    pub max_total_tokens: usize,
}

/// Prefix-cache counters, cumulative since the allocator was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Sequences started.
    pub num_queries: u64,
    /// Tokens those sequences looked up.
    pub queried_tokens: u64,
    /// Tokens found cached (no KV computation needed).
    pub hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub num_evictions: u64,
}

impl PrefixCacheStats {
    /// `hit_tokens / queried_tokens` (0 when nothing was queried).
    pub fn hit_rate(&self) -> f64 {
        if self.queried_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.queried_tokens as f64
        }
    }
}

/// A snapshot of KV memory use.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KvUsage {
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    /// Blocks held (or reserved) by at least one sequence.
    pub used_blocks: usize,
    /// Blocks with a registered prefix-cache hash, used or evictable.
    pub cached_blocks: usize,
    /// Slots of used blocks that hold a token's KV (shared blocks count once).
    pub token_slots: usize,
    /// Fraction of free memory that a request needing one contiguous run
    /// could not use: `1 - largest free run / free blocks` (always 0 for
    /// paging, where any free block serves any request).
    pub external_fragmentation: f64,
    pub num_cpu_blocks: usize,
    pub used_cpu_blocks: usize,
}

impl KvUsage {
    pub fn free_blocks(&self) -> usize {
        self.num_gpu_blocks - self.used_blocks
    }

    /// Slots in used blocks.
    pub fn reserved_slots(&self) -> usize {
        self.used_blocks * self.block_size
    }

    /// Reserved slots that hold no token: internal fragmentation plus slots
    /// reserved for tokens not yet generated.
    pub fn waste_slots(&self) -> usize {
        self.reserved_slots() - self.token_slots
    }

    /// `waste_slots / reserved_slots` (0 when nothing is reserved).
    pub fn internal_waste(&self) -> f64 {
        let reserved = self.reserved_slots();
        if reserved == 0 {
            0.0
        } else {
            self.waste_slots() as f64 / reserved as f64
        }
    }

    /// Fraction of the whole pool's slots holding a token's KV.
    pub fn utilization(&self) -> f64 {
        let total = self.num_gpu_blocks * self.block_size;
        if total == 0 {
            0.0
        } else {
            self.token_slots as f64 / total as f64
        }
    }
}

/// A KV-cache allocation policy: gives sequences block tables and tells the
/// runner which blocks to copy or swap.
///
/// Every method that can fail checks first and changes nothing on failure, so
/// a scheduler may try an allocation, and on [`AllocError::is_out_of_memory`]
/// preempt another sequence and try again.
///
/// Tokens are told to the allocator as their slots are allocated (their ids
/// are known by then: prompt tokens, or the token sampled last step), which
/// lets a caching allocator hash each block the moment it is full. Under
/// asynchronous scheduling a decode's slot is allocated while the step that
/// samples its token still runs: [`KvAllocator::append_pending_slot`], then
/// [`KvAllocator::set_pending_token`] once the id is back.
pub trait KvAllocator {
    /// A short name for reports ("paged", "max-len"...).
    fn name(&self) -> &str;

    fn block_size(&self) -> usize;

    fn num_gpu_blocks(&self) -> usize;

    fn num_cpu_blocks(&self) -> usize;

    /// Whether one sequence of `num_tokens` tokens (its `max_total_tokens`)
    /// fits in the whole pool: if not, it could never run to the end.
    fn can_ever_fit(&self, num_tokens: usize) -> bool;

    /// The longest cached prefix of `tokens` in whole blocks, leaving at least
    /// the last token uncached (its logits must be computed). Changes nothing.
    fn lookup_prefix(&self, tokens: &[TokenId], extra_key: Option<u64>) -> PrefixHit;

    /// Gives a new sequence blocks for `start.tokens`, taking the cached prefix
    /// blocks of `start.prefix` and fresh ones for the rest.
    fn start_seq(&mut self, seq: SeqId, start: SeqStart<'_>) -> Result<(), AllocError>;

    /// Allocates slots for `new_tokens` after the sequence's current tokens.
    /// If the last block is partly filled and shared, the sequence first gets
    /// a private copy of it: `(old, new)` is pushed onto `copies`, and the
    /// table's last entry changes (no other entry ever does).
    fn append_slots(
        &mut self,
        seq: SeqId,
        new_tokens: &[TokenId],
        copies: &mut Vec<BlockCopy>,
    ) -> Result<(), AllocError>;

    /// Allocates the slot of one more token whose id is not known yet: a step
    /// still running samples it (asynchronous scheduling). Copy-on-write works
    /// as in [`Self::append_slots`]. Until [`Self::set_pending_token`] tells the
    /// id, the sequence cannot grow, fork or swap, and the block holding the
    /// slot is not hashed (a caching allocator registers it once it is known).
    fn append_pending_slot(&mut self, seq: SeqId, copies: &mut Vec<BlockCopy>) -> Result<(), AllocError>;

    /// Tells the id of the token whose slot [`Self::append_pending_slot`] made.
    fn set_pending_token(&mut self, seq: SeqId, token: TokenId) -> Result<(), AllocError>;

    /// Allocates `n` slots for speculative (draft) tokens after the
    /// sequence's current tokens: a verification step computes their KV, and
    /// only the ones the target model accepts are kept
    /// ([`Self::accept_draft_tokens`]). Copy-on-write works as in
    /// [`Self::append_slots`]. Draft slots are never hashed for the prefix
    /// cache, and until they are resolved the sequence cannot grow, fork or
    /// swap. `n == 0` does nothing.
    fn append_draft_slots(
        &mut self,
        seq: SeqId,
        n: usize,
        copies: &mut Vec<BlockCopy>,
    ) -> Result<(), AllocError>;

    /// Resolves the draft slots of [`Self::append_draft_slots`]: the first
    /// `accepted.len()` of them hold these tokens (a caching allocator hashes
    /// the blocks they complete), the rest are released (blocks left empty
    /// go back to the pool), so the sequence holds exactly its verified tokens.
    fn accept_draft_tokens(&mut self, seq: SeqId, accepted: &[TokenId]) -> Result<(), AllocError>;

    /// Draft slots the sequence holds, not yet resolved (0 for an unknown one).
    fn num_draft_slots(&self, seq: SeqId) -> usize;

    /// Makes `child` a sequence sharing all of `parent`'s blocks (copy on write).
    fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), AllocError>;

    /// Releases every block of the sequence (GPU or CPU) and forgets it.
    fn free(&mut self, seq: SeqId) -> Result<(), AllocError>;

    /// Moves a resident sequence's blocks to the CPU pool, pushing one
    /// `(gpu, cpu)` copy per block onto `plan`; its GPU blocks are released.
    fn swap_out(&mut self, seq: SeqId, plan: &mut Vec<SwapOut>) -> Result<(), AllocError>;

    /// Brings a swapped sequence back (pushing `(cpu, gpu)` copies onto
    /// `plan`) and allocates slots for `new_tokens` after it, atomically.
    fn swap_in(
        &mut self,
        seq: SeqId,
        new_tokens: &[TokenId],
        plan: &mut Vec<SwapIn>,
    ) -> Result<(), AllocError>;

    /// The GPU block table (empty while swapped out); `None` for an unknown sequence.
    fn block_table(&self, seq: SeqId) -> Option<&[BlockId]>;

    /// Tokens the sequence holds slots for; `None` for an unknown sequence.
    fn num_tokens(&self, seq: SeqId) -> Option<usize>;

    /// Whether the sequence is known and swapped out.
    fn is_swapped(&self, seq: SeqId) -> bool;

    fn usage(&self) -> KvUsage;

    fn prefix_cache_stats(&self) -> PrefixCacheStats;

    /// Evicts every unreferenced cached block; returns how many.
    fn reset_prefix_cache(&mut self) -> usize {
        0
    }

    /// Verifies every internal invariant (O(pool size); for tests).
    fn check_invariants(&self) -> Result<(), InvariantViolation>;
}

/// A boxed allocator is an allocator, so a policy can be chosen at run time
/// (`Box<dyn KvAllocator>`).
impl<T: KvAllocator + ?Sized> KvAllocator for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn block_size(&self) -> usize {
        (**self).block_size()
    }
    fn num_gpu_blocks(&self) -> usize {
        (**self).num_gpu_blocks()
    }
    fn num_cpu_blocks(&self) -> usize {
        (**self).num_cpu_blocks()
    }
    fn can_ever_fit(&self, num_tokens: usize) -> bool {
        (**self).can_ever_fit(num_tokens)
    }
    fn lookup_prefix(&self, tokens: &[TokenId], extra_key: Option<u64>) -> PrefixHit {
        (**self).lookup_prefix(tokens, extra_key)
    }
    fn start_seq(&mut self, seq: SeqId, start: SeqStart<'_>) -> Result<(), AllocError> {
        (**self).start_seq(seq, start)
    }
    fn append_slots(
        &mut self,
        seq: SeqId,
        new_tokens: &[TokenId],
        copies: &mut Vec<BlockCopy>,
    ) -> Result<(), AllocError> {
        (**self).append_slots(seq, new_tokens, copies)
    }
    fn append_pending_slot(&mut self, seq: SeqId, copies: &mut Vec<BlockCopy>) -> Result<(), AllocError> {
        (**self).append_pending_slot(seq, copies)
    }
    fn set_pending_token(&mut self, seq: SeqId, token: TokenId) -> Result<(), AllocError> {
        (**self).set_pending_token(seq, token)
    }
    fn append_draft_slots(
        &mut self,
        seq: SeqId,
        n: usize,
        copies: &mut Vec<BlockCopy>,
    ) -> Result<(), AllocError> {
        (**self).append_draft_slots(seq, n, copies)
    }
    fn accept_draft_tokens(&mut self, seq: SeqId, accepted: &[TokenId]) -> Result<(), AllocError> {
        (**self).accept_draft_tokens(seq, accepted)
    }
    fn num_draft_slots(&self, seq: SeqId) -> usize {
        (**self).num_draft_slots(seq)
    }
    fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), AllocError> {
        (**self).fork(parent, child)
    }
    fn free(&mut self, seq: SeqId) -> Result<(), AllocError> {
        (**self).free(seq)
    }
    fn swap_out(&mut self, seq: SeqId, plan: &mut Vec<SwapOut>) -> Result<(), AllocError> {
        (**self).swap_out(seq, plan)
    }
    fn swap_in(
        &mut self,
        seq: SeqId,
        new_tokens: &[TokenId],
        plan: &mut Vec<SwapIn>,
    ) -> Result<(), AllocError> {
        (**self).swap_in(seq, new_tokens, plan)
    }
    fn block_table(&self, seq: SeqId) -> Option<&[BlockId]> {
        (**self).block_table(seq)
    }
    fn num_tokens(&self, seq: SeqId) -> Option<usize> {
        (**self).num_tokens(seq)
    }
    fn is_swapped(&self, seq: SeqId) -> bool {
        (**self).is_swapped(seq)
    }
    fn usage(&self) -> KvUsage {
        (**self).usage()
    }
    fn prefix_cache_stats(&self) -> PrefixCacheStats {
        (**self).prefix_cache_stats()
    }
    fn reset_prefix_cache(&mut self) -> usize {
        (**self).reset_prefix_cache()
    }
    fn check_invariants(&self) -> Result<(), InvariantViolation> {
        (**self).check_invariants()
    }
}

/// Whether a sequence may get more slots (or fork, or swap out): not while
/// swapped out, nor while its newest slot waits for its token id, nor while
/// it holds unresolved draft slots.
pub(crate) fn check_resident_and_known(
    seq: SeqId,
    swapped: bool,
    pending_token: bool,
    draft_slots: usize,
) -> Result<(), AllocError> {
    if swapped {
        return Err(AllocError::Swapped(seq));
    }
    if pending_token {
        return Err(AllocError::PendingToken(seq));
    }
    if draft_slots > 0 {
        return Err(AllocError::DraftSlots(seq));
    }
    Ok(())
}

/// Whether `accepted` draft tokens can be kept of the `slots` a sequence holds.
pub(crate) fn check_accepted(seq: SeqId, accepted: usize, slots: usize) -> Result<(), AllocError> {
    if accepted > slots {
        return Err(AllocError::TooManyAccepted { seq, accepted, slots });
    }
    Ok(())
}

/// Checks the block size and pool sizes shared by both allocators.
pub(crate) fn check_sizes(
    block_size: usize,
    num_gpu_blocks: usize,
    num_cpu_blocks: usize,
) -> Result<(), KvConfigError> {
    if block_size == 0 || block_size > MAX_BLOCK_SIZE {
        return Err(KvConfigError::BlockSize { got: block_size, max: MAX_BLOCK_SIZE });
    }
    // u32::MAX is the free queue's null link.
    let max = (u32::MAX - 1) as usize;
    if num_gpu_blocks == 0 || num_gpu_blocks > max {
        return Err(KvConfigError::NumGpuBlocks { got: num_gpu_blocks, max });
    }
    if num_cpu_blocks > max {
        return Err(KvConfigError::NumCpuBlocks { got: num_cpu_blocks, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_of_follows_the_table() {
        let table = [7, 2];
        assert_eq!(slot_of(&table, 4, 0), Some(28));
        assert_eq!(slot_of(&table, 4, 3), Some(31));
        assert_eq!(slot_of(&table, 4, 4), Some(8));
        assert_eq!(slot_of(&table, 4, 8), None);
    }

    #[test]
    fn usage_ratios() {
        let u = KvUsage {
            block_size: 16,
            num_gpu_blocks: 10,
            used_blocks: 4,
            token_slots: 48,
            ..Default::default()
        };
        assert_eq!(u.free_blocks(), 6);
        assert_eq!(u.waste_slots(), 16);
        assert!((u.internal_waste() - 0.25).abs() < 1e-12);
        assert!((u.utilization() - 0.3).abs() < 1e-12);
        assert_eq!(KvUsage::default().internal_waste(), 0.0);
    }
}
