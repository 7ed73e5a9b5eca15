//! The model runner: turns one [`SchedulerOutput`] into device work (swaps,
//! copy-on-write copies, one forward pass over every scheduled token) and
//! returns the sampled tokens. It makes no policy: the scheduler decided.

use std::collections::HashMap;
use std::time::Instant;

use pagoda_backend::{AttentionHostMetadata, Backend, DType, HostSlice, SampledToken, SamplingRow};
use pagoda_models::{ForwardBatch, KvCache, LlamaModel};
use pagoda_scheduler::{SchedulerOutput, SeqId};

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

/// The host inputs of one forward pass, built from a scheduler output.
#[derive(Debug, Default, PartialEq)]
pub struct StepInputs {
    pub token_ids: Vec<u32>,
    pub positions: Vec<i32>,
    pub attn: AttentionHostMetadata,
    /// One row per sampling sequence: the step row whose logits it samples.
    pub logits_indices: Vec<i32>,
    /// Who samples each logits row, in the same order.
    pub samplers: Vec<SampleTarget>,
    /// Asynchronous scheduling: per token row, the row of the previous step's
    /// samples whose token is this row's input (fed on the device), or -1.
    /// Empty when no row takes its token from the previous step.
    pub source_rows: Vec<i32>,
}

/// A sequence that samples this step, and the scheduled entry whose last
/// position it samples from (a forked child samples its parent's row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleTarget {
    pub seq_id: SeqId,
    pub entry_seq_id: SeqId,
    /// Position of `seq_id` among the entry's `sample_for` (its sample index at a fork).
    pub fork_index: usize,
}

impl StepInputs {
    /// Flattens the scheduled entries (decodes first, as the scheduler orders
    /// them) into the arrays the forward pass takes. `previous` lists who
    /// sampled each row of the step before, still running when this one was
    /// scheduled: entries whose input is one of those tokens read it there.
    pub fn build(out: &SchedulerOutput, previous: &[SampleTarget]) -> Result<Self, EngineError> {
        let mut s = StepInputs::default();
        let max_blocks = out.scheduled.iter().map(|e| e.block_table.len()).max().unwrap_or(0).max(1);
        s.attn.max_blocks_per_seq = max_blocks;
        s.attn.num_decode_seqs = out.num_decodes;
        s.attn.query_start_loc.push(0);
        let fed_from: HashMap<SeqId, usize> = if out.scheduled.iter().any(|e| e.token_from_previous_step) {
            previous.iter().enumerate().map(|(row, t)| (t.seq_id, row)).collect()
        } else {
            HashMap::new()
        };
        for entry in &out.scheduled {
            let n = entry.token_ids.len();
            if n == 0 || entry.slot_mapping.len() != n {
                return Err(EngineError::Internal(format!(
                    "scheduled {:?} with {n} tokens and {} slots",
                    entry.seq_id,
                    entry.slot_mapping.len()
                )));
            }
            s.token_ids.extend_from_slice(&entry.token_ids);
            s.positions.extend(entry.positions().map(|p| p as i32));
            s.attn.slot_mapping.extend_from_slice(&entry.slot_mapping);
            s.attn.query_start_loc.push(s.token_ids.len() as i32);
            s.attn.seq_lens.push(entry.seq_len() as i32);
            s.attn.block_tables.extend(entry.block_table.iter().map(|&b| b as i32));
            s.attn.block_tables.extend(std::iter::repeat_n(0, max_blocks - entry.block_table.len()));
            if entry.token_from_previous_step {
                let source = *fed_from.get(&entry.seq_id).ok_or_else(|| {
                    EngineError::Internal(format!(
                        "{:?} takes a token the previous step does not sample",
                        entry.seq_id
                    ))
                })?;
                let row = s.token_ids.len() - n;
                s.source_rows.resize(row, -1);
                s.source_rows.push(source as i32);
            }
            let last_row = (s.token_ids.len() - 1) as i32;
            for (fork_index, &seq_id) in entry.sample_for.iter().enumerate() {
                s.logits_indices.push(last_row);
                s.samplers.push(SampleTarget { seq_id, entry_seq_id: entry.seq_id, fork_index });
            }
        }
        if !s.source_rows.is_empty() {
            s.source_rows.resize(s.token_ids.len(), -1);
        }
        Ok(s)
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
        Ok(Self { backend, model, kv, timings: RunnerTimings::default(), host_pools, graphs: None })
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

    /// Enqueues one step: swap-out, swap-in, copy-on-write copies (in that
    /// order: a block freed by a swap-out may be a swap-in destination), then
    /// the forward pass and the sampling, without waiting for the device.
    /// `rows` gives each sampling target its sampling row; `previous` is the
    /// previous step's sampling, whose tokens rows of `inputs.source_rows`
    /// take as input. Returns the sampling to [`Self::finish`], or `None`
    /// when nothing samples.
    pub fn launch(
        &mut self,
        out: &SchedulerOutput,
        inputs: &StepInputs,
        rows: &[SamplingRow<'_>],
        previous: Option<&B::Sampled>,
    ) -> Result<Option<B::Sampled>, EngineError> {
        let t0 = Instant::now();
        self.move_blocks(out)?;
        let t1 = Instant::now();
        self.timings.move_blocks += t1 - t0;
        if out.scheduled.is_empty() {
            return Ok(None);
        }
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
                let logits = graphs.run(&self.backend, &self.model, &self.kv, bucket, inputs, feed)?;
                self.timings.graphs = graphs.stats();
                let t3 = Instant::now();
                self.timings.forward += t3 - t1;
                (logits, t3)
            }
            _ => {
                let batch = ForwardBatch::upload(
                    &self.backend,
                    &inputs.token_ids,
                    &inputs.positions,
                    inputs.attn.clone(),
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
                (logits, t3)
            }
        };
        let sampled = if rows.is_empty() { None } else { Some(self.backend.sample_async(&logits, rows)?) };
        let done = Instant::now();
        self.timings.sample += done - t3;
        let phase = if out.num_decodes == out.scheduled.len() {
            &mut self.timings.decode_only
        } else {
            &mut self.timings.with_prefill
        };
        phase.add(inputs.token_ids.len(), done - t0);
        Ok(sampled)
    }

    /// Waits for a step's sampling and returns one token per sampling target,
    /// in order. `decode_only` says which phase the wait is counted in.
    pub fn finish(
        &mut self,
        sampled: B::Sampled,
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
