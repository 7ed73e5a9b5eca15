//! POST /tokenize and /detokenize (vLLM's): a prompt or a conversation to
//! the token ids the generation endpoints would run, and token ids back to
//! text. Both take the API key like /v1 (rendering a template is work).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Json, Response};
use axum::Extension;
use serde::{Deserialize, Serialize};

use crate::chat::{check_messages, tokenize_chat, ChatRender, ChatRenderFields};
use crate::endpoint::PromptWorkers;
use crate::error::ApiError;
use crate::extract::{parse_json, ApiJson};
use crate::params::PromptOptions;
use crate::protocol::{ChatMessageIn, RequestBody, SamplingFields, ToolDefinition};
use crate::state::AppState;

/// POST /tokenize: `prompt` (a string) or `messages` (a conversation, with
/// chat's template fields), not both.
#[derive(Clone, Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Default true for a prompt, false for messages (as the endpoints do).
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    pub tools: Option<Vec<ToolDefinition>>,
    pub documents: Option<Vec<serde_json::Map<String, serde_json::Value>>>,
    /// Also return each token's text.
    pub return_token_strs: Option<bool>,
}

impl RequestBody for TokenizeRequest {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        parse_json(bytes)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

/// POST /detokenize.
#[derive(Clone, Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

impl RequestBody for DetokenizeRequest {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        parse_json(bytes)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

pub async fn tokenize(
    State(state): State<AppState>,
    Extension(workers): Extension<Arc<PromptWorkers>>,
    body: Result<ApiJson<TokenizeRequest>, ApiError>,
) -> Response {
    match tokenize_request(state, workers, body).await {
        Ok(response) => Json(response).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn tokenize_request(
    state: AppState,
    workers: Arc<PromptWorkers>,
    body: Result<ApiJson<TokenizeRequest>, ApiError>,
) -> Result<TokenizeResponse, ApiError> {
    let ApiJson(request) = body?;
    state.check_model(request.model.as_deref())?;
    let engine = state.engine().clone();
    let max_model_len = engine.info().max_model_len;
    let fields = SamplingFields { add_special_tokens: request.add_special_tokens, ..Default::default() };
    let tokens = match (request.prompt, request.messages) {
        (Some(prompt), None) => {
            let options = PromptOptions::new(&fields, max_model_len, true)?;
            let tokenizer_engine = engine.clone();
            workers
                .run(prompt.len(), move |_| {
                    tokenizer_engine
                        .tokenizer()
                        .encode(&prompt, options.add_special_tokens)
                        .map_err(|e| ApiError::bad_request(Some("prompt"), e.to_string()))
                })
                .await?
        }
        (None, Some(messages)) => {
            check_messages(&messages)?;
            let options = PromptOptions::new(&fields, max_model_len, false)?;
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
            tokenize_chat(&engine, &workers, render, messages, options).await?
        }
        _ => {
            return Err(ApiError::bad_request(
                Some("prompt"),
                "give exactly one of `prompt` (a string) and `messages` (a conversation)",
            ))
        }
    };
    let token_strs = request.return_token_strs.unwrap_or(false).then(|| {
        let tokenizer = engine.tokenizer();
        tokens.iter().map(|&t| tokenizer.decode(&[t], false).unwrap_or_default()).collect()
    });
    Ok(TokenizeResponse { count: tokens.len(), max_model_len, tokens, token_strs })
}

pub async fn detokenize(
    State(state): State<AppState>,
    Extension(workers): Extension<Arc<PromptWorkers>>,
    body: Result<ApiJson<DetokenizeRequest>, ApiError>,
) -> Response {
    match detokenize_request(state, workers, body).await {
        Ok(response) => Json(response).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn detokenize_request(
    state: AppState,
    workers: Arc<PromptWorkers>,
    body: Result<ApiJson<DetokenizeRequest>, ApiError>,
) -> Result<DetokenizeResponse, ApiError> {
    let ApiJson(request) = body?;
    state.check_model(request.model.as_deref())?;
    let engine = state.engine().clone();
    let vocab_size = engine.info().vocab_size;
    if let Some((i, &t)) = request.tokens.iter().enumerate().find(|&(_, &t)| t as usize >= vocab_size) {
        return Err(ApiError::bad_request(
            Some(&format!("tokens[{i}]")),
            format!("token id {t} is outside the vocabulary (size {vocab_size})"),
        ));
    }
    let input_bytes = request.tokens.len() * std::mem::size_of::<u32>();
    let tokens = request.tokens;
    let prompt = workers
        .run(input_bytes, move |_| {
            engine
                .tokenizer()
                .decode(&tokens, false)
                .map_err(|e| ApiError::bad_request(Some("tokens"), e.to_string()))
        })
        .await?;
    Ok(DetokenizeResponse { prompt })
}
