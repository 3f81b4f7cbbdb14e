//! Trainable adapters: an [`Adapter`] whose weight tensors are candle `Var`s.
//!
//! `ModelAdapters::pack` concatenates the adapters' tensors into each projection's flat params
//! (`Tensor::cat`), so the gradient the adapter seam returns for the flat params flows back to
//! every adapter's own `Var`s. The base model holds no `Var` and gets no gradient.

use crate::config::AdapterSpec;
use crate::error::Result;
use candle_core::{Device, Tensor, Var};
use flora_adapters::init::{self, WeightRng};
use flora_adapters::{AdapterKind, AdapterWeights};
use flora_model::{Adapter, LlamaConfig, Proj};
use std::collections::BTreeMap;

/// fLoRA symmetry-breaking noise at initialization (see `init::flora_identity`).
pub const FLORA_INIT_NOISE: f32 = 0.1;

/// One adapter being trained.
pub struct TrainAdapter {
    pub spec: AdapterSpec,
    /// The adapter the model runs; its tensors are the `vars`' tensors (same storage).
    pub adapter: Adapter,
    /// `(name, var)`, e.g. `("layers.3.q_proj.lora_A", var)`, in a fixed order.
    pub vars: Vec<(String, Var)>,
}

/// A stable per-adapter seed from the run seed and the adapter name (FNV-1a).
pub fn adapter_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl TrainAdapter {
    /// A fresh adapter that starts at the base model: fLoRA `a = 1, b = 1 + zero-mean noise`,
    /// LoRA `A ~ kaiming-uniform, B = 0`, IA3 `l = 1`.
    pub fn init(spec: &AdapterSpec, cfg: &LlamaConfig, seed: u64) -> Result<Self> {
        let mut rng = WeightRng::new(adapter_seed(seed, &spec.name));
        let dev = Device::Cpu;
        let mut weights = BTreeMap::new();
        for layer in 0..cfg.n_layers {
            for &p in &spec.targets {
                let (d_in, d_out) = p.dims(cfg);
                let w = match spec.kind {
                    AdapterKind::Flora => init::flora_identity(spec.rank, d_in, d_out, FLORA_INIT_NOISE, &mut rng, &dev)?,
                    AdapterKind::Lora => init::lora_identity(spec.rank, d_in, d_out, spec.alpha.unwrap_or(spec.rank as f32), &mut rng, &dev)?,
                    AdapterKind::Ia3 => {
                        let on_input = spec.feedforward.contains(&p);
                        init::ia3_identity(if on_input { d_in } else { d_out }, on_input, &dev)?
                    }
                };
                weights.insert((layer, p), w);
            }
        }
        Self::from_adapter(spec.clone(), Adapter { name: spec.name.clone(), kind: spec.kind, rank: spec.rank, weights })
    }

    /// Wraps existing weights (copied into fresh `Var`s).
    pub fn from_adapter(spec: AdapterSpec, adapter: Adapter) -> Result<Self> {
        let mut vars = Vec::new();
        let mut weights = BTreeMap::new();
        for (&(layer, p), w) in &adapter.weights {
            let mut var = |suffix: &str, t: &Tensor| -> Result<Tensor> {
                let v = Var::from_tensor(&t.contiguous()?)?;
                let t = v.as_tensor().clone();
                vars.push((format!("layers.{layer}.{}.{suffix}", p.module()), v));
                Ok(t)
            };
            let tw = match w {
                AdapterWeights::Lora { a, b, scale } => AdapterWeights::Lora { a: var("lora_A", a)?, b: var("lora_B", b)?, scale: *scale },
                AdapterWeights::Flora { a, b } => AdapterWeights::Flora { a: var("flora_a", a)?, b: var("flora_b", b)? },
                AdapterWeights::Ia3 { l, on_input } => AdapterWeights::Ia3 { l: var("ia3_l", l)?, on_input: *on_input },
            };
            weights.insert((layer, p), tw);
        }
        Ok(Self { spec, adapter: Adapter { weights, ..adapter }, vars })
    }

    /// A detached copy of the current weights (for saving, evaluation without a graph).
    pub fn snapshot(&self) -> Result<Adapter> {
        let mut weights = BTreeMap::new();
        for (k, w) in &self.adapter.weights {
            let c = |t: &Tensor| -> Result<Tensor> { Ok(t.detach().copy()?) };
            let w = match w {
                AdapterWeights::Lora { a, b, scale } => AdapterWeights::Lora { a: c(a)?, b: c(b)?, scale: *scale },
                AdapterWeights::Flora { a, b } => AdapterWeights::Flora { a: c(a)?, b: c(b)? },
                AdapterWeights::Ia3 { l, on_input } => AdapterWeights::Ia3 { l: c(l)?, on_input: *on_input },
            };
            weights.insert(*k, w);
        }
        Ok(Adapter { weights, ..self.adapter.clone() })
    }

    /// The adapter over the same storage with no gradient tracking (cheap; for evaluation).
    pub fn detached(&self) -> Adapter {
        let weights = self
            .adapter
            .weights
            .iter()
            .map(|(k, w)| {
                let w = match w {
                    AdapterWeights::Lora { a, b, scale } => AdapterWeights::Lora { a: a.detach(), b: b.detach(), scale: *scale },
                    AdapterWeights::Flora { a, b } => AdapterWeights::Flora { a: a.detach(), b: b.detach() },
                    AdapterWeights::Ia3 { l, on_input } => AdapterWeights::Ia3 { l: l.detach(), on_input: *on_input },
                };
                (*k, w)
            })
            .collect();
        Adapter { weights, ..self.adapter.clone() }
    }

    /// Number of trainable scalars.
    pub fn n_params(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// Target projections present in an adapter (for reports).
pub fn targets_of(adapter: &Adapter) -> Vec<Proj> {
    let mut ps: Vec<Proj> = adapter.weights.keys().map(|&(_, p)| p).collect();
    ps.sort();
    ps.dedup();
    ps
}
