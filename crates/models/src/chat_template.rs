//! Chat templates: the Jinja programs Hugging Face models ship to turn a
//! conversation into prompt text, rendered with minijinja the way
//! transformers' `apply_chat_template` renders them with jinja2.
//!
//! What transformers sets up and we match: `trim_blocks` and `lstrip_blocks`,
//! loop controls, Python string/list/dict methods, `raise_exception(msg)`,
//! a `tojson` filter with Python's `json.dumps` output (no HTML escaping,
//! `ensure_ascii=False`), `strftime_now(format)` (UTC), and the special tokens
//! (`bos_token`, `eos_token`, ...) as variables.

use std::collections::BTreeMap;

use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::tokenizer::TokenizerConfig;

const TEMPLATE_NAME: &str = "chat";

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("special_tokens", &self.special_tokens).finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` become template variables.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ModelError::ChatTemplate(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ModelError::ChatTemplate(describe(&e)))?;
        let mut special_tokens = Vec::new();
        for (name, value) in [("bos_token", bos_token), ("eos_token", eos_token)] {
            if let Some(v) = value {
                special_tokens.push((name, v.to_string()));
            }
        }
        Ok(Self { env, special_tokens })
    }

    /// The template a tokenizer config carries, if any, with its special tokens.
    pub fn from_tokenizer_config(config: &TokenizerConfig) -> Result<Option<Self>> {
        let more = [("pad_token", &config.pad_token), ("unk_token", &config.unk_token)];
        match &config.chat_template {
            None => Ok(None),
            Some(source) => {
                let mut t = Self::new(source, config.bos_token.as_deref(), config.eos_token.as_deref())?;
                for (name, value) in more {
                    if let Some(v) = value {
                        t.special_tokens.push((name, v.clone()));
                    }
                }
                Ok(Some(t))
            }
        }
    }

    /// Another template compiled from `source`, with this one's special tokens
    /// (a request's own `chat_template` renders with the model's BOS and EOS).
    pub fn with_source(&self, source: &str) -> Result<Self> {
        let mut other = Self::new(source, None, None)?;
        other.special_tokens = self.special_tokens.clone();
        Ok(other)
    }

    /// Renders a conversation of plain `{role, content}` messages.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let messages = serde_json::to_value(messages).map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        self.render_json(&messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// Renders arbitrary JSON messages (tool calls, content parts...) with
    /// extra variables such as `tools` or `documents`.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let template =
            self.env.get_template(TEMPLATE_NAME).map_err(|e| ModelError::ChatTemplate(describe(&e)))?;
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (name, token) in &self.special_tokens {
            ctx.insert(name.to_string(), Value::from(token.as_str()));
        }
        for (k, v) in extra {
            ctx.insert(k.clone(), Value::from(Serde(v)));
        }
        ctx.insert("messages".into(), Value::from(Serde(messages)));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        template.render(Value::from(ctx)).map_err(|e| ModelError::ChatTemplate(describe(&e)))
    }
}

/// `rendered` cut right after the final message's content, so the model
/// continues that message instead of closing it (transformers'
/// `continue_final_message`): the last occurrence of the content, trimmed,
/// ends the prompt, keeping the content's leading and trailing spaces where
/// the template kept them.
pub fn cut_after_final_message(rendered: &str, final_content: &str) -> Result<String> {
    let trimmed = final_content.trim();
    if trimmed.is_empty() {
        return Err(ModelError::ChatTemplate(
            "continue_final_message needs a final message with content to continue".into(),
        ));
    }
    let at = rendered.rfind(trimmed).ok_or_else(|| {
        ModelError::ChatTemplate(
            "continue_final_message is set but the final message does not appear in the rendered chat \
             (the template may transform it)"
                .into(),
        )
    })?;
    let kept = final_content.trim_start();
    let end = if rendered[at..].starts_with(kept) { at + kept.len() } else { at + trimmed.len() };
    Ok(rendered[..end].to_string())
}

/// The error with its chain of causes, which carry the template's own message.
fn describe(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// `raise_exception(message)`: templates use it to reject a conversation.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `x | tojson(indent=None, sort_keys=False)` with Python's `json.dumps` layout.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?; // we always write UTF-8, as HF's default
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, sort_keys, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) -> std::result::Result<(), Error> {
    let (item_sep, newline) = match indent {
        None => (", ", None),
        Some(n) => (",", Some(n)),
    };
    let open = |out: &mut String, depth: usize| {
        if let Some(n) = newline {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = value.as_i64().filter(|_| value.is_integer()) {
                out.push_str(&i.to_string());
            } else {
                out.push_str(&python_float(f64::try_from(value.clone())?));
            }
        }
        ValueKind::String => {
            out.push_str(&serde_json::to_string(value.as_str().unwrap_or("")).unwrap_or_default())
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                open(out, depth + 1);
                write_json(out, item, indent, sort_keys, depth + 1)?;
            }
            open(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                open(out, depth + 1);
                // JSON keys are strings; Python converts other keys the same way.
                let k = key.as_str().map(str::to_string).unwrap_or_else(|| key.to_string());
                out.push_str(&serde_json::to_string(&k).unwrap_or_default());
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, indent, sort_keys, depth + 1)?;
            }
            open(out, depth);
            out.push('}');
        }
        _ => {
            return Err(Error::new(ErrorKind::InvalidOperation, format!("cannot serialize {value} to JSON")))
        }
    }
    Ok(())
}

/// A float as Python's `repr` writes it (`1.0`, `0.5`, `1e-05`, `1e+16`).
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let abs = x.abs();
    if x == 0.0 || (1e-4..1e16).contains(&abs) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        // Rust writes the shortest round-trip digits as `1.5e-7`; Python as `1.5e-07`.
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// `strftime_now(format)`: the current UTC time, for templates that print today's date.
fn strftime_now(format: String) -> std::result::Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(format_utc(secs, &format)))
}

/// Formats a Unix time with the common C `strftime` directives.
pub(crate) fn format_utc(unix_secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[month as usize - 1] + day + i64::from(leap && month > 2);

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hour % 12 == 0 { 12 } else { hour % 12 })),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuing_the_final_message_cuts_the_rendered_chat_after_it() {
        let rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nThe answer is<|im_end|>\n";
        assert_eq!(
            cut_after_final_message(rendered, "The answer is").unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nThe answer is"
        );
        // A trailing space the template kept stays; one it trimmed is not invented.
        assert_eq!(cut_after_final_message("A: x y <end>", "x y ").unwrap(), "A: x y ");
        assert_eq!(cut_after_final_message("A: x y<end>", "x y ").unwrap(), "A: x y");
        // The last occurrence: an earlier message with the same text is not the one continued.
        assert_eq!(cut_after_final_message("U: ok\nA: ok<end>", "ok").unwrap(), "U: ok\nA: ok");
        assert!(cut_after_final_message("A: <end>", "  ").is_err());
        assert!(cut_after_final_message("A: changed<end>", "original").is_err());
    }

    #[test]
    fn a_request_template_keeps_the_models_special_tokens() {
        let model = ChatTemplate::new("{{ bos_token }}", Some("<s>"), Some("</s>")).unwrap();
        let request = model.with_source("{{ bos_token }}|{{ eos_token }}|{{ messages[0].content }}").unwrap();
        assert_eq!(request.render(&[ChatMessage::new("user", "hi")], false).unwrap(), "<s>|</s>|hi");
        assert!(model.with_source("{% if %}").is_err());
    }

    #[test]
    fn trims_blocks_like_transformers() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {% if m.role == 'user' %}\nU:{{ m.content }}\n  {% endif %}\n{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let out = t.render(&[ChatMessage::new("user", "hi"), ChatMessage::new("user", "yo")], false).unwrap();
        assert_eq!(out, "U:hi\nU:yo\n");
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", None, None).unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        assert!(matches!(ChatTemplate::new("{% for %}", None, None), Err(ModelError::ChatTemplate(_))));
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ tools | tojson }}|{{ tools | tojson(indent=2) }}", None, None).unwrap();
        let tools = serde_json::json!([{"name": "f<x>", "b": 1.0, "a": [1, 2.5, null, true], "e": {}}]);
        let mut extra = serde_json::Map::new();
        extra.insert("tools".into(), tools);
        let out = t.render_json(&serde_json::json!([]), false, &extra).unwrap();
        let (flat, pretty) = out.split_once('|').unwrap();
        assert_eq!(flat, r#"[{"name": "f<x>", "b": 1.0, "a": [1, 2.5, null, true], "e": {}}]"#);
        assert_eq!(
            pretty,
            "[\n  {\n    \"name\": \"f<x>\",\n    \"b\": 1.0,\n    \"a\": [\n      1,\n      2.5,\n      null,\n      true\n    ],\n    \"e\": {}\n  }\n]"
        );
    }

    #[test]
    fn python_methods_and_loop_controls() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content.strip().upper() }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let out =
            t.render(&[ChatMessage::new("user", "  hi "), ChatMessage::new("user", "no")], false).unwrap();
        assert_eq!(out, "HI");
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e-5), "1e-05");
        assert_eq!(python_float(1.5e20), "1.5e+20");
        assert_eq!(python_float(-2.5), "-2.5");
    }

    #[test]
    fn strftime_directives() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_309;
        assert_eq!(format_utc(t, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(format_utc(t, "%A %B %e, %H:%M:%S %p %j %%"), "Friday July 26, 13:25:09 PM 208 %");
    }
}
