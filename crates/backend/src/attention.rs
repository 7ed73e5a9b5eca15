use crate::{Backend, BackendError, DType, HostSlice, Result, Tensor};

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Hugging Face's `rotate_half` (GPT-NeoX): dimension `i` pairs with `i + D/2`.
    Neox,
    /// GPT-J / original Meta layout: dimension `2i` pairs with `2i + 1`.
    Interleaved,
}

/// Host-side description of the sequences in one step. Sequences are ordered
/// decodes first: the first `num_decode_seqs` have exactly one query token.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttentionHostMetadata {
    /// `[num_seqs + 1]`: sequence `s` owns query rows `query_start_loc[s]..query_start_loc[s+1]`.
    pub query_start_loc: Vec<i32>,
    /// `[num_seqs]`: tokens of context after this step (cached prefix + new tokens).
    pub seq_lens: Vec<i32>,
    /// `[num_seqs * max_blocks_per_seq]`, row-major; unused entries are 0.
    pub block_tables: Vec<i32>,
    pub max_blocks_per_seq: usize,
    /// `[num_tokens]`: cache slot (`block * block_size + offset`) of each new token; -1 skips it.
    pub slot_mapping: Vec<i64>,
    pub num_decode_seqs: usize,
}

impl AttentionHostMetadata {
    pub fn num_seqs(&self) -> usize {
        self.seq_lens.len()
    }

    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }

    pub fn query_len(&self, seq: usize) -> usize {
        (self.query_start_loc[seq + 1] - self.query_start_loc[seq]) as usize
    }

    pub fn max_query_len(&self) -> usize {
        (0..self.num_seqs()).map(|s| self.query_len(s)).max().unwrap_or(0)
    }

    pub fn max_seq_len(&self) -> usize {
        self.seq_lens.iter().copied().max().unwrap_or(0).max(0) as usize
    }

    /// Checks internal consistency (lengths, ordering, decode prefix).
    pub fn validate(&self) -> Result<()> {
        let op = "attention metadata";
        let n = self.num_seqs();
        if self.query_start_loc.len() != n + 1 || self.query_start_loc.first() != Some(&0) {
            return Err(BackendError::shape(op, "query_start_loc must be num_seqs + 1 long and start at 0"));
        }
        if *self.query_start_loc.last().unwrap_or(&0) as usize != self.num_tokens() {
            return Err(BackendError::shape(op, "query_start_loc must end at num_tokens"));
        }
        if self.block_tables.len() != n * self.max_blocks_per_seq {
            return Err(BackendError::shape(op, "block_tables must be num_seqs * max_blocks_per_seq"));
        }
        if self.num_decode_seqs > n {
            return Err(BackendError::shape(op, "num_decode_seqs exceeds num_seqs"));
        }
        for s in 0..n {
            let q = self.query_start_loc[s + 1] - self.query_start_loc[s];
            if q < 0 || q > self.seq_lens[s] {
                return Err(BackendError::shape(
                    op,
                    format!("sequence {s}: query length {q} vs seq_len {}", self.seq_lens[s]),
                ));
            }
            if s < self.num_decode_seqs && q != 1 {
                return Err(BackendError::shape(op, format!("decode sequence {s} has {q} query tokens")));
            }
        }
        Ok(())
    }
}

/// Per-step attention inputs on the device, with their host originals.
pub struct AttentionMetadata<B: Backend> {
    pub host: AttentionHostMetadata,
    /// I32 `[num_seqs + 1]`.
    pub query_start_loc: Tensor<B>,
    /// I32 `[num_seqs]`.
    pub seq_lens: Tensor<B>,
    /// I32 `[num_seqs, max_blocks_per_seq]`.
    pub block_tables: Tensor<B>,
    /// I64 `[num_tokens]`.
    pub slot_mapping: Tensor<B>,
}

impl<B: Backend> AttentionMetadata<B> {
    /// Validates `host` and uploads it.
    pub fn upload(backend: &B, host: AttentionHostMetadata) -> Result<Self> {
        host.validate()?;
        let n = host.num_seqs();
        let query_start_loc = backend.upload(HostSlice::I32(&host.query_start_loc), &[n + 1], DType::I32)?;
        let seq_lens = backend.upload(HostSlice::I32(&host.seq_lens), &[n], DType::I32)?;
        let block_tables =
            backend.upload(HostSlice::I32(&host.block_tables), &[n, host.max_blocks_per_seq], DType::I32)?;
        let slot_mapping =
            backend.upload(HostSlice::I64(&host.slot_mapping), &[host.num_tokens()], DType::I64)?;
        Ok(Self { host, query_start_loc, seq_lens, block_tables, slot_mapping })
    }
}

/// Inputs of [`Backend::rotary_and_cache`].
///
/// For token `t` at position `p = positions[t]`: q (columns `0..Hq*D` of
/// `qkv`) and k (the next `Hkv*D` columns) are rotated by angle
/// `p * inv_freq[i]` (cos/sin read from `cos_sin[p]`), q is written to `q_out`,
/// and k and v (the last `Hkv*D` columns) go to cache slot
/// `slot_mapping[t]` of `k_cache`/`v_cache` unless it is negative.
pub struct RotaryCacheArgs<'a, B: Backend> {
    /// `[T, (Hq + 2*Hkv) * D]`.
    pub qkv: &'a Tensor<B>,
    /// I32 `[T]`.
    pub positions: &'a Tensor<B>,
    /// F32 `[max_positions, rotary_dim]`: `cos` in the first half of a row, `sin` in the second.
    pub cos_sin: &'a Tensor<B>,
    /// `[T, Hq * D]`.
    pub q_out: &'a Tensor<B>,
    /// `[num_blocks, Hkv, block_size, D]` each.
    pub k_cache: &'a Tensor<B>,
    pub v_cache: &'a Tensor<B>,
    /// I64 `[T]`.
    pub slot_mapping: &'a Tensor<B>,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Leading dimensions of each head that rotate (`head_dim` for Llama).
    pub rotary_dim: usize,
    pub style: RopeStyle,
}

/// Inputs of [`Backend::attention`].
///
/// Query row `i` of sequence `s` (query length `q`, context `L = seq_lens[s]`)
/// sits at position `L - q + i` and attends to cached positions `0..=L - q + i`
/// (or the last `sliding_window` of them) of its KV head `h / (Hq / Hkv)`, read
/// through `block_tables[s]`. The new keys and values are already in the cache.
pub struct AttentionArgs<'a, B: Backend> {
    /// `[T, Hq, D]` (or `[T, Hq * D]`).
    pub q: &'a Tensor<B>,
    pub k_cache: &'a Tensor<B>,
    pub v_cache: &'a Tensor<B>,
    /// Same shape as `q`.
    pub out: &'a Tensor<B>,
    pub meta: &'a AttentionMetadata<B>,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    pub sliding_window: Option<usize>,
}
