//! Errors: [`ApiError`] is what a client sees (OpenAI's JSON error shape with
//! the matching HTTP status); [`ServeError`] is what stops the server itself.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pagoda_engine::{EngineError, StreamError, SubmitError};
use serde::Serialize;
use thiserror::Error;

/// A failed API request, rendered as
/// `{"error": {"message", "type", "param", "code"}}` with `status`.
#[derive(Clone, Debug, Error, PartialEq)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's error `type` (`invalid_request_error`, `server_error`...).
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// 400: the request is malformed or a value is out of range.
    pub fn bad_request(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: param.map(|_| "invalid_value"),
        }
    }

    /// 400 for a body that is not JSON at all.
    pub fn malformed_json(message: impl Into<String>) -> Self {
        Self { code: Some("invalid_json"), ..Self::bad_request(None, message) }
    }

    /// 401: missing or wrong API key.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Invalid or missing API key: send it as `Authorization: Bearer <key>`.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 404 for a `model` the server does not serve.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 404 for something a request names that the server does not have
    /// (a LoRA adapter to unload, an adapter folder to load).
    pub fn not_found(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: Some("not_found"),
        }
    }

    /// 404 for a path the server has no route for.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("Unknown endpoint: {method} {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// 405 for a known path called with the wrong method.
    pub fn method_not_allowed() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: "Method not allowed for this endpoint.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed"),
        }
    }

    /// 413 for a body over the size limit.
    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("payload_too_large"),
        }
    }

    /// 429: the pending work is at a limit (sent with `Retry-After`).
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    /// 503: the server is shutting down.
    pub fn shutting_down() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "The server is shutting down.".into(),
            kind: "server_error",
            param: None,
            code: Some("service_unavailable"),
        }
    }

    /// 500: the engine failed while serving the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("internal_error"),
        }
    }

    /// Logs a rejected or failed request (in the request's span): client
    /// errors at info, server errors at error.
    pub fn log(&self) {
        let status = self.status.as_u16();
        if self.status.is_server_error() {
            tracing::error!(status, error = %self.message, "request failed");
        } else {
            let param = self.param.as_deref().unwrap_or("");
            tracing::info!(status, error = %self.message, param, "request rejected");
        }
    }

    /// The JSON body, also sent as an SSE event when a stream fails midway.
    pub fn to_json(&self) -> String {
        let body = ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        // Plain strings and options cannot fail to serialize.
        serde_json::to_string(&body).unwrap_or_else(|_| String::from(r#"{"error":{"message":"error"}}"#))
    }
}

/// Seconds a client told 429 waits before retrying (`Retry-After`): pending
/// work ends at the pace of token steps, so a second is enough to find room
/// without a client hammering the server.
pub const RETRY_AFTER_SECS: u64 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.to_json();
        let mut response =
            (self.status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, RETRY_AFTER_SECS.into());
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest { param, message } => ApiError::bad_request(param, message),
            // The request's adapter (named by its `model`) does not load or fit.
            EngineError::Lora(message) => ApiError::bad_request(Some("model"), format!("LoRA: {message}")),
            // Ids are the server's own unless the client chose one (`request_id`).
            EngineError::DuplicateRequest(id) => ApiError::bad_request(
                Some("request_id"),
                format!("the request id {id} is already in use by a live request"),
            ),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Overloaded { .. } => ApiError::overloaded(e.to_string()),
            SubmitError::ShuttingDown => ApiError::shutting_down(),
            SubmitError::Invalid(inner) => inner.into(),
        }
    }
}

impl From<StreamError> for ApiError {
    fn from(e: StreamError) -> Self {
        ApiError::internal(e.0)
    }
}

/// Why the server could not run.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("--chat-template: {0}")]
    ChatTemplate(String),
    /// A `--lora-modules` adapter could not be served (the message names it and why).
    #[error("--lora-modules: {0}")]
    Lora(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_openai_shape() {
        let e = ApiError::bad_request(Some("temperature"), "must be non-negative");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["message"], "must be non-negative");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "temperature");
        assert_eq!(v["error"]["code"], "invalid_value");
        let v: serde_json::Value = serde_json::from_str(&ApiError::internal("boom").to_json()).unwrap();
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn submit_errors_map_to_statuses() {
        let busy = SubmitError::Overloaded {
            what: "requests",
            flag: "--max-pending-requests",
            in_use: 3,
            needed: 1,
            limit: 3,
        };
        let e = ApiError::from(busy);
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            e.message.contains("--max-pending-requests") && e.message.contains("retry later"),
            "{}",
            e.message
        );
        let response = e.into_response();
        assert_eq!(response.headers()[axum::http::header::RETRY_AFTER], "1");
        assert_eq!(ApiError::from(SubmitError::ShuttingDown).status, StatusCode::SERVICE_UNAVAILABLE);
        let invalid = SubmitError::Invalid(EngineError::invalid(Some("n"), "n must be in 1..=4"));
        let e = ApiError::from(invalid);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("n"));
        let lora =
            ApiError::from(SubmitError::Invalid(EngineError::Lora("adapter \"sql\": no such file".into())));
        assert_eq!((lora.status, lora.param.as_deref()), (StatusCode::BAD_REQUEST, Some("model")));
        assert!(lora.message.contains("\"sql\": no such file"), "{}", lora.message);
        let internal = ApiError::from(SubmitError::Invalid(EngineError::Internal("bug".into())));
        assert_eq!(internal.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
