//! Tensor parallelism (Megatron style, as vLLM shards a Llama): which heads
//! and FFN columns one rank of `world` holds, the shape rules that decide
//! whether a model can be split that way, and the cutting of a checkpoint's
//! tensors into a rank's share at load.
//!
//! Per layer a rank holds the q heads `[r·Hq/N, (r+1)·Hq/N)`, the KV heads
//! those q heads read (a contiguous range; when `N > Hkv` each KV head is
//! held by the `N/Hkv` ranks whose q heads use it), the rows of q/k/v and
//! of gate/up for those heads and intermediate columns (column parallel:
//! no communication), and the matching input columns of o_proj and down (row
//! parallel: each rank's product is a partial sum, completed by one
//! all-reduce). Embedding, final norm and lm_head are replicated: at the
//! vocabularies this engine runs a full copy per rank costs less than the
//! gather a vocabulary-parallel head would need every step.

use std::borrow::Cow;
use std::ops::Range;

use pagoda_backend::{DType, HostSlice};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::WeightData;

/// One rank's share of a model split over `world` ranks. The whole model
/// (`world == 1`) is a shard too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpShard {
    rank: usize,
    world: usize,
    q_heads: Range<usize>,
    kv_heads: Range<usize>,
    intermediate: Range<usize>,
    head_dim: usize,
}

impl TpShard {
    /// Rank `rank`'s share of `config` split `world` ways, or
    /// [`ModelError::TensorParallel`] naming the size that does not divide
    /// (vLLM's rules: `num_attention_heads % world == 0`; `num_kv_heads %
    /// world == 0` or `world % num_kv_heads == 0`; `intermediate_size % world
    /// == 0`). `config` must have passed [`ModelConfig::validate`].
    pub fn new(config: &ModelConfig, rank: usize, world: usize) -> Result<Self> {
        let err = |detail: String| Err(ModelError::TensorParallel(detail));
        if world == 0 || rank >= world {
            return err(format!("rank {rank} of a tensor parallel size of {world}"));
        }
        let (hq, hkv, i) = (config.num_attention_heads, config.num_kv_heads, config.intermediate_size);
        if hq % world != 0 {
            return err(format!("num_attention_heads {hq} is not divisible by tensor parallel size {world}"));
        }
        if hkv % world != 0 && world % hkv != 0 {
            return err(format!(
                "num_kv_heads {hkv} and tensor parallel size {world}: one must divide the other \
                 (KV heads are split, or replicated when the size exceeds them)"
            ));
        }
        if i % world != 0 {
            return err(format!("intermediate_size {i} is not divisible by tensor parallel size {world}"));
        }
        let q_per_rank = hq / world;
        let kv_heads = if hkv >= world {
            let per_rank = hkv / world;
            rank * per_rank..(rank + 1) * per_rank
        } else {
            // world / hkv ranks share each KV head: the one their q heads read.
            let head = rank / (world / hkv);
            head..head + 1
        };
        let i_per_rank = i / world;
        Ok(Self {
            rank,
            world,
            q_heads: rank * q_per_rank..(rank + 1) * q_per_rank,
            kv_heads,
            intermediate: rank * i_per_rank..(rank + 1) * i_per_rank,
            head_dim: config.head_dim,
        })
    }

    /// The whole model, on one rank.
    pub(crate) fn whole(config: &ModelConfig) -> Self {
        Self {
            rank: 0,
            world: 1,
            q_heads: 0..config.num_attention_heads,
            kv_heads: 0..config.num_kv_heads,
            intermediate: 0..config.intermediate_size,
            head_dim: config.head_dim,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks the model is split over (1: not split).
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The query heads this rank computes, as indices into the model's heads.
    pub fn q_heads(&self) -> Range<usize> {
        self.q_heads.clone()
    }

    /// The KV heads this rank holds in its projections and its KV cache.
    pub fn kv_heads(&self) -> Range<usize> {
        self.kv_heads.clone()
    }

    /// The columns of the FFN's intermediate activation this rank computes.
    pub fn intermediate_columns(&self) -> Range<usize> {
        self.intermediate.clone()
    }

    pub fn num_q_heads(&self) -> usize {
        self.q_heads.len()
    }

    pub fn num_kv_heads(&self) -> usize {
        self.kv_heads.len()
    }

    pub fn intermediate_size(&self) -> usize {
        self.intermediate.len()
    }

    /// Rows of q (or of k, v) in this rank's fused q/k/v weight.
    pub(crate) fn q_rows(&self) -> Range<usize> {
        self.q_heads.start * self.head_dim..self.q_heads.end * self.head_dim
    }

    pub(crate) fn kv_rows(&self) -> Range<usize> {
        self.kv_heads.start * self.head_dim..self.kv_heads.end * self.head_dim
    }

    pub(crate) fn q_size(&self) -> usize {
        self.num_q_heads() * self.head_dim
    }

    pub(crate) fn qkv_size(&self) -> usize {
        (self.num_q_heads() + 2 * self.num_kv_heads()) * self.head_dim
    }
}

/// Host data of (part of) a weight, ready to upload: borrowed when it is one
/// contiguous run of the file, as a row range always is.
pub(crate) enum WeightPart<'a> {
    Bytes(Cow<'a, [u8]>, DType),
    F32(Cow<'a, [f32]>),
}

impl WeightPart<'_> {
    pub(crate) fn host_slice(&self) -> HostSlice<'_> {
        match self {
            WeightPart::Bytes(bytes, dtype) => HostSlice::Bytes(bytes, *dtype),
            WeightPart::F32(values) => HostSlice::F32(values),
        }
    }
}

/// Rows `rows` of a row-major tensor of `shape` (all of it for `0..shape[0]`).
pub(crate) fn weight_rows<'a>(
    data: &'a WeightData<'_>,
    shape: &[usize],
    rows: Range<usize>,
) -> WeightPart<'a> {
    let row: usize = shape[1..].iter().product();
    let elements = rows.start * row..rows.end * row;
    match data {
        WeightData::Borrowed(bytes, dtype) => {
            let size = dtype.size_in_bytes();
            WeightPart::Bytes(Cow::Borrowed(&bytes[elements.start * size..elements.end * size]), *dtype)
        }
        WeightData::Owned(values) => WeightPart::F32(Cow::Borrowed(&values[elements])),
    }
}

/// Columns `cols` of every row of a 2-D row-major tensor of `shape`: a copy,
/// `[shape[0], cols.len()]`.
pub(crate) fn weight_columns(
    data: &WeightData<'_>,
    shape: &[usize],
    cols: Range<usize>,
) -> WeightPart<'static> {
    let k = shape[1];
    match data {
        WeightData::Borrowed(bytes, dtype) => {
            let size = dtype.size_in_bytes();
            let part = bytes
                .chunks_exact(k * size)
                .flat_map(|row| &row[cols.start * size..cols.end * size])
                .copied()
                .collect();
            WeightPart::Bytes(Cow::Owned(part), *dtype)
        }
        WeightData::Owned(values) => {
            let part = values.chunks_exact(k).flat_map(|row| &row[cols.clone()]).copied().collect();
            WeightPart::F32(Cow::Owned(part))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hq: usize, hkv: usize, i: usize) -> ModelConfig {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64, "intermediate_size": i, "num_hidden_layers": 1,
            "num_attention_heads": hq, "num_key_value_heads": hkv, "head_dim": 8,
            "vocab_size": 16, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
        });
        ModelConfig::from_hf_json(&json).unwrap()
    }

    #[test]
    fn heads_split_and_kv_heads_follow_their_q_heads() {
        // SmolLM2 at 3: three q heads and one KV head each.
        let c = config(9, 3, 1536);
        let shards: Vec<_> = (0..3).map(|r| TpShard::new(&c, r, 3).unwrap()).collect();
        assert_eq!(shards[1].q_heads(), 3..6);
        assert_eq!(shards[1].kv_heads(), 1..2);
        assert_eq!(shards[2].intermediate_columns(), 1024..1536);
        // 4 q heads over 2 KV heads at 4 ranks: KV heads replicated in pairs.
        let c = config(4, 2, 128);
        for r in 0..4 {
            let s = TpShard::new(&c, r, 4).unwrap();
            let group = c.num_attention_heads / c.num_kv_heads;
            assert_eq!(s.kv_heads(), r / 2..r / 2 + 1);
            assert!(s.q_heads().all(|q| s.kv_heads().contains(&(q / group))));
        }
        assert_eq!(TpShard::new(&c, 0, 1).unwrap(), TpShard::whole(&c));
    }

    #[test]
    fn shapes_that_do_not_divide_are_named() {
        let err = |c: &ModelConfig, world| TpShard::new(c, 0, world).unwrap_err().to_string();
        assert!(err(&config(9, 3, 1536), 2).contains("num_attention_heads 9"));
        assert!(err(&config(12, 3, 1536), 2).contains("num_kv_heads 3"));
        assert!(err(&config(8, 4, 100), 8).contains("intermediate_size 100"));
        assert!(err(&config(8, 4, 128), 0).contains("tensor parallel size of 0"));
        assert!(TpShard::new(&config(8, 4, 128), 8, 8).is_err());
    }

    #[test]
    fn rows_and_columns_cut_borrowed_and_owned_weights_alike() {
        let values: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let shape = [3, 4];
        for data in [WeightData::Owned(values.clone()), WeightData::Borrowed(&bytes, DType::F32)] {
            assert_eq!(weight_rows(&data, &shape, 1..3).host_slice().to_f32_vec(), values[4..12]);
            assert_eq!(
                weight_columns(&data, &shape, 1..3).host_slice().to_f32_vec(),
                [1., 2., 5., 6., 9., 10.]
            );
        }
    }
}
