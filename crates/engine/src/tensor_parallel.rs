//! Tensor parallelism in the engine: one scheduler and one block allocator
//! decide every step for a group of ranks, each holding a shard of the model
//! ([`LlamaModel::load_sharded`]) and a KV pool of its own KV heads for the
//! same block ids.
//!
//! Rank 0 is the engine's own [`ModelRunner`], on the engine's thread. Every
//! other rank is a [`ModelRunner`] of its own on a thread of its own (a rank's
//! device context belongs to the thread that made it: one thread per GPU
//! later, one per rank on the CPU now), driven through a [`RankGroup`]: rank
//! 0's runner forwards every call that changes its state (a request added, a
//! step prepared, launched, finished or dropped) to the other ranks, so all
//! of them hold the same persistent batch and run the same forward pass, whose
//! all-reduces need every rank. Block swaps and copy-on-write copies are part
//! of a launch, so every rank applies them to its own pool.
//!
//! Every rank samples: the residual stream is all-reduced and the lm_head
//! replicated, so all ranks have the same logits, bit for bit, and with the
//! same seeds draw the same tokens. Each rank then feeds its own samples into
//! its next step (asynchronous scheduling) and keeps its own token histories,
//! with nothing broadcast. Rank 0's tokens are the engine's; the others'
//! are checked against them every step.
//!
//! Failure: a step that fails on any rank breaks the group (the communicator
//! is aborted, so no rank waits in a collective for one that will not come),
//! and every later step fails too. There is no recovery short of a new engine.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use pagoda_backend::{Backend, Communicator, SampledToken, SamplingParams};
use pagoda_models::weights::WeightSource;
use pagoda_models::{LlamaModel, LoadOptions, LoraAdapter, ModelConfig};
use pagoda_scheduler::{RequestId, SchedulerOutput, SeqId, TokenId};
use rustc_hash::FxHashMap;

use crate::batch::SampleTarget;
use crate::config::EngineConfig;
use crate::constraint::TokenConstraintFactory;
use crate::error::EngineError;
use crate::runner::ModelRunner;

/// Starts one rank of a tensor-parallel group, on the thread that will run
/// it: makes the rank's backend and its handle on the group's communicator
/// (whose `rank()` must be the rank's place in the list given to
/// [`crate::load_engine_tensor_parallel`]).
pub type RankStart<B> =
    Box<dyn FnOnce() -> Result<(B, Arc<dyn Communicator<B>>), EngineError> + Send + 'static>;

/// What every rank loads its shard from, shared by the ranks' threads.
pub(crate) struct RankLoad {
    pub model: ModelConfig,
    pub weights: Arc<dyn WeightSource + Send + Sync>,
    pub options: LoadOptions,
    pub engine: EngineConfig,
}

/// A request as [`ModelRunner::add_request`] takes it.
pub(crate) struct RankRequest {
    pub request_id: RequestId,
    pub prompt: Vec<TokenId>,
    pub params: Arc<SamplingParams>,
    pub seed: u64,
    pub constraint: Option<Arc<dyn TokenConstraintFactory>>,
    pub lora: Option<(u32, Arc<LoraAdapter>)>,
}

/// What rank 0 asks the other ranks, in the order its own runner does it.
enum Command {
    /// Allocate the KV pool and the swap pool (after the block count is agreed).
    Build {
        num_gpu_blocks: usize,
        num_cpu_blocks: usize,
    },
    EnableDecodeGraphs {
        max_batch: usize,
        max_context: usize,
    },
    AddRequest(Box<RankRequest>),
    WantPromptLogprobs {
        request_id: RequestId,
        top_k: usize,
    },
    /// Apply a step's changes; `previous` is who samples each row of the step
    /// in flight.
    Prepare {
        out: Arc<SchedulerOutput>,
        previous: Vec<SampleTarget>,
    },
    /// Launch the prepared step; `feed` says whether rank 0 passed the step in
    /// flight's samples (the rank passes its own, from its latest launch).
    Launch {
        feed: bool,
    },
    /// Wait for the oldest launched step's samples and apply them.
    Finish,
    DiscardUnapplied,
}

/// A rank's answer to the commands that wait for one.
enum Reply {
    /// The shard is loaded; the rank's memory allows this many KV blocks.
    Loaded {
        num_gpu_blocks: usize,
    },
    Done,
    Launched {
        samples: bool,
    },
    Finished {
        tokens: Vec<TokenId>,
    },
}

type ReplyResult = Result<Reply, EngineError>;

/// One rank other than 0, seen from rank 0.
struct RankHandle {
    rank: usize,
    commands: Sender<Command>,
    replies: Receiver<ReplyResult>,
    thread: Option<JoinHandle<()>>,
}

impl RankHandle {
    fn send(&self, command: Command) -> Result<(), EngineError> {
        self.commands.send(command).map_err(|_| self.stopped())
    }

    fn recv(&self) -> Result<Reply, EngineError> {
        self.replies.recv().map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> EngineError {
        EngineError::Internal(format!("tensor-parallel rank {} has stopped (an earlier failure)", self.rank))
    }
}

/// Ranks `1..world` of a tensor-parallel group, driven by rank 0's runner.
pub(crate) struct RankGroup<B: Backend> {
    /// Rank 0's communicator: aborted when rank 0 fails where no collective
    /// would tell the others (before its forward pass, or after theirs).
    comm: Arc<dyn Communicator<B>>,
    ranks: Vec<RankHandle>,
    /// The fewest KV blocks any of these ranks' memory allows.
    num_gpu_blocks: usize,
    /// Why the group is broken, once it is.
    broken: Option<String>,
}

impl<B: Backend> RankGroup<B> {
    /// Starts ranks `1..=starts.len()` on threads of their own, each loading
    /// its shard from `load`; [`Self::wait_loaded`] waits for them. `comm` is
    /// rank 0's communicator.
    pub fn spawn(
        starts: Vec<RankStart<B>>,
        load: Arc<RankLoad>,
        comm: Arc<dyn Communicator<B>>,
    ) -> Result<Self, EngineError> {
        let world = starts.len() + 1;
        let mut ranks = Vec::with_capacity(starts.len());
        for (i, start) in starts.into_iter().enumerate() {
            let rank = i + 1;
            let (commands, command_rx) = channel();
            let (reply_tx, replies) = channel();
            let load = load.clone();
            let thread = std::thread::Builder::new()
                .name(format!("pagoda-tp-rank-{rank}"))
                .spawn(move || rank_main(rank, world, start, load, command_rx, reply_tx))
                .map_err(|e| EngineError::Config(format!("cannot start tensor-parallel rank {rank}: {e}")))?;
            ranks.push(RankHandle { rank, commands, replies, thread: Some(thread) });
        }
        Ok(Self { comm, ranks, num_gpu_blocks: usize::MAX, broken: None })
    }

    /// Waits until every rank has loaded its shard.
    pub fn wait_loaded(&mut self) -> Result<(), EngineError> {
        let mut fewest = usize::MAX;
        self.collect(|_, reply| match reply {
            Reply::Loaded { num_gpu_blocks } => {
                fewest = fewest.min(num_gpu_blocks);
                Ok(())
            }
            _ => Err("answered out of turn (expected: its shard loaded)"),
        })?;
        self.num_gpu_blocks = fewest;
        Ok(())
    }

    /// Ranks in the group, rank 0 included.
    pub fn world_size(&self) -> usize {
        self.ranks.len() + 1
    }

    /// The fewest KV blocks the memory of ranks `1..` allows (rank 0 sizes its own).
    pub fn num_gpu_blocks(&self) -> usize {
        self.num_gpu_blocks
    }

    /// Has every rank allocate its KV pool of `num_gpu_blocks` and its swap
    /// pool of `num_cpu_blocks`.
    pub fn build(&mut self, num_gpu_blocks: usize, num_cpu_blocks: usize) -> Result<(), EngineError> {
        self.broadcast(|| Command::Build { num_gpu_blocks, num_cpu_blocks })?;
        self.collect(|_, reply| {
            matches!(reply, Reply::Done)
                .then_some(())
                .ok_or("answered out of turn (expected: its KV pool allocated)")
        })
    }

    pub fn enable_decode_graphs(&mut self, max_batch: usize, max_context: usize) -> Result<(), EngineError> {
        self.broadcast(|| Command::EnableDecodeGraphs { max_batch, max_context })?;
        self.collect(|_, reply| {
            matches!(reply, Reply::Done)
                .then_some(())
                .ok_or("answered out of turn (expected: its decode steps padded)")
        })
    }

    pub fn add_request(&mut self, request: RankRequest) {
        // A rank that stopped reports it at the next launch.
        let _ = self.broadcast(|| {
            Command::AddRequest(Box::new(RankRequest {
                request_id: request.request_id,
                prompt: request.prompt.clone(),
                params: request.params.clone(),
                seed: request.seed,
                constraint: request.constraint.clone(),
                lora: request.lora.clone(),
            }))
        });
    }

    pub fn want_prompt_logprobs(&mut self, request_id: RequestId, top_k: usize) {
        let _ = self.broadcast(|| Command::WantPromptLogprobs { request_id, top_k });
    }

    /// Sends the step rank 0 is about to prepare.
    pub fn prepare(&mut self, out: &SchedulerOutput, previous: &[SampleTarget]) -> Result<(), EngineError> {
        let out = Arc::new(out.clone());
        self.broadcast(|| Command::Prepare { out: out.clone(), previous: previous.to_vec() })
    }

    /// Starts the prepared step on every rank; call before rank 0 launches
    /// its own (its all-reduces wait for theirs), then
    /// [`Self::collect_launch`].
    pub fn launch(&mut self, feed: bool) -> Result<(), EngineError> {
        self.broadcast(|| Command::Launch { feed })
    }

    /// Rank 0's launch, once every other rank's has ended: an error of any
    /// rank breaks the group.
    pub fn collect_launch<S>(
        &mut self,
        rank_0: Result<Option<S>, EngineError>,
    ) -> Result<Option<S>, EngineError> {
        let sampled = match rank_0 {
            Ok(sampled) => sampled,
            Err(e) => return Err(self.rank_0_failed(e)),
        };
        let samples = sampled.is_some();
        self.collect(|_, reply| match reply {
            Reply::Launched { samples: s } if s == samples => Ok(()),
            Reply::Launched { .. } => Err("sampled rows where rank 0 did not, or none where it did"),
            _ => Err("answered out of turn (expected: its step launched)"),
        })?;
        Ok(sampled)
    }

    /// Asks every rank for its oldest launched step's tokens; call before
    /// rank 0 waits for its own, then [`Self::collect_finish`].
    pub fn finish(&mut self) -> Result<(), EngineError> {
        self.broadcast(|| Command::Finish)
    }

    /// Rank 0's tokens, once every other rank sampled the same.
    pub fn collect_finish<T>(
        &mut self,
        rank_0: Result<(Vec<SampledToken>, T), EngineError>,
    ) -> Result<(Vec<SampledToken>, T), EngineError> {
        let finished = match rank_0 {
            Ok(finished) => finished,
            Err(e) => return Err(self.rank_0_failed(e)),
        };
        let tokens: Vec<TokenId> = finished.0.iter().map(|t| t.token).collect();
        self.collect(|_, reply| match reply {
            Reply::Finished { tokens: theirs } if theirs == tokens => Ok(()),
            Reply::Finished { .. } => Err("sampled other tokens than rank 0 (their logits differ)"),
            _ => Err("answered out of turn (expected: its step sampled)"),
        })?;
        Ok(finished)
    }

    pub fn discard_unapplied(&mut self) {
        let _ = self.broadcast(|| Command::DiscardUnapplied);
    }

    /// Breaks the group after rank 0 failed outside a launch or a finish.
    pub fn break_group(&mut self, why: &EngineError) {
        self.comm.abort();
        self.broken.get_or_insert_with(|| format!("rank 0 failed: {why}"));
    }

    /// Sends every rank the command `make` makes; fails at once if the group
    /// is broken.
    fn broadcast(&mut self, mut make: impl FnMut() -> Command) -> Result<(), EngineError> {
        if let Some(why) = &self.broken {
            return Err(broken(why));
        }
        for i in 0..self.ranks.len() {
            if let Err(e) = self.ranks[i].send(make()) {
                return Err(self.fail(e));
            }
        }
        Ok(())
    }

    /// One reply from every rank, each checked by `check` (which, for a reply
    /// that is not the one expected, says what the rank did).
    fn collect(
        &mut self,
        mut check: impl FnMut(usize, Reply) -> Result<(), &'static str>,
    ) -> Result<(), EngineError> {
        let mut failure = None;
        for rank in &self.ranks {
            // Every rank answers (no early return), so none is left a reply behind.
            let result = rank.recv().and_then(|reply| {
                check(rank.rank, reply).map_err(|what| {
                    EngineError::Internal(format!("tensor-parallel rank {} {what}", rank.rank))
                })
            });
            if let Err(e) = result {
                failure.get_or_insert(e);
            }
        }
        match failure {
            Some(e) => Err(self.fail(e)),
            None => Ok(()),
        }
    }

    /// Breaks the group after rank 0 failed in a step the others were sent,
    /// and returns rank 0's error with theirs for the step: when one of them
    /// failed first (and aborted the group under rank 0), theirs names the
    /// cause.
    fn rank_0_failed(&mut self, e: EngineError) -> EngineError {
        // The others may be waiting in a collective rank 0 will not join.
        self.comm.abort();
        self.broken.get_or_insert_with(|| format!("rank 0 failed: {e}"));
        let causes: Vec<String> = self
            .ranks
            .iter()
            .filter_map(|rank| match rank.replies.recv() {
                Ok(Err(e)) => Some(format!("rank {}: {e}", rank.rank)),
                // Done with the step, or stopped by an earlier failure.
                Ok(Ok(_)) | Err(_) => None,
            })
            .collect();
        if causes.is_empty() {
            return e;
        }
        EngineError::Internal(format!("{e} (other ranks: {})", causes.join("; ")))
    }

    /// Breaks the group for `e` (a rank failed or answered wrongly) and returns it.
    fn fail(&mut self, e: EngineError) -> EngineError {
        self.comm.abort();
        self.broken.get_or_insert_with(|| e.to_string());
        e
    }
}

impl<B: Backend> Drop for RankGroup<B> {
    fn drop(&mut self) {
        // A rank waiting in a collective is released, one waiting for a
        // command sees its channel close; then every thread ends.
        self.comm.abort();
        for rank in &mut self.ranks {
            let (dead, _) = channel();
            drop(std::mem::replace(&mut rank.commands, dead));
        }
        for rank in &mut self.ranks {
            if let Some(thread) = rank.thread.take() {
                if thread.join().is_err() {
                    tracing::error!(rank = rank.rank, "a tensor-parallel rank panicked");
                }
            }
        }
    }
}

fn broken(why: &str) -> EngineError {
    EngineError::Internal(format!("the tensor-parallel group is broken ({why}); a new engine is needed"))
}

/// A step a rank launched whose samples it has not applied yet.
struct InFlight<B: Backend> {
    out: Arc<SchedulerOutput>,
    samplers: Vec<SampleTarget>,
    sampled: B::Sampled,
}

/// The thread of rank `rank` of `world`: start, load the shard, report how
/// many KV blocks its memory allows, then serve rank 0's commands until the
/// channel closes. The first error aborts the group (so no rank waits for
/// this one in a collective), is sent to rank 0, and ends the thread.
fn rank_main<B: Backend>(
    rank: usize,
    world: usize,
    start: RankStart<B>,
    load: Arc<RankLoad>,
    commands: Receiver<Command>,
    replies: Sender<ReplyResult>,
) {
    let StartedRank { backend, comm, model } = match start_rank(rank, world, start, &load) {
        Ok(started) => started,
        Err(e) => {
            let _ = replies.send(Err(e));
            return;
        }
    };
    let blocks = load.engine.num_gpu_blocks(&backend, &load.model, backend.memory_info().ok());
    let block_size = load.engine.block_size;
    let kv_cache_dtype = load.engine.kv_cache_dtype_on(&backend);
    // The weights stay mapped only while a rank still loads from them.
    drop(load);
    let num_gpu_blocks = match blocks {
        Ok(n) => n,
        Err(e) => {
            let _ = replies.send(Err(e));
            return;
        }
    };
    if replies.send(Ok(Reply::Loaded { num_gpu_blocks })).is_err() {
        return;
    }
    let Ok(Command::Build { num_gpu_blocks, num_cpu_blocks }) = commands.recv() else { return };
    let runner =
        match ModelRunner::new(backend, model, num_gpu_blocks, num_cpu_blocks, block_size, kv_cache_dtype) {
            Ok(runner) => runner,
            Err(e) => {
                comm.abort();
                let _ = replies.send(Err(e));
                return;
            }
        };
    if replies.send(Ok(Reply::Done)).is_err() {
        return;
    }
    let mut worker = RankWorker { runner, staged: None, in_flight: VecDeque::new() };
    for command in commands {
        match worker.serve(command) {
            Ok(None) => {}
            Ok(Some(reply)) => {
                if replies.send(Ok(reply)).is_err() {
                    return;
                }
            }
            Err(e) => {
                comm.abort();
                let _ = replies.send(Err(e));
                return;
            }
        }
    }
}

/// A rank with its device, its handle on the group and its shard loaded.
struct StartedRank<B: Backend> {
    backend: B,
    comm: Arc<dyn Communicator<B>>,
    model: LlamaModel<B>,
}

/// Makes the rank's backend and communicator and loads its shard.
fn start_rank<B: Backend>(
    rank: usize,
    world: usize,
    start: RankStart<B>,
    load: &RankLoad,
) -> Result<StartedRank<B>, EngineError> {
    let (backend, comm) = start()?;
    check_comm(comm.as_ref(), rank, world)?;
    let model = LlamaModel::load_sharded(
        &backend,
        load.model.clone(),
        load.weights.as_ref(),
        &load.options,
        comm.clone(),
        &mut |_, _| {},
    )?;
    Ok(StartedRank { backend, comm, model })
}

/// Refuses a communicator that is not rank `rank` of a group of `world`.
pub(crate) fn check_comm<B: Backend>(
    comm: &dyn Communicator<B>,
    rank: usize,
    world: usize,
) -> Result<(), EngineError> {
    if comm.rank() != rank || comm.world_size() != world {
        return Err(EngineError::Config(format!(
            "tensor-parallel rank {rank} of {world} was given the communicator of rank {} of {}",
            comm.rank(),
            comm.world_size()
        )));
    }
    Ok(())
}

/// A rank's runner and the steps it has prepared and launched.
struct RankWorker<B: Backend> {
    runner: ModelRunner<B>,
    /// The prepared step and who samples its rows.
    staged: Option<(Arc<SchedulerOutput>, Vec<SampleTarget>)>,
    /// Launched steps that sampled, oldest first: rank 0 finishes them in
    /// launch order.
    in_flight: VecDeque<InFlight<B>>,
}

impl<B: Backend> RankWorker<B> {
    /// Does what rank 0's runner did; returns the reply, for the commands that take one.
    fn serve(&mut self, command: Command) -> Result<Option<Reply>, EngineError> {
        let runner = &mut self.runner;
        match command {
            Command::Build { .. } => Err(EngineError::Internal("a rank was built twice".into())),
            Command::EnableDecodeGraphs { max_batch, max_context } => {
                runner.enable_decode_graphs(max_batch, max_context)?;
                Ok(Some(Reply::Done))
            }
            Command::AddRequest(r) => {
                runner.add_request(r.request_id, &r.prompt, r.params, r.seed, r.constraint, r.lora);
                Ok(None)
            }
            Command::WantPromptLogprobs { request_id, top_k } => {
                runner.want_prompt_logprobs(request_id, top_k);
                Ok(None)
            }
            Command::Prepare { out, previous } => {
                let step = runner.prepare(&out, &previous)?;
                self.staged = Some((out, step.samplers));
                Ok(None)
            }
            Command::Launch { feed } => {
                let (out, samplers) = self
                    .staged
                    .take()
                    .ok_or_else(|| EngineError::Internal("a rank launched a step it was not sent".into()))?;
                let previous = match (feed, self.in_flight.back()) {
                    (false, _) => None,
                    (true, Some(step)) => Some(&step.sampled),
                    (true, None) => {
                        return Err(EngineError::Internal(
                            "a rank was told to feed samples it does not have".into(),
                        ))
                    }
                };
                let sampled = runner.launch(&out, previous)?;
                // Rank 0 hands the prompt logprobs out; this rank's copy is dropped.
                runner.take_prompt_logprobs();
                let samples = sampled.is_some();
                if let Some(sampled) = sampled {
                    self.in_flight.push_back(InFlight { out, samplers, sampled });
                }
                Ok(Some(Reply::Launched { samples }))
            }
            Command::Finish => {
                let step = self
                    .in_flight
                    .pop_front()
                    .ok_or_else(|| EngineError::Internal("a rank was asked for samples of no step".into()))?;
                // The same drafts the engine core hands rank 0: each verification's.
                let drafts: FxHashMap<SeqId, &[TokenId]> = step
                    .out
                    .scheduled
                    .iter()
                    .filter(|e| e.num_draft_tokens > 0)
                    .map(|e| (e.seq_id, e.draft_token_ids()))
                    .collect();
                let decode_only = step.out.is_decode_only();
                let (tokens, _) = runner.finish(step.sampled, &step.samplers, decode_only, &drafts)?;
                Ok(Some(Reply::Finished { tokens: tokens.into_iter().map(|t| t.token).collect() }))
            }
            Command::DiscardUnapplied => {
                self.staged = None;
                self.in_flight.clear();
                runner.discard_unapplied();
                Ok(None)
            }
        }
    }
}
