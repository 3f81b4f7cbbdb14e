//! Errors as OpenAI's error JSON: `{"error": {"message", "type", "param", "code"}}`, with the
//! status code that says what went wrong. Every error answered is counted by kind.

use crate::engine::SubmitError;
use crate::store::StoreError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// Seconds a client should wait before retrying (429, 503).
    pub retry_after: Option<u64>,
    /// The adapter (or model) the request named, for the error metric.
    pub adapter: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, retry_after: None, adapter: "none".into() }
    }

    /// 400 naming the field.
    pub fn bad_field(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.to_string()), ..Self::new(StatusCode::BAD_REQUEST, message) }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { retry_after: Some(5), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message) }
    }

    pub fn for_adapter(mut self, adapter: &str) -> Self {
        self.adapter = adapter.to_string();
        self
    }

    /// OpenAI's `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::UNPROCESSABLE_ENTITY => {
                "invalid_request_error"
            }
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            _ => "server_error",
        }
    }

    /// The error metric's kind label.
    fn metric_kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::TOO_MANY_REQUESTS => "queue_full",
            StatusCode::UNPROCESSABLE_ENTITY => "bad_adapter",
            StatusCode::INSUFFICIENT_STORAGE => "pool_full",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::error(&self.adapter, self.metric_kind());
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.status.as_u16(),
            }
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull(_) => Self { retry_after: Some(1), ..Self::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()) },
            SubmitError::Stopped => Self::unavailable(e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use crate::pool::PoolError;
        use crate::registry::RegistryError;
        match &e {
            StoreError::Registry(RegistryError::NotFound(_)) => Self::not_found(e.to_string()),
            StoreError::Registry(RegistryError::BadName(_)) => Self::new(StatusCode::BAD_REQUEST, e.to_string()),
            // A broken adapter on disk is the server's data, not the request's fault, but the
            // client can do nothing with a 500: say which adapter and why.
            StoreError::Registry(RegistryError::BadAdapter { .. }) | StoreError::Load { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            StoreError::Pool(PoolError::TooLarge { .. }) => Self::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
            StoreError::Pool(PoolError::Full { .. }) => Self { retry_after: Some(1), ..Self::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()) },
        }
    }
}
