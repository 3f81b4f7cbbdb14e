//! What both generation routes share: resolving `model` to the base model or an adapter,
//! checking sampling fields and lengths, submitting one engine sequence per choice, and either
//! collecting the results or streaming them as server-sent events.

use super::error::ApiError;
use super::openai::Common;
use super::AppState;
use crate::engine::{Event, GenRequest};
use crate::pool::LoadedAdapter;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use flora_model::sampling::SamplingParams;
use futures_util::stream::{SelectAll, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Most choices per request.
const MAX_N: usize = 16;

/// A validated generation job: prompts x `n` choices, all on one adapter.
pub struct Job {
    /// The `model` as the client named it (echoed in responses).
    pub model: String,
    pub adapter: Option<Arc<LoadedAdapter>>,
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

/// One finished choice.
pub struct Choice {
    pub text: String,
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// `model` → the base model (None) or a pinned adapter version. Unknown names are 404, never
/// the base model.
pub async fn resolve_model(state: &AppState, model: Option<&str>) -> Result<(String, Option<Arc<LoadedAdapter>>), ApiError> {
    let name = match model {
        None => return Ok((state.model_name.clone(), None)),
        Some(m) if m == state.model_name => return Ok((m.to_string(), None)),
        Some(m) => m.to_string(),
    };
    let store = state.store.clone();
    let lookup = name.clone();
    let adapter = tokio::task::spawn_blocking(move || store.acquire(&lookup))
        .await
        .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("adapter load task failed: {e}")))?
        .map_err(|e| ApiError::from(e).for_adapter(&name))?;
    Ok((name, Some(adapter)))
}

/// Checks the shared fields and builds sampling parameters.
pub fn sampling(c: &Common) -> Result<SamplingParams, ApiError> {
    if c.logprobs.as_ref().is_some_and(|v| !v.is_null() && v != &Value::Bool(false)) {
        return Err(ApiError::bad_field("logprobs", "logprobs are not supported"));
    }
    for (name, v) in [("presence_penalty", c.presence_penalty), ("frequency_penalty", c.frequency_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad_field(name, format!("{name} is not supported (use repetition_penalty)")));
        }
    }
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::bad_field("top_k", format!("top_k must be -1 (off) or positive, got {k}"))),
    };
    let p = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k,
        top_p: c.top_p.unwrap_or(1.0),
        min_p: c.min_p.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        seed: c.seed,
    };
    p.validate().map_err(|msg| {
        let field = msg.split_whitespace().next().unwrap_or("body").to_string();
        ApiError::bad_field(&field, msg)
    })?;
    Ok(p)
}

/// `n`: 1..=16.
pub fn choices(c: &Common) -> Result<usize, ApiError> {
    match c.n.unwrap_or(1) {
        n @ 1..=MAX_N => Ok(n),
        n => Err(ApiError::bad_field("n", format!("n must be between 1 and {MAX_N}, got {n}"))),
    }
}

/// Checks every prompt against the context and the vocabulary; `max_tokens` None means "the rest
/// of the context" (chat); returns the `max_tokens` to use.
pub fn check_lengths(state: &AppState, prompts: &[Vec<u32>], max_tokens: Option<usize>, field: &str) -> Result<usize, ApiError> {
    let context = state.context;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::bad_field("prompt", "the prompt is empty"));
    }
    if let Some(bad) = prompts.iter().flatten().find(|&&t| t as usize >= state.vocab) {
        return Err(ApiError::bad_field("prompt", format!("token id {bad} is outside the vocabulary ({})", state.vocab)));
    }
    if longest >= context {
        return Err(ApiError::bad_field("prompt", format!("the prompt has {longest} tokens; the model's context is {context} tokens")));
    }
    let max_tokens = max_tokens.unwrap_or(context - longest);
    if max_tokens == 0 {
        return Err(ApiError::bad_field(field, format!("{field} must be at least 1")));
    }
    // Saturating: a max_tokens near usize::MAX must not wrap around the checks.
    let need = longest.saturating_add(max_tokens);
    if need > context {
        return Err(ApiError::bad_field(
            field,
            format!("the prompt ({longest} tokens) + {field} ({max_tokens}) exceeds the model's context of {context} tokens"),
        ));
    }
    if need > state.max_kv_tokens {
        return Err(ApiError::bad_field(
            field,
            format!("the prompt ({longest} tokens) + {field} ({max_tokens}) exceeds the server's KV-cache budget of {} tokens", state.max_kv_tokens),
        ));
    }
    Ok(max_tokens)
}

/// Submits every choice; returns one event receiver per choice, in choice order.
fn submit(state: &AppState, job: &Job) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ApiError> {
    let total = job.prompts.len() * job.n;
    if state.shutting_down() {
        return Err(ApiError::unavailable("the server is shutting down").for_adapter(&job.model));
    }
    if !state.engine.has_room(total) {
        return Err(ApiError::from(crate::engine::SubmitError::QueueFull(total)).for_adapter(&job.model));
    }
    let mut out = Vec::with_capacity(total);
    for prompt in &job.prompts {
        for i in 0..job.n {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut sampling = job.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            let req = GenRequest {
                prompt: prompt.clone(),
                adapter: job.adapter.clone(),
                sampling,
                max_tokens: job.max_tokens,
                stop: job.stop.clone(),
                ignore_eos: job.ignore_eos,
                events: tx,
            };
            state.engine.submit(req).map_err(|e| ApiError::from(e).for_adapter(&job.model))?;
            out.push(rx);
        }
    }
    Ok(out)
}

/// Runs a job to the end.
pub async fn collect(state: &AppState, job: &Job) -> Result<Vec<Choice>, ApiError> {
    let receivers = submit(state, job)?;
    let mut choices = Vec::with_capacity(receivers.len());
    for mut rx in receivers {
        let mut text = String::new();
        loop {
            match rx.recv().await {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Finished { reason, prompt_tokens, completion_tokens }) => {
                    choices.push(Choice { text, finish_reason: reason.as_str(), prompt_tokens, completion_tokens });
                    break;
                }
                Some(Event::Failed(msg)) => return Err(ApiError::unavailable(msg).for_adapter(&job.model)),
                None => return Err(ApiError::unavailable("the engine stopped").for_adapter(&job.model)),
            }
        }
    }
    Ok(choices)
}

/// Token counts of a job's choices.
pub fn usage(choices: &[Choice], n: usize) -> Value {
    // Each prompt is counted once, not once per choice (as OpenAI does); the n choices of one
    // prompt have equal prompt_tokens, in whatever order they finished.
    let prompt: usize = choices.iter().map(|c| c.prompt_tokens).sum::<usize>() / n.max(1);
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

/// The fields every stream chunk of one response repeats.
pub struct ChunkHeader {
    pub id: String,
    /// `text_completion` or `chat.completion.chunk`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
}

impl ChunkHeader {
    pub fn chunk(&self, choices: Value) -> Value {
        json!({ "id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices })
    }
}

/// How a route turns stream events into chunks.
pub trait ChunkFormat: Send + 'static {
    fn header(&self) -> &ChunkHeader;
    /// A chunk to send before any text of choice `index` (chat: the assistant role).
    fn opening(&self, _index: usize) -> Option<Value> {
        None
    }
    fn text(&self, index: usize, text: &str) -> Value;
    fn finish(&self, index: usize, reason: &str) -> Value;
    /// The usage chunk (`stream_options.include_usage`): no choices, the counts.
    fn usage(&self, usage: Value) -> Value {
        let mut c = self.header().chunk(json!([]));
        c["usage"] = usage;
        c
    }
}

/// Streams a job as server-sent events: chunks per choice as text arrives, `[DONE]` at the end.
/// A client that goes away drops the stream, which drops the engine receivers: the sequences are
/// cancelled at the next step.
pub fn stream(state: &AppState, job: &Job, format: impl ChunkFormat, include_usage: bool) -> Result<Response, ApiError> {
    let receivers = submit(state, job)?;
    let n = job.n;
    let (tx, rx) = mpsc::channel::<SseEvent>(64);
    let mut merged: SelectAll<_> = futures_util::stream::select_all(
        receivers.into_iter().enumerate().map(|(i, r)| UnboundedReceiverStream::new(r).map(move |e| (i, e))),
    );
    let count = n * job.prompts.len();
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(SseEvent::default().data(v.to_string())).await.is_ok() }
        };
        for i in 0..count {
            if let Some(v) = format.opening(i) {
                if !send(v).await {
                    return;
                }
            }
        }
        let mut finished: Vec<Choice> = Vec::with_capacity(count);
        while let Some((i, ev)) = merged.next().await {
            let ok = match ev {
                Event::Text(t) => send(format.text(i, &t)).await,
                Event::Finished { reason, prompt_tokens, completion_tokens } => {
                    finished.push(Choice { text: String::new(), finish_reason: reason.as_str(), prompt_tokens, completion_tokens });
                    send(format.finish(i, reason.as_str())).await
                }
                Event::Failed(msg) => {
                    let err = json!({"error": {"message": msg, "type": "service_unavailable", "param": null, "code": 503}});
                    let _ = send(err).await;
                    false
                }
            };
            if !ok {
                return; // client gone (or failed): dropping `merged` cancels the rest
            }
        }
        if include_usage && finished.len() == count {
            if !send(format.usage(usage(&finished, n))).await {
                return;
            }
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    });
    let body = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Ok(Sse::new(body).keep_alive(KeepAlive::default()).into_response())
}
