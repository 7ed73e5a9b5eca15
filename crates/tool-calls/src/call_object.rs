//! One call's JSON object, parsed as it arrives: the shared piece of every
//! format's streaming parser.

use crate::scanner::{JsonScanner, ScanEvent};
use crate::{StreamDelta, ToolCall};
use serde_json::Value;

/// Collects deltas, merging neighbours of one kind so a push yields few of them.
#[derive(Default)]
pub(crate) struct Deltas(pub(crate) Vec<StreamDelta>);

impl Deltas {
    pub(crate) fn content(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if let Some(StreamDelta::Content(last)) = self.0.last_mut() {
            last.push_str(text);
        } else {
            self.0.push(StreamDelta::Content(text.to_string()));
        }
    }

    pub(crate) fn start(&mut self, index: usize, name: &str) {
        self.0.push(StreamDelta::ToolCallStart { index, name: name.to_string() });
    }

    pub(crate) fn arguments(&mut self, index: usize, text: &str) {
        if text.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some(StreamDelta::ToolCallArguments { index: last, fragment }) if *last == index => {
                fragment.push_str(text)
            }
            _ => self.0.push(StreamDelta::ToolCallArguments { index, fragment: text.to_string() }),
        }
    }
}

/// How the call's name and arguments sit in the object.
#[derive(Clone, Debug)]
pub(crate) enum CallShape {
    /// `{"name": ..., <one of these keys>: {...}}`.
    Envelope { argument_keys: &'static [&'static str] },
    /// The object is the arguments; the name came before it.
    BareArguments { name: String },
}

/// Turns a parsed call object into a call: `name` a non-empty string, the
/// arguments (first of `argument_keys` present) an object, a string holding
/// a JSON object (some models quote them), or absent/null meaning `{}`.
pub(crate) fn call_from_object(object: &Value, argument_keys: &[&str]) -> Option<ToolCall> {
    let object = object.as_object()?;
    let name = object.get("name")?.as_str()?;
    if name.is_empty() {
        return None;
    }
    let arguments = argument_keys.iter().find_map(|key| object.get(*key));
    let arguments = match arguments {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(Value::Object(_)) => arguments.cloned().unwrap(),
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(value @ Value::Object(_)) => value,
            _ => return None,
        },
        Some(_) => return None,
    };
    Some(ToolCall { name: name.to_string(), arguments: arguments.to_string() })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallProgress {
    Incomplete,
    Complete,
    Invalid,
}

/// Parses one call object, fed character by character from its `{`. Argument
/// text is passed on as it arrives once the name is known and the arguments
/// are an object; otherwise the call is emitted whole when its object closes.
pub(crate) struct CallObjectParser {
    shape: CallShape,
    index: usize,
    text: String,
    scanner: JsonScanner,
    events: Vec<ScanEvent>,
    member_key: Option<String>,
    member_start: usize,
    name: Option<String>,
    /// Byte range of the streamed arguments object; `end` once it closed.
    streamed_arguments: Option<(usize, Option<usize>)>,
    started: bool,
}

impl CallObjectParser {
    pub(crate) fn new(shape: CallShape, index: usize) -> Self {
        CallObjectParser {
            shape,
            index,
            text: String::new(),
            scanner: JsonScanner::new(),
            events: Vec::new(),
            member_key: None,
            member_start: 0,
            name: None,
            streamed_arguments: None,
            started: false,
        }
    }

    /// Whether a `ToolCallStart` went out for this call.
    pub(crate) fn started(&self) -> bool {
        self.started
    }

    pub(crate) fn push(&mut self, c: char, out: &mut Deltas) -> CallProgress {
        let pos = self.text.len();
        self.text.push(c);
        self.events.clear();
        if self.scanner.step(c, pos, &mut self.events).is_err() {
            return CallProgress::Invalid;
        }
        let events = std::mem::take(&mut self.events);
        for event in &events {
            self.on_event(*event, out);
        }
        self.events = events;
        if let Some((start, end)) = self.streamed_arguments {
            if pos >= start && end.is_none_or(|end| pos < end) {
                out.arguments(self.index, &self.text[pos..]);
            }
        }
        if self.scanner.is_done() {
            self.complete(out)
        } else {
            CallProgress::Incomplete
        }
    }

    fn on_event(&mut self, event: ScanEvent, out: &mut Deltas) {
        match (&self.shape, event) {
            (CallShape::BareArguments { name }, ScanEvent::ValueStart { depth: 0, pos })
                if self.text[pos..].starts_with('{') =>
            {
                out.start(self.index, name);
                self.started = true;
                self.streamed_arguments = Some((pos, None));
            }
            (CallShape::BareArguments { .. }, ScanEvent::ValueEnd { depth: 0, end }) => {
                if let Some((start, None)) = self.streamed_arguments {
                    self.streamed_arguments = Some((start, Some(end)));
                }
            }
            (CallShape::Envelope { .. }, ScanEvent::Key { depth: 1, start, end }) => {
                self.member_key = serde_json::from_str(&self.text[start..end]).ok();
            }
            (CallShape::Envelope { argument_keys }, ScanEvent::ValueStart { depth: 1, pos }) => {
                self.member_start = pos;
                let is_arguments = self.member_key.as_deref().is_some_and(|key| argument_keys.contains(&key));
                if is_arguments && !self.started && self.text[pos..].starts_with('{') && self.name.is_some() {
                    out.start(self.index, self.name.as_deref().unwrap_or_default());
                    self.started = true;
                    self.streamed_arguments = Some((pos, None));
                }
            }
            (CallShape::Envelope { .. }, ScanEvent::ValueEnd { depth: 1, end }) => {
                if self.member_key.as_deref() == Some("name") {
                    self.name = serde_json::from_str::<String>(&self.text[self.member_start..end])
                        .ok()
                        .filter(|name| !name.is_empty());
                }
                if let Some((start, None)) = self.streamed_arguments {
                    if start == self.member_start {
                        self.streamed_arguments = Some((start, Some(end)));
                    }
                }
                self.member_key = None;
            }
            _ => {}
        }
    }

    fn complete(&mut self, out: &mut Deltas) -> CallProgress {
        let Ok(object) = serde_json::from_str::<Value>(&self.text) else {
            return CallProgress::Invalid;
        };
        let call = match &self.shape {
            CallShape::Envelope { argument_keys } => call_from_object(&object, argument_keys),
            CallShape::BareArguments { name } => {
                object.is_object().then(|| ToolCall { name: name.clone(), arguments: object.to_string() })
            }
        };
        let Some(call) = call else {
            return CallProgress::Invalid;
        };
        if !self.started {
            out.start(self.index, &call.name);
            out.arguments(self.index, &call.arguments);
            self.started = true;
        }
        CallProgress::Complete
    }
}
