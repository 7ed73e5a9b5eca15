//! Pagoda's CUDA backend: [`CudaBackend`] implements [`pagoda_backend::Backend`]
//! on one NVIDIA GPU (sm_80 and newer; sm_90a code for H100/H200).
//!
//! - Kernels are CUDA C++ in the repository's `csrc/` (one `.cu` per family),
//!   built by nvcc through this crate's build script and called through the C
//!   launchers of `csrc/pagoda_kernels.h` (bindgen), each returning an error
//!   code that is checked here.
//! - Decode attention is split-K PagedAttention (flash-decoding) reading K/V
//!   through block tables; prefill attention is FlashAttention-2 style on
//!   tensor cores (`mma.sync` m16n8k16) with the cached prefix read from the
//!   paged cache, so prefix caching and chunked prefill work.
//! - Dense products go to cuBLAS on the backend's stream (bf16/f16 in, f32
//!   accumulation). Sampling runs on the device and follows
//!   [`pagoda_sampler::sample_row`] exactly: only token ids and logprobs cross
//!   to the host.
//! - Sampling is asynchronous: `sample_async` queues the kernels and the copy
//!   of their results into page-locked memory and returns a [`CudaSampled`];
//!   `feed_sampled_tokens` copies its ids into a later step's input on the
//!   device (a small kernel), so the next step can be queued before
//!   `finish_sample` waits for the tokens (on the handle's event, not the
//!   whole stream).
//! - How the launchers choose kernels (programmatic dependent launch, the
//!   small-batch GEMV, decode partitions, the SM count grids are sized by) is
//!   data: a [`KernelPolicy`] resolved once per device when the backend is
//!   created, from the caller's [`KernelOptions`], then the `PAGODA_*`
//!   environment, then the device ([`policy`]), and passed to every launcher.
//! - Tensor parallelism: [`NcclComm`] is the [`pagoda_backend::Communicator`]
//!   of one rank per GPU, an in-place NCCL all-reduce on the backend's stream
//!   (libnccl.so.2 is loaded at the first communicator, not linked); see
//!   [`nccl`] for forming a group (threads of a process, or over TCP).
//! - All work runs on one stream; device memory comes from the driver's
//!   stream-ordered pool, and a dropped tensor is freed on that stream.
//! - Host-to-device copies up to 4 MiB (the per-step inputs) are staged
//!   through a 16 MiB page-locked ring and never wait for the GPU (from
//!   pageable memory the driver may wait for the stream); larger ones, such
//!   as weights at load time, are copied from pageable memory.
//!
//! Building needs the CUDA toolkit (`CUDA_PATH`, or `/usr/local/cuda`);
//! `scripts/setup-cuda.sh` installs one on a machine without a GPU.
//!
//! ```no_run
//! use pagoda_backend::{Backend, DType, HostSlice};
//! use pagoda_backend_cuda::CudaBackend;
//!
//! let gpu = CudaBackend::new(0)?;
//! let x = gpu.upload(HostSlice::F32(&[1.0, 2.0, 3.0, 4.0]), &[2, 2], DType::BF16)?;
//! let w = gpu.upload(HostSlice::F32(&[1.0, 0.0, 1.0, 1.0]), &[2, 2], DType::BF16)?;
//! let out = gpu.alloc(&[2, 2], DType::F32)?;
//! gpu.linear(&x, &w, None, &out)?; // out = x · wᵀ, on cuBLAS
//! assert_eq!(gpu.download_f32(&out)?, vec![1.0, 3.0, 3.0, 7.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod backend;
mod device;
mod error;
mod ffi;
pub mod nccl;
pub mod policy;
mod sampling;

pub use backend::CudaBackend;
pub use device::{CudaGraph, CudaStorage};
pub use error::CudaError;
pub use nccl::{device_count, NcclComm};
pub use policy::{DecodePartition, DeviceFacts, KernelOptions, KernelPolicy};
pub use sampling::CudaSampled;
