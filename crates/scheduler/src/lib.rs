//! Pagoda's scheduler: iteration-level continuous batching over a paged KV
//! cache, in the manner of vLLM's v1 core. It decides, step by step, which
//! sequences run and which tokens of each are computed; it never touches
//! tensors. What it hands the model runner is a [`SchedulerOutput`]: for each
//! sequence, the tokens to compute, their positions, what changed in its block
//! table since the runner last saw it ([`BlockTableUpdate`]), the slot mapping,
//! and who samples; plus the block copies and swaps to do first, and the
//! sequences that ended (so the runner can drop its state for them).
//!
//! ```
//! use pagoda_scheduler::paged_kv::{PagedAllocator, PagedConfig};
//! use pagoda_scheduler::{NewRequest, RequestId, Scheduler, SchedulerConfig};
//!
//! let kv = PagedAllocator::new(PagedConfig {
//!     num_gpu_blocks: 64,
//!     num_cpu_blocks: 0,
//!     block_size: 16,
//!     enable_prefix_caching: true,
//! })?;
//! let mut sched = Scheduler::new(SchedulerConfig::default(), kv)?;
//! sched.add_request(NewRequest::new(RequestId(1), vec![1, 2, 3, 4], 2))?;
//! let mut generated = Vec::new();
//! while sched.has_unfinished() {
//!     let step = sched.schedule()?;
//!     // A runner executes step.blocks_to_swap_out, blocks_to_swap_in,
//!     // blocks_to_copy, then the forward pass, and samples:
//!     let sampled: Vec<_> = step.sampling_seqs().map(|seq| (seq, 42)).collect();
//!     for update in sched.update_from_output(&step, &sampled)? {
//!         generated.push((update.new_token, update.finish_reason));
//!     }
//! }
//! assert_eq!(generated.len(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # How a step is chosen
//! Requests are ranked by a pluggable [`SchedulingPolicy`] ([`Fcfs`] or
//! [`Priority`]: lower priority value, then arrival). Each step, under
//! `max_num_batched_tokens` and `max_num_seqs`:
//! 1. running decodes (one token each) in rank order; a decode that needs a
//!    block when none is free preempts the worst-ranked running sequence not
//!    yet scheduled this step (possibly itself): *recompute* frees its blocks
//!    and queues it again with prompt + generated tokens as its new prompt;
//!    *swap* copies its blocks to the CPU pool;
//! 2. running sequences in the middle of a chunked prefill get what is left
//!    of the budget; with concurrent partial prefills (vLLM's
//!    `max_num_partial_prefills`, 4 by default here) competing prompts share
//!    it, and long ones (vLLM's `long_prefill_token_threshold`) are capped,
//!    so a short prompt never waits for long ones to finish their prefill;
//! 3. if nothing was preempted, swapped and waiting sequences in rank order:
//!    a swapped one is swapped back in, a waiting one reuses its longest
//!    cached prefix (always recomputing at least its last token) and prefills
//!    the rest, chunked to the remaining budget. The first that does not fit
//!    ends the step, so nothing overtakes a better-ranked request (except
//!    that a long prompt beyond `max_long_partial_prefills` lets shorter ones
//!    pass); since a preempted request keeps its rank, it resumes before
//!    newer ones. Among waiting sequences of one policy class, those of a
//!    fairness group ([`NewRequest::fairness_group`]) holding fewer running
//!    sequences go first, FCFS within a group: one request's fan-out cannot
//!    starve another's.
//!
//! Entries are ordered decodes first (one new token), then prefills.
//!
//! # Parallel sampling (`n > 1`)
//! The prompt is prefilled once. The entry that completes it lists every
//! sample's id in `sample_for`; [`Scheduler::update_from_output`] then forks
//! the sequence so that all samples share its blocks, copy-on-write: the
//! first write into the shared partial last block gives the writer a private
//! copy (reported in the next step's `blocks_to_copy`). From then on each
//! sample is an independent sequence; the request ends when all have.
//!
//! # Asynchronous scheduling
//! With [`SchedulerConfig::async_scheduling`], `schedule` may run while one
//! step is still unapplied, so that an engine prepares step N+1 while the
//! device runs step N. A step's tokens count as computed when it is scheduled
//! and its samples as *awaited* until `update_from_output`; a decode whose
//! input is an awaited token is scheduled with a placeholder id
//! ([`ScheduledSeq::token_from_previous_step`]: the runner feeds the real id
//! on the device) and a slot from [`KvAllocator::append_pending_slot`], told
//! its id at the update. Steps are applied in order; a sequence stopped by
//! the older step's token has its output from the newer one dropped; a
//! sequence whose awaited token ends it by length is not scheduled again. A
//! step that forks (`n > 1`) must be applied before the next is scheduled
//! ([`Scheduler::can_schedule`]), and [`Scheduler::discard_unapplied`] puts
//! the sequences of steps whose results will never come back in the queue.
//!
//! # Prefix caching
//! With a caching allocator, every full block (of prompt or generated tokens)
//! is registered under a hash chained over its prefix and the request's
//! `cache_salt` as soon as its slots are scheduled, and freed blocks stay
//! findable until evicted (LRU). A cached block filled in a step may be
//! reused by a sequence admitted in the same step: the runner's forward pass
//! writes all of a layer's new KV before that layer's attention reads it.
//!
//! # Simulator
//! [`sim`] replays request traces through the scheduler over the paged and
//! the contiguous (max-length reservation) allocators and compares their
//! memory waste, concurrency and throughput:
//! `cargo run --release -p pagoda-scheduler --example sim -- --help`.
mod config;
mod error;
mod output;
mod policy;
mod request;
mod scheduler;
pub mod sim;

pub use config::{PreemptionMode, SchedulerConfig};
pub use error::{AddRequestError, ConfigError, SchedulerError, UpdateError};
pub use output::{BlockTableUpdate, ScheduledSeq, SchedulerOutput};
pub use pagoda_paged_kv::{self as paged_kv, KvAllocator, SeqId, TokenId};
pub use policy::{Fcfs, Policy, Priority, RankKey, RequestView, SchedulingPolicy};
pub use request::{FinishReason, NewRequest, RequestId, SeqStatus, SeqUpdate, Sequence};
pub use scheduler::{Scheduler, SchedulerStats, LORA_FAIRNESS_STEPS};
