//! `POST /v1/chat/completions`: messages rendered with the model's chat template.

use super::error::ApiError;
use super::generate::{self, ChunkFormat, ChunkHeader, Job};
use super::openai::{parse_body, Common, ChatRequest, Content};
use super::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flora_tokenizer::ChatMessage;
use serde_json::{json, Value};

pub async fn handle(State(state): State<AppState>, super::Body(body): super::Body) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(&body)?;
    let common: Common = parse_body(&body)?;
    let c = &common;
    let n = generate::choices(c)?;
    let sampling = generate::sampling(c)?;
    let messages = to_messages(&req)?;
    let template = state.chat_template.as_ref().ok_or_else(|| ApiError::bad_field("messages", "the model has no chat template; use /v1/completions"))?;
    let text = template.render(&messages, true).map_err(|e| ApiError::bad_field("messages", format!("chat template: {e}")))?;
    let prompt = state.encode(&text)?;
    // Default: the rest of the context (as vLLM does).
    let max_tokens = generate::check_lengths(&state, std::slice::from_ref(&prompt), req.max_completion_tokens.or(c.max_tokens), "max_tokens")?;
    let (model, adapter) = generate::resolve_model(&state, c.model.as_deref()).await?;
    let stop = c.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    let job = Job { model, adapter, prompts: vec![prompt], n, sampling, max_tokens, stop, ignore_eos: c.ignore_eos.unwrap_or(false) };
    let id = format!("chatcmpl-{}", super::request_id());
    let created = super::unix_time();
    if c.stream == Some(true) {
        let include_usage = c.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        return generate::stream(&state, &job, Chunks(ChunkHeader { id, object: "chat.completion.chunk", created, model: job.model.clone() }), include_usage);
    }
    let choices = generate::collect(&state, &job).await?;
    let usage = generate::usage(&choices, n);
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            json!({ "index": i, "message": { "role": "assistant", "content": ch.text }, "logprobs": null, "finish_reason": ch.finish_reason })
        })
        .collect();
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": job.model,
        "choices": choices, "usage": usage,
    }))
    .into_response())
}

fn to_messages(req: &ChatRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::bad_field("messages", "messages must not be empty"));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer" | "tool") {
                return Err(ApiError::bad_field(&format!("messages[{i}].role"), format!("unknown role {:?}", m.role)));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::bad_field(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!("content part of type {:?} is not supported (text only)", p.kind),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            let role = if m.role == "developer" { "system" } else { m.role.as_str() };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

struct Chunks(ChunkHeader);

impl ChunkFormat for Chunks {
    fn header(&self) -> &ChunkHeader {
        &self.0
    }

    fn opening(&self, index: usize) -> Option<Value> {
        Some(self.0.chunk(json!([{ "index": index, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }])))
    }

    fn text(&self, index: usize, text: &str) -> Value {
        self.0.chunk(json!([{ "index": index, "delta": { "content": text }, "logprobs": null, "finish_reason": null }]))
    }

    fn finish(&self, index: usize, reason: &str) -> Value {
        self.0.chunk(json!([{ "index": index, "delta": {}, "logprobs": null, "finish_reason": reason }]))
    }
}
