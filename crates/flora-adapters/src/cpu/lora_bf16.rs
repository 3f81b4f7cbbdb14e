//! LoRA terms over bf16 tables, the per-row kernel of bf16 inference.
//!
//! For each row x (already rounded to bf16 pairs, as the base GEMM reads it):
//!   t = scale * A x       (shrink, A `[r, d_in]`)
//!   y = B t               (expand, stored as B^T `[r, d_out]`; y is written, not added)
//! At 32 distinct adapters a decode step streams more adapter bytes than base weights, so the
//! tables are laid out in the order the kernel reads them: one forward stream per slot part,
//! which the hardware prefetcher follows, and every value read once per row.
//!
//! Layout of a slot's bf16 copy (the f32 table keeps the plain layout; [`arrange`] converts):
//! - in part (A, `r * d_in` values): rank rows in groups of up to [`GROUP`]; a group of `g`
//!   rows holds, for each chunk of [`CHUNK`] inputs, its `g` rows' 32 values in turn, then the
//!   `g` rows' last `d_in % 32` values row by row. Group `q` starts at `q * GROUP * d_in`.
//! - out part (B^T, `r * d_out` values): for each block of [`BLOCK`] outputs, the `r` rows' 64
//!   values in turn; then the `r` rows' last `d_out % 64` values row by row.
//!
//! AVX512-BF16 kernel where the CPU has it (`vdpbf16ps` for the shrink, up to 8 rank rows at
//! once sharing each load of x; four 16-lane FMA chains per output block for the expansion);
//! a portable loop over the same layout elsewhere. `cpu::lora_reference` (tests) is the obvious version in f64
//! over the plain layout, for tests.

use super::bf16::bf16_to_f32;
#[cfg(target_arch = "x86_64")]
use super::bf16::has_native_bf16;

/// Rank rows whose shrink runs together.
pub(super) const GROUP: usize = 8;
/// Inputs per shrink chunk: one 512-bit load of bf16 values.
pub(super) const CHUNK: usize = 32;
/// Outputs per expansion block: four 16-lane accumulators.
pub(super) const BLOCK: usize = 64;

/// Position in the arranged in part of A's value `(j, i)` (rank row j, input i).
pub(super) fn a_index(j: usize, i: usize, r: usize, d_in: usize) -> usize {
    let (q, jj) = (j / GROUP, j % GROUP);
    let g = GROUP.min(r - q * GROUP);
    let full = d_in / CHUNK * CHUNK;
    let base = q * GROUP * d_in;
    if i < full {
        base + (i / CHUNK) * g * CHUNK + jj * CHUNK + i % CHUNK
    } else {
        base + g * full + jj * (d_in - full) + (i - full)
    }
}

/// Position in the arranged out part of B^T's value `(j, c)` (rank row j, output c).
fn b_index(j: usize, c: usize, r: usize, d_out: usize) -> usize {
    let full = d_out / BLOCK * BLOCK;
    if c < full {
        (c / BLOCK) * r * BLOCK + j * BLOCK + c % BLOCK
    } else {
        r * full + j * (d_out - full) + (c - full)
    }
}

/// Rearranges a LoRA slot's bf16 copy (`slot = [A [r, d_in], B^T [r, d_out]]`, plain
/// row-major) into the kernel's layout, in place.
pub fn arrange(slot: &mut [u16], r: usize, d_in: usize, d_out: usize) {
    assert_eq!(slot.len(), r * (d_in + d_out), "lora_bf16 arrange: {} values for rank {r} over {d_in} -> {d_out}", slot.len());
    let plain = slot.to_vec();
    let (a, bt) = plain.split_at(r * d_in);
    let (a_out, b_out) = slot.split_at_mut(r * d_in);
    for j in 0..r {
        for i in 0..d_in {
            a_out[a_index(j, i, r, d_in)] = a[j * d_in + i];
        }
        for c in 0..d_out {
            b_out[b_index(j, c, r, d_out)] = bt[j * d_out + c];
        }
    }
}

/// `ys [rows, d_out] = scale * B^T (A x)` for each row of `x16 [rows, ceil(d_in / 2)]` (bf16
/// pairs), with `a16` and `bt16` the slot's parts in the arranged layout.
#[allow(clippy::too_many_arguments)]
pub fn terms(ys: &mut [f32], x16: &[u32], a16: &[u16], bt16: &[u16], r: usize, scale: f32, d_in: usize, d_out: usize) {
    let kp = d_in.div_ceil(2);
    assert!(a16.len() == r * d_in && bt16.len() == r * d_out, "lora_bf16 terms: parts of {} and {} values for rank {r}", a16.len(), bt16.len());
    assert!(d_out > 0 && ys.len() / d_out * kp <= x16.len() && ys.len() % d_out == 0, "lora_bf16 terms: {} outputs for {} input pairs", ys.len(), x16.len());
    // `t [r]` on the stack for the usual ranks (a decode step makes thousands of these calls).
    let (mut small, mut large) = ([0f32; 64], Vec::new());
    let t: &mut [f32] = if r <= small.len() {
        &mut small[..r]
    } else {
        large.resize(r, 0.0);
        &mut large
    };
    let rows = ys.chunks_exact_mut(d_out).zip(x16.chunks_exact(kp));
    #[cfg(target_arch = "x86_64")]
    if has_native_bf16() {
        for (y, xw) in rows {
            // SAFETY: the CPU has AVX512-BF16; the shapes were checked above.
            unsafe {
                x86::shrink(t, xw, a16, d_in);
                t.iter_mut().for_each(|tj| *tj *= scale);
                x86::expand(y, t, bt16, d_out);
            }
        }
        return;
    }
    for (y, xw) in rows {
        portable_row(y, t, xw, a16, bt16, scale, d_in, d_out);
    }
}

/// Value `i` of a row given as bf16 pairs.
fn pair_value(xw: &[u32], i: usize) -> f32 {
    let w = xw[i / 2];
    bf16_to_f32(if i % 2 == 0 { w as u16 } else { (w >> 16) as u16 })
}

/// Output `c` of the expansion, one rank row at a time: `sum_j t_j B^T[j, c]` (t scaled).
fn expand_one(t: &[f32], bt16: &[u16], c: usize, d_out: usize) -> f32 {
    t.iter().enumerate().fold(0f32, |acc, (j, &tj)| tj.mul_add(bf16_to_f32(bt16[b_index(j, c, t.len(), d_out)]), acc))
}

/// One row of [`terms`], one value at a time over the arranged layout.
#[allow(clippy::too_many_arguments)]
fn portable_row(y: &mut [f32], t: &mut [f32], xw: &[u32], a16: &[u16], bt16: &[u16], scale: f32, d_in: usize, d_out: usize) {
    let r = t.len();
    for (j, tj) in t.iter_mut().enumerate() {
        *tj = scale * (0..d_in).map(|i| bf16_to_f32(a16[a_index(j, i, r, d_in)]) * pair_value(xw, i)).sum::<f32>();
    }
    for (c, yc) in y.iter_mut().enumerate() {
        *yc = expand_one(t, bt16, c, d_out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{a_index, bf16_to_f32, expand_one, pair_value, BLOCK, CHUNK, GROUP};
    use std::arch::x86_64::*;

    /// `t = A x` (unscaled) for one row: rank rows in groups of up to 8, each group one pass
    /// over its contiguous part of A with x's chunk loaded once for all its rows.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn shrink(t: &mut [f32], xw: &[u32], a16: &[u16], d_in: usize) {
        let r = t.len();
        for q in 0..r.div_ceil(GROUP) {
            let rows = &mut t[q * GROUP..(q * GROUP + GROUP).min(r)];
            let part = &a16[q * GROUP * d_in..q * GROUP * d_in + rows.len() * d_in];
            match rows.len() {
                8 => group::<8>(rows, xw, part, d_in),
                7 => group::<7>(rows, xw, part, d_in),
                6 => group::<6>(rows, xw, part, d_in),
                5 => group::<5>(rows, xw, part, d_in),
                4 => group::<4>(rows, xw, part, d_in),
                3 => group::<3>(rows, xw, part, d_in),
                2 => group::<2>(rows, xw, part, d_in),
                _ => group::<1>(rows, xw, part, d_in),
            }
        }
        // The inputs past the last whole chunk, value by value.
        let full = d_in / CHUNK * CHUNK;
        for (j, tj) in t.iter_mut().enumerate() {
            for i in full..d_in {
                *tj += bf16_to_f32(a16[a_index(j, i, r, d_in)]) * pair_value(xw, i);
            }
        }
    }

    /// `G` rank rows' sums over the whole chunks (`part` is their group, arranged).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn group<const G: usize>(t: &mut [f32], xw: &[u32], part: &[u16], d_in: usize) {
        let (ap, xp) = (part.as_ptr(), xw.as_ptr());
        let mut acc = [_mm512_setzero_ps(); G];
        for c in 0..d_in / CHUNK {
            let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(xp.add(16 * c) as *const _));
            for (jj, acc_j) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_loadu_si512(ap.add((c * G + jj) * CHUNK) as *const _));
                *acc_j = _mm512_dpbf16_ps(*acc_j, av, xv);
            }
        }
        for (tj, acc_j) in t.iter_mut().zip(acc) {
            *tj = _mm512_reduce_add_ps(acc_j);
        }
    }

    /// `y = B^T t` (t scaled): per block of 64 outputs, one FMA chain per 16 lanes over the
    /// rank rows in order, B^T's block read as one run.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn expand(y: &mut [f32], t: &[f32], bt16: &[u16], d_out: usize) {
        let r = t.len();
        let (bp, yp) = (bt16.as_ptr(), y.as_mut_ptr());
        let widen = |p: *const u16| -> __m512 { _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const _)), 16)) };
        let full = d_out / BLOCK * BLOCK;
        for c in (0..full).step_by(BLOCK) {
            let block = bp.add(c * r);
            let mut acc = [_mm512_setzero_ps(); 4];
            for (j, &tj) in t.iter().enumerate() {
                let tj = _mm512_set1_ps(tj);
                for (l, acc_l) in acc.iter_mut().enumerate() {
                    *acc_l = _mm512_fmadd_ps(tj, widen(block.add(j * BLOCK + 16 * l)), *acc_l);
                }
            }
            for (l, acc_l) in acc.iter().enumerate() {
                _mm512_storeu_ps(yp.add(c + 16 * l), *acc_l);
            }
        }
        for (c, yc) in y.iter_mut().enumerate().skip(full) {
            *yc = expand_one(t, bt16, c, d_out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::bf16::{f32_to_bf16, round_rows};
    use crate::cpu::rand_vec as values;

    #[test]
    fn the_layout_places_every_value_once() {
        for (r, d_in, d_out) in [(1, 32, 64), (8, 576, 192), (9, 70, 130), (17, 31, 63), (3, 1, 1)] {
            for (part, d, index) in [("A", d_in, a_index as fn(usize, usize, usize, usize) -> usize), ("B", d_out, b_index)] {
                let mut seen = vec![false; r * d];
                for j in 0..r {
                    for i in 0..d {
                        let at = index(j, i, r, d);
                        assert!(!seen[at], "{part} ({j}, {i}) of rank {r} over {d} lands on a used place");
                        seen[at] = true;
                    }
                }
            }
        }
    }

    /// The kernel (AVX512-BF16 where the CPU has it, else the portable loop) against the f64
    /// reference on the same bf16 values, over ranks around the group size and dims with and
    /// without tails.
    #[test]
    fn terms_match_the_reference() {
        for (rows, r, d_in, d_out, scale) in
            [(1, 8, 576, 1536, 2.0), (3, 1, 64, 64, 1.0), (2, 9, 70, 130, 0.5), (4, 16, 96, 192, 0.25), (1, 17, 31, 63, 1.0), (2, 64, 128, 256, 0.125), (2, 65, 96, 128, 0.5), (1, 3, 2, 1, 1.0)]
        {
            let round = |v: Vec<f32>| v.into_iter().map(|x| bf16_to_f32(f32_to_bf16(x))).collect::<Vec<f32>>();
            let (a, bt, x) = (round(values(r * d_in, 1)), round(values(r * d_out, 2)), round(values(rows * d_in, 3)));
            let mut slot: Vec<u16> = a.iter().chain(&bt).map(|&v| f32_to_bf16(v)).collect();
            arrange(&mut slot, r, d_in, d_out);
            let kp = d_in.div_ceil(2);
            let mut x16 = vec![0u32; rows * kp];
            round_rows(&mut x16, &x, d_in, rows, d_in);
            let mut ys = vec![f32::NAN; rows * d_out];
            let (a16, bt16) = slot.split_at(r * d_in);
            terms(&mut ys, &x16, a16, bt16, r, scale, d_in, d_out);
            // The portable loop too, on any CPU.
            let mut portable = vec![f32::NAN; rows * d_out];
            let mut t = vec![0f32; r];
            for (y, xw) in portable.chunks_exact_mut(d_out).zip(x16.chunks_exact(kp)) {
                portable_row(y, &mut t, xw, a16, bt16, scale, d_in, d_out);
            }
            let want = crate::cpu::lora_reference(&x, &a, &bt, r, scale, d_in, d_out);
            let peak = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (path, got) in [("kernel", &ys), ("portable", &portable)] {
                for (c, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-5 * peak.max(1e-3) * (d_in as f32).sqrt(), "{path}: rows {rows} rank {r} {d_in}->{d_out}: output {c}: {g} against {w}");
                }
            }
        }
    }
}
