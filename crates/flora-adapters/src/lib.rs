//! flora-adapters: batched heterogeneous adapters (fLoRA, LoRA, IA3) behind one seam.
//!
//! - [`AdapterBatch`]: per-row adapter slots and their segments (plain data).
//! - [`LayerAdapters`]: every adapter of one projection, packed for the kernels.
//! - [`adapted_linear`]: the one function every adapted projection calls, forward and backward.
//! - [`CostModel`]: predicts and picks how to execute fLoRA segments.
//! - [`reference`]: slow dense references the tests compare against.

pub mod baseline;
pub mod batch;
pub mod cost;
pub mod cpu;
pub mod error;
pub mod init;
pub mod op;
pub mod params;
pub mod plan;
pub mod reference;

pub use batch::{AdapterBatch, Segment, SlotId};
pub use cost::CostModel;
pub use error::{AdapterError, Result};
pub use op::{adapted_linear, adapted_linear_rows, adapted_linear_rows_many, BaseWeight, WeightFormat};
pub use params::{AdapterKind, AdapterWeights, Bf16Tables, LayerAdapters, LoraTables, SlotKind, SlotParts, SlotSpec};
pub use plan::{ExecOptions, FloraPolicy, LayerPlan, SegmentExec};
