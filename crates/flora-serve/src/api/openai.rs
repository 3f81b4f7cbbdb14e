//! Request bodies of the OpenAI-compatible routes, and parsing that names the faulty field.

use super::error::ApiError;
use axum::body::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Parses a JSON body; errors say which field (`param`) was wrong and why.
pub fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(axum::http::StatusCode::BAD_REQUEST, format!("malformed JSON body: {inner}"))
        } else if path == "." {
            // A missing field is reported at the parent: name the field itself.
            let msg = inner.to_string();
            let missing = msg.strip_prefix("missing field `").and_then(|r| r.split('`').next()).unwrap_or("body").to_string();
            ApiError::bad_field(&missing, format!("invalid request: {msg}"))
        } else {
            ApiError::bad_field(&path, format!("invalid field {path:?}: {inner}"))
        }
    })
}

/// `prompt` of a completion: text, several texts, token ids, or several lists of token ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or several.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Sampling and output fields shared by both routes (OpenAI's names, plus vLLM's `top_k`,
/// `min_p` and `repetition_penalty`). Parsed from the same body as the route's own fields (not
/// flattened into them, so errors still name the field).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// -1 or 0: off.
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    #[serde(default)]
    pub user: Option<String>,
    /// vLLM's extension: keep generating past the end-of-sequence token (benchmarks).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub best_of: Option<usize>,
}

/// Message content: a string, or a list of parts of which the text parts are used.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    /// Newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LoadAdapterRequest {
    pub lora_name: String,
    pub lora_path: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct UnloadAdapterRequest {
    pub lora_name: String,
}
