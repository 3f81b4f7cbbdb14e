//! Helpers shared by this crate's integration tests.

use flora_adapters::AdapterKind;
use flora_model::adapters::{Adapter, RandomAdapter};
use flora_model::{LlamaConfig, Proj};

/// A random adapter of `kind` on `targets` of every layer, seeded by `seed`: LoRA with alpha
/// 2r, IA3 on down_proj scaling its input (the other execution path), elsewhere its output.
pub fn random_adapter(cfg: &LlamaConfig, kind: AdapterKind, rank: usize, targets: &[Proj], seed: u64) -> Adapter {
    let mut a = Adapter::random(cfg, kind, rank, targets, RandomAdapter { seed, lora_alpha: 2.0 * rank as f32, ia3_input_on_down: true }).unwrap();
    a.name = format!("{kind}-{rank}-{seed}");
    a
}
