//! Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the HTTP status that says
//! what the client should do, and the one mapping from engine errors to them.

use crate::engine::RequestError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `param`: the request field at fault.
    pub param: Option<String>,
    /// A stable machine-readable code (`queue_full`, `model_not_found`, …).
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code,
        }
    }

    pub fn bad_request(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            param: param.map(str::to_string),
            ..Self::new(StatusCode::BAD_REQUEST, None, message)
        }
    }

    /// OpenAI's `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The error object alone (also sent as an SSE event when a stream fails after it started).
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }

    /// An engine refusal, its field named as the client named it (`max_tokens_param`: the limit's name in the
    /// request).
    pub fn of_engine(e: &RequestError, max_tokens_param: &str) -> Self {
        match e {
            RequestError::Invalid { field, reason } => {
                let param = super::openai::param_of(field, max_tokens_param);
                ApiError::bad_request(Some(&param), format!("`{param}` {reason}"))
            }
            // Retrying helps: the queue drains.
            RequestError::QueueFull { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, Some("queue_full"), e.to_string())
            }
            // The request as sent cannot fit the KV budget even at its floor width: the client must ask for fewer
            // tokens (a 400 that names the field, like OpenAI's context_length_exceeded).
            RequestError::WontFit { .. } => ApiError {
                param: Some(max_tokens_param.to_string()),
                ..Self::new(
                    StatusCode::BAD_REQUEST,
                    Some("kv_budget_exceeded"),
                    e.to_string()
                        .replace("`stopping.max_tokens`", &format!("`{max_tokens_param}`")),
                )
            },
            RequestError::Unavailable(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, Some("unavailable"), e.to_string())
            }
            RequestError::Internal(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, Some("internal"), e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        match self.status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            StatusCode::UNAUTHORIZED => {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        r
    }
}
