use pagoda_tool_calls::*;
use proptest::prelude::*;
use serde_json::{json, Value};

fn call(name: &str, arguments: Value) -> ToolCall {
    ToolCall { name: name.into(), arguments: arguments.to_string() }
}

/// What a stream yielded: its content, and each call's name and parsed arguments.
fn collect(deltas: &[StreamDelta]) -> (String, Vec<(String, String)>) {
    let mut content = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    for delta in deltas {
        match delta {
            StreamDelta::Content(text) => content.push_str(text),
            StreamDelta::ToolCallStart { index, name } => {
                assert_eq!(*index, calls.len(), "calls start in order");
                calls.push((name.clone(), String::new()));
            }
            StreamDelta::ToolCallArguments { index, fragment } => {
                assert_eq!(*index + 1, calls.len(), "arguments follow their call's start");
                calls[*index].1.push_str(fragment);
            }
        }
    }
    (content, calls)
}

fn stream_in_pieces(kind: ToolParserKind, pieces: &[&str]) -> Vec<StreamDelta> {
    let mut parser = kind.streaming();
    let mut deltas = Vec::new();
    for piece in pieces {
        deltas.extend(parser.push(piece));
    }
    deltas.extend(parser.finish());
    deltas
}

fn split_at_points(text: &str, points: &[usize]) -> Vec<String> {
    let mut cuts: Vec<usize> =
        points.iter().map(|p| p % (text.len() + 1)).filter(|p| text.is_char_boundary(*p)).collect();
    cuts.push(0);
    cuts.push(text.len());
    cuts.sort();
    cuts.dedup();
    cuts.windows(2).map(|w| text[w[0]..w[1]].to_string()).collect()
}

/// The stream, cut this way, agrees with `extract` on well-formed output.
fn assert_stream_matches_extract(kind: ToolParserKind, text: &str, pieces: &[String]) {
    let extracted = kind.extract(text);
    let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
    let (content, calls) = collect(&stream_in_pieces(kind, &pieces));
    assert_eq!(content, extracted.content.clone().unwrap_or_default(), "{text:?} in {pieces:?}");
    assert_eq!(calls.len(), extracted.calls.len(), "{text:?} in {pieces:?}");
    for ((name, arguments), expected) in calls.iter().zip(&extracted.calls) {
        assert_eq!(name, &expected.name);
        let streamed: Value = serde_json::from_str(arguments)
            .unwrap_or_else(|e| panic!("streamed arguments {arguments:?} of {text:?}: {e}"));
        let extracted: Value = serde_json::from_str(&expected.arguments).unwrap();
        assert_eq!(streamed, extracted, "{text:?} in {pieces:?}");
    }
}

/// Char by char, whole, and fixed-seed random splits.
fn chunkings(text: &str) -> Vec<Vec<String>> {
    let mut all = vec![text.chars().map(String::from).collect(), vec![text.to_string()]];
    // A small LCG keeps the seed fixed without another dependency.
    let mut seed: u64 = 0x5eed;
    for _ in 0..50 {
        let points: Vec<usize> = (0..8)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (seed >> 33) as usize
            })
            .collect();
        all.push(split_at_points(text, &points));
    }
    all
}

/// Well-formed output: every chunking streams what `extract` finds.
fn assert_every_chunking(kind: ToolParserKind, text: &str) {
    for pieces in chunkings(text) {
        assert_stream_matches_extract(kind, text, &pieces);
    }
}

/// Malformed output: a stream cannot take back a call it began, so it need
/// not match `extract`, but it must not depend on the chunking.
fn assert_stream_ignores_chunking(kind: ToolParserKind, text: &str) {
    let whole = collect(&stream_in_pieces(kind, &[text]));
    for pieces in chunkings(text) {
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        assert_eq!(collect(&stream_in_pieces(kind, &pieces)), whole, "{text:?} in {pieces:?}");
    }
}

const HERMES_CASES: &[&str] = &[
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    "Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {\"y\": [1, 2, {\"z\": null}]}}\n</tool_call>",
    "<tool_call>{\"arguments\": {\"q\": \"é \\\"quoted\\\" 😀 \\u00e9\"}, \"name\": \"search\"}</tool_call>",
    "Plain text with < and <tool but no call.",
    "a <<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"n\": -1.5e3, \"t\": true}}\n",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"k\\\": 2}\"}\n</tool_call>",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "",
];

const HERMES_MALFORMED: &[&str] = &[
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": }\n</tool_call>",
    "Sure <tool_call>{\"name\": \"f\", \"arguments\": {}} trailing</tool_call>",
    "<tool_call>{\"name\": 3, \"arguments\": {}}</tool_call>",
    "<tool_call>{\"name\": \"f\", \"arguments\": [1]}</tool_call>",
    "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}",
    "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call><tool_call>{oops}</tool_call>",
];

#[test]
fn hermes_single_call() {
    let found = ToolParserKind::Hermes.extract(HERMES_CASES[0]);
    assert_eq!(
        found,
        ExtractedToolCalls { content: None, calls: vec![call("get_weather", json!({"city": "Paris"}))] }
    );
}

#[test]
fn hermes_content_then_several_calls() {
    let found = ToolParserKind::Hermes.extract(HERMES_CASES[1]);
    assert_eq!(found.content.as_deref(), Some("Let me check.\n"));
    assert_eq!(found.calls, [call("a", json!({"x": 1})), call("b", json!({"y": [1, 2, {"z": null}]}))]);
}

#[test]
fn hermes_unicode_escapes_and_key_order() {
    let found = ToolParserKind::Hermes.extract(HERMES_CASES[2]);
    assert_eq!(found.calls, [call("search", json!({"q": "é \"quoted\" 😀 é"}))]);
}

#[test]
fn hermes_plain_text_and_near_tags() {
    let text = HERMES_CASES[3];
    assert_eq!(
        ToolParserKind::Hermes.extract(text),
        ExtractedToolCalls { content: Some(text.into()), calls: vec![] }
    );
    let found = ToolParserKind::Hermes.extract(HERMES_CASES[4]);
    assert_eq!(found.content.as_deref(), Some("a <"));
    assert_eq!(found.calls, [call("f", json!({}))]);
    assert_eq!(ToolParserKind::Hermes.extract(""), ExtractedToolCalls::default());
}

#[test]
fn hermes_unclosed_call_at_the_end_counts() {
    let found = ToolParserKind::Hermes.extract(HERMES_CASES[5]);
    assert_eq!(found.calls, [call("f", json!({"n": -1500.0, "t": true}))]);
}

#[test]
fn hermes_quoted_or_missing_arguments() {
    assert_eq!(ToolParserKind::Hermes.extract(HERMES_CASES[6]).calls, [call("f", json!({"k": 2}))]);
    assert_eq!(ToolParserKind::Hermes.extract(HERMES_CASES[7]).calls, [call("f", json!({}))]);
}

#[test]
fn hermes_malformed_json_is_content() {
    for text in HERMES_MALFORMED {
        assert_eq!(
            ToolParserKind::Hermes.extract(text),
            ExtractedToolCalls { content: Some(text.to_string()), calls: vec![] },
            "{text}"
        );
        assert_stream_ignores_chunking(ToolParserKind::Hermes, text);
    }
}

#[test]
fn hermes_streams_arguments_as_they_arrive() {
    let mut parser = ToolParserKind::Hermes.streaming();
    assert_eq!(parser.push("Hi <tool"), [StreamDelta::Content("Hi ".into())]);
    assert_eq!(
        parser.push("_call>\n{\"name\": \"f\", \"arguments\": {\"a\""),
        [
            StreamDelta::ToolCallStart { index: 0, name: "f".into() },
            StreamDelta::ToolCallArguments { index: 0, fragment: "{\"a\"".into() },
        ]
    );
    assert!(parser.saw_tool_call());
    assert_eq!(
        parser.push(": 1}}\n</tool_call>"),
        [StreamDelta::ToolCallArguments { index: 0, fragment: ": 1}".into() }]
    );
    assert_eq!(parser.finish(), []);
}

#[test]
fn hermes_stream_never_leaks_tag_text() {
    let deltas = stream_in_pieces(
        ToolParserKind::Hermes,
        &["<", "tool_", "call>", "{\"name\":\"f\",\"arguments\":{}}", "</tool", "_call>"],
    );
    assert_eq!(collect(&deltas).0, "");
    let deltas = stream_in_pieces(ToolParserKind::Hermes, &["x <tool_c"]);
    assert_eq!(collect(&deltas).0, "x <tool_c", "a partial tag at the end is content");
}

#[test]
fn hermes_stream_passes_on_a_broken_call_as_content() {
    let text = "Hi <tool_call>{\"name\": oops}</tool_call> bye";
    let (content, calls) = collect(&stream_in_pieces(ToolParserKind::Hermes, &[text]));
    assert_eq!(content, text);
    assert!(calls.is_empty());
}

#[test]
fn hermes_every_chunking() {
    for text in HERMES_CASES {
        assert_every_chunking(ToolParserKind::Hermes, text);
    }
}

const LLAMA_CASES: &[&str] = &[
    "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
    "<|python_tag|>{\"name\": \"a\", \"parameters\": {\"x\": {\"deep\": [1, {\"y\": \"\\\"\"}]}}}; {\"name\": \"b\", \"arguments\": {\"k\": \"ü\"}}",
    "  \n{\"name\": \"f\", \"parameters\": {}} ;\n",
    "The weather is nice.",
    "<|python_ta",
];

const LLAMA_MALFORMED: &[&str] = &[
    "{\"name\": \"f\", \"parameters\": {\"a\": 1}} and then text",
    "{not json}",
    "<|python_tag|>",
    "{\"name\": \"f\", \"parameters\": {\"a\": 1}}; {\"name\": \"g\", \"parameters\": {\"b\": ",
];

#[test]
fn llama_single_and_several_calls() {
    let found = ToolParserKind::Llama3Json.extract(LLAMA_CASES[0]);
    assert_eq!(
        found,
        ExtractedToolCalls { content: None, calls: vec![call("get_weather", json!({"city": "Paris"}))] }
    );
    let found = ToolParserKind::Llama3Json.extract(LLAMA_CASES[1]);
    assert_eq!(found.content, None);
    assert_eq!(
        found.calls,
        [call("a", json!({"x": {"deep": [1, {"y": "\""}]}})), call("b", json!({"k": "ü"}))]
    );
    assert_eq!(ToolParserKind::Llama3Json.extract(LLAMA_CASES[2]).calls, [call("f", json!({}))]);
}

#[test]
fn llama_plain_text_and_malformed_are_content() {
    for text in LLAMA_CASES[3..].iter().chain(LLAMA_MALFORMED) {
        assert_eq!(
            ToolParserKind::Llama3Json.extract(text),
            ExtractedToolCalls { content: Some(text.to_string()), calls: vec![] },
            "{text}"
        );
        assert_stream_ignores_chunking(ToolParserKind::Llama3Json, text);
    }
}

#[test]
fn llama_every_chunking() {
    for text in LLAMA_CASES {
        assert_every_chunking(ToolParserKind::Llama3Json, text);
    }
}

const MISTRAL_CASES: &[&str] = &[
    "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]",
    "Sure.[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": {\"y\": [true]}}}, {\"name\": \"b\", \"arguments\": {\"s\": \"\\\\ \\\" 中文\"}}]",
    "[TOOL_CALLS]get_weather{\"city\": \"Paris\"}[TOOL_CALLS]other{}",
    "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}",
    "No calls [TOOL here.",
    "x [TOOL_CALL",
];

const MISTRAL_MALFORMED: &[&str] = &[
    "[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {]",
    "[TOOL_CALLS] nonsense!",
    "[TOOL_CALLS] []",
    "Hi [TOOL_CALLS]",
    "[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {}}] trailing",
    "[TOOL_CALLS]f[ARG{}",
    "[TOOL_CALLS]f{\"a\": 1} trailing",
];

#[test]
fn mistral_array_form() {
    let found = ToolParserKind::Mistral.extract(MISTRAL_CASES[0]);
    assert_eq!(
        found,
        ExtractedToolCalls { content: None, calls: vec![call("get_weather", json!({"city": "Paris"}))] }
    );
    let found = ToolParserKind::Mistral.extract(MISTRAL_CASES[1]);
    assert_eq!(found.content.as_deref(), Some("Sure."));
    assert_eq!(found.calls, [call("a", json!({"x": {"y": [true]}})), call("b", json!({"s": "\\ \" 中文"}))]);
}

#[test]
fn mistral_name_first_form() {
    let found = ToolParserKind::Mistral.extract(MISTRAL_CASES[2]);
    assert_eq!(found.calls, [call("get_weather", json!({"city": "Paris"})), call("other", json!({}))]);
    let found = ToolParserKind::Mistral.extract(MISTRAL_CASES[3]);
    assert_eq!(found.calls, [call("get_weather", json!({"city": "Paris"}))]);
}

#[test]
fn mistral_plain_text_and_malformed_are_content() {
    for text in MISTRAL_CASES[4..].iter().chain(MISTRAL_MALFORMED) {
        assert_eq!(
            ToolParserKind::Mistral.extract(text),
            ExtractedToolCalls { content: Some(text.to_string()), calls: vec![] },
            "{text}"
        );
        assert_stream_ignores_chunking(ToolParserKind::Mistral, text);
    }
}

#[test]
fn mistral_every_chunking() {
    for text in MISTRAL_CASES {
        assert_every_chunking(ToolParserKind::Mistral, text);
    }
}

#[test]
fn llama_and_mistral_stream_arguments_as_they_arrive() {
    let mut parser = ToolParserKind::Llama3Json.streaming();
    assert_eq!(
        parser.push("{\"name\": \"f\", \"parameters\": {\"a\": [1"),
        [
            StreamDelta::ToolCallStart { index: 0, name: "f".into() },
            StreamDelta::ToolCallArguments { index: 0, fragment: "{\"a\": [1".into() },
        ]
    );
    assert_eq!(
        parser.push("]}}; {\"name\": \"g\", \"parameters\": {"),
        [
            StreamDelta::ToolCallArguments { index: 0, fragment: "]}".into() },
            StreamDelta::ToolCallStart { index: 1, name: "g".into() },
            StreamDelta::ToolCallArguments { index: 1, fragment: "{".into() },
        ]
    );
    assert_eq!(parser.push("}}"), [StreamDelta::ToolCallArguments { index: 1, fragment: "}".into() }]);
    assert_eq!(parser.finish(), []);

    let mut parser = ToolParserKind::Mistral.streaming();
    assert_eq!(
        parser.push("Ok[TOOL_CALLS]f{\"x\""),
        [
            StreamDelta::Content("Ok".into()),
            StreamDelta::ToolCallStart { index: 0, name: "f".into() },
            StreamDelta::ToolCallArguments { index: 0, fragment: "{\"x\"".into() },
        ]
    );
    assert_eq!(parser.push(": 2}"), [StreamDelta::ToolCallArguments { index: 0, fragment: ": 2}".into() }]);
    assert_eq!(parser.finish(), []);
}

#[test]
fn plain_text_streams_straight_through() {
    for kind in [ToolParserKind::Hermes, ToolParserKind::Llama3Json, ToolParserKind::Mistral] {
        let mut parser = kind.streaming();
        assert_eq!(parser.push("Hello"), [StreamDelta::Content("Hello".into())], "{kind:?}");
        assert_eq!(parser.push(" world"), [StreamDelta::Content(" world".into())], "{kind:?}");
        assert_eq!(parser.finish(), []);
        assert!(!parser.saw_tool_call());
    }
}

#[test]
fn parser_names() {
    for name in ToolParserKind::names() {
        assert_eq!(ToolParserKind::from_name(name).unwrap().name(), *name);
    }
    assert_eq!(ToolParserKind::from_name("llama4_json"), None);
}

fn weather() -> FunctionDef {
    serde_json::from_value(json!({
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"],
                       "$defs": {"City": {"type": "string"}}}
    }))
    .unwrap()
}

fn no_parameters(name: &str) -> FunctionDef {
    FunctionDef { name: name.into(), description: None, parameters: None, strict: None }
}

#[test]
fn required_schema_shape_and_round_trip() {
    let functions = [weather(), no_parameters("now")];
    let schema = required_calls_schema(&functions);
    assert_eq!(schema["type"], "array");
    assert_eq!(schema["minItems"], 1);
    let variants = schema["items"]["anyOf"].as_array().unwrap();
    assert_eq!(variants.len(), 2);
    assert_eq!(variants[0]["properties"]["name"]["const"], "get_weather");
    assert_eq!(variants[0]["properties"]["parameters"], functions[0].parameters.clone().unwrap());
    assert_eq!(variants[1]["properties"]["parameters"], json!({"type": "object"}));
    assert_eq!(schema["$defs"]["City"], json!({"type": "string"}));

    let output =
        r#"[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "now", "parameters": {}}]"#;
    assert_eq!(
        parse_required_calls(output).unwrap(),
        [call("get_weather", json!({"city": "Oslo"})), call("now", json!({}))]
    );
    assert!(parse_required_calls("[]").is_err());
    assert!(parse_required_calls("{\"name\": \"now\"}").is_err());
    assert!(parse_required_calls("[{\"parameters\": {}}]").is_err());
    assert!(parse_required_calls("[{\"name\": \"now\", ").is_err());
}

#[test]
fn named_schema_is_the_parameters() {
    assert_eq!(named_call_schema(&weather()), weather().parameters.unwrap());
    assert_eq!(named_call_schema(&no_parameters("now")), json!({"type": "object"}));
}

fn constrained(mut stream: ConstrainedCallStream, pieces: &[String]) -> Vec<StreamDelta> {
    let mut deltas = Vec::new();
    for piece in pieces {
        deltas.extend(stream.push(piece));
    }
    deltas.extend(stream.finish());
    deltas
}

#[test]
fn constrained_required_stream_every_chunking() {
    let text = " [{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo \\\"N\\\"\"}},\n {\"parameters\": {\"x\": [1]}, \"name\": \"now\"}]";
    let expected = parse_required_calls(text).unwrap();
    let chars: Vec<String> = text.chars().map(String::from).collect();
    for pieces in [chars, vec![text.to_string()]] {
        let (content, calls) = collect(&constrained(ConstrainedCallStream::required(), &pieces));
        assert_eq!(content, "");
        let calls: Vec<ToolCall> = calls
            .into_iter()
            .map(|(name, args)| ToolCall {
                name,
                arguments: serde_json::from_str::<Value>(&args).unwrap().to_string(),
            })
            .collect();
        assert_eq!(calls, expected);
    }
    // The first call's arguments stream before the array closes.
    let mut stream = ConstrainedCallStream::required();
    let deltas = stream.push("[{\"name\": \"f\", \"parameters\": {\"a\": 1");
    assert_eq!(
        deltas,
        [
            StreamDelta::ToolCallStart { index: 0, name: "f".into() },
            StreamDelta::ToolCallArguments { index: 0, fragment: "{\"a\": 1".into() },
        ]
    );
}

#[test]
fn constrained_named_stream() {
    let mut stream = ConstrainedCallStream::named("get_weather");
    assert_eq!(
        stream.push("{\"city\""),
        [
            StreamDelta::ToolCallStart { index: 0, name: "get_weather".into() },
            StreamDelta::ToolCallArguments { index: 0, fragment: "{\"city\"".into() },
        ]
    );
    assert_eq!(
        stream.push(": \"Oslo\"}"),
        [StreamDelta::ToolCallArguments { index: 0, fragment: ": \"Oslo\"}".into() }]
    );
    assert_eq!(stream.finish(), []);
    assert!(stream.saw_tool_call());
}

#[test]
fn validate_functions_errors_name_the_entry() {
    assert!(validate_functions(&[weather(), no_parameters("now")]).is_ok());
    let bad = |functions: &[FunctionDef], needle: &str| {
        let error = validate_functions(functions).unwrap_err().to_string();
        assert!(error.contains(needle), "{error:?} lacks {needle:?}");
    };
    bad(&[no_parameters("")], "tools[0]");
    bad(&[weather(), no_parameters("has space")], "tools[1].function.name \"has space\"");
    bad(&[no_parameters(&"x".repeat(65))], "tools[0]");
    bad(&[no_parameters("f"), no_parameters("f")], "tools[1].function.name \"f\" is given twice");
    let mut array_params = no_parameters("g");
    array_params.parameters = Some(json!({"type": "array"}));
    bad(&[array_params], "tools[0].function.parameters");
    let mut not_object = no_parameters("g");
    not_object.parameters = Some(json!("object"));
    bad(&[not_object], "tools[0].function.parameters");
    let mut clash = weather();
    clash.name = "other".into();
    clash.parameters.as_mut().unwrap()["$defs"]["City"] = json!({"type": "integer"});
    bad(&[weather(), clash], "$defs");
}

/// Well-formed outputs of each format, from generated calls and content.
fn arguments_strategy() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        "[a-z \"\\\\é😀<>\\[\\]{}]{0,8}".prop_map(Value::String),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,5}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop::collection::btree_map("[a-z_]{1,5}", value, 0..4)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn calls_strategy() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec(("[a-z_][a-z0-9_]{0,7}", arguments_strategy()), 0..3)
}

proptest! {
    #[test]
    fn generated_outputs_stream_like_they_extract(
        calls in calls_strategy(),
        content in "[a-zé <\\[{]{0,12}",
        cuts in prop::collection::vec(0usize..400, 0..12),
        pretty in any::<bool>(),
    ) {
        let render = |args: &Value| if pretty { serde_json::to_string_pretty(args).unwrap() } else { args.to_string() };
        let hermes: String = calls
            .iter()
            .map(|(name, args)| format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {}}}\n</tool_call>\n", render(args)))
            .collect();
        let llama = calls
            .iter()
            .map(|(name, args)| format!("{{\"name\": \"{name}\", \"parameters\": {}}}", render(args)))
            .collect::<Vec<_>>()
            .join("; ");
        let mistral = format!(
            "[TOOL_CALLS] [{}]",
            calls.iter().map(|(name, args)| format!("{{\"name\": \"{name}\", \"arguments\": {}}}", render(args))).collect::<Vec<_>>().join(", ")
        );
        let expected: Vec<ToolCall> = calls.iter().map(|(name, args)| call(name, args.clone())).collect();
        let cases = [
            (ToolParserKind::Hermes, format!("{content}{hermes}")),
            (ToolParserKind::Llama3Json, llama),
            (ToolParserKind::Mistral, format!("{content}{mistral}")),
        ];
        for (kind, text) in cases {
            let extracted = kind.extract(&text);
            // (The generated content cannot spell a start tag.)
            if !calls.is_empty() {
                prop_assert_eq!(&extracted.calls, &expected, "{:?}", text);
            }
            assert_stream_matches_extract(kind, &text, &split_at_points(&text, &cuts));
        }
    }
}

proptest! {
    #[test]
    fn generated_constrained_outputs_stream_like_they_parse(
        calls in calls_strategy(),
        cuts in prop::collection::vec(0usize..400, 0..12),
        pretty in any::<bool>(),
    ) {
        let render = |value: &Value| if pretty { serde_json::to_string_pretty(value).unwrap() } else { value.to_string() };
        let to_calls = |streamed: Vec<(String, String)>| -> Vec<ToolCall> {
            streamed
                .into_iter()
                .map(|(name, args)| ToolCall { name, arguments: serde_json::from_str::<Value>(&args).unwrap().to_string() })
                .collect()
        };
        let pieces = |text: &str| split_at_points(text, &cuts);

        let array = Value::Array(calls.iter().map(|(name, args)| json!({"name": name, "parameters": args})).collect());
        let text = render(&array);
        let (content, streamed) = collect(&constrained(ConstrainedCallStream::required(), &pieces(&text)));
        prop_assert_eq!(content, "");
        if calls.is_empty() {
            prop_assert!(parse_required_calls(&text).is_err());
        } else {
            prop_assert_eq!(to_calls(streamed), parse_required_calls(&text).unwrap());
        }

        if let Some((name, args)) = calls.first() {
            let text = render(args);
            let (content, streamed) = collect(&constrained(ConstrainedCallStream::named(name), &pieces(&text)));
            prop_assert_eq!(content, "");
            prop_assert_eq!(to_calls(streamed), vec![call(name, args.clone())]);
        }
    }
}
