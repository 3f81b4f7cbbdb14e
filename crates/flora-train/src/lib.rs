//! flora-train: fine-tune many fLoRA, LoRA and IA3 adapters at once over one frozen Llama-family
//! model. Every minibatch mixes adapters; each example runs through its own adapter via the
//! adapter seam (`flora_adapters::adapted_linear`), forward and backward.
//!
//! - [`data`]: JSONL records -> tokenized examples with loss masks, fitting, eval split, order;
//! - [`config`]: per-adapter kind / rank / alpha / targets / learning rate;
//! - [`params`]: adapters whose weights are candle `Var`s;
//! - [`loss`]: padded minibatches and the masked cross-entropy;
//! - [`optim`]: AdamW, warmup + cosine, per-adapter clipping;
//! - [`trainer`]: the step loop and evaluation; [`checkpoint`]: atomic, bit-exact resume;
//! - [`run`]: a whole run (files in, adapter directories, metrics and chart out) for the CLI.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod run;
pub mod trainer;

pub use config::{AdapterSpec, ConfigFile, PartialSpec};
pub use data::{Dataset, Example, TextEncoder};
pub use error::{Result, TrainError};
pub use params::TrainAdapter;
pub use trainer::{EvalStats, StepStats, TrainOptions, Trainer};
