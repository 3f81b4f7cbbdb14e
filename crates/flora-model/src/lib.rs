//! flora-model: a Llama-family model whose every projection runs through the adapter seam,
//! so each sequence of a batch carries its own adapter, in inference steps and in training.

pub mod adapters;
pub mod attention;
pub mod config;
pub mod default_model;
pub mod error;
pub mod kv_cache;
pub mod layers;
pub mod model;
pub mod peft;
pub mod rows;
pub mod sampling;
pub mod weights;

pub use adapters::{Adapter, ModelAdapters, PreparedAdapter};
pub use config::LlamaConfig;
pub use error::{ModelError, Result};
pub use kv_cache::KvCache;
pub use model::{Llama, Logits, Proj, SeqStep};
