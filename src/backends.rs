//! Picks the backend for `--device` and hands a factory for it to a job that
//! is generic over [`Backend`] (the factory runs on the thread that will use
//! the device: CUDA contexts are per thread). The `--kernel-*` flags go to the
//! CUDA backend, which resolves its kernel policy from them, the `PAGODA_*`
//! environment and the GPU.

use anyhow::bail;
use pagoda_backend::Backend;
use pagoda_backend_cpu_ref::CpuBackend;

use crate::engine_args::{Device, DeviceArgs};

/// A job that runs on whichever backend `--device` selects.
pub trait BackendJob {
    type Output;
    fn run<B: Backend, F>(self, make_backend: F) -> anyhow::Result<Self::Output>
    where
        F: FnOnce() -> anyhow::Result<B> + Send + 'static;
}

/// Runs `job` on the backend `args.device` selects.
pub fn dispatch<J: BackendJob>(args: DeviceArgs, job: J) -> anyhow::Result<J::Output> {
    match resolve(args.device)? {
        Device::Cpu => {
            if args.any_kernel_flag() {
                notice("the --kernel-* flags apply to the CUDA backend only; the CPU backend ignores them");
            }
            job.run(|| Ok(CpuBackend::new()))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda => job.run(move || cuda::backend(&args)),
        other => bail!("device {other:?} is not available in this build"),
    }
}

/// A line for the user: through the log when one is set up (`serve`), else on stderr.
fn notice(message: &str) {
    if tracing::dispatcher::has_been_set() {
        tracing::info!("{message}");
    } else {
        eprintln!("{message}");
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use pagoda_backend::DType;
    use pagoda_backend_cuda::{CudaBackend, DecodePartition, KernelOptions, KernelPolicy};

    use crate::engine_args::{DeviceArgs, Switch};

    /// What the `--kernel-*` flags ask; unset flags leave a switch to the environment.
    pub(super) fn kernel_options(args: &DeviceArgs) -> KernelOptions {
        KernelOptions {
            decode_partition: args
                .kernel_decode_partition
                .map(|p| p.tokens().map_or(DecodePartition::Auto, DecodePartition::Tokens)),
            pdl: args.kernel_pdl.map(Switch::is_on),
            gemv: args.kernel_gemv.map(Switch::is_on),
            gemv_mma_min_tokens: args.kernel_gemv_mma_min_tokens,
        }
    }

    /// GPU 0 with bf16 activations, its kernel policy resolved from the flags,
    /// the environment and the device; a policy other than the device's own
    /// default is reported, so an experiment's output says what it ran.
    pub(super) fn backend(args: &DeviceArgs) -> anyhow::Result<CudaBackend> {
        let backend = CudaBackend::with_kernel_options(0, DType::BF16, kernel_options(args))?;
        let policy = backend.kernel_policy();
        let none = KernelOptions::default();
        if policy != KernelPolicy::resolve(none, none, backend.device_facts()) {
            super::notice(&format!(
                "CUDA kernel policy: {policy} (set by --kernel-* flags or PAGODA_* variables)"
            ));
        }
        Ok(backend)
    }
}

fn resolve(device: Device) -> anyhow::Result<Device> {
    match device {
        Device::Cpu => Ok(Device::Cpu),
        Device::Cuda if cfg!(feature = "cuda") => Ok(Device::Cuda),
        Device::Cuda => {
            bail!("this pagoda was built without CUDA: rebuild with `cargo build --release --features cuda`")
        }
        Device::Auto if cfg!(feature = "cuda") && cuda_device_present() => Ok(Device::Cuda),
        Device::Auto => Ok(Device::Cpu),
    }
}

/// Whether a CUDA driver and device are there (the NVIDIA device nodes exist).
fn cuda_device_present() -> bool {
    std::path::Path::new("/dev/nvidia0").exists() || std::path::Path::new("/dev/nvidiactl").exists()
}

/// A progress bar for weight loading (bytes).
pub fn loading_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "loading weights {bar:40} {binary_bytes}/{binary_total_bytes} {elapsed}",
        )
        .expect("valid template"),
    );
    bar
}
