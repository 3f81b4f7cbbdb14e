//! `POST /v1/completions`.

use super::error::ApiError;
use super::generate::{self, ChunkFormat, ChunkHeader, Job};
use super::openai::{parse_body, Common, CompletionRequest, Prompt};
use super::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

pub async fn handle(State(state): State<AppState>, super::Body(body): super::Body) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&body)?;
    let common: Common = parse_body(&body)?;
    let c = &common;
    if req.echo == Some(true) {
        return Err(ApiError::bad_field("echo", "echo is not supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_field("suffix", "suffix is not supported"));
    }
    let n = generate::choices(c)?;
    if req.best_of.is_some_and(|b| b != n) {
        return Err(ApiError::bad_field("best_of", "best_of other than n is not supported"));
    }
    let sampling = generate::sampling(c)?;
    let prompts = encode_prompts(&state, req.prompt)?;
    // OpenAI's default for completions is 16 tokens.
    let max_tokens = generate::check_lengths(&state, &prompts, Some(c.max_tokens.unwrap_or(16)), "max_tokens")?;
    let (model, adapter) = generate::resolve_model(&state, c.model.as_deref()).await?;
    let stop = c.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    let job = Job { model, adapter, prompts, n, sampling, max_tokens, stop, ignore_eos: c.ignore_eos.unwrap_or(false) };
    let id = format!("cmpl-{}", super::request_id());
    let created = super::unix_time();
    if c.stream == Some(true) {
        let include_usage = c.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        let format = Chunks(ChunkHeader { id, object: "text_completion", created, model: job.model.clone() });
        return generate::stream(&state, &job, format, include_usage);
    }
    let choices = generate::collect(&state, &job).await?;
    let usage = generate::usage(&choices, n);
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, ch)| json!({ "index": i, "text": ch.text, "logprobs": null, "finish_reason": ch.finish_reason }))
        .collect();
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": job.model,
        "choices": choices, "usage": usage,
    }))
    .into_response())
}

/// Text prompts are tokenized (with BOS where the model wants it); token prompts pass as given.
fn encode_prompts(state: &AppState, prompt: Prompt) -> Result<Vec<Vec<u32>>, ApiError> {
    let texts = match prompt {
        Prompt::Tokens(t) => return Ok(vec![t]),
        Prompt::TokenLists(t) if !t.is_empty() => return Ok(t),
        Prompt::Text(s) => vec![s],
        Prompt::Texts(v) if !v.is_empty() => v,
        _ => return Err(ApiError::bad_field("prompt", "the prompt list is empty")),
    };
    texts.iter().map(|t| state.encode(t)).collect()
}

struct Chunks(ChunkHeader);

impl ChunkFormat for Chunks {
    fn header(&self) -> &ChunkHeader {
        &self.0
    }

    fn text(&self, index: usize, text: &str) -> Value {
        self.0.chunk(json!([{ "index": index, "text": text, "logprobs": null, "finish_reason": null }]))
    }

    fn finish(&self, index: usize, reason: &str) -> Value {
        self.0.chunk(json!([{ "index": index, "text": "", "logprobs": null, "finish_reason": reason }]))
    }
}
