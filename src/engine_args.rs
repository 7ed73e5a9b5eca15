//! Engine options shared by `generate`, `serve` and `bench`, named as vLLM
//! names them where the meaning is the same.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use pagoda_engine::{
    EngineConfig, GenerationConfigSource, KvCacheDtype, LoadFormat, LoraConfig, Policy, PreemptionMode,
    SpeculativeConfig,
};

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA when this build has it and a GPU is present, else the CPU.
    Auto,
    /// The CPU reference backend (f32).
    Cpu,
    /// The CUDA backend (bf16); needs a build with `--features cuda`.
    Cuda,
}

/// On or off, for a switch whose default belongs to someone else (the environment, the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    // Read only by the CUDA backend's options (and the tests).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn is_on(self) -> bool {
        self == Switch::On
    }
}

/// Context tokens per decode-attention partition (the CUDA kernels are built for these).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DecodePartitionArg {
    /// Chosen per launch from the batch, the context and the GPU's SM count.
    Auto,
    #[value(name = "64")]
    T64,
    #[value(name = "128")]
    T128,
    #[value(name = "256")]
    T256,
    #[value(name = "512")]
    T512,
    #[value(name = "1024")]
    T1024,
}

impl DecodePartitionArg {
    /// The forced partition size; `None` for `auto`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn tokens(self) -> Option<u32> {
        match self {
            Self::Auto => None,
            Self::T64 => Some(64),
            Self::T128 => Some(128),
            Self::T256 => Some(256),
            Self::T512 => Some(512),
            Self::T1024 => Some(1024),
        }
    }
}

/// The device, how many of them one model is split over, and switches of
/// the kernels for experiments. Each `--kernel-*` flag given wins over its
/// `PAGODA_*` environment variable, which wins over the GPU's own default;
/// they apply to the CUDA backend only.
#[derive(Args, Clone, Copy, Debug)]
pub struct DeviceArgs {
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Split the model over this many ranks, one device each (vLLM's flag,
    /// also `-tp N`): attention heads and FFN columns are divided, and each
    /// rank's KV cache holds its KV heads. The CPU backend runs one thread
    /// per rank; CUDA one GPU per rank (GPU r for rank r), joined by NCCL,
    /// with --enforce-eager for now.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub tensor_parallel_size: usize,
    /// CUDA: context tokens per decode-attention partition (default: auto, or
    /// $PAGODA_DECODE_PARTITION).
    #[arg(long, value_enum, value_name = "TOKENS")]
    pub kernel_decode_partition: Option<DecodePartitionArg>,
    /// CUDA: programmatic dependent launch, on sm_90 and newer (default: on,
    /// off with PAGODA_DISABLE_PDL=1).
    #[arg(long, value_enum)]
    pub kernel_pdl: Option<Switch>,
    /// CUDA: the weight-streaming GEMVs for products of few token rows (up to
    /// 16); off sends every product to cuBLAS (default: on, off with
    /// PAGODA_DISABLE_GEMV=1).
    #[arg(long, value_enum)]
    pub kernel_gemv: Option<Switch>,
    /// CUDA: the fewest token rows a product needs to take the tensor-core
    /// GEMV rather than the CUDA-core one; 17 never takes it (default: 3, or
    /// $PAGODA_GEMV_MMA_MIN_TOKENS).
    #[arg(long, value_name = "ROWS", value_parser = clap::value_parser!(u32).range(1..=17))]
    pub kernel_gemv_mma_min_tokens: Option<u32>,
    /// CUDA: decode attention over an FP8 KV cache on the tensor cores (f16
    /// operands, f32 sums) rather than the CUDA cores (default: off, on with
    /// PAGODA_DECODE_ATTENTION_MMA=1).
    #[arg(long, value_enum)]
    pub kernel_decode_attention_mma: Option<Switch>,
}

impl DeviceArgs {
    /// Whether any `--kernel-*` flag was given.
    pub fn any_kernel_flag(&self) -> bool {
        self.kernel_decode_partition.is_some()
            || self.kernel_pdl.is_some()
            || self.kernel_gemv.is_some()
            || self.kernel_gemv_mma_min_tokens.is_some()
            || self.kernel_decode_attention_mma.is_some()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PreemptionArg {
    Recompute,
    Swap,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    Fcfs,
    Priority,
}

#[derive(Args, Clone, Debug)]
pub struct EngineArgs {
    /// A Hugging Face model folder (config.json, *.safetensors, tokenizer.json),
    /// a folder holding one .gguf file, or a .gguf file.
    /// (`pagoda serve` also takes it as its first argument, as `vllm serve MODEL` does.)
    #[arg(long, env = "PAGODA_MODEL", required = true)]
    pub model: Option<PathBuf>,
    /// How the weights are read (vLLM's flag): auto (the folder's safetensors
    /// or the GGUF file), safetensors, gguf, or dummy: random weights of the
    /// shape of the folder's config.json, made on the device (no weight files
    /// needed; a model without tokenizer.json takes token ids only).
    #[arg(long, default_value = "auto", value_parser = parse_load_format, value_name = "auto|safetensors|gguf|dummy")]
    pub load_format: LoadFormat,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Where the sampling defaults of requests come from (vLLM's flag): `auto`, the model's
    /// generation_config.json; `vllm`, none (OpenAI's defaults); or a folder holding a
    /// generation_config.json.
    #[arg(long, default_value = "auto")]
    pub generation_config: String,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Fraction of GPU memory for weights, activations and KV cache.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Use exactly this many KV-cache blocks (overrides memory-based sizing).
    #[arg(long, alias = "kv-cache-blocks")]
    pub num_gpu_blocks_override: Option<usize>,
    /// KV-cache size on the CPU backend, e.g. 512MiB, 2GiB or bytes (default 1GiB).
    #[arg(long, value_parser = parse_bytes)]
    pub kv_cache_memory: Option<u64>,
    /// CPU swap space for preempted sequences, in GiB (used with --preemption-mode swap).
    #[arg(long, default_value_t = 4.0)]
    pub swap_space: f64,
    /// What the KV cache stores: auto (the activation dtype) or fp8 / fp8_e4m3
    /// (E4M3 codes over the checkpoint's per-layer k_scale/v_scale, else 1.0:
    /// twice the blocks of a bf16 cache). fp8_e5m2 is not supported.
    #[arg(long, default_value = "auto", value_parser = parse_kv_cache_dtype, value_name = "auto|fp8|fp8_e4m3")]
    pub kv_cache_dtype: KvCacheDtype,
    /// Quantize weights at load (vLLM's flag): fp8 stores q/k/v, o, gate/up and
    /// down as E4M3 with a scale per output channel (half the bytes of bf16);
    /// embeddings, the LM head and norms stay. FP8 checkpoints (config.json's
    /// quantization_config: fp8, compressed-tensors float) load as FP8 without it.
    #[arg(long, value_name = "fp8")]
    pub quantization: Option<pagoda_models::Quantization>,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Token budget of one engine step (prefill and decode tokens together).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Longest prompt + output (default: the model's own limit).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Reuse the KV of shared prompt prefixes (on by default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enable_prefix_caching: bool,
    /// Turn prefix caching off.
    #[arg(long, conflicts_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// Split long prompts across steps so decodes keep flowing (on by default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enable_chunked_prefill: bool,
    /// Prompts with more tokens than this left to prefill are long, and no
    /// prefill chunk exceeds it (default: none; with
    /// --max-num-partial-prefills above 1, prompts above 4% of
    /// --max-model-len count as long, and chunks are not capped).
    #[arg(long)]
    pub long_prefill_token_threshold: Option<usize>,
    /// Most prompts partially prefilled at once. Above 1, prompts competing
    /// for a step share its token budget, so a short prompt starts at once
    /// beside long ones; 1 lets running prefills take the budget first.
    #[arg(long, default_value_t = 4)]
    pub max_num_partial_prefills: usize,
    /// Most long prompts (see --long-prefill-token-threshold) partially
    /// prefilled at once; shorter prompts pass further long ones.
    #[arg(long, default_value_t = 1)]
    pub max_long_partial_prefills: usize,
    #[arg(long, value_enum, default_value_t = PreemptionArg::Recompute)]
    pub preemption_mode: PreemptionArg,
    #[arg(long, value_enum, default_value_t = PolicyArg::Fcfs)]
    pub scheduling_policy: PolicyArg,
    /// Seed of the engine (vLLM's --seed): every request that gives no seed
    /// of its own gets one drawn from it, so a run with the same seed, requests
    /// and options samples the same tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Launch every kernel of every step one by one: no recorded (CUDA) graphs.
    #[arg(long)]
    pub enforce_eager: bool,
    /// Largest decode batch replayed from a recorded graph (larger ones run eagerly).
    #[arg(long, default_value_t = 256)]
    pub max_graph_batch_size: usize,
    /// Schedule and launch each step while the device still runs the one
    /// before (on by default; vLLM `--async-scheduling`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub async_scheduling: bool,
    /// Turn asynchronous scheduling off: each step waits for the one before.
    #[arg(long, conflicts_with = "async_scheduling")]
    pub no_async_scheduling: bool,
    /// Speculative decoding, as vLLM's flag spells it (JSON):
    /// '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
    /// or '{"model": DRAFT_MODEL, "num_speculative_tokens": 4}'; optional
    /// "disable_by_batch_size" and "min_acceptance_rate" (default 0.1).
    #[arg(long)]
    pub speculative_config: Option<String>,
    /// Structured outputs: propose up to this many tokens a grammar forces as
    /// drafts each step, verified as speculative drafts are (the output is
    /// unchanged; 0 turns it off).
    #[arg(long, default_value_t = 16)]
    pub max_fast_forward_tokens: usize,
    /// Serve LoRA adapters (vLLM's flag): `pagoda serve` takes them from --lora-modules
    /// and, with --allow-runtime-lora-updating, from /v1/load_lora_adapter.
    #[arg(long)]
    pub enable_lora: bool,
    /// LoRA: adapters on the device at once, and most distinct adapters in one step.
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,
    /// LoRA: the largest adapter rank served (one of 1, 8, 16, 32, 64, 128, 256, 320, 512).
    #[arg(long, default_value_t = 16)]
    pub max_lora_rank: usize,
    /// LoRA: adapters kept in host memory when no request uses them (default: --max-loras).
    #[arg(long)]
    pub max_cpu_loras: Option<usize>,
}

impl EngineArgs {
    /// The model path (clap requires it, except for `pagoda serve MODEL`).
    pub fn model_path(&self) -> anyhow::Result<&std::path::Path> {
        self.model
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("no model given: pass --model PATH (or set PAGODA_MODEL)"))
    }

    pub fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        if !(self.swap_space >= 0.0 && self.swap_space.is_finite()) {
            bail!("--swap-space must be a non-negative number of GiB");
        }
        let config = EngineConfig {
            block_size: self.block_size,
            num_gpu_blocks: self.num_gpu_blocks_override,
            gpu_memory_utilization: self.gpu_memory_utilization,
            kv_cache_memory_bytes: self.kv_cache_memory,
            swap_space_bytes: (self.swap_space * (1u64 << 30) as f64) as u64,
            kv_cache_dtype: self.kv_cache_dtype,
            quantization: self.quantization,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_model_len: self.max_model_len,
            enable_prefix_caching: self.enable_prefix_caching && !self.no_enable_prefix_caching,
            enable_chunked_prefill: self.enable_chunked_prefill,
            long_prefill_token_threshold: self.long_prefill_token_threshold,
            max_num_partial_prefills: self.max_num_partial_prefills,
            max_long_partial_prefills: self.max_long_partial_prefills,
            preemption_mode: match self.preemption_mode {
                PreemptionArg::Recompute => PreemptionMode::Recompute,
                PreemptionArg::Swap => PreemptionMode::Swap,
            },
            policy: match self.scheduling_policy {
                PolicyArg::Fcfs => Policy::Fcfs,
                PolicyArg::Priority => Policy::Priority,
            },
            seed: self.seed,
            enforce_eager: self.enforce_eager,
            max_graph_batch_size: self.max_graph_batch_size,
            async_scheduling: self.async_scheduling && !self.no_async_scheduling,
            generation_config: match self.generation_config.as_str() {
                "auto" => GenerationConfigSource::Model,
                "vllm" => GenerationConfigSource::Builtin,
                folder => GenerationConfigSource::Folder(PathBuf::from(folder)),
            },
            speculative: self
                .speculative_config
                .as_deref()
                .map(SpeculativeConfig::from_json)
                .transpose()
                .map_err(|e| anyhow::anyhow!(e))?,
            max_fast_forward_tokens: self.max_fast_forward_tokens,
            lora: self.enable_lora.then(|| LoraConfig {
                max_loras: self.max_loras,
                max_lora_rank: self.max_lora_rank,
                max_cpu_loras: self.max_cpu_loras.unwrap_or(self.max_loras),
            }),
            tensor_parallel_size: self.device.tensor_parallel_size,
            load_format: self.load_format,
        };
        config.validate().context("invalid engine options")?;
        Ok(config)
    }
}

/// The command line with vLLM's one-dash `-tp N` (and `-tp=N`) spelled
/// `--tensor-parallel-size`: clap's short flags are one character, and
/// scripts written for vLLM use `-tp`. Arguments after `--` are left alone.
pub fn expand_vllm_short_flags(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut literal = false;
    args.into_iter()
        .map(|arg| {
            if literal {
                return arg;
            }
            match arg.to_str() {
                Some("--") => {
                    literal = true;
                    arg
                }
                Some("-tp") => OsString::from("--tensor-parallel-size"),
                Some(s) if s.starts_with("-tp=") => {
                    OsString::from(format!("--tensor-parallel-size={}", &s[4..]))
                }
                _ => arg,
            }
        })
        .collect()
}

/// `--kv-cache-dtype`, by vLLM's names ([`KvCacheDtype`]'s `FromStr`).
fn parse_kv_cache_dtype(s: &str) -> Result<KvCacheDtype, String> {
    s.parse()
}

/// `--load-format`, by vLLM's names ([`LoadFormat`]'s `FromStr`: its other
/// formats are refused by name).
fn parse_load_format(s: &str) -> Result<LoadFormat, String> {
    s.parse()
}

/// Parses `1024`, `512KiB`, `512MiB`, `2GiB` (also KB/MB/GB, K/M/G, powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    Ok((value * scale as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("GiB").is_err());
    }

    #[test]
    fn quantization_takes_vllms_fp8_and_refuses_others_by_name() {
        use pagoda_models::Quantization;
        assert_eq!(engine_config(&[]).unwrap().quantization, None);
        assert_eq!(engine_config(&["--quantization", "fp8"]).unwrap().quantization, Some(Quantization::Fp8));
        let err = engine_config(&["--quantization", "awq"]).unwrap_err().to_string();
        assert!(err.contains("awq is not supported"), "{err}");
        let with = |extra: &[&str]| {
            format!("{:#}", engine_config(&[&["--quantization", "fp8"], extra].concat()).unwrap_err())
        };
        let err = with(&["--enable-lora"]);
        assert!(err.contains("--quantization fp8 with --enable-lora"), "{err}");
        let err = with(&["--tensor-parallel-size", "2"]);
        assert!(err.contains("--tensor-parallel-size 2"), "{err}");
    }

    #[test]
    fn kv_cache_dtypes_parse_by_vllms_names() {
        assert_eq!(parse_kv_cache_dtype("auto"), Ok(KvCacheDtype::Auto));
        assert_eq!(parse_kv_cache_dtype("fp8"), Ok(KvCacheDtype::Fp8E4M3));
        assert_eq!(parse_kv_cache_dtype("fp8_e4m3"), Ok(KvCacheDtype::Fp8E4M3));
        assert!(parse_kv_cache_dtype("fp8_e5m2").is_err_and(|e| e.contains("fp8_e5m2 is not supported")));
        assert!(parse_kv_cache_dtype("int8").is_err_and(|e| e.contains("auto, fp8 or fp8_e4m3")));
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        device: DeviceArgs,
    }

    fn parse(args: &[&str]) -> Result<DeviceArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("pagoda").chain(args.iter().copied())).map(|c| c.device)
    }

    #[test]
    fn kernel_flags_parse_and_are_unset_by_default() {
        let d = parse(&[]).unwrap();
        assert_eq!(d.device, Device::Auto);
        assert!(!d.any_kernel_flag());
        let d =
            parse(&["--device", "cuda", "--kernel-decode-partition", "256", "--kernel-pdl", "off"]).unwrap();
        assert_eq!(d.kernel_decode_partition.and_then(DecodePartitionArg::tokens), Some(256));
        assert_eq!(d.kernel_pdl, Some(Switch::Off));
        assert_eq!(d.kernel_gemv, None);
        assert!(d.any_kernel_flag());
        let d = parse(&["--kernel-gemv", "on", "--kernel-decode-partition", "auto"]).unwrap();
        assert!(d.kernel_gemv.is_some_and(Switch::is_on));
        assert_eq!(d.kernel_decode_partition, Some(DecodePartitionArg::Auto));
        assert!(parse(&["--kernel-decode-partition", "100"]).is_err());
        assert!(parse(&["--kernel-pdl", "maybe"]).is_err());
    }

    #[derive(clap::Parser, Debug)]
    struct EngineCli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn engine_config(args: &[&str]) -> anyhow::Result<EngineConfig> {
        use clap::Parser;
        let argv = ["pagoda", "--model", "m"].into_iter().chain(args.iter().copied());
        EngineCli::try_parse_from(argv)?.engine.engine_config()
    }

    #[test]
    fn lora_flags_build_the_engines_lora_config() {
        assert_eq!(engine_config(&[]).unwrap().lora, None, "off without --enable-lora");
        let lora = engine_config(&["--enable-lora"]).unwrap().lora.unwrap();
        assert_eq!(lora, LoraConfig { max_loras: 1, max_lora_rank: 16, max_cpu_loras: 1 }, "vLLM's defaults");
        let lora =
            engine_config(&["--enable-lora", "--max-loras", "4", "--max-lora-rank", "64"]).unwrap().lora;
        assert_eq!(lora, Some(LoraConfig { max_loras: 4, max_lora_rank: 64, max_cpu_loras: 4 }));
        let lora =
            engine_config(&["--enable-lora", "--max-loras", "2", "--max-cpu-loras", "8"]).unwrap().lora;
        assert_eq!(lora.map(|l| l.max_cpu_loras), Some(8));
        for bad in [
            &["--enable-lora", "--max-lora-rank", "12"][..],
            &["--enable-lora", "--max-loras", "0"],
            &["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"],
        ] {
            let e = engine_config(bad).expect_err("refused");
            assert!(format!("{e:#}").contains("--max-"), "{bad:?}: {e:#}");
        }
    }

    #[test]
    fn tensor_parallel_size_is_vllms_flag_with_its_short_spelling() {
        assert_eq!(engine_config(&[]).unwrap().tensor_parallel_size, 1);
        let argv = |args: &[&str]| -> Vec<OsString> {
            let all = ["pagoda", "--model", "m"].iter().chain(args).map(OsString::from);
            expand_vllm_short_flags(all)
        };
        for args in [&["--tensor-parallel-size", "3"][..], &["-tp", "3"], &["-tp=3"]] {
            use clap::Parser;
            let engine = EngineCli::try_parse_from(argv(args)).expect("parses").engine;
            assert_eq!(engine.engine_config().unwrap().tensor_parallel_size, 3, "{args:?}");
        }
        let after_dashes = expand_vllm_short_flags(["--", "-tp"].map(OsString::from));
        assert_eq!(after_dashes, ["--", "-tp"], "a literal argument is left alone");
        let e = engine_config(&["--tensor-parallel-size", "0"]).expect_err("refused");
        assert!(format!("{e:#}").contains("--tensor-parallel-size must be at least 1"), "{e:#}");
        let e = engine_config(&["--tensor-parallel-size", "2", "--enable-lora"]).expect_err("refused");
        assert!(format!("{e:#}").contains("--enable-lora is not supported with --tensor-parallel-size 2"));
    }

    #[test]
    fn load_formats_are_vllms_names_and_the_others_are_refused_by_name() {
        assert_eq!(engine_config(&[]).unwrap().load_format, LoadFormat::Auto);
        let dummy = engine_config(&["--load-format", "dummy"]).unwrap();
        assert_eq!(dummy.load_format, LoadFormat::Dummy);
        for (bad, says) in [
            ("pt", "--load-format pt is not supported"),
            ("bitsandbytes", "--load-format bitsandbytes is not supported"),
            ("random", "expected auto, safetensors, gguf or dummy"),
        ] {
            let e = engine_config(&["--load-format", bad]).expect_err("refused");
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn decode_partition_flags_are_the_kernels_sizes() {
        // The sizes pagoda-backend-cuda's DECODE_PARTITIONS lists (not a
        // dependency of a build without CUDA, hence the copy).
        let sizes: Vec<u32> =
            DecodePartitionArg::value_variants().iter().filter_map(|v| v.tokens()).collect();
        assert_eq!(sizes, [64, 128, 256, 512, 1024]);
        for v in DecodePartitionArg::value_variants() {
            let name = v.to_possible_value().expect("no hidden values").get_name().to_string();
            assert_eq!(name, v.tokens().map_or("auto".to_string(), |t| t.to_string()));
        }
    }
}
