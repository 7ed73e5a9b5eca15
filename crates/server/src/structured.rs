//! Structured outputs: the request fields that constrain a generation to a
//! JSON schema, a regular expression, a list of choices or a grammar, in
//! every spelling OpenAI and vLLM accept, turned into one
//! [`GrammarSpec`] and compiled (with llguidance, through
//! `pagoda-structured`) into the engine's per-request constraint.
//!
//! Spellings: OpenAI's `response_format` (`text`, `json_object`,
//! `json_schema`), vLLM's `structured_outputs` object (`json`, `regex`,
//! `choice`, `grammar`, `json_object`) and its older `guided_json`,
//! `guided_regex`, `guided_choice`, `guided_grammar`. A request may use one
//! of them; two constraints at once are refused, as is anything the grammar
//! engine cannot compile (a 400 naming the field).

use std::sync::{Arc, OnceLock};

use pagoda_structured::{CompiledGrammar, GrammarCompiler, GrammarSpec};
use serde_json::Value;

use crate::endpoint::PromptWorkers;
use crate::error::ApiError;
use crate::protocol::SamplingFields;
use crate::state::AppState;

/// A constraint a request asked for, and the field it came from (errors name it).
#[derive(Clone, Debug, PartialEq)]
pub struct RequestedGrammar {
    pub spec: GrammarSpec,
    pub field: &'static str,
}

/// The structured-output constraint of a request's fields, if any.
pub fn requested_grammar(fields: &SamplingFields) -> Result<Option<RequestedGrammar>, ApiError> {
    let mut found: Vec<RequestedGrammar> = Vec::new();
    if let Some(format) = fields.response_format.as_ref().filter(|v| !v.is_null()) {
        if let Some(spec) = response_format(format)? {
            found.push(RequestedGrammar { spec, field: "response_format" });
        }
    }
    if let Some(so) = fields.structured_outputs.as_ref().filter(|v| !v.is_null()) {
        found.push(RequestedGrammar { spec: structured_outputs(so)?, field: "structured_outputs" });
    }
    if let Some(schema) = fields.guided_json.as_ref().filter(|v| !v.is_null()) {
        found.push(RequestedGrammar { spec: json_spec(schema, "guided_json")?, field: "guided_json" });
    }
    if let Some(regex) = &fields.guided_regex {
        found.push(RequestedGrammar { spec: GrammarSpec::Regex(regex.clone()), field: "guided_regex" });
    }
    if let Some(choices) = &fields.guided_choice {
        found.push(RequestedGrammar { spec: choice_spec(choices, "guided_choice")?, field: "guided_choice" });
    }
    if let Some(grammar) = &fields.guided_grammar {
        found.push(RequestedGrammar { spec: GrammarSpec::Grammar(grammar.clone()), field: "guided_grammar" });
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(ApiError::bad_request(
            Some(found[1].field),
            format!(
                "only one structured-output constraint may be given; this request has {} and {}",
                found[0].field, found[1].field
            ),
        )),
    }
}

/// OpenAI's `response_format`: `{"type": "text"}` (no constraint),
/// `{"type": "json_object"}`, or `{"type": "json_schema", "json_schema":
/// {"name": ..., "schema": {...}, "strict": ...}}`.
fn response_format(format: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    const FIELD: &str = "response_format";
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::bad_request(Some(FIELD), "response_format must be an object with a `type`")
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(GrammarSpec::JsonObject)),
        "json_schema" => {
            let schema =
                format.get("json_schema").and_then(|j| j.get("schema")).filter(|s| !s.is_null()).ok_or_else(
                    || {
                        ApiError::bad_request(
                            Some("response_format.json_schema.schema"),
                            "response_format of type json_schema needs json_schema.schema (a JSON schema)",
                        )
                    },
                )?;
            json_spec(schema, "response_format.json_schema.schema").map(Some)
        }
        other => Err(ApiError::bad_request(
            Some("response_format.type"),
            format!("response_format type `{other}` is not supported (text, json_object or json_schema)"),
        )),
    }
}

/// vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`,
/// `grammar`, `json_object`. Its options that would change the grammar's
/// whitespace (`whitespace_pattern`) or add structural tags are refused
/// by name; `disable_any_whitespace` is what Pagoda does anyway.
fn structured_outputs(so: &Value) -> Result<GrammarSpec, ApiError> {
    const FIELD: &str = "structured_outputs";
    let object = so
        .as_object()
        .ok_or_else(|| ApiError::bad_request(Some(FIELD), "structured_outputs must be an object"))?;
    let mut specs: Vec<(&str, GrammarSpec)> = Vec::new();
    for (key, value) in object {
        if value.is_null() {
            continue;
        }
        let field = |k: &str| format!("{FIELD}.{k}");
        match key.as_str() {
            "json" => specs.push(("json", json_spec(value, "structured_outputs.json")?)),
            "regex" => specs.push(("regex", GrammarSpec::Regex(string_value(value, &field("regex"))?))),
            "choice" => {
                let choices: Vec<String> = serde_json::from_value(value.clone()).map_err(|_| {
                    ApiError::bad_request(Some(&field("choice")), "choice must be an array of strings")
                })?;
                specs.push(("choice", choice_spec(&choices, "structured_outputs.choice")?));
            }
            "grammar" => {
                specs.push(("grammar", GrammarSpec::Grammar(string_value(value, &field("grammar"))?)))
            }
            "json_object" => match value.as_bool() {
                Some(true) => specs.push(("json_object", GrammarSpec::JsonObject)),
                Some(false) => {}
                None => {
                    return Err(ApiError::bad_request(
                        Some(&field("json_object")),
                        "json_object must be a boolean",
                    ))
                }
            },
            // Options that leave the grammar as Pagoda compiles it.
            "disable_any_whitespace" | "disable_fallback" | "disable_additional_properties" => {
                if !value.is_boolean() {
                    return Err(ApiError::bad_request(Some(&field(key)), format!("{key} must be a boolean")));
                }
                if key == "disable_additional_properties" && value == &Value::Bool(true) {
                    return Err(ApiError::bad_request(
                        Some(&field(key)),
                        "disable_additional_properties is not supported: give the schema \
                         `\"additionalProperties\": false` instead",
                    ));
                }
            }
            "whitespace_pattern" | "structural_tag" => {
                return Err(ApiError::bad_request(
                    Some(&field(key)),
                    format!("structured_outputs.{key} is not supported by Pagoda's grammar engine"),
                ))
            }
            other => {
                return Err(ApiError::bad_request(
                    Some(&field(other)),
                    format!(
                    "structured_outputs has no option `{other}` (json, regex, choice, grammar, json_object)"
                ),
                ))
            }
        }
    }
    match specs.len() {
        1 => Ok(specs.pop().expect("one").1),
        0 => Err(ApiError::bad_request(
            Some(FIELD),
            "structured_outputs needs one of json, regex, choice, grammar or json_object",
        )),
        _ => Err(ApiError::bad_request(
            Some(FIELD),
            format!(
                "structured_outputs may give only one of its constraints, not {} and {}",
                specs[0].0, specs[1].0
            ),
        )),
    }
}

/// A JSON schema given as an object, or as a string holding one (vLLM accepts both).
fn json_spec(value: &Value, field: &str) -> Result<GrammarSpec, ApiError> {
    let schema = match value {
        Value::String(text) => serde_json::from_str(text).map_err(|e| {
            ApiError::bad_request(Some(field), format!("the JSON schema does not parse: {e}"))
        })?,
        Value::Object(_) | Value::Bool(_) => value.clone(),
        _ => return Err(ApiError::bad_request(Some(field), "a JSON schema must be an object")),
    };
    Ok(GrammarSpec::JsonSchema(schema))
}

fn choice_spec(choices: &[String], field: &str) -> Result<GrammarSpec, ApiError> {
    if choices.is_empty() {
        return Err(ApiError::bad_request(Some(field), "choice must list at least one string"));
    }
    Ok(GrammarSpec::Choice(choices.to_vec()))
}

fn string_value(value: &Value, field: &str) -> Result<String, ApiError> {
    value.as_str().map(str::to_string).ok_or_else(|| ApiError::bad_request(Some(field), "must be a string"))
}

/// The server's grammar compiler: built on first use (the token trie of the
/// vocabulary takes a moment), then shared.
#[derive(Default)]
pub struct Grammars {
    compiler: OnceLock<Result<GrammarCompiler, String>>,
}

impl Grammars {
    /// Compiles `requested` for `engine`'s model (call on a prompt worker:
    /// compiling a large schema is CPU work). Errors name the request field.
    pub fn compile(
        &self,
        engine: &pagoda_engine::AsyncEngine,
        requested: &RequestedGrammar,
    ) -> Result<CompiledGrammar, ApiError> {
        let compiler = self
            .compiler
            .get_or_init(|| {
                let tokenizer = engine.tokenizer();
                if !tokenizer.is_present() {
                    return Err("structured outputs need the model's tokenizer; this model has none".into());
                }
                let info = engine.info();
                GrammarCompiler::new(tokenizer, &info.eos_token_ids, info.vocab_size)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ApiError::bad_request(Some(requested.field), e.clone()))?;
        compiler.compile(&requested.spec).map_err(|e| {
            ApiError::bad_request(Some(requested.field), format!("invalid {}: {e}", requested.field))
        })
    }
}

/// Compiles a request's grammar on a prompt worker (a large schema is
/// CPU work) into the engine's constraint.
pub async fn compile_on_worker(
    state: &AppState,
    workers: &PromptWorkers,
    requested: RequestedGrammar,
) -> Result<Arc<dyn pagoda_engine::TokenConstraintFactory>, ApiError> {
    let state = state.clone();
    let bytes = match &requested.spec {
        GrammarSpec::JsonSchema(v) => v.to_string().len(),
        GrammarSpec::Regex(s) | GrammarSpec::Grammar(s) => s.len(),
        GrammarSpec::Choice(c) => c.iter().map(String::len).sum(),
        GrammarSpec::JsonObject => 0,
    };
    workers
        .run(bytes, move |_| {
            let grammar = state.grammars().compile(state.engine(), &requested)?;
            Ok(Arc::new(grammar) as Arc<dyn pagoda_engine::TokenConstraintFactory>)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(body: Value) -> SamplingFields {
        serde_json::from_value(body).expect("sampling fields")
    }

    fn spec(body: Value) -> Result<Option<GrammarSpec>, ApiError> {
        requested_grammar(&fields(body)).map(|g| g.map(|g| g.spec))
    }

    fn refused_field(body: Value) -> String {
        spec(body).expect_err("refused").param.expect("names a field")
    }

    #[test]
    fn every_spelling_becomes_one_spec() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let js = Some(GrammarSpec::JsonSchema(schema.clone()));
        assert_eq!(spec(json!({})).unwrap(), None);
        assert_eq!(spec(json!({"response_format": {"type": "text"}})).unwrap(), None);
        assert_eq!(
            spec(json!({"response_format": {"type": "json_object"}})).unwrap(),
            Some(GrammarSpec::JsonObject)
        );
        let rf = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}});
        assert_eq!(spec(rf).unwrap(), js);
        assert_eq!(spec(json!({"structured_outputs": {"json": schema}})).unwrap(), js);
        assert_eq!(spec(json!({"guided_json": schema.to_string()})).unwrap(), js);
        assert_eq!(spec(json!({"guided_json": schema})).unwrap(), js);
        let choice = Some(GrammarSpec::Choice(vec!["yes".into(), "no".into()]));
        assert_eq!(spec(json!({"guided_choice": ["yes", "no"]})).unwrap(), choice);
        assert_eq!(spec(json!({"structured_outputs": {"choice": ["yes", "no"]}})).unwrap(), choice);
        let regex = Some(GrammarSpec::Regex("[a-z]+".into()));
        assert_eq!(spec(json!({"guided_regex": "[a-z]+"})).unwrap(), regex);
        assert_eq!(
            spec(json!({"structured_outputs": {"regex": "[a-z]+", "disable_any_whitespace": true}})).unwrap(),
            regex
        );
        let grammar = Some(GrammarSpec::Grammar("root ::= \"a\"".into()));
        assert_eq!(spec(json!({"guided_grammar": "root ::= \"a\""})).unwrap(), grammar);
        assert_eq!(spec(json!({"structured_outputs": {"grammar": "root ::= \"a\""}})).unwrap(), grammar);
        assert_eq!(
            spec(json!({"structured_outputs": {"json_object": true}})).unwrap(),
            Some(GrammarSpec::JsonObject)
        );
    }

    #[test]
    fn conflicts_and_bad_shapes_name_the_field() {
        assert_eq!(refused_field(json!({"guided_regex": "a", "guided_choice": ["b"]})), "guided_choice");
        assert_eq!(
            refused_field(json!({"structured_outputs": {"regex": "a", "choice": ["b"]}})),
            "structured_outputs"
        );
        assert_eq!(refused_field(json!({"structured_outputs": {}})), "structured_outputs");
        assert_eq!(refused_field(json!({"structured_outputs": {"bogus": 1}})), "structured_outputs.bogus");
        assert_eq!(
            refused_field(json!({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}})),
            "structured_outputs.whitespace_pattern"
        );
        assert_eq!(refused_field(json!({"response_format": {"type": "xml"}})), "response_format.type");
        assert_eq!(
            refused_field(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})),
            "response_format.json_schema.schema"
        );
        assert_eq!(refused_field(json!({"guided_json": "{not json"})), "guided_json");
        assert_eq!(refused_field(json!({"guided_choice": []})), "guided_choice");
    }
}
