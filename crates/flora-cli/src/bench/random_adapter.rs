//! Random adapters for benchmarks: weights that change the output, at any kind, rank and set of
//! target projections.

use anyhow::Result;
use flora_adapters::AdapterKind;
use flora_model::adapters::RandomAdapter;
use flora_model::{Adapter, LlamaConfig, Proj};

/// An adapter on `targets` of every layer, seeded by `seed` (LoRA alpha 1; IA3 scales the
/// output side).
pub fn random_adapter(cfg: &LlamaConfig, targets: &[Proj], kind: AdapterKind, rank: usize, seed: u64) -> Result<Adapter> {
    let mut a = Adapter::random(cfg, kind, rank, targets, RandomAdapter { seed, lora_alpha: 1.0, ia3_input_on_down: false })?;
    a.name = format!("bench-{kind}-{seed}");
    Ok(a)
}
