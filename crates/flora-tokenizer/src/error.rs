//! Error type of the crate: every failure says what was wrong and, where it
//! helps, what to do about it.

use std::path::PathBuf;

/// Errors raised while loading a tokenizer, encoding/decoding text or rendering
/// a chat template.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a readable GGUF file (bad magic, truncated, corrupt).
    #[error("{path} is not a valid GGUF file: {message}")]
    InvalidGguf { path: PathBuf, message: String },
    /// A file of a Hugging Face tokenizer is missing or malformed.
    #[error("{path}: {message}")]
    HfFile { path: PathBuf, message: String },
    /// A required GGUF metadata key is absent.
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(&'static str),
    /// A GGUF metadata key has an unexpected type or value.
    #[error("GGUF metadata key `{key}` is invalid: {message}")]
    InvalidKey { key: &'static str, message: String },
    /// `tokenizer.ggml.model` names a tokenizer family this crate does not implement.
    #[error("unsupported tokenizer model `{0}` (only byte-level BPE, `gpt2`, is supported)")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not implement.
    #[error(
        "unsupported pre-tokenizer `{0}` (supported: smollm, gpt2, llama-bpe, default); \
         refusing to guess because a wrong pre-tokenizer silently changes token ids"
    )]
    UnsupportedPreTokenizer(String),
    /// A token id outside the vocabulary was given to `decode`.
    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    /// The underlying BPE implementation failed (building or encoding).
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The GGUF file has no `tokenizer.chat_template`.
    #[error("the model has no chat template (GGUF key `tokenizer.chat_template` is missing)")]
    NoChatTemplate,
    /// The chat template failed to compile or render (includes `raise_exception`).
    #[error("chat template error: {0}")]
    Template(String),
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl From<minijinja::Error> for Error {
    fn from(e: minijinja::Error) -> Self {
        // `{:#}` includes the template name/line and chained causes.
        Error::Template(format!("{e:#}"))
    }
}
