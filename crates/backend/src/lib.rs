//! The contract between Pagoda's model code and a compute device.
//!
//! A [`Backend`] owns device memory ([`Tensor`]s) and implements the handful of
//! ops a Llama-family forward pass over a paged KV cache needs, plus sampling.
//! The model code (`pagoda-models`) is written once against this trait; the
//! CPU reference backend implements it with plain loops and is the oracle for
//! the CUDA backend, whose kernels are tested op by op against it.
//!
//! Conventions every implementation keeps:
//! - Tensors are dense and row-major. Views are cheap handles on shared storage
//!   (a leading-dimension [`Tensor::narrow`] or a [`Tensor::reshape`]).
//! - Ops write into caller-provided outputs (`out`), which must not share
//!   storage with an input unless the op says so; this lets a device backend
//!   reuse buffers and capture graphs. Device ops may run asynchronously:
//!   only `download*`, `sample`, `finish_sample` and `synchronize` wait for
//!   the device.
//! - Float tensors may be `F32`, `F16` or `BF16`; arithmetic accumulates in f32.
//!   Index tensors are `I32` (token ids, positions, block tables, lengths) or
//!   `I64` (slot mappings).
//! - The KV cache of one layer is two tensors, K and V, each
//!   `[num_blocks, num_kv_heads, block_size, head_dim]`: one block of one head
//!   is contiguous, which is what a decode kernel wants to stream. Both are
//!   the activation dtype, or both `F8E4M3` ([`fp8`]) with a scale for K and
//!   one for V (see [`RotaryCacheArgs::kv_scales`]): half the bytes of bf16.
//! - The argument checks of attention, rotary and the block ops are written
//!   once here ([`AttentionArgs::check`], [`RotaryCacheArgs::check`],
//!   [`check_copy_blocks`], [`check_swap_out`], [`check_swap_in`]) and every
//!   backend calls them first, so both refuse the same calls with the same
//!   errors; what only a backend can check (values on its device, what its
//!   kernels support) it checks after.
//!
//! ```
//! use pagoda_backend::{DType, Shape};
//! let s = Shape::from(&[4, 8][..]);
//! assert_eq!(s.numel(), 32);
//! assert_eq!(DType::BF16.size_in_bytes(), 2);
//! ```

mod attention;
mod blocks;
mod comm;
mod error;
pub mod fp8;
mod fp8_linear;
mod host;
mod linear;
mod lora;
mod tensor;
#[cfg(test)]
mod testing;
mod uniform;

pub use attention::{
    AttentionArgs, AttentionHostMetadata, AttentionMetadata, RopeStyle, RotaryCacheArgs, RotaryShape,
};
pub use blocks::{check_copy_blocks, check_swap_in, check_swap_out, CacheBlocks};
pub use comm::{Communicator, SingleRank};
pub use error::{BackendError, Result};
pub use fp8_linear::{
    check_fp8_quantize_rows, fp8_dynamic_scale, fp8_quantize_rows, fp8_quantize_rows_on_host, Fp8InputScale,
    Fp8LinearArgs, Fp8LinearMode,
};
pub use host::{HostSlice, HostVec};
pub use linear::LinearFusion;
pub use lora::{
    check_lora_token_groups, lora_group_capacity, lora_token_groups, LoraArgs, LoraGroups, LoraPart,
    LoraShape, LORA_GROUP_TOKENS, LORA_MAX_PARTS,
};
pub use pagoda_sampler::{SampledToken, SamplingParams, SamplingRow, TokenId};
pub use tensor::{DType, Shape, Tensor};
pub use uniform::{splitmix64_draw, UniformFill};

/// Checks the operands of [`Backend::feed_sampled_tokens`] (I32 vectors of one
/// length in separate buffers) and returns their length.
pub fn check_feed_operands<B: Backend>(source_rows: &Tensor<B>, token_ids: &Tensor<B>) -> Result<usize> {
    const OP: &str = "feed_sampled_tokens";
    source_rows.expect_dtype(OP, DType::I32)?;
    token_ids.expect_dtype(OP, DType::I32)?;
    let n = token_ids.numel();
    if source_rows.numel() != n {
        return Err(BackendError::shape(
            OP,
            format!("{} source rows for {n} token ids", source_rows.numel()),
        ));
    }
    if token_ids.shares_storage(source_rows) {
        return Err(BackendError::Aliasing { op: OP });
    }
    Ok(n)
}

/// The [`Backend::Graph`] of a backend that cannot capture graphs: no value exists.
#[derive(Debug)]
pub enum NoGraph {}

/// Bytes of device memory, as the device reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryInfo {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// The shape of one layer's paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_blocks: usize,
    pub num_kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
}

impl KvCacheShape {
    /// `[num_blocks, num_kv_heads, block_size, head_dim]`.
    pub fn dims(&self) -> [usize; 4] {
        [self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim]
    }

    /// Elements in one block of K (or V) of one layer.
    pub fn block_numel(&self) -> usize {
        self.num_kv_heads * self.block_size * self.head_dim
    }
}

/// A compute device. See the crate docs for the conventions.
///
/// Shapes below use `T` for tokens in the step, `H` hidden size, `V` vocabulary,
/// `I` intermediate (FFN) size, `Hq`/`Hkv` query/KV heads and `D` head dim.
pub trait Backend: Send + Sync + Sized + 'static {
    /// Device memory behind a tensor.
    type Storage: Send + Sync + 'static;

    /// A human-readable device name, e.g. "cpu-ref" or "NVIDIA H100 80GB HBM3".
    fn name(&self) -> String;

    /// The float dtype activations and the KV cache use on this backend.
    fn activation_dtype(&self) -> DType;

    // ---- memory -------------------------------------------------------------

    /// A new tensor whose contents are unspecified.
    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>;

    /// A new tensor of `dtype` holding `data` (floats are converted; integer
    /// data must match `dtype`).
    fn upload(&self, data: HostSlice<'_>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>;

    /// Overwrites `dst` with `data` (same element count; conversion as in `upload`).
    fn write(&self, dst: &Tensor<Self>, data: HostSlice<'_>) -> Result<()>;

    /// Copies a tensor to the host in its own dtype; waits for pending work.
    fn download(&self, src: &Tensor<Self>) -> Result<HostVec>;

    /// Sets every element of a float or integer tensor to `value`.
    fn fill(&self, dst: &Tensor<Self>, value: f32) -> Result<()>;

    /// Fills a float tensor with seeded uniform values ([`UniformFill`]: the
    /// same bits on every backend, a part of a tensor as the whole would hold
    /// it), made where the tensor lives: random weights of any size without
    /// host data. The default computes them on the host and writes them in
    /// chunks; a device backend computes them in a kernel.
    fn fill_uniform(&self, dst: &Tensor<Self>, fill: &UniformFill) -> Result<()> {
        uniform::fill_uniform_on_host(self, dst, fill)
    }

    /// Waits until all queued work has finished.
    fn synchronize(&self) -> Result<()>;

    /// Free and total device memory.
    fn memory_info(&self) -> Result<MemoryInfo>;

    /// Whether "device" memory is the host's own (the CPU backend): then the
    /// KV cache is sized by an explicit byte budget, not by what is free.
    fn is_host_memory(&self) -> bool {
        false
    }

    /// Downloads any float or integer tensor as f32 (tests and debugging).
    fn download_f32(&self, src: &Tensor<Self>) -> Result<Vec<f32>> {
        Ok(self.download(src)?.to_f32())
    }

    // ---- the forward pass ---------------------------------------------------

    /// `out[t, :] = table[token_ids[t], :]`; ids `I32 [T]`, table `[V, H]`, out `[T, H]`.
    fn embedding(&self, token_ids: &Tensor<Self>, table: &Tensor<Self>, out: &Tensor<Self>) -> Result<()>;

    /// `out = x / sqrt(mean(x^2) + eps) * weight`, row-wise; x, out `[T, H]`, weight `[H]`.
    fn rms_norm(&self, x: &Tensor<Self>, weight: &Tensor<Self>, eps: f32, out: &Tensor<Self>) -> Result<()>;

    /// Fused residual add and norm: `residual += x; out = rms_norm(residual)`.
    /// `residual` is read and written in place; `out` is a third tensor.
    fn add_rms_norm(
        &self,
        x: &Tensor<Self>,
        residual: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
        out: &Tensor<Self>,
    ) -> Result<()>;

    /// `out = x · weightᵀ + bias`; x `[T, K]`, weight `[N, K]`, bias `[N]`, out `[T, N]`.
    /// `out` may be F32 when x and weight are a lower precision (logits).
    /// [`Backend::linear_fused`] with nothing fused (backends implement that one).
    fn linear(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        out: &Tensor<Self>,
    ) -> Result<()> {
        self.linear_fused(x, weight, bias, out, &LinearFusion::none())
    }

    /// A linear layer with its neighbours fused in (input norm, SiLU-and-mul,
    /// residual add): `p = x' · weightᵀ + bias`, then `out = p`, `out += p` or
    /// `out = silu_and_mul(p)`; see [`LinearFusion`]. The result equals the
    /// unfused ops up to rounding of the intermediates.
    fn linear_fused(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        out: &Tensor<Self>,
        fusion: &LinearFusion<'_, Self>,
    ) -> Result<()>;

    /// Rotates q and k by their positions and writes k and v into the paged
    /// cache through the slot mapping; see [`RotaryCacheArgs`] (and
    /// [`RotaryCacheArgs::check`] for the arguments refused).
    fn rotary_and_cache(&self, args: &RotaryCacheArgs<'_, Self>) -> Result<()>;

    /// Causal attention of this step's queries over each sequence's cached
    /// keys and values; see [`AttentionArgs`] (and [`AttentionArgs::check`]).
    fn attention(&self, args: &AttentionArgs<'_, Self>) -> Result<()>;

    /// `out = silu(x[:, :I]) * x[:, I:]`; x `[T, 2I]`, out `[T, I]`.
    fn silu_and_mul(&self, x: &Tensor<Self>, out: &Tensor<Self>) -> Result<()>;

    /// `out[m, :] = x[indices[m], :]`; x `[T, H]`, indices `I32 [M]`, out `[M, H]`.
    fn gather_rows(&self, x: &Tensor<Self>, indices: &Tensor<Self>, out: &Tensor<Self>) -> Result<()>;

    /// LoRA: adds one adapted product's delta, every part of it, each token
    /// by its adapter's slot (shrink `A[slot] · x`, then expand `B[slot] · u`
    /// into each part's columns of the base output); see [`LoraArgs`] (and
    /// its `check`). A slot index at or past the slot count is an error where
    /// the backend can see it (the CPU reference) and must never be given.
    fn lora_apply(&self, args: &LoraArgs<'_, Self>) -> Result<()> {
        let _ = args;
        Err(BackendError::Unsupported { op: "lora_apply", backend: self.name() })
    }

    /// A linear layer with an FP8 (E4M3) weight and per-output-channel
    /// scales, in the mode `args.mode` asks for; see [`Fp8LinearArgs`] (and
    /// its `check`) and the `fp8_linear` module docs for the exact formulas.
    fn fp8_linear(&self, args: &Fp8LinearArgs<'_, Self>) -> Result<()> {
        let _ = args;
        Err(BackendError::Unsupported { op: "fp8_linear", backend: self.name() })
    }

    /// Quantizes each row of `x` (`[rows, cols]`, a float dtype) to E4M3
    /// with its own scale, exactly as the host's [`fp8_quantize_rows`] does
    /// on `x`'s values: `scales[r] = max |x[r, :]| / 448` (1 for a zero row),
    /// `codes[r, c] = e4m3(x[r, c] / scales[r])`; `codes` F8E4M3 `[rows,
    /// cols]`, `scales` F32 `[rows]` ([`check_fp8_quantize_rows`]). What
    /// `--quantization fp8` quantizes weights with where they already are
    /// (an 8B model's 7·10^9 values take minutes on a host). The default
    /// reads `x` back and quantizes on the host.
    fn fp8_quantize_rows(&self, x: &Tensor<Self>, codes: &Tensor<Self>, scales: &Tensor<Self>) -> Result<()> {
        fp8_quantize_rows_on_host(self, x, codes, scales)
    }

    /// The [`Fp8LinearMode`] this backend computes `tokens` rows in best
    /// (what the model asks for). The default: weights only.
    fn fp8_linear_mode(&self, tokens: usize) -> Fp8LinearMode {
        let _ = tokens;
        Fp8LinearMode::WeightOnly
    }

    // ---- KV cache management -------------------------------------------------

    /// For every cache tensor and every `(src, dst)` pair, copies block `src`
    /// over block `dst` (copy-on-write). Pairs are applied in order. A pair
    /// outside a cache ([`check_copy_blocks`]) fails the call before any copy.
    fn copy_blocks(&self, caches: &[&Tensor<Self>], pairs: &[(u32, u32)]) -> Result<()>;

    /// Copies device blocks to a host pool: for each `(device, host)` pair,
    /// block `device` of `cache` goes to block `host` of `host_pool`, whose
    /// blocks have the cache's per-block byte layout. Waits for completion.
    /// Pairs are checked first ([`check_swap_out`]).
    fn swap_out(&self, cache: &Tensor<Self>, host_pool: &mut [u8], pairs: &[(u32, u32)]) -> Result<()>;

    /// The reverse of `swap_out`: for each `(host, device)` pair ([`check_swap_in`]).
    fn swap_in(&self, host_pool: &[u8], cache: &Tensor<Self>, pairs: &[(u32, u32)]) -> Result<()>;

    // ---- recorded work (CUDA graphs) ----------------------------------------------

    /// Device work recorded once by [`Backend::capture`] and replayed by [`Backend::replay`].
    type Graph: Send + Sync + 'static;

    /// Whether [`Backend::capture`] can record work; a backend that cannot (the
    /// CPU reference) has every step run eagerly.
    fn supports_graphs(&self) -> bool {
        false
    }

    /// Records the device work that `record` enqueues, without running it, as a
    /// graph that [`Backend::replay`] runs again and again. Each replay reads
    /// and writes the same buffers, with whatever they hold at that time; so
    /// every tensor the recorded ops touch must outlive the graph, and tensors
    /// `record` allocates must be dropped inside it. Host-side choices the ops
    /// made while recording (kernels, grid sizes) are frozen into the graph.
    fn capture(&self, record: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph>;

    /// Enqueues one run of a captured graph.
    fn replay(&self, graph: &Self::Graph) -> Result<()>;

    // ---- sampling --------------------------------------------------------------

    /// Tokens sampled by [`Backend::sample_async`] whose ids may still be on
    /// the device.
    type Sampled: Send + 'static;

    /// Whether [`Backend::sample`] applies the logit constraints of
    /// [`pagoda_sampler::SamplingParams`] (`logit_bias`, `allowed_token_ids`,
    /// `bad_words`). The engine refuses requests with constraints a backend
    /// would ignore.
    fn supports_logit_constraints(&self) -> bool {
        false
    }

    /// Whether [`Backend::sample`] applies a row's structured-output mask
    /// ([`SamplingRow::allowed_tokens`]). The engine refuses grammar-constrained
    /// requests on a backend that would ignore it.
    fn supports_token_masks(&self) -> bool {
        false
    }

    /// Samples one token per row of `logits` (`[M, V]`, any float dtype) under
    /// `rows[m]`, exactly as [`pagoda_sampler::sample_row`] specifies (device
    /// backends may differ only where float rounding reorders near-equal
    /// probabilities). Waits for the device; the result is on the host.
    fn sample(&self, logits: &Tensor<Self>, rows: &[SamplingRow<'_>]) -> Result<Vec<SampledToken>> {
        let sampled = self.sample_async(logits, rows)?;
        self.finish_sample(sampled)
    }

    /// Queues the sampling [`Backend::sample`] does and returns without waiting
    /// for the device, so the host can prepare the next step meanwhile. The
    /// ids stay on the device for as long as the handle lives:
    /// [`Backend::feed_sampled_tokens`] copies them into a later step's input,
    /// [`Backend::finish_sample`] waits for them and reads them back.
    fn sample_async(&self, logits: &Tensor<Self>, rows: &[SamplingRow<'_>]) -> Result<Self::Sampled>;

    /// Waits for a `sample_async` and returns its tokens, one per row in order.
    /// Index errors that kernels recorded up to it are reported here.
    fn finish_sample(&self, sampled: Self::Sampled) -> Result<Vec<SampledToken>>;

    /// For every `i` with `source_rows[i] >= 0`, sets `token_ids[i]` to the id
    /// sampled for row `source_rows[i]` of `sampled`, on the device and without
    /// waiting; other entries keep their value. `source_rows` and `token_ids`
    /// are I32 vectors of one length. A source row past the sampled rows is an
    /// index error (that entry is left alone), returned at once by a host
    /// backend and by the next wait (e.g. `finish_sample`) on a device.
    fn feed_sampled_tokens(
        &self,
        sampled: &Self::Sampled,
        source_rows: &Tensor<Self>,
        token_ids: &Tensor<Self>,
    ) -> Result<()>;
}
