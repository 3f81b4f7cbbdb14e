//! Per-segment execution plan of one adapted projection (plain data, no tensors).

use crate::batch::{AdapterBatch, Segment};
use crate::cost::CostModel;
use crate::error::{AdapterError, Result};
use crate::params::{LayerAdapters, SlotKind, SlotSpec};

/// How fLoRA segments are executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FloraPolicy {
    /// The cost model picks per segment.
    #[default]
    Auto,
    /// Always stack the r scaled copies of the rows into the shared GEMM (paper Eq. 6).
    Vectorized,
    /// Always materialize W0 o (B A)/r for the segment and run one GEMM.
    Merged,
}

/// Options for [`crate::adapted_linear`].
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    pub flora: FloraPolicy,
    pub cost: CostModel,
}

/// What a segment runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SegmentExec {
    Base,
    Lora(SlotSpec),
    Ia3Out(SlotSpec),
    Ia3In(SlotSpec),
    FloraVectorized(SlotSpec),
    FloraMerged(SlotSpec),
}

impl SegmentExec {
    /// Rows this segment contributes to the shared base GEMM's input (0 for merged fLoRA).
    pub fn stacked_rows(&self, len: usize) -> usize {
        match self {
            SegmentExec::FloraVectorized(s) => s.rank * len,
            SegmentExec::FloraMerged(_) => 0,
            _ => len,
        }
    }

    /// Whether the segment's rows enter the shared GEMM unchanged (so no stacking copy is needed).
    pub fn is_direct(&self) -> bool {
        matches!(self, SegmentExec::Base | SegmentExec::Lora(_) | SegmentExec::Ia3Out(_))
    }
}

/// The plan for one call: dims and each segment's execution.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerPlan {
    pub d_in: usize,
    pub d_out: usize,
    pub n_rows: usize,
    pub segments: Vec<(Segment, SegmentExec)>,
}

impl LayerPlan {
    /// Whether every segment feeds the shared GEMM unchanged.
    pub fn all_direct(&self) -> bool {
        self.segments.iter().all(|(_, e)| e.is_direct())
    }

    /// Rows of the shared (stacked) GEMM.
    pub fn n_stacked_rows(&self) -> usize {
        self.segments.iter().map(|(s, e)| e.stacked_rows(s.len)).sum()
    }
}

/// Resolves every segment's slot and picks its execution. Errors name the layer.
///
/// fLoRA under `Auto`: every fLoRA segment starts vectorized (joining the shared GEMM); then,
/// largest first, a segment goes merged when the cost model predicts its own merged GEMM is
/// cheaper than what its r*n row copies add to the shared GEMM (which shrinks as it does).
pub fn plan_layer(batch: &AdapterBatch, adapters: &LayerAdapters, opts: &ExecOptions) -> Result<LayerPlan> {
    let slots = adapters.slots();
    let mut segments = Vec::with_capacity(batch.segments().len());
    for seg in batch.segments() {
        let exec = match seg.slot {
            None => SegmentExec::Base,
            // An empty slot: that adapter does not touch this projection (base weight).
            Some(id) if matches!(slots.get(id as usize), Some(None)) => SegmentExec::Base,
            Some(id) => {
                let spec = slots.get(id as usize).copied().flatten().ok_or_else(|| AdapterError::BadBatch {
                    layer: adapters.name().to_string(),
                    msg: format!("rows {:?} use adapter slot {id}, but only {} slots exist", seg.rows(), slots.len()),
                })?;
                match spec.kind {
                    SlotKind::Lora => SegmentExec::Lora(spec),
                    SlotKind::Ia3Out => SegmentExec::Ia3Out(spec),
                    SlotKind::Ia3In => SegmentExec::Ia3In(spec),
                    SlotKind::Flora if opts.flora == FloraPolicy::Merged => SegmentExec::FloraMerged(spec),
                    SlotKind::Flora => SegmentExec::FloraVectorized(spec),
                }
            }
        };
        segments.push((*seg, exec));
    }
    let mut plan = LayerPlan { d_in: adapters.d_in(), d_out: adapters.d_out(), n_rows: batch.n_rows(), segments };
    if opts.flora == FloraPolicy::Auto {
        choose_flora_paths(&mut plan, &opts.cost);
    }
    Ok(plan)
}

fn choose_flora_paths(plan: &mut LayerPlan, cost: &CostModel) {
    let mut order: Vec<usize> = (0..plan.segments.len()).filter(|&i| matches!(plan.segments[i].1, SegmentExec::FloraVectorized(_))).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plan.segments[i].1.stacked_rows(plan.segments[i].0.len)));
    let mut shared = plan.n_stacked_rows();
    for i in order {
        let (seg, exec) = plan.segments[i];
        let SegmentExec::FloraVectorized(spec) = exec else { continue };
        if cost.prefers_merged(shared, seg.len, spec.rank, plan.d_in, plan.d_out) {
            plan.segments[i].1 = SegmentExec::FloraMerged(spec);
            shared -= spec.rank * seg.len;
        }
    }
}
