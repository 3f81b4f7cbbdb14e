//! Whole-model adapters: one named adapter's weights for each (layer, projection) it targets,
//! and the packed per-projection tables a step runs with.

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::model::Proj;
use candle_core::Device;
use flora_adapters::{AdapterKind, AdapterWeights, LayerAdapters};
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

impl Adapter {
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

/// The packed tables of a set of adapters: slot `i` is `adapters[i]` at every projection.
pub struct ModelAdapters {
    tables: Vec<[Option<LayerAdapters>; 7]>,
}

impl ModelAdapters {
    pub fn pack(cfg: &LlamaConfig, adapters: &[&Adapter]) -> Result<Self> {
        let mut tables = Vec::with_capacity(cfg.n_layers);
        for layer in 0..cfg.n_layers {
            let mut row: [Option<LayerAdapters>; 7] = Default::default();
            for p in Proj::ALL {
                let slots: Vec<Option<(&str, &AdapterWeights)>> =
                    adapters.iter().map(|a| a.weights.get(&(layer, p)).map(|w| (a.name.as_str(), w))).collect();
                if slots.iter().all(Option::is_none) {
                    continue;
                }
                let (d_in, d_out) = p.dims(cfg);
                let name = format!("layers.{layer}.{}", p.path());
                row[p.index()] = Some(LayerAdapters::pack(&name, d_in, d_out, &slots, &Device::Cpu)?);
            }
            tables.push(row);
        }
        Ok(Self { tables })
    }

    /// The same tables with bf16 copies for bf16 inference (`LayerAdapters::with_bf16_tables`).
    pub fn with_bf16_tables(&self) -> Result<Self> {
        let tables = self
            .tables
            .iter()
            .map(|row| -> Result<[Option<LayerAdapters>; 7]> {
                let mut out: [Option<LayerAdapters>; 7] = Default::default();
                for (o, t) in out.iter_mut().zip(row) {
                    *o = t.as_ref().map(|t| t.with_bf16_tables()).transpose()?;
                }
                Ok(out)
            })
            .collect::<Result<_>>()?;
        Ok(Self { tables })
    }

    /// The table of one projection (None: no adapter of the set targets it).
    pub fn get(&self, layer: usize, p: Proj) -> Option<&LayerAdapters> {
        self.tables.get(layer).and_then(|r| r[p.index()].as_ref())
    }
}
