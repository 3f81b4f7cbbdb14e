//! flora's serving layer: one base model, many adapters, every request its own adapter, all
//! batched together.
//!
//! * [`scheduler`]: continuous batching as plain data (no tensors): a step plan per iteration.
//! * [`engine`]: the thread that owns the model and runs the plans; reached by messages.
//! * [`registry`], [`pool`], [`store`]: adapters on disk, in memory (bounded in bytes), and the
//!   loading between.
//! * [`api`], [`server`]: the OpenAI-compatible HTTP API and its lifecycle.

pub mod api;
pub mod engine;
pub mod metrics;
pub mod pool;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod store;

pub use server::{RunningServer, ServeOptions};
