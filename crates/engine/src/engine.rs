//! The synchronous engine: the composition of the three stages a request
//! goes through. [`LlmEngine::add_request`]: the input processor checks it
//! and resolves its defaults, the engine core queues it, the output
//! processor starts its text state. [`LlmEngine::step`]: the core schedules,
//! runs the model and samples; the output processor turns the tokens into
//! output deltas; the samples a stop string ended go back to the core the
//! way an abort does. The client's string id lives here only, mapped to the
//! core's [`RequestId`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagoda_backend::Backend;
use pagoda_models::{ChatTemplate, LlamaModel, LoadedModel, Tokenizer};
use pagoda_paged_kv::{PagedAllocator, PagedConfig};
use pagoda_scheduler::{RequestId, Scheduler};

use crate::config::EngineConfig;
use crate::draft_model::DraftModel;
use crate::engine_core::{CoreOutput, EngineCore, StepTimings};
use crate::error::EngineError;
use crate::input::{EngineCoreRequest, InputProcessor, ModelInfo};
use crate::lora::LoraCache;
use crate::metrics::EngineMetrics;
use crate::output_processor::OutputProcessor;
use crate::request::{GenerationRequest, RequestOutput};
use crate::runner::ModelRunner;
use crate::speculative::{NgramProposer, Proposer, SpeculativeMethod, Speculator};
use crate::tensor_parallel::RankGroup;

/// The engine: input processor -> engine core (scheduler, model runner,
/// sampler) -> output processor.
pub struct LlmEngine<B: Backend> {
    config: EngineConfig,
    chat_template: Option<Arc<ChatTemplate>>,
    input: Arc<InputProcessor>,
    core: EngineCore<B>,
    output: OutputProcessor,
    /// The live requests: the client's id -> the core's.
    ids: HashMap<String, RequestId>,
    metrics: Arc<EngineMetrics>,
    /// Time spent in the output processor (part of [`StepTimings::update`]).
    output_time: Duration,
}

impl<B: Backend> LlmEngine<B> {
    /// Sizes the KV pool from the config and the memory left after the
    /// weights, and assembles the engine.
    pub fn new(backend: B, loaded: LoadedModel<B>, config: EngineConfig) -> Result<Self, EngineError> {
        Self::with_draft_model(backend, loaded, None, config)
    }

    /// [`Self::new`] with the draft model of a `--speculative-config` that
    /// names one, loaded on the same backend (before the KV cache is sized:
    /// its weights count, and its own cache takes a share of the budget).
    pub fn with_draft_model(
        backend: B,
        loaded: LoadedModel<B>,
        draft: Option<LlamaModel<B>>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        Self::build(backend, loaded, draft, None, config)
    }

    /// [`Self::new`] for rank 0 of a tensor-parallel group (`loaded` holds its
    /// shard), leading `ranks`, the others, which have loaded theirs.
    pub(crate) fn with_ranks(
        backend: B,
        loaded: LoadedModel<B>,
        ranks: RankGroup<B>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        Self::build(backend, loaded, None, Some(ranks), config)
    }

    fn build(
        backend: B,
        mut loaded: LoadedModel<B>,
        draft: Option<LlamaModel<B>>,
        ranks: Option<RankGroup<B>>,
        mut config: EngineConfig,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let world = ranks.as_ref().map_or(1, |r| r.world_size());
        if world != config.tensor_parallel_size {
            return Err(EngineError::Config(format!(
                "--tensor-parallel-size {} needs one device per rank: load the engine with \
                 load_engine_tensor_parallel ({world} given)",
                config.tensor_parallel_size
            )));
        }
        let model_config = loaded.model.config().clone();
        // The adapter slots are allocated before the KV cache is sized from what is left.
        if let Some(lora) = &config.lora {
            loaded.model.enable_lora(&backend, lora.max_loras, lora.max_lora_rank)?;
        }
        // The host cache packs adapters for these slots as it reads them. The
        // slots exist only on an unsharded model (LoRA refuses sharding).
        let lora_slot_dtype = loaded.model.lora_slots().map(|slots| slots.dtype());
        config.check_max_model_len(&model_config)?;
        let memory = backend.memory_info().ok();
        let mut num_gpu_blocks = config.num_gpu_blocks(&backend, &model_config, memory)?;
        // Every rank holds every block (for its own KV heads): the rank with
        // the least memory decides.
        if let Some(ranks) = &ranks {
            num_gpu_blocks = num_gpu_blocks.min(ranks.num_gpu_blocks());
        }
        // A draft model's cache holds as many tokens as the target's: the
        // budget is shared in proportion to their bytes per block (a fixed
        // --num-gpu-blocks-override is given to both).
        let kv_cache_dtype = config.kv_cache_dtype_on(&backend);
        if let Some(draft) = &draft {
            let dtype = kv_cache_dtype;
            let target_bytes = model_config.kv_cache_bytes_per_block(config.block_size, dtype);
            let draft_bytes = draft.config().kv_cache_bytes_per_block(config.block_size, dtype);
            if config.num_gpu_blocks.is_none() {
                num_gpu_blocks = (num_gpu_blocks * target_bytes / (target_bytes + draft_bytes)).max(1);
            }
        }
        config.fit_max_model_len_to_kv_cache(&model_config, num_gpu_blocks)?;
        let num_cpu_blocks = config.num_cpu_blocks(&backend, &model_config);
        let kv = PagedAllocator::new(PagedConfig {
            num_gpu_blocks,
            num_cpu_blocks,
            block_size: config.block_size,
            enable_prefix_caching: config.enable_prefix_caching,
        })
        .map_err(|e| EngineError::Config(e.to_string()))?;
        let scheduler =
            Scheduler::with_policy(config.scheduler_config(&model_config), kv, config.policy.build())
                .map_err(|e| EngineError::Config(e.to_string()))?;
        let mut runner = ModelRunner::new(
            backend,
            loaded.model,
            num_gpu_blocks,
            num_cpu_blocks,
            config.block_size,
            kv_cache_dtype,
        )?;
        if config.lora.is_some() {
            runner.enable_lora()?;
        }
        if let Some(ranks) = ranks {
            runner.lead_ranks(ranks, num_gpu_blocks, num_cpu_blocks)?;
        }
        let has_draft = draft.is_some();
        if let Some(draft) = draft {
            let draft =
                DraftModel::new(runner.backend(), draft, num_gpu_blocks, config.block_size, kv_cache_dtype)?;
            runner.set_draft_model(draft);
        }
        let graphs = !config.enforce_eager && runner.backend().supports_graphs();
        if graphs && world > 1 {
            return Err(EngineError::Config(format!(
                "--tensor-parallel-size {world} does not record decode graphs yet (their all-reduces \
                 are not captured): pass --enforce-eager"
            )));
        }
        if graphs {
            let max_batch = config.max_graph_batch_size.min(config.max_num_seqs);
            runner.enable_decode_graphs(max_batch, config.max_model_len(&model_config))?;
        }
        let mut eos_token_ids = loaded.generation.eos_token_ids.clone();
        if eos_token_ids.is_empty() {
            eos_token_ids.extend(loaded.tokenizer.eos_token_id());
        }
        let info = ModelInfo {
            max_model_len: config.max_model_len(&model_config),
            vocab_size: model_config.vocab_size,
            eos_token_ids,
            default_sampling: loaded.generation.default_sampling_params(),
            num_gpu_blocks,
            block_size: config.block_size,
        };
        if !loaded.tokenizer.is_present() {
            tracing::warn!(
                "the model has no tokenizer: only token-id requests work, and outputs carry no text"
            );
        }
        let step_budget = config.scheduler_config(&model_config).max_num_batched_tokens;
        let metrics = Arc::new(EngineMetrics::new(info.max_model_len, step_budget));
        metrics.kv_blocks_total.set(num_gpu_blocks as i64);
        // Right from the start, not after the first step: a scraper sees the empty cache.
        metrics.kv_blocks_free.set(num_gpu_blocks as i64);
        tracing::info!(
            num_gpu_blocks,
            num_cpu_blocks,
            block_size = config.block_size,
            kv_cache_dtype = ?kv_cache_dtype,
            max_model_len = info.max_model_len,
            device = %runner.backend().name(),
            tensor_parallel_size = world,
            graphs,
            "engine ready"
        );
        let input =
            InputProcessor::new(info, config.max_num_seqs, loaded.tokenizer.is_present(), config.seed)
                .with_logit_constraints(runner.backend().supports_logit_constraints())
                .with_token_masks(runner.backend().supports_token_masks())
                .with_lora(config.lora.clone().map(|l| {
                    let cache = LoraCache::new(l, model_config.clone());
                    Arc::new(match lora_slot_dtype {
                        Some(dtype) => cache.with_slot_dtype(dtype),
                        None => cache,
                    })
                }));
        let mut core = EngineCore::new(scheduler, runner, config.async_scheduling, metrics.clone());
        core.set_max_fast_forward_tokens(config.max_fast_forward_tokens);
        if let Some(lora) = &config.lora {
            core.enable_lora_metrics(lora.max_loras);
        }
        if let Some(spec) = &config.speculative {
            let proposer: Option<Box<dyn Proposer>> = match &spec.method {
                SpeculativeMethod::Ngram { prompt_lookup_min, prompt_lookup_max } => {
                    Some(Box::new(NgramProposer::new(*prompt_lookup_min, *prompt_lookup_max)))
                }
                SpeculativeMethod::DraftModel { model } => {
                    if !has_draft {
                        return Err(EngineError::Config(format!(
                            "--speculative-config: the draft model {model} was not loaded (load_engine loads it)"
                        )));
                    }
                    None
                }
            };
            let method = proposer.as_ref().map_or("draft_model", |p| p.name());
            tracing::info!(method, k = spec.num_speculative_tokens, "speculative decoding on");
            core.set_speculator(Speculator::new(spec.clone(), proposer));
        }
        Ok(Self {
            chat_template: loaded.chat_template.map(Arc::new),
            input: Arc::new(input),
            core,
            output: OutputProcessor::new(loaded.tokenizer, metrics.clone()),
            config,
            ids: HashMap::new(),
            metrics,
            output_time: Duration::ZERO,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        self.input.info()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.output.tokenizer()
    }

    pub fn chat_template(&self) -> Option<&Arc<ChatTemplate>> {
        self.chat_template.as_ref()
    }

    pub fn metrics(&self) -> Arc<EngineMetrics> {
        self.metrics.clone()
    }

    /// The host cache of LoRA adapters, when the engine serves them
    /// ([`EngineConfig::lora`]): reading an adapter into it ahead of its
    /// requests (as `serve` does for `--lora-modules`) keeps that out of
    /// [`Self::add_request`].
    pub fn lora_cache(&self) -> Option<&Arc<LoraCache>> {
        self.input.lora_cache()
    }

    /// The input processor, to check requests and resolve their defaults on
    /// another thread (the async engine's callers) before
    /// [`add_processed`](Self::add_processed).
    pub fn input_processor(&self) -> &Arc<InputProcessor> {
        &self.input
    }

    /// Pads decode steps into fixed buffers, and records graphs where the
    /// backend can, even where the engine did not turn this on itself (the CPU
    /// backend): tests check the padded path on the CPU with it.
    #[doc(hidden)]
    pub fn force_decode_graphs(&mut self) -> Result<(), EngineError> {
        let max_batch = self.config.max_graph_batch_size.min(self.config.max_num_seqs);
        let max_model_len = self.info().max_model_len;
        self.core.runner_mut().enable_decode_graphs(max_batch, max_model_len)
    }

    pub fn runner(&self) -> &ModelRunner<B> {
        self.core.runner()
    }

    pub fn scheduler(&self) -> &Scheduler<PagedAllocator> {
        self.core.scheduler()
    }

    /// Where `step()` spent its time so far.
    /// Turns speculative decoding on with a proposer of the caller's (the
    /// configured ones are built by [`Self::new`] from
    /// `EngineConfig::speculative`): for research, and for tests.
    pub fn set_proposer(
        &mut self,
        config: crate::speculative::SpeculativeConfig,
        proposer: Box<dyn Proposer>,
    ) {
        self.core.set_speculator(Speculator::new(config, Some(proposer)));
    }

    /// Forgets every cached prefix block no sequence holds (vLLM's
    /// `reset_prefix_cache`); returns how many.
    pub fn reset_prefix_cache(&mut self) -> usize {
        self.core.reset_prefix_cache()
    }

    /// Speculative decoding's settings and its proposer's name (`None` when it is off).
    pub fn speculation(&self) -> Option<(&crate::speculative::SpeculativeConfig, &str)> {
        self.core.speculator().map(|s| (s.config(), s.proposer_name()))
    }

    /// Speculative decoding's counters (`None` when it is off).
    pub fn spec_decode_stats(&self) -> Option<crate::speculative::SpecDecodeStats> {
        self.core.speculator().map(|s| s.stats().clone())
    }

    /// What structured outputs' fast-forward (forced tokens as drafts) did.
    pub fn fast_forward_stats(&self) -> crate::engine_core::FastForwardStats {
        self.core.fast_forward_stats()
    }

    pub fn step_timings(&self) -> StepTimings {
        let mut timings = self.core.timings();
        timings.update += self.output_time;
        timings
    }

    /// Whether `step()` has work: live requests, or a step in flight whose
    /// results are still to be applied.
    pub fn has_unfinished_requests(&self) -> bool {
        !self.ids.is_empty() || self.core.has_in_flight()
    }

    /// The live requests: the client's id and the core's.
    pub fn live_requests(&self) -> impl Iterator<Item = (&str, RequestId)> + '_ {
        self.ids.iter().map(|(client, &id)| (client.as_str(), id))
    }

    pub fn num_unfinished_requests(&self) -> usize {
        self.ids.len()
    }

    /// Checks and queues a request. It joins the batch at the next step.
    pub fn add_request(&mut self, req: GenerationRequest) -> Result<(), EngineError> {
        // Before processing, which draws the request's default seed.
        if self.ids.contains_key(&req.request_id) {
            return Err(EngineError::DuplicateRequest(req.request_id));
        }
        let req = self.input.process(req)?;
        self.add_processed(req, Instant::now())
    }

    /// Queues a request the input processor already accepted (the async
    /// engine processes them on the caller's thread), arrived at `arrived`.
    /// Refuses only a request id already live.
    pub fn add_processed(&mut self, req: EngineCoreRequest, arrived: Instant) -> Result<(), EngineError> {
        if self.ids.contains_key(req.request_id()) {
            return Err(EngineError::DuplicateRequest(req.request_id().to_string()));
        }
        let id = self.core.add_request(&req)?;
        self.output.add_request(id, &req, arrived);
        self.ids.insert(req.request_id().to_string(), id);
        Ok(())
    }

    /// Aborts a request (client gone): frees its blocks at once and returns
    /// its last output (every unfinished sequence with finish reason `abort`),
    /// or `None` if the request is not live.
    pub fn abort_request(&mut self, request_id: &str) -> Option<RequestOutput> {
        let id = self.ids.remove(request_id)?;
        self.core.abort(id);
        self.output.abort(id)
    }

    /// One iteration: schedule a step, enqueue it on the device, then apply
    /// the sampled tokens of the step before it (asynchronous scheduling) or
    /// of this one, and turn them into outputs. Returns an output for every
    /// request that produced something (finished ones included).
    ///
    /// After an error, the steps not applied are dropped and their sequences
    /// recompute from their known tokens (callers usually abort everything).
    pub fn step(&mut self) -> Result<Vec<RequestOutput>, EngineError> {
        let result = self.try_step();
        if result.is_err() {
            self.core.discard_unapplied();
        }
        result
    }

    fn try_step(&mut self) -> Result<Vec<RequestOutput>, EngineError> {
        let mut outputs = Vec::new();
        // A step whose tokens the next one needs on the host is applied, and
        // the samples it ended are ended, before the next is scheduled.
        if let Some(applied) = self.core.apply_before_scheduling()? {
            outputs = self.process_outputs(applied);
        }
        let stepped = self.core.step()?;
        outputs.extend(self.process_outputs(stepped));
        Ok(outputs)
    }

    /// Core events -> output processor -> the samples stop strings ended,
    /// back to the core.
    fn process_outputs(&mut self, events: CoreOutput) -> Vec<RequestOutput> {
        let started = Instant::now();
        let processed = self.output.process(events);
        self.core.finish_seqs(&processed.stopped);
        for out in processed.outputs.iter().filter(|o| o.finished) {
            self.ids.remove(&out.request_id);
        }
        self.output_time += started.elapsed();
        processed.outputs
    }
}
