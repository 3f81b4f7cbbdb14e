//! `GET /v1/models`, adapter load/unload, `GET /health`, `GET /metrics`.

use super::error::ApiError;
use super::openai::{parse_body, LoadAdapterRequest, UnloadAdapterRequest};
use super::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::path::PathBuf;

/// The base model, then every registered adapter (with kind and rank; `parent` is the base).
pub async fn models(State(state): State<AppState>) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let adapters = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let created = super::unix_time();
    let mut data = vec![json!({
        "id": state.model_name, "object": "model", "created": created, "owned_by": "flora",
        "root": state.model_name, "parent": null, "max_model_len": state.context,
    })];
    for a in adapters {
        data.push(json!({
            "id": a.name, "object": "model", "created": created, "owned_by": "flora",
            "root": a.path.display().to_string(), "parent": state.model_name,
            "adapter": { "kind": a.kind.to_string(), "rank": a.rank },
        }));
    }
    Ok(Json(json!({ "object": "list", "data": data })).into_response())
}

/// `{lora_name, lora_path}`: loads and validates the files, then registers the name (a new
/// version if it existed; requests already running keep theirs).
pub async fn load_adapter(State(state): State<AppState>, super::Body(body): super::Body) -> Result<Response, ApiError> {
    let req: LoadAdapterRequest = parse_body(&body)?;
    let store = state.store.clone();
    let (name, path) = (req.lora_name.clone(), PathBuf::from(&req.lora_path));
    let loaded = tokio::task::spawn_blocking(move || store.load_named(&name, &path))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::from(e).for_adapter(&req.lora_name))?;
    tracing::info!(adapter = %req.lora_name, path = %req.lora_path, "adapter registered");
    Ok(Json(json!({
        "status": "ok", "lora_name": req.lora_name,
        "kind": loaded.info.kind.to_string(), "rank": loaded.info.rank,
    }))
    .into_response())
}

/// `{lora_name}`: unregisters it; requests running on it finish with the version they hold.
pub async fn unload_adapter(State(state): State<AppState>, super::Body(body): super::Body) -> Result<Response, ApiError> {
    let req: UnloadAdapterRequest = parse_body(&body)?;
    state.store.unload(&req.lora_name).map_err(|e| ApiError::from(e).for_adapter(&req.lora_name))?;
    tracing::info!(adapter = %req.lora_name, "adapter unregistered");
    Ok(Json(json!({ "status": "ok", "lora_name": req.lora_name })).into_response())
}

pub async fn health(State(state): State<AppState>) -> Response {
    if state.engine.stats().stopped.load(std::sync::atomic::Ordering::SeqCst) {
        return ApiError::unavailable("the engine has stopped").into_response();
    }
    if state.shutting_down() {
        return ApiError::unavailable("the server is shutting down").into_response();
    }
    (StatusCode::OK, "ok").into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    crate::metrics::pool(&state.store.pool().stats(), state.store.pool().max_bytes());
    state.prometheus.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.prometheus.render()).into_response()
}
