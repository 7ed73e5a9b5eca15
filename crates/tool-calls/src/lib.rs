//! Tool calls for Pagoda's OpenAI-compatible server.
//!
//! Models write tool calls as text in a format their chat template taught
//! them; this crate finds the calls in that text (the `--tool-call-parser`
//! formats of vLLM: [`ToolParserKind`]), both in a finished output
//! ([`ToolParserKind::extract`]) and as it streams ([`StreamingToolParser`]).
//! For `tool_choice` "required" or a named function the server instead
//! constrains decoding with a JSON schema ([`required_calls_schema`],
//! [`named_call_schema`]) and reads the calls back from the JSON
//! ([`parse_required_calls`], [`ConstrainedCallStream`]).
//!
//! ```
//! use pagoda_tool_calls::{ToolCall, ToolParserKind};
//! let text = "Checking.<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
//! let found = ToolParserKind::Hermes.extract(text);
//! assert_eq!(found.content.as_deref(), Some("Checking."));
//! assert_eq!(found.calls, [ToolCall { name: "weather".into(), arguments: r#"{"city":"Oslo"}"#.into() }]);
//! ```
//!
//! The start tags (`[TOOL_CALLS]`, `<|python_tag|>`, for some models
//! `<tool_call>`) are special tokens: while tools are in use the server must
//! decode the output with special tokens kept, as vLLM's tool parsers set
//! `skip_special_tokens = false`.
//!
//! Streaming and non-streaming parsing are one state machine fed a character
//! at a time, so a stream's content and calls are the same however the text
//! was cut into deltas, and the same as `extract` finds for output that
//! holds well-formed calls. Where text that began a call is not one, `extract`
//! keeps the whole output as content with no calls (as vLLM does), while a
//! stream, which cannot take back what it sent, passes the rest on as content.

mod call_object;
mod scanner;
mod stream;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use stream::Format;

pub use stream::StreamingToolParser;

/// A function the client offers (OpenAI `tools[i].function`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// One parsed call. `arguments` is a JSON text (OpenAI sends arguments as a
/// string): the compact serialization of the arguments object.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// What a complete model output held.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ExtractedToolCalls {
    /// Text outside the calls (`None` when there is none).
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

/// One step of a streamed output.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamDelta {
    Content(String),
    /// OpenAI chunk semantics: the first delta of a call carries `index` and
    /// `name` (the server adds an `id` and `type: "function"`), later ones
    /// carry argument fragments; concatenating all `arguments` fragments of
    /// one index gives the complete JSON arguments.
    ToolCallStart {
        index: usize,
        name: String,
    },
    ToolCallArguments {
        index: usize,
        fragment: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ToolCallError(pub String);

/// The tool-call formats, by vLLM's `--tool-call-parser` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolParserKind {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, possibly
    /// several, after content (Hermes, Qwen, SmolLM). Text after the first
    /// call is dropped, as vLLM does.
    Hermes,
    /// The output is `{"name": ..., "parameters": {...}}` (or `"arguments"`),
    /// possibly after `<|python_tag|>`, several separated by `;`.
    Llama3Json,
    /// `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}`, or the
    /// newer `[TOOL_CALLS]name{...}` (also `name[ARGS]{...}`), after content.
    Mistral,
}

impl ToolParserKind {
    const NAMES: [(&'static str, ToolParserKind); 3] = [
        ("hermes", ToolParserKind::Hermes),
        ("llama3_json", ToolParserKind::Llama3Json),
        ("mistral", ToolParserKind::Mistral),
    ];

    pub fn from_name(name: &str) -> Option<Self> {
        Self::NAMES.iter().find(|(known, _)| *known == name).map(|(_, kind)| *kind)
    }

    pub fn names() -> &'static [&'static str] {
        &["hermes", "llama3_json", "mistral"]
    }

    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, kind)| *kind == self).map(|(name, _)| *name).unwrap_or_default()
    }

    /// The calls in a finished output; text that is not a valid call stays content.
    pub fn extract(self, text: &str) -> ExtractedToolCalls {
        stream::extract_all(self.format(), text)
    }

    pub fn streaming(self) -> StreamingToolParser {
        StreamingToolParser::new(self.format())
    }

    fn format(self) -> Format {
        match self {
            ToolParserKind::Hermes => Format::Hermes,
            ToolParserKind::Llama3Json => Format::Llama3Json,
            ToolParserKind::Mistral => Format::Mistral,
        }
    }
}

/// Checks a request's tools: names as OpenAI requires them
/// (`[a-zA-Z0-9_-]{1,64}`) and unique, parameters (when present) an object
/// schema, and no two functions defining one `$defs` entry differently
/// (they share the root of the "required" schema).
pub fn validate_functions(functions: &[FunctionDef]) -> Result<(), ToolCallError> {
    let mut names = HashSet::new();
    let mut defs = Map::new();
    for (i, function) in functions.iter().enumerate() {
        let name = &function.name;
        let entry = format!("tools[{i}].function");
        let name_ok = (1..=64).contains(&name.len())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return Err(ToolCallError(format!(
                "{entry}.name {name:?} must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -"
            )));
        }
        if !names.insert(name.as_str()) {
            return Err(ToolCallError(format!("{entry}.name {name:?} is given twice")));
        }
        let Some(parameters) = &function.parameters else { continue };
        let Some(schema) = parameters.as_object() else {
            return Err(ToolCallError(format!(
                "{entry}.parameters of {name:?} must be a JSON schema object"
            )));
        };
        if schema.get("type").is_some_and(|t| t != "object") {
            return Err(ToolCallError(format!(
                "{entry}.parameters of {name:?} must describe an object (\"type\": \"object\")"
            )));
        }
        if let Some(own_defs) = schema.get("$defs").and_then(Value::as_object) {
            for (def_name, def) in own_defs {
                if defs.get(def_name).is_some_and(|seen| seen != def) {
                    return Err(ToolCallError(format!(
                        "{entry}.parameters of {name:?}: $defs entry {def_name:?} differs from another tool's"
                    )));
                }
                defs.insert(def_name.clone(), def.clone());
            }
        }
    }
    Ok(())
}

fn parameters_or_empty(function: &FunctionDef) -> Value {
    function.parameters.clone().unwrap_or_else(|| json!({"type": "object"}))
}

/// For tool_choice "required": the schema of a non-empty JSON array of
/// `{"name": <a function's name>, "parameters": <its arguments>}`, as vLLM
/// builds it. Each function's `$defs` are also copied to the root so that
/// `#/$defs/...` references still resolve (the first wins a clash, which
/// [`validate_functions`] refuses).
pub fn required_calls_schema(functions: &[FunctionDef]) -> Value {
    let variants: Vec<Value> = functions
        .iter()
        .map(|function| {
            json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "const": function.name},
                    "parameters": parameters_or_empty(function),
                },
                "required": ["name", "parameters"],
            })
        })
        .collect();
    let mut schema = json!({
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": variants},
    });
    let mut defs = Map::new();
    for function in functions {
        let own_defs = function.parameters.as_ref().and_then(|p| p.get("$defs")).and_then(Value::as_object);
        for (name, def) in own_defs.into_iter().flatten() {
            defs.entry(name.clone()).or_insert_with(|| def.clone());
        }
    }
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    schema
}

/// Reads back output constrained by [`required_calls_schema`]; arguments
/// come back as compact JSON.
pub fn parse_required_calls(text: &str) -> Result<Vec<ToolCall>, ToolCallError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ToolCallError(format!("tool calls are not valid JSON: {e}")))?;
    let Some(items) = value.as_array().filter(|items| !items.is_empty()) else {
        return Err(ToolCallError("tool calls must be a non-empty JSON array".into()));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            call_object::call_from_object(item, &["parameters"]).ok_or_else(|| {
                ToolCallError(format!(
                    "tool call {i} must be an object with a \"name\" string and \"parameters\" object"
                ))
            })
        })
        .collect()
}

/// Reads back output constrained by [`required_calls_schema`] that was cut
/// short (by max_tokens): the calls as far as they were written, as
/// [`ConstrainedCallStream`] gives them to a streaming client, the last one's
/// arguments possibly cut short. Empty if no call had begun.
pub fn required_calls_so_far(text: &str) -> Vec<ToolCall> {
    let mut stream = ConstrainedCallStream::required();
    let mut deltas = stream.push(text);
    deltas.extend(stream.finish());
    let mut calls: Vec<ToolCall> = Vec::new();
    for delta in deltas {
        match delta {
            StreamDelta::ToolCallStart { index, name } if index == calls.len() => {
                calls.push(ToolCall { name, arguments: String::new() });
            }
            StreamDelta::ToolCallArguments { index, fragment } => {
                if let Some(call) = calls.get_mut(index) {
                    call.arguments.push_str(&fragment);
                }
            }
            _ => {}
        }
    }
    calls
}

/// For a named tool_choice: the function's parameter schema
/// (`{"type": "object"}` when it has none); the constrained output is the
/// arguments themselves.
pub fn named_call_schema(function: &FunctionDef) -> Value {
    parameters_or_empty(function)
}

/// Streams tool-call deltas out of constrained output as its JSON arrives:
/// the array of [`required_calls_schema`] or the arguments object of
/// [`named_call_schema`]. Output that breaks the schema ends the calls; the
/// rest is ignored.
pub struct ConstrainedCallStream(StreamingToolParser);

impl ConstrainedCallStream {
    pub fn required() -> Self {
        ConstrainedCallStream(StreamingToolParser::new(Format::RequiredArray))
    }

    pub fn named(name: &str) -> Self {
        ConstrainedCallStream(StreamingToolParser::new(Format::NamedArguments(name.to_string())))
    }

    pub fn push(&mut self, delta_text: &str) -> Vec<StreamDelta> {
        self.0.push(delta_text)
    }

    pub fn finish(&mut self) -> Vec<StreamDelta> {
        self.0.finish()
    }

    /// Whether a call has begun.
    pub fn saw_tool_call(&self) -> bool {
        self.0.saw_tool_call()
    }
}
