use crate::{Backend, BackendError, DType, HostSlice, KvCacheShape, Result, Tensor};

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
///
/// FP8 caches (`F8E4M3`) store `e4m3(x / scale)` (round to nearest even,
/// saturating at ±448; the division an IEEE f32 division), with `x` the value
/// a cache of the activation dtype would store: the rotated k rounded to the
/// activation dtype (no rounding for F32), and v as it is; `scale` is
/// `kv_scales[0]` for K and `kv_scales[1]` for V.
pub struct RotaryCacheArgs<'a, B: Backend> {
    /// `[T, (Hq + 2*Hkv) * D]`.
    pub qkv: &'a Tensor<B>,
    /// I32 `[T]`.
    pub positions: &'a Tensor<B>,
    /// F32 `[max_positions, rotary_dim]`: `cos` in the first half of a row, `sin` in the second.
    pub cos_sin: &'a Tensor<B>,
    /// `[T, Hq * D]`.
    pub q_out: &'a Tensor<B>,
    /// `[num_blocks, Hkv, block_size, D]` each, of qkv's dtype or both F8E4M3.
    pub k_cache: &'a Tensor<B>,
    pub v_cache: &'a Tensor<B>,
    /// F32 `[2]`: the K scale and the V scale of F8E4M3 caches (on the
    /// device, so a recorded graph reads whatever they hold); only with
    /// F8E4M3 caches, where `None` means both are 1.0 (vLLM's default).
    pub kv_scales: Option<&'a Tensor<B>>,
    /// I64 `[T]`.
    pub slot_mapping: &'a Tensor<B>,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Leading dimensions of each head that rotate (`head_dim` for Llama).
    pub rotary_dim: usize,
    pub style: RopeStyle,
}

/// What [`RotaryCacheArgs::check`] found: the step's tokens, the rows of the
/// cos/sin table, and the cache's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotaryShape {
    pub num_tokens: usize,
    pub max_positions: usize,
    pub cache: KvCacheShape,
}

impl<B: Backend> RotaryCacheArgs<'_, B> {
    /// The argument checks every backend makes before it rotates anything:
    /// positive head counts and head size, an even `rotary_dim` of at most
    /// `head_dim`, every operand's shape and dtype (qkv and q_out one float
    /// dtype, the caches that dtype or both F8E4M3, scales only with F8E4M3
    /// caches and F32 `[2]`; positions I32, slot mapping I64, cos/sin F32),
    /// and outputs that share no storage with an input or overlap each other.
    /// Values on the device (positions, slots, scales) are the backend's to
    /// check.
    pub fn check(&self) -> Result<RotaryShape> {
        const OP: &str = "rotary_and_cache";
        let (hq, hkv, d, rd) = (self.num_q_heads, self.num_kv_heads, self.head_dim, self.rotary_dim);
        if hq == 0 || hkv == 0 || d == 0 {
            return Err(BackendError::shape(
                OP,
                format!("heads {hq}/{hkv} and head_dim {d} must be positive"),
            ));
        }
        if rd % 2 != 0 || rd > d {
            return Err(BackendError::shape(
                OP,
                format!("rotary_dim {rd} must be even and at most head_dim {d}"),
            ));
        }
        let (t, width) = self.qkv.rows_cols(OP, "qkv")?;
        if width != (hq + 2 * hkv) * d {
            return Err(BackendError::shape(
                OP,
                format!(
                    "qkv: expected {t} rows of (Hq + 2 Hkv) * D = {}, got {:?}",
                    (hq + 2 * hkv) * d,
                    self.qkv.dims()
                ),
            ));
        }
        self.positions.expect_dims(OP, "positions", &[t])?;
        self.positions.expect_dtype(OP, DType::I32)?;
        self.slot_mapping.expect_dims(OP, "slot_mapping", &[t])?;
        self.slot_mapping.expect_dtype(OP, DType::I64)?;
        self.cos_sin.expect_dtype(OP, DType::F32)?;
        let (max_positions, table_width) = self.cos_sin.dims2(OP)?;
        if table_width != rd {
            return Err(BackendError::shape(
                OP,
                format!("cos_sin: expected rows of rotary_dim = {rd}, got {:?}", self.cos_sin.dims()),
            ));
        }
        self.q_out.expect_rows_cols(OP, "q_out", t, hq * d)?;
        let cache = kv_cache_shape(OP, self.k_cache, self.v_cache, hkv, d)?;
        expect_float_operands(OP, self.qkv, &[self.q_out])?;
        check_kv_cache_dtype(OP, self.qkv.dtype(), self.k_cache, self.v_cache, self.kv_scales)?;
        let outputs = [self.q_out, self.k_cache, self.v_cache];
        for (i, o) in outputs.iter().enumerate() {
            let inputs = [self.qkv, self.positions, self.cos_sin, self.slot_mapping];
            let scales = self.kv_scales.is_some_and(|x| x.shares_storage(o));
            if scales
                || inputs.iter().any(|x| x.shares_storage(o))
                || outputs[..i].iter().any(|p| p.overlaps(o))
            {
                return Err(BackendError::Aliasing { op: OP });
            }
        }
        Ok(RotaryShape { num_tokens: t, max_positions, cache })
    }
}

/// Inputs of [`Backend::attention`].
///
/// Query row `i` of sequence `s` (query length `q`, context `L = seq_lens[s]`)
/// sits at position `L - q + i` and attends to cached positions `0..=L - q + i`
/// (or the last `sliding_window` of them) of its KV head `h / (Hq / Hkv)`, read
/// through `block_tables[s]`. The new keys and values are already in the cache.
///
/// F8E4M3 caches are read as `e4m3_to_f32(code) * scale` (K's scale
/// `kv_scales[0]`, V's `kv_scales[1]`): the inverse of what
/// [`Backend::rotary_and_cache`] stores, up to the E4M3 rounding.
pub struct AttentionArgs<'a, B: Backend> {
    /// `[T, Hq, D]` (or `[T, Hq * D]`).
    pub q: &'a Tensor<B>,
    /// `[num_blocks, Hkv, block_size, D]` each, of q's dtype or both F8E4M3.
    pub k_cache: &'a Tensor<B>,
    pub v_cache: &'a Tensor<B>,
    /// F32 `[2]`, K's scale then V's, only with F8E4M3 caches; `None`: 1.0
    /// (see [`RotaryCacheArgs::kv_scales`]).
    pub kv_scales: Option<&'a Tensor<B>>,
    /// Same shape as `q`.
    pub out: &'a Tensor<B>,
    pub meta: &'a AttentionMetadata<B>,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Usually `1 / sqrt(head_dim)`; positive and finite.
    pub scale: f32,
    /// At least 1 when set.
    pub sliding_window: Option<usize>,
}

impl<B: Backend> AttentionArgs<'_, B> {
    /// The argument checks every backend makes before it attends: head counts
    /// (query heads a positive multiple of KV heads), the window and scale,
    /// q with one row of `Hq * D` per token of the step, `out` shaped as `q`,
    /// both caches `[num_blocks, Hkv, block_size, D]`, the metadata tensors
    /// shaped as their host copy, one float dtype for q and `out`, caches of
    /// that dtype or both F8E4M3 (scales only then, F32 `[2]`), an `out` that
    /// shares no storage with an input, and every sequence
    /// length within what its block table holds ([`BackendError::Index`]).
    /// Block-table entries on the device are the backend's to check.
    pub fn check(&self) -> Result<KvCacheShape> {
        const OP: &str = "attention";
        let (hq, hkv, d) = (self.num_q_heads, self.num_kv_heads, self.head_dim);
        if hq == 0 || hkv == 0 || d == 0 || hq % hkv != 0 {
            return Err(BackendError::shape(
                OP,
                format!("{hq} query heads over {hkv} KV heads of dim {d}: need a positive multiple"),
            ));
        }
        if self.sliding_window == Some(0) {
            return Err(BackendError::shape(OP, "a sliding window of 0 sees nothing"));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(BackendError::shape(OP, format!("softmax scale {} (must be positive)", self.scale)));
        }
        let host = &self.meta.host;
        let (n, t, max_blocks) = (host.num_seqs(), host.num_tokens(), host.max_blocks_per_seq);
        self.q.expect_rows_cols(OP, "q", t, hq * d)?;
        self.out.expect_dims(OP, "out", self.q.dims())?;
        let cache = kv_cache_shape(OP, self.k_cache, self.v_cache, hkv, d)?;
        if host.query_start_loc.len() != n + 1
            || host.block_tables.len() != n * max_blocks
            || host.num_decode_seqs > n
        {
            return Err(BackendError::shape(
                OP,
                "host metadata: query_start_loc, block_tables or num_decode_seqs disagree with seq_lens",
            ));
        }
        let meta = [
            (&self.meta.query_start_loc, "query_start_loc", &[n + 1][..]),
            (&self.meta.seq_lens, "seq_lens", &[n][..]),
            (&self.meta.block_tables, "block_tables", &[n, max_blocks][..]),
        ];
        for (tensor, what, dims) in meta {
            tensor.expect_dims(OP, what, dims)?;
            tensor.expect_dtype(OP, DType::I32)?;
        }
        expect_float_operands(OP, self.q, &[self.out])?;
        check_kv_cache_dtype(OP, self.q.dtype(), self.k_cache, self.v_cache, self.kv_scales)?;
        let m = self.meta;
        let inputs = [self.q, self.k_cache, self.v_cache, &m.query_start_loc, &m.seq_lens, &m.block_tables];
        if inputs.iter().chain(&self.kv_scales).any(|x| x.shares_storage(self.out)) {
            return Err(BackendError::Aliasing { op: OP });
        }
        let capacity = max_blocks * cache.block_size;
        if let Some((s, &len)) =
            host.seq_lens.iter().enumerate().find(|&(_, &l)| l < 0 || l as usize > capacity)
        {
            return Err(BackendError::Index {
                op: OP,
                detail: format!("sequence {s}: {len} tokens but its block table holds {capacity}"),
            });
        }
        Ok(cache)
    }
}

/// The shape of a `[num_blocks, Hkv, block_size, D]` K cache (block_size > 0)
/// with a V cache of the same dims.
fn kv_cache_shape<B: Backend>(
    op: &'static str,
    k_cache: &Tensor<B>,
    v_cache: &Tensor<B>,
    num_kv_heads: usize,
    head_dim: usize,
) -> Result<KvCacheShape> {
    let shape = match *k_cache.dims() {
        [num_blocks, h, block_size, dd] if h == num_kv_heads && dd == head_dim && block_size > 0 => {
            KvCacheShape { num_blocks, num_kv_heads, block_size, head_dim }
        }
        _ => {
            return Err(BackendError::shape(
                op,
                format!(
                    "k_cache: expected [num_blocks, {num_kv_heads}, block_size > 0, {head_dim}], got {:?}",
                    k_cache.dims()
                ),
            ))
        }
    };
    v_cache.expect_dims(op, "v_cache", k_cache.dims())?;
    Ok(shape)
}

/// Caches of the activation dtype `act`, or both F8E4M3; scales only with
/// F8E4M3 caches, F32 `[2]`.
fn check_kv_cache_dtype<B: Backend>(
    op: &'static str,
    act: DType,
    k_cache: &Tensor<B>,
    v_cache: &Tensor<B>,
    kv_scales: Option<&Tensor<B>>,
) -> Result<()> {
    let cache = k_cache.dtype();
    if cache != act && cache != DType::F8E4M3 {
        return Err(BackendError::DType { op, dtype: cache });
    }
    v_cache.expect_dtype(op, cache)?;
    if let Some(scales) = kv_scales {
        if cache != DType::F8E4M3 {
            return Err(BackendError::shape(
                op,
                format!("kv_scales given for {cache:?} caches (only F8E4M3 caches are scaled)"),
            ));
        }
        scales.expect_dtype(op, DType::F32)?;
        scales.expect_dims(op, "kv_scales", &[2])?;
    }
    Ok(())
}

/// `first` is a float tensor and every one of `others` has its dtype.
fn expect_float_operands<B: Backend>(
    op: &'static str,
    first: &Tensor<B>,
    others: &[&Tensor<B>],
) -> Result<()> {
    if !first.dtype().is_float() {
        return Err(BackendError::DType { op, dtype: first.dtype() });
    }
    match others.iter().find(|o| o.dtype() != first.dtype()) {
        Some(o) => Err(BackendError::DType { op, dtype: o.dtype() }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{metadata, tensor, Shapes};

    fn is_shape(r: &Result<impl std::fmt::Debug>, names: &str) -> bool {
        matches!(r, Err(e @ BackendError::Shape { .. }) if e.to_string().contains(names))
    }

    /// 3 tokens, 4 q heads and 2 KV heads of 8 dims, 5 blocks of 4 slots, rotary_dim 8.
    struct Rotary {
        qkv: Tensor<Shapes>,
        positions: Tensor<Shapes>,
        cos_sin: Tensor<Shapes>,
        q_out: Tensor<Shapes>,
        k_cache: Tensor<Shapes>,
        v_cache: Tensor<Shapes>,
        slot_mapping: Tensor<Shapes>,
    }

    impl Rotary {
        fn new() -> Self {
            Self {
                qkv: tensor(&[3, 64], DType::BF16),
                positions: tensor(&[3], DType::I32),
                cos_sin: tensor(&[100, 8], DType::F32),
                q_out: tensor(&[3, 4, 8], DType::BF16),
                k_cache: tensor(&[5, 2, 4, 8], DType::BF16),
                v_cache: tensor(&[5, 2, 4, 8], DType::BF16),
                slot_mapping: tensor(&[3], DType::I64),
            }
        }

        fn args(&self) -> RotaryCacheArgs<'_, Shapes> {
            RotaryCacheArgs {
                qkv: &self.qkv,
                positions: &self.positions,
                cos_sin: &self.cos_sin,
                q_out: &self.q_out,
                k_cache: &self.k_cache,
                v_cache: &self.v_cache,
                kv_scales: None,
                slot_mapping: &self.slot_mapping,
                num_q_heads: 4,
                num_kv_heads: 2,
                head_dim: 8,
                rotary_dim: 8,
                style: RopeStyle::Neox,
            }
        }
    }

    #[test]
    fn rotary_check_returns_the_shapes_of_good_arguments() {
        let r = Rotary::new();
        let cache = KvCacheShape { num_blocks: 5, num_kv_heads: 2, block_size: 4, head_dim: 8 };
        assert_eq!(r.args().check().unwrap(), RotaryShape { num_tokens: 3, max_positions: 100, cache });
        // A partial rotary_dim with its narrower table.
        let table = tensor(&[100, 4], DType::F32);
        assert!(RotaryCacheArgs { rotary_dim: 4, cos_sin: &table, ..r.args() }.check().is_ok());
    }

    #[test]
    fn rotary_check_names_the_operand_and_its_expected_shape() {
        let r = Rotary::new();
        let a = || r.args();
        assert!(is_shape(&RotaryCacheArgs { num_kv_heads: 0, ..a() }.check(), "must be positive"));
        assert!(is_shape(&RotaryCacheArgs { rotary_dim: 7, ..a() }.check(), "rotary_dim 7"));
        assert!(is_shape(&RotaryCacheArgs { rotary_dim: 10, ..a() }.check(), "at most head_dim 8"));
        assert!(is_shape(&RotaryCacheArgs { num_kv_heads: 1, ..a() }.check(), "qkv: expected 3 rows of"));
        let short = tensor(&[2], DType::I32);
        assert!(is_shape(&RotaryCacheArgs { positions: &short, ..a() }.check(), "positions: expected [3]"));
        let slots = tensor(&[4], DType::I64);
        assert!(is_shape(
            &RotaryCacheArgs { slot_mapping: &slots, ..a() }.check(),
            "slot_mapping: expected [3]"
        ));
        let table = tensor(&[100, 6], DType::F32);
        assert!(is_shape(&RotaryCacheArgs { cos_sin: &table, ..a() }.check(), "cos_sin: expected rows of"));
        let q_out = tensor(&[3, 8, 8], DType::BF16);
        assert!(is_shape(&RotaryCacheArgs { q_out: &q_out, ..a() }.check(), "q_out: expected 3 rows of 32"));
        let cache = tensor(&[5, 4, 2, 8], DType::BF16);
        let want = "k_cache: expected [num_blocks, 2, block_size > 0, 8], got [5, 4, 2, 8]";
        assert!(is_shape(&RotaryCacheArgs { k_cache: &cache, ..a() }.check(), want));
        let empty_blocks = tensor(&[5, 2, 0, 8], DType::BF16);
        assert!(is_shape(&RotaryCacheArgs { k_cache: &empty_blocks, ..a() }.check(), "k_cache"));
        let v = tensor(&[6, 2, 4, 8], DType::BF16);
        assert!(is_shape(&RotaryCacheArgs { v_cache: &v, ..a() }.check(), "v_cache: expected [5, 2, 4, 8]"));
    }

    #[test]
    fn rotary_check_refuses_wrong_dtypes_and_aliasing() {
        let r = Rotary::new();
        let a = || r.args();
        let dtype = |res: Result<RotaryShape>, want: DType| matches!(res, Err(BackendError::DType { dtype, .. }) if dtype == want);
        let i64_positions = tensor(&[3], DType::I64);
        assert!(dtype(RotaryCacheArgs { positions: &i64_positions, ..a() }.check(), DType::I64));
        let i32_slots = tensor(&[3], DType::I32);
        assert!(dtype(RotaryCacheArgs { slot_mapping: &i32_slots, ..a() }.check(), DType::I32));
        let bf16_table = tensor(&[100, 8], DType::BF16);
        assert!(dtype(RotaryCacheArgs { cos_sin: &bf16_table, ..a() }.check(), DType::BF16));
        let f16_out = tensor(&[3, 32], DType::F16);
        assert!(dtype(RotaryCacheArgs { q_out: &f16_out, ..a() }.check(), DType::F16));
        let int_qkv = tensor(&[3, 64], DType::I32);
        assert!(dtype(RotaryCacheArgs { qkv: &int_qkv, ..a() }.check(), DType::I32));

        let aliased = |res: Result<RotaryShape>| matches!(res, Err(BackendError::Aliasing { .. }));
        // q_out written over the qkv it reads.
        let q_out = r.qkv.reshape(&[6, 32]).unwrap().narrow(0, 3).unwrap();
        assert!(aliased(RotaryCacheArgs { q_out: &q_out, ..a() }.check()));
        // The same cache for K and V; then K and V as the two halves of one allocation.
        assert!(aliased(RotaryCacheArgs { v_cache: &r.k_cache, ..a() }.check()));
        let both = tensor(&[10, 2, 4, 8], DType::BF16);
        let (k, v) = (both.narrow(0, 5).unwrap(), both.narrow(5, 5).unwrap());
        assert!(RotaryCacheArgs { k_cache: &k, v_cache: &v, ..a() }.check().is_ok());
        let overlapping = both.narrow(4, 5).unwrap();
        assert!(aliased(RotaryCacheArgs { k_cache: &k, v_cache: &overlapping, ..a() }.check()));
    }

    /// A decode of 9 tokens of context and a prefill of 3 new tokens after 2
    /// cached: 4 q heads over 2 KV heads of 8 dims, 3 blocks of 4 slots each.
    fn host() -> AttentionHostMetadata {
        AttentionHostMetadata {
            query_start_loc: vec![0, 1, 4],
            seq_lens: vec![9, 5],
            block_tables: vec![0, 1, 2, 3, 4, 0],
            max_blocks_per_seq: 3,
            slot_mapping: vec![8, 15, 16, 17],
            num_decode_seqs: 1,
        }
    }

    struct Attention {
        q: Tensor<Shapes>,
        k_cache: Tensor<Shapes>,
        v_cache: Tensor<Shapes>,
        out: Tensor<Shapes>,
        meta: AttentionMetadata<Shapes>,
    }

    impl Attention {
        fn new(host: AttentionHostMetadata) -> Self {
            Self {
                q: tensor(&[4, 4, 8], DType::F16),
                k_cache: tensor(&[6, 2, 4, 8], DType::F16),
                v_cache: tensor(&[6, 2, 4, 8], DType::F16),
                out: tensor(&[4, 4, 8], DType::F16),
                meta: metadata(host),
            }
        }

        fn args(&self) -> AttentionArgs<'_, Shapes> {
            AttentionArgs {
                q: &self.q,
                k_cache: &self.k_cache,
                v_cache: &self.v_cache,
                kv_scales: None,
                out: &self.out,
                meta: &self.meta,
                num_q_heads: 4,
                num_kv_heads: 2,
                head_dim: 8,
                scale: 0.35,
                sliding_window: None,
            }
        }
    }

    #[test]
    fn attention_check_returns_the_cache_shape_of_good_arguments() {
        let at = Attention::new(host());
        let want = KvCacheShape { num_blocks: 6, num_kv_heads: 2, block_size: 4, head_dim: 8 };
        assert_eq!(at.args().check().unwrap(), want);
        // q and out may be [T, Hq * D] as well as [T, Hq, D].
        let (q, out) = (tensor(&[4, 32], DType::F16), tensor(&[4, 32], DType::F16));
        assert!(AttentionArgs { q: &q, out: &out, sliding_window: Some(3), ..at.args() }.check().is_ok());
    }

    #[test]
    fn attention_check_names_the_operand_and_its_expected_shape() {
        let at = Attention::new(host());
        let a = || at.args();
        assert!(is_shape(&AttentionArgs { num_kv_heads: 3, ..a() }.check(), "4 query heads over 3 KV heads"));
        assert!(is_shape(&AttentionArgs { num_q_heads: 0, ..a() }.check(), "need a positive multiple"));
        assert!(is_shape(&AttentionArgs { sliding_window: Some(0), ..a() }.check(), "window of 0"));
        for scale in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(is_shape(&AttentionArgs { scale, ..a() }.check(), "must be positive"), "{scale}");
        }
        let q = tensor(&[5, 4, 8], DType::F16);
        assert!(is_shape(&AttentionArgs { q: &q, ..a() }.check(), "q: expected 4 rows of 32"));
        let out = tensor(&[4, 32], DType::F16);
        assert!(is_shape(&AttentionArgs { out: &out, ..a() }.check(), "out: expected [4, 4, 8]"));
        let k = tensor(&[6, 2, 4, 16], DType::F16);
        assert!(is_shape(&AttentionArgs { k_cache: &k, ..a() }.check(), "k_cache: expected [num_blocks, 2"));
        let v = tensor(&[6, 2, 8, 8], DType::F16);
        assert!(is_shape(&AttentionArgs { v_cache: &v, ..a() }.check(), "v_cache: expected [6, 2, 4, 8]"));

        let mut bad_meta = metadata(host());
        bad_meta.seq_lens = tensor(&[3], DType::I32);
        assert!(is_shape(&AttentionArgs { meta: &bad_meta, ..a() }.check(), "seq_lens: expected [2]"));
        let mut bad_meta = metadata(host());
        bad_meta.block_tables = tensor(&[2, 2], DType::I32);
        assert!(is_shape(&AttentionArgs { meta: &bad_meta, ..a() }.check(), "block_tables: expected [2, 3]"));
        let mut bad_meta = metadata(host());
        bad_meta.host.query_start_loc.pop();
        assert!(is_shape(&AttentionArgs { meta: &bad_meta, ..a() }.check(), "host metadata"));
        let mut bad_meta = metadata(host());
        bad_meta.query_start_loc = tensor(&[3], DType::I64);
        assert!(matches!(
            AttentionArgs { meta: &bad_meta, ..a() }.check(),
            Err(BackendError::DType { dtype: DType::I64, .. })
        ));
    }

    #[test]
    fn attention_check_refuses_wrong_dtypes_aliasing_and_overlong_sequences() {
        let at = Attention::new(host());
        let a = || at.args();
        let bf16_out = tensor(&[4, 4, 8], DType::BF16);
        assert!(matches!(
            AttentionArgs { out: &bf16_out, ..a() }.check(),
            Err(BackendError::DType { dtype: DType::BF16, .. })
        ));
        let int_q = tensor(&[4, 4, 8], DType::I32);
        assert!(matches!(AttentionArgs { q: &int_q, ..a() }.check(), Err(BackendError::DType { .. })));
        // out over q; K and V may be one tensor (both are read).
        assert!(matches!(AttentionArgs { out: &at.q, ..a() }.check(), Err(BackendError::Aliasing { .. })));
        assert!(AttentionArgs { v_cache: &at.k_cache, ..a() }.check().is_ok());

        let index = |host: AttentionHostMetadata, what: &str| {
            let at = Attention::new(host);
            let r = at.args().check();
            matches!(&r, Err(e @ BackendError::Index { .. }) if e.to_string().contains(what))
        };
        // 3 blocks of 4 slots hold 12 tokens.
        assert!(index(AttentionHostMetadata { seq_lens: vec![13, 5], ..host() }, "sequence 0: 13 tokens"));
        assert!(index(AttentionHostMetadata { seq_lens: vec![9, -1], ..host() }, "sequence 1: -1 tokens"));
        let full = AttentionHostMetadata { seq_lens: vec![12, 12], ..host() };
        assert!(Attention::new(full).args().check().is_ok());
    }

    #[test]
    fn fp8_caches_take_scales_and_mixed_or_unscaled_misuse_is_refused() {
        let dtype = |res: Result<RotaryShape>, want: DType| matches!(res, Err(BackendError::DType { dtype, .. }) if dtype == want);
        let r = Rotary::new();
        let (k8, v8) = (tensor(&[5, 2, 4, 8], DType::F8E4M3), tensor(&[5, 2, 4, 8], DType::F8E4M3));
        let scales = tensor(&[2], DType::F32);
        let fp8 = || RotaryCacheArgs { k_cache: &k8, v_cache: &v8, ..r.args() };
        assert!(fp8().check().is_ok(), "unscaled FP8 caches are 1.0");
        assert!(RotaryCacheArgs { kv_scales: Some(&scales), ..fp8() }.check().is_ok());
        // K and V of different dtypes, caches of a third float dtype, integer caches.
        assert!(dtype(RotaryCacheArgs { v_cache: &v8, ..r.args() }.check(), DType::F8E4M3));
        assert!(dtype(RotaryCacheArgs { k_cache: &k8, ..r.args() }.check(), DType::BF16));
        let f16 = tensor(&[5, 2, 4, 8], DType::F16);
        assert!(dtype(RotaryCacheArgs { k_cache: &f16, v_cache: &f16, ..r.args() }.check(), DType::F16));
        // Scales: only for FP8 caches, F32 [2], never written over.
        let on_bf16 = RotaryCacheArgs { kv_scales: Some(&scales), ..r.args() }.check();
        assert!(is_shape(&on_bf16, "kv_scales given for BF16 caches"));
        let three = tensor(&[3], DType::F32);
        assert!(is_shape(
            &RotaryCacheArgs { kv_scales: Some(&three), ..fp8() }.check(),
            "kv_scales: expected [2]"
        ));
        let bf16_scales = tensor(&[2], DType::BF16);
        assert!(dtype(RotaryCacheArgs { kv_scales: Some(&bf16_scales), ..fp8() }.check(), DType::BF16));
        let in_cache = k8.reshape(&[320]).unwrap().narrow(0, 2).unwrap();
        let in_cache = Tensor::from_parts(in_cache.storage().clone(), 0, [2].into(), DType::F32);
        let aliased = RotaryCacheArgs { kv_scales: Some(&in_cache), ..fp8() }.check();
        assert!(matches!(aliased, Err(BackendError::Aliasing { .. })));

        let at = Attention::new(host());
        let (k8, v8) = (tensor(&[6, 2, 4, 8], DType::F8E4M3), tensor(&[6, 2, 4, 8], DType::F8E4M3));
        let fp8 = || AttentionArgs { k_cache: &k8, v_cache: &v8, ..at.args() };
        assert!(fp8().check().is_ok());
        assert!(AttentionArgs { kv_scales: Some(&scales), ..fp8() }.check().is_ok());
        let mixed = AttentionArgs { v_cache: &v8, ..at.args() }.check();
        assert!(matches!(mixed, Err(BackendError::DType { dtype: DType::F8E4M3, .. })));
        let unscaled = AttentionArgs { kv_scales: Some(&scales), ..at.args() }.check();
        assert!(is_shape(&unscaled, "kv_scales given for F16 caches"));
        // The output may not be an FP8 tensor (q and out share one float dtype).
        let out8 = tensor(&[4, 4, 8], DType::F8E4M3);
        let r = AttentionArgs { out: &out8, ..fp8() }.check();
        assert!(matches!(r, Err(BackendError::DType { dtype: DType::F8E4M3, .. })));
        let in_out = Tensor::from_parts(at.out.storage().clone(), 0, [2].into(), DType::F32);
        let aliased = AttentionArgs { kv_scales: Some(&in_out), ..fp8() }.check();
        assert!(matches!(aliased, Err(BackendError::Aliasing { .. })));
    }
}
