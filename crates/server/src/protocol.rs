//! The OpenAI wire format: request bodies (with vLLM's extra sampling fields)
//! and the response, chunk and usage objects the API returns.
//!
//! Fields a client may send as `null` are `Option`s; unknown fields are
//! ignored, as OpenAI's clients send many.

use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// `prompt` of a completion request: a string, a list of strings, a list of
/// token ids, or a list of token-id lists. Each entry is its own prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    Texts(Vec<String>),
    TokenIds(Vec<Vec<u32>>),
}

impl PromptInput {
    pub fn len(&self) -> usize {
        match self {
            PromptInput::Texts(t) => t.len(),
            PromptInput::TokenIds(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const PROMPT_SHAPES: &str =
    "prompt must be a string, an array of strings, an array of token ids, or an array of token-id arrays";

impl<'de> Deserialize<'de> for PromptInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fn token(v: &Value) -> Option<u32> {
            v.as_u64().and_then(|t| u32::try_from(t).ok())
        }
        let value = Value::deserialize(d)?;
        match value {
            Value::String(s) => Ok(PromptInput::Texts(vec![s])),
            Value::Array(items) => {
                if items.is_empty() {
                    return Err(D::Error::custom("prompt must not be empty"));
                }
                if items.iter().all(Value::is_string) {
                    let texts = items.into_iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
                    return Ok(PromptInput::Texts(texts));
                }
                if let Some(ids) = items.iter().map(token).collect::<Option<Vec<u32>>>() {
                    return Ok(PromptInput::TokenIds(vec![ids]));
                }
                let lists: Option<Vec<Vec<u32>>> = items
                    .iter()
                    .map(|item| item.as_array().and_then(|ids| ids.iter().map(token).collect()))
                    .collect();
                lists.map(PromptInput::TokenIds).ok_or_else(|| D::Error::custom(PROMPT_SHAPES))
            }
            _ => Err(D::Error::custom(PROMPT_SHAPES)),
        }
    }
}

/// `stop`: one string or a list of them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StopStrings(pub Vec<String>);

impl<'de> Deserialize<'de> for StopStrings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(StopStrings(Vec::new())),
            Value::String(s) => Ok(StopStrings(vec![s])),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(D::Error::custom("stop must be a string or an array of strings")),
                })
                .collect::<Result<_, _>>()
                .map(StopStrings),
            _ => Err(D::Error::custom("stop must be a string or an array of strings")),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// vLLM: with `include_usage`, every chunk carries the counts so far.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// The fields completions and chat share: sampling (OpenAI's plus vLLM's),
/// streaming, scheduling and `user`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct SamplingFields {
    pub n: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM: -1 or 0 disables top-k.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StopStrings>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<usize>,
    pub include_stop_str_in_output: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    /// OpenAI: `{"token id": bias}`, each bias in [-100, 100].
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// vLLM: only these tokens may be generated.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM: words never to be generated (tokenized with and without a leading space).
    pub bad_words: Option<Vec<String>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub priority: Option<i32>,
    /// Candidates per prompt to pick the `n` best from (highest cumulative
    /// logprob; completions only, not streamed).
    pub best_of: Option<usize>,
    /// vLLM: the logprob of every prompt token, with this many top alternatives.
    pub prompt_logprobs: Option<usize>,
    /// OpenAI's end-user id; only logged by OpenAI, unused here.
    pub user: Option<String>,
    /// vLLM: keep only the last this many prompt tokens (-1: the model's context length).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM: add the tokenizer's special tokens (BOS) when tokenizing the
    /// prompt. Default true for completions, false for chat (its template
    /// writes them).
    pub add_special_tokens: Option<bool>,
    /// vLLM: the client's id for the request; responses carry `{prefix}-{request_id}`.
    pub request_id: Option<String>,
    /// vLLM: logprobs name tokens `token_id:{id}` instead of their text.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM: only requests with the same salt share prefix-cached blocks.
    pub cache_salt: Option<String>,
    /// Structured outputs (see [`crate::structured`]): OpenAI's
    /// `response_format`, vLLM's `structured_outputs` and its older `guided_*`
    /// fields, kept as JSON until one constraint is made of them.
    pub response_format: Option<Value>,
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// POST /v1/completions.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptInput,
    /// Absent means OpenAI's 16; `null` means up to the model's length.
    #[serde(default = "default_completion_max_tokens")]
    pub max_tokens: Option<usize>,
    /// Legacy shape: the number of top alternatives per token (0..=20).
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    /// Parsed from the same body by [`RequestBody`] (not `flatten`, which
    /// would lose the field names in error messages).
    #[serde(skip)]
    pub sampling: SamplingFields,
}

fn default_completion_max_tokens() -> Option<usize> {
    Some(16)
}

/// One part of a message's content array.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A message's `content`: a string or an array of parts.
#[derive(Clone, Debug, PartialEq)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text a template sees: the text parts joined with newlines
    /// (the chat endpoint accepts text parts only).
    pub fn into_text(self) -> String {
        match self {
            MessageContent::Text(text) => text,
            MessageContent::Parts(parts) => {
                parts.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join("\n")
            }
        }
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(MessageContent::Text(s)),
            v @ Value::Array(_) => serde_json::from_value(v).map(MessageContent::Parts).map_err(|e| {
                D::Error::custom(format!("content parts must be objects with a `type` and a `text`: {e}"))
            }),
            _ => Err(D::Error::custom("content must be a string or an array of content parts")),
        }
    }
}

/// One message of a chat conversation; fields beyond role and content
/// (`name`, `tool_calls`...) pass through to the chat template.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// One entry of `tools`: a function the model may call.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ToolDefinition {
    #[serde(rename = "type")]
    pub kind: ToolKind,
    pub function: FunctionDefinition,
}

/// The kinds of tool OpenAI's chat API defines.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ToolKind {
    Function,
}

/// A function of `tools`; absent optional fields stay absent for the template.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or
/// `{"type": "function", "function": {"name": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Function(String),
}

const TOOL_CHOICE_SHAPES: &str =
    r#"tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": "..."}}"#;

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => match s.as_str() {
                "none" => Ok(ToolChoice::None),
                "auto" => Ok(ToolChoice::Auto),
                "required" => Ok(ToolChoice::Required),
                _ => Err(D::Error::custom(TOOL_CHOICE_SHAPES)),
            },
            Value::Object(object) => {
                let name = (object.get("type").and_then(Value::as_str) == Some("function"))
                    .then(|| object.get("function")?.get("name")?.as_str())
                    .flatten()
                    .filter(|name| !name.is_empty());
                name.map(|n| ToolChoice::Function(n.to_string()))
                    .ok_or_else(|| D::Error::custom(TOOL_CHOICE_SHAPES))
            }
            _ => Err(D::Error::custom(TOOL_CHOICE_SHAPES)),
        }
    }
}

/// POST /v1/chat/completions.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub add_generation_prompt: Option<bool>,
    /// vLLM: the reply starts with the last message's content when that
    /// message has the reply's role (so a continued message comes back whole).
    pub echo: Option<bool>,
    /// Functions the model may call, shown to it through the chat template.
    pub tools: Option<Vec<ToolDefinition>>,
    pub tool_choice: Option<ToolChoice>,
    /// Whether the model may call several functions in one turn (OpenAI's default: true).
    pub parallel_tool_calls: Option<bool>,
    /// Extra variables for the chat template (vLLM's `chat_template_kwargs`).
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// vLLM: leave the final message open for the model to continue
    /// (needs `add_generation_prompt` false, which it implies when absent).
    pub continue_final_message: Option<bool>,
    /// vLLM: documents for retrieval-augmented templates (the `documents` variable).
    pub documents: Option<Vec<serde_json::Map<String, Value>>>,
    /// vLLM: a template for this request instead of the model's (the
    /// server must run with --trust-request-chat-template).
    pub chat_template: Option<String>,
    /// Parsed from the same body by [`RequestBody`].
    #[serde(skip)]
    pub sampling: SamplingFields,
}

/// A request type parsed from a JSON body (see [`crate::extract::ApiJson`]).
pub trait RequestBody: Sized {
    fn parse(bytes: &[u8]) -> Result<Self, crate::error::ApiError>;

    /// The id the client chose for the request (vLLM's `request_id`), checked by `parse`.
    fn client_request_id(&self) -> Option<&str> {
        None
    }
}

/// The second pass of a body: the shared sampling fields, with their own checks.
fn parse_sampling(bytes: &[u8]) -> Result<SamplingFields, crate::error::ApiError> {
    let sampling: SamplingFields = crate::extract::parse_json(bytes)?;
    if let Some(id) = &sampling.request_id {
        crate::params::check_client_request_id(id)?;
    }
    Ok(sampling)
}

impl RequestBody for CompletionRequest {
    fn parse(bytes: &[u8]) -> Result<Self, crate::error::ApiError> {
        crate::fields::check_body(crate::fields::Endpoint::Completions, bytes)?;
        let mut request: CompletionRequest = crate::extract::parse_json(bytes)?;
        request.sampling = parse_sampling(bytes)?;
        Ok(request)
    }

    fn client_request_id(&self) -> Option<&str> {
        self.sampling.request_id.as_deref()
    }
}

impl RequestBody for ChatCompletionRequest {
    fn parse(bytes: &[u8]) -> Result<Self, crate::error::ApiError> {
        crate::fields::check_body(crate::fields::Endpoint::Chat, bytes)?;
        let mut request: ChatCompletionRequest = crate::extract::parse_json(bytes)?;
        request.sampling = parse_sampling(bytes)?;
        Ok(request)
    }

    fn client_request_id(&self) -> Option<&str> {
        self.sampling.request_id.as_deref()
    }
}

/// Token counts of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// vLLM's `stop_reason`: the stop token id or stop string that matched.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StopReasonOut {
    TokenId(u32),
    Text(String),
}

impl StopReasonOut {
    pub fn from_engine(reason: &Option<pagoda_engine::StopReason>) -> Option<Self> {
        match reason {
            Some(pagoda_engine::StopReason::TokenId(t)) => Some(StopReasonOut::TokenId(*t)),
            Some(pagoda_engine::StopReason::String(s)) => Some(StopReasonOut::Text(s.clone())),
            None => None,
        }
    }
}

/// A logprob as JSON: -inf becomes -9999 (JSON has no infinities; vLLM's choice).
pub fn finite_logprob(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

/// Completions' legacy logprobs object.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// `null` for an echoed prompt's first token (nothing comes before it).
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<TopLogprobMap>>,
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    pub fn extend(&mut self, other: CompletionLogprobs) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }
}

/// `{token text: logprob}` in order of probability (a JSON object whose key
/// order is kept; a repeated text keeps its first, higher, entry).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TopLogprobMap(pub Vec<(String, f32)>);

impl Serialize for TopLogprobMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut seen = std::collections::HashSet::new();
        let mut map = s.serialize_map(None)?;
        for (token, lp) in &self.0 {
            if seen.insert(token.as_str()) {
                map.serialize_entry(token, lp)?;
            }
        }
        map.end()
    }
}

/// vLLM's logprobs of one prompt token: `{"token id": {logprob, rank,
/// decoded_token}}`, the prompt token first, then its top alternatives.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PromptLogprobMap(pub Vec<(u32, f32, u32, String)>);

impl Serialize for PromptLogprobMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        #[derive(Serialize)]
        struct Entry<'a> {
            logprob: f32,
            rank: u32,
            decoded_token: &'a str,
        }
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (token, logprob, rank, text) in &self.0 {
            map.serialize_entry(
                &token.to_string(),
                &Entry { logprob: *logprob, rank: *rank, decoded_token: text },
            )?;
        }
        map.end()
    }
}

/// `prompt_logprobs` of a response: one entry per prompt token, the first `null`.
pub type PromptLogprobsOut = Vec<Option<PromptLogprobMap>>;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<StopReasonOut>,
    /// vLLM's, when the request asked for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobsOut>,
}

/// A completion response, or one chunk of a streamed one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "UsageField::is_absent")]
    pub usage: UsageField,
}

/// `usage`: present with counts, present as `null` (streamed chunks when the
/// client asked for usage), or absent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UsageField {
    Absent,
    Null,
    Counts(Usage),
}

impl UsageField {
    fn is_absent(&self) -> bool {
        matches!(self, UsageField::Absent)
    }
}

impl Serialize for UsageField {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UsageField::Counts(u) => u.serialize(s),
            _ => s.serialize_none(),
        }
    }
}

/// One candidate token in chat's logprobs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One generated token in chat's logprobs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    /// `null` when the message is only tool calls, as OpenAI sends it.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// A function call the model made (OpenAI's `message.tool_calls[i]`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallOut,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FunctionCallOut {
    pub name: String,
    /// JSON text, as OpenAI sends it.
    pub arguments: String,
}

/// One streamed piece of a tool call (OpenAI's `delta.tool_calls[i]`): the
/// first carries the id, type and name, later ones argument fragments.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCallDelta,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<StopReasonOut>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// vLLM's (on the response, not the choices), when the request asked for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobsOut>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<StopReasonOut>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "UsageField::is_absent")]
    pub usage: UsageField,
}

/// GET /v1/models.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// The base model's path, or a LoRA adapter's folder.
    pub root: String,
    /// A LoRA adapter's base model (its served name); `null` for the base model (vLLM's field).
    pub parent: Option<String>,
    pub max_model_len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(json: &str) -> Result<PromptInput, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn prompt_accepts_the_four_shapes() {
        assert_eq!(prompt(r#""hi""#).unwrap(), PromptInput::Texts(vec!["hi".into()]));
        assert_eq!(prompt(r#"["a", "b"]"#).unwrap(), PromptInput::Texts(vec!["a".into(), "b".into()]));
        assert_eq!(prompt("[1, 2, 3]").unwrap(), PromptInput::TokenIds(vec![vec![1, 2, 3]]));
        assert_eq!(prompt("[[1, 2], [3]]").unwrap(), PromptInput::TokenIds(vec![vec![1, 2], vec![3]]));
    }

    #[test]
    fn prompt_rejects_other_shapes() {
        for bad in ["3", "[]", "[-1]", "[1, \"a\"]", "[[1], \"a\"]", "{\"a\": 1}", "[1.5]", "[4294967296]"] {
            assert!(prompt(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stop_is_string_or_list() {
        let s: StopStrings = serde_json::from_str(r#""\n""#).unwrap();
        assert_eq!(s.0, vec!["\n"]);
        let s: StopStrings = serde_json::from_str(r#"["a", "b"]"#).unwrap();
        assert_eq!(s.0, vec!["a", "b"]);
        assert!(serde_json::from_str::<StopStrings>("[1]").is_err());
    }

    #[test]
    fn completion_max_tokens_defaults_to_16_and_null_means_unbounded() {
        let r: CompletionRequest = serde_json::from_str(r#"{"prompt": "x"}"#).unwrap();
        assert_eq!(r.max_tokens, Some(16));
        let r: CompletionRequest = serde_json::from_str(r#"{"prompt": "x", "max_tokens": null}"#).unwrap();
        assert_eq!(r.max_tokens, None);
    }

    #[test]
    fn sampling_fields_come_from_the_same_body_with_named_errors() {
        let r = CompletionRequest::parse(br#"{"prompt": "x", "temperature": 0.5, "stop": "\n"}"#).unwrap();
        assert_eq!(r.sampling.temperature, Some(0.5));
        assert_eq!(r.sampling.stop, Some(StopStrings(vec!["\n".into()])));
        let e = CompletionRequest::parse(br#"{"prompt": "x", "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = ChatCompletionRequest::parse(br#"{"messages": [], "n": -1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = ChatCompletionRequest::parse(br#"{"messages": [{"content": "hi"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"), "{e:?}");
    }

    #[test]
    fn chat_content_parts_parse() {
        let r: ChatCompletionRequest = serde_json::from_str(
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "bob"}]}"#,
        )
        .unwrap();
        let m = &r.messages[0];
        assert_eq!(
            m.content,
            Some(MessageContent::Parts(vec![ContentPart { kind: "text".into(), text: Some("hi".into()) }]))
        );
        assert_eq!(m.extra["name"], "bob");
    }

    #[test]
    fn top_logprobs_keep_order_and_first_duplicate() {
        let m = TopLogprobMap(vec![("b".into(), -0.1), ("a".into(), -1.0), ("b".into(), -2.0)]);
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"b":-0.1,"a":-1.0}"#);
    }

    #[test]
    fn usage_field_serializes_three_ways() {
        let chunk = |usage| ChatCompletionChunk {
            id: "x".into(),
            object: "chat.completion.chunk",
            created: 0,
            model: "m".into(),
            choices: vec![],
            usage,
        };
        let v = serde_json::to_value(chunk(UsageField::Absent)).unwrap();
        assert!(v.get("usage").is_none());
        let v = serde_json::to_value(chunk(UsageField::Null)).unwrap();
        assert!(v["usage"].is_null() && v.get("usage").is_some());
        let v = serde_json::to_value(chunk(UsageField::Counts(Usage::new(3, 4)))).unwrap();
        assert_eq!(v["usage"]["total_tokens"], 7);
    }
}
