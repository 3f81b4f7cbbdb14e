//! Training errors: each says where (file:line, adapter, checkpoint) and what to do.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    /// A malformed line of a JSONL data file: `file:line: message`.
    #[error("{file}:{line}: {msg}")]
    Data { file: String, line: usize, msg: String },
    /// A bad adapter configuration (config file, CLI flags).
    #[error("config: {0}")]
    Config(String),
    /// A checkpoint that cannot be read, or does not belong to this run.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Model(#[from] flora_model::ModelError),
    #[error(transparent)]
    Adapters(#[from] flora_adapters::AdapterError),
    #[error(transparent)]
    Tokenizer(#[from] flora_tokenizer::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// `path: error` as an [`TrainError::Io`].
pub fn io_err(path: &std::path::Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}
