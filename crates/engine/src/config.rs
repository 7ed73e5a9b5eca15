//! Engine configuration, with vLLM's option names and defaults where the
//! meaning is the same, and how the KV pool is sized from a memory budget.

use pagoda_backend::{Backend, DType, MemoryInfo};
use pagoda_models::{LoadFormat, ModelConfig};
use pagoda_scheduler::{Policy, PreemptionMode, SchedulerConfig};

use crate::error::EngineError;

/// Everything the engine needs besides the model and the backend.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Tokens per KV block (vLLM `--block-size`).
    pub block_size: usize,
    /// Fixed number of device KV blocks; overrides the memory-based sizing
    /// (vLLM `--num-gpu-blocks-override`).
    pub num_gpu_blocks: Option<usize>,
    /// Fraction of the device's memory the engine may use in all: weights,
    /// activations and KV cache (vLLM `--gpu-memory-utilization`). Used on
    /// devices that report their memory (CUDA).
    pub gpu_memory_utilization: f64,
    /// KV cache bytes on a device without a memory budget of its own (the
    /// CPU backend); `None` means a default of 1 GiB.
    pub kv_cache_memory_bytes: Option<u64>,
    /// Host memory for swapped-out KV blocks, in bytes (vLLM `--swap-space`, in GiB there).
    pub swap_space_bytes: u64,
    /// What the KV cache stores (vLLM `--kv-cache-dtype`): the activation
    /// dtype, or FP8 E4M3 codes with per-layer scales (half the bytes of
    /// bf16, so twice the blocks in the same memory).
    pub kv_cache_dtype: KvCacheDtype,
    /// vLLM `--quantization`: `fp8` quantizes the projections of a 16/32-bit
    /// checkpoint to E4M3 (per output channel) at load. An FP8 checkpoint
    /// (`quantization_config` in config.json) loads as FP8 without it.
    pub quantization: Option<pagoda_models::Quantization>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Longest prompt + output; `None` means the model's own limit.
    pub max_model_len: Option<usize>,
    pub enable_prefix_caching: bool,
    pub enable_chunked_prefill: bool,
    /// Prompts with more tokens than this left to prefill are long, and no
    /// prefill chunk exceeds it (vLLM `--long-prefill-token-threshold`);
    /// `None`: 4% of `max_model_len`, used only to class prompts.
    pub long_prefill_token_threshold: Option<usize>,
    /// Most prompts partially prefilled at once (vLLM
    /// `--max-num-partial-prefills`). Above 1, prompts that compete for a
    /// step share its budget, so short prompts start while long ones prefill;
    /// 1 lets running prefills take the budget first (Pagoda's earlier
    /// behaviour). Ignored without chunked prefill.
    pub max_num_partial_prefills: usize,
    /// Most long prompts partially prefilled at once; further long ones let
    /// shorter ones pass (vLLM `--max-long-partial-prefills`).
    pub max_long_partial_prefills: usize,
    pub preemption_mode: PreemptionMode,
    pub policy: Policy,
    /// Seed for the per-request seeds of requests that give none.
    pub seed: u64,
    /// Never replay recorded graphs: every step launches its kernels one by
    /// one (vLLM `--enforce-eager`).
    pub enforce_eager: bool,
    /// Largest decode batch replayed from a recorded graph; larger decode
    /// steps, and steps with prompt tokens, run eagerly.
    pub max_graph_batch_size: usize,
    /// Schedule and launch step N+1 before waiting for step N's tokens, which
    /// the device feeds into step N+1 itself (vLLM `--async-scheduling`).
    /// Steps whose sampling needs the token history (penalties) or that fork
    /// samples are still waited for.
    pub async_scheduling: bool,
    /// Where the sampling defaults of requests come from (vLLM `--generation-config`).
    pub generation_config: GenerationConfigSource,
    /// Speculative decoding (vLLM `--speculative-config`); `None`: off.
    pub speculative: Option<crate::speculative::SpeculativeConfig>,
    /// Structured outputs: propose the tokens a grammar forces as drafts
    /// (verified, so the output is unchanged; fewer steps where the model
    /// would have written them anyway). At most this many a step; 0: off.
    pub max_fast_forward_tokens: usize,
    /// Multi-LoRA serving (vLLM `--enable-lora` and its limits); `None`: off.
    pub lora: Option<crate::lora::LoraConfig>,
    /// Ranks one model is split over (vLLM `--tensor-parallel-size`); 1: not
    /// split. Above 1 the engine needs one device per rank
    /// ([`crate::load_engine_tensor_parallel`]), and the memory settings
    /// (`gpu_memory_utilization`, `kv_cache_memory_bytes`, `swap_space_bytes`)
    /// are per rank, as vLLM's are per GPU.
    pub tensor_parallel_size: usize,
    /// How the model's weights are read (vLLM `--load-format`): from its
    /// files, or made at random for its config.json's shape (`Dummy`); a
    /// draft model in `speculative` is read the same way.
    pub load_format: LoadFormat,
}

/// The element type of the KV cache, by vLLM's `--kv-cache-dtype` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvCacheDtype {
    /// The activation dtype (vLLM's `auto`).
    #[default]
    Auto,
    /// FP8 E4M3 codes (`fp8`, `fp8_e4m3`), each layer's K and V stored over
    /// the checkpoint's `k_scale`/`v_scale` (1.0 without them).
    Fp8E4M3,
}

impl KvCacheDtype {
    /// The cache's dtype on a backend of `activation` dtype.
    pub fn resolve(self, activation: DType) -> DType {
        match self {
            KvCacheDtype::Auto => activation,
            KvCacheDtype::Fp8E4M3 => DType::F8E4M3,
        }
    }
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(KvCacheDtype::Auto),
            "fp8" | "fp8_e4m3" => Ok(KvCacheDtype::Fp8E4M3),
            "fp8_e5m2" => Err("--kv-cache-dtype fp8_e5m2 is not supported: use fp8 (fp8_e4m3)".into()),
            other => Err(format!("--kv-cache-dtype {other:?}: expected auto, fp8 or fp8_e4m3")),
        }
    }
}

impl std::fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::Fp8E4M3 => "fp8_e4m3",
        })
    }
}

/// Where the sampling defaults (temperature, top-p...) a request leaves
/// out come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum GenerationConfigSource {
    /// The model's generation_config.json (vLLM's `auto`).
    #[default]
    Model,
    /// None: OpenAI's defaults (vLLM's `vllm`).
    Builtin,
    /// The generation_config.json of this folder.
    Folder(std::path::PathBuf),
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_gpu_blocks: None,
            gpu_memory_utilization: 0.9,
            kv_cache_memory_bytes: None,
            swap_space_bytes: 1 << 30,
            kv_cache_dtype: KvCacheDtype::Auto,
            quantization: None,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_model_len: None,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            long_prefill_token_threshold: None,
            max_num_partial_prefills: 4,
            max_long_partial_prefills: 1,
            preemption_mode: PreemptionMode::Recompute,
            policy: Policy::Fcfs,
            seed: 0,
            enforce_eager: false,
            max_graph_batch_size: 256,
            async_scheduling: true,
            generation_config: GenerationConfigSource::Model,
            speculative: None,
            max_fast_forward_tokens: 16,
            lora: None,
            tensor_parallel_size: 1,
            load_format: LoadFormat::Auto,
        }
    }
}

/// Default KV cache size on a backend that has no memory budget of its own.
pub const DEFAULT_CPU_KV_CACHE_BYTES: u64 = 1 << 30;

impl EngineConfig {
    /// The effective context length: the configured one, capped by the model's.
    pub fn max_model_len(&self, model: &ModelConfig) -> usize {
        self.max_model_len.unwrap_or(model.max_position_embeddings).min(model.max_position_embeddings)
    }

    /// Refuses a configured context length above the model's own (vLLM
    /// refuses it too): positions past the trained ones give wrong outputs.
    pub fn check_max_model_len(&self, model: &ModelConfig) -> Result<(), EngineError> {
        match self.max_model_len {
            Some(len) if len > model.max_position_embeddings => Err(EngineError::Config(format!(
                "--max-model-len {len} is greater than the model's maximum context length of {} tokens \
                 (max_position_embeddings in its config); use at most {}",
                model.max_position_embeddings, model.max_position_embeddings
            ))),
            _ => Ok(()),
        }
    }

    /// Makes sure the KV cache of `num_gpu_blocks` blocks holds one sequence
    /// of the context length. A --max-model-len given that does not fit is
    /// an error naming both numbers (as in vLLM); the model's own length is
    /// lowered to the cache's size instead, with a warning.
    pub fn fit_max_model_len_to_kv_cache(
        &mut self,
        model: &ModelConfig,
        num_gpu_blocks: usize,
    ) -> Result<(), EngineError> {
        let max_model_len = self.max_model_len(model);
        let capacity = num_gpu_blocks.saturating_mul(self.block_size);
        if max_model_len <= capacity {
            return Ok(());
        }
        if self.max_model_len.is_some() {
            return Err(EngineError::Config(format!(
                "the KV cache holds {capacity} tokens ({num_gpu_blocks} blocks of {}), fewer than one \
                 sequence of --max-model-len {max_model_len} tokens needs; lower --max-model-len to at \
                 most {capacity}, or give the KV cache more memory (--gpu-memory-utilization, \
                 --kv-cache-memory or --num-gpu-blocks-override)",
                self.block_size
            )));
        }
        tracing::warn!(
            model_max_len = max_model_len,
            kv_cache_tokens = capacity,
            "the KV cache holds {capacity} tokens, fewer than the model's context of {max_model_len}: \
             max_model_len lowered to {capacity} (give the KV cache more memory to serve longer sequences)"
        );
        self.max_model_len = Some(capacity);
        Ok(())
    }

    pub fn scheduler_config(&self, model: &ModelConfig) -> SchedulerConfig {
        let max_model_len = self.max_model_len(model);
        SchedulerConfig {
            // Without chunking a whole prompt must fit in one step.
            max_num_batched_tokens: if self.enable_chunked_prefill {
                self.max_num_batched_tokens
            } else {
                self.max_num_batched_tokens.max(max_model_len)
            },
            max_num_seqs: self.max_num_seqs,
            max_model_len,
            enable_chunked_prefill: self.enable_chunked_prefill,
            preemption_mode: self.preemption_mode,
            policy: self.policy,
            long_prefill_token_threshold: self.long_prefill_token_threshold,
            // Without chunking no prompt is ever partially prefilled.
            max_num_partial_prefills: if self.enable_chunked_prefill {
                self.max_num_partial_prefills
            } else {
                1
            },
            max_long_partial_prefills: if self.enable_chunked_prefill {
                self.max_long_partial_prefills
            } else {
                1
            },
            async_scheduling: self.async_scheduling,
            max_loras: self.lora.as_ref().map(|l| l.max_loras),
        }
    }

    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Config(m));
        if let Some(lora) = &self.lora {
            lora.validate()?;
            if let Some(q) = self.quantization {
                return bad(format!(
                    "--quantization {q} with --enable-lora: LoRA on FP8 weights is not supported"
                ));
            }
        }
        if let (Some(q), tp @ 2..) = (self.quantization, self.tensor_parallel_size) {
            return bad(format!(
                "--quantization {q} with --tensor-parallel-size {tp}: FP8 weights are not sharded yet"
            ));
        }
        if !matches!(self.block_size, 8 | 16 | 32 | 64 | 128) {
            return bad(format!("block size must be one of 8, 16, 32, 64, 128, got {}", self.block_size));
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return bad(format!(
                "gpu memory utilization must be in (0, 1], got {}",
                self.gpu_memory_utilization
            ));
        }
        if self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            return bad("max-num-seqs and max-num-batched-tokens must be positive".into());
        }
        if self.max_model_len == Some(0) {
            return bad("max-model-len must be positive".into());
        }
        if self.long_prefill_token_threshold == Some(0) {
            return bad("long-prefill-token-threshold must be positive".into());
        }
        if self.max_num_partial_prefills == 0 || self.max_long_partial_prefills == 0 {
            return bad("max-num-partial-prefills and max-long-partial-prefills must be positive".into());
        }
        self.validate_tensor_parallel()?;
        if self.max_long_partial_prefills > self.max_num_partial_prefills {
            return bad(format!(
                "max-long-partial-prefills ({}) must not exceed max-num-partial-prefills ({})",
                self.max_long_partial_prefills, self.max_num_partial_prefills
            ));
        }
        Ok(())
    }

    /// Refuses, by flag, what does not run split over ranks yet.
    fn validate_tensor_parallel(&self) -> Result<(), EngineError> {
        let tp = self.tensor_parallel_size;
        if tp == 0 {
            return Err(EngineError::Config("--tensor-parallel-size must be at least 1".into()));
        }
        if tp > 1 && self.lora.is_some() {
            return Err(EngineError::Config(format!(
                "--enable-lora is not supported with --tensor-parallel-size {tp}: LoRA adapters are not \
                 split across ranks yet"
            )));
        }
        let draft_model = matches!(
            self.speculative.as_ref().map(|s| &s.method),
            Some(crate::speculative::SpeculativeMethod::DraftModel { .. })
        );
        if tp > 1 && draft_model {
            return Err(EngineError::Config(format!(
                "--speculative-config with a draft model is not supported with --tensor-parallel-size \
                 {tp}: the draft model is not split across ranks yet (n-gram prompt lookup, \
                 \"method\": \"ngram\", is)"
            )));
        }
        Ok(())
    }

    /// Bytes of one KV block on one rank: K and V of every layer for the KV
    /// heads the rank holds. Every rank of a tensor-parallel group holds the
    /// same block ids, each for its own share of the heads (`num_kv_heads /
    /// tensor_parallel_size`, or one replicated head when the ranks outnumber
    /// them), so a rank's memory budget divided by this is the number of
    /// blocks of the whole engine. Unsplit, it is the whole model's.
    pub fn kv_cache_bytes_per_block_per_rank(&self, model: &ModelConfig, dtype: DType) -> u64 {
        let whole = model.kv_cache_bytes_per_block(self.block_size, dtype) as u64;
        let heads = model.num_kv_heads as u64;
        let tp = self.tensor_parallel_size.max(1) as u64;
        let rank_heads = if heads >= tp { heads / tp } else { 1 };
        whole / heads.max(1) * rank_heads
    }

    /// Device KV blocks: the override, else what the memory budget allows.
    ///
    /// On a device that reports memory, the budget is
    /// `total * gpu_memory_utilization - (memory already in use, i.e. the
    /// weights) - an activation reserve for the largest step`; elsewhere it is
    /// `kv_cache_memory_bytes`. Budgets and blocks are one rank's
    /// ([`Self::kv_cache_bytes_per_block_per_rank`]); a tensor-parallel
    /// engine takes the smallest count any rank allows.
    pub fn num_gpu_blocks<B: Backend>(
        &self,
        backend: &B,
        model: &ModelConfig,
        memory_after_weights: Option<MemoryInfo>,
    ) -> Result<usize, EngineError> {
        if let Some(n) = self.num_gpu_blocks {
            return Ok(n);
        }
        let block_bytes = self.kv_cache_bytes_per_block_per_rank(model, self.kv_cache_dtype_on(backend));
        let budget = match memory_after_weights {
            Some(mem) if mem.total_bytes > 0 && !backend.is_host_memory() => {
                let allowed = (mem.total_bytes as f64 * self.gpu_memory_utilization) as u64;
                let in_use = mem.total_bytes - mem.free_bytes;
                let reserve = self.activation_reserve_bytes(model, backend);
                allowed.saturating_sub(in_use).saturating_sub(reserve).min(mem.free_bytes)
            }
            _ => self.kv_cache_memory_bytes.unwrap_or(DEFAULT_CPU_KV_CACHE_BYTES),
        };
        let blocks = (budget / block_bytes) as usize;
        if blocks == 0 {
            return Err(EngineError::Config(format!(
                "no memory left for the KV cache: {budget} bytes allow {blocks} blocks of {block_bytes} bytes"
            )));
        }
        Ok(blocks)
    }

    /// The KV cache's dtype on `backend` ([`KvCacheDtype::resolve`]).
    pub fn kv_cache_dtype_on<B: Backend>(&self, backend: &B) -> DType {
        self.kv_cache_dtype.resolve(backend.activation_dtype())
    }

    /// Host swap blocks the swap space holds (each rank has a swap space of
    /// its own, for its KV heads), in the cache's bytes per block.
    pub fn num_cpu_blocks<B: Backend>(&self, backend: &B, model: &ModelConfig) -> usize {
        let block_bytes = self.kv_cache_bytes_per_block_per_rank(model, self.kv_cache_dtype_on(backend));
        if self.preemption_mode == PreemptionMode::Swap {
            (self.swap_space_bytes / block_bytes) as usize
        } else {
            0
        }
    }

    /// A generous bound on the activation memory of the largest step: the
    /// residual stream, q/k/v, attention output, the FFN's gate/up and the
    /// logits of every sampled row (at most `max_num_seqs`), doubled for the
    /// allocator's slack.
    fn activation_reserve_bytes<B: Backend>(&self, model: &ModelConfig, backend: &B) -> u64 {
        let t = self.max_num_batched_tokens as u64;
        let e = backend.activation_dtype().size_in_bytes() as u64;
        let per_token =
            (4 * model.hidden_size + 2 * model.qkv_size() + 3 * model.intermediate_size) as u64 * e;
        let logits = self.max_num_seqs as u64 * model.vocab_size as u64 * 4 * 2;
        2 * (t * per_token + logits) + (256 << 20)
    }
}
