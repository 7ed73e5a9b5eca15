//! The request surface of /v1/completions and /v1/chat/completions: every
//! field OpenAI or vLLM defines for them, and what Pagoda does with it.
//!
//! The rule: a field either works as OpenAI or vLLM documents it, or is
//! refused with a 400 naming it whenever its value would change anything.
//! A third, small class is inert by its own definition (OpenAI's platform
//! fields such as `store: false` or `metadata`, which do nothing on a
//! self-hosted server). Fields neither API defines are ignored with a
//! warning in the log, as vLLM does, since clients add their own.
//!
//! [`check_body`] applies the table to a request body before it is parsed
//! into the request types; the tests walk the table.

use std::collections::HashMap;

use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::ApiError;

/// The two generation endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// What Pagoda does with a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// Read into the request types and honoured.
    Works,
    /// A 400 naming the field unless the value is neutral: `null`, `false`,
    /// an empty string, array or object, or the field's own default
    /// ([`Field::neutral`]). The text says why.
    Refused(&'static str),
    /// Accepted; by its own documentation it has no effect on a
    /// self-hosted server. The text says why.
    Inert(&'static str),
}

/// The values of a refused field that change nothing, so a client sending
/// them (as some send every field with its default) is not refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Neutral {
    /// `null`, `false`, or an empty string, array or object.
    Empty,
    /// Those, and this default (JSON), e.g. `1.0` for `length_penalty`.
    EmptyOr(&'static str),
    /// Only `null`: an empty value means something (`web_search_options: {}` turns search on).
    Null,
}

/// One field of a request body.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub name: &'static str,
    pub support: Support,
    /// Which values leave a refused field without effect.
    pub neutral: Neutral,
    /// A body fragment (JSON object) that uses the field with an effect;
    /// the tests send it. Companion fields it needs are included.
    pub example: &'static str,
}

const fn works(name: &'static str, example: &'static str) -> Field {
    Field { name, support: Support::Works, neutral: Neutral::Empty, example }
}

const fn refused(name: &'static str, why: &'static str, example: &'static str) -> Field {
    Field { name, support: Support::Refused(why), neutral: Neutral::Empty, example }
}

const fn refused_unless(
    name: &'static str,
    neutral: &'static str,
    why: &'static str,
    example: &'static str,
) -> Field {
    Field { name, support: Support::Refused(why), neutral: Neutral::EmptyOr(neutral), example }
}

const fn inert(name: &'static str, why: &'static str, example: &'static str) -> Field {
    Field { name, support: Support::Inert(why), neutral: Neutral::Empty, example }
}

const NO_EXTENSIONS: &str = "Pagoda loads no request-supplied extensions";
const PLATFORM: &str = "OpenAI's platform uses it (abuse tracking, billing, caching hints); a self-hosted \
                        server has nothing to do with it";

/// The fields both endpoints share: OpenAI's sampling fields and vLLM's extras.
const SHARED: &[Field] = &[
    works("model", r#"{"model": "{model}"}"#),
    works("frequency_penalty", r#"{"frequency_penalty": 0.5}"#),
    works("presence_penalty", r#"{"presence_penalty": 0.5}"#),
    works("n", r#"{"n": 2}"#),
    works("seed", r#"{"seed": 7}"#),
    works("stop", r#"{"stop": ["\n"]}"#),
    works("stream", r#"{"stream": true}"#),
    works(
        "stream_options",
        r#"{"stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}}"#,
    ),
    works("temperature", r#"{"temperature": 0.5}"#),
    works("top_p", r#"{"top_p": 0.5}"#),
    works("max_tokens", r#"{"max_tokens": 3}"#),
    works("best_of", r#"{"n": 2, "best_of": 2}"#),
    works("top_k", r#"{"top_k": 5}"#),
    works("min_p", r#"{"min_p": 0.1}"#),
    works("repetition_penalty", r#"{"repetition_penalty": 1.2}"#),
    works("stop_token_ids", r#"{"stop_token_ids": [2]}"#),
    works("include_stop_str_in_output", r#"{"include_stop_str_in_output": true}"#),
    works("ignore_eos", r#"{"ignore_eos": true}"#),
    works("min_tokens", r#"{"min_tokens": 2}"#),
    works("skip_special_tokens", r#"{"skip_special_tokens": false}"#),
    works("truncate_prompt_tokens", r#"{"truncate_prompt_tokens": 4}"#),
    works("add_special_tokens", r#"{"add_special_tokens": false}"#),
    works("priority", r#"{"priority": 1}"#),
    works("request_id", r#"{"request_id": "client-chosen-id"}"#),
    works("return_tokens_as_token_ids", r#"{"return_tokens_as_token_ids": true}"#),
    inert("user", PLATFORM, r#"{"user": "someone"}"#),
    inert(
        "spaces_between_special_tokens",
        "only the slow (Python) tokenizers insert those spaces; Pagoda's tokenizer, like vLLM v1's fast \
         detokenizer, never does, whatever the value",
        r#"{"spaces_between_special_tokens": false}"#,
    ),
    // On the CPU backend; the engine refuses them by name on a backend whose sampler ignores them.
    works("logit_bias", r#"{"logit_bias": {"5": 10}}"#),
    works("allowed_token_ids", r#"{"allowed_token_ids": [5, 6]}"#),
    works("bad_words", r#"{"bad_words": ["the"]}"#),
    // Not with stream (refused by name, as in vLLM); such a prompt is computed whole, never from the prefix cache.
    works("prompt_logprobs", r#"{"prompt_logprobs": 1}"#),
    refused("use_beam_search", "beam search is not implemented", r#"{"use_beam_search": true}"#),
    refused_unless(
        "length_penalty",
        "1",
        "it applies to beam search, which is not implemented",
        r#"{"length_penalty": 0.5}"#,
    ),
    // Structured outputs (structured.rs): one constraint per request, compiled with llguidance.
    works("response_format", r#"{"response_format": {"type": "json_object"}}"#),
    works("structured_outputs", r#"{"structured_outputs": {"choice": ["yes", "no"]}}"#),
    works("guided_json", r#"{"guided_json": {"type": "object"}}"#),
    works("guided_regex", r#"{"guided_regex": "[a-z]+"}"#),
    works("guided_choice", r#"{"guided_choice": ["yes", "no"]}"#),
    works("guided_grammar", r#"{"guided_grammar": "root ::= \"a\""}"#),
    inert(
        "guided_decoding_backend",
        "it picks the grammar engine; Pagoda has one (llguidance), and the choice does not change which \
         outputs are valid",
        r#"{"guided_decoding_backend": "xgrammar"}"#,
    ),
    refused(
        "guided_whitespace_pattern",
        "Pagoda's grammars allow no free whitespace in JSON; a custom whitespace pattern is not supported",
        r#"{"guided_whitespace_pattern": " "}"#,
    ),
    refused("structural_tag", "structural tags are not supported", r#"{"structural_tag": "{}"}"#),
    refused("logits_processors", NO_EXTENSIONS, r#"{"logits_processors": ["my.Processor"]}"#),
    refused("vllm_xargs", NO_EXTENSIONS, r#"{"vllm_xargs": {"k": 1}}"#),
    refused(
        "kv_transfer_params",
        "disaggregated prefill (KV transfer between servers) is not implemented",
        r#"{"kv_transfer_params": {"do_remote_decode": true}}"#,
    ),
    works("cache_salt", r#"{"cache_salt": "a-long-random-salt"}"#),
    refused(
        "mm_processor_kwargs",
        "Pagoda serves text-only models",
        r#"{"mm_processor_kwargs": {"num_crops": 4}}"#,
    ),
];

/// /v1/completions' own fields.
const COMPLETIONS: &[Field] = &[
    works("prompt", r#"{"prompt": [1, 2, 3]}"#),
    works("echo", r#"{"echo": true, "logprobs": 1, "max_tokens": 0}"#),
    works("logprobs", r#"{"logprobs": 2}"#),
    // best_of above n: the n most likely of best_of samples (not streamed; chat refuses it by name).
    works("best_of", r#"{"best_of": 2}"#),
    refused("suffix", "insertion (fill in the middle) is not supported", r#"{"suffix": " end"}"#),
    refused("prompt_embeds", "prompts as embeddings are not supported", r#"{"prompt_embeds": "AAAA"}"#),
];

/// /v1/chat/completions' own fields.
const CHAT: &[Field] = &[
    works(
        "messages",
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}"#,
    ),
    works("logprobs", r#"{"logprobs": true}"#),
    works("top_logprobs", r#"{"logprobs": true, "top_logprobs": 2}"#),
    works("max_completion_tokens", r#"{"max_completion_tokens": 3}"#),
    works("tools", r#"{"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}"#),
    works(
        "tool_choice",
        r#"{"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "f"}}}"#,
    ),
    works("add_generation_prompt", r#"{"add_generation_prompt": false}"#),
    // vLLM's: the reply starts with the last message when it has the reply's role.
    works(
        "echo",
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}], "echo": true, "continue_final_message": true}"#,
    ),
    works(
        "continue_final_message",
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}], "continue_final_message": true, "add_generation_prompt": false}"#,
    ),
    works("documents", r#"{"documents": [{"title": "t", "text": "x"}]}"#),
    works("chat_template", r#"{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}"#),
    works("chat_template_kwargs", r#"{"chat_template_kwargs": {"enable_thinking": false}}"#),
    works(
        "parallel_tool_calls",
        r#"{"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "parallel_tool_calls": false}"#,
    ),
    inert("metadata", PLATFORM, r#"{"metadata": {"k": "v"}}"#),
    inert("service_tier", PLATFORM, r#"{"service_tier": "auto"}"#),
    inert("prompt_cache_key", PLATFORM, r#"{"prompt_cache_key": "k"}"#),
    inert("safety_identifier", PLATFORM, r#"{"safety_identifier": "someone"}"#),
    inert(
        "include_reasoning",
        "it selects a reasoning parser's output, and Pagoda has no reasoning parser",
        r#"{"include_reasoning": false}"#,
    ),
    refused("store", "stored completions (OpenAI's platform) are not kept", r#"{"store": true}"#),
    refused("reasoning_effort", "no reasoning model is served", r#"{"reasoning_effort": "low"}"#),
    refused("verbosity", "no reasoning model is served", r#"{"verbosity": "low"}"#),
    refused_unless(
        "modalities",
        r#"["text"]"#,
        "Pagoda generates text only",
        r#"{"modalities": ["text", "audio"]}"#,
    ),
    refused("audio", "Pagoda generates text only", r#"{"audio": {"voice": "alloy", "format": "wav"}}"#),
    refused(
        "prediction",
        "predicted outputs are not implemented",
        r#"{"prediction": {"type": "content", "content": "x"}}"#,
    ),
    Field {
        name: "web_search_options",
        support: Support::Refused("Pagoda has no web search"),
        neutral: Neutral::Null,
        example: r#"{"web_search_options": {}}"#,
    },
    refused("functions", "the deprecated `functions` API: use `tools`", r#"{"functions": [{"name": "f"}]}"#),
    refused(
        "function_call",
        "the deprecated `functions` API: use `tool_choice`",
        r#"{"function_call": "auto"}"#,
    ),
];

/// Every field of `endpoint`: its own, then the shared ones.
pub fn fields(endpoint: Endpoint) -> impl Iterator<Item = &'static Field> {
    let own = match endpoint {
        Endpoint::Completions => COMPLETIONS,
        Endpoint::Chat => CHAT,
    };
    own.iter().chain(SHARED.iter().filter(move |f| !own.iter().any(|o| o.name == f.name)))
}

/// The field named `name` on `endpoint`, if either API defines it.
pub fn lookup(endpoint: Endpoint, name: &str) -> Option<&'static Field> {
    fields(endpoint).find(|f| f.name == name)
}

/// Whether `value` leaves `field` without effect.
fn is_neutral(field: &Field, value: &Value) -> bool {
    let empty = match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) => false,
    };
    match field.neutral {
        Neutral::Null => value.is_null(),
        Neutral::Empty => empty,
        Neutral::EmptyOr(default) => {
            let default: Value = serde_json::from_str(default).unwrap_or(Value::Null);
            empty
                || match (&default, value) {
                    (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                    _ => default == *value,
                }
        }
    }
}

/// Refuses a body that gives any refused field a value with an effect (400
/// naming the first such field), and logs fields neither API defines.
/// Value types are checked later, by the request types' own parsing.
pub fn check_body(endpoint: Endpoint, bytes: &[u8]) -> Result<(), ApiError> {
    // Raw values: only refused fields' values are parsed (a prompt of
    // millions of token ids is not parsed twice).
    let Ok(body) = serde_json::from_slice::<HashMap<String, &RawValue>>(bytes) else {
        // Not a JSON object: the request type's parser says what is wrong.
        return Ok(());
    };
    let mut unknown: Vec<&str> = Vec::new();
    let mut keys: Vec<&String> = body.keys().collect();
    // The error names the first refused field in a stable order.
    keys.sort();
    for key in keys {
        match lookup(endpoint, key) {
            None => unknown.push(key),
            Some(field @ Field { support: Support::Refused(why), .. }) => {
                let value: Value = serde_json::from_str(body[key].get()).unwrap_or(Value::Null);
                if !is_neutral(field, &value) {
                    return Err(ApiError::bad_request(
                        Some(key),
                        format!("`{key}` is not supported by this server: {why}."),
                    ));
                }
            }
            Some(_) => {}
        }
    }
    if !unknown.is_empty() {
        tracing::warn!(fields = ?unknown, "request fields ignored: neither OpenAI nor vLLM defines them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ChatCompletionRequest, CompletionRequest, RequestBody, SamplingFields};

    /// The field names a `Deserialize` struct reads, found by asking it to
    /// deserialize from a deserializer that only records them.
    fn struct_fields<T: for<'de> serde::Deserialize<'de>>() -> Vec<&'static str> {
        struct Recorder<'a>(&'a mut Vec<&'static str>);
        #[derive(Debug)]
        struct Stop;
        impl std::fmt::Display for Stop {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("stop")
            }
        }
        impl std::error::Error for Stop {}
        impl serde::de::Error for Stop {
            fn custom<M: std::fmt::Display>(_: M) -> Self {
                Stop
            }
        }
        impl<'de> serde::Deserializer<'de> for Recorder<'_> {
            type Error = Stop;
            fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
                Err(Stop)
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Stop> {
                self.0.extend_from_slice(fields);
                Err(Stop)
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
                option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
                ignored_any
            }
        }
        let mut names = Vec::new();
        let _ = T::deserialize(Recorder(&mut names));
        names
    }

    fn own_fields(endpoint: Endpoint) -> Vec<&'static str> {
        let mut names = match endpoint {
            Endpoint::Completions => struct_fields::<CompletionRequest>(),
            Endpoint::Chat => struct_fields::<ChatCompletionRequest>(),
        };
        names.extend(struct_fields::<SamplingFields>());
        // Parsed by the sampling pass, not the request struct's own.
        names.retain(|n| *n != "sampling");
        names
    }

    /// vLLM's request fields (vllm/entrypoints/openai/protocol.py, 0.10 to
    /// 0.24) and OpenAI's (the API reference): each must be in the table.
    const VLLM_AND_OPENAI_COMPLETIONS: &[&str] = &[
        "model",
        "prompt",
        "prompt_embeds",
        "best_of",
        "echo",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "presence_penalty",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "suffix",
        "temperature",
        "top_p",
        "user",
        "use_beam_search",
        "top_k",
        "min_p",
        "repetition_penalty",
        "length_penalty",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "truncate_prompt_tokens",
        "allowed_token_ids",
        "prompt_logprobs",
        "bad_words",
        "add_special_tokens",
        "response_format",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_decoding_backend",
        "guided_whitespace_pattern",
        "priority",
        "request_id",
        "logits_processors",
        "return_tokens_as_token_ids",
        "cache_salt",
        "kv_transfer_params",
        "vllm_xargs",
    ];
    const VLLM_AND_OPENAI_CHAT: &[&str] = &[
        "messages",
        "model",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "presence_penalty",
        "response_format",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "reasoning_effort",
        "include_reasoning",
        "parallel_tool_calls",
        "user",
        "best_of",
        "use_beam_search",
        "top_k",
        "min_p",
        "repetition_penalty",
        "length_penalty",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "truncate_prompt_tokens",
        "prompt_logprobs",
        "allowed_token_ids",
        "bad_words",
        "echo",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
        "documents",
        "chat_template",
        "chat_template_kwargs",
        "mm_processor_kwargs",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "structural_tag",
        "guided_decoding_backend",
        "guided_whitespace_pattern",
        "priority",
        "request_id",
        "logits_processors",
        "return_tokens_as_token_ids",
        "cache_salt",
        "kv_transfer_params",
        "vllm_xargs",
        "store",
        "metadata",
        "service_tier",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
        "functions",
        "function_call",
        "prompt_cache_key",
        "safety_identifier",
        "verbosity",
    ];

    #[test]
    fn every_field_either_api_defines_is_in_the_table() {
        for (endpoint, names) in
            [(Endpoint::Completions, VLLM_AND_OPENAI_COMPLETIONS), (Endpoint::Chat, VLLM_AND_OPENAI_CHAT)]
        {
            for name in names {
                assert!(lookup(endpoint, name).is_some(), "{endpoint:?}: `{name}` is not in the table");
            }
        }
    }

    #[test]
    fn the_request_types_read_exactly_the_fields_that_work() {
        for endpoint in [Endpoint::Completions, Endpoint::Chat] {
            let read = own_fields(endpoint);
            // A refused or inert field may be read too, for its value checks
            // (`logit_bias`, `suffix`, `user` must have the right type).
            for name in &read {
                assert!(
                    lookup(endpoint, name).is_some(),
                    "{endpoint:?}: the request types read `{name}`, not in the table"
                );
            }
            for field in fields(endpoint).filter(|f| f.support == Support::Works) {
                assert!(
                    read.contains(&field.name),
                    "{endpoint:?}: `{}` works but no request type reads it",
                    field.name
                );
            }
        }
    }

    fn body(endpoint: Endpoint, example: &str) -> Vec<u8> {
        let mut body: serde_json::Map<String, Value> = match endpoint {
            Endpoint::Completions => serde_json::from_str(r#"{"prompt": "hi"}"#).unwrap(),
            Endpoint::Chat => {
                serde_json::from_str(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).unwrap()
            }
        };
        let example: serde_json::Map<String, Value> = serde_json::from_str(example).unwrap();
        body.extend(example);
        serde_json::to_vec(&body).unwrap()
    }

    #[test]
    fn refused_fields_are_400s_naming_them_and_the_others_pass_the_check() {
        for endpoint in [Endpoint::Completions, Endpoint::Chat] {
            for field in fields(endpoint) {
                let result = check_body(endpoint, &body(endpoint, field.example));
                match field.support {
                    Support::Refused(_) => {
                        let e = result.expect_err(field.name);
                        assert_eq!(e.param.as_deref(), Some(field.name));
                        assert!(e.message.contains("not supported"), "{}", e.message);
                    }
                    _ => assert!(result.is_ok(), "{endpoint:?}: {} refused", field.name),
                }
            }
        }
    }

    #[test]
    fn every_example_parses_into_the_request_types() {
        for field in fields(Endpoint::Completions).filter(|f| f.support == Support::Works) {
            let bytes = body(Endpoint::Completions, field.example);
            CompletionRequest::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e:?}", field.name));
        }
        for field in fields(Endpoint::Chat).filter(|f| f.support == Support::Works) {
            let bytes = body(Endpoint::Chat, field.example);
            ChatCompletionRequest::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e:?}", field.name));
        }
    }

    #[test]
    fn neutral_values_of_refused_fields_pass() {
        let cases = [
            r#"{"logit_bias": {}}"#,
            r#"{"logit_bias": null}"#,
            r#"{"use_beam_search": false}"#,
            r#"{"length_penalty": 1.0}"#,
            r#"{"response_format": {"type": "text"}}"#,
            r#"{"bad_words": []}"#,
            r#"{"guided_choice": null}"#,
        ];
        for case in cases {
            assert!(check_body(Endpoint::Completions, &body(Endpoint::Completions, case)).is_ok(), "{case}");
        }
        assert!(check_body(Endpoint::Chat, &body(Endpoint::Chat, r#"{"modalities": ["text"]}"#)).is_ok());
        assert!(check_body(Endpoint::Chat, &body(Endpoint::Chat, r#"{"store": false}"#)).is_ok());
        assert!(check_body(Endpoint::Chat, &body(Endpoint::Chat, r#"{"web_search_options": null}"#)).is_ok());
    }

    #[test]
    fn unknown_fields_and_non_objects_pass_to_the_parser() {
        assert!(check_body(Endpoint::Completions, br#"{"prompt": "x", "my_extension": 1}"#).is_ok());
        assert!(check_body(Endpoint::Completions, b"[1, 2]").is_ok());
        assert!(check_body(Endpoint::Completions, b"{not json").is_ok());
    }
}
