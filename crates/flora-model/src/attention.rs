//! Ragged causal attention for inference steps (no gradient): every sequence of a step brings
//! its own new rows (a prefill chunk or one decode token) at its own position, attends to its
//! own KV cache, and nothing is padded.

use crate::kv_cache::KvCache;
use crate::layers::Rope;
use flora_adapters::cpu::vecops::{axpy, dot};
use rayon::prelude::*;

/// Shapes of one attention layer.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Rows `[start, start + len)` of the step belong to `caches[i]`.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

/// `q [N, h*hd]`, `k`/`v [N, kv*hd]` are the step's projected rows. Applies RoPE to q and k at
/// each row's position (cache length + offset in its span), appends k and v to the caches of
/// `layer`, and returns the attention output `[N, h*hd]`.
pub fn ragged_attention(
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    spans: &[Span],
    caches: &mut [&mut KvCache],
    layer: usize,
    heads: Heads,
    rope: &Rope,
) -> Vec<f32> {
    let Heads { n_heads, n_kv_heads, head_dim: hd } = heads;
    let (qd, kd) = (n_heads * hd, n_kv_heads * hd);
    let mut row_owner = Vec::with_capacity(q.len() / qd);
    for (si, (span, cache)) in spans.iter().zip(caches.iter_mut()).enumerate() {
        let pos0 = cache.len();
        for t in 0..span.len {
            let row = span.start + t;
            for h in 0..n_heads {
                rope.rotate(&mut q[row * qd + h * hd..row * qd + (h + 1) * hd], pos0 + t);
            }
            for h in 0..n_kv_heads {
                rope.rotate(&mut k[row * kd + h * hd..row * kd + (h + 1) * hd], pos0 + t);
            }
            row_owner.push((si, pos0 + t));
        }
        cache.k[layer].extend_from_slice(&k[span.start * kd..(span.start + span.len) * kd]);
        cache.v[layer].extend_from_slice(&v[span.start * kd..(span.start + span.len) * kd]);
    }
    let rep = n_heads / n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let caches: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
    let mut out = vec![0f32; row_owner.len() * qd];
    let q = &*q;
    out.par_chunks_mut(qd).zip(row_owner.par_iter()).enumerate().for_each(|(row, (o, &(si, pos)))| {
        let (kc, vc) = (&caches[si].k[layer], &caches[si].v[layer]);
        let mut scores = vec![0f32; pos + 1];
        for h in 0..n_heads {
            let kvh = h / rep;
            let qh = &q[row * qd + h * hd..row * qd + (h + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                let kj = &kc[j * kd + kvh * hd..j * kd + (kvh + 1) * hd];
                *s = dot(qh, kj) * scale;
                max = max.max(*s);
            }
            let mut total = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            let oh = &mut o[h * hd..(h + 1) * hd];
            for (j, s) in scores.iter().enumerate() {
                let w = s / total;
                axpy(oh, w, &vc[j * kd + kvh * hd..j * kd + (kvh + 1) * hd]);
            }
        }
    });
    out
}
