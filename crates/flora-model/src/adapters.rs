//! Whole-model adapters: one named adapter's weights for each (layer, projection) it targets,
//! and the packed per-projection tables a step runs with.

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::model::Proj;
use candle_core::Device;
use flora_adapters::{AdapterKind, AdapterWeights, LayerAdapters, LoraTables, SlotParts};
use std::collections::BTreeMap;

/// One adapter over the whole model.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub name: String,
    pub kind: AdapterKind,
    /// LoRA / fLoRA rank (1 for IA3).
    pub rank: usize,
    /// Weights per (layer, projection); projections it does not target are absent.
    pub weights: BTreeMap<(usize, Proj), AdapterWeights>,
}

/// How [`Adapter::random`] draws an adapter's weights.
#[derive(Clone, Copy, Debug)]
pub struct RandomAdapter {
    pub seed: u64,
    /// LoRA's alpha (its scale is alpha / rank).
    pub lora_alpha: f32,
    /// IA3 on down_proj scales its input (the execution path that changes the GEMM's rows)
    /// instead of its output.
    pub ia3_input_on_down: bool,
}

impl Adapter {
    /// Random weights that change the output (for tests and benchmarks): `kind` on `targets`
    /// of every layer; LoRA's A and B uniform, fLoRA's and IA3's vectors around 1. IA3's rank
    /// is 1 whatever `rank` says.
    pub fn random(cfg: &LlamaConfig, kind: AdapterKind, rank: usize, targets: &[Proj], how: RandomAdapter) -> Result<Self> {
        use flora_adapters::init;
        let mut rng = init::WeightRng::new(how.seed);
        let dev = Device::Cpu;
        let mut weights = BTreeMap::new();
        for layer in 0..cfg.n_layers {
            for &p in targets {
                let (di, dout) = p.dims(cfg);
                let w = match kind {
                    AdapterKind::Lora => init::lora_random(rank, di, dout, how.lora_alpha, &mut rng, &dev)?,
                    AdapterKind::Flora => init::flora_random(rank, di, dout, &mut rng, &dev)?,
                    AdapterKind::Ia3 if how.ia3_input_on_down && p == Proj::Down => init::ia3_random(di, true, &mut rng, &dev)?,
                    AdapterKind::Ia3 => init::ia3_random(dout, false, &mut rng, &dev)?,
                };
                weights.insert((layer, p), w);
            }
        }
        let rank = if kind == AdapterKind::Ia3 { 1 } else { rank };
        Ok(Adapter { name: format!("random-{kind}-{rank}-{}", how.seed), kind, rank, weights })
    }

    /// Bytes of f32 parameters.
    pub fn n_bytes(&self) -> usize {
        self.weights
            .values()
            .map(|w| match w {
                AdapterWeights::Lora { a, b, .. } | AdapterWeights::Flora { a, b } => a.elem_count() + b.elem_count(),
                AdapterWeights::Ia3 { l, .. } => l.elem_count(),
            })
            .sum::<usize>()
            * 4
    }
}

/// An adapter checked and laid out for inference tables, in one number format (see
/// `Llama::prepare_adapter`): packing prepared adapters is a copy of their values.
#[derive(Clone, Debug, Default)]
pub struct PreparedAdapter {
    /// The bf16 copies' LoRA format when the parts carry them (bf16 inference), else None.
    pub(crate) bf16: Option<LoraTables>,
    pub(crate) parts: BTreeMap<(usize, Proj), SlotParts>,
}

impl PreparedAdapter {
    /// Lays out every projection `adapter` targets; `bf16` rounds to bf16 and keeps a bf16 copy
    /// with LoRA stored as it says (see [`crate::Llama::adapter_tables`]).
    pub fn new(cfg: &LlamaConfig, adapter: &Adapter, bf16: Option<LoraTables>) -> Result<Self> {
        let mut parts = BTreeMap::new();
        for (&(layer, p), w) in &adapter.weights {
            let (d_in, d_out) = p.dims(cfg);
            let name = format!("layers.{layer}.{}", p.path());
            parts.insert((layer, p), SlotParts::new(&name, &adapter.name, d_in, d_out, w, bf16)?);
        }
        Ok(Self { bf16, parts })
    }

    /// Bytes held by the prepared values.
    pub fn bytes(&self) -> usize {
        self.parts.values().map(SlotParts::bytes).sum()
    }
}

/// The packed tables of a set of adapters: slot `i` is `adapters[i]` at every projection.
pub struct ModelAdapters {
    tables: Vec<[Option<LayerAdapters>; 7]>,
}

impl ModelAdapters {
    pub fn pack(cfg: &LlamaConfig, adapters: &[&Adapter]) -> Result<Self> {
        Self::per_projection(
            cfg,
            |layer, p| adapters.iter().map(|a| a.weights.get(&(layer, p)).map(|w| (a.name.as_str(), w))).collect(),
            |name, d_in, d_out, slots| LayerAdapters::pack(name, d_in, d_out, slots, &Device::Cpu),
        )
    }

    /// Tables of prepared adapters (slot `i` is `adapters[i]`), all in one number format.
    pub fn from_prepared(cfg: &LlamaConfig, adapters: &[&PreparedAdapter]) -> Result<Self> {
        Self::per_projection(
            cfg,
            |layer, p| adapters.iter().map(|a| a.parts.get(&(layer, p))).collect(),
            |name, d_in, d_out, slots| LayerAdapters::from_parts(name, d_in, d_out, slots, &Device::Cpu),
        )
    }

    /// One table per (layer, projection) that some slot targets: `slots_at` gives the slots of
    /// a projection, `pack` packs them.
    fn per_projection<S>(
        cfg: &LlamaConfig,
        slots_at: impl Fn(usize, Proj) -> Vec<Option<S>>,
        pack: impl Fn(&str, usize, usize, &[Option<S>]) -> flora_adapters::Result<LayerAdapters>,
    ) -> Result<Self> {
        let mut tables = Vec::with_capacity(cfg.n_layers);
        for layer in 0..cfg.n_layers {
            let mut row: [Option<LayerAdapters>; 7] = Default::default();
            for p in Proj::ALL {
                let slots = slots_at(layer, p);
                if slots.iter().all(Option::is_none) {
                    continue;
                }
                let (d_in, d_out) = p.dims(cfg);
                let name = format!("layers.{layer}.{}", p.path());
                row[p.index()] = Some(pack(&name, d_in, d_out, &slots)?);
            }
            tables.push(row);
        }
        Ok(Self { tables })
    }

    /// The table of one projection (None: no adapter of the set targets it).
    pub fn get(&self, layer: usize, p: Proj) -> Option<&LayerAdapters> {
        self.tables.get(layer).and_then(|r| r[p.index()].as_ref())
    }
}
