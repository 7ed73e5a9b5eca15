//! Tool calling on /v1/chat/completions: what a request's `tools`,
//! `tool_choice` and `parallel_tool_calls` ask for ([`ToolMode`]), the
//! grammar that makes `required` and named calls always parse, and the
//! turning of model output into OpenAI's `tool_calls`, whole or streamed.
//!
//! - `none`: the template is shown the tools; the output is text.
//! - `auto` (the default when `tools` are given): needs the server's
//!   `--enable-auto-tool-choice` and `--tool-call-parser`, as vLLM does; the
//!   model writes calls in its own format and the parser finds them.
//! - `required`: the output is constrained to a JSON array of
//!   `{"name", "parameters"}` over the given functions (one at most without
//!   `parallel_tool_calls`), so the calls always parse and their arguments
//!   follow each function's schema.
//! - a named function: the output is constrained to its parameter schema
//!   and becomes that function's arguments.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use pagoda_structured::GrammarSpec;
use pagoda_tool_calls::{
    named_call_schema, parse_required_calls, required_calls_schema, required_calls_so_far,
    ConstrainedCallStream, FunctionDef, StreamDelta, StreamingToolParser, ToolCall, ToolParserKind,
};
use serde_json::Value;

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::protocol::{
    FunctionCallDelta, FunctionCallOut, ToolCallDelta, ToolCallOut, ToolChoice, ToolDefinition,
};
use crate::structured::RequestedGrammar;

/// How a chat request uses its tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolMode {
    /// No tool calls: no tools, or `tool_choice` "none".
    Off,
    /// The model may call tools; `parser` finds the calls in its output.
    Auto { parser: ToolParserKind, parallel: bool },
    /// The model must call at least one tool (one only unless `parallel`).
    Required { parallel: bool },
    /// The model calls this function.
    Named(String),
}

/// The tool mode of a request. `tools` and `tool_choice` were checked
/// (names defined once, a named choice among them).
pub fn tool_mode(
    config: &ServerConfig,
    tools: Option<&[ToolDefinition]>,
    tool_choice: Option<&ToolChoice>,
    parallel_tool_calls: Option<bool>,
) -> Result<ToolMode, ApiError> {
    let has_tools = tools.is_some_and(|t| !t.is_empty());
    let parallel = parallel_tool_calls.unwrap_or(true);
    // OpenAI and vLLM: `tools` without `tool_choice` mean "auto".
    let choice = tool_choice.unwrap_or(if has_tools { &ToolChoice::Auto } else { &ToolChoice::None });
    Ok(match choice {
        ToolChoice::None => ToolMode::Off,
        ToolChoice::Auto if !has_tools => ToolMode::Off,
        ToolChoice::Auto => match (config.enable_auto_tool_choice, config.tool_call_parser) {
            (true, Some(parser)) => ToolMode::Auto { parser, parallel },
            _ => {
                let default_note =
                    if tool_choice.is_none() { " (`tools` without `tool_choice` mean \"auto\")" } else { "" };
                return Err(ApiError::bad_request(
                    Some("tool_choice"),
                    format!(
                        "\"auto\" tool choice{default_note} requires the server to run with \
                         --enable-auto-tool-choice and --tool-call-parser; \"required\", a named function \
                         and \"none\" work without them"
                    ),
                ));
            }
        },
        ToolChoice::Required => ToolMode::Required { parallel },
        ToolChoice::Function(name) => ToolMode::Named(name.clone()),
    })
}

/// The request's functions as the tool-call crate takes them.
pub fn functions(tools: Option<&[ToolDefinition]>) -> Vec<FunctionDef> {
    tools
        .unwrap_or_default()
        .iter()
        .map(|t| FunctionDef {
            name: t.function.name.clone(),
            description: t.function.description.clone(),
            parameters: t.function.parameters.clone().map(Value::Object),
            strict: t.function.strict,
        })
        .collect()
}

impl ToolMode {
    /// The grammar a `required` or named choice puts on the output.
    pub fn grammar(&self, functions: &[FunctionDef]) -> Option<RequestedGrammar> {
        let schema = match self {
            ToolMode::Required { parallel } => {
                let mut schema = required_calls_schema(functions);
                if !parallel {
                    if let Some(object) = schema.as_object_mut() {
                        object.insert("maxItems".into(), Value::from(1));
                    }
                }
                schema
            }
            ToolMode::Named(name) => named_call_schema(functions.iter().find(|f| &f.name == name)?),
            ToolMode::Off | ToolMode::Auto { .. } => return None,
        };
        Some(RequestedGrammar { spec: GrammarSpec::JsonSchema(schema), field: "tool_choice" })
    }

    /// A finished choice's message: its content and tool calls, and the
    /// `finish_reason` (`tool_calls` where the model called tools and stopped
    /// on its own, as vLLM reports it; OpenAI's `stop` for a named function).
    pub fn finish_message(
        &self,
        text: String,
        finish_reason: Option<&'static str>,
    ) -> (Option<String>, Vec<ToolCallOut>, Option<&'static str>) {
        let stopped = finish_reason == Some("stop");
        match self {
            ToolMode::Off => (Some(text), Vec::new(), finish_reason),
            ToolMode::Auto { parser, parallel } => {
                let mut extracted = parser.extract(&text);
                if extracted.calls.is_empty() {
                    return (Some(text), Vec::new(), finish_reason);
                }
                if !parallel {
                    extracted.calls.truncate(1);
                }
                let content = extracted.content.filter(|c| !c.trim().is_empty());
                let reason = if stopped { Some("tool_calls") } else { finish_reason };
                (content, extracted.calls.into_iter().map(call_out).collect(), reason)
            }
            ToolMode::Required { .. } => match parse_required_calls(&text) {
                Ok(calls) if !calls.is_empty() => {
                    let reason = if stopped { Some("tool_calls") } else { finish_reason };
                    (None, calls.into_iter().map(call_out).collect(), reason)
                }
                // Cut off by max_tokens: the calls as far as they were
                // written, as a streaming client assembles them (the last
                // one's arguments may be cut short, as a named call's are).
                _ => match required_calls_so_far(&text) {
                    calls if calls.is_empty() => (Some(text), Vec::new(), finish_reason),
                    calls => (None, calls.into_iter().map(call_out).collect(), finish_reason),
                },
            },
            ToolMode::Named(name) => {
                // Compact, as the other modes write arguments; raw if cut short.
                let arguments = serde_json::from_str::<Value>(&text).map(|v| v.to_string()).unwrap_or(text);
                (None, vec![call_out(ToolCall { name: name.clone(), arguments })], finish_reason)
            }
        }
    }

    /// The incremental parser of one streamed choice (`None` when off).
    pub fn stream(&self) -> Option<ToolStream> {
        let (inner, parallel, named) = match self {
            ToolMode::Off => return None,
            ToolMode::Auto { parser, parallel } => (Inner::Parsed(parser.streaming()), *parallel, false),
            ToolMode::Required { parallel } => {
                (Inner::Constrained(ConstrainedCallStream::required()), *parallel, false)
            }
            ToolMode::Named(name) => (Inner::Constrained(ConstrainedCallStream::named(name)), true, true),
        };
        Some(ToolStream { inner, ids: Vec::new(), parallel, named })
    }
}

/// A fresh tool-call id, `chatcmpl-tool-` and 24 hex digits (vLLM's prefix).
pub fn tool_call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SALT: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let hash = SALT.get_or_init(RandomState::new).hash_one(n);
    format!("chatcmpl-tool-{hash:016x}{:08x}", n as u32)
}

fn call_out(call: ToolCall) -> ToolCallOut {
    ToolCallOut {
        id: tool_call_id(),
        kind: "function",
        function: FunctionCallOut { name: call.name, arguments: call.arguments },
    }
}

enum Inner {
    Parsed(StreamingToolParser),
    Constrained(ConstrainedCallStream),
}

/// One streamed choice's tool-call parsing.
pub struct ToolStream {
    inner: Inner,
    /// The id given to each call index so far.
    ids: Vec<String>,
    parallel: bool,
    named: bool,
}

/// What one piece of streamed output becomes.
#[derive(Debug, Default, PartialEq)]
pub struct StreamPiece {
    pub content: String,
    pub tool_calls: Vec<ToolCallDelta>,
}

impl ToolStream {
    /// Feeds the next piece of text.
    pub fn push(&mut self, text: &str) -> StreamPiece {
        let deltas = match &mut self.inner {
            Inner::Parsed(p) => p.push(text),
            Inner::Constrained(c) => c.push(text),
        };
        self.convert(deltas)
    }

    /// The end of the output: what the parser held back.
    pub fn finish(&mut self) -> StreamPiece {
        let deltas = match &mut self.inner {
            Inner::Parsed(p) => p.finish(),
            Inner::Constrained(c) => c.finish(),
        };
        self.convert(deltas)
    }

    /// The `finish_reason` to report: `tool_calls` once a call was streamed
    /// and the model stopped on its own (not for a named function: OpenAI's `stop`).
    pub fn finish_reason(&self, reason: Option<&'static str>) -> Option<&'static str> {
        if reason == Some("stop") && !self.ids.is_empty() && !self.named {
            Some("tool_calls")
        } else {
            reason
        }
    }

    fn convert(&mut self, deltas: Vec<StreamDelta>) -> StreamPiece {
        let mut piece = StreamPiece::default();
        for delta in deltas {
            match delta {
                StreamDelta::Content(text) => piece.content.push_str(&text),
                StreamDelta::ToolCallStart { index, name } => {
                    if !self.parallel && index > 0 {
                        continue;
                    }
                    let id = tool_call_id();
                    if self.ids.len() <= index {
                        self.ids.resize(index + 1, String::new());
                    }
                    self.ids[index] = id.clone();
                    piece.tool_calls.push(ToolCallDelta {
                        index,
                        id: Some(id),
                        kind: Some("function"),
                        function: FunctionCallDelta { name: Some(name), arguments: Some(String::new()) },
                    });
                }
                StreamDelta::ToolCallArguments { index, fragment } => {
                    if !self.parallel && index > 0 {
                        continue;
                    }
                    // Fragments of one call in a row merge into one delta.
                    if let Some(last) = piece.tool_calls.last_mut().filter(|d| d.index == index) {
                        last.function.arguments.get_or_insert_with(String::new).push_str(&fragment);
                        continue;
                    }
                    piece.tool_calls.push(ToolCallDelta {
                        index,
                        id: None,
                        kind: None,
                        function: FunctionCallDelta { name: None, arguments: Some(fragment) },
                    });
                }
            }
        }
        piece
    }
}

/// An assistant message's `tool_calls` as chat templates expect them:
/// `function.arguments` parsed from its JSON text into an object (vLLM does
/// the same; templates such as Hermes' iterate over the arguments).
pub fn template_tool_calls(calls: &mut Value) {
    let Some(calls) = calls.as_array_mut() else { return };
    for call in calls {
        let Some(function) = call.get_mut("function").and_then(Value::as_object_mut) else { continue };
        let parsed =
            function.get("arguments").and_then(Value::as_str).and_then(|a| serde_json::from_str(a).ok());
        if let Some(arguments @ Value::Object(_)) = parsed {
            function.insert("arguments".into(), arguments);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerArgs;
    use crate::protocol::{FunctionDefinition, ToolKind};
    use serde_json::json;

    fn tool(name: &str) -> ToolDefinition {
        ToolDefinition {
            kind: ToolKind::Function,
            function: FunctionDefinition {
                name: name.into(),
                description: None,
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
                    .as_object()
                    .cloned(),
                strict: None,
            },
        }
    }

    fn config(auto: bool) -> ServerConfig {
        let args = ServerArgs {
            enable_auto_tool_choice: auto,
            tool_call_parser: auto.then_some(ToolParserKind::Hermes),
            ..ServerArgs::default()
        };
        args.to_config("m", "0", "x")
    }

    #[test]
    fn modes_follow_tool_choice_and_the_server_flags() {
        let tools = [tool("get_weather")];
        let mode =
            |auto, choice: Option<ToolChoice>| tool_mode(&config(auto), Some(&tools), choice.as_ref(), None);
        assert_eq!(mode(false, Some(ToolChoice::None)).unwrap(), ToolMode::Off);
        assert_eq!(mode(false, Some(ToolChoice::Required)).unwrap(), ToolMode::Required { parallel: true });
        assert_eq!(
            mode(false, Some(ToolChoice::Function("get_weather".into()))).unwrap(),
            ToolMode::Named("get_weather".into())
        );
        assert_eq!(mode(false, None).unwrap_err().param.as_deref(), Some("tool_choice"));
        assert_eq!(mode(false, Some(ToolChoice::Auto)).unwrap_err().param.as_deref(), Some("tool_choice"));
        assert_eq!(
            mode(true, None).unwrap(),
            ToolMode::Auto { parser: ToolParserKind::Hermes, parallel: true }
        );
        assert_eq!(tool_mode(&config(false), None, None, None).unwrap(), ToolMode::Off);
        let single =
            tool_mode(&config(false), Some(&tools), Some(&ToolChoice::Required), Some(false)).unwrap();
        let grammar = single.grammar(&functions(Some(&tools))).expect("a grammar");
        let GrammarSpec::JsonSchema(schema) = grammar.spec else { panic!("a JSON schema") };
        assert_eq!(schema["maxItems"], 1);
    }

    #[test]
    fn finished_output_becomes_tool_calls() {
        let auto = ToolMode::Auto { parser: ToolParserKind::Hermes, parallel: true };
        let text = "Let me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, calls, reason) = auto.finish_message(text.into(), Some("stop"));
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[0].function.arguments).unwrap(),
            json!({"city": "Paris"})
        );
        assert_eq!(reason, Some("tool_calls"));
        let (content, calls, reason) = auto.finish_message("plain".into(), Some("stop"));
        assert_eq!((content.as_deref(), calls.len(), reason), (Some("plain"), 0, Some("stop")));

        let required = ToolMode::Required { parallel: true };
        let (content, calls, reason) = required.finish_message(
            r#"[{"name": "get_weather", "parameters": {"city": "Oslo"}}]"#.into(),
            Some("stop"),
        );
        assert_eq!((content, calls.len(), reason), (None, 1, Some("tool_calls")));
        assert_eq!(calls[0].function.arguments, r#"{"city":"Oslo"}"#);
        // Cut off by max_tokens inside the second call: both calls, as the
        // stream gave them, the second's arguments cut short.
        let cut = r#"[{"name":"get_weather","parameters":{"city":"Oslo"}},{"name":"get_weather","parameters":{"city":"Ro"#;
        let (content, calls, reason) = required.finish_message(cut.into(), Some("length"));
        assert_eq!((content, calls.len(), reason), (None, 2, Some("length")));
        assert_eq!(calls[0].function.arguments, r#"{"city":"Oslo"}"#);
        assert!(
            calls[1].function.arguments.starts_with(r#"{"city":"Ro"#),
            "{:?}",
            calls[1].function.arguments
        );
        // Cut off before any call began: the text.
        let (content, calls, _) = required.finish_message("[".into(), Some("length"));
        assert_eq!((content.as_deref(), calls.len()), (Some("["), 0));

        let named = ToolMode::Named("get_weather".into());
        let (content, calls, reason) = named.finish_message(r#"{ "city": "Rome" }"#.into(), Some("stop"));
        assert_eq!((content, reason), (None, Some("stop")));
        assert_eq!(calls[0].function.arguments, r#"{"city":"Rome"}"#);
    }

    #[test]
    fn streamed_calls_carry_an_id_and_name_first_then_arguments() {
        let mut stream = ToolMode::Named("get_weather".into()).stream().expect("on");
        let mut pieces = Vec::new();
        for chunk in ["{\"ci", "ty\": \"Pa", "ris\"}"] {
            pieces.push(stream.push(chunk));
        }
        pieces.push(stream.finish());
        let deltas: Vec<&ToolCallDelta> = pieces.iter().flat_map(|p| &p.tool_calls).collect();
        assert!(deltas[0].id.is_some());
        assert_eq!(deltas[0].function.name.as_deref(), Some("get_weather"));
        let arguments: String = deltas.iter().filter_map(|d| d.function.arguments.as_deref()).collect();
        assert_eq!(serde_json::from_str::<Value>(&arguments).unwrap(), json!({"city": "Paris"}));
        assert!(deltas[1..].iter().all(|d| d.id.is_none() && d.function.name.is_none()));
        assert_eq!(stream.finish_reason(Some("stop")), Some("stop"));
    }

    #[test]
    fn template_arguments_become_objects() {
        let mut calls =
            json!([{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]);
        template_tool_calls(&mut calls);
        assert_eq!(calls[0]["function"]["arguments"], json!({"x": 1}));
    }
}
