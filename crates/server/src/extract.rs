//! The JSON body extractor of the API: unlike axum's `Json`, every failure is
//! a 400 in OpenAI's error shape naming the field at fault, and the
//! `Content-Type` header is not required (curl users often leave it out).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::protocol::RequestBody;

/// A request body parsed as JSON into `T`. Unknown fields are ignored (as
/// the request types declare no `deny_unknown_fields`).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: RequestBody> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(body_error)?;
        T::parse(&bytes).map(ApiJson)
    }
}

/// Parses `bytes` into `T`, classifying the failure as malformed JSON or a
/// wrong value of a named field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            return ApiError::malformed_json(format!("The request body is not valid JSON: {inner}"));
        }
        let param = field_of(&path, &inner.to_string());
        let message = match &param {
            Some(p) => format!("Invalid value for `{p}`: {}", strip_position(&inner.to_string())),
            None => format!("Invalid request body: {}", strip_position(&inner.to_string())),
        };
        ApiError::bad_request(param.as_deref(), message)
    })?;
    de.end().map_err(|e| ApiError::malformed_json(format!("The request body is not valid JSON: {e}")))?;
    Ok(value)
}

/// The field a data error is about: the path serde reached, extended by the
/// name in a "missing field" message (which serde reports at the parent).
fn field_of(path: &str, message: &str) -> Option<String> {
    let missing =
        message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next()).map(str::to_string);
    let path = if path == "." { None } else { Some(path.to_string()) };
    match (path, missing) {
        (Some(p), Some(m)) => Some(format!("{p}.{m}")),
        (p, m) => p.or(m),
    }
}

/// serde_json appends " at line L column C"; clients care about the field.
fn strip_position(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    }
}

fn body_error(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(e.body_text())
    } else {
        ApiError::bad_request(None, format!("Cannot read the request body: {}", e.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Body {
        prompt: String,
        temperature: Option<f32>,
        nested: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        include_usage: bool,
    }

    #[test]
    fn malformed_json_is_400_without_param() {
        let e = parse_json::<Body>(b"{\"prompt\": ").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param, None);
        assert_eq!(e.code, Some("invalid_json"));
        let e = parse_json::<Body>(b"{\"prompt\": \"a\"} trailing").unwrap_err();
        assert_eq!(e.code, Some("invalid_json"));
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = parse_json::<Body>(br#"{"prompt": "a", "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(!e.message.contains("line"), "{}", e.message);
        let e = parse_json::<Body>(br#"{"prompt": "a", "nested": {"include_usage": 3}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("nested.include_usage"));
    }

    #[test]
    fn missing_field_is_named() {
        let e = parse_json::<Body>(br#"{"temperature": 1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = parse_json::<Body>(br#"{"prompt": "a", "nested": {}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("nested.include_usage"));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let b = parse_json::<Body>(br#"{"prompt": "a", "user": "x", "metadata": {"k": 1}}"#).unwrap();
        assert_eq!(b.prompt, "a");
    }
}
