//! From an API request's sampling fields to the engine's
//! [`GenerationRequest`]: OpenAI's defaults, the model's generation-config
//! defaults for what the client left out (as vLLM does), and the checks of
//! API-only fields. Everything checked against the model and the engine's
//! limits (lengths, `min_tokens`, `n`, sampling ranges, `logprobs`, stop
//! strings and token ids) is the engine's input processor's, on submit.

use pagoda_engine::{GenerationRequest, ModelInfo, SamplingParams};

use crate::error::ApiError;
use crate::protocol::SamplingFields;

/// Most top logprobs per token (OpenAI's limit, the sampler's too).
pub use pagoda_sampler::MAX_TOP_LOGPROBS;

/// A request template: everything but the id and the prompt, which the
/// handler fills in per prompt. The engine validates ranges on submit
/// (naming the parameter); this checks what only the API knows.
pub fn generation_request(
    fields: &SamplingFields,
    info: &ModelInfo,
    max_tokens: Option<usize>,
    logprobs: Option<u32>,
) -> Result<GenerationRequest, ApiError> {
    let top_k = match fields.top_k {
        None => info.default_sampling.top_k,
        Some(k) if k == -1 || k == 0 => 0,
        Some(k) if k > 0 => u32::try_from(k)
            .map_err(|_| ApiError::bad_request(Some("top_k"), format!("top_k is too large: {k}")))?,
        Some(k) => {
            return Err(ApiError::bad_request(
                Some("top_k"),
                format!("top_k must be -1 (disabled) or positive, got {k}"),
            ))
        }
    };
    let n = fields.n.unwrap_or(1);
    match fields.best_of {
        Some(best_of) if best_of < n => {
            return Err(ApiError::bad_request(
                Some("best_of"),
                format!("best_of ({best_of}) must be at least n ({n})"),
            ))
        }
        // best_of > n: the endpoint decides (completions pick the best; chat refuses).
        _ => {}
    }
    if fields.stream_options.is_some() && fields.stream != Some(true) {
        return Err(ApiError::bad_request(
            Some("stream_options"),
            "stream_options can only be given when stream is true",
        ));
    }
    let defaults = &info.default_sampling;
    let sampling = SamplingParams {
        temperature: fields.temperature.unwrap_or(defaults.temperature),
        top_k,
        top_p: fields.top_p.unwrap_or(defaults.top_p),
        min_p: fields.min_p.unwrap_or(defaults.min_p),
        repetition_penalty: fields.repetition_penalty.unwrap_or(defaults.repetition_penalty),
        presence_penalty: fields.presence_penalty.unwrap_or(0.0),
        frequency_penalty: fields.frequency_penalty.unwrap_or(0.0),
        // Negative seeds are valid in OpenAI's API; any 64 bits seed the generator.
        seed: fields.seed.map(|s| s as u64),
        logprobs,
        logit_bias: logit_bias(fields.logit_bias.as_ref())?,
        allowed_token_ids: fields.allowed_token_ids.clone(),
        // Tokenized by the handler, which has the tokenizer (see [`bad_words`]).
        bad_words: Vec::new(),
    };
    let mut request = GenerationRequest::new(String::new(), Vec::new());
    request.sampling = sampling;
    request.max_tokens = max_tokens;
    request.min_tokens = fields.min_tokens.unwrap_or(0);
    request.n = n;
    // An empty stop string would match at once; OpenAI clients never mean that.
    request.stop = fields
        .stop
        .as_ref()
        .map(|s| s.0.iter().filter(|s| !s.is_empty()).cloned().collect())
        .unwrap_or_default();
    request.stop_token_ids = fields.stop_token_ids.clone().unwrap_or_default();
    request.ignore_eos = fields.ignore_eos.unwrap_or(false);
    request.include_stop_str_in_output = fields.include_stop_str_in_output.unwrap_or(false);
    request.skip_special_tokens = fields.skip_special_tokens.unwrap_or(true);
    request.priority = fields.priority.unwrap_or(0);
    request.prompt_logprobs = fields.prompt_logprobs;
    if fields.prompt_logprobs.is_some() && fields.stream == Some(true) {
        return Err(ApiError::bad_request(
            Some("prompt_logprobs"),
            "prompt_logprobs are not available when stream is true (as in vLLM)",
        ));
    }
    Ok(request)
}

/// `--max-logprobs`: a request's `field` (`logprobs`, `top_logprobs`,
/// `prompt_logprobs`) may ask for at most `max` top alternatives per token.
pub fn check_max_logprobs(field: &'static str, value: Option<usize>, max: usize) -> Result<(), ApiError> {
    match value {
        Some(k) if k > max => Err(ApiError::bad_request(
            Some(field),
            format!("{field} ({k}) must be at most the server's --max-logprobs ({max})"),
        )),
        _ => Ok(()),
    }
}

/// How a response is streamed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamMode {
    pub stream: bool,
    /// A last chunk with the token counts (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The counts so far in every chunk too (`continuous_usage_stats`, with `include_usage`).
    pub continuous_usage: bool,
}

/// OpenAI's `logit_bias` object as sorted `(token, bias)` pairs; ranges and
/// the vocabulary are the engine's to check.
fn logit_bias(
    bias: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut pairs = Vec::new();
    for (key, value) in bias.into_iter().flatten() {
        let token: u32 = key.trim().parse().map_err(|_| {
            ApiError::bad_request(
                Some("logit_bias"),
                format!("logit_bias keys must be token ids, got {key:?}"),
            )
        })?;
        let bias = value.as_f64().filter(|b| b.is_finite()).ok_or_else(|| {
            ApiError::bad_request(
                Some("logit_bias"),
                format!("the bias of token {token} must be a number, got {value}"),
            )
        })?;
        pairs.push((token, bias as f32));
    }
    pairs.sort_by_key(|&(t, _)| t);
    // "5" and "05" name one token: the client meant one bias.
    if pairs.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(ApiError::bad_request(Some("logit_bias"), "logit_bias names a token twice"));
    }
    Ok(pairs)
}

/// Longest bad word, in bytes (each is tokenized twice, on the async thread).
pub const MAX_BAD_WORD_BYTES: usize = 256;

/// vLLM's `bad_words` as token sequences: each word as written and, when it
/// tokenizes differently, with a leading space (how it appears mid-sentence).
pub fn bad_words(tokenizer: &pagoda_models::Tokenizer, words: &[String]) -> Result<Vec<Vec<u32>>, ApiError> {
    let bad = |message: String| ApiError::bad_request(Some("bad_words"), message);
    // The engine bounds the count too; this keeps tokenization short.
    if words.len() > pagoda_engine::MAX_BAD_WORDS {
        return Err(bad(format!(
            "at most {} bad words are allowed, got {}",
            pagoda_engine::MAX_BAD_WORDS,
            words.len()
        )));
    }
    let mut sequences: Vec<Vec<u32>> = Vec::new();
    for word in words {
        let word = word.trim_start();
        if word.is_empty() || word.len() > MAX_BAD_WORD_BYTES {
            return Err(bad(format!("a bad word must be 1 to {MAX_BAD_WORD_BYTES} bytes of text")));
        }
        let plain = tokenizer.encode(word, false).map_err(|e| bad(e.to_string()))?;
        let spaced = tokenizer.encode(&format!(" {word}"), false).map_err(|e| bad(e.to_string()))?;
        let differs = spaced.first() != plain.first() && spaced.len() == plain.len();
        sequences.push(plain);
        if differs {
            sequences.push(spaced);
        }
    }
    Ok(sequences)
}

/// Whether the client asked for a stream, and for usage in it.
pub fn stream_mode(fields: &SamplingFields) -> StreamMode {
    let stream = fields.stream.unwrap_or(false);
    let options = fields.stream_options.as_ref();
    let include_usage = stream && options.and_then(|o| o.include_usage).unwrap_or(false);
    let continuous_usage = include_usage && options.and_then(|o| o.continuous_usage_stats).unwrap_or(false);
    StreamMode { stream, include_usage, continuous_usage }
}

/// How a prompt becomes token ids, from the request's vLLM fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptOptions {
    /// Keep only the last this many tokens.
    pub truncate_to: Option<usize>,
    pub add_special_tokens: bool,
}

impl PromptOptions {
    /// `add_special_tokens_default`: true for completions, false for chat
    /// (vLLM's defaults: a chat template writes the special tokens itself).
    pub fn new(
        fields: &SamplingFields,
        max_model_len: usize,
        add_special_tokens_default: bool,
    ) -> Result<Self, ApiError> {
        let truncate_to = match fields.truncate_prompt_tokens {
            None => None,
            Some(-1) => Some(max_model_len),
            Some(k) if k < 1 => {
                return Err(ApiError::bad_request(
                    Some("truncate_prompt_tokens"),
                    format!("truncate_prompt_tokens must be at least 1, or -1 for the model's context length; got {k}"),
                ))
            }
            Some(k) => match usize::try_from(k) {
                Ok(k) if k <= max_model_len => Some(k),
                _ => {
                    return Err(ApiError::bad_request(
                        Some("truncate_prompt_tokens"),
                        format!(
                            "truncate_prompt_tokens ({k}) is greater than the model's context length \
                             ({max_model_len}); choose a smaller value"
                        ),
                    ))
                }
            },
        };
        let add_special_tokens = fields.add_special_tokens.unwrap_or(add_special_tokens_default);
        Ok(Self { truncate_to, add_special_tokens })
    }

    /// Drops the oldest tokens of `ids` beyond the truncation length (vLLM keeps the last ones).
    pub fn truncate(&self, ids: &mut Vec<u32>) {
        if let Some(keep) = self.truncate_to {
            if ids.len() > keep {
                ids.drain(..ids.len() - keep);
            }
        }
    }
}

/// The longest `request_id` a client may choose (it is logged and echoed in every response).
pub const MAX_CLIENT_REQUEST_ID_BYTES: usize = 256;

/// Checks a client-chosen `request_id` (responses then carry
/// `{prefix}-{request_id}`, as vLLM's do).
pub fn check_client_request_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_CLIENT_REQUEST_ID_BYTES || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            Some("request_id"),
            format!(
                "request_id must be 1 to {MAX_CLIENT_REQUEST_ID_BYTES} bytes of text without control characters"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{StopStrings, StreamOptions};

    fn info() -> ModelInfo {
        ModelInfo {
            max_model_len: 128,
            vocab_size: 100,
            eos_token_ids: vec![2],
            default_sampling: SamplingParams { temperature: 0.7, top_p: 0.9, ..SamplingParams::default() },
            num_gpu_blocks: 10,
            block_size: 16,
        }
    }

    #[test]
    fn model_defaults_fill_what_the_client_left_out() {
        let r = generation_request(&SamplingFields::default(), &info(), Some(16), None).unwrap();
        assert_eq!(r.sampling.temperature, 0.7);
        assert_eq!(r.sampling.top_p, 0.9);
        assert_eq!(r.n, 1);
        assert_eq!(r.max_tokens, Some(16));
        let fields = SamplingFields { temperature: Some(0.0), top_k: Some(-1), ..Default::default() };
        let r = generation_request(&fields, &info(), None, Some(3)).unwrap();
        assert_eq!(r.sampling.temperature, 0.0);
        assert_eq!(r.sampling.top_k, 0);
        assert_eq!(r.sampling.logprobs, Some(3));
    }

    #[test]
    fn api_only_checks_name_the_parameter() {
        let cases = [
            (SamplingFields { top_k: Some(-2), ..Default::default() }, None, "top_k"),
            (
                SamplingFields { prompt_logprobs: Some(1), stream: Some(true), ..Default::default() },
                None,
                "prompt_logprobs",
            ),
            (SamplingFields { n: Some(3), best_of: Some(2), ..Default::default() }, None, "best_of"),
            (
                SamplingFields { stream_options: Some(StreamOptions::default()), ..Default::default() },
                None,
                "stream_options",
            ),
        ];
        for (fields, logprobs, param) in cases {
            let e = generation_request(&fields, &info(), Some(16), logprobs).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param));
        }
    }

    #[test]
    fn logit_bias_becomes_sorted_pairs_with_named_errors() {
        let with = |bias: serde_json::Value| SamplingFields {
            logit_bias: Some(bias.as_object().unwrap().clone()),
            ..Default::default()
        };
        let r =
            generation_request(&with(serde_json::json!({"7": -1.5, "3": 100})), &info(), None, None).unwrap();
        assert_eq!(r.sampling.logit_bias, vec![(3, 100.0), (7, -1.5)]);
        for bad in
            [serde_json::json!({"x": 1}), serde_json::json!({"3": "a"}), serde_json::json!({"5": 1, "05": 2})]
        {
            let e = generation_request(&with(bad.clone()), &info(), None, None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("logit_bias"), "{bad}");
        }
    }

    #[test]
    fn truncation_keeps_the_last_tokens_within_the_context() {
        let with = |k: Option<i64>| SamplingFields { truncate_prompt_tokens: k, ..Default::default() };
        let options = PromptOptions::new(&with(Some(2)), 128, true).unwrap();
        let mut ids = vec![1, 2, 3, 4];
        options.truncate(&mut ids);
        assert_eq!(ids, vec![3, 4]);
        let mut short = vec![9];
        options.truncate(&mut short);
        assert_eq!(short, vec![9]);
        assert_eq!(PromptOptions::new(&with(Some(-1)), 128, true).unwrap().truncate_to, Some(128));
        assert_eq!(PromptOptions::new(&with(None), 128, true).unwrap().truncate_to, None);
        for bad in [0, -2, 129] {
            let e = PromptOptions::new(&with(Some(bad)), 128, true).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("truncate_prompt_tokens"), "{bad}");
        }
    }

    #[test]
    fn special_tokens_default_per_endpoint_unless_asked() {
        let none = SamplingFields::default();
        assert!(PromptOptions::new(&none, 8, true).unwrap().add_special_tokens);
        assert!(!PromptOptions::new(&none, 8, false).unwrap().add_special_tokens);
        let off = SamplingFields { add_special_tokens: Some(false), ..Default::default() };
        assert!(!PromptOptions::new(&off, 8, true).unwrap().add_special_tokens);
    }

    #[test]
    fn a_client_request_id_is_bounded() {
        assert!(check_client_request_id("abc-1").is_ok());
        for bad in ["".to_string(), "a\nb".to_string(), "x".repeat(MAX_CLIENT_REQUEST_ID_BYTES + 1)] {
            assert_eq!(check_client_request_id(&bad).unwrap_err().param.as_deref(), Some("request_id"));
        }
    }

    #[test]
    fn continuous_usage_needs_include_usage_and_a_stream() {
        let options = |include, continuous| StreamOptions {
            include_usage: Some(include),
            continuous_usage_stats: Some(continuous),
        };
        let fields = SamplingFields {
            stream: Some(true),
            stream_options: Some(options(true, true)),
            ..Default::default()
        };
        assert_eq!(
            stream_mode(&fields),
            StreamMode { stream: true, include_usage: true, continuous_usage: true }
        );
        let fields = SamplingFields {
            stream: Some(true),
            stream_options: Some(options(false, true)),
            ..Default::default()
        };
        assert_eq!(
            stream_mode(&fields),
            StreamMode { stream: true, include_usage: false, continuous_usage: false }
        );
    }

    #[test]
    fn engine_checks_are_left_to_the_engine() {
        // logprobs, and min_tokens against max_tokens or the context, are the
        // input processor's (it knows the prompt's length): passed through.
        let fields = SamplingFields { min_tokens: Some(200), ..Default::default() };
        let r = generation_request(&fields, &info(), Some(16), Some(21)).unwrap();
        assert_eq!((r.min_tokens, r.sampling.logprobs), (200, Some(21)));
    }

    #[test]
    fn best_of_equal_to_n_is_accepted() {
        let fields = SamplingFields { n: Some(2), best_of: Some(2), ..Default::default() };
        assert_eq!(generation_request(&fields, &info(), None, None).unwrap().n, 2);
        let fields = SamplingFields {
            stream: Some(true),
            stream_options: Some(StreamOptions::default()),
            ..Default::default()
        };
        assert!(generation_request(&fields, &info(), None, None).is_ok());
    }

    #[test]
    fn empty_stop_strings_are_dropped() {
        let fields =
            SamplingFields { stop: Some(StopStrings(vec!["".into(), "\n".into()])), ..Default::default() };
        assert_eq!(generation_request(&fields, &info(), None, None).unwrap().stop, vec!["\n".to_string()]);
    }
}
