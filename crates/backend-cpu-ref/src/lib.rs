//! The CPU reference backend: [`CpuBackend`] implements
//! [`pagoda_backend::Backend`] with plain f32 loops that a reader can check
//! against the formulas in the trait's docs. It is the oracle every device
//! kernel is tested against ([`conformance`] runs any backend against it), and
//! it runs small models (SmolLM2-135M) at a usable speed: `linear` streams the
//! weights for decode and uses `matrixmultiply`'s sgemm for prefill, and rows,
//! heads and output features are spread over cores with rayon.
//!
//! Storage and dtypes:
//! - Every float tensor is **F32**; [`Backend::activation_dtype`] is F32. F16
//!   and BF16 *host data* (typed or raw bytes from a safetensors file) is
//!   widened to f32 at upload, but asking for an F16/BF16 tensor (`alloc`, or
//!   `upload`/`write` with an F16/BF16 target) is refused with
//!   [`BackendError::DType`](pagoda_backend::BackendError::DType).
//! - Integer tensors are I32 or I64, exactly as uploaded.
//! - F8E4M3 tensors (FP8 KV caches) hold the f32 values of their E4M3 codes,
//!   every element exactly a code's value ([`fp8`]): E4M3 bytes decode at
//!   upload, float data rounds to the nearest code, a download encodes the
//!   same bytes back, and `rotary_and_cache` rounds what it writes. So an FP8
//!   cache here holds what a device's holds, byte for byte.
//! - Fresh allocations are poisoned (NaN, or the integer minimum) so reading
//!   memory nothing wrote shows up in the reference.
//! - Each storage sits behind an `RwLock`: an op read-locks its inputs and
//!   write-locks its outputs, refusing an output that shares storage with an
//!   input ([`BackendError::Aliasing`](pagoda_backend::BackendError::Aliasing)).
//!   `add_rms_norm`'s residual is the one operand read and written in place.
//! - The swap host pool holds blocks in the cache's layout and dtype: little-
//!   endian f32, or one E4M3 code a byte for an F8E4M3 cache.
//! - `sample_async` samples at once; its handle ([`CpuSampled`]) only holds the
//!   tokens, and index errors (a bad source row for `feed_sampled_tokens`) are
//!   returned by the call that finds them.
//!
//! ```
//! use pagoda_backend::{Backend, DType, HostSlice};
//! use pagoda_backend_cpu_ref::CpuBackend;
//!
//! let cpu = CpuBackend::new();
//! let x = cpu.upload(HostSlice::F32(&[1.0, 2.0, 3.0, 4.0]), &[2, 2], DType::F32)?;
//! let w = cpu.upload(HostSlice::F32(&[1.0, 0.0, 1.0, 1.0]), &[2, 2], DType::F32)?;
//! let out = cpu.alloc(&[2, 2], DType::F32)?;
//! cpu.linear(&x, &w, None, &out)?; // out = x · wᵀ
//! assert_eq!(cpu.download_f32(&out)?, vec![1.0, 3.0, 3.0, 7.0]);
//! # Ok::<(), pagoda_backend::BackendError>(())
//! ```

mod attention;
pub mod conformance;
pub mod fp8;
mod fp8_linear;
mod in_process;
mod kv_blocks;
mod linear;
mod lora;
mod memory;
mod ops;
mod rotary;
mod sampling;
mod simd;
mod storage;

use pagoda_backend::{
    AttentionArgs, Backend, BackendError, DType, Fp8LinearArgs, Fp8LinearMode, HostSlice, HostVec,
    LinearFusion, LoraArgs, MemoryInfo, Result, RotaryCacheArgs, SampledToken, SamplingRow, Tensor,
};

pub use in_process::{InProcessComm, InProcessGroup};
pub use sampling::CpuSampled;
pub use storage::CpuStorage;

/// Up to this many rows the CUDA backend runs FP8 linear layers weight-only
/// (its FP8 GEMV streams the codes), above it with quantized activations on
/// FP8 tensor cores; the reference prefers the same.
pub const CUDA_FP8_GEMV_MAX_TOKENS: usize = 16;

/// The CPU reference backend. Cheap to create; all instances share rayon's
/// global thread pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

type T = Tensor<CpuBackend>;

impl Backend for CpuBackend {
    type Storage = CpuStorage;

    fn name(&self) -> String {
        "cpu-ref".to_string()
    }

    fn activation_dtype(&self) -> DType {
        DType::F32
    }

    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<T> {
        memory::alloc(shape, dtype)
    }

    fn upload(&self, data: HostSlice<'_>, shape: &[usize], dtype: DType) -> Result<T> {
        memory::upload(data, shape, dtype)
    }

    fn write(&self, dst: &T, data: HostSlice<'_>) -> Result<()> {
        memory::write(dst, data)
    }

    fn download(&self, src: &T) -> Result<HostVec> {
        memory::download(src)
    }

    fn fill(&self, dst: &T, value: f32) -> Result<()> {
        memory::fill(dst, value)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(()) // every op has finished when it returns
    }

    fn memory_info(&self) -> Result<MemoryInfo> {
        host_memory_info()
    }

    fn is_host_memory(&self) -> bool {
        true
    }

    fn embedding(&self, token_ids: &T, table: &T, out: &T) -> Result<()> {
        ops::embedding(token_ids, table, out)
    }

    fn rms_norm(&self, x: &T, weight: &T, eps: f32, out: &T) -> Result<()> {
        ops::rms_norm(x, weight, eps, out)
    }

    fn add_rms_norm(&self, x: &T, residual: &T, weight: &T, eps: f32, out: &T) -> Result<()> {
        ops::add_rms_norm(x, residual, weight, eps, out)
    }

    fn linear_fused(
        &self,
        x: &T,
        weight: &T,
        bias: Option<&T>,
        out: &T,
        fusion: &LinearFusion<'_, Self>,
    ) -> Result<()> {
        linear::linear_fused(x, weight, bias, out, fusion)
    }

    fn rotary_and_cache(&self, args: &RotaryCacheArgs<'_, Self>) -> Result<()> {
        rotary::rotary_and_cache(args)
    }

    fn attention(&self, args: &AttentionArgs<'_, Self>) -> Result<()> {
        attention::attention(args)
    }

    fn silu_and_mul(&self, x: &T, out: &T) -> Result<()> {
        ops::silu_and_mul(x, out)
    }

    fn gather_rows(&self, x: &T, indices: &T, out: &T) -> Result<()> {
        ops::gather_rows(x, indices, out)
    }

    /// Slots are checked before anything is written (an index error leaves
    /// `out` as it was).
    fn lora_apply(&self, args: &LoraArgs<'_, Self>) -> Result<()> {
        lora::lora_apply(args)
    }

    /// Both modes, as `pagoda_backend::Fp8LinearArgs` states them.
    fn fp8_linear(&self, args: &Fp8LinearArgs<'_, Self>) -> Result<()> {
        fp8_linear::fp8_linear(args)
    }

    /// The CUDA backend's choice ([`CUDA_FP8_GEMV_MAX_TOKENS`]), so a model
    /// on the reference computes what it computes on a GPU.
    fn fp8_linear_mode(&self, tokens: usize) -> Fp8LinearMode {
        if tokens <= CUDA_FP8_GEMV_MAX_TOKENS {
            Fp8LinearMode::WeightOnly
        } else {
            Fp8LinearMode::QuantizedActivations
        }
    }

    fn copy_blocks(&self, caches: &[&T], pairs: &[(u32, u32)]) -> Result<()> {
        kv_blocks::copy_blocks(caches, pairs)
    }

    fn swap_out(&self, cache: &T, host_pool: &mut [u8], pairs: &[(u32, u32)]) -> Result<()> {
        kv_blocks::swap_out(cache, host_pool, pairs)
    }

    fn swap_in(&self, host_pool: &[u8], cache: &T, pairs: &[(u32, u32)]) -> Result<()> {
        kv_blocks::swap_in(host_pool, cache, pairs)
    }

    type Graph = pagoda_backend::NoGraph;

    fn capture(&self, _record: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph> {
        Err(BackendError::Unsupported { op: "graph capture", backend: self.name() })
    }

    fn replay(&self, graph: &Self::Graph) -> Result<()> {
        match *graph {}
    }

    type Sampled = CpuSampled;

    /// `pagoda_sampler::sample_row` applies them.
    fn supports_logit_constraints(&self) -> bool {
        true
    }

    /// `pagoda_sampler::sample_row` applies the mask.
    fn supports_token_masks(&self) -> bool {
        true
    }

    /// Each row goes through [`pagoda_sampler::sample_row`] unchanged, rows in
    /// parallel, before this returns.
    fn sample_async(&self, logits: &T, rows: &[SamplingRow<'_>]) -> Result<CpuSampled> {
        sampling::sample_async(logits, rows)
    }

    fn finish_sample(&self, sampled: CpuSampled) -> Result<Vec<SampledToken>> {
        Ok(sampled.into_tokens())
    }

    fn feed_sampled_tokens(&self, sampled: &CpuSampled, source_rows: &T, token_ids: &T) -> Result<()> {
        sampling::feed_sampled_tokens(sampled, source_rows, token_ids)
    }
}

/// The machine's memory as `/proc/meminfo` reports it (free = MemAvailable).
fn host_memory_info() -> Result<MemoryInfo> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| BackendError::Device(format!("reading /proc/meminfo: {e}")))?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    match (field("MemAvailable:"), field("MemTotal:")) {
        (Some(free_bytes), Some(total_bytes)) => Ok(MemoryInfo { free_bytes, total_bytes }),
        _ => Err(BackendError::Device("/proc/meminfo lacks MemAvailable or MemTotal".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_info_is_plausible() {
        let info = CpuBackend::new().memory_info().unwrap();
        assert!(info.total_bytes > 0 && info.free_bytes <= info.total_bytes);
    }
}
