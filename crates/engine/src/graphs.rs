//! Decode steps replayed from recorded graphs (CUDA graphs).
//!
//! A decode step at a small batch launches some 230 kernels of a few
//! microseconds each for an 8B model; launching them one by one leaves gaps.
//! Device backends can record a step once and replay it with one launch, but a
//! replay repeats the recorded launches exactly: the same buffers, grid sizes
//! and kernel choices. So a decode-only step is padded to a [`Bucket`] (batch
//! rounded up to a capture size, context rounded up to a power of two), its
//! inputs are written into buffers that never move, and the bucket's graph
//! runs. The first step of a bucket runs eagerly on those same buffers (it
//! loads every kernel and lets cuBLAS pick its algorithms outside a capture),
//! the second records the graph, later ones replay it.
//!
//! Padding rows are one-token sequences at position 0 that write no cache slot
//! (slot −1) and read block 0; their logits are computed and ignored. Kernels
//! read real lengths from the device, so a graph recorded for a context bucket
//! serves every step whose longest sequence fits it: partitions past a
//! sequence's end exit at once.
//!
//! Activations the forward pass allocates become the graph's own allocations.
//! CUDA may back the allocations of graphs launched into one stream with the
//! same physical memory, so many buckets do not multiply activation memory.

use std::collections::HashMap;

use pagoda_backend::{
    lora_group_capacity, AttentionHostMetadata, AttentionMetadata, Backend, BackendError, DType, HostSlice,
    Tensor,
};
use pagoda_models::{ForwardBatch, KvCache, LlamaModel, LoraTokens, ModelError};

use crate::batch::{BlockTableSource, StepInputs};
use crate::error::EngineError;

/// Smallest context bucket: below it, more buckets would only add captures.
const MIN_CONTEXT_BUCKET: usize = 256;

/// The shape a padded decode step is recorded for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bucket {
    /// Sequences (one token each), real and padding.
    pub batch: usize,
    /// Longest context any sequence of the step may have.
    pub context: usize,
    /// Whether tokens of the step run LoRA adapters (the forward pass then
    /// has the adapters' products, reading each token's slot from a buffer).
    pub lora: bool,
}

impl Bucket {
    /// The bucket of a decode step of `num_seqs` sequences whose longest has
    /// `max_seq_len` tokens, or `None` when the step is larger than any bucket.
    pub fn for_step(
        num_seqs: usize,
        max_seq_len: usize,
        max_batch: usize,
        max_context: usize,
    ) -> Option<Self> {
        if num_seqs == 0 || max_seq_len == 0 || max_seq_len > max_context {
            return None;
        }
        let batch = capture_sizes(max_batch).find(|&b| b >= num_seqs)?;
        let context = max_seq_len.next_power_of_two().max(MIN_CONTEXT_BUCKET).min(max_context);
        Some(Self { batch, context, lora: false })
    }

    /// Block-table entries per sequence: enough blocks for `context` tokens.
    pub fn table_width(&self, block_size: usize) -> usize {
        self.context.div_ceil(block_size)
    }
}

/// Batch sizes graphs are recorded for, up to `max_batch`: 1, 2, 4, then
/// multiples of 8 (as vLLM captures), so padding wastes at most 7 rows.
pub fn capture_sizes(max_batch: usize) -> impl Iterator<Item = usize> {
    [1, 2, 4].into_iter().chain((8..).step_by(8)).take_while(move |&b| b <= max_batch)
}

/// Whether a step can run from a graph: one-token attention rows only
/// (decodes, and verifications laid out as one row per position), each
/// sampling exactly once from its own row (no fork at this step).
pub fn is_graphable(inputs: &StepInputs) -> bool {
    let n = inputs.attn.num_seqs();
    n > 0
        && inputs.attn.num_decode_seqs == n
        && inputs.token_ids.len() == n
        && inputs.logits_indices.len() == n
        && inputs.logits_indices.iter().enumerate().all(|(i, &row)| row as usize == i)
}

/// The host arrays of one decode step padded to a bucket, laid out as the
/// fixed device buffers are (so that they go up in one copy each). Reused
/// from step to step: filling it allocates nothing once it has grown.
#[derive(Debug)]
pub struct PaddedDecodeInputs {
    layout: StepInputLayout,
    batch: usize,
    width: usize,
    /// Token ids, positions and sequence lengths (`layout.rows` each, the
    /// first `batch` used), then the block tables, `[batch, width]` row-major.
    step_i32: Vec<i32>,
    slot_mapping: Vec<i64>,
    source_rows: Vec<i32>,
    /// Each row's LoRA slot (-1: none, and for padding rows).
    lora_slots: Vec<i32>,
    /// The slots, then the rows grouped by slot ([`LoraTokens`]'s layout).
    lora_tokens: Vec<i32>,
}

impl PaddedDecodeInputs {
    /// Empty buffers for buckets of up to `max_batch` sequences.
    fn with_rows(max_batch: usize) -> Self {
        Self {
            layout: StepInputLayout { rows: max_batch.max(1) },
            batch: 0,
            width: 0,
            step_i32: Vec::new(),
            slot_mapping: Vec::new(),
            source_rows: Vec::new(),
            lora_slots: Vec::new(),
            lora_tokens: Vec::new(),
        }
    }

    /// Pads a graphable step (see [`is_graphable`]) to `bucket`, reading each
    /// sequence's block table from `tables` (row `s` for the step's `s`-th
    /// sequence).
    pub fn new(
        inputs: &StepInputs,
        tables: &(impl BlockTableSource + ?Sized),
        bucket: Bucket,
        block_size: usize,
    ) -> Result<Self, EngineError> {
        let mut padded = Self::with_rows(bucket.batch);
        padded.fill(inputs, tables, bucket, block_size, &[])?;
        Ok(padded)
    }

    /// [`Self::new`] into these buffers (`bucket.batch` at most the rows they
    /// were made for).
    fn fill(
        &mut self,
        inputs: &StepInputs,
        tables: &(impl BlockTableSource + ?Sized),
        bucket: Bucket,
        block_size: usize,
        lora_slots: &[i32],
    ) -> Result<(), EngineError> {
        let n = inputs.attn.num_seqs();
        let (b, width) = (bucket.batch, bucket.table_width(block_size));
        if n > b || b > self.layout.rows || inputs.attn.max_seq_len() > bucket.context {
            return Err(EngineError::Internal(format!("a step of {n} sequences does not fit {bucket:?}")));
        }
        let layout = self.layout;
        (self.batch, self.width) = (b, width);
        self.step_i32.resize(layout.block_tables() + b * width, 0);
        let pad = |dst: &mut [i32], src: &mut dyn Iterator<Item = i32>, with: i32| {
            for (d, v) in dst.iter_mut().zip(src.chain(std::iter::repeat(with))) {
                *d = v;
            }
        };
        let ids = &mut self.step_i32[layout.token_ids()..][..b];
        pad(ids, &mut inputs.token_ids.iter().map(|&t| t as i32), 0);
        pad(&mut self.step_i32[layout.positions()..][..b], &mut inputs.positions.iter().copied(), 0);
        pad(&mut self.step_i32[layout.seq_lens()..][..b], &mut inputs.attn.seq_lens.iter().copied(), 1);
        // The one gather of the step's block tables, straight into the
        // bucket's width. Only the blocks holding context are read; entries
        // past them (and whole padding rows) point at block 0.
        let all_tables = &mut self.step_i32[layout.block_tables()..];
        for (s, dst) in all_tables.chunks_exact_mut(width).enumerate() {
            let used = inputs.attn.seq_lens.get(s).map_or(0, |&len| (len as usize).div_ceil(block_size));
            let row = if used > 0 { tables.row_table(s) } else { &[] };
            let row = row.get(..used).ok_or_else(|| {
                EngineError::Internal(format!("sequence {s} of a step has {} blocks for {used}", row.len()))
            })?;
            for (d, &block) in dst.iter_mut().zip(row) {
                *d = block as i32;
            }
            dst[used..].fill(0);
        }
        self.slot_mapping.clear();
        self.slot_mapping.extend_from_slice(&inputs.attn.slot_mapping);
        self.slot_mapping.resize(b, -1);
        self.source_rows.clear();
        self.source_rows.extend_from_slice(&inputs.source_rows);
        self.source_rows.resize(b, -1);
        self.lora_slots.clear();
        self.lora_slots.extend_from_slice(lora_slots);
        self.lora_slots.resize(b, -1);
        Ok(())
    }

    pub fn token_ids(&self) -> &[i32] {
        &self.step_i32[self.layout.token_ids()..][..self.batch]
    }

    pub fn positions(&self) -> &[i32] {
        &self.step_i32[self.layout.positions()..][..self.batch]
    }

    pub fn seq_lens(&self) -> &[i32] {
        &self.step_i32[self.layout.seq_lens()..][..self.batch]
    }

    /// `[batch, table_width]`, row-major.
    pub fn block_tables(&self) -> &[i32] {
        &self.step_i32[self.layout.block_tables()..][..self.batch * self.width]
    }

    pub fn slot_mapping(&self) -> &[i64] {
        &self.slot_mapping
    }

    /// Rows of the previous step's samples to feed as input tokens, or -1
    /// (all -1 when nothing is fed).
    pub fn source_rows(&self) -> &[i32] {
        &self.source_rows
    }
}

/// Where each i32 input of a padded step lives in the one buffer that holds
/// them all: offsets in elements, for buffers of `rows` sequences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StepInputLayout {
    rows: usize,
}

impl StepInputLayout {
    fn token_ids(self) -> usize {
        0
    }
    fn positions(self) -> usize {
        self.rows
    }
    fn seq_lens(self) -> usize {
        2 * self.rows
    }
    fn block_tables(self) -> usize {
        3 * self.rows
    }
}

/// Counts of how decode steps ran on the graph path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps run on the padded buffers, whichever way (decodes, and
    /// verifications of drafts as one-token rows).
    pub steps: u64,
    /// First step of a bucket, run eagerly on the padded buffers.
    pub warmups: u64,
    pub captures: u64,
    pub replays: u64,
    /// Buckets whose capture failed; they run eagerly from then on.
    pub failed: u64,
}

enum BucketState<G> {
    /// Ran eagerly once; the next step records.
    Warm,
    Recorded(G),
    /// Capture failed (the reason was logged): eager on the padded buffers.
    Failed,
}

/// Fixed device buffers for padded decode steps, and the graph of each bucket.
pub struct DecodeGraphs<B: Backend> {
    max_batch: usize,
    max_context: usize,
    block_size: usize,
    /// The step's i32 inputs in one buffer, so that a step uploads them with
    /// one copy: token ids, positions and sequence lengths (`max_batch` each),
    /// then the block tables (flat: a bucket views the first
    /// `batch * table_width` entries). See [`StepInputLayout`].
    step_i32: Tensor<B>,
    /// 0, 1, …, max_batch: every sequence has one query token.
    query_start_loc: Tensor<B>,
    slot_mapping: Tensor<B>,
    /// Rows of the previous step's samples fed as input tokens (asynchronous
    /// scheduling). Not in `step_i32`: an op's output may not share a buffer
    /// with its input.
    source_rows: Tensor<B>,
    /// 0, 1, …: every row samples.
    logits_indices: Tensor<B>,
    /// Each row's LoRA slot and the rows grouped by slot ([`LoraTokens`]),
    /// when the model has LoRA slots.
    lora_tokens: Option<Tensor<B>>,
    /// The model's LoRA slots (how many groups a bucket's rows can make).
    max_loras: usize,
    /// F32 `[max_batch, V]`.
    logits: Tensor<B>,
    buckets: HashMap<Bucket, BucketState<B::Graph>>,
    /// Host staging of the buffers above, reused from step to step.
    staging: PaddedDecodeInputs,
    stats: GraphStats,
}

impl<B: Backend> DecodeGraphs<B> {
    /// Buffers for steps of up to `max_batch` sequences of up to `max_context` tokens.
    pub fn new(
        backend: &B,
        max_batch: usize,
        max_context: usize,
        block_size: usize,
        vocab_size: usize,
        max_loras: Option<usize>,
    ) -> Result<Self, EngineError> {
        let max_batch = capture_sizes(max_batch).last().unwrap_or(0);
        let rows = max_batch.max(1);
        let width = max_context.div_ceil(block_size).max(1);
        let count: Vec<i32> = (0..=rows as i32).collect();
        let layout = StepInputLayout { rows };
        Ok(Self {
            max_batch,
            max_context,
            block_size,
            step_i32: backend.alloc(&[layout.block_tables() + rows * width], DType::I32)?,
            query_start_loc: backend.upload(HostSlice::I32(&count), &[rows + 1], DType::I32)?,
            slot_mapping: backend.alloc(&[rows], DType::I64)?,
            source_rows: backend.alloc(&[rows], DType::I32)?,
            logits_indices: backend.upload(HostSlice::I32(&count[..rows]), &[rows], DType::I32)?,
            lora_tokens: match max_loras {
                Some(slots) => {
                    let len = LoraTokens::<B>::buffer_len(rows, lora_group_capacity(rows, slots));
                    Some(backend.alloc(&[len], DType::I32)?)
                }
                None => None,
            },
            max_loras: max_loras.unwrap_or(0),
            logits: backend.alloc(&[rows, vocab_size], DType::F32)?,
            buckets: HashMap::new(),
            staging: PaddedDecodeInputs::with_rows(rows),
            stats: GraphStats::default(),
        })
    }

    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    /// The bucket this step runs in, or `None` if it must run unpadded.
    pub fn bucket_for(&self, inputs: &StepInputs) -> Option<Bucket> {
        if !is_graphable(inputs) {
            return None;
        }
        let bucket = Bucket::for_step(
            inputs.attn.num_seqs(),
            inputs.attn.max_seq_len(),
            self.max_batch,
            self.max_context,
        )?;
        let lora = !inputs.lora_ids.is_empty();
        if lora && self.lora_tokens.is_none() {
            return None;
        }
        Some(Bucket { lora, ..bucket })
    }

    /// Runs the step in `bucket` (eagerly, by recording, or by replay) and
    /// returns its logits, `[num_seqs, V]`, a view of the fixed logits buffer
    /// that holds until the next step. Each sequence's block table is read
    /// from `tables` (the persistent batch). Input tokens listed in
    /// `inputs.source_rows` are first fed from `previous` on the device.
    /// `lora_slots`: each token's LoRA slot, for a LoRA bucket.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        backend: &B,
        model: &LlamaModel<B>,
        kv: &KvCache<B>,
        bucket: Bucket,
        inputs: &StepInputs,
        tables: &(impl BlockTableSource + ?Sized),
        previous: Option<&B::Sampled>,
        lora_slots: &[i32],
    ) -> Result<Tensor<B>, EngineError> {
        self.staging.fill(inputs, tables, bucket, self.block_size, lora_slots)?;
        self.stats.steps += 1;
        let batch = self.forward_batch(bucket)?;
        let b = bucket.batch;
        if let Some(buffer) = self.lora_tokens.as_ref().filter(|_| bucket.lora) {
            let capacity = lora_group_capacity(b, self.max_loras);
            let host = &mut self.staging.lora_tokens;
            LoraTokens::<B>::host_layout(&self.staging.lora_slots, Some(capacity), host);
            backend.write(&buffer.narrow(0, host.len())?, HostSlice::I32(host))?;
        }
        let padded = &self.staging;
        backend.write(&self.step_i32.narrow(0, padded.step_i32.len())?, HostSlice::I32(&padded.step_i32))?;
        backend.write(&batch.attn.slot_mapping, HostSlice::I64(&padded.slot_mapping))?;
        if let Some(previous) = previous.filter(|_| !inputs.source_rows.is_empty()) {
            // Fed outside the graph, into the buffer the graph reads its tokens from.
            let source_rows = self.source_rows.narrow(0, b)?;
            backend.write(&source_rows, HostSlice::I32(&padded.source_rows))?;
            backend.feed_sampled_tokens(previous, &source_rows, &batch.token_ids)?;
        }
        let logits = self.logits.narrow(0, bucket.batch)?;
        let forward = || model.forward_into(backend, &batch, kv, &logits);
        let state = self.buckets.get(&bucket);
        if let Some(BucketState::Recorded(graph)) = state {
            backend.replay(graph)?;
            self.stats.replays += 1;
        } else if matches!(state, Some(BucketState::Warm)) && backend.supports_graphs() {
            let mut model_error = None;
            let recorded = backend.capture(&mut || {
                forward().map_err(|e| {
                    let text = e.to_string();
                    model_error = Some(e);
                    BackendError::Device(text)
                })
            });
            if let Some(e) = model_error {
                return Err(e.into());
            }
            match recorded {
                Ok(graph) => {
                    backend.replay(&graph)?;
                    self.buckets.insert(bucket, BucketState::Recorded(graph));
                    self.stats.captures += 1;
                    self.stats.replays += 1;
                }
                Err(e) => {
                    tracing::warn!(?bucket, error = %e, "graph capture failed; this bucket runs eagerly");
                    self.buckets.insert(bucket, BucketState::Failed);
                    self.stats.failed += 1;
                    forward()?;
                }
            }
        } else {
            forward()?;
            if state.is_none() {
                self.buckets.insert(bucket, BucketState::Warm);
                self.stats.warmups += 1;
            }
        }
        Ok(self.logits.narrow(0, inputs.attn.num_seqs())?)
    }

    fn layout(&self) -> StepInputLayout {
        StepInputLayout { rows: self.max_batch.max(1) }
    }

    /// The forward inputs of `bucket`: views of the fixed buffers, with host
    /// metadata that describes the bucket's worst case (every sequence at the
    /// bucket's context), which is what the kernels are chosen for.
    fn forward_batch(&self, bucket: Bucket) -> Result<ForwardBatch<B>, ModelError> {
        let (b, width) = (bucket.batch, bucket.table_width(self.block_size));
        let host = AttentionHostMetadata {
            query_start_loc: (0..=b as i32).collect(),
            seq_lens: vec![bucket.context as i32; b],
            block_tables: vec![0; b * width],
            max_blocks_per_seq: width,
            slot_mapping: vec![-1; b],
            num_decode_seqs: b,
        };
        let layout = self.layout();
        Ok(ForwardBatch {
            token_ids: self.step_i32.narrow(layout.token_ids(), b)?,
            positions: self.step_i32.narrow(layout.positions(), b)?,
            attn: AttentionMetadata {
                host,
                query_start_loc: self.query_start_loc.narrow(0, b + 1)?,
                seq_lens: self.step_i32.narrow(layout.seq_lens(), b)?,
                block_tables: self.step_i32.narrow(layout.block_tables(), b * width)?.reshape(&[b, width])?,
                slot_mapping: self.slot_mapping.narrow(0, b)?,
            },
            logits_indices: self.logits_indices.narrow(0, b)?,
            lora: match (&self.lora_tokens, bucket.lora) {
                (Some(buffer), true) => {
                    Some(LoraTokens::views(buffer, b, lora_group_capacity(b, self.max_loras))?)
                }
                _ => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagoda_paged_kv::BlockId;

    #[test]
    fn capture_sizes_are_1_2_4_then_multiples_of_8() {
        assert_eq!(capture_sizes(20).collect::<Vec<_>>(), vec![1, 2, 4, 8, 16]);
        assert_eq!(capture_sizes(256).count(), 3 + 32);
        assert_eq!(capture_sizes(0).count(), 0);
    }

    #[test]
    fn buckets_round_batch_and_context_up() {
        assert_eq!(
            Bucket::for_step(1, 577, 256, 8192),
            Some(Bucket { batch: 1, context: 1024, lora: false })
        );
        assert_eq!(Bucket::for_step(3, 10, 256, 8192), Some(Bucket { batch: 4, context: 256, lora: false }));
        assert_eq!(
            Bucket::for_step(9, 4097, 256, 8192),
            Some(Bucket { batch: 16, context: 8192, lora: false })
        );
        // The context bucket never exceeds the longest sequence the engine runs.
        assert_eq!(
            Bucket::for_step(1, 1500, 256, 2000),
            Some(Bucket { batch: 1, context: 2000, lora: false })
        );
        assert_eq!(Bucket::for_step(257, 10, 256, 8192), None);
        assert_eq!(Bucket::for_step(2, 2001, 256, 2000), None);
        assert_eq!(Bucket { batch: 1, context: 2000, lora: false }.table_width(16), 125);
    }

    fn decode_step(seq_lens: &[i32], block_size: usize) -> StepInputs {
        let mut s = StepInputs::default();
        let width = seq_lens.iter().map(|&l| (l as usize).div_ceil(block_size)).max().unwrap() + 1;
        s.attn.max_blocks_per_seq = width;
        s.attn.num_decode_seqs = seq_lens.len();
        s.attn.query_start_loc.push(0);
        for (i, &len) in seq_lens.iter().enumerate() {
            s.token_ids.push(100 + i as u32);
            s.positions.push(len - 1);
            s.attn.seq_lens.push(len);
            s.attn.query_start_loc.push(i as i32 + 1);
            s.attn.slot_mapping.push((1000 * (i as i64 + 1)) * block_size as i64 + (len as i64 - 1));
            s.logits_indices.push(i as i32);
        }
        s
    }

    /// Distinct block ids per sequence, one spare entry past the context.
    fn tables(seq_lens: &[i32], block_size: usize) -> Vec<Vec<BlockId>> {
        let width = seq_lens.iter().map(|&l| (l as usize).div_ceil(block_size)).max().unwrap() + 1;
        (0..seq_lens.len() as u32).map(|i| (0..width as u32).map(|j| 1000 * (i + 1) + j).collect()).collect()
    }

    #[test]
    fn padding_keeps_real_rows_and_makes_harmless_ones() {
        let inputs = decode_step(&[5, 40, 17], 16);
        assert!(is_graphable(&inputs));
        let bucket = Bucket::for_step(3, 40, 256, 4096).unwrap();
        assert_eq!(bucket, Bucket { batch: 4, context: 256, lora: false });
        let p = PaddedDecodeInputs::new(&inputs, &tables(&[5, 40, 17], 16)[..], bucket, 16).unwrap();
        assert_eq!(p.token_ids(), vec![100, 101, 102, 0]);
        assert_eq!(p.positions(), vec![4, 39, 16, 0]);
        assert_eq!(p.seq_lens(), vec![5, 40, 17, 1]);
        assert_eq!(p.source_rows(), vec![-1; 4], "nothing fed");
        assert_eq!(p.slot_mapping()[..3], inputs.attn.slot_mapping[..]);
        assert_eq!(p.slot_mapping()[3], -1, "a padding row writes no cache slot");
        let width = bucket.table_width(16);
        let block_tables = p.block_tables();
        assert_eq!(block_tables.len(), 4 * width);
        assert_eq!(block_tables[..1], [1000]);
        assert_eq!(block_tables[width..width + 3], [2000, 2001, 2002]);
        assert_eq!(block_tables[2 * width..2 * width + 2], [3000, 3001]);
        // Entries past each context (and the whole padding row) point at block 0.
        assert!(block_tables[1..width].iter().all(|&b| b == 0));
        assert!(block_tables[3 * width..].iter().all(|&b| b == 0));
    }

    #[test]
    fn reused_buffers_forget_the_step_before() {
        let mut p = PaddedDecodeInputs::with_rows(8);
        let bucket = Bucket { batch: 4, context: 256, lora: false };
        let long = [5, 40, 17];
        p.fill(&decode_step(&long, 16), &tables(&long, 16)[..], bucket, 16, &[]).unwrap();
        let short = [3];
        p.fill(&decode_step(&short, 16), &tables(&short, 16)[..], bucket, 16, &[]).unwrap();
        let fresh =
            PaddedDecodeInputs::new(&decode_step(&short, 16), &tables(&short, 16)[..], bucket, 16).unwrap();
        assert_eq!(p.token_ids(), fresh.token_ids());
        assert_eq!(p.seq_lens(), vec![3, 1, 1, 1]);
        assert_eq!(p.block_tables(), fresh.block_tables());
        assert_eq!(p.slot_mapping(), fresh.slot_mapping());
        // A table shorter than its context is refused, not read past.
        let err = p.fill(&decode_step(&[40], 16), &[vec![7]][..], bucket, 16, &[]);
        assert!(err.is_err());
    }

    #[test]
    fn fed_rows_are_padded_with_rows_that_take_nothing() {
        let mut inputs = decode_step(&[5, 40, 17], 16);
        inputs.source_rows = vec![2, -1, 0];
        let bucket = Bucket { batch: 4, context: 256, lora: false };
        let p = PaddedDecodeInputs::new(&inputs, &tables(&[5, 40, 17], 16)[..], bucket, 16).unwrap();
        assert_eq!(p.source_rows(), vec![2, -1, 0, -1]);
    }

    #[test]
    fn only_plain_decode_steps_are_graphable() {
        let mut fork = decode_step(&[5, 6], 16);
        fork.logits_indices = vec![0, 0, 1];
        assert!(!is_graphable(&fork), "a fork samples one row twice");
        let mut inputs = decode_step(&[5, 6], 16);
        inputs.attn.num_decode_seqs = 1;
        assert!(!is_graphable(&inputs), "a step with a prefill");
        let mut prefill = decode_step(&[5], 16);
        prefill.token_ids.push(7);
        assert!(!is_graphable(&prefill));
        assert!(!is_graphable(&StepInputs::default()));
    }

    #[test]
    fn a_step_larger_than_its_bucket_is_refused() {
        let inputs = decode_step(&[5, 300], 16);
        let tables = tables(&[5, 300], 16);
        let err =
            PaddedDecodeInputs::new(&inputs, &tables[..], Bucket { batch: 2, context: 256, lora: false }, 16);
        assert!(err.is_err());
        let err =
            PaddedDecodeInputs::new(&inputs, &tables[..], Bucket { batch: 1, context: 512, lora: false }, 16);
        assert!(err.is_err());
    }
}
