//! Pagoda's engine: where the scheduler, the paged KV cache, the model and the
//! sampler meet.
//!
//! - [`LlmEngine`] is the synchronous engine, three stages in a row. The
//!   [`InputProcessor`] checks a request against the model and the engine's
//!   limits, once, and resolves its defaults into an [`EngineCoreRequest`].
//!   The engine core runs each iteration of continuous batching
//!   ([`LlmEngine::step`]) on token ids: the scheduler picks what runs and
//!   decides every token-level finish, the [`ModelRunner`] moves blocks
//!   (swap, copy-on-write) and runs one forward pass over every scheduled
//!   token, the backend samples. The output processor turns the tokens into
//!   text deltas (incremental detokenization, stop strings, logprobs) and
//!   per-request metrics; a sample a stop string ends goes back to the core
//!   the way an abort does.
//! - [`AsyncEngine`] runs an `LlmEngine` on its own thread, fed through
//!   channels: the HTTP server submits requests and streams their outputs;
//!   dropping a stream aborts its request and frees its blocks.
//! - [`EngineMetrics`] holds the Prometheus metrics the server exposes.
//! - [`load_engine_tensor_parallel`] splits the model over several ranks
//!   (devices), one scheduler and block allocator deciding for all of them.
//!
//! ```no_run
//! use pagoda_backend_cpu_ref::CpuBackend;
//! use pagoda_engine::{load_engine, EngineConfig, GenerationRequest};
//!
//! let mut engine = load_engine(CpuBackend::new(), "models/smollm2-135m-instruct", EngineConfig::default(), |_, _| {})?;
//! let prompt = engine.tokenizer().encode("The capital of France is", true)?;
//! let mut req = GenerationRequest::new("r0", prompt);
//! req.sampling = pagoda_engine::SamplingParams::greedy();
//! let done = engine.generate(vec![req])?;
//! println!("{}", done[0].seqs[0].text);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod async_engine;
mod batch;
mod config;
mod constraint;
mod detokenizer;
mod draft_model;
mod engine;
mod engine_core;
mod error;
mod graphs;
mod input;
mod kv_view;
mod lora;
mod metrics;
mod output;
mod output_processor;
mod request;
mod runner;
mod speculative;
mod stop;
mod tensor_parallel;

use std::path::Path;
use std::sync::Arc;

pub use async_engine::{
    AsyncEngine, AsyncEngineOptions, RequestStream, StreamError, SubmitError, DEFAULT_MAX_PENDING_SEQS,
};
pub use batch::{
    BlockTableSource, PersistentBatch, PreparedStep, PromptLogprobRows, SampleTarget, StepInputs,
    Verifications, VerifyRow,
};
pub use config::{EngineConfig, GenerationConfigSource, KvCacheDtype, DEFAULT_CPU_KV_CACHE_BYTES};
pub use constraint::{FixedTokenSet, TokenConstraint, TokenConstraintFactory};
pub use detokenizer::{IncrementalDetokenizer, TokenDecoder};
pub use draft_model::DraftModel;
pub use engine::LlmEngine;
pub use engine_core::{FastForwardStats, StepTimings};
pub use error::EngineError;
pub use graphs::{capture_sizes, is_graphable, Bucket, GraphStats, PaddedDecodeInputs};
pub use input::{EngineCoreRequest, InputProcessor, ModelInfo, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS};
pub use kv_view::{KvView, KvViewSource, SeqView};
pub use lora::{LoraCache, LoraConfig, LoraRequest, LoraSlotTable, SUPPORTED_LORA_RANKS};
pub use metrics::EngineMetrics;
pub use output::{CompletedRequest, CompletedSeq};
/// How the model's weights are read ([`EngineConfig::load_format`]).
pub use pagoda_models::LoadFormat;
/// The block states and counts a [`KvView`] reports.
pub use pagoda_paged_kv::{BlockCounts, BlockState};
pub use pagoda_sampler::SamplingParams;
pub use pagoda_scheduler::{Policy, PreemptionMode, SeqStatus};
pub use request::{
    fairness_group, FinishReason, GenerationRequest, PromptLogprob, RequestOutput, SeqDelta, StopReason,
    TokenLogprob,
};
pub use runner::{ModelRunner, PhaseTotal, RunnerTimings};
pub use speculative::{
    accepted_prefix, DraftRequest, NgramProposer, Proposer, SpecDecodeStats, Speculation, SpeculativeConfig,
    SpeculativeMethod, DEFAULT_MIN_ACCEPTANCE_RATE, MAX_SPECULATIVE_TOKENS, MAX_STEPS_WITHOUT_DRAFTS,
    MIN_PROBE_INTERVAL, PROBE_INTERVAL, PROBE_SEQS,
};
pub use stop::{StopChecker, StopMatch, StopScan, MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES};
pub use tensor_parallel::RankStart;

use pagoda_backend::Backend;
use pagoda_models::{GenerationConfig, LoadOptions, ModelFiles, TpShard};

use crate::tensor_parallel::{check_comm, RankGroup, RankLoad};

/// Opens a model folder or GGUF file, uploads its weights to `backend`
/// (reporting `(done_bytes, total_bytes)`), and builds an engine. With
/// `config.load_format` [`LoadFormat::Dummy`] the folder needs only
/// config.json: the backend fills random weights of its shape in place.
pub fn load_engine<B: Backend>(
    backend: B,
    model_path: impl AsRef<Path>,
    config: EngineConfig,
    mut progress: impl FnMut(u64, u64),
) -> Result<LlmEngine<B>, EngineError> {
    if config.tensor_parallel_size != 1 {
        return Err(EngineError::Config(format!(
            "--tensor-parallel-size {} needs one device per rank: load the engine with \
             load_engine_tensor_parallel",
            config.tensor_parallel_size
        )));
    }
    let (files, options) = open_model(model_path.as_ref(), &config)?;
    let model = files.load_model(&backend, &options, &mut progress)?;
    let draft = match config.speculative.as_ref().map(|s| &s.method) {
        Some(SpeculativeMethod::DraftModel { model: path }) => {
            let draft_files =
                ModelFiles::open_with(path.as_ref() as &Path, config.load_format).map_err(|e| {
                    EngineError::Config(format!("--speculative-config: the draft model {path}: {e}"))
                })?;
            let draft = draft_files.load_model(&backend, &options, &mut |_, _| {})?;
            let (target_vocab, draft_vocab) = (model.config().vocab_size, draft.config().vocab_size);
            if draft_vocab != target_vocab {
                return Err(EngineError::Config(format!(
                    "--speculative-config: the draft model's vocabulary ({draft_vocab}) is not the target's ({target_vocab})"
                )));
            }
            Some(draft)
        }
        _ => None,
    };
    let loaded = files.into_loaded(model);
    LlmEngine::with_draft_model(backend, loaded, draft, config)
}

/// [`load_engine`] with the model split over `ranks.len()` ranks
/// (`config.tensor_parallel_size`, Megatron style: see
/// [`pagoda_models::TpShard`]): rank 0 runs on this thread, every other rank
/// on a thread of its own, each starting from its [`RankStart`] (its backend
/// and its handle on one communicator group) and loading its shard there,
/// all at once; `progress` reports rank 0's loading. One scheduler and one
/// block allocator decide every step for all ranks; each rank's KV pool holds
/// its KV heads for the same block ids, so the number of blocks comes from
/// one rank's memory and one rank's bytes per block.
///
/// Refused by name: shapes that do not split `ranks.len()` ways, LoRA,
/// speculative decoding with a draft model, and recorded decode graphs
/// (pass `enforce_eager`).
pub fn load_engine_tensor_parallel<B: Backend>(
    ranks: Vec<RankStart<B>>,
    model_path: impl AsRef<Path>,
    config: EngineConfig,
    mut progress: impl FnMut(u64, u64),
) -> Result<LlmEngine<B>, EngineError> {
    config.validate()?;
    let world = ranks.len();
    if world != config.tensor_parallel_size {
        return Err(EngineError::Config(format!(
            "--tensor-parallel-size {} with {world} ranks given",
            config.tensor_parallel_size
        )));
    }
    let (files, options) = open_model(model_path.as_ref(), &config)?;
    // Before any weight loads: a model that does not split this way fails at once.
    TpShard::new(&files.config, 0, world)?;
    let mut ranks = ranks.into_iter();
    let start = ranks.next().ok_or_else(|| EngineError::Config("no tensor-parallel ranks given".into()))?;
    let (backend, comm) = start()?;
    check_comm(comm.as_ref(), 0, world)?;
    if world > 1 && !config.enforce_eager && backend.supports_graphs() {
        return Err(EngineError::Config(format!(
            "--tensor-parallel-size {world} does not record decode graphs yet (their all-reduces are \
             not captured): pass --enforce-eager"
        )));
    }
    let load = Arc::new(RankLoad {
        model: files.config.clone(),
        weights: files.shared_weights(),
        options: options.clone(),
        engine: config.clone(),
    });
    // The other ranks load their shards while this thread loads rank 0's.
    let mut group = RankGroup::spawn(ranks.collect(), load, comm.clone())?;
    let model = files.load_model_sharded(&backend, &options, comm, &mut progress)?;
    group.wait_loaded()?;
    let loaded = files.into_loaded(model);
    if world == 1 {
        // A group of one: no ranks to lead, and the model ran no collective.
        drop(group);
        return LlmEngine::with_draft_model(backend, loaded, None, config);
    }
    LlmEngine::with_ranks(backend, loaded, group, config)
}

/// Opens the model's files, with the `--generation-config` asked for, and
/// the load options `config` sets.
fn open_model(model_path: &Path, config: &EngineConfig) -> Result<(ModelFiles, LoadOptions), EngineError> {
    let mut files = ModelFiles::open_with(model_path, config.load_format)?;
    match &config.generation_config {
        GenerationConfigSource::Model => {}
        GenerationConfigSource::Builtin => {
            files.generation.use_sampling_defaults_of(&GenerationConfig::default())
        }
        GenerationConfigSource::Folder(dir) => {
            if !dir.join("generation_config.json").is_file() {
                return Err(EngineError::Config(format!(
                    "--generation-config: {} has no generation_config.json",
                    dir.display()
                )));
            }
            files.generation.use_sampling_defaults_of(&GenerationConfig::from_hf_dir(dir)?)
        }
    }
    // Before the weights load: a wrong --max-model-len fails at once.
    config.check_max_model_len(&files.config)?;
    let max_model_len = config.max_model_len(&files.config);
    Ok((files, LoadOptions { max_positions: Some(max_model_len), quantization: config.quantization }))
}

impl<B: Backend> LlmEngine<B> {
    /// Offline generation: adds every request, steps until all have
    /// finished, and returns them in the order given.
    pub fn generate(
        &mut self,
        requests: Vec<GenerationRequest>,
    ) -> Result<Vec<CompletedRequest>, EngineError> {
        let mut done: Vec<CompletedRequest> =
            requests.iter().map(|r| CompletedRequest::new(r.request_id.clone(), r.n)).collect();
        let index: std::collections::HashMap<String, usize> =
            requests.iter().enumerate().map(|(i, r)| (r.request_id.clone(), i)).collect();
        for req in requests {
            self.add_request(req)?;
        }
        while self.has_unfinished_requests() {
            for out in self.step()? {
                if let Some(&i) = index.get(&out.request_id) {
                    done[i].absorb(out);
                }
            }
        }
        Ok(done)
    }
}
