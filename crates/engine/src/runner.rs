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
//!
//! Split over tensor-parallel ranks, this runner is rank 0's and forwards
//! each of those calls to the other ranks' runners (`tensor_parallel.rs`),
//! which run the same steps on their shards.

use std::sync::Arc;
use std::time::Instant;

use pagoda_backend::{Backend, DType, HostSlice, SampledToken, SamplingParams};
use pagoda_models::{ForwardBatch, KvCache, LlamaModel, LoraAdapter};
use pagoda_scheduler::{RequestId, SchedulerOutput, SeqId, TokenId};
use rustc_hash::FxHashMap;

use crate::batch::{PersistentBatch, PreparedStep, SampleTarget, StepInputs, Verifications};
use crate::constraint::TokenConstraintFactory;
use crate::draft_model::DraftModel;
use crate::error::EngineError;
use crate::graphs::{DecodeGraphs, GraphStats};
use crate::lora::LoraSlotTable;
use crate::request::PromptLogprob;
use crate::speculative::DraftRequest;
use crate::tensor_parallel::{RankGroup, RankRequest};

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
    /// Prompt logprobs computed by launched steps, not yet taken:
    /// `(request, first position, one per position from there)`.
    prompt_logprobs: Vec<(RequestId, usize, Vec<PromptLogprob>)>,
    /// Speculative decoding's draft model, when it proposes with one.
    draft: Option<DraftModel<B>>,
    /// Which LoRA adapter each of the model's slots holds, when LoRA is on.
    lora_slots: Option<LoraSlotTable>,
    /// Per token row of the step being launched, its LoRA slot (-1: none).
    token_lora_slots: Vec<i32>,
    /// The other ranks of a tensor-parallel group this runner is rank 0 of.
    ranks: Option<RankGroup<B>>,
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
    /// Allocates the KV cache (`num_gpu_blocks` of `block_size`, of
    /// `kv_cache_dtype`: the model's dtype or F8E4M3) and a host swap pool of
    /// `num_cpu_blocks` (in the cache's bytes per block).
    pub fn new(
        backend: B,
        model: LlamaModel<B>,
        num_gpu_blocks: usize,
        num_cpu_blocks: usize,
        block_size: usize,
        kv_cache_dtype: DType,
    ) -> Result<Self, EngineError> {
        let kv = model.alloc_kv_cache(&backend, num_gpu_blocks, block_size, kv_cache_dtype)?;
        let block_bytes = kv.block_bytes();
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
            prompt_logprobs: Vec::new(),
            draft: None,
            lora_slots: None,
            token_lora_slots: Vec::new(),
            ranks: None,
        })
    }

    /// Makes this runner rank 0 of a tensor-parallel group: the other ranks
    /// allocate pools of the same block counts for their KV heads, and from
    /// now on run every step this runner runs.
    pub(crate) fn lead_ranks(
        &mut self,
        mut ranks: RankGroup<B>,
        num_gpu_blocks: usize,
        num_cpu_blocks: usize,
    ) -> Result<(), EngineError> {
        ranks.build(num_gpu_blocks, num_cpu_blocks)?;
        self.ranks = Some(ranks);
        Ok(())
    }

    /// Ranks the model is split over (1: not split).
    pub fn tensor_parallel_size(&self) -> usize {
        self.ranks.as_ref().map_or(1, |r| r.world_size())
    }

    /// Serves LoRA adapters from the model's slots ([`LlamaModel::enable_lora`]).
    pub fn enable_lora(&mut self) -> Result<(), EngineError> {
        let slots = self.model.lora_slots().ok_or_else(|| {
            EngineError::Internal("LoRA enabled in the runner for a model without LoRA slots".into())
        })?;
        self.lora_slots = Some(LoraSlotTable::new(slots.max_loras()));
        Ok(())
    }

    /// The LoRA slots' state, when LoRA is on.
    pub fn lora_slot_table(&self) -> Option<&LoraSlotTable> {
        self.lora_slots.as_ref()
    }

    /// Gives the runner a draft model for speculative decoding.
    pub fn set_draft_model(&mut self, draft: DraftModel<B>) {
        self.draft = Some(draft);
    }

    /// Drafts from the draft model (none without one).
    pub fn propose_with_draft(
        &mut self,
        requests: &[DraftRequest<'_>],
    ) -> Result<Vec<Vec<TokenId>>, EngineError> {
        match self.draft.as_mut() {
            Some(draft) => draft.propose(&self.backend, requests),
            None => Ok(vec![Vec::new(); requests.len()]),
        }
    }

    /// The tokens a sequence's constraint forces next (at most `max`; none
    /// without a constraint or with a sample not yet applied).
    pub fn forced_tokens(&mut self, seq: SeqId, max: usize) -> Vec<TokenId> {
        self.batch.forced_tokens(seq, max)
    }

    /// The draft model forgets an ended sequence.
    pub fn forget_draft(&mut self, seq: SeqId) {
        if let Some(draft) = self.draft.as_mut() {
            draft.forget(seq);
        }
    }

    /// Runs decode-only steps of up to `max_batch` sequences of up to
    /// `max_context` tokens padded into fixed buffers, replaying a recorded
    /// graph per bucket where the backend can record (see `graphs.rs`). On a
    /// backend that cannot, steps are only padded (which tests use to check
    /// the padding on the CPU).
    pub fn enable_decode_graphs(&mut self, max_batch: usize, max_context: usize) -> Result<(), EngineError> {
        let block_size = self.kv.shape.block_size;
        let vocab = self.model.config().vocab_size;
        let lora = self.model.lora_slots().map(|slots| slots.max_loras());
        self.graphs =
            Some(DecodeGraphs::new(&self.backend, max_batch, max_context, block_size, vocab, lora)?);
        if let Some(ranks) = self.ranks.as_mut() {
            ranks.enable_decode_graphs(max_batch, max_context)?;
        }
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
        lora: Option<(u32, Arc<LoraAdapter>)>,
    ) {
        if let Some(ranks) = self.ranks.as_mut() {
            let (params, constraint, lora) = (params.clone(), constraint.clone(), lora.clone());
            ranks.add_request(RankRequest {
                request_id,
                prompt: prompt.to_vec(),
                params,
                seed,
                constraint,
                lora,
            });
        }
        self.batch.add_request(request_id, prompt, params, seed, constraint, lora);
    }

    /// Asks for the logprobs of a request's prompt tokens (call after
    /// [`Self::add_request`]); launched steps compute them for the prompt
    /// chunks they run, and [`Self::take_prompt_logprobs`] hands them over.
    pub fn want_prompt_logprobs(&mut self, request_id: RequestId, top_k: usize) {
        if let Some(ranks) = self.ranks.as_mut() {
            ranks.want_prompt_logprobs(request_id, top_k);
        }
        self.batch.want_prompt_logprobs(request_id, top_k);
    }

    /// The prompt logprobs computed by the steps launched since the last
    /// call: `(request, first position, one entry per position from there)`;
    /// the entry of position `p` is prompt token `p + 1`'s.
    pub fn take_prompt_logprobs(&mut self) -> Vec<(RequestId, usize, Vec<PromptLogprob>)> {
        std::mem::take(&mut self.prompt_logprobs)
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
        if let Some(ranks) = self.ranks.as_mut() {
            ranks.prepare(out, previous)?;
        }
        let prepared = self.batch.prepare(out, previous);
        if let (Err(e), Some(ranks)) = (&prepared, self.ranks.as_mut()) {
            ranks.break_group(e);
        }
        prepared
    }

    /// Forgets the samples of steps launched and never finished (the engine
    /// dropped them after a failure).
    pub fn discard_unapplied(&mut self) {
        if let Some(ranks) = self.ranks.as_mut() {
            ranks.discard_unapplied();
        }
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
        // The other ranks start first: this rank's all-reduces wait for theirs.
        if let Some(ranks) = self.ranks.as_mut() {
            ranks.launch(previous.is_some())?;
        }
        let launched = self.launch_rank(out, previous);
        match self.ranks.as_mut() {
            Some(ranks) => ranks.collect_launch(launched),
            None => launched,
        }
    }

    /// [`Self::launch`] on this rank alone.
    fn launch_rank(
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
        let has_lora = !self.batch.inputs().lora_ids.is_empty();
        if has_lora {
            self.stage_lora_slots()?;
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
        let has_prompt_rows = !inputs.prompt_logprobs.is_empty();
        let bucket = match has_prompt_rows {
            true => None,
            false => self.graphs.as_ref().and_then(|g| g.bucket_for(inputs)),
        };
        let (logits, t3) = match (bucket, self.graphs.as_mut()) {
            (Some(bucket), Some(graphs)) => {
                // The padded buffers read the block tables from the batch.
                let logits = graphs.run(
                    &self.backend,
                    &self.model,
                    &self.kv,
                    bucket,
                    inputs,
                    &self.batch,
                    feed,
                    if has_lora { &self.token_lora_slots } else { &[] },
                )?;
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
                let mut batch = ForwardBatch::upload(
                    &self.backend,
                    &inputs.token_ids,
                    &inputs.positions,
                    attn,
                    &inputs.logits_indices,
                )?;
                if has_lora {
                    batch = batch.with_lora_slots(&self.backend, &self.token_lora_slots)?;
                }
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
        let logits = if has_prompt_rows {
            // The prompt rows follow the sampling rows; read them back (this
            // waits for the device) and keep the sampling rows to sample.
            let inputs = self.batch.inputs();
            let sampling = inputs.num_sampling_rows();
            let prompt = logits.narrow(sampling, inputs.prompt_targets.len())?;
            let values = self.backend.download_f32(&prompt)?;
            self.prompt_logprobs.extend(prompt_logprobs(inputs, &values, self.model.config().vocab_size));
            if sampling > 0 {
                logits.narrow(0, sampling)?
            } else {
                logits
            }
        } else {
            logits
        };
        let rows = self.batch.sampling_rows();
        let sampled = if rows.is_empty() { None } else { Some(self.backend.sample_async(&logits, &rows)?) };
        drop(rows);
        let done = Instant::now();
        self.timings.sample += done - t3;
        let num_tokens = self.batch.inputs().token_ids.len();
        let phase =
            if out.is_decode_only() { &mut self.timings.decode_only } else { &mut self.timings.with_prefill };
        phase.add(num_tokens, done - t0);
        Ok(sampled)
    }

    /// Puts the staged step's LoRA adapters into device slots and stages each
    /// token's slot in `token_lora_slots`.
    fn stage_lora_slots(&mut self) -> Result<(), EngineError> {
        let table = self
            .lora_slots
            .as_mut()
            .ok_or_else(|| EngineError::Internal("a step with LoRA adapters, but LoRA is off".into()))?;
        let lora_ids = &self.batch.inputs().lora_ids;
        let mut ids: Vec<u32> = lora_ids.iter().copied().filter(|&id| id != 0).collect();
        ids.sort_unstable();
        ids.dedup();
        let batch = &self.batch;
        let assigned = table.assign(&self.backend, &self.model, &ids, |id| batch.lora_adapter(id))?;
        self.token_lora_slots.clear();
        self.token_lora_slots.extend(lora_ids.iter().map(|&id| match id {
            0 => -1,
            id => assigned.iter().find(|&&(held, _)| held == id).map_or(-1, |&(_, slot)| slot as i32),
        }));
        Ok(())
    }

    /// Waits for a step's sampling and returns one token per sampling row
    /// (`samplers`, from the step's [`PreparedStep`]), in order, after
    /// appending the tokens each sequence keeps to its history; and per
    /// sequence that verified drafts (`drafts`: its entry's), how many it
    /// accepted. `decode_only` says which phase the wait is counted in.
    pub fn finish(
        &mut self,
        sampled: B::Sampled,
        samplers: &[SampleTarget],
        decode_only: bool,
        drafts: &FxHashMap<SeqId, &[TokenId]>,
    ) -> Result<(Vec<SampledToken>, Verifications), EngineError> {
        if let Some(ranks) = self.ranks.as_mut() {
            ranks.finish()?;
        }
        let finished = self.finish_rank(sampled, samplers, decode_only, drafts);
        match self.ranks.as_mut() {
            Some(ranks) => ranks.collect_finish(finished),
            None => finished,
        }
    }

    /// [`Self::finish`] on this rank alone.
    fn finish_rank(
        &mut self,
        sampled: B::Sampled,
        samplers: &[SampleTarget],
        decode_only: bool,
        drafts: &FxHashMap<SeqId, &[TokenId]>,
    ) -> Result<(Vec<SampledToken>, Verifications), EngineError> {
        let t0 = Instant::now();
        let tokens = self.backend.finish_sample(sampled)?;
        let waited = t0.elapsed();
        self.timings.wait += waited;
        if decode_only {
            self.timings.decode_only.time += waited;
        } else {
            self.timings.with_prefill.time += waited;
        }
        let verified = self.batch.apply_sampled(samplers, &tokens, drafts)?;
        Ok((tokens, verified))
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

/// The prompt logprobs of a step from its prompt rows' logits (`values`,
/// row-major, `vocab` per row): per row, the log-softmax (in f64) at the
/// prompt token the row predicts, that token's rank, and the top alternatives.
fn prompt_logprobs(
    inputs: &StepInputs,
    values: &[f32],
    vocab: usize,
) -> Vec<(RequestId, usize, Vec<PromptLogprob>)> {
    let mut rows = values.chunks_exact(vocab).zip(&inputs.prompt_targets);
    let mut out = Vec::with_capacity(inputs.prompt_logprobs.len());
    for group in &inputs.prompt_logprobs {
        let entries = rows
            .by_ref()
            .take(group.num_rows)
            .map(|(logits, &target)| row_logprob(logits, target, group.top_k))
            .collect();
        out.push((group.request_id, group.first_position, entries));
    }
    out
}

/// One row's [`PromptLogprob`] of `target` with `top_k` alternatives.
fn row_logprob(logits: &[f32], target: TokenId, top_k: usize) -> PromptLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let logprob = |x: f32| (x as f64 - log_z) as f32;
    let t = logits[target as usize];
    // vLLM counts the tokens at least as likely, the target itself included.
    let rank = logits.iter().filter(|&&x| x >= t).count() as u32;
    let k = top_k.min(logits.len());
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, by_logit);
    }
    order.truncate(k);
    order.sort_unstable_by(by_logit);
    let top = order.into_iter().map(|id| (id, logprob(logits[id as usize]))).collect();
    PromptLogprob { token: target, logprob: logprob(t), rank, top }
}
