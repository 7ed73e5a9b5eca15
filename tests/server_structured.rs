//! Structured outputs and tool calls over HTTP, against the real server on
//! the CPU backend and the default model (SmolLM2-135M-Instruct): a small
//! model left to itself rarely writes valid JSON, so every valid output here
//! is the grammar's doing. Each output is checked against its schema by
//! hand (types, required keys, enums, array bounds), each choice and regex
//! output by exact membership or the pattern.

mod server_support;

use std::sync::OnceLock;

use pagoda_server::ServerArgs;
use serde_json::{json, Value};
use server_support::{Client, TestServer};

static SERVER: OnceLock<TestServer> = OnceLock::new();

fn client() -> Client {
    SERVER
        .get_or_init(|| {
            TestServer::start(ServerArgs {
                enable_auto_tool_choice: true,
                tool_call_parser: pagoda_tool_calls::ToolParserKind::from_name("hermes"),
                ..ServerArgs::default()
            })
        })
        .client()
}

const CMPL: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

/// Whether `value` is an instance of `schema`, for the subset of JSON Schema
/// the tests use (type, properties, required, additionalProperties false,
/// enum, items, minItems, maxItems, maxLength, minimum, maximum). An
/// independent check: it shares no code with the grammar compiler.
fn conforms(value: &Value, schema: &Value) -> Result<(), String> {
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        return if options.contains(value) { Ok(()) } else { Err(format!("{value} not in {options:?}")) };
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let object = value.as_object().ok_or(format!("{value} is not an object"))?;
            let properties = schema.get("properties").and_then(Value::as_object);
            for key in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                let key = key.as_str().expect("key");
                if !object.contains_key(key) {
                    return Err(format!("missing required key {key} in {value}"));
                }
            }
            for (key, v) in object {
                match properties.and_then(|p| p.get(key)) {
                    Some(sub) => conforms(v, sub)?,
                    None if schema.get("additionalProperties") == Some(&json!(false)) => {
                        return Err(format!("unexpected key {key}"))
                    }
                    None => {}
                }
            }
            Ok(())
        }
        Some("array") => {
            let items = value.as_array().ok_or(format!("{value} is not an array"))?;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
                if (items.len() as u64) < min {
                    return Err(format!("{} items < minItems {min}", items.len()));
                }
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    return Err(format!("{} items > maxItems {max}", items.len()));
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    conforms(item, item_schema)?;
                }
            }
            Ok(())
        }
        Some("string") => {
            let s = value.as_str().ok_or(format!("{value} is not a string"))?;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
                if s.chars().count() as u64 > max {
                    return Err(format!("{s:?} longer than {max}"));
                }
            }
            Ok(())
        }
        Some("integer") => {
            let n = value.as_i64().ok_or(format!("{value} is not an integer"))?;
            if schema.get("minimum").and_then(Value::as_i64).is_some_and(|m| n < m) {
                return Err(format!("{n} below minimum"));
            }
            if schema.get("maximum").and_then(Value::as_i64).is_some_and(|m| n > m) {
                return Err(format!("{n} above maximum"));
            }
            Ok(())
        }
        Some("number") => value.as_f64().map(|_| ()).ok_or(format!("{value} is not a number")),
        Some("boolean") => value.as_bool().map(|_| ()).ok_or(format!("{value} is not a boolean")),
        Some(other) => Err(format!("the test checker does not know type {other}")),
        None => Ok(()),
    }
}

fn schemas() -> Vec<Value> {
    vec![
        json!({
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
            "required": ["name", "age"],
            "additionalProperties": false
        }),
        json!({
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "forecast": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 3,
                    "items": {
                        "type": "object",
                        "properties": {"day": {"type": "integer", "minimum": 1, "maximum": 7}, "rain": {"type": "boolean"}},
                        "required": ["day", "rain"],
                        "additionalProperties": false
                    }
                }
            },
            "required": ["city", "unit", "forecast"],
            "additionalProperties": false
        }),
        json!({"type": "array", "minItems": 1, "maxItems": 4, "items": {"enum": ["red", "green", "blue"]}}),
    ]
}

#[tokio::test]
async fn json_schema_outputs_parse_and_validate_on_both_endpoints() {
    let c = client();
    for (i, schema) in schemas().into_iter().enumerate() {
        let format =
            json!({"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": true}});
        for seed in [1, 2] {
            let chat = json!({
                "messages": [{"role": "user", "content": "Describe something as JSON."}],
                "response_format": format, "max_tokens": 200, "temperature": 1.0, "seed": seed
            });
            let (status, r) = c.post_json(CHAT, &chat).await;
            assert_eq!(status, 200, "{r}");
            let text = r["choices"][0]["message"]["content"].as_str().expect("content");
            assert_eq!(r["choices"][0]["finish_reason"], "stop", "schema {i}: cut short: {text}");
            let value: Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("schema {i}: {e}: {text}"));
            conforms(&value, &schema).unwrap_or_else(|e| panic!("schema {i}: {e}: {text}"));

            let cmpl = json!({
                "prompt": "Here is the record in JSON:", "structured_outputs": {"json": schema},
                "max_tokens": 200, "temperature": 1.0, "seed": seed
            });
            let (status, r) = c.post_json(CMPL, &cmpl).await;
            assert_eq!(status, 200, "{r}");
            let text = r["choices"][0]["text"].as_str().expect("text");
            let value: Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("schema {i}: {e}: {text}"));
            conforms(&value, &schema).unwrap_or_else(|e| panic!("schema {i}: {e}: {text}"));
        }
    }
}

#[tokio::test]
async fn choice_regex_grammar_and_json_object_hold() {
    let c = client();
    // The reproducer of the issue: guided_choice used to be ignored.
    let body = json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "guided_choice": ["yes", "no"]});
    let (status, r) = c.post_json(CMPL, &body).await;
    assert_eq!(status, 200, "{r}");
    assert!(["yes", "no"].contains(&r["choices"][0]["text"].as_str().unwrap()), "{r}");

    let body = json!({"messages": [{"role": "user", "content": "Pick a colour."}], "n": 3, "seed": 5,
                      "temperature": 1.0, "max_tokens": 8, "structured_outputs": {"choice": ["red", "green", "blue"]}});
    let (status, r) = c.post_json(CHAT, &body).await;
    assert_eq!(status, 200, "{r}");
    for choice in r["choices"].as_array().unwrap() {
        let text = choice["message"]["content"].as_str().unwrap();
        assert!(["red", "green", "blue"].contains(&text), "{text}");
    }

    // ASCII digits: `\d` is Unicode-aware in the grammar engine (as in Rust's and Python's regexes).
    let re = regex::Regex::new(r"^[0-9]{3}-[0-9]{4}$").unwrap();
    for seed in 0..3 {
        let body = json!({"prompt": "Call me at", "max_tokens": 12, "temperature": 1.0, "seed": seed, "guided_regex": "[0-9]{3}-[0-9]{4}"});
        let (status, r) = c.post_json(CMPL, &body).await;
        assert_eq!(status, 200, "{r}");
        let text = r["choices"][0]["text"].as_str().unwrap();
        assert!(re.is_match(text), "{text:?}");
    }

    // A grammar in vLLM's EBNF (GBNF) form and in Lark form.
    for grammar in [r#"root ::= "answer: " ("yes" | "no")"#, "start: \"answer: \" (\"yes\" | \"no\")"] {
        let body =
            json!({"prompt": "Is water wet?", "max_tokens": 8, "temperature": 0, "guided_grammar": grammar});
        let (status, r) = c.post_json(CMPL, &body).await;
        assert_eq!(status, 200, "{grammar}: {r}");
        let text = r["choices"][0]["text"].as_str().unwrap();
        assert!(text == "answer: yes" || text == "answer: no", "{grammar}: {text:?}");
    }

    let body = json!({"messages": [{"role": "user", "content": "Give me JSON."}], "max_tokens": 60, "temperature": 0,
                      "response_format": {"type": "json_object"}});
    let (status, r) = c.post_json(CHAT, &body).await;
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    if r["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(text).unwrap().is_object(), "{text}");
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
}

#[tokio::test]
async fn streamed_structured_output_is_the_same_text() {
    let c = client();
    let schema = &schemas()[0];
    let body = json!({"messages": [{"role": "user", "content": "A person as JSON."}], "max_tokens": 80, "temperature": 0,
                      "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}});
    let (_, whole) = c.post_json(CHAT, &body).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = c.post_stream(CHAT, &streamed).await;
    let text: String =
        events.events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    conforms(&serde_json::from_str(&text).unwrap(), schema).unwrap();
}

#[tokio::test]
async fn invalid_constraints_are_refused_naming_the_field() {
    let c = client();
    let cases = [
        (json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (json!({"guided_json": {"type": "no-such-type"}}), "guided_json"),
        (json!({"guided_grammar": "root ::= ("}), "guided_grammar"),
        (json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}), "structured_outputs"),
        (json!({"guided_regex": "a", "guided_choice": ["b"]}), "guided_choice"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
        ),
    ];
    for (fields, param) in cases {
        let mut body = json!({"prompt": "x", "max_tokens": 2});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, r) = c.post_json(CMPL, &body).await;
        assert_eq!(status, 400, "{body}: {r}");
        assert_eq!(r["error"]["param"], param, "{body}: {r}");
    }
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false}
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}}, "required": ["timezone"], "additionalProperties": false}
        }}
    ])
}

fn parameters_of(tools: &Value, name: &str) -> Value {
    tools.as_array().unwrap().iter().find(|t| t["function"]["name"] == name).expect("a defined function")
        ["function"]["parameters"]
        .clone()
}

fn check_calls(calls: &Value, tools: &Value) -> usize {
    let calls = calls.as_array().expect("tool_calls");
    for call in calls {
        assert!(call["id"].as_str().unwrap().starts_with("chatcmpl-tool-"), "{call}");
        assert_eq!(call["type"], "function");
        let name = call["function"]["name"].as_str().unwrap();
        let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        conforms(&arguments, &parameters_of(tools, name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    calls.len()
}

#[tokio::test]
async fn required_and_named_tool_calls_always_parse_streamed_or_not() {
    let c = client();
    let tools = weather_tools();
    for (choice, parallel) in [
        (json!("required"), true),
        (json!("required"), false),
        (json!({"type": "function", "function": {"name": "get_weather"}}), true),
    ] {
        let body = json!({"messages": [{"role": "user", "content": "What's the weather in Paris?"}], "tools": tools,
                          "tool_choice": choice, "parallel_tool_calls": parallel, "max_tokens": 120, "temperature": 0});
        let (status, r) = c.post_json(CHAT, &body).await;
        assert_eq!(status, 200, "{r}");
        let message = &r["choices"][0]["message"];
        assert!(message["content"].is_null(), "{r}");
        let n = check_calls(&message["tool_calls"], &tools);
        assert!(n >= 1, "{r}");
        if !parallel {
            assert_eq!(n, 1, "{r}");
        }
        let named = choice.is_object();
        assert_eq!(r["choices"][0]["finish_reason"], if named { "stop" } else { "tool_calls" }, "{r}");
        if named {
            assert_eq!(message["tool_calls"][0]["function"]["name"], "get_weather");
        }

        // Streamed: id, type and name first, then argument fragments that join into the same call.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let events = c.post_stream(CHAT, &streamed).await;
        let mut calls: Vec<(String, String, String)> = Vec::new();
        let mut finish = None;
        for e in &events.events {
            let Some(choice) = e["choices"].get(0) else { continue };
            for d in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
                let index = d["index"].as_u64().unwrap() as usize;
                if let Some(id) = d["id"].as_str() {
                    assert_eq!(index, calls.len(), "a new call opens the next index");
                    calls.push((id.into(), d["function"]["name"].as_str().unwrap().into(), String::new()));
                }
                if let Some(fragment) = d["function"]["arguments"].as_str() {
                    calls[index].2.push_str(fragment);
                }
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_string());
            }
        }
        let streamed_calls: Vec<Value> = calls
            .iter()
            .map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}))
            .collect();
        assert_eq!(check_calls(&Value::Array(streamed_calls.clone()), &tools), n, "{:?}", events.events);
        for (s, w) in streamed_calls.iter().zip(message["tool_calls"].as_array().unwrap()) {
            assert_eq!(s["function"]["name"], w["function"]["name"]);
            let (a, b): (Value, Value) = (
                serde_json::from_str(s["function"]["arguments"].as_str().unwrap()).unwrap(),
                serde_json::from_str(w["function"]["arguments"].as_str().unwrap()).unwrap(),
            );
            assert_eq!(a, b);
        }
        assert_eq!(finish.as_deref(), r["choices"][0]["finish_reason"].as_str());
    }
}

#[tokio::test]
async fn auto_tool_calls_are_parsed_from_the_models_own_format() {
    let c = client();
    let tools = weather_tools();
    // The model is steered into Hermes' format with a grammar, so the parser has a call to find.
    let call = r#"<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Oslo)", "unit": "celsius"\}\}\n</tool_call>"#;
    let body = json!({"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools,
                      "max_tokens": 60, "temperature": 0, "structured_outputs": {"regex": call}});
    let (status, r) = c.post_json(CHAT, &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(check_calls(&r["choices"][0]["message"]["tool_calls"], &tools), 1, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = c.post_stream(CHAT, &streamed).await;
    let content: String =
        events.events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!content.contains("<tool_call>"), "tag text leaked into content: {content:?}");
    let names: Vec<&str> = events
        .events
        .iter()
        .flat_map(|e| e["choices"][0]["delta"]["tool_calls"].as_array().into_iter().flatten())
        .filter_map(|d| d["function"]["name"].as_str())
        .collect();
    assert_eq!(names, ["get_weather"]);

    // Plain text stays content; tool and assistant-call messages render through the template.
    let body = json!({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 degrees"}
    ], "tools": tools, "max_tokens": 8, "temperature": 0});
    let (status, r) = c.post_json(CHAT, &body).await;
    assert_eq!(status, 200, "{r}");
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
}

#[tokio::test]
async fn auto_tool_choice_needs_the_server_flags() {
    // A server without --enable-auto-tool-choice refuses "auto" by name (vLLM does too).
    let plain = TestServer::start(ServerArgs::default());
    let c = plain.client();
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "tools": weather_tools(), "max_tokens": 2});
    let (status, r) = c.post_json(CHAT, &body).await;
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "tool_choice");
    let mut required = body.clone();
    required["tool_choice"] = json!("required");
    let (status, r) = c.post_json(CHAT, &required).await;
    assert_eq!(status, 200, "{r}");
}
