//! Minibatches for `Llama::forward_train` and the masked cross-entropy over their logits.
//!
//! Loss normalization: every target token of adapter `a` weighs `1 / N_a`, where `N_a` counts
//! adapter `a`'s targets over the whole optimizer step (all accumulated micro-batches). The step
//! loss is then `sum_a mean_loss_a`, and each adapter's gradient is exactly the gradient of its
//! own mean token loss: the same whichever other adapters share the minibatch.

use crate::data::Example;
use candle_core::{Device, Tensor, D};
use flora_adapters::SlotId;

/// A padded minibatch: rows sorted by adapter (longer same-adapter runs for the kernels),
/// right-padded to the longest row (exact for a causal model: no real position sees padding).
pub struct Minibatch {
    /// `[b][t]` token ids.
    pub tokens: Vec<Vec<u32>>,
    /// The adapters that have rows, ascending: slot `i` of the step's `ModelAdapters` is
    /// adapter `present[i]` (absent adapters are not packed, so they get no gradient).
    pub present: Vec<usize>,
    /// `[b]` slot of each row (index into `present`).
    pub slots: Vec<Option<SlotId>>,
    /// `[b]` adapter index of each row.
    pub adapters: Vec<usize>,
    /// `[b][t]` loss weight of predicting `tokens[r][p + 1]` from position `p` (0 at the last
    /// position and on padding).
    pub weights: Vec<Vec<f32>>,
    /// Real (non-pad) tokens.
    pub n_tokens: usize,
}

impl Minibatch {
    /// Builds the rows of `examples`; `scale[a]` is the weight of one target of adapter `a`.
    pub fn new(examples: &[&Example], scale: &[f32], pad_id: u32) -> Self {
        let mut rows: Vec<&Example> = examples.to_vec();
        rows.sort_by_key(|e| e.adapter);
        let t = rows.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
        let mut present: Vec<usize> = rows.iter().map(|e| e.adapter).collect();
        present.dedup();
        let mut mb = Minibatch { tokens: vec![], present: vec![], slots: vec![], adapters: vec![], weights: vec![], n_tokens: 0 };
        for e in rows {
            let mut tok = e.tokens.clone();
            tok.resize(t, pad_id);
            let mut w = vec![0f32; t];
            for (wp, &target) in w.iter_mut().zip(e.targets.get(1..).unwrap_or(&[])) {
                if target {
                    *wp = scale[e.adapter];
                }
            }
            mb.n_tokens += e.tokens.len();
            mb.tokens.push(tok);
            mb.slots.push(Some(present.binary_search(&e.adapter).expect("present") as SlotId));
            mb.adapters.push(e.adapter);
            mb.weights.push(w);
        }
        mb.present = present;
        mb
    }
}

/// The weighted loss of a minibatch, and every target's negative log-likelihood.
pub struct LossOut {
    /// Scalar `sum_{r,p} weights[r][p] * nll(r, p)`; differentiable.
    pub loss: Tensor,
    /// `(row, nll)` per target, in row-major order.
    pub nll: Vec<(usize, f32)>,
}

/// Masked cross-entropy of `logits [b, t, vocab]` (from gradient-recording ops: candle's fused
/// softmax records no gradient). Only rows with a nonzero weight are gathered:
/// `nll = log(sum(exp(x - max))) - (x[target] - max)`, with `max` detached (it cancels).
pub fn masked_cross_entropy(logits: &Tensor, mb: &Minibatch) -> crate::error::Result<LossOut> {
    let (b, t, vocab) = logits.dims3()?;
    let mut idx = Vec::new();
    let mut tgt = Vec::new();
    let mut w = Vec::new();
    let mut rows = Vec::new();
    for r in 0..b {
        for p in 0..t.saturating_sub(1) {
            let wt = mb.weights[r][p];
            if wt != 0.0 {
                idx.push((r * t + p) as u32);
                tgt.push(mb.tokens[r][p + 1]);
                w.push(wt);
                rows.push(r);
            }
        }
    }
    let dev = Device::Cpu;
    if idx.is_empty() {
        return Ok(LossOut { loss: (logits.sum_all()? * 0.0)?, nll: vec![] });
    }
    let n = idx.len();
    let x = logits.reshape((b * t, vocab))?.index_select(&Tensor::from_vec(idx, n, &dev)?, 0)?; // [n, vocab]
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // [n, 1]
    let picked = shifted.gather(&Tensor::from_vec(tgt, (n, 1), &dev)?, 1)?; // [n, 1]
    let nll = (lse - picked)?.squeeze(1)?; // [n]
    let loss = (&nll * Tensor::from_vec(w, n, &dev)?)?.sum_all()?;
    let values: Vec<f32> = nll.detach().to_vec1()?;
    Ok(LossOut { loss, nll: rows.into_iter().zip(values).collect() })
}
