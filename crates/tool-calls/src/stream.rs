//! The streaming parsers. Every format is one state machine fed a character at
//! a time, so the result cannot depend on how the text was cut into deltas;
//! the non-streaming `extract` runs the same machine over the whole text.

use crate::call_object::{CallObjectParser, CallProgress, CallShape, Deltas};
use crate::scanner::is_json_whitespace;
use crate::{ExtractedToolCalls, StreamDelta, ToolCall};

const HERMES_START: &str = "<tool_call>";
const HERMES_END: &str = "</tool_call>";
const LLAMA_PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_TOOL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";

// Some fine-tunes write "parameters" where their format says "arguments".
const HERMES_SHAPE: CallShape = CallShape::Envelope { argument_keys: &["arguments", "parameters"] };
const LLAMA_SHAPE: CallShape = CallShape::Envelope { argument_keys: &["parameters", "arguments"] };
const MISTRAL_SHAPE: CallShape = CallShape::Envelope { argument_keys: &["arguments", "parameters"] };
const REQUIRED_SHAPE: CallShape = CallShape::Envelope { argument_keys: &["parameters"] };

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Hermes,
    Llama3Json,
    Mistral,
    /// tool_choice "required": a JSON array of `{"name", "parameters"}`.
    RequiredArray,
    /// A named tool_choice: the output is that function's arguments object.
    NamedArguments(String),
}

/// What follows a call object, by format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterCall {
    HermesEndTag,
    LlamaSeparator,
    ArrayElement,
    MistralNextTag,
    Nothing,
}

enum State {
    /// Text outside calls, watching for the format's start tag; `held` is a
    /// suffix that may be the beginning of the tag.
    Text,
    /// Llama: output so far is whitespace and maybe part of `<|python_tag|>`.
    LlamaStart,
    /// Whitespace, then the `{` of a call object (shape and what follows).
    BeforeObject(AfterCall),
    InCall(Box<CallObjectParser>, AfterCall),
    /// After a Hermes call: whitespace, then `</tool_call>` (matched in `held`).
    HermesEnd,
    /// After a Llama call: whitespace, then `;` or the end.
    LlamaSeparator,
    /// Mistral, after `[TOOL_CALLS]`: whitespace, then an array or a name.
    MistralAfterTag,
    /// Mistral's name-first form: the name so far.
    MistralName(String),
    /// Mistral's `name[ARGS]{...}`: part of `[ARGS]` in `held`.
    MistralArgsTag(String),
    /// Mistral's name-first form after a call: whitespace, then another `[TOOL_CALLS]` or the end.
    MistralNextTag,
    /// Whitespace, then `[` (constrained "required" output).
    ArrayOpen,
    /// After `[`: whitespace, then the first call object.
    ArrayFirst,
    /// After an element: `,` or `]`.
    ArrayAfterElement,
    /// The outer structure is complete: whitespace only.
    Done,
    /// No (more) calls can be read: everything else is content.
    Passthrough,
    /// Constrained output that broke its schema: the rest is ignored.
    Broken,
}

/// Incremental tool-call parser: fed the new piece of the decoded text each
/// step, it returns content and tool-call deltas (see [`StreamDelta`]).
pub struct StreamingToolParser {
    format: Format,
    state: State,
    /// Text not yet emitted nor consumed by a completed call; it becomes
    /// content if what it started turns out not to be a call.
    pending: String,
    /// The partial tag being matched (a suffix of `pending`, or content held back).
    held: String,
    next_index: usize,
    failed: bool,
    finished: bool,
}

impl StreamingToolParser {
    pub(crate) fn new(format: Format) -> Self {
        let state = match &format {
            Format::Hermes | Format::Mistral => State::Text,
            Format::Llama3Json => State::LlamaStart,
            Format::RequiredArray => State::ArrayOpen,
            Format::NamedArguments(_) => State::BeforeObject(AfterCall::Nothing),
        };
        StreamingToolParser {
            format,
            state,
            pending: String::new(),
            held: String::new(),
            next_index: 0,
            failed: false,
            finished: false,
        }
    }

    /// Feeds the newly decoded text.
    pub fn push(&mut self, delta_text: &str) -> Vec<StreamDelta> {
        let mut out = Deltas::default();
        if !self.finished {
            for c in delta_text.chars() {
                self.step(c, &mut out);
            }
        }
        out.0
    }

    /// End of output: flushes held-back text; text that began a call but
    /// did not complete one becomes content.
    pub fn finish(&mut self) -> Vec<StreamDelta> {
        let mut out = Deltas::default();
        if self.finished {
            return out.0;
        }
        self.finished = true;
        match &self.state {
            State::Text => {
                if self.next_index == 0 {
                    out.content(&self.held);
                }
            }
            State::LlamaStart => out.content(&self.pending),
            // A closing tag, a `;` or another `[TOOL_CALLS]` may be cut off by the end.
            State::HermesEnd | State::LlamaSeparator | State::MistralNextTag | State::Done => {}
            State::BeforeObject(AfterCall::LlamaSeparator)
                if self.next_index > 0 && self.pending.trim_matches(is_json_whitespace) == ";" => {}
            State::Passthrough | State::Broken => {}
            _ => self.fail(&mut out),
        }
        self.state = State::Done;
        self.held.clear();
        self.pending.clear();
        out.0
    }

    /// Whether a tool call has begun in the output.
    pub fn saw_tool_call(&self) -> bool {
        self.next_index > 0 || matches!(&self.state, State::InCall(parser, _) if parser.started())
    }

    /// Whether some text that began a call turned out not to be one.
    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    fn fail(&mut self, out: &mut Deltas) {
        self.failed = true;
        if let State::InCall(parser, _) = &self.state {
            if parser.started() {
                self.next_index += 1;
            }
        }
        if matches!(self.format, Format::RequiredArray | Format::NamedArguments(_)) {
            self.state = State::Broken;
        } else {
            out.content(&self.pending);
            self.state = State::Passthrough;
        }
        self.pending.clear();
        self.held.clear();
    }

    fn step(&mut self, c: char, out: &mut Deltas) {
        match &mut self.state {
            State::Passthrough => return out.content(c.encode_utf8(&mut [0; 4])),
            State::Broken => return,
            State::Text => return self.step_text(c, out),
            _ => {}
        }
        self.pending.push(c);
        let whitespace = is_json_whitespace(c);
        match &mut self.state {
            State::LlamaStart => {
                if self.held.is_empty() && whitespace {
                    return;
                }
                if self.held.is_empty() && c == '{' {
                    return self.begin_call(LLAMA_SHAPE, AfterCall::LlamaSeparator, out);
                }
                match match_tag(&mut self.held, c, LLAMA_PYTHON_TAG) {
                    TagMatch::Partial => {}
                    TagMatch::Complete => {
                        self.held.clear();
                        self.state = State::BeforeObject(AfterCall::LlamaSeparator);
                    }
                    // Not a call: the output is plain content.
                    TagMatch::Mismatch => {
                        out.content(&self.pending);
                        self.pending.clear();
                        self.held.clear();
                        self.state = State::Passthrough;
                    }
                }
            }
            State::BeforeObject(after) => {
                let after = *after;
                if whitespace {
                } else if c == '{' {
                    let shape = match &self.format {
                        Format::NamedArguments(name) => CallShape::BareArguments { name: name.clone() },
                        Format::Hermes => HERMES_SHAPE,
                        Format::Llama3Json => LLAMA_SHAPE,
                        Format::Mistral => MISTRAL_SHAPE,
                        Format::RequiredArray => REQUIRED_SHAPE,
                    };
                    self.begin_call(shape, after, out);
                } else {
                    self.fail(out);
                }
            }
            State::InCall(parser, after) => {
                let after = *after;
                match parser.push(c, out) {
                    CallProgress::Incomplete => {}
                    CallProgress::Invalid => self.fail(out),
                    CallProgress::Complete => {
                        self.next_index += 1;
                        self.pending.clear();
                        self.state = match after {
                            AfterCall::HermesEndTag => State::HermesEnd,
                            AfterCall::LlamaSeparator => State::LlamaSeparator,
                            AfterCall::ArrayElement => State::ArrayAfterElement,
                            AfterCall::MistralNextTag => State::MistralNextTag,
                            AfterCall::Nothing => State::Done,
                        };
                    }
                }
            }
            State::HermesEnd => {
                if self.held.is_empty() && whitespace {
                    return;
                }
                match match_tag(&mut self.held, c, HERMES_END) {
                    TagMatch::Partial => {}
                    TagMatch::Complete => {
                        self.held.clear();
                        self.pending.clear();
                        self.state = State::Text;
                    }
                    TagMatch::Mismatch => self.fail(out),
                }
            }
            State::LlamaSeparator => {
                if c == ';' {
                    self.state = State::BeforeObject(AfterCall::LlamaSeparator);
                } else if !whitespace {
                    self.fail(out);
                }
            }
            State::MistralAfterTag => {
                if whitespace {
                } else if c == '[' {
                    self.state = State::ArrayFirst;
                } else if is_name_char(c) {
                    self.state = State::MistralName(c.to_string());
                } else {
                    self.fail(out);
                }
            }
            State::MistralName(name) => {
                if is_name_char(c) {
                    name.push(c);
                } else if c == '{' {
                    let name = std::mem::take(name);
                    self.begin_call(CallShape::BareArguments { name }, AfterCall::MistralNextTag, out);
                } else if c == '[' {
                    let name = std::mem::take(name);
                    self.held.push(c);
                    self.state = State::MistralArgsTag(name);
                } else {
                    self.fail(out);
                }
            }
            State::MistralArgsTag(name) => {
                if self.held == MISTRAL_ARGS {
                    if whitespace {
                    } else if c == '{' {
                        let name = std::mem::take(name);
                        self.held.clear();
                        self.begin_call(CallShape::BareArguments { name }, AfterCall::MistralNextTag, out);
                    } else {
                        self.fail(out);
                    }
                } else if match_tag(&mut self.held, c, MISTRAL_ARGS) == TagMatch::Mismatch {
                    self.fail(out);
                }
            }
            State::MistralNextTag => {
                if self.held.is_empty() && whitespace {
                    return;
                }
                match match_tag(&mut self.held, c, MISTRAL_TOOL_CALLS) {
                    TagMatch::Partial => {}
                    TagMatch::Complete => {
                        self.held.clear();
                        self.state = State::MistralAfterTag;
                    }
                    TagMatch::Mismatch => self.fail(out),
                }
            }
            State::ArrayOpen => {
                if c == '[' {
                    self.state = State::ArrayFirst;
                } else if !whitespace {
                    self.fail(out);
                }
            }
            State::ArrayFirst => {
                if c == '{' {
                    let shape = if self.format == Format::Mistral { MISTRAL_SHAPE } else { REQUIRED_SHAPE };
                    self.begin_call(shape, AfterCall::ArrayElement, out);
                } else if !whitespace {
                    self.fail(out);
                }
            }
            State::ArrayAfterElement => {
                if c == ',' {
                    self.state = State::BeforeObject(AfterCall::ArrayElement);
                } else if c == ']' {
                    self.state = State::Done;
                } else if !whitespace {
                    self.fail(out);
                }
            }
            State::Done => {
                if !whitespace {
                    self.fail(out);
                }
            }
            State::Text | State::Passthrough | State::Broken => unreachable!(),
        }
    }

    fn begin_call(&mut self, shape: CallShape, after: AfterCall, out: &mut Deltas) {
        let mut parser = Box::new(CallObjectParser::new(shape, self.next_index));
        let progress = parser.push('{', out);
        debug_assert_eq!(progress, CallProgress::Incomplete);
        self.state = State::InCall(parser, after);
    }

    /// Outside calls: content, except a start tag (and what may begin one).
    fn step_text(&mut self, c: char, out: &mut Deltas) {
        let tag = match self.format {
            Format::Hermes => HERMES_START,
            _ => MISTRAL_TOOL_CALLS,
        };
        self.held.push(c);
        if self.held == tag {
            self.held.clear();
            self.pending = tag.to_string();
            self.state = match self.format {
                Format::Hermes => State::BeforeObject(AfterCall::HermesEndTag),
                _ => State::MistralAfterTag,
            };
            return;
        }
        // Let go of the characters that can no longer begin the tag.
        let mut keep_from = 0;
        while !tag.starts_with(&self.held[keep_from..]) {
            keep_from += self.held[keep_from..].chars().next().map_or(0, char::len_utf8);
        }
        // Text between and after calls is dropped, as vLLM does.
        if self.next_index == 0 {
            out.content(&self.held[..keep_from]);
        }
        self.held.drain(..keep_from);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TagMatch {
    Partial,
    Complete,
    Mismatch,
}

/// Extends `held` (a prefix of `tag`) by `c`.
fn match_tag(held: &mut String, c: char, tag: &str) -> TagMatch {
    held.push(c);
    if held == tag {
        TagMatch::Complete
    } else if tag.starts_with(held.as_str()) {
        TagMatch::Partial
    } else {
        TagMatch::Mismatch
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// Runs a parser over a complete output. Anything that began a call and is
/// not one makes the whole output content, with no calls (as vLLM does).
pub(crate) fn extract_all(format: Format, text: &str) -> ExtractedToolCalls {
    let mut parser = StreamingToolParser::new(format);
    let mut deltas = parser.push(text);
    deltas.extend(parser.finish());
    let all_content =
        || ExtractedToolCalls { content: (!text.is_empty()).then(|| text.to_string()), calls: Vec::new() };
    if parser.failed() {
        return all_content();
    }
    let mut content = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    for delta in deltas {
        match delta {
            StreamDelta::Content(text) => content.push_str(&text),
            StreamDelta::ToolCallStart { name, .. } => {
                calls.push(ToolCall { name, arguments: String::new() })
            }
            StreamDelta::ToolCallArguments { index, fragment } => calls[index].arguments.push_str(&fragment),
        }
    }
    for call in &mut calls {
        match serde_json::from_str::<serde_json::Value>(&call.arguments) {
            Ok(value) => call.arguments = value.to_string(),
            Err(_) => return all_content(),
        }
    }
    ExtractedToolCalls { content: (!content.is_empty()).then_some(content), calls }
}
