//! Ragged causal attention for inference steps (no gradient): every sequence of a step brings
//! its own new rows (a prefill chunk or one decode token) at its own position, attends to its
//! own KV cache, and nothing is padded.

use crate::kv_cache::{KvCache, KvElem, KvRows};
use crate::layers::Rope;
use flora_adapters::cpu::vecops::{axpy, axpy_widened, exp_in_place};
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
        cache.k[layer].push(&k[span.start * kd..(span.start + span.len) * kd]);
        cache.v[layer].push(&v[span.start * kd..(span.start + span.len) * kd]);
    }
    let rep = n_heads / n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let caches: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
    let mut out = vec![0f32; row_owner.len() * qd];
    let q = &*q;
    let shape = RowShape { n_heads, rep, hd, kd, scale };
    let threads = flora_adapters::cpu::matmul::n_threads();
    // Row `row` against the first `pos + 1` positions of its cache, in the cache's format;
    // its positions split into parts (one per thread, see `attend_row_split`), attended in
    // parallel or one after the other.
    let attend = |o: &mut [f32], row: usize, si: usize, pos: usize, parallel: bool| {
        let n = (pos + 1) * kd;
        let q = &q[row * qd..(row + 1) * qd];
        match (&caches[si].k[layer], &caches[si].v[layer]) {
            (KvRows::F32(kc), KvRows::F32(vc)) => attend_row_split(o, q, &kc[..n], &vc[..n], shape, threads, parallel),
            (KvRows::Bf16(kc), KvRows::Bf16(vc)) => attend_row_split(o, q, &kc[..n], &vc[..n], shape, threads, parallel),
            _ => unreachable!("a cache holds keys and values in one format"),
        }
    };
    if row_owner.len() < threads {
        // Fewer rows than threads (batch-1 decode): the threads share each row's parts.
        for (row, (o, &(si, pos))) in out.chunks_exact_mut(qd).zip(&row_owner).enumerate() {
            attend(o, row, si, pos, true);
        }
        return out;
    }
    out.par_chunks_mut(qd).zip(row_owner.par_iter()).enumerate().for_each(|(row, (o, &(si, pos)))| attend(o, row, si, pos, false));
    out
}

/// Positions below which a row is not split (the hand-off would cost more than it saves).
const SPLIT_MIN_POSITIONS: usize = 64;

/// One query row with its positions split into up to `parts` ranges, each attended with its
/// own softmax state, then merged exactly: flash-decoding on the CPU. With `parallel` the
/// parts run on the step's team (`flora_adapters::cpu::team`), else one after the other on
/// this thread. The split depends only on the positions and `parts`, so a row's bits do not
/// depend on how many rows share its step.
fn attend_row_split<E: KvElem>(o: &mut [f32], q: &[f32], kc: &[E], vc: &[E], shape: RowShape, parts: usize, parallel: bool) {
    let positions = kc.len() / shape.kd;
    let parts = parts.min(positions / SPLIT_MIN_POSITIONS);
    if parts <= 1 {
        return attend_row(o, q, kc, vc, shape);
    }
    let qd = shape.n_heads * shape.hd;
    // Part i: positions `i * positions / parts ..`; every part holds at least
    // SPLIT_MIN_POSITIONS of them (parts <= positions / SPLIT_MIN_POSITIONS).
    let bounds = |i: usize| (i * positions / parts, (i + 1) * positions / parts);
    // Part i's unnormalized output `[n_heads * hd]` and its per-head softmax states: block i of
    // two flat buffers (two allocations per row, whatever the parts).
    let (n_heads, kd) = (shape.n_heads, shape.kd);
    let mut outs = vec![0f32; parts * qd];
    let mut states = vec![Softmax::EMPTY; parts * n_heads];
    let run = |i: usize, po: &mut [f32], ps: &mut [Softmax]| {
        let (j0, j1) = bounds(i);
        attend_part(po, ps, q, &kc[j0 * kd..j1 * kd], &vc[j0 * kd..j1 * kd], shape);
    };
    let blocks = outs.chunks_exact_mut(qd).zip(states.chunks_exact_mut(n_heads));
    if parallel {
        let blocks: Vec<std::sync::Mutex<_>> = blocks.map(std::sync::Mutex::new).collect();
        flora_adapters::cpu::team::par_for(parts, |i| {
            let mut guard = blocks[i].lock().expect("one writer per part");
            let (po, ps) = &mut *guard;
            run(i, po, ps);
        });
    } else {
        blocks.enumerate().for_each(|(i, (po, ps))| run(i, po, ps));
    }
    for (h, oh) in o.chunks_exact_mut(shape.hd).enumerate() {
        let max = states.chunks_exact(n_heads).fold(f32::NEG_INFINITY, |m, s| m.max(s[h].max));
        let mut merged = Softmax { max, sum: 0.0 };
        oh.fill(0.0);
        for (po, ps) in outs.chunks_exact(qd).zip(states.chunks_exact(n_heads)) {
            let w = (ps[h].max - max).exp();
            merged.sum += ps[h].sum * w;
            axpy(oh, w, &po[h * shape.hd..(h + 1) * shape.hd]);
        }
        normalize(oh, &[merged], shape.hd);
    }
}

/// Divides each head's unnormalized output by its softmax sum.
fn normalize(o: &mut [f32], states: &[Softmax], hd: usize) {
    for (oh, s) in o.chunks_exact_mut(hd).zip(states) {
        let inv = 1.0 / s.sum;
        for v in oh.iter_mut() {
            *v *= inv;
        }
    }
}

/// The softmax state of one head over some positions: the largest scaled score, and the sum
/// of `e^(score - max)` (the weights the unnormalized output was summed with).
#[derive(Clone, Copy, Debug)]
struct Softmax {
    max: f32,
    sum: f32,
}

impl Softmax {
    const EMPTY: Softmax = Softmax { max: f32::NEG_INFINITY, sum: 0.0 };
}

/// Shapes one query row needs: `rep` query heads share each KV head.
#[derive(Clone, Copy)]
struct RowShape {
    n_heads: usize,
    rep: usize,
    hd: usize,
    kd: usize,
    scale: f32,
}

/// One query row against its sequence's keys and values `kc`, `vc` `[positions, kd]` (f32, or
/// bf16 widened as they are read). Compiled twice: with AVX-512 enabled where the CPU has it
/// (16-lane dots, exp and weighted sums; the build's baseline is AVX2), else for the baseline.
fn attend_row<E: KvElem>(o: &mut [f32], q: &[f32], kc: &[E], vc: &[E], shape: RowShape) {
    let mut states = vec![Softmax::EMPTY; shape.n_heads];
    attend_part(o, &mut states, q, kc, vc, shape);
    normalize(o, &states, shape.hd);
}

/// One query row against some positions of its sequence (`kc`, `vc` `[positions, kd]`, at
/// least one): `o [n_heads * hd]` gets each head's output with weights `e^(score - max)`, not
/// yet divided by their sum; `states[h]` gets that max and sum.
fn attend_part<E: KvElem>(o: &mut [f32], states: &mut [Softmax], q: &[f32], kc: &[E], vc: &[E], shape: RowShape) {
    debug_assert!(q.len() >= shape.n_heads * shape.hd && o.len() >= shape.n_heads * shape.hd && kc.len() == vc.len() && kc.len() % shape.kd == 0 && !kc.is_empty());
    #[cfg(target_arch = "x86_64")]
    if flora_adapters::cpu::has_avx512() {
        if shape.hd == 64 {
            // SAFETY: the CPU has AVX-512F (checked at run time); slices hold whole rows.
            return unsafe { x86::attend_part_hd64(o, states, q, kc, vc, shape) };
        }
        // SAFETY: as above.
        return unsafe { x86::attend_part_avx512(o, states, q, kc, vc, shape) };
    }
    attend_part_body(o, states, q, kc, vc, shape)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{attend_part_body, softmax_weights, KvElem, RowShape, Softmax};
    use std::arch::x86_64::*;

    /// The portable body compiled with AVX-512 enabled.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn attend_part_avx512<E: KvElem>(o: &mut [f32], states: &mut [Softmax], q: &[f32], kc: &[E], vc: &[E], shape: RowShape) {
        attend_part_body(o, states, q, kc, vc, shape)
    }

    /// Rows ahead to prefetch: a batch's caches are far larger than L2.
    const AHEAD: usize = 4;

    /// Prefetches the `len` elements at `p` (one cache row) into L1.
    #[inline(always)]
    unsafe fn prefetch_row<E>(p: *const E, len: usize) {
        let p = p as *const i8;
        for line in 0..(len * std::mem::size_of::<E>()).div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * line));
        }
    }

    /// 64 elements at `p` as four f32 vectors.
    #[inline(always)]
    unsafe fn load4<E: KvElem>(p: *const E) -> [__m512; 4] {
        [E::load16(p), E::load16(p.add(16)), E::load16(p.add(32)), E::load16(p.add(48))]
    }

    /// Head size 64 (four 16-lane vectors). Keys, then values, are read in one pass over the
    /// cache rows, every head from each row (whole rows, in order: what the prefetchers follow
    /// best when the caches come from memory); query heads are loaded from L1.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn attend_part_hd64<E: KvElem>(o: &mut [f32], states: &mut [Softmax], q: &[f32], kc: &[E], vc: &[E], shape: RowShape) {
        const HD: usize = 64;
        let RowShape { n_heads, rep, kd, scale, .. } = shape;
        let n_kv = n_heads / rep;
        let positions = kc.len() / kd;
        let mut p = vec![0f32; n_heads * positions]; // p[h * positions + j]
        for j in 0..positions {
            let kp = kc.as_ptr().add(j * kd);
            prefetch_row(kp.wrapping_add(AHEAD * kd), kd);
            for g in 0..n_kv {
                let k = load4(kp.add(g * HD));
                for h in g * rep..(g + 1) * rep {
                    let qh = load4(q.as_ptr().add(h * HD));
                    let mut acc = _mm512_mul_ps(qh[0], k[0]);
                    acc = _mm512_fmadd_ps(qh[1], k[1], acc);
                    acc = _mm512_fmadd_ps(qh[2], k[2], acc);
                    acc = _mm512_fmadd_ps(qh[3], k[3], acc);
                    *p.get_unchecked_mut(h * positions + j) = _mm512_reduce_add_ps(acc) * scale;
                }
            }
        }
        // A plain loop, not a closure: keeps the vectorized exp inlined into this AVX-512 function.
        for (st, ph) in states.iter_mut().zip(p.chunks_exact_mut(positions)) {
            *st = softmax_weights(ph);
        }
        let o = &mut o[..n_heads * HD];
        o.fill(0.0);
        for j in 0..positions {
            let vp = vc.as_ptr().add(j * kd);
            prefetch_row(vp.wrapping_add(AHEAD * kd), kd);
            for g in 0..n_kv {
                let v = load4(vp.add(g * HD));
                for h in g * rep..(g + 1) * rep {
                    let w = _mm512_set1_ps(*p.get_unchecked(h * positions + j));
                    let op = o.as_mut_ptr().add(h * HD);
                    for (c, &vv) in v.iter().enumerate() {
                        _mm512_storeu_ps(op.add(16 * c), _mm512_fmadd_ps(w, vv, _mm512_loadu_ps(op.add(16 * c))));
                    }
                }
            }
        }
    }
}

/// Scores to unnormalized softmax weights `e^(s - max)`, in place; returns max and sum.
#[inline(always)]
fn softmax_weights(scores: &mut [f32]) -> Softmax {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    for s in scores.iter_mut() {
        *s -= max;
    }
    exp_in_place(scores);
    Softmax { max, sum: scores.iter().sum::<f32>() }
}

#[inline(always)]
fn attend_part_body<E: KvElem>(o: &mut [f32], states: &mut [Softmax], q: &[f32], kc: &[E], vc: &[E], shape: RowShape) {
    let RowShape { n_heads, rep, hd, kd, scale } = shape;
    let positions = kc.len() / kd;
    let mut p = vec![0f32; positions];
    for h in 0..n_heads {
        let kvh = h / rep;
        let qh = &q[h * hd..(h + 1) * hd];
        for (s, kj) in p.iter_mut().zip(kc.chunks_exact(kd)) {
            *s = dot_widened(qh, &kj[kvh * hd..(kvh + 1) * hd]) * scale;
        }
        states[h] = softmax_weights(&mut p);
        weighted_rows(&mut o[h * hd..(h + 1) * hd], &p, &vc[kvh * hd..], kd);
    }
}

/// `sum_i a[i] * b[i]` with `b` widened to f32, in 16 lanes the compiler keeps in a register.
#[inline(always)]
fn dot_widened<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(&x, &y)| x * y.to_f32()).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..L {
            acc[l] += x[l] * y[l].to_f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out = sum_j p[j] * v[j * stride .. j * stride + out.len()]` (widened to f32). Accumulates
/// 16 lanes of `out` at a time in a fixed-size array the compiler keeps in a register across
/// all `j`, instead of a load and store of `out` per row of `v`.
#[inline(always)]
fn weighted_rows<E: KvElem>(out: &mut [f32], p: &[f32], v: &[E], stride: usize) {
    const L: usize = 16;
    let hd = out.len();
    let mut c = 0;
    while c + L <= hd {
        let mut acc = [0f32; L];
        for (j, &w) in p.iter().enumerate() {
            let vj: &[E; L] = v[j * stride + c..j * stride + c + L].try_into().expect("16 lanes");
            for l in 0..L {
                acc[l] += w * vj[l].to_f32();
            }
        }
        out[c..c + L].copy_from_slice(&acc);
        c += L;
    }
    if c < hd {
        out[c..].fill(0.0);
        for (j, &w) in p.iter().enumerate() {
            axpy_widened(&mut out[c..], w, &v[j * stride + c..j * stride + hd], E::to_f32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The obvious attention of one query row, in f64.
    fn reference_row(q: &[f32], kc: &[f32], vc: &[f32], s: RowShape) -> Vec<f32> {
        let positions = kc.len() / s.kd;
        let mut out = vec![0f32; s.n_heads * s.hd];
        for h in 0..s.n_heads {
            let g = h / s.rep;
            let scores: Vec<f64> = (0..positions)
                .map(|j| (0..s.hd).map(|d| q[h * s.hd + d] as f64 * kc[j * s.kd + g * s.hd + d] as f64).sum::<f64>() * s.scale as f64)
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let total: f64 = w.iter().sum();
            for d in 0..s.hd {
                out[h * s.hd + d] = ((0..positions).map(|j| w[j] * vc[j * s.kd + g * s.hd + d] as f64).sum::<f64>() / total) as f32;
            }
        }
        out
    }

    #[test]
    fn attention_rows_match_the_reference() {
        let val = |i: usize, seed: usize| (((i * 2654435761 + seed * 40503) % 1000) as f32 / 500.0 - 1.0) * 2.0;
        // (heads, kv heads, head dim): SmolLM2's GQA, plain multi-head, wide groups, and a head
        // size the vectorized kernel does not take.
        for (n_heads, n_kv, hd) in [(9, 3, 64), (4, 4, 64), (8, 2, 64), (6, 2, 24)] {
            for positions in [1, 2, 17, 140, 500, 4289] {
                let kd = n_kv * hd;
                let s = RowShape { n_heads, rep: n_heads / n_kv, hd, kd, scale: 1.0 / (hd as f32).sqrt() };
                let q: Vec<f32> = (0..n_heads * hd).map(|i| val(i, 1)).collect();
                let kc: Vec<f32> = (0..positions * kd).map(|i| val(i, 2)).collect();
                let vc: Vec<f32> = (0..positions * kd).map(|i| val(i, 3)).collect();
                check(&q, &kc, &vc, s, positions, "f32");
                // A bf16 cache: the same kernels on the rounded values, widened as they are read.
                let (mut k16, mut v16) = (KvRows::Bf16(Vec::new()), KvRows::Bf16(Vec::new()));
                k16.push(&kc);
                v16.push(&vc);
                let (KvRows::Bf16(kb), KvRows::Bf16(vb)) = (&k16, &v16) else { unreachable!() };
                let (kw, vw) = (k16.to_f32(kc.len()), v16.to_f32(vc.len()));
                assert!(kw.iter().zip(&kc).all(|(a, b)| (a - b).abs() <= b.abs() / 256.0), "bf16 rounding keeps 8 bits");
                assert_ne!(kw, kc, "the cache rounds");
                check_as(&q, kb, vb, &kw, &vw, s, positions, "bf16");
            }
        }
    }

    fn check(q: &[f32], kc: &[f32], vc: &[f32], s: RowShape, positions: usize, what: &str) {
        check_as(q, kc, vc, kc, vc, s, positions, what)
    }

    /// The kernels over a cache in `E` (`kc`, `vc`) against the f64 reference over the values
    /// they hold (`kw`, `vw`), whole and split into parts.
    #[allow(clippy::too_many_arguments)]
    fn check_as<E: KvElem>(q: &[f32], kc: &[E], vc: &[E], kw: &[f32], vw: &[f32], s: RowShape, positions: usize, what: &str) {
        let (n_heads, hd, n_kv) = (s.n_heads, s.hd, s.n_heads / s.rep);
        let want = reference_row(q, kw, vw, s);
        let mut fast = vec![f32::NAN; n_heads * hd];
        attend_row(&mut fast, q, kc, vc, s);
        let mut portable = vec![f32::NAN; n_heads * hd];
        let mut states = vec![Softmax::EMPTY; n_heads];
        attend_part_body(&mut portable, &mut states, q, kc, vc, s);
        normalize(&mut portable, &states, hd);
        // f32 sums over the positions: the tolerance grows with their number.
        let tol = |w: f32| 1e-5 * (1.0 + w.abs()) * (1.0 + positions as f32 / 1000.0);
        for (i, w) in want.iter().enumerate() {
            assert!((fast[i] - w).abs() < tol(*w), "{what} {n_heads}/{n_kv}/{hd}, {positions} positions, [{i}]: {} vs {w}", fast[i]);
            assert!((portable[i] - w).abs() < tol(*w), "{what} portable {n_heads}/{n_kv}/{hd}, {positions}: {} vs {w}", portable[i]);
        }
        // Positions split into parts, merged: the same output, and the same bits whether the
        // parts run in parallel (batch-1 decode) or one after the other (more rows).
        for parts in [2, 3, 7, 66, 67, 128] {
            let mut split = vec![f32::NAN; n_heads * hd];
            attend_row_split(&mut split, q, kc, vc, s, parts, true);
            for (i, w) in want.iter().enumerate() {
                assert!((split[i] - w).abs() < tol(*w), "{what} {parts} parts, {n_heads}/{n_kv}/{hd}, {positions}: {} vs {w}", split[i]);
            }
            let mut serial = vec![f32::NAN; n_heads * hd];
            attend_row_split(&mut serial, q, kc, vc, s, parts, false);
            assert!(serial.iter().zip(&split).all(|(a, b)| a.to_bits() == b.to_bits()), "{what} {parts} parts: serial and parallel differ");
        }
    }
}
