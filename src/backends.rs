//! Picks the backend for `--device` and hands a factory for it to a job that
//! is generic over [`Backend`] (the factory runs on the thread that will use
//! the device: CUDA contexts are per thread).

use anyhow::bail;
use pagoda_backend::Backend;
use pagoda_backend_cpu_ref::CpuBackend;

use crate::engine_args::Device;

/// A job that runs on whichever backend `--device` selects.
pub trait BackendJob {
    type Output;
    fn run<B: Backend, F>(self, make_backend: F) -> anyhow::Result<Self::Output>
    where
        F: FnOnce() -> anyhow::Result<B> + Send + 'static;
}

/// Runs `job` on the backend `device` selects.
pub fn dispatch<J: BackendJob>(device: Device, job: J) -> anyhow::Result<J::Output> {
    match resolve(device)? {
        Device::Cpu => job.run(|| Ok(CpuBackend::new())),
        #[cfg(feature = "cuda")]
        Device::Cuda => job.run(|| Ok(pagoda_backend_cuda::CudaBackend::new(0)?)),
        other => bail!("device {other:?} is not available in this build"),
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
