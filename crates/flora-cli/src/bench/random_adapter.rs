//! Random adapters for benchmarks: weights that change the output, at any kind, rank and set of
//! target projections.

use anyhow::Result;
use flora_adapters::init::{self, WeightRng};
use flora_adapters::AdapterKind;
use flora_model::{Adapter, LlamaConfig, Proj};
use std::collections::BTreeMap;

/// An adapter on `targets` of every layer, seeded by `seed` (IA3 scales the output side).
pub fn random_adapter(cfg: &LlamaConfig, targets: &[Proj], kind: AdapterKind, rank: usize, seed: u64) -> Result<Adapter> {
    let mut rng = WeightRng::new(seed);
    let dev = candle_core::Device::Cpu;
    let mut weights = BTreeMap::new();
    for layer in 0..cfg.n_layers {
        for &p in targets {
            let (di, dout) = p.dims(cfg);
            let w = match kind {
                AdapterKind::Lora => init::lora_random(rank, di, dout, 1.0, &mut rng, &dev)?,
                AdapterKind::Flora => init::flora_random(rank, di, dout, &mut rng, &dev)?,
                AdapterKind::Ia3 => init::ia3_random(dout, false, &mut rng, &dev)?,
            };
            weights.insert((layer, p), w);
        }
    }
    let rank = if kind == AdapterKind::Ia3 { 1 } else { rank };
    Ok(Adapter { name: format!("bench-{kind}-{seed}"), kind, rank, weights })
}
