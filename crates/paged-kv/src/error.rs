use thiserror::Error;

use crate::SeqId;

/// Why an allocator refused an operation. Refusals leave the allocator exactly
/// as it was: every operation checks before it changes anything.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AllocError {
    /// Not enough free GPU blocks (free includes evictable cached blocks).
    #[error("out of GPU KV blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    /// Enough free blocks in total, but no contiguous run long enough
    /// (reservation allocators only: external fragmentation).
    #[error("no contiguous run of {needed} free GPU blocks (largest is {largest})")]
    NoContiguousRun { needed: usize, largest: usize },
    /// Not enough free CPU blocks to swap a sequence out.
    #[error("out of CPU swap blocks: {needed} needed, {free} free")]
    OutOfCpuBlocks { needed: usize, free: usize },
    /// A sequence grew past what was reserved for it.
    #[error("{seq}: {requested} tokens exceed its reservation of {reserved}")]
    ReservationExceeded { seq: SeqId, requested: usize, reserved: usize },
    #[error("{0} is not known to the allocator")]
    UnknownSeq(SeqId),
    #[error("{0} already has blocks")]
    SeqExists(SeqId),
    #[error("{0} is swapped out; swap it in first")]
    Swapped(SeqId),
    #[error("{0} is not swapped out")]
    NotSwapped(SeqId),
    /// The prefix hit no longer matches the pool: look it up again.
    #[error("stale prefix hit: cached block {block} was evicted since the lookup")]
    StalePrefixHit { block: u32 },
    #[error("invalid prefix hit: {cached} cached tokens but only {tokens} tokens given")]
    InvalidPrefixHit { cached: usize, tokens: usize },
    /// The sequence's newest slot still waits for its token id
    /// ([`crate::KvAllocator::set_pending_token`]).
    #[error("{0} has a slot whose token is not known yet")]
    PendingToken(SeqId),
    #[error("{0} has no slot waiting for its token")]
    NoPendingToken(SeqId),
    /// The sequence holds draft slots not yet resolved
    /// ([`crate::KvAllocator::accept_draft_tokens`]).
    #[error("{0} holds unverified draft slots")]
    DraftSlots(SeqId),
    #[error("{seq}: {accepted} draft tokens accepted but it holds {slots} draft slots")]
    TooManyAccepted { seq: SeqId, accepted: usize, slots: usize },
    /// This allocator cannot share blocks between sequences.
    #[error("this allocator does not support forking sequences")]
    ForkUnsupported,
}

impl AllocError {
    /// Whether the refusal is for lack of memory, i.e. whether freeing other
    /// sequences (preemption) could make the same request succeed.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, AllocError::OutOfBlocks { .. } | AllocError::NoContiguousRun { .. })
    }
}

/// A configuration an allocator cannot be built from.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum KvConfigError {
    #[error("block_size must be between 1 and {max}, got {got}")]
    BlockSize { got: usize, max: usize },
    #[error("num_gpu_blocks must be between 1 and {max}, got {got}")]
    NumGpuBlocks { got: usize, max: usize },
    #[error("num_cpu_blocks must be at most {max}, got {got}")]
    NumCpuBlocks { got: usize, max: usize },
    #[error("a fixed reservation must be at least one token")]
    EmptyReservation,
}

/// An internal inconsistency found by `check_invariants` (a bug, reported
/// rather than panicking so that property tests can print it).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("allocator invariant violated: {0}")]
pub struct InvariantViolation(pub String);

impl From<String> for InvariantViolation {
    fn from(s: String) -> Self {
        InvariantViolation(s)
    }
}
