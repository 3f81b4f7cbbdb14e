//! The HTTP API (axum): OpenAI-compatible generation routes where `model` names the base model
//! or an adapter, adapter admin routes, health and metrics.

mod admin;
mod chat;
mod completions;
pub mod error;
mod generate;
pub mod openai;

use crate::engine::EngineHandle;
use crate::store::AdapterStore;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use flora_tokenizer::{ChatTemplate, Tokenizer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What every handler sees.
pub struct Shared {
    pub engine: EngineHandle,
    pub store: Arc<AdapterStore>,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// The base model's name in `model` fields.
    pub model_name: String,
    pub context: usize,
    pub vocab: usize,
    /// KV tokens all running sequences may reserve together (one request's prompt + max_tokens
    /// must fit it).
    pub max_kv_tokens: usize,
    /// Protects every `/v1` route when set.
    pub api_key: Option<String>,
    /// Protects the adapter admin routes when set (else they take `api_key`).
    pub admin_key: Option<String>,
    pub prometheus: PrometheusHandle,
    pub shutting_down: AtomicBool,
}

pub type AppState = Arc<Shared>;

impl Shared {
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Tokenizes a text prompt, with BOS first where the model wants it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let mut ids = self.tokenizer.encode(text).map_err(|e| ApiError::bad_field("prompt", format!("cannot tokenize the prompt: {e}")))?;
        if self.tokenizer.add_bos() {
            if let Some(b) = self.tokenizer.bos_id() {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }
}

/// The router over `state`; request bodies above `max_body_bytes` are refused with 413.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions::handle))
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/models", get(admin::models))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    let admin = Router::new()
        .route("/v1/load_lora_adapter", post(admin::load_adapter))
        .route("/v1/unload_lora_adapter", post(admin::unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin_key));
    Router::new()
        .merge(api)
        .merge(admin)
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    check_key(state.api_key.as_deref(), &req)?;
    Ok(next.run(req).await)
}

async fn require_admin_key(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    check_key(state.admin_key.as_deref().or(state.api_key.as_deref()), &req)?;
    Ok(next.run(req).await)
}

/// `Authorization: Bearer KEY` must match when a key is set.
fn check_key(key: Option<&str>, req: &Request) -> Result<(), ApiError> {
    let Some(key) = key else { return Ok(()) };
    let given = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Compare without stopping at the first difference.
    let ok = given.is_some_and(|g| g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0);
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or invalid API key (Authorization: Bearer KEY)"))
    }
}

/// A request body as bytes; a body over the limit becomes an OpenAI-style 413.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state).await.map(Body).map_err(|e| ApiError::new(e.status(), e.body_text()))
    }
}

pub(crate) fn request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
