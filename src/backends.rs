//! Picks the backend for `--device` and hands the devices the engine will
//! run on to a job that is generic over [`Backend`]: one backend, or with
//! `--tensor-parallel-size N` one per rank (on the CPU threads joined by an
//! in-process group; on CUDA one GPU per rank joined by NCCL). Each backend
//! is made on the thread that will use it (CUDA contexts are per thread). The `--kernel-*`
//! flags go to the CUDA backend, which resolves its kernel policy from them,
//! the `PAGODA_*` environment and the GPU.

use std::path::Path;
use std::sync::Arc;

use anyhow::bail;
use pagoda_backend::{Backend, Communicator};
use pagoda_backend_cpu_ref::{CpuBackend, InProcessGroup};
use pagoda_engine::{
    load_engine, load_engine_tensor_parallel, EngineConfig, EngineError, LlmEngine, RankStart,
};

use crate::engine_args::{Device, DeviceArgs};

/// A job that runs on whichever backend `--device` selects.
pub trait BackendJob {
    type Output;
    fn run<B: Backend>(self, devices: EngineDevices<B>) -> anyhow::Result<Self::Output>;
}

/// The devices an engine will run on, not started yet.
pub enum EngineDevices<B: Backend> {
    /// One device: its backend, made by this on the engine's thread.
    One(Box<dyn FnOnce() -> anyhow::Result<B> + Send>),
    /// A tensor-parallel group: one start per rank; rank 0's runs on the
    /// engine's thread, the others' on threads of their own.
    TensorParallel(Vec<RankStart<B>>),
}

impl<B: Backend> EngineDevices<B> {
    /// Loads the model on these devices and builds the engine (call it on
    /// the thread that will step the engine).
    pub fn load_engine(
        self,
        model: &Path,
        config: EngineConfig,
        progress: impl FnMut(u64, u64),
    ) -> Result<LlmEngine<B>, EngineError> {
        match self {
            Self::One(make_backend) => {
                let backend = make_backend().map_err(|e| EngineError::Config(format!("{e:#}")))?;
                load_engine(backend, model, config, progress)
            }
            Self::TensorParallel(ranks) => load_engine_tensor_parallel(ranks, model, config, progress),
        }
    }
}

/// The device an engine runs on, as reports name it: the backend's name,
/// and the number of ranks when the model is split.
pub fn device_label<B: Backend>(engine: &LlmEngine<B>) -> String {
    let name = engine.runner().backend().name();
    match engine.runner().tensor_parallel_size() {
        1 => name,
        n => format!("{name} x {n} (tensor parallel)"),
    }
}

/// Runs `job` on the backend `args.device` selects, split over
/// `args.tensor_parallel_size` ranks.
pub fn dispatch<J: BackendJob>(args: DeviceArgs, job: J) -> anyhow::Result<J::Output> {
    let tp = args.tensor_parallel_size;
    match resolve(args.device)? {
        Device::Cpu => {
            if args.any_kernel_flag() {
                notice("the --kernel-* flags apply to the CUDA backend only; the CPU backend ignores them");
            }
            match tp {
                // A size of 0 goes on to the engine config's check, which names the flag.
                0 | 1 => job.run(EngineDevices::One(Box::new(|| Ok(CpuBackend::new())))),
                _ => job.run(EngineDevices::TensorParallel(cpu_ranks(tp))),
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda if tp > 1 => job.run(EngineDevices::TensorParallel(cuda::ranks(&args, tp)?)),
        #[cfg(feature = "cuda")]
        Device::Cuda => job.run(EngineDevices::One(Box::new(move || cuda::backend(0, &args, true)))),
        other => bail!("device {other:?} is not available in this build"),
    }
}

/// `n` CPU ranks: each its own reference backend and one handle on an
/// in-process group whose all-reduce meets in shared memory.
fn cpu_ranks(n: usize) -> Vec<RankStart<CpuBackend>> {
    InProcessGroup::new(n)
        .into_iter()
        .map(|comm| -> RankStart<CpuBackend> {
            Box::new(move || {
                let comm: Arc<dyn Communicator<CpuBackend>> = Arc::new(comm);
                Ok((CpuBackend::new(), comm))
            })
        })
        .collect()
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
    use std::sync::Arc;

    use anyhow::{bail, Context};
    use pagoda_backend::{BackendError, Communicator, DType};
    use pagoda_backend_cuda::nccl::{NcclComm, NcclOptions, Rendezvous};
    use pagoda_backend_cuda::{CudaBackend, DecodePartition, KernelOptions, KernelPolicy};
    use pagoda_engine::{EngineError, RankStart};

    use crate::engine_args::{DeviceArgs, Switch};

    /// `PAGODA_NCCL_BOOTSTRAP=host:port`: the ranks meet over TCP there (rank 0 listens) instead
    /// of handing NCCL's unique id over in memory; the path several processes would take.
    pub(super) const ENV_NCCL_BOOTSTRAP: &str = "PAGODA_NCCL_BOOTSTRAP";

    /// One rank per GPU, rank r on GPU r (of those `CUDA_VISIBLE_DEVICES` leaves), each with
    /// its backend and its NCCL communicator, made on the rank's own thread. The ranks are
    /// threads of this process, so NCCL's unique id goes from rank 0 to the others in memory
    /// (or over TCP with [`ENV_NCCL_BOOTSTRAP`]).
    pub(super) fn ranks(args: &DeviceArgs, tp: usize) -> anyhow::Result<Vec<RankStart<CudaBackend>>> {
        let gpus = pagoda_backend_cuda::device_count().context("counting the CUDA devices")?;
        if gpus < tp {
            let visible = std::env::var("CUDA_VISIBLE_DEVICES")
                .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
                .unwrap_or_default();
            bail!("--tensor-parallel-size {tp} needs {tp} GPUs, one per rank; this process sees {gpus}{visible}");
        }
        let rendezvous = match std::env::var(ENV_NCCL_BOOTSTRAP) {
            Ok(address) if !address.is_empty() => {
                (0..tp).map(|rank| Rendezvous::tcp(address.clone(), rank, tp)).collect()
            }
            _ => Rendezvous::local_group(tp),
        };
        let args = *args;
        Ok(rendezvous
            .into_iter()
            .map(|rendezvous| -> RankStart<CudaBackend> {
                Box::new(move || {
                    let rank = rendezvous.rank();
                    let ordinal =
                        u32::try_from(rank).map_err(|_| EngineError::Config(format!("rank {rank}")))?;
                    // The policy notice once, for rank 0: every GPU of a group is alike.
                    let backend = backend(ordinal, &args, rank == 0).map_err(|e| {
                        BackendError::Device(format!("tensor-parallel rank {rank}, GPU {ordinal}: {e:#}"))
                    })?;
                    let comm = NcclComm::join(&backend, rendezvous, NcclOptions::default())
                        .map_err(BackendError::from)?;
                    let comm: Arc<dyn Communicator<CudaBackend>> = Arc::new(comm);
                    Ok((backend, comm))
                })
            })
            .collect())
    }

    /// What the `--kernel-*` flags ask; unset flags leave a switch to the environment.
    pub(super) fn kernel_options(args: &DeviceArgs) -> KernelOptions {
        KernelOptions {
            decode_partition: args
                .kernel_decode_partition
                .map(|p| p.tokens().map_or(DecodePartition::Auto, DecodePartition::Tokens)),
            pdl: args.kernel_pdl.map(Switch::is_on),
            gemv: args.kernel_gemv.map(Switch::is_on),
            gemv_mma_min_tokens: args.kernel_gemv_mma_min_tokens,
            decode_attention_mma: args.kernel_decode_attention_mma.map(Switch::is_on),
        }
    }

    /// GPU `ordinal` with bf16 activations, its kernel policy resolved from the flags,
    /// the environment and the device; a policy other than the device's own
    /// default is reported (when `notify`), so an experiment's output says what it ran.
    pub(super) fn backend(ordinal: u32, args: &DeviceArgs, notify: bool) -> anyhow::Result<CudaBackend> {
        let backend = CudaBackend::with_kernel_options(ordinal, DType::BF16, kernel_options(args))?;
        let policy = backend.kernel_policy();
        let none = KernelOptions::default();
        if notify && policy != KernelPolicy::resolve(none, none, backend.device_facts()) {
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

#[cfg(test)]
mod tests {
    use clap::Parser;
    use pagoda_engine::{GenerationRequest, SamplingParams};

    use super::*;
    use crate::engine_args::{expand_vllm_short_flags, EngineArgs};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn engine_args(args: &[&str]) -> EngineArgs {
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
        let argv = ["pagoda", "--model", model]
            .into_iter()
            .chain(args.iter().copied())
            .map(std::ffi::OsString::from);
        Cli::try_parse_from(expand_vllm_short_flags(argv)).expect("valid arguments").engine
    }

    /// Loads the engine on the devices given and returns its label and one
    /// prompt's greedy tokens.
    struct Greedy(EngineArgs);

    impl BackendJob for Greedy {
        type Output = (String, Vec<u32>);

        fn run<B: Backend>(self, devices: EngineDevices<B>) -> anyhow::Result<Self::Output> {
            let args = self.0;
            let mut engine = devices.load_engine(args.model_path()?, args.engine_config()?, |_, _| {})?;
            let mut req = GenerationRequest::new("r", vec![1, 17, 42, 99, 7, 123, 250]);
            req.sampling = SamplingParams::greedy();
            req.max_tokens = Some(16);
            req.ignore_eos = true;
            let done = engine.generate(vec![req])?;
            Ok((device_label(&engine), done[0].seqs[0].token_ids.clone()))
        }
    }

    fn greedy(args: &[&str]) -> anyhow::Result<(String, Vec<u32>)> {
        let args = engine_args(args);
        dispatch(args.device, Greedy(args))
    }

    #[test]
    fn the_cpu_runs_one_thread_per_rank_and_gives_the_same_tokens() {
        // A small KV pool per rank: the CPU default is 1 GiB each.
        let (label, want) = greedy(&["--device", "cpu", "--kv-cache-memory", "4MiB"]).unwrap();
        assert_eq!(label, "cpu-ref");
        for tp in ["2", "4"] {
            let (label, got) = greedy(&["--device", "cpu", "--kv-cache-memory", "4MiB", "-tp", tp]).unwrap();
            assert_eq!(label, format!("cpu-ref x {tp} (tensor parallel)"));
            assert_eq!(got, want, "TP {tp}");
        }
    }

    #[test]
    fn dummy_weights_load_from_a_config_alone_and_split_over_ranks() {
        // tiny-llama's shape with an untied lm_head (a tied one makes random
        // weights repeat their last token), and no other file: no weights, no tokenizer.
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama/config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
        config["tie_word_embeddings"] = false.into();
        let dir = std::env::temp_dir().join(format!("pagoda-dummy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let run = |extra: &[&str]| {
            let model = dir.to_str().unwrap();
            let argv = ["pagoda", "--model", model, "--device", "cpu", "--kv-cache-memory", "4MiB"];
            let argv = argv.iter().chain(extra).map(std::ffi::OsString::from);
            let args = Cli::try_parse_from(expand_vllm_short_flags(argv)).expect("valid arguments").engine;
            dispatch(args.device, Greedy(args))
        };
        let refused = run(&[]).expect_err("auto needs weight files");
        let (_, want) = run(&["--load-format", "dummy"]).unwrap();
        let (label, got) = run(&["--load-format", "dummy", "-tp", "2"]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(format!("{refused:#}").contains("--load-format dummy"), "{refused:#}");
        let mut distinct = want.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 4, "random weights, varied tokens: {want:?}");
        assert_eq!(label, "cpu-ref x 2 (tensor parallel)");
        assert_eq!(got, want, "each rank makes its shard of the same model");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_tensor_parallelism_without_cuda_names_the_build() {
        let e = greedy(&["--device", "cuda", "--tensor-parallel-size", "2"]).expect_err("refused");
        assert!(e.to_string().contains("built without CUDA"), "{e}");
    }
}
