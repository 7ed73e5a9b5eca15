//! The input processor: the one place a request is checked against the model
//! and the engine's limits, and where everything left open in it is resolved
//! (the seed, the EOS and stop token ids, `max_tokens`). What comes out is an
//! [`EngineCoreRequest`], which only this module can make: whoever holds one
//! (the engine thread, the engine core) takes it as valid and checks nothing
//! again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pagoda_backend::SamplingParams;
use pagoda_sampler::TokenId;

use pagoda_models::LoraAdapter;

use crate::constraint::TokenConstraintFactory;
use crate::error::EngineError;
use crate::lora::LoraCache;
use crate::request::GenerationRequest;
use crate::stop::{MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES};

/// Facts about the served model that request validation and the API need.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    /// Default sampling parameters from generation_config.json.
    pub default_sampling: SamplingParams,
    pub num_gpu_blocks: usize,
    pub block_size: usize,
}

/// Validates requests and resolves their defaults. Shared (behind an `Arc`)
/// by the engine and the async engine's callers, so that every request, on
/// whichever thread it arrives, draws its default seed from one sequence.
#[derive(Debug)]
pub struct InputProcessor {
    info: ModelInfo,
    max_num_seqs: usize,
    /// Without a tokenizer, token ids go in and out: no text, no stop strings.
    has_tokenizer: bool,
    /// The last default seed handed out (vLLM's `--seed` draws them in order).
    last_seed: AtomicU64,
    /// Whether the backend's sampler applies `logit_bias`, `allowed_token_ids`
    /// and `bad_words` (requests with them are refused otherwise).
    logit_constraints: bool,
    /// Whether it applies structured-output token masks.
    token_masks: bool,
    /// Loaded LoRA adapters, when the engine serves them.
    lora: Option<Arc<LoraCache>>,
}

/// Most `bad_words` a request may give, and most tokens in one: each is
/// checked against the output at every step.
pub const MAX_BAD_WORDS: usize = 256;
pub const MAX_BAD_WORD_TOKENS: usize = 32;

/// Step between the default seeds of consecutive requests (the golden ratio in 64 bits).
const SEED_STEP: u64 = 0x9e37_79b9_7f4a_7c15;

/// A request the [`InputProcessor`] accepted, with every default resolved:
/// what the engine core and the output processor are given. Only the input
/// processor makes one.
#[derive(Clone, Debug)]
pub struct EngineCoreRequest {
    request_id: String,
    prompt_token_ids: Vec<TokenId>,
    sampling: SamplingParams,
    seed: u64,
    max_tokens: usize,
    min_tokens: usize,
    n: usize,
    priority: i32,
    fairness_group: Option<u32>,
    cache_salt: Option<u64>,
    prompt_logprobs: Option<usize>,
    eos_token_ids: Vec<TokenId>,
    stop_token_ids: Vec<TokenId>,
    ignore_eos: bool,
    stop: Vec<String>,
    include_stop_str_in_output: bool,
    skip_special_tokens: bool,
    detokenize: bool,
    constraint: Option<Arc<dyn TokenConstraintFactory>>,
    /// The request's adapter, read (or found in the host cache) when accepted.
    lora: Option<(u32, Arc<LoraAdapter>)>,
    /// Its adapter's name (for metrics).
    lora_name: Option<String>,
}

impl EngineCoreRequest {
    /// The client's id (unique among live requests: the engine refuses a duplicate).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn prompt_token_ids(&self) -> &[TokenId] {
        &self.prompt_token_ids
    }

    /// Tokens to generate at most per sample: as asked, or up to the context length.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// The seed of the request's first sample: its own, or the next default one.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    /// The structured-output constraint of every sample, if any.
    pub fn constraint(&self) -> Option<&Arc<dyn TokenConstraintFactory>> {
        self.constraint.as_ref()
    }

    /// The LoRA adapter's id and matrices, if the request runs with one.
    pub fn lora(&self) -> Option<&(u32, Arc<LoraAdapter>)> {
        self.lora.as_ref()
    }

    /// The LoRA adapter's name, if the request runs with one.
    pub fn lora_name(&self) -> Option<&str> {
        self.lora_name.as_deref()
    }

    pub(crate) fn min_tokens(&self) -> usize {
        self.min_tokens
    }

    pub(crate) fn priority(&self) -> i32 {
        self.priority
    }

    pub(crate) fn fairness_group(&self) -> Option<u32> {
        self.fairness_group
    }

    /// The model's EOS ids; they end a sample unless `ignore_eos`.
    pub(crate) fn cache_salt(&self) -> Option<u64> {
        self.cache_salt
    }

    /// Top alternatives per prompt token, when prompt logprobs were asked for.
    pub fn prompt_logprobs(&self) -> Option<usize> {
        self.prompt_logprobs
    }

    pub(crate) fn eos_token_ids(&self) -> &[TokenId] {
        &self.eos_token_ids
    }

    pub(crate) fn stop_token_ids(&self) -> &[TokenId] {
        &self.stop_token_ids
    }

    pub(crate) fn ignore_eos(&self) -> bool {
        self.ignore_eos
    }

    pub(crate) fn stop(&self) -> &[String] {
        &self.stop
    }

    pub(crate) fn include_stop_str_in_output(&self) -> bool {
        self.include_stop_str_in_output
    }

    pub(crate) fn skip_special_tokens(&self) -> bool {
        self.skip_special_tokens
    }

    /// Whether outputs carry text (false without a tokenizer, or when asked).
    pub(crate) fn detokenize(&self) -> bool {
        self.detokenize
    }
}

impl InputProcessor {
    /// `seed` is the engine's (`EngineConfig::seed`): default seeds follow from it.
    pub(crate) fn new(info: ModelInfo, max_num_seqs: usize, has_tokenizer: bool, seed: u64) -> Self {
        Self {
            info,
            max_num_seqs,
            has_tokenizer,
            last_seed: AtomicU64::new(seed),
            logit_constraints: false,
            token_masks: false,
            lora: None,
        }
    }

    /// Serves LoRA adapters from this cache.
    pub(crate) fn with_lora(mut self, cache: Option<Arc<LoraCache>>) -> Self {
        self.lora = cache;
        self
    }

    /// The host cache of LoRA adapters, when the engine serves them.
    pub fn lora_cache(&self) -> Option<&Arc<LoraCache>> {
        self.lora.as_ref()
    }

    /// Declares whether the backend applies logit constraints (see [`pagoda_backend::Backend::supports_logit_constraints`]).
    pub(crate) fn with_logit_constraints(mut self, supported: bool) -> Self {
        self.logit_constraints = supported;
        self
    }

    /// Declares whether the backend applies structured-output token masks (see [`pagoda_backend::Backend::supports_token_masks`]).
    pub(crate) fn with_token_masks(mut self, supported: bool) -> Self {
        self.token_masks = supported;
        self
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Checks `req` (see [`Self::validate`]) and resolves what it leaves
    /// open: `max_tokens` (up to the context length), the seed (the next
    /// default one), the EOS ids (the model's), and no text without a
    /// tokenizer. Errors name the request parameter at fault.
    pub fn process(&self, req: GenerationRequest) -> Result<EngineCoreRequest, EngineError> {
        self.validate(&req)?;
        let lora = match (&req.lora, &self.lora) {
            (None, _) => None,
            (Some(lora), None) => {
                return Err(EngineError::invalid(
                    Some("model"),
                    format!(
                        "LoRA adapter {:?} asked for, but LoRA is not enabled (--enable-lora)",
                        lora.name
                    ),
                ))
            }
            (Some(lora), Some(cache)) => {
                if lora.id == 0 {
                    return Err(EngineError::Internal(format!("adapter {:?} has id 0", lora.name)));
                }
                Some((lora.id, cache.get(lora)?))
            }
        };
        let seed = req.sampling.seed.unwrap_or_else(|| {
            // fetch_add wraps, as the sequence of seeds does.
            self.last_seed.fetch_add(SEED_STEP, Ordering::Relaxed).wrapping_add(SEED_STEP)
        });
        Ok(EngineCoreRequest {
            // Validated: the prompt leaves room for at least one token.
            max_tokens: req.max_tokens.unwrap_or(self.info.max_model_len - req.prompt_token_ids.len()),
            request_id: req.request_id,
            prompt_token_ids: req.prompt_token_ids,
            sampling: req.sampling,
            seed,
            min_tokens: req.min_tokens,
            n: req.n,
            priority: req.priority,
            fairness_group: req.fairness_group,
            cache_salt: req.cache_salt,
            prompt_logprobs: req.prompt_logprobs,
            eos_token_ids: self.info.eos_token_ids.clone(),
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            stop: req.stop,
            include_stop_str_in_output: req.include_stop_str_in_output,
            skip_special_tokens: req.skip_special_tokens,
            // Like vLLM's --skip-tokenizer-init: token ids in, token ids out.
            detokenize: req.detokenize && self.has_tokenizer,
            constraint: req.constraint,
            lora,
            lora_name: req.lora.map(|l| l.name),
        })
    }

    /// Checks a request against the model and the engine's limits: lengths
    /// (prompt, `max_tokens`, `min_tokens`, all within the context and the
    /// KV cache, with checked arithmetic), `n`, sampling parameters, stop
    /// strings (and that there is a tokenizer to match them) and stop token
    /// ids. `max_tokens` absent means up to the context length.
    pub fn validate(&self, req: &GenerationRequest) -> Result<(), EngineError> {
        let info = &self.info;
        let prompt_len = req.prompt_token_ids.len();
        if prompt_len == 0 {
            return Err(EngineError::invalid(Some("prompt"), "the prompt is empty"));
        }
        if let Some(&bad) = req.prompt_token_ids.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(EngineError::invalid(
                Some("prompt"),
                format!("token id {bad} is out of vocabulary (size {})", info.vocab_size),
            ));
        }
        if prompt_len >= info.max_model_len {
            return Err(EngineError::invalid(
                Some("prompt"),
                format!(
                    "This model's maximum context length is {} tokens. However, your prompt has {prompt_len} \
                     tokens, which leaves no room for output.",
                    info.max_model_len
                ),
            ));
        }
        let requested_max_tokens = req.max_tokens;
        let max_tokens = requested_max_tokens.unwrap_or(info.max_model_len - prompt_len);
        if max_tokens == 0 {
            return Err(EngineError::invalid(Some("max_tokens"), "max_tokens must be at least 1"));
        }
        // Checked: a client may send any max_tokens up to u64::MAX.
        let total_len = prompt_len.checked_add(max_tokens);
        if total_len.is_none_or(|total| total > info.max_model_len) {
            return Err(EngineError::invalid(
                Some("max_tokens"),
                format!(
                    "This model's maximum context length is {} tokens. However, you requested {} tokens \
                     ({prompt_len} in the prompt, {max_tokens} in the completion).",
                    info.max_model_len,
                    prompt_len as u128 + max_tokens as u128
                ),
            ));
        }
        // Here, not only in the scheduler, where it would fail the request late.
        if req.min_tokens > max_tokens {
            let message = match requested_max_tokens {
                Some(_) => format!("min_tokens ({}) must not exceed max_tokens ({max_tokens})", req.min_tokens),
                None => format!(
                    "min_tokens ({}) must not exceed the {max_tokens} tokens the prompt leaves of this model's \
                     maximum context length ({})",
                    req.min_tokens, info.max_model_len
                ),
            };
            return Err(EngineError::invalid(Some("min_tokens"), message));
        }
        if req.n == 0 || req.n > self.max_num_seqs {
            return Err(EngineError::invalid(
                Some("n"),
                format!("n must be in 1..={}, got {}", self.max_num_seqs, req.n),
            ));
        }
        // Without max_tokens the output may stop early, so only the prompt must
        // fit; with it, the whole of every sample must.
        let seq_len = if requested_max_tokens.is_some() { prompt_len + max_tokens } else { prompt_len };
        let needed = kv_blocks_needed(prompt_len, seq_len, req.n, info.block_size);
        if needed.is_none_or(|blocks| blocks > info.num_gpu_blocks) {
            let capacity = info.num_gpu_blocks * info.block_size;
            let what = if req.n > 1 {
                format!(
                    "{} samples of up to {seq_len} tokens, sharing a prompt of {prompt_len} tokens,",
                    req.n
                )
            } else {
                format!("a sequence of {seq_len} tokens")
            };
            let needed = needed.map_or_else(|| "more".to_string(), |b| b.to_string());
            return Err(EngineError::invalid(
                Some(if requested_max_tokens.is_some() { "max_tokens" } else { "prompt" }),
                format!(
                    "This request cannot fit in the KV cache: {what} need {needed} blocks of {} tokens, but \
                     the cache holds {} blocks ({capacity} tokens). Lower max_tokens or n, or shorten the \
                     prompt.",
                    info.block_size, info.num_gpu_blocks
                ),
            ));
        }
        if req.stop.len() > MAX_STOP_STRINGS {
            return Err(EngineError::invalid(
                Some("stop"),
                format!("at most {MAX_STOP_STRINGS} stop strings are allowed, got {}", req.stop.len()),
            ));
        }
        if let Some(long) = req.stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
            return Err(EngineError::invalid(
                Some("stop"),
                format!(
                    "a stop string may be at most {MAX_STOP_STRING_BYTES} bytes long, got one of {} bytes",
                    long.len()
                ),
            ));
        }
        req.sampling.validate().map_err(|e| EngineError::invalid(Some(e.param), e.to_string()))?;
        if let Some(k) = req.prompt_logprobs {
            if k > info.vocab_size {
                return Err(EngineError::invalid(
                    Some("prompt_logprobs"),
                    format!(
                        "prompt_logprobs must be at most the vocabulary size ({}), got {k}",
                        info.vocab_size
                    ),
                ));
            }
        }
        self.check_logit_constraints(&req.sampling)?;
        if req.constraint.is_some() && !self.token_masks {
            return Err(EngineError::invalid(
                Some("structured_outputs"),
                "structured outputs are not supported on this backend yet (its sampler does not apply token masks)",
            ));
        }
        if let Some(&bad) = req.stop_token_ids.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(EngineError::invalid(
                Some("stop_token_ids"),
                format!("token id {bad} is out of vocabulary"),
            ));
        }
        if !self.has_tokenizer && !req.stop.is_empty() {
            return Err(EngineError::invalid(
                Some("stop"),
                "stop strings need a tokenizer; this model has none",
            ));
        }
        Ok(())
    }
}

impl InputProcessor {
    /// `logit_bias`, `allowed_token_ids` and `bad_words`: supported by the
    /// backend, within the vocabulary, and `bad_words` within their bounds.
    fn check_logit_constraints(&self, sampling: &SamplingParams) -> Result<(), EngineError> {
        if !sampling.has_logit_constraints() {
            return Ok(());
        }
        if !self.logit_constraints {
            let param = if !sampling.logit_bias.is_empty() {
                "logit_bias"
            } else if sampling.allowed_token_ids.is_some() {
                "allowed_token_ids"
            } else {
                "bad_words"
            };
            return Err(EngineError::invalid(
                Some(param),
                format!("{param} is not supported on this backend yet (its sampler does not apply logit constraints)"),
            ));
        }
        if let Some((param, token)) = sampling.token_outside(self.info.vocab_size) {
            return Err(EngineError::invalid(
                Some(param),
                format!("token id {token} is out of vocabulary (size {})", self.info.vocab_size),
            ));
        }
        if sampling.bad_words.len() > MAX_BAD_WORDS {
            return Err(EngineError::invalid(
                Some("bad_words"),
                format!("at most {MAX_BAD_WORDS} bad words are allowed, got {}", sampling.bad_words.len()),
            ));
        }
        if sampling.bad_words.iter().any(|w| w.len() > MAX_BAD_WORD_TOKENS) {
            return Err(EngineError::invalid(
                Some("bad_words"),
                format!("a bad word may be at most {MAX_BAD_WORD_TOKENS} tokens long"),
            ));
        }
        Ok(())
    }
}

/// KV blocks a request holds at most: the prompt's full blocks once (its `n`
/// samples share them copy-on-write) and, per sample, the blocks from there
/// to `seq_len` tokens. `None` on overflow.
pub fn kv_blocks_needed(prompt_len: usize, seq_len: usize, n: usize, block_size: usize) -> Option<usize> {
    let shared = prompt_len / block_size;
    let own = seq_len.div_ceil(block_size).checked_sub(shared)?;
    own.checked_mul(n)?.checked_add(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model of 512 tokens of context over a KV cache of 64 blocks of 16
    /// (1024 tokens).
    fn info() -> ModelInfo {
        ModelInfo {
            max_model_len: 512,
            vocab_size: 1000,
            eos_token_ids: vec![2],
            default_sampling: SamplingParams::default(),
            num_gpu_blocks: 64,
            block_size: 16,
        }
    }

    fn processor() -> InputProcessor {
        InputProcessor::new(info(), 256, true, 0)
    }

    fn request(prompt_len: usize, max_tokens: Option<usize>, n: usize) -> GenerationRequest {
        let mut r = GenerationRequest::new("r", vec![1; prompt_len]);
        r.max_tokens = max_tokens;
        r.n = n;
        r
    }

    #[test]
    fn logit_constraints_need_a_backend_that_applies_them_and_tokens_in_the_vocabulary() {
        let mut with_bias = request(4, Some(4), 1);
        with_bias.sampling.logit_bias = vec![(5, 1.0)];
        let (param, message) = refusal_by(&processor(), &with_bias);
        assert_eq!(param, Some("logit_bias"));
        assert!(message.contains("not supported on this backend"), "{message}");
        let supported = processor().with_logit_constraints(true);
        assert!(supported.validate(&with_bias).is_ok());
        let mut outside = request(4, Some(4), 1);
        outside.sampling.allowed_token_ids = Some(vec![3, 1000]);
        assert_eq!(refusal_by(&supported, &outside).0, Some("allowed_token_ids"));
        let mut too_many = request(4, Some(4), 1);
        too_many.sampling.bad_words = vec![vec![7]; MAX_BAD_WORDS + 1];
        assert_eq!(refusal_by(&supported, &too_many).0, Some("bad_words"));
        let mut too_long = request(4, Some(4), 1);
        too_long.sampling.bad_words = vec![vec![7; MAX_BAD_WORD_TOKENS + 1]];
        assert_eq!(refusal_by(&supported, &too_long).0, Some("bad_words"));
    }

    fn refusal_by(p: &InputProcessor, req: &GenerationRequest) -> (Option<&'static str>, String) {
        match p.validate(req) {
            Err(EngineError::InvalidRequest { param, message }) => (param, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn refusal(req: &GenerationRequest) -> (Option<&'static str>, String) {
        refusal_by(&processor(), req)
    }

    #[test]
    fn huge_max_tokens_is_refused_not_wrapped() {
        for max_tokens in [usize::MAX, usize::MAX - 5, usize::MAX / 2 + 1, 503] {
            let (param, message) = refusal(&request(10, Some(max_tokens), 1));
            assert_eq!(param, Some("max_tokens"));
            assert!(message.contains("maximum context length is 512"), "{message}");
            assert!(message.contains(&max_tokens.to_string()), "{message}");
        }
        processor().validate(&request(10, Some(502), 1)).expect("prompt + max_tokens = 512 fits");
        // min_tokens against the max_tokens implied by the context.
        let mut r = request(10, None, 1);
        r.min_tokens = 503;
        let (param, message) = refusal(&r);
        assert_eq!(param, Some("min_tokens"));
        assert!(message.contains("502 tokens the prompt leaves"), "{message}");
        r.min_tokens = 502;
        processor().validate(&r).expect("min_tokens up to the context");
    }

    #[test]
    fn kv_blocks_count_the_shared_prompt_once() {
        // 40 prompt tokens: 2 full blocks shared; each sample owns 4 blocks (to 100 tokens).
        assert_eq!(kv_blocks_needed(40, 100, 1, 16), Some(7));
        assert_eq!(kv_blocks_needed(40, 100, 3, 16), Some(2 + 3 * 5));
        assert_eq!(kv_blocks_needed(32, 32, 4, 16), Some(2));
        assert_eq!(kv_blocks_needed(1, usize::MAX, usize::MAX, 16), None);
    }

    #[test]
    fn requests_larger_than_the_kv_cache_are_refused() {
        // n=1 always fits within the context; n samples of 500 tokens need 32 blocks each.
        processor().validate(&request(10, Some(490), 1)).expect("one sample fits");
        processor().validate(&request(10, Some(490), 2)).expect("two fit in 64 blocks");
        let (param, message) = refusal(&request(10, Some(490), 3));
        assert_eq!(param, Some("max_tokens"));
        assert!(message.contains("KV cache") && message.contains("64 blocks"), "{message}");
        // Without max_tokens only the prompt counts: outputs may end early.
        processor().validate(&request(500, None, 3)).expect("prompt fits thrice");
        let (param, _) = refusal(&request(500, None, 256));
        assert_eq!(param, Some("prompt"));
    }

    #[test]
    fn stop_strings_are_bounded_in_number_and_length() {
        let mut r = request(10, Some(10), 1);
        r.stop = vec!["x".repeat(MAX_STOP_STRING_BYTES); MAX_STOP_STRINGS];
        processor().validate(&r).expect("at the limits");
        r.stop.push("y".into());
        let (param, message) = refusal(&r);
        assert_eq!(param, Some("stop"));
        assert!(message.contains(&format!("at most {MAX_STOP_STRINGS} stop strings")), "{message}");
        r.stop = vec!["a".into(), "é".repeat(MAX_STOP_STRING_BYTES / 2 + 1)];
        let (param, message) = refusal(&r);
        assert_eq!(param, Some("stop"));
        assert!(message.contains(&format!("at most {MAX_STOP_STRING_BYTES} bytes")), "{message}");
    }

    #[test]
    fn every_refusal_names_its_parameter() {
        let with = |f: &dyn Fn(&mut GenerationRequest)| {
            let mut r = request(10, Some(10), 1);
            f(&mut r);
            r
        };
        let cases: Vec<(GenerationRequest, &str)> = vec![
            (request(0, Some(10), 1), "prompt"),
            (with(&|r| r.prompt_token_ids[3] = 1000), "prompt"),
            (request(512, None, 1), "prompt"),
            (request(10, Some(0), 1), "max_tokens"),
            (request(10, Some(503), 1), "max_tokens"),
            (with(&|r| r.min_tokens = 11), "min_tokens"),
            (request(10, Some(10), 0), "n"),
            (request(10, Some(10), 257), "n"),
            (request(10, Some(490), 3), "max_tokens"),
            (with(&|r| r.stop = vec!["s".into(); MAX_STOP_STRINGS + 1]), "stop"),
            (with(&|r| r.sampling.temperature = -1.0), "temperature"),
            (with(&|r| r.sampling.top_p = 0.0), "top_p"),
            (with(&|r| r.sampling.logprobs = Some(21)), "logprobs"),
            (with(&|r| r.stop_token_ids = vec![5, 1000]), "stop_token_ids"),
        ];
        for (req, param) in cases {
            assert_eq!(refusal(&req).0, Some(param), "{req:?}");
        }
        // Stop strings need a tokenizer to match them.
        let no_tokenizer = InputProcessor::new(info(), 256, false, 0);
        let (param, message) = refusal_by(&no_tokenizer, &with(&|r| r.stop = vec!["\n".into()]));
        assert_eq!(param, Some("stop"));
        assert!(message.contains("tokenizer"), "{message}");
    }

    #[test]
    fn defaults_are_resolved_once() {
        let p = processor();
        let processed = p.process(request(10, None, 2)).expect("valid");
        assert_eq!(processed.max_tokens(), 502, "up to the context");
        assert_eq!(processed.eos_token_ids(), &[2]);
        // Default seeds follow the engine's seed, one per request in order.
        let second = p.process(request(10, Some(5), 1)).expect("valid");
        assert_eq!(processed.seed(), SEED_STEP);
        assert_eq!(second.seed(), SEED_STEP.wrapping_mul(2));
        let mut seeded = request(10, Some(5), 1);
        seeded.sampling.seed = Some(7);
        assert_eq!(p.process(seeded).expect("valid").seed(), 7);
        assert_eq!(p.process(request(10, Some(5), 1)).expect("valid").seed(), SEED_STEP.wrapping_mul(3));
        // Without a tokenizer, outputs carry no text.
        let no_tokenizer = InputProcessor::new(info(), 256, false, 0);
        assert!(!no_tokenizer.process(request(10, Some(5), 1)).expect("valid").detokenize());
        assert!(p.process(request(10, Some(5), 1)).expect("valid").detokenize());
    }
}
