//! The model runner: turns one [`SchedulerOutput`] into device work (swaps,
//! copy-on-write copies, one forward pass over every scheduled token) and
//! returns the sampled tokens. It makes no policy: the scheduler decided.
//!
//! It keeps a [`PersistentBatch`] (`batch.rs`): every sequence's block table
//! and sampling state live here from step to step, and a step applies only
//! what the scheduler says changed. The engine drives it in four calls:
//! [`ModelRunner::add_request`] once per request (sampling parameters, seed,
//! prompt), then per step [`ModelRunner::prepare`] (apply the output's
//! changes, stage the host inputs), [`ModelRunner::launch`] (block moves, one
//! gather of the block tables, upload, forward pass or decode graph replay,
//! sampling, without waiting for the device) and [`ModelRunner::finish`]
//! (wait for the tokens and append them to the histories).

use std::sync::Arc;
use std::time::Instant;

use pagoda_backend::{Backend, DType, HostSlice, SampledToken, SamplingParams};
use pagoda_models::{ForwardBatch, KvCache, LlamaModel};
use pagoda_scheduler::{RequestId, SchedulerOutput, TokenId};

use crate::batch::{PersistentBatch, PreparedStep, SampleTarget};
use crate::constraint::TokenConstraintFactory;
use crate::error::EngineError;
use crate::graphs::{DecodeGraphs, GraphStats};

/// The device side of the engine: the backend, the model's weights and the
/// paged KV cache, plus the host pool that swapped-out blocks live in.
pub struct ModelRunner<B: Backend> {
    backend: B,
    model: LlamaModel<B>,
    kv: KvCache<B>,
    timings: RunnerTimings,
    /// One host pool per cache tensor (K and V of every layer), each
    /// `num_cpu_blocks` blocks in the device's per-block byte layout.
    host_pools: Vec<Vec<u8>>,
    /// Padded decode steps and their recorded graphs, when enabled.
    graphs: Option<DecodeGraphs<B>>,
    /// Every sequence's block table and sampling state, and the staged step.
    batch: PersistentBatch,
}

/// Where the runner's time went, summed over steps (host wall-clock time).
/// On a device backend, `forward` and `sample` are the time to *enqueue* the
/// forward pass and the sampling, and `wait` the time spent waiting for the
/// device to finish them (under asynchronous scheduling the next step has
/// been enqueued by then).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunnerTimings {
    pub move_blocks: std::time::Duration,
    pub upload: std::time::Duration,
    pub forward: std::time::Duration,
    pub sample: std::time::Duration,
    pub wait: std::time::Duration,
    /// Filling structured-output token masks (host, while the forward pass runs).
    pub token_masks: std::time::Duration,
    /// Host time of steps that only decode, and of steps with prompt tokens
    /// (the two behave differently on a device: weight- and KV-bound vs
    /// compute-bound): enqueueing them, plus waiting for their tokens.
    pub decode_only: PhaseTotal,
    pub with_prefill: PhaseTotal,
    /// How decode steps used recorded graphs (all zero when they are off).
    pub graphs: GraphStats,
}

/// A count of steps and their summed time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTotal {
    pub steps: u64,
    pub tokens: u64,
    pub time: std::time::Duration,
}

impl PhaseTotal {
    fn add(&mut self, tokens: usize, time: std::time::Duration) {
        self.steps += 1;
        self.tokens += tokens as u64;
        self.time += time;
    }
}

impl<B: Backend> ModelRunner<B> {
    /// Allocates the KV cache (`num_gpu_blocks` of `block_size`) and a host
    /// swap pool of `num_cpu_blocks`.
    pub fn new(
        backend: B,
        model: LlamaModel<B>,
        num_gpu_blocks: usize,
        num_cpu_blocks: usize,
        block_size: usize,
    ) -> Result<Self, EngineError> {
        let kv = model.alloc_kv_cache(&backend, num_gpu_blocks, block_size)?;
        let block_bytes = kv.shape.block_numel() * model.dtype().size_in_bytes();
        let host_pools = if num_cpu_blocks == 0 {
            Vec::new()
        } else {
            (0..kv.layers.len() * 2).map(|_| vec![0u8; num_cpu_blocks * block_bytes]).collect()
        };
        Ok(Self {
            backend,
            model,
            kv,
            timings: RunnerTimings::default(),
            host_pools,
            graphs: None,
            batch: PersistentBatch::new(block_size),
        })
    }

    /// Runs decode-only steps of up to `max_batch` sequences of up to
    /// `max_context` tokens padded into fixed buffers, replaying a recorded
    /// graph per bucket where the backend can record (see `graphs.rs`). On a
    /// backend that cannot, steps are only padded (which tests use to check
    /// the padding on the CPU).
    pub fn enable_decode_graphs(&mut self, max_batch: usize, max_context: usize) -> Result<(), EngineError> {
        let block_size = self.kv.shape.block_size;
        let vocab = self.model.config().vocab_size;
        self.graphs = Some(DecodeGraphs::new(&self.backend, max_batch, max_context, block_size, vocab)?);
        Ok(())
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn model(&self) -> &LlamaModel<B> {
        &self.model
    }

    pub fn kv_cache(&self) -> &KvCache<B> {
        &self.kv
    }

    /// Time spent in each phase so far.
    pub fn timings(&self) -> RunnerTimings {
        self.timings
    }

    /// The per-sequence state and the staged step.
    pub fn batch(&self) -> &PersistentBatch {
        &self.batch
    }

    /// Tells the runner of a request the scheduler accepted: its sampling
    /// parameters, its seed and its prompt. Its sequences' state is created
    /// when they first run and dropped when a step's output lists them as
    /// ended.
    pub fn add_request(
        &mut self,
        request_id: RequestId,
        prompt: &[TokenId],
        params: Arc<SamplingParams>,
        seed: u64,
        constraint: Option<Arc<dyn TokenConstraintFactory>>,
    ) {
        self.batch.add_request(request_id, prompt, params, seed, constraint);
    }

    /// Applies a step's changes to the persistent batch and stages its host
    /// inputs (host work only). `previous` lists who samples each row of the
    /// step still in flight, if any (asynchronous scheduling). Call
    /// [`Self::launch`] with the same output next.
    pub fn prepare(
        &mut self,
        out: &SchedulerOutput,
        previous: &[SampleTarget],
    ) -> Result<PreparedStep, EngineError> {
        self.batch.prepare(out, previous)
    }

    /// Forgets the samples of steps launched and never finished (the engine
    /// dropped them after a failure).
    pub fn discard_unapplied(&mut self) {
        self.batch.discard_unapplied();
    }

    /// Enqueues the step [`Self::prepare`] staged: swap-out, swap-in,
    /// copy-on-write copies (in that order: a block freed by a swap-out may be
    /// a swap-in destination), then the forward pass and the sampling,
    /// without waiting for the device. `previous` is the previous step's
    /// sampling, whose tokens rows of the staged `source_rows` take as input.
    /// Returns the sampling to [`Self::finish`], or `None` when nothing
    /// samples.
    pub fn launch(
        &mut self,
        out: &SchedulerOutput,
        previous: Option<&B::Sampled>,
    ) -> Result<Option<B::Sampled>, EngineError> {
        if self.batch.prepared_step() != Some(out.step) {
            return Err(EngineError::Internal(format!("step {} launched without being prepared", out.step)));
        }
        let t0 = Instant::now();
        self.move_blocks(out)?;
        let t1 = Instant::now();
        self.timings.move_blocks += t1 - t0;
        if out.scheduled.is_empty() {
            return Ok(None);
        }
        let inputs = self.batch.inputs();
        let feed = match (inputs.source_rows.is_empty(), previous) {
            (true, _) => None,
            (false, Some(previous)) => Some(previous),
            (false, None) => {
                return Err(EngineError::Internal(
                    "a step takes tokens from a step that did not sample".into(),
                ))
            }
        };
        let bucket = self.graphs.as_ref().and_then(|g| g.bucket_for(out.num_decodes, inputs));
        let (logits, t3) = match (bucket, self.graphs.as_mut()) {
            (Some(bucket), Some(graphs)) => {
                // The padded buffers read the block tables from the batch.
                let logits =
                    graphs.run(&self.backend, &self.model, &self.kv, bucket, inputs, &self.batch, feed)?;
                self.timings.graphs = graphs.stats();
                let t3 = Instant::now();
                self.timings.forward += t3 - t1;
                (logits, t3)
            }
            _ => {
                self.batch.gather_block_tables();
                // Moved into the upload and back after the forward pass, not copied.
                let attn = self.batch.take_attention();
                let inputs = self.batch.inputs();
                let batch = ForwardBatch::upload(
                    &self.backend,
                    &inputs.token_ids,
                    &inputs.positions,
                    attn,
                    &inputs.logits_indices,
                )?;
                if let Some(previous) = feed {
                    let n = inputs.source_rows.len();
                    let source_rows =
                        self.backend.upload(HostSlice::I32(&inputs.source_rows), &[n], DType::I32)?;
                    self.backend.feed_sampled_tokens(previous, &source_rows, &batch.token_ids)?;
                }
                let t2 = Instant::now();
                self.timings.upload += t2 - t1;
                let logits = self.model.forward(&self.backend, &batch, &self.kv)?;
                let t3 = Instant::now();
                self.timings.forward += t3 - t2;
                self.batch.restore_attention(batch.attn.host);
                (logits, t3)
            }
        };
        if self.batch.has_token_masks() {
            // Host work while the device runs the forward pass just enqueued.
            let vocab = self.model.config().vocab_size;
            self.batch.fill_token_masks(vocab)?;
            let t = Instant::now();
            self.timings.token_masks += t - t3;
        }
        let rows = self.batch.sampling_rows();
        let sampled = if rows.is_empty() { None } else { Some(self.backend.sample_async(&logits, &rows)?) };
        drop(rows);
        let done = Instant::now();
        self.timings.sample += done - t3;
        let num_tokens = self.batch.inputs().token_ids.len();
        let phase = if out.num_decodes == out.scheduled.len() {
            &mut self.timings.decode_only
        } else {
            &mut self.timings.with_prefill
        };
        phase.add(num_tokens, done - t0);
        Ok(sampled)
    }

    /// Waits for a step's sampling and returns one token per sampling target
    /// (`samplers`, from the step's [`PreparedStep`]), in order, after
    /// appending them to the sequences' histories. `decode_only` says which
    /// phase the wait is counted in.
    pub fn finish(
        &mut self,
        sampled: B::Sampled,
        samplers: &[SampleTarget],
        decode_only: bool,
    ) -> Result<Vec<SampledToken>, EngineError> {
        let t0 = Instant::now();
        let tokens = self.backend.finish_sample(sampled)?;
        let waited = t0.elapsed();
        self.timings.wait += waited;
        if decode_only {
            self.timings.decode_only.time += waited;
        } else {
            self.timings.with_prefill.time += waited;
        }
        self.batch.apply_sampled(samplers, &tokens)?;
        Ok(tokens)
    }

    fn move_blocks(&mut self, out: &SchedulerOutput) -> Result<(), EngineError> {
        let has_swaps = !out.blocks_to_swap_out.is_empty() || !out.blocks_to_swap_in.is_empty();
        if has_swaps && self.host_pools.is_empty() {
            return Err(EngineError::Internal("the scheduler swapped with no CPU swap space".into()));
        }
        let caches = self.kv.tensors();
        if !out.blocks_to_swap_out.is_empty() {
            let pairs: Vec<(u32, u32)> = out.blocks_to_swap_out.iter().map(|&(g, c)| (g, c)).collect();
            for (cache, pool) in caches.iter().zip(self.host_pools.iter_mut()) {
                self.backend.swap_out(cache, pool, &pairs)?;
            }
        }
        if !out.blocks_to_swap_in.is_empty() {
            let pairs: Vec<(u32, u32)> = out.blocks_to_swap_in.iter().map(|&(c, g)| (c, g)).collect();
            for (cache, pool) in caches.iter().zip(self.host_pools.iter()) {
                self.backend.swap_in(pool, cache, &pairs)?;
            }
        }
        if !out.blocks_to_copy.is_empty() {
            let pairs: Vec<(u32, u32)> = out.blocks_to_copy.iter().map(|&(s, d)| (s, d)).collect();
            self.backend.copy_blocks(&caches, &pairs)?;
        }
        Ok(())
    }
}
