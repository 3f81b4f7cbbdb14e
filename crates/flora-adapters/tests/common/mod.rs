//! Shared test fixtures: random layers, adapters and batches in every popularity pattern.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use flora_adapters::init::{self, WeightRng};
use flora_adapters::{AdapterBatch, AdapterWeights, LayerAdapters, SlotId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How rows pick adapters (Punica's popularity patterns, plus base rows and prefill runs).
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    /// Row i uses adapter i mod n: every neighbour differs.
    Distinct,
    /// Uniform over the first 4 adapters.
    Uniform4,
    /// Zipf(1) over all adapters.
    Zipf,
    /// Every row uses adapter 0.
    Identical,
    /// Random adapters, a quarter of the rows on the base model.
    WithBase,
    /// Runs of 1..=64 rows (prefill chunks) with random adapters or none.
    Runs,
}

pub const PATTERNS: [Pattern; 6] = [Pattern::Distinct, Pattern::Uniform4, Pattern::Zipf, Pattern::Identical, Pattern::WithBase, Pattern::Runs];

pub fn rows_for(pattern: Pattern, n_rows: usize, n_adapters: usize, seed: u64) -> Vec<Option<SlotId>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = n_adapters as u32;
    match pattern {
        Pattern::Distinct => (0..n_rows).map(|i| Some(i as u32 % n)).collect(),
        Pattern::Uniform4 => (0..n_rows).map(|_| Some(rng.random_range(0..n.min(4)))).collect(),
        Pattern::Zipf => {
            let weights: Vec<f64> = (0..n).map(|k| 1.0 / (k + 1) as f64).collect();
            let total: f64 = weights.iter().sum();
            (0..n_rows)
                .map(|_| {
                    let mut u = rng.random::<f64>() * total;
                    let mut k = 0;
                    while k + 1 < weights.len() && u >= weights[k] {
                        u -= weights[k];
                        k += 1;
                    }
                    Some(k as u32)
                })
                .collect()
        }
        Pattern::Identical => vec![Some(0); n_rows],
        Pattern::WithBase => (0..n_rows).map(|_| if rng.random_range(0..4) == 0 { None } else { Some(rng.random_range(0..n)) }).collect(),
        Pattern::Runs => {
            let mut rows = Vec::with_capacity(n_rows);
            while rows.len() < n_rows {
                let len = rng.random_range(1..=64).min(n_rows - rows.len());
                let slot = if rng.random_range(0..5) == 0 { None } else { Some(rng.random_range(0..n)) };
                rows.extend(std::iter::repeat_n(slot, len));
            }
            rows
        }
    }
}

/// Adapter kinds the fixtures generate: (kind tag, rank).
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Lora(usize),
    Flora(usize),
    Ia3Out,
    Ia3In,
}

pub fn random_weights(kind: Kind, d_in: usize, d_out: usize, rng: &mut WeightRng) -> AdapterWeights {
    let dev = Device::Cpu;
    match kind {
        Kind::Lora(r) => init::lora_random(r, d_in, d_out, 2.0 * r as f32, rng, &dev),
        Kind::Flora(r) => init::flora_random(r, d_in, d_out, rng, &dev),
        Kind::Ia3Out => init::ia3_random(d_out, false, rng, &dev),
        Kind::Ia3In => init::ia3_random(d_in, true, rng, &dev),
    }
    .unwrap()
}

/// A random projection with adapters of the given kinds.
pub struct Fixture {
    pub d_in: usize,
    pub d_out: usize,
    /// Checkpoint layout `[d_out, d_in]`.
    pub w0: Vec<f32>,
    pub weights: Vec<AdapterWeights>,
    pub layer: LayerAdapters,
}

impl Fixture {
    pub fn new(d_in: usize, d_out: usize, kinds: &[Kind], seed: u64) -> Self {
        let mut rng = WeightRng::new(seed);
        let w0 = rng.uniform(d_out * d_in, 1.0 / (d_in as f32).sqrt());
        let weights: Vec<AdapterWeights> = kinds.iter().map(|&k| random_weights(k, d_in, d_out, &mut rng)).collect();
        let layer = pack("test.proj", d_in, d_out, &weights);
        Self { d_in, d_out, w0, weights, layer }
    }

    pub fn w0_tensor(&self) -> Tensor {
        Tensor::from_vec(self.w0.clone(), (self.d_out, self.d_in), &Device::Cpu).unwrap()
    }

    pub fn params_f64(&self) -> Vec<f64> {
        self.layer.params().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect()
    }

    /// The f64 reference output for `x [n, d_in]` under `batch`.
    pub fn reference(&self, x: &[f32], batch: &AdapterBatch) -> Vec<f64> {
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let w64: Vec<f64> = self.w0.iter().map(|&v| v as f64).collect();
        flora_adapters::reference::forward(&x64, &w64, &self.params_f64(), self.layer.slots(), batch.row_slots(), self.d_in, self.d_out)
    }
}

pub fn pack(name: &str, d_in: usize, d_out: usize, weights: &[AdapterWeights]) -> LayerAdapters {
    let names: Vec<String> = (0..weights.len()).map(|i| format!("adapter-{i}")).collect();
    let slots: Vec<Option<(&str, &AdapterWeights)>> = weights.iter().zip(&names).map(|(w, n)| Some((n.as_str(), w))).collect();
    LayerAdapters::pack(name, d_in, d_out, &slots, &Device::Cpu).unwrap()
}

pub fn random_input(n: usize, d: usize, seed: u64) -> Vec<f32> {
    WeightRng::new(seed).uniform(n * d, 1.0)
}

/// Max |a - b| / (1 + |b|).
pub fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs() / (1.0 + y.abs())).fold(0.0, f64::max)
}
