//! AdamW with plain, serializable state; per-adapter learning rate and gradient clipping;
//! linear warmup + cosine decay.
//!
//! Clipping is per adapter (the global norm over that adapter's parameters): adapters are
//! independent models, so one adapter's large gradient never shrinks another's update.
//! An adapter with no gradient in a step (none of its examples were in it) is not updated and its
//! bias-correction step count does not advance (as torch's AdamW skips parameters without grad).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (0: none, PEFT/Trainer's default).
    pub weight_decay: f64,
    /// Per-adapter global-norm clip (0: off).
    pub max_grad_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: 1.0 }
    }
}

/// One adapter's moments: `m[i]`, `v[i]` per parameter tensor (flat, same order as its vars).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdamState {
    /// Updates applied so far (bias correction).
    pub t: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamState {
    pub fn zeros(sizes: &[usize]) -> Self {
        Self { t: 0, m: sizes.iter().map(|&n| vec![0.0; n]).collect(), v: sizes.iter().map(|&n| vec![0.0; n]).collect() }
    }
}

/// Global L2 norm of a set of gradients.
pub fn global_norm(grads: &[Vec<f32>]) -> f64 {
    grads.iter().flatten().map(|&g| (g as f64) * (g as f64)).sum::<f64>().sqrt()
}

/// One AdamW update of one adapter, in place. `params[i]` and `grads[i]` are flat tensors.
/// Returns the gradient norm before clipping.
pub fn adamw_update(cfg: &AdamWConfig, state: &mut AdamState, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f64) -> f64 {
    let norm = global_norm(grads);
    let clip = if cfg.max_grad_norm > 0.0 && norm > cfg.max_grad_norm { cfg.max_grad_norm / (norm + 1e-6) } else { 1.0 };
    state.t += 1;
    let bc1 = 1.0 - cfg.beta1.powi(state.t as i32);
    let bc2 = 1.0 - cfg.beta2.powi(state.t as i32);
    for ((p, g), (m, v)) in params.iter_mut().zip(grads).zip(state.m.iter_mut().zip(state.v.iter_mut())) {
        for i in 0..p.len() {
            let gi = g[i] as f64 * clip;
            let mi = cfg.beta1 * m[i] as f64 + (1.0 - cfg.beta1) * gi;
            let vi = cfg.beta2 * v[i] as f64 + (1.0 - cfg.beta2) * gi * gi;
            m[i] = mi as f32;
            v[i] = vi as f32;
            let update = (mi / bc1) / ((vi / bc2).sqrt() + cfg.eps) + cfg.weight_decay * p[i] as f64;
            p[i] = (p[i] as f64 - lr * update) as f32;
        }
    }
    norm
}

/// Learning-rate multiplier for optimizer step `step` (0-based) of `total`: linear warmup over
/// `warmup` steps to 1, then cosine decay to `min_ratio` at the last step.
pub fn lr_scale(step: usize, warmup: usize, total: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert_eq!(lr_scale(0, 4, 100, 0.0), 0.25);
        assert_eq!(lr_scale(3, 4, 100, 0.0), 1.0);
        assert!((lr_scale(4, 4, 100, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr_scale(52, 4, 100, 0.0) - 0.5).abs() < 1e-12);
        assert!((lr_scale(100, 4, 100, 0.1) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_and_clips() {
        let cfg = AdamWConfig { max_grad_norm: 1.0, ..Default::default() };
        let mut st = AdamState::zeros(&[2]);
        let mut p = vec![vec![1.0f32, -1.0]];
        let norm = adamw_update(&cfg, &mut st, &mut p, &[vec![30.0, -40.0]], 0.1);
        assert_eq!(norm, 50.0);
        // Bias-corrected first step: update = sign(g) (up to eps), whatever the clip.
        assert!((p[0][0] - 0.9).abs() < 1e-6 && (p[0][1] + 0.9).abs() < 1e-6, "{p:?}");
        assert!((st.m[0][0] - 0.1 * 30.0 / 50.0).abs() < 1e-6, "clipped gradient enters the moments");
    }
}
