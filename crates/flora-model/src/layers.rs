//! Differentiable building blocks, composed only from candle ops that record gradients
//! (candle's fused rms_norm / softmax_last_dim / rope kernels record none and would cut backprop).

use candle_core::{DType, Device, Result, Tensor, D};

/// `x / sqrt(mean(x^2) + eps) * w` over the last dim.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps as f64)?.sqrt()?)?.broadcast_mul(w)
}

/// Softmax over the last dim: exp(x - max) / sum.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// RoPE tables: `cos`, `sin` `[context, head_dim / 2]`, frequencies theta^(-2i/hd).
#[derive(Clone, Debug)]
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
    pub context: usize,
}

/// RoPE's frequencies `theta^(-2i / head_dim)`, i < head_dim / 2 (radians per position).
pub fn rope_frequencies(head_dim: usize, theta: f32) -> Vec<f64> {
    (0..head_dim / 2).map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64)).collect()
}

impl Rope {
    /// Angles `p * theta^(-2i / head_dim) / factors[i]` for positions `p < context`
    /// (`factors`: Llama 3.1+'s per-frequency divisors; none for plain RoPE).
    pub fn new(head_dim: usize, theta: f32, context: usize, factors: Option<&[f32]>) -> Self {
        let half = head_dim / 2;
        assert!(factors.is_none_or(|f| f.len() == half), "RoPE needs one factor per frequency ({half})");
        let freqs: Vec<f64> = rope_frequencies(head_dim, theta).iter().enumerate().map(|(i, f)| f / factors.map_or(1.0, |d| d[i] as f64)).collect();
        let mut cos = Vec::with_capacity(context * half);
        let mut sin = Vec::with_capacity(context * half);
        for p in 0..context {
            for &freq in &freqs {
                let a = p as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self { cos, sin, half, context }
    }

    /// Rotate-half RoPE (HF layout) of `x [b, t, heads, hd]` at positions `0..t`, differentiably.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_, t, _, hd) = x.dims4()?;
        let dev = x.device();
        let cos = Tensor::from_slice(&self.cos[..t * self.half], (t, self.half), dev)?;
        let sin = Tensor::from_slice(&self.sin[..t * self.half], (t, self.half), dev)?;
        let cos = Tensor::cat(&[&cos, &cos], 1)?.reshape((1, t, 1, hd))?;
        let sin = Tensor::cat(&[&sin, &sin], 1)?.reshape((1, t, 1, hd))?;
        let x1 = x.narrow(3, 0, self.half)?;
        let x2 = x.narrow(3, self.half, self.half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }

    /// In-place rotate-half RoPE of one head vector at position `pos` (inference path).
    #[inline]
    pub fn rotate(&self, v: &mut [f32], pos: usize) {
        let h = self.half;
        let (c, s) = (&self.cos[pos * h..(pos + 1) * h], &self.sin[pos * h..(pos + 1) * h]);
        for i in 0..h {
            let (a, b) = (v[i], v[i + h]);
            v[i] = a * c[i] - b * s[i];
            v[i + h] = b * c[i] + a * s[i];
        }
    }
}

/// Causal attention over full sequences, differentiably: `q [b, t, h, hd]`, `k`/`v [b, t, kv, hd]`
/// (GQA: each kv head serves h/kv query heads). Returns `[b, t, h * hd]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, t, h, hd) = q.dims4()?;
    let kv = k.dim(2)?;
    let rep = h / kv;
    let q = q.transpose(1, 2)?.contiguous()?; // [b, h, t, hd]
    let expand = |x: &Tensor| -> Result<Tensor> {
        // [b, t, kv, hd] -> [b, h, t, hd] with each kv head repeated `rep` times
        let x = x.transpose(1, 2)?; // [b, kv, t, hd]
        x.unsqueeze(2)?.expand((b, kv, rep, t, hd))?.reshape((b, h, t, hd))
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let scores = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?; // [b, h, t, t]
    let mask = causal_mask(t, q.device())?;
    let p = softmax_last(&scores.broadcast_add(&mask)?)?;
    p.matmul(&v.contiguous()?)?.transpose(1, 2)?.reshape((b, t, h * hd))
}

fn causal_mask(t: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(m, (t, t), dev)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::Rope;

    /// Divisors slow each frequency down: with every divisor 2, position 2p turns as far as
    /// position p does without them; frequency i turns by p * theta^(-2i / hd) / factor[i].
    #[test]
    fn frequency_factors_divide_the_angles() {
        let (hd, theta, context) = (8, 10_000.0f32, 64);
        let factors = [1.0f32, 4.0, 2.0, 8.0];
        let plain = Rope::new(hd, theta, context, None);
        let halved = Rope::new(hd, theta, context, Some(&[2.0; 4]));
        let mixed = Rope::new(hd, theta, context, Some(&factors));
        let at = |r: &Rope, pos: usize, i: usize| (r.cos[pos * 4 + i], r.sin[pos * 4 + i]);
        for p in 0..context {
            for (i, f) in factors.iter().enumerate() {
                if p % 2 == 0 {
                    let ((c, s), (pc, ps)) = (at(&halved, p, i), at(&plain, p / 2, i));
                    assert!((c - pc).abs() < 1e-6 && (s - ps).abs() < 1e-6, "position {p}, frequency {i}");
                }
                let angle = p as f64 / (theta as f64).powf(2.0 * i as f64 / hd as f64) / *f as f64;
                let (c, s) = at(&mixed, p, i);
                assert!((c as f64 - angle.cos()).abs() < 1e-6 && (s as f64 - angle.sin()).abs() < 1e-6, "position {p}, frequency {i}");
            }
        }
    }
}
