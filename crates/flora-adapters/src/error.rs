//! Errors of the adapter layer: every bad input names the layer and adapter it concerns.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AdapterError {
    #[error("layer {layer}: adapter {adapter}: {msg}")]
    BadAdapter { layer: String, adapter: String, msg: String },
    #[error("layer {layer}: {msg}")]
    BadBatch { layer: String, msg: String },
    #[error("layer {layer}: input shape {got:?}, expected [.., {d_in}]")]
    BadInput { layer: String, got: Vec<usize>, d_in: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, AdapterError>;
