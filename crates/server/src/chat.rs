//! POST /v1/chat/completions: the conversation goes through the model's own
//! chat template, then runs as one engine request with `n` samples.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Json, Response};
use axum::Extension;
use pagoda_engine::{AsyncEngine, RequestOutput};
use pagoda_models::{cut_after_final_message, ChatTemplate};
use serde_json::Value;

use crate::endpoint::{log_finished, run_endpoint, PromptWorkers};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::logprobs::TokenTexts;
use crate::params::{
    bad_words, check_max_logprobs, generation_request, stream_mode, PromptOptions, MAX_TOP_LOGPROBS,
};
use crate::protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatDelta, ChatLogprobs, ChatMessageIn, ChatMessageOut, MessageContent, StopReasonOut, ToolChoice,
    ToolDefinition, Usage, UsageField,
};
use crate::state::{unix_now, AppState};
use crate::streaming::{self, to_json, ChunkWriter, StreamUsage};

pub async fn create_chat_completion(
    State(state): State<AppState>,
    Extension(workers): Extension<Arc<PromptWorkers>>,
    body: Result<ApiJson<ChatCompletionRequest>, ApiError>,
) -> Response {
    run_endpoint(state, body, "chatcmpl", "chat", move |state, request, id, started| {
        chat(state, workers, request, id, started)
    })
    .await
}

/// Checks the conversation before anything is rendered: at least one
/// message, each with a role, text-only content, and the fields templates
/// read (`name`, `tool_call_id`, `tool_calls`) in OpenAI's shapes.
pub fn check_messages(messages: &[ChatMessageIn]) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(Some("messages"), "messages must not be empty"));
    }
    for (i, message) in messages.iter().enumerate() {
        let field = |name: &str| format!("messages[{i}].{name}");
        if message.role.is_empty() {
            return Err(ApiError::bad_request(Some(&field("role")), "role must not be empty"));
        }
        if let Some(MessageContent::Parts(parts)) = &message.content {
            for part in parts {
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(_)) => {}
                    ("text", None) => {
                        return Err(ApiError::bad_request(
                            Some(&field("content")),
                            "a text content part needs a `text` field",
                        ))
                    }
                    (other, _) => {
                        return Err(ApiError::bad_request(
                            Some(&field("content")),
                            format!("content parts of type `{other}` are not supported (text only)"),
                        ))
                    }
                }
            }
        }
        for name in ["name", "tool_call_id"] {
            if message.extra.get(name).is_some_and(|v| !v.is_string() && !v.is_null()) {
                return Err(ApiError::bad_request(Some(&field(name)), format!("{name} must be a string")));
            }
        }
        match message.extra.get("tool_calls") {
            None | Some(Value::Null) => {}
            Some(Value::Array(calls)) => {
                for (j, call) in calls.iter().enumerate() {
                    check_tool_call(call).map_err(|(path, message)| {
                        ApiError::bad_request(Some(&field(&format!("tool_calls[{j}]{path}"))), message)
                    })?;
                }
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    Some(&field("tool_calls")),
                    "tool_calls must be an array of tool calls",
                ))
            }
        }
    }
    Ok(())
}

/// One of an assistant message's `tool_calls`: `{"id", "type": "function",
/// "function": {"name", "arguments"}}` (id and type optional). The error
/// names the sub-field at fault.
fn check_tool_call(call: &Value) -> Result<(), (&'static str, &'static str)> {
    let object = call.as_object().ok_or(("", "a tool call must be an object"))?;
    if object.get("id").is_some_and(|v| !v.is_string()) {
        return Err((".id", "id must be a string"));
    }
    if object.get("type").is_some_and(|v| v.as_str() != Some("function")) {
        return Err((".type", "type must be \"function\""));
    }
    let function = object
        .get("function")
        .and_then(Value::as_object)
        .ok_or((".function", "function must be an object with a `name` and `arguments`"))?;
    if !function.get("name").is_some_and(Value::is_string) {
        return Err((".function.name", "name must be a string"));
    }
    if !function.get("arguments").is_some_and(Value::is_string) {
        return Err((".function.arguments", "arguments must be a string (of JSON)"));
    }
    Ok(())
}

/// `tools` must name each function once; `tool_choice` may only ask for a
/// tool call when there are tools, and only for a function among them.
fn check_tools(tools: Option<&[ToolDefinition]>, tool_choice: Option<&ToolChoice>) -> Result<(), ApiError> {
    let tools = tools.unwrap_or_default();
    let mut names = std::collections::HashSet::new();
    for (i, tool) in tools.iter().enumerate() {
        let name = &tool.function.name;
        if name.is_empty() {
            return Err(ApiError::bad_request(
                Some(&format!("tools[{i}].function.name")),
                "a function name must not be empty",
            ));
        }
        if !names.insert(name.as_str()) {
            return Err(ApiError::bad_request(
                Some(&format!("tools[{i}].function.name")),
                format!("the function `{name}` is defined twice"),
            ));
        }
    }
    match tool_choice {
        Some(ToolChoice::Required) if tools.is_empty() => Err(ApiError::bad_request(
            Some("tool_choice"),
            "tool_choice \"required\" needs at least one tool in `tools`",
        )),
        Some(ToolChoice::Function(name)) if !names.contains(name.as_str()) => Err(ApiError::bad_request(
            Some("tool_choice"),
            format!("tool_choice names the function `{name}`, which is not in `tools`"),
        )),
        _ => Ok(()),
    }
}

/// The messages as the template sees them: content parts joined into one
/// string (text parts only), other fields passed through. Expects messages
/// that passed [`check_messages`].
fn template_messages(messages: Vec<ChatMessageIn>) -> Value {
    let out = messages
        .into_iter()
        .map(|message| {
            let content = message.content.map(MessageContent::into_text).unwrap_or_default();
            let mut object = message.extra;
            if let Some(calls) = object.get_mut("tool_calls") {
                crate::tools::template_tool_calls(calls);
            }
            object.insert("role".into(), Value::String(message.role));
            object.insert("content".into(), Value::String(content));
            Value::Object(object)
        })
        .collect();
    Value::Array(out)
}

/// Bytes of text in the conversation (what rendering and tokenizing cost).
fn message_bytes(messages: &[ChatMessageIn]) -> usize {
    messages
        .iter()
        .map(|m| match &m.content {
            None => 0,
            Some(MessageContent::Text(text)) => text.len(),
            Some(MessageContent::Parts(parts)) => {
                parts.iter().filter_map(|p| p.text.as_ref()).map(String::len).sum()
            }
        })
        .sum()
}

/// vLLM's chat `echo`: the content of the last message when it has the
/// role of the reply (the assistant's when a generation prompt is added,
/// else the last message's own, as vLLM decides the role), for the reply to
/// start with.
fn echoed_message(request: &ChatCompletionRequest) -> Option<String> {
    if request.echo != Some(true) {
        return None;
    }
    let last = request.messages.last()?;
    let continue_final_message = request.continue_final_message.unwrap_or(false);
    let add_generation_prompt = request.add_generation_prompt.unwrap_or(!continue_final_message);
    if add_generation_prompt && last.role != "assistant" {
        return None;
    }
    Some(last.content.clone().map(MessageContent::into_text).unwrap_or_default())
}

/// A request's fields that decide how its conversation is rendered.
pub struct ChatRenderFields {
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    pub tools: Option<Vec<ToolDefinition>>,
    pub documents: Option<Vec<serde_json::Map<String, Value>>>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
}

/// How a conversation becomes prompt text: the template (the request's own,
/// when the server trusts request templates, else the server's), its extra
/// variables, and whether the prompt opens the assistant's turn or
/// continues the final message.
pub struct ChatRender {
    template: Arc<ChatTemplate>,
    extra: serde_json::Map<String, Value>,
    add_generation_prompt: bool,
    continue_final_message: bool,
}

impl ChatRender {
    pub fn new(state: &AppState, fields: ChatRenderFields) -> Result<Self, ApiError> {
        let continue_final_message = fields.continue_final_message.unwrap_or(false);
        // Continuing implies no generation prompt unless the client asked for both.
        let add_generation_prompt = fields.add_generation_prompt.unwrap_or(!continue_final_message);
        if continue_final_message && add_generation_prompt {
            return Err(ApiError::bad_request(
                Some("continue_final_message"),
                "continue_final_message and add_generation_prompt cannot both be true",
            ));
        }
        let template = match fields.chat_template {
            Some(source) => {
                if !state.config().trust_request_chat_template {
                    return Err(ApiError::bad_request(
                        Some("chat_template"),
                        "this server does not run chat templates sent with requests (start it with \
                         --trust-request-chat-template to allow them)",
                    ));
                }
                let compiled = match state.chat_template() {
                    Some(model) => model.with_source(&source),
                    None => ChatTemplate::new(&source, None, None),
                };
                Arc::new(compiled.map_err(|e| ApiError::bad_request(Some("chat_template"), e.to_string()))?)
            }
            None => state.chat_template().cloned().ok_or_else(|| {
                ApiError::bad_request(None, "this model has no chat template; use /v1/completions")
            })?,
        };
        let mut extra = fields.chat_template_kwargs.unwrap_or_default();
        if let Some(tools) = &fields.tools {
            let tools = serde_json::to_value(tools).map_err(|e| ApiError::internal(e.to_string()))?;
            extra.insert("tools".into(), tools);
        }
        if let Some(documents) = fields.documents {
            let documents = documents.into_iter().map(Value::Object).collect();
            extra.insert("documents".into(), Value::Array(documents));
        }
        Ok(Self { template, extra, add_generation_prompt, continue_final_message })
    }

    /// The prompt text of `messages` (checked by [`check_messages`]).
    pub fn render(&self, messages: Vec<ChatMessageIn>) -> Result<String, ApiError> {
        let messages = template_messages(messages);
        let rendered = self
            .template
            .render_json(&messages, self.add_generation_prompt, &self.extra)
            .map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))?;
        if !self.continue_final_message {
            return Ok(rendered);
        }
        let final_content = messages
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        cut_after_final_message(&rendered, final_content)
            .map_err(|e| ApiError::bad_request(Some("continue_final_message"), e.to_string()))
    }
}

/// Renders and tokenizes a conversation on a prompt worker: the prompt's
/// token ids, truncated as `options` asks, refused when the text alone
/// proves it cannot fit (unless it is to be truncated).
pub async fn tokenize_chat(
    engine: &Arc<AsyncEngine>,
    workers: &Arc<PromptWorkers>,
    render: ChatRender,
    messages: Vec<ChatMessageIn>,
    options: PromptOptions,
) -> Result<Vec<u32>, ApiError> {
    let input_bytes = message_bytes(&messages);
    let engine = engine.clone();
    let prompt_workers = workers.clone();
    workers
        .run(input_bytes, move |_| {
            let prompt = render.render(messages)?;
            if options.truncate_to.is_none() {
                prompt_workers.check_text_fits(&prompt, engine.info().max_model_len, "messages")?;
            }
            // The template writes the special tokens itself (BOS included, if
            // the model uses one); add_special_tokens adds them again.
            let mut ids = engine
                .tokenizer()
                .encode(&prompt, options.add_special_tokens)
                .map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))?;
            options.truncate(&mut ids);
            Ok(ids)
        })
        .await
}

async fn chat(
    state: AppState,
    workers: Arc<PromptWorkers>,
    request: ChatCompletionRequest,
    request_id: String,
    started: Instant,
) -> Result<Response, ApiError> {
    let lora = state.resolve_model(request.model.as_deref())?;
    let want_logprobs = request.logprobs.unwrap_or(false);
    let max_logprobs = state.config().max_logprobs;
    check_max_logprobs("top_logprobs", request.top_logprobs.map(|k| k as usize), max_logprobs)?;
    check_max_logprobs("prompt_logprobs", request.sampling.prompt_logprobs, max_logprobs)?;
    if let (Some(best_of), n) = (request.sampling.best_of, request.sampling.n.unwrap_or(1)) {
        if best_of > n {
            return Err(ApiError::bad_request(
                Some("best_of"),
                format!("best_of must equal n in chat completions (best_of {best_of}, n {n}), as in vLLM"),
            ));
        }
    }
    if let Some(k) = request.top_logprobs {
        if !want_logprobs {
            return Err(ApiError::bad_request(
                Some("top_logprobs"),
                "top_logprobs requires logprobs to be true",
            ));
        }
        if k > MAX_TOP_LOGPROBS {
            return Err(ApiError::bad_request(
                Some("top_logprobs"),
                format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {k}"),
            ));
        }
    }
    check_messages(&request.messages)?;
    let echo_prefix = echoed_message(&request);
    check_tools(request.tools.as_deref(), request.tool_choice.as_ref())?;
    let functions = crate::tools::functions(request.tools.as_deref());
    pagoda_tool_calls::validate_functions(&functions)
        .map_err(|e| ApiError::bad_request(Some("tools"), e.to_string()))?;
    let tool_mode = crate::tools::tool_mode(
        state.config(),
        request.tools.as_deref(),
        request.tool_choice.as_ref(),
        request.parallel_tool_calls,
    )?;
    let mut grammar = crate::structured::requested_grammar(&request.sampling)?;
    if let Some(tool_grammar) = tool_mode.grammar(&functions) {
        if let Some(other) = &grammar {
            return Err(ApiError::bad_request(
                Some("tool_choice"),
                format!(
                    "a required or named tool_choice constrains the output itself; it cannot be combined with {}",
                    other.field
                ),
            ));
        }
        grammar = Some(tool_grammar);
    }
    let engine = state.engine();
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let logprobs = want_logprobs.then(|| request.top_logprobs.unwrap_or(0));
    // Cheap checks first: a refused request costs no rendering or tokenization.
    let mut req = generation_request(&request.sampling, engine.info(), max_tokens, logprobs)?;
    req.sampling.bad_words =
        bad_words(engine.tokenizer(), request.sampling.bad_words.as_deref().unwrap_or_default())?;
    req.cache_salt = state.cache_salt(request.sampling.cache_salt.as_deref())?;
    let max_model_len = engine.info().max_model_len;
    let options = PromptOptions::new(&request.sampling, max_model_len, false)?;
    let render = ChatRender::new(
        &state,
        ChatRenderFields {
            chat_template: request.chat_template,
            chat_template_kwargs: request.chat_template_kwargs,
            tools: request.tools,
            documents: request.documents,
            add_generation_prompt: request.add_generation_prompt,
            continue_final_message: request.continue_final_message,
        },
    )?;
    if matches!(tool_mode, crate::tools::ToolMode::Auto { .. })
        && request.sampling.skip_special_tokens.is_none()
    {
        // Some formats mark calls with special tokens (`[TOOL_CALLS]`): the parser must see them (vLLM too).
        req.skip_special_tokens = false;
    }
    if let Some(grammar) = grammar {
        req.constraint = Some(crate::structured::compile_on_worker(&state, &workers, grammar).await?);
    }
    let prompt_ids = tokenize_chat(engine, &workers, render, request.messages, options).await?;

    let n = req.n;
    let mode = stream_mode(&request.sampling);
    let stream = mode.stream;
    let prompt_tokens = prompt_ids.len();
    req.request_id = request_id.clone();
    req.prompt_token_ids = prompt_ids;
    req.fairness_group = Some(pagoda_engine::fairness_group(&request_id));
    req.lora = lora.clone();
    let _adapter = crate::lora::hold_adapter(&state, lora.as_ref()).await?;
    let request_stream = engine.submit(req).map_err(|e| {
        let mut e = ApiError::from(e);
        // The engine names the prompt; here the prompt is the conversation.
        if e.param.as_deref() == Some("prompt") {
            e.param = Some("messages".into());
        }
        e
    })?;
    tracing::info!(
        prompt_tokens,
        n,
        max_tokens,
        stream,
        lora = lora.as_ref().map(|l| l.name.as_str()),
        "request accepted"
    );

    let model = state.response_model(lora.as_ref());
    let created = unix_now();
    let as_token_ids = request.sampling.return_tokens_as_token_ids.unwrap_or(false);
    if stream {
        let writer = ChatChunks {
            id: request_id,
            created,
            model,
            n,
            want_logprobs,
            as_token_ids,
            engine: engine.clone(),
            usage: StreamUsage::new(mode, prompt_tokens),
            tool_streams: (0..n).map(|_| tool_mode.stream()).collect(),
            echo_prefix: echo_prefix.clone(),
        };
        return Ok(streaming::sse_response(streaming::merge(vec![request_stream]), writer, started));
    }

    let done = streaming::collect(vec![request_stream], n).await?;
    let texts = TokenTexts::new(engine.tokenizer(), as_token_ids);
    let mut choices = Vec::with_capacity(n);
    let mut completion_tokens = 0;
    let mut prompt_logprobs = None;
    for request_done in done {
        completion_tokens += request_done.num_generated_tokens();
        prompt_logprobs = request_done.prompt_logprobs.as_deref().map(|lp| texts.prompt_logprobs(lp));
        for seq in request_done.seqs {
            let (mut content, tool_calls, finish_reason) =
                tool_mode.finish_message(seq.text, seq.finish_reason.map(|r| r.as_str()));
            if let Some(prefix) = &echo_prefix {
                content = Some(format!("{prefix}{}", content.unwrap_or_default()));
            }
            choices.push(ChatChoice {
                index: seq.index,
                message: ChatMessageOut { role: "assistant", content, tool_calls },
                logprobs: want_logprobs.then(|| ChatLogprobs { content: texts.chat(&seq.logprobs) }),
                finish_reason,
                stop_reason: StopReasonOut::from_engine(&seq.stop_reason),
            });
        }
    }
    log_finished(prompt_tokens, completion_tokens, started);
    let response = ChatCompletionResponse {
        id: request_id,
        object: "chat.completion",
        created,
        model,
        choices,
        usage: Usage::new(prompt_tokens, completion_tokens),
        prompt_logprobs,
    };
    Ok(Json(response).into_response())
}

/// The SSE chunks of a streamed chat completion: first a role chunk per
/// choice, then content deltas, the last with its `finish_reason`.
struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    n: usize,
    want_logprobs: bool,
    /// Logprobs name tokens by id (`return_tokens_as_token_ids`).
    as_token_ids: bool,
    engine: Arc<AsyncEngine>,
    usage: StreamUsage,
    /// Per choice, its tool-call parser (`None` when tool calls are off).
    tool_streams: Vec<Option<crate::tools::ToolStream>>,
    /// `echo`: the text the first chunk of each choice carries.
    echo_prefix: Option<String>,
}

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: UsageField) -> String {
        to_json(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }
}

impl ChunkWriter for ChatChunks {
    fn start(&mut self) -> Vec<String> {
        (0..self.n)
            .map(|index| {
                let choice = ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: Some("assistant"),
                        content: Some(self.echo_prefix.clone().unwrap_or_default()),
                        tool_calls: Vec::new(),
                    },
                    logprobs: None,
                    finish_reason: None,
                    stop_reason: None,
                };
                self.chunk(vec![choice], self.usage.pending())
            })
            .collect()
    }

    fn output(&mut self, _prompt: usize, out: RequestOutput) -> Vec<String> {
        let mut chunks = Vec::with_capacity(out.deltas.len());
        for delta in out.deltas {
            self.usage.completion_tokens += delta.token_ids.len();
            let logprobs = (self.want_logprobs && !delta.logprobs.is_empty()).then(|| ChatLogprobs {
                content: TokenTexts::new(self.engine.tokenizer(), self.as_token_ids).chat(&delta.logprobs),
            });
            let mut finish_reason = delta.finish_reason.map(|r| r.as_str());
            let (text, tool_calls) = match self.tool_streams.get_mut(delta.index).and_then(Option::as_mut) {
                None => (delta.text, Vec::new()),
                Some(tools) => {
                    let mut piece = tools.push(&delta.text);
                    if finish_reason.is_some() {
                        let last = tools.finish();
                        piece.content.push_str(&last.content);
                        piece.tool_calls.extend(last.tool_calls);
                        finish_reason = tools.finish_reason(finish_reason);
                    }
                    (piece.content, piece.tool_calls)
                }
            };
            if text.is_empty() && tool_calls.is_empty() && logprobs.is_none() && finish_reason.is_none() {
                continue;
            }
            let content =
                (!text.is_empty() || (tool_calls.is_empty() && finish_reason.is_none())).then_some(text);
            let choice = ChatChunkChoice {
                index: delta.index,
                delta: ChatDelta { role: None, content, tool_calls },
                logprobs,
                finish_reason,
                stop_reason: StopReasonOut::from_engine(&delta.stop_reason),
            };
            chunks.push(self.chunk(vec![choice], self.usage.pending()));
        }
        chunks
    }

    fn end(&mut self) -> Vec<String> {
        self.usage.last().map(|usage| self.chunk(Vec::new(), usage)).into_iter().collect()
    }

    fn usage(&self) -> (usize, usize) {
        self.usage.counts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ContentPart, FunctionDefinition, ToolKind};
    use serde_json::json;

    fn message(role: &str, content: Option<MessageContent>) -> ChatMessageIn {
        ChatMessageIn { role: role.into(), content, extra: serde_json::Map::new() }
    }

    fn with_extra(mut m: ChatMessageIn, key: &str, value: Value) -> ChatMessageIn {
        m.extra.insert(key.into(), value);
        m
    }

    #[test]
    fn content_parts_join_with_newlines() {
        let parts = vec![
            ContentPart { kind: "text".into(), text: Some("a".into()) },
            ContentPart { kind: "text".into(), text: Some("b".into()) },
        ];
        let messages = vec![
            message("system", Some(MessageContent::Text("s".into()))),
            message("user", Some(MessageContent::Parts(parts))),
            message("assistant", None),
        ];
        check_messages(&messages).unwrap();
        assert_eq!(message_bytes(&messages), 3);
        let v = template_messages(messages);
        assert_eq!(v[0]["content"], "s");
        assert_eq!(v[1]["content"], "a\nb");
        assert_eq!(v[2]["content"], "");
        assert_eq!(v[1]["role"], "user");
    }

    #[test]
    fn non_text_parts_and_empty_conversations_are_rejected() {
        let image = vec![ContentPart { kind: "image_url".into(), text: None }];
        let e = check_messages(&[message("user", Some(MessageContent::Parts(image)))]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        assert_eq!(check_messages(&[]).unwrap_err().param.as_deref(), Some("messages"));
    }

    #[test]
    fn malformed_message_fields_name_the_field() {
        let user = || message("user", Some(MessageContent::Text("hi".into())));
        let call = |function: Value| json!([{"id": "c1", "type": "function", "function": function}]);
        let cases = [
            (message("", None), "messages[0].role"),
            (with_extra(user(), "name", json!(5)), "messages[0].name"),
            (with_extra(user(), "tool_call_id", json!([])), "messages[0].tool_call_id"),
            (with_extra(user(), "tool_calls", json!("x")), "messages[0].tool_calls"),
            (with_extra(user(), "tool_calls", json!([1])), "messages[0].tool_calls[0]"),
            (
                with_extra(user(), "tool_calls", call(json!({"name": 1}))),
                "messages[0].tool_calls[0].function.name",
            ),
            (
                with_extra(user(), "tool_calls", call(json!({"name": "f", "arguments": {}}))),
                "messages[0].tool_calls[0].function.arguments",
            ),
        ];
        for (m, param) in cases {
            let e = check_messages(std::slice::from_ref(&m)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{m:?}");
        }
        let fine = with_extra(user(), "tool_calls", call(json!({"name": "f", "arguments": "{}"})));
        check_messages(&[with_extra(fine, "name", json!("bob"))]).unwrap();
    }

    #[test]
    fn tool_choice_must_name_a_defined_tool() {
        let tool = |name: &str| ToolDefinition {
            kind: ToolKind::Function,
            function: FunctionDefinition {
                name: name.into(),
                description: None,
                parameters: None,
                strict: None,
            },
        };
        let tools = [tool("get_weather")];
        let named = |n: &str| ToolChoice::Function(n.into());
        check_tools(Some(&tools), Some(&named("get_weather"))).unwrap();
        check_tools(Some(&tools), Some(&ToolChoice::Required)).unwrap();
        check_tools(None, Some(&ToolChoice::Auto)).unwrap();
        check_tools(None, Some(&ToolChoice::None)).unwrap();
        for (tools, choice) in
            [(&tools[..], named("other")), (&[][..], named("get_weather")), (&[][..], ToolChoice::Required)]
        {
            let e = check_tools(Some(tools), Some(&choice)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("tool_choice"));
        }
        let e = check_tools(Some(&[tool("f"), tool("f")]), None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[1].function.name"));
        let e = check_tools(Some(&[tool("")]), None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].function.name"));
    }
}
