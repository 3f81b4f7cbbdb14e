//! Slow, obvious references (f64): for every row, build the dense adapted weight W_i and
//! multiply. Independent of plans, segments, stacking and GEMM libraries; tests compare every
//! fast path against these, and finite differences of these give reference gradients.

use crate::batch::SlotId;
use crate::params::{SlotKind, SlotSpec};

/// Dense `W_i [d_out, d_in]` (row-major) for a slot: W0 o (B A)/r, W0 + s B A, diag(l) W0 or W0 diag(l).
pub fn dense_weight(w0: &[f64], spec: &SlotSpec, params: &[f64], d_in: usize, d_out: usize) -> Vec<f64> {
    let in_len = match spec.kind {
        SlotKind::Lora | SlotKind::Flora => spec.rank * d_in,
        SlotKind::Ia3In => d_in,
        SlotKind::Ia3Out => 0,
    };
    let ins = &params[spec.offset..spec.offset + in_len];
    let outs = &params[spec.offset + in_len..];
    let s = spec.scale as f64;
    let mut w = vec![0f64; d_out * d_in];
    for o in 0..d_out {
        for i in 0..d_in {
            let base = w0[o * d_in + i];
            w[o * d_in + i] = match spec.kind {
                // A = ins [r, d_in], B^T = outs [r, d_out]: (B A)[o, i] = sum_j B^T[j, o] A[j, i]
                SlotKind::Lora => base + s * (0..spec.rank).map(|j| outs[j * d_out + o] * ins[j * d_in + i]).sum::<f64>(),
                // b = ins [r, d_in], a = outs [r, d_out]: M[o, i] = sum_j a_j[o] b_j[i]
                SlotKind::Flora => base * s * (0..spec.rank).map(|j| outs[j * d_out + o] * ins[j * d_in + i]).sum::<f64>(),
                SlotKind::Ia3Out => outs[o] * base,
                SlotKind::Ia3In => base * ins[i],
            };
        }
    }
    w
}

/// `y [n, d_out]` for `x [n, d_in]` with checkpoint-layout `w0 [d_out, d_in]`.
pub fn forward(
    x: &[f64],
    w0: &[f64],
    params: &[f64],
    slots: &[Option<SlotSpec>],
    row_slots: &[Option<SlotId>],
    d_in: usize,
    d_out: usize,
) -> Vec<f64> {
    let mut y = vec![0f64; row_slots.len() * d_out];
    for (row, slot) in row_slots.iter().enumerate() {
        let w = match slot {
            None => w0.to_vec(),
            Some(id) => dense_weight(w0, slots[*id as usize].as_ref().expect("row uses an empty slot"), params, d_in, d_out),
        };
        for o in 0..d_out {
            y[row * d_out + o] = (0..d_in).map(|i| w[o * d_in + i] * x[row * d_in + i]).sum();
        }
    }
    y
}
