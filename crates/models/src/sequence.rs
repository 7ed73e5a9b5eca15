//! One sequence run directly on a model, with a trivial block table (blocks
//! `0, 1, 2, ...` in order, so a token's cache slot is its position). This is
//! for model-level tests, examples and benchmarks; the engine's scheduler
//! runs many sequences over a shared, paged cache.

use pagoda_backend::{AttentionHostMetadata, Backend, DType, SamplingParams, SamplingRow, Tensor, TokenId};

use crate::error::{ModelError, Result};
use crate::llama::{ForwardBatch, KvCache, LlamaModel};

/// A single sequence with its own KV cache.
pub struct SingleSequence<'m, B: Backend> {
    model: &'m LlamaModel<B>,
    kv: KvCache<B>,
    block_size: usize,
    capacity: usize,
    /// Tokens whose keys and values are in the cache.
    tokens: Vec<TokenId>,
    /// The LoRA slot its tokens run with ([`LlamaModel::enable_lora`]).
    lora_slot: Option<usize>,
}

impl<'m, B: Backend> SingleSequence<'m, B> {
    /// A sequence that can hold up to `capacity` tokens, its cache of the model's dtype.
    pub fn new(backend: &B, model: &'m LlamaModel<B>, capacity: usize, block_size: usize) -> Result<Self> {
        Self::with_kv_cache_dtype(backend, model, capacity, block_size, model.dtype())
    }

    /// [`SingleSequence::new`] with a cache of `dtype` (the model's, or F8E4M3:
    /// see [`LlamaModel::alloc_kv_cache`]).
    pub fn with_kv_cache_dtype(
        backend: &B,
        model: &'m LlamaModel<B>,
        capacity: usize,
        block_size: usize,
        dtype: DType,
    ) -> Result<Self> {
        if block_size == 0 || capacity == 0 {
            return Err(ModelError::Forward("capacity and block_size must be positive".into()));
        }
        let num_blocks = capacity.div_ceil(block_size);
        let kv = model.alloc_kv_cache(backend, num_blocks, block_size, dtype)?;
        Ok(Self {
            model,
            kv,
            block_size,
            capacity: num_blocks * block_size,
            tokens: Vec::new(),
            lora_slot: None,
        })
    }

    /// Runs the next steps with the adapter in this LoRA slot (`None`: the base model).
    pub fn set_lora_slot(&mut self, slot: Option<usize>) {
        self.lora_slot = slot;
    }

    /// Tokens processed so far.
    pub fn tokens(&self) -> &[TokenId] {
        &self.tokens
    }

    /// Runs `new_tokens` (a prefill chunk or one decode token) and returns the
    /// F32 logits `[n, V]` of the last `n_logits` of them.
    pub fn step(&mut self, backend: &B, new_tokens: &[TokenId], n_logits: usize) -> Result<Tensor<B>> {
        let start = self.tokens.len();
        let n = new_tokens.len();
        if n == 0 || n_logits > n {
            return Err(ModelError::Forward(format!("{n} new tokens, {n_logits} logits rows wanted")));
        }
        if start + n > self.capacity {
            return Err(ModelError::Forward(format!(
                "sequence of {} tokens exceeds its capacity of {}",
                start + n,
                self.capacity
            )));
        }
        let num_blocks = self.kv.shape.num_blocks;
        let attn = AttentionHostMetadata {
            query_start_loc: vec![0, n as i32],
            seq_lens: vec![(start + n) as i32],
            block_tables: (0..num_blocks as i32).collect(),
            max_blocks_per_seq: num_blocks,
            slot_mapping: (start..start + n).map(|p| p as i64).collect(),
            num_decode_seqs: usize::from(n == 1),
        };
        debug_assert_eq!(self.block_size, self.kv.shape.block_size);
        let positions: Vec<i32> = (start..start + n).map(|p| p as i32).collect();
        let logits_indices: Vec<i32> = (n - n_logits..n).map(|i| i as i32).collect();
        let mut batch = ForwardBatch::upload(backend, new_tokens, &positions, attn, &logits_indices)?;
        if let Some(slot) = self.lora_slot {
            batch = batch.with_lora_slots(backend, &vec![slot as i32; n])?;
        }
        let logits = self.model.forward(backend, &batch, &self.kv)?;
        self.tokens.extend_from_slice(new_tokens);
        Ok(logits)
    }

    /// Greedy decoding: feeds `prompt`, then up to `max_new_tokens` tokens,
    /// stopping after any of `stop_tokens`. Returns the generated tokens.
    pub fn generate_greedy(
        &mut self,
        backend: &B,
        prompt: &[TokenId],
        max_new_tokens: usize,
        stop_tokens: &[TokenId],
    ) -> Result<Vec<TokenId>> {
        let params = SamplingParams::greedy();
        let mut out = Vec::with_capacity(max_new_tokens);
        let mut next: Vec<TokenId> = prompt.to_vec();
        for step in 0..max_new_tokens {
            let logits = self.step(backend, &next, 1)?;
            let row = SamplingRow {
                params: &params,
                seed: 0,
                step: step as u64,
                prompt_tokens: prompt,
                output_tokens: &out,
                allowed_tokens: None,
            };
            let sampled = backend.sample(&logits, &[row])?;
            let token = sampled
                .first()
                .map(|s| s.token)
                .ok_or_else(|| ModelError::Forward("the backend sampled no token".into()))?;
            out.push(token);
            if stop_tokens.contains(&token) {
                break;
            }
            next = vec![token];
        }
        Ok(out)
    }
}
