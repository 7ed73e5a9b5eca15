//! POST /v1/chat/completions: the conversation goes through the model's own
//! chat template, then runs as one engine request with `n` samples.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Json, Response};
use pagoda_engine::{AsyncEngine, RequestOutput};
use serde_json::Value;

use crate::endpoint::{log_finished, run_endpoint};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::logprobs::TokenTexts;
use crate::params::{generation_request, stream_mode, MAX_TOP_LOGPROBS};
use crate::protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatDelta, ChatLogprobs, ChatMessageIn, ChatMessageOut, MessageContent, StopReasonOut, Usage, UsageField,
};
use crate::state::{unix_now, AppState};
use crate::streaming::{self, to_json, ChunkWriter, StreamUsage};

pub async fn create_chat_completion(
    State(state): State<AppState>,
    body: Result<ApiJson<ChatCompletionRequest>, ApiError>,
) -> Response {
    run_endpoint(state, body, "chatcmpl", "chat", chat).await
}

/// The messages as the template sees them: content parts joined into one
/// string (text parts only), other fields passed through.
fn template_messages(messages: &[ChatMessageIn]) -> Result<Value, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(Some("messages"), "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let content = match &message.content {
            None => String::new(),
            Some(MessageContent::Text(text)) => text.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(text)) => texts.push(text.as_str()),
                        ("text", None) => {
                            return Err(ApiError::bad_request(
                                Some(&format!("messages[{i}].content")),
                                "a text content part needs a `text` field",
                            ))
                        }
                        (other, _) => {
                            return Err(ApiError::bad_request(
                                Some(&format!("messages[{i}].content")),
                                format!("content parts of type `{other}` are not supported (text only)"),
                            ))
                        }
                    }
                }
                texts.join("\n")
            }
        };
        let mut object = message.extra.clone();
        object.insert("role".into(), Value::String(message.role.clone()));
        object.insert("content".into(), Value::String(content));
        out.push(Value::Object(object));
    }
    Ok(Value::Array(out))
}

async fn chat(
    state: AppState,
    request: ChatCompletionRequest,
    request_id: String,
    started: Instant,
) -> Result<Response, ApiError> {
    state.check_model(request.model.as_deref())?;
    if let Some(format) = request.response_format.as_ref().filter(|f| f.kind != "text") {
        return Err(ApiError::bad_request(
            Some("response_format"),
            format!("response_format `{}` is not supported", format.kind),
        ));
    }
    let want_logprobs = request.logprobs.unwrap_or(false);
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
    let engine = state.engine();
    let template = engine
        .chat_template()
        .ok_or_else(|| ApiError::bad_request(None, "this model has no chat template; use /v1/completions"))?;
    let messages = template_messages(&request.messages)?;
    let mut extra = request.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(tools) = &request.tools {
        extra.insert("tools".into(), Value::Array(tools.clone()));
    }
    let add_generation_prompt = request.add_generation_prompt.unwrap_or(true);
    let prompt = template
        .render_json(&messages, add_generation_prompt, &extra)
        .map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))?;
    // The template writes the special tokens itself (BOS included, if the model uses one).
    let prompt_ids = engine
        .tokenizer()
        .encode(&prompt, false)
        .map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))?;

    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let logprobs = want_logprobs.then(|| request.top_logprobs.unwrap_or(0));
    let mut req = generation_request(&request.sampling, engine.info(), max_tokens, logprobs)?;
    let n = req.n;
    let (stream, include_usage) = stream_mode(&request.sampling);
    let prompt_tokens = prompt_ids.len();
    req.request_id = request_id.clone();
    req.prompt_token_ids = prompt_ids;
    req.fairness_group = Some(pagoda_engine::fairness_group(&request_id));
    let request_stream = engine.submit(req).map_err(|e| {
        let mut e = ApiError::from(e);
        // The engine names the prompt; here the prompt is the conversation.
        if e.param.as_deref() == Some("prompt") {
            e.param = Some("messages".into());
        }
        e
    })?;
    tracing::info!(prompt_tokens, n, max_tokens, stream, "request accepted");

    let model = state.config().model_name().to_string();
    let created = unix_now();
    if stream {
        let writer = ChatChunks {
            id: request_id,
            created,
            model,
            n,
            want_logprobs,
            engine: engine.clone(),
            usage: StreamUsage::new(include_usage, prompt_tokens),
        };
        return Ok(streaming::sse_response(streaming::merge(vec![request_stream]), writer, started));
    }

    let done = streaming::collect(vec![request_stream], n).await?;
    let texts = TokenTexts::new(engine.tokenizer());
    let mut choices = Vec::with_capacity(n);
    let mut completion_tokens = 0;
    for request_done in done {
        completion_tokens += request_done.num_generated_tokens();
        for seq in request_done.seqs {
            choices.push(ChatChoice {
                index: seq.index,
                message: ChatMessageOut { role: "assistant", content: seq.text },
                logprobs: want_logprobs.then(|| ChatLogprobs { content: texts.chat(&seq.logprobs) }),
                finish_reason: seq.finish_reason.map(|r| r.as_str()),
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
    engine: Arc<AsyncEngine>,
    usage: StreamUsage,
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
                    delta: ChatDelta { role: Some("assistant"), content: Some(String::new()) },
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
                content: TokenTexts::new(self.engine.tokenizer()).chat(&delta.logprobs),
            });
            if delta.text.is_empty() && logprobs.is_none() && delta.finish_reason.is_none() {
                continue;
            }
            let content = (!delta.text.is_empty() || delta.finish_reason.is_none()).then_some(delta.text);
            let choice = ChatChunkChoice {
                index: delta.index,
                delta: ChatDelta { role: None, content },
                logprobs,
                finish_reason: delta.finish_reason.map(|r| r.as_str()),
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
    use crate::protocol::ContentPart;

    fn message(role: &str, content: Option<MessageContent>) -> ChatMessageIn {
        ChatMessageIn { role: role.into(), content, extra: serde_json::Map::new() }
    }

    #[test]
    fn content_parts_join_with_newlines() {
        let parts = vec![
            ContentPart { kind: "text".into(), text: Some("a".into()) },
            ContentPart { kind: "text".into(), text: Some("b".into()) },
        ];
        let v = template_messages(&[
            message("system", Some(MessageContent::Text("s".into()))),
            message("user", Some(MessageContent::Parts(parts))),
            message("assistant", None),
        ])
        .unwrap();
        assert_eq!(v[0]["content"], "s");
        assert_eq!(v[1]["content"], "a\nb");
        assert_eq!(v[2]["content"], "");
        assert_eq!(v[1]["role"], "user");
    }

    #[test]
    fn non_text_parts_and_empty_conversations_are_rejected() {
        let image = vec![ContentPart { kind: "image_url".into(), text: None }];
        let e = template_messages(&[message("user", Some(MessageContent::Parts(image)))]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        assert_eq!(template_messages(&[]).unwrap_err().param.as_deref(), Some("messages"));
    }
}
