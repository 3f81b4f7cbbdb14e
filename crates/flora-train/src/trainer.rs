//! The training loop: one optimizer step = `grad_accum` micro-batches of `batch_size` examples,
//! each `pack -> forward_train -> masked cross-entropy -> backward`, gradients summed per adapter
//! variable, then one AdamW update per adapter that had examples in the step.
//!
//! ```text
//! examples --Loader--> indices --Minibatch--> tokens [b, t], slots [b], weights [b, t]
//!   ModelAdapters::pack(present adapters' Vars)      (Tensor::cat per projection)
//!   Llama::forward_train -> logits [b, t, vocab]     (every projection via adapted_linear)
//!   masked_cross_entropy -> loss -> backward          (the seam's bwd gives d(flat params);
//!                                                     cat routes it to each adapter's Vars)
//!   AdamW per adapter (per-adapter lr x schedule, per-adapter clipping)  -> Var::set
//! ```

use crate::checkpoint;
use crate::data::{Example, Loader, LoaderPos};
use crate::error::{Result, TrainError};
use crate::loss::{masked_cross_entropy, Minibatch};
use crate::optim::{adamw_update, lr_scale, AdamState, AdamWConfig};
use crate::params::TrainAdapter;
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use flora_model::{Adapter, Llama, ModelAdapters};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Hyper-parameters of a run (everything but the per-adapter settings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Linear warmup steps.
    pub warmup: usize,
    /// The cosine decays to `min_lr_ratio x lr`.
    pub min_lr_ratio: f64,
    /// Data order (and, through the CLI, initialization and the eval split).
    pub seed: u64,
    pub adamw: AdamWConfig,
    /// Right-padding token (never a loss target).
    pub pad_id: u32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { steps: 100, batch_size: 8, grad_accum: 1, warmup: 10, min_lr_ratio: 0.0, seed: 0, adamw: AdamWConfig::default(), pad_id: 0 }
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepStats {
    /// Steps done after this one (1-based).
    pub step: usize,
    /// Mean negative log-likelihood over every target of the step.
    pub loss: f64,
    /// Per adapter (index order): mean target loss, or None if it had no example in the step.
    pub adapter_loss: Vec<Option<f64>>,
    /// Per adapter: gradient norm before clipping.
    pub grad_norm: Vec<Option<f64>>,
    /// Real (non-pad) tokens processed.
    pub n_tokens: usize,
    pub n_targets: usize,
    pub lr_scale: f64,
}

/// Held-out loss of one adapter.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalStats {
    pub adapter: String,
    /// Mean negative log-likelihood per target token.
    pub loss: f64,
    pub ppl: f64,
    pub n_targets: usize,
}

/// A micro-batch, each target's `(row, nll)`, and the gradients of its loss.
pub type MicroOut = (Minibatch, Vec<(usize, f32)>, GradStore);

/// The loss and gradients of one micro-batch: forward, masked cross-entropy, backward.
/// `scale[a]` weighs each target of adapter `a`; only the adapters present are packed, so
/// absent adapters get no gradient at all.
pub fn microbatch_grads(model: &Llama, adapters: &[TrainAdapter], examples: &[&Example], scale: &[f32], pad_id: u32) -> Result<MicroOut> {
    let mb = Minibatch::new(examples, scale, pad_id);
    let packed = ModelAdapters::pack(model.config(), &mb.present.iter().map(|&a| &adapters[a].adapter).collect::<Vec<_>>())?;
    let logits = model.forward_train(&mb.tokens, &mb.slots, Some(&packed))?;
    let out = masked_cross_entropy(&logits, &mb)?;
    let grads = out.loss.backward()?;
    Ok((mb, out.nll, grads))
}

/// The gradient of every variable of `ad` in `grads` (flat), or None when the adapter took no
/// part in the graph.
pub fn adapter_grads(ad: &TrainAdapter, grads: &GradStore) -> Result<Option<Vec<Vec<f32>>>> {
    let mut out = Vec::with_capacity(ad.vars.len());
    let mut any = false;
    for (_, v) in &ad.vars {
        match grads.get(v.as_tensor()) {
            Some(g) => {
                any = true;
                out.push(g.flatten_all()?.to_vec1::<f32>()?);
            }
            None => out.push(vec![0.0; v.elem_count()]),
        }
    }
    Ok(any.then_some(out))
}

/// Trains a set of adapters over a frozen model.
pub struct Trainer<'m> {
    model: &'m Llama,
    pub adapters: Vec<TrainAdapter>,
    pub states: Vec<AdamState>,
    pub train: Vec<Example>,
    loader: Loader,
    /// Optimizer steps done.
    pub step: usize,
    pub opts: TrainOptions,
}

impl<'m> Trainer<'m> {
    /// `train[i].adapter` indexes `adapters`.
    pub fn new(model: &'m Llama, adapters: Vec<TrainAdapter>, train: Vec<Example>, opts: TrainOptions) -> Result<Self> {
        if train.is_empty() {
            return Err(TrainError::Config("no training examples".into()));
        }
        if opts.batch_size == 0 || opts.grad_accum == 0 {
            return Err(TrainError::Config("batch size and gradient accumulation must be at least 1".into()));
        }
        if let Some(e) = train.iter().find(|e| e.adapter >= adapters.len()) {
            return Err(TrainError::Config(format!("example of line {} names adapter #{} of {}", e.line, e.adapter, adapters.len())));
        }
        let context = model.config().context;
        if let Some(e) = train.iter().find(|e| e.tokens.len() > context) {
            return Err(TrainError::Config(format!("example of line {} has {} tokens, the model's context is {context}", e.line, e.tokens.len())));
        }
        let states = adapters.iter().map(|a| AdamState::zeros(&a.vars.iter().map(|(_, v)| v.elem_count()).collect::<Vec<_>>())).collect();
        let loader = Loader::new(train.len(), opts.seed);
        Ok(Self { model, adapters, states, train, loader, step: 0, opts })
    }

    pub fn model(&self) -> &Llama {
        self.model
    }

    pub fn loader_pos(&self) -> LoaderPos {
        self.loader.pos()
    }

    pub fn done(&self) -> bool {
        self.step >= self.opts.steps
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let n_ad = self.adapters.len();
        // The step's micro-batches, drawn first: loss weights need each adapter's target count
        // over the whole step.
        let micro: Vec<Vec<usize>> = (0..self.opts.grad_accum).map(|_| self.loader.next_batch(self.opts.batch_size)).collect();
        let mut n_targets = vec![0usize; n_ad];
        for &i in micro.iter().flatten() {
            n_targets[self.train[i].adapter] += self.train[i].n_targets();
        }
        let scale: Vec<f32> = n_targets.iter().map(|&n| if n > 0 { 1.0 / n as f32 } else { 0.0 }).collect();
        let mut acc: Vec<Option<Vec<Vec<f32>>>> = vec![None; n_ad];
        let mut nll_sum = vec![0f64; n_ad];
        let mut n_tokens = 0;
        for idx in &micro {
            let ex: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
            let (mb, nll, grads) = microbatch_grads(self.model, &self.adapters, &ex, &scale, self.opts.pad_id)?;
            n_tokens += mb.n_tokens;
            for (row, v) in nll {
                nll_sum[mb.adapters[row]] += v as f64;
            }
            for (a, slot) in acc.iter_mut().enumerate() {
                if let Some(g) = adapter_grads(&self.adapters[a], &grads)? {
                    match slot {
                        Some(sum) => sum.iter_mut().zip(&g).for_each(|(s, x)| s.iter_mut().zip(x).for_each(|(s, x)| *s += x)),
                        slot => *slot = Some(g),
                    }
                }
            }
        }
        let lr_s = lr_scale(self.step, self.opts.warmup, self.opts.steps, self.opts.min_lr_ratio);
        let mut grad_norm = vec![None; n_ad];
        for a in 0..n_ad {
            let Some(g) = acc[a].take() else { continue };
            let ad = &self.adapters[a];
            let mut params: Vec<Vec<f32>> = ad.vars.iter().map(|(_, v)| v.flatten_all().and_then(|t| t.to_vec1::<f32>())).collect::<candle_core::Result<_>>()?;
            let norm = adamw_update(&self.opts.adamw, &mut self.states[a], &mut params, &g, ad.spec.lr * lr_s);
            if !norm.is_finite() {
                return Err(TrainError::Config(format!("adapter {}: gradient is not finite at step {} (lower its lr)", ad.spec.name, self.step + 1)));
            }
            grad_norm[a] = Some(norm);
            for ((_, v), p) in ad.vars.iter().zip(params) {
                v.set(&Tensor::from_vec(p, v.shape(), v.device())?)?;
            }
        }
        self.step += 1;
        let total_targets: usize = n_targets.iter().sum();
        Ok(StepStats {
            step: self.step,
            loss: nll_sum.iter().sum::<f64>() / total_targets.max(1) as f64,
            adapter_loss: (0..n_ad).map(|a| (n_targets[a] > 0).then(|| nll_sum[a] / n_targets[a] as f64)).collect(),
            grad_norm,
            n_tokens,
            n_targets: total_targets,
            lr_scale: lr_s,
        })
    }

    /// Mean target loss and perplexity of each adapter over `examples` (no gradients).
    /// Returns one entry per adapter that has examples, in adapter order.
    pub fn evaluate(&self, examples: &[Example]) -> Result<Vec<EvalStats>> {
        let adapters: Vec<Adapter> = self.adapters.iter().map(TrainAdapter::detached).collect();
        evaluate(self.model, &adapters, examples, self.opts.batch_size, self.opts.pad_id)
    }

    /// Current (detached) weights of every adapter.
    pub fn snapshots(&self) -> Result<Vec<Adapter>> {
        self.adapters.iter().map(TrainAdapter::snapshot).collect()
    }

    /// Writes the full state (weights, moments, step, data position) atomically.
    pub fn save_checkpoint(&self, path: &Path, fingerprint: &serde_json::Value) -> Result<()> {
        checkpoint::save(path, self, fingerprint)
    }

    /// Restores a state written by [`Trainer::save_checkpoint`] for the same run.
    pub fn restore_checkpoint(&mut self, path: &Path, fingerprint: &serde_json::Value) -> Result<()> {
        let st = checkpoint::load(path, self, fingerprint)?;
        self.step = st.step;
        self.loader = Loader::at(self.train.len(), self.opts.seed, st.loader);
        Ok(())
    }
}

/// Mean target loss per adapter of `adapters` (index = `Example::adapter`) over `examples`.
pub fn evaluate(model: &Llama, adapters: &[Adapter], examples: &[Example], batch_size: usize, pad_id: u32) -> Result<Vec<EvalStats>> {
    let mut order: Vec<&Example> = examples.iter().collect();
    order.sort_by_key(|e| e.adapter);
    let mut sum = vec![0f64; adapters.len()];
    let mut count = vec![0usize; adapters.len()];
    let ones = vec![1f32; adapters.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let mb = Minibatch::new(chunk, &ones, pad_id);
        let packed = ModelAdapters::pack(model.config(), &mb.present.iter().map(|&a| &adapters[a]).collect::<Vec<_>>())?;
        let logits = model.forward_train(&mb.tokens, &mb.slots, Some(&packed))?.detach();
        for (row, v) in masked_cross_entropy(&logits, &mb)?.nll {
            sum[mb.adapters[row]] += v as f64;
            count[mb.adapters[row]] += 1;
        }
    }
    Ok((0..adapters.len())
        .filter(|&a| count[a] > 0)
        .map(|a| {
            let loss = sum[a] / count[a] as f64;
            EvalStats { adapter: adapters[a].name.clone(), loss, ppl: loss.exp(), n_targets: count[a] }
        })
        .collect())
}
