//! Initial weights for training, and random weights for tests and benchmarks.

use crate::params::AdapterWeights;
use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A seeded random source for adapter weights.
pub struct WeightRng(StdRng);

impl WeightRng {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    /// Uniform in `[-bound, bound)`.
    pub fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
        (0..n).map(|_| (self.0.random::<f32>() * 2.0 - 1.0) * bound).collect()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f32 = self.0.random::<f32>().max(1e-12);
                let u2: f32 = self.0.random();
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    }
}

/// fLoRA start: `a = 1`, `b = 1 + e` where `e` has zero mean over the rank dimension, so
/// (1/r) sum_j a_j b_j^T is exactly all-ones (the base model) while the r components differ
/// (B = A = 1 alone would give every component the same gradient forever). At rank 1 there is no
/// symmetry to break and b = 1.
pub fn flora_identity(rank: usize, d_in: usize, d_out: usize, noise_std: f32, rng: &mut WeightRng, dev: &Device) -> Result<AdapterWeights> {
    let mut e = rng.normal(rank * d_in);
    for i in 0..d_in {
        let mean = (0..rank).map(|j| e[j * d_in + i]).sum::<f32>() / rank as f32;
        for j in 0..rank {
            e[j * d_in + i] = 1.0 + noise_std * (e[j * d_in + i] - mean);
        }
    }
    Ok(AdapterWeights::Flora { a: Tensor::ones((rank, d_out), candle_core::DType::F32, dev)?, b: Tensor::from_vec(e, (rank, d_in), dev)? })
}

/// PEFT's LoRA start: A ~ kaiming-uniform (bound 1/sqrt(d_in)), B = 0, scale alpha/r.
pub fn lora_identity(rank: usize, d_in: usize, d_out: usize, alpha: f32, rng: &mut WeightRng, dev: &Device) -> Result<AdapterWeights> {
    let a = Tensor::from_vec(rng.uniform(rank * d_in, 1.0 / (d_in as f32).sqrt()), (rank, d_in), dev)?;
    let b = Tensor::zeros((d_out, rank), candle_core::DType::F32, dev)?;
    Ok(AdapterWeights::Lora { a, b, scale: alpha / rank as f32 })
}

/// IA3 start: l = 1.
pub fn ia3_identity(d: usize, on_input: bool, dev: &Device) -> Result<AdapterWeights> {
    Ok(AdapterWeights::Ia3 { l: Tensor::ones(d, candle_core::DType::F32, dev)?, on_input })
}

/// Random LoRA weights that change the output (tests, benchmarks).
pub fn lora_random(rank: usize, d_in: usize, d_out: usize, alpha: f32, rng: &mut WeightRng, dev: &Device) -> Result<AdapterWeights> {
    let a = Tensor::from_vec(rng.uniform(rank * d_in, 1.0 / (d_in as f32).sqrt()), (rank, d_in), dev)?;
    let b = Tensor::from_vec(rng.uniform(d_out * rank, 0.5), (d_out, rank), dev)?;
    Ok(AdapterWeights::Lora { a, b, scale: alpha / rank as f32 })
}

/// Random fLoRA weights around the identity.
pub fn flora_random(rank: usize, d_in: usize, d_out: usize, rng: &mut WeightRng, dev: &Device) -> Result<AdapterWeights> {
    let a: Vec<f32> = rng.uniform(rank * d_out, 0.5).into_iter().map(|v| 1.0 + v).collect();
    let b: Vec<f32> = rng.uniform(rank * d_in, 0.5).into_iter().map(|v| 1.0 + v).collect();
    Ok(AdapterWeights::Flora { a: Tensor::from_vec(a, (rank, d_out), dev)?, b: Tensor::from_vec(b, (rank, d_in), dev)? })
}

/// Random IA3 weights around the identity.
pub fn ia3_random(d: usize, on_input: bool, rng: &mut WeightRng, dev: &Device) -> Result<AdapterWeights> {
    let l: Vec<f32> = rng.uniform(d, 0.5).into_iter().map(|v| 1.0 + v).collect();
    Ok(AdapterWeights::Ia3 { l: Tensor::from_vec(l, d, dev)?, on_input })
}
