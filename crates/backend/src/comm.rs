//! [`Communicator`]: the collectives a tensor-parallel forward pass needs
//! between the ranks (devices) that each hold a shard of one model.
//!
//! Megatron-style sharding splits the attention heads and the FFN columns
//! across ranks, so each rank's o and down products are partial sums of the
//! full ones; one all-reduce after each makes every rank's residual stream
//! whole again. Embedding, final norm and lm_head stay replicated (cheaper
//! than a vocabulary-parallel gather for the models this engine runs), so the
//! sum is the only collective a step needs.

use crate::{Backend, Result, Tensor};

/// One rank's handle on a group of `world_size()` ranks that run collectives
/// together.
///
/// Every rank of a group must call the same collectives, on tensors of the
/// same shape, in the same order: the `n`-th call of one rank meets the
/// `n`-th call of every other. A rank that cannot make its next call (its
/// step failed) must [`Communicator::abort`] the group, or the others would
/// wait for it or pair their calls with the wrong ones.
pub trait Communicator<B: Backend>: Send + Sync {
    /// This rank's index, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Ranks in the group (1: no parallelism).
    fn world_size(&self) -> usize;

    /// In place: every rank's `tensor` becomes the element-wise sum of all
    /// ranks' `tensor`s. All ranks get the same values, bit for bit. Like the
    /// other ops it may only be enqueued when it returns (a device backend);
    /// a host backend returns when the sum is written. Fails, on every rank,
    /// once the group is aborted.
    fn all_reduce_sum(&self, backend: &B, tensor: &Tensor<B>) -> Result<()>;

    /// Breaks the group: collectives waiting on any rank, and every later
    /// one, fail. There is no recovery; a new group is made instead.
    fn abort(&self);
}

/// The group of one: every collective is the identity, so an unsharded model
/// needs no special case.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleRank;

impl<B: Backend> Communicator<B> for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _backend: &B, _tensor: &Tensor<B>) -> Result<()> {
        Ok(()) // the sum over one rank is its own tensor
    }

    fn abort(&self) {}
}
