//! Model errors: what went wrong, in words a user can act on.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("model file {path}: {msg}")]
    File { path: String, msg: String },
    #[error("bad model: {0}")]
    BadModel(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("bad input: {0}")]
    BadInput(String),
    #[error("adapter {name}: {msg}")]
    Adapter { name: String, msg: String },
    #[error(transparent)]
    Adapters(#[from] flora_adapters::AdapterError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
