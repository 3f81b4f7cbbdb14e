//! LoRA terms over 8-bit tables: bf16 inference's option that halves the bytes a decode step
//! streams per adapter (at 32 distinct adapters those bytes rival the base weights').
//!
//! Each rank row of A `[r, d_in]` and of B^T `[r, d_out]` is stored as 8-bit integers q in
//! [-127, 127] with one f32 scale s (its largest magnitude / 127): value = q * s. For each row
//! x (f32), in integer arithmetic wherever it is exact:
//!   qx = x / sx               (16-bit, |qx| <= 8191: sx = max|x| / 8191)
//!   t_j = sum_i qA[j, i] qx_i * (scale * sA_j * sx)     (shrink: 32-bit integer sums)
//!   u_j = t_j * sB_j;  qu = u / su                      (16-bit: su = max|u| / QU_MAX)
//!   y_c = sum_j qu_j qB^T[j, c] * su                    (expand; y is written, not added)
//! The integer sums are exact and are turned into f32 at fixed points (every 2048 inputs of
//! the shrink, once per output of the expansion), so the AVX-512 VNNI kernel (`vpdpwssd`:
//! pairs of 16-bit products summed into 32-bit lanes) and the portable loop give the same
//! bits. Relative to the quantized tables the 16-bit steps add about 1e-4 of the largest term.
//!
//! Storage: the integers in a byte table beside the bf16 copy, one byte per value at the f32
//! table's offsets (so a step streams slot after slot with no gaps), and the scales at the
//! start of the slot's region of the bf16 copy (sA then sB, `r` f32 each, little-endian; that
//! fits when d_in + d_out >= 4, see [`fits`]):
//! - in part (A, `r * d_in` bytes): [`super::lora_bf16`]'s arranged order (groups of up to 8
//!   rank rows, chunks of 32 inputs).
//! - out part (B^T, `r * d_out` bytes): for each block of [`BLOCK`] outputs, the rank rows in
//!   pairs: for each pair and each 16 outputs, the pair's two values of output 0, of output 1,
//!   ... (32 bytes: one 16-lane `vpdpwssd` operand); an odd rank's last row after them, 64
//!   values in order. Then the last `d_out % 64` outputs, each output's `r` values in turn.

use super::lora_bf16::{a_index, BLOCK, CHUNK};

/// Largest |qx|: a 2048-input integer sum of qA qx stays within i32.
const QX_MAX: f32 = 8191.0;
/// Inputs per exact integer sum of the shrink (64 chunks).
const SUPER: usize = 2048;

/// Whether a projection's LoRA slots have room for their scales in the 8-bit layout.
pub fn fits(d_in: usize, d_out: usize) -> bool {
    d_in + d_out >= 4
}

/// Largest |qu| for rank `r`: the expansion's integer sum stays within i32.
fn qu_max(r: usize) -> f32 {
    (i32::MAX as f64 / (127.0 * r as f64)).min(32767.0).floor() as f32
}

/// Position in the out part of B^T's value `(j, c)` (rank row j, output c).
fn b_index(j: usize, c: usize, r: usize, d_out: usize) -> usize {
    let full = d_out / BLOCK * BLOCK;
    if c >= full {
        return r * full + (c - full) * r + j;
    }
    let (block, within) = ((c / BLOCK) * r * BLOCK, c % BLOCK);
    if j + 1 == r && r % 2 == 1 {
        block + j * BLOCK + within
    } else {
        block + (j / 2) * 2 * BLOCK + (within / 16) * 32 + (within % 16) * 2 + j % 2
    }
}

/// The bytes of a slot's region of the bf16 copy (`u16` values as their little-endian bytes).
fn bytes(region: &[u16]) -> &[u8] {
    // SAFETY: any initialized u16 memory is valid as twice as many u8, with no alignment need.
    unsafe { std::slice::from_raw_parts(region.as_ptr() as *const u8, region.len() * 2) }
}

fn bytes_mut(region: &mut [u16]) -> &mut [u8] {
    // SAFETY: as in `bytes`; every byte pattern is a valid u16, so writes keep the slice valid.
    unsafe { std::slice::from_raw_parts_mut(region.as_mut_ptr() as *mut u8, region.len() * 2) }
}

/// The `u16` values at the start of a slot's region of the bf16 copy that hold its scales.
pub fn scale_values(r: usize) -> usize {
    4 * r
}

/// Scale k of a slot (sA_0.. sA_{r-1}, then sB_0..), from its region of the bf16 copy.
fn scale_at(region: &[u8], k: usize) -> f32 {
    f32::from_le_bytes(region[4 * k..4 * k + 4].try_into().expect("4 bytes"))
}

/// Quantizes rank rows (`plain [r, d]` row-major, finite) to integers written at `index(j, i)`
/// of `out`; returns the scales.
fn quantize_rows(out: &mut [u8], plain: &[f32], r: usize, d: usize, index: impl Fn(usize, usize) -> usize) -> Vec<f32> {
    (0..r)
        .map(|j| {
            let row = &plain[j * d..(j + 1) * d];
            let s = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (i, v) in row.iter().enumerate() {
                let q = if s > 0.0 { (v / s).round().clamp(-127.0, 127.0) } else { 0.0 };
                out[index(j, i)] = q as i8 as u8;
            }
            s
        })
        .collect()
}

/// Lays a LoRA slot out in 8 bits: `values = [A [r, d_in], B^T [r, d_out]]` (plain, f32) as
/// integers into `ints` (the slot's bytes of the byte table) and scales into `slot16` (its
/// region of the bf16 copy; its first [`scale_values`]).
pub fn quantize(slot16: &mut [u16], ints: &mut [u8], values: &[f32], r: usize, d_in: usize, d_out: usize) {
    let len = r * (d_in + d_out);
    assert!(fits(d_in, d_out), "lora_int8: {d_in} -> {d_out} leaves no room for scales");
    assert!(slot16.len() == len && ints.len() == len && values.len() == len, "lora_int8 quantize: {} and {} values for rank {r} over {d_in} -> {d_out}", slot16.len(), values.len());
    let (qa, qb) = ints.split_at_mut(r * d_in);
    let (a, bt) = values.split_at(r * d_in);
    let sa = quantize_rows(qa, a, r, d_in, |j, i| a_index(j, i, r, d_in));
    let sb = quantize_rows(qb, bt, r, d_out, |j, c| b_index(j, c, r, d_out));
    let scales = bytes_mut(slot16);
    for (k, s) in sa.iter().chain(&sb).enumerate() {
        scales[4 * k..4 * k + 4].copy_from_slice(&s.to_le_bytes());
    }
}

/// Rows `x [rows, d_in]` as the shrink reads them: `qx [rows, d_in]` (16-bit, |qx| <= 8191)
/// and one scale per row (`x ~ qx * sx`). Several projections of one input share them.
pub struct QuantizedRows {
    pub qx: Vec<i16>,
    pub sx: Vec<f32>,
}

impl QuantizedRows {
    pub fn new(x: &[f32], d_in: usize) -> Self {
        let rows = x.len().checked_div(d_in).unwrap_or(0);
        let (mut qx, mut sx) = (vec![0i16; rows * d_in], Vec::with_capacity(rows));
        for (q, xr) in qx.chunks_exact_mut(d_in.max(1)).zip(x.chunks_exact(d_in.max(1))) {
            #[cfg(target_arch = "x86_64")]
            if super::has_avx512() {
                // SAFETY: the CPU has AVX-512F; `q` and `xr` have the same length.
                sx.push(unsafe { x86::quantize_row(q, xr) });
                continue;
            }
            sx.push(quantize_row(q, xr));
        }
        Self { qx, sx }
    }

    /// Rows `start..start + len`.
    pub fn rows(&self, start: usize, len: usize, d_in: usize) -> (&[i16], &[f32]) {
        (&self.qx[start * d_in..(start + len) * d_in], &self.sx[start..start + len])
    }
}

/// `q = round(x / s)` (ties to even) with `s = max|x| / QX_MAX`; returns s. The kernel's
/// version computes the same f32 operations, so both give the same integers.
fn quantize_row(q: &mut [i16], x: &[f32]) -> f32 {
    let peak = x.iter().fold(0f32, peak_with);
    let (s, inv) = row_scale(peak);
    if s == 0.0 {
        q.fill(0);
        return s;
    }
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * inv).round_ties_even().clamp(-QX_MAX, QX_MAX) as i16;
    }
    s
}

/// The largest |x| so far with one more value: infinite once a value is not finite.
fn peak_with(m: f32, &v: &f32) -> f32 {
    if v.abs() <= f32::MAX {
        m.max(v.abs())
    } else {
        f32::INFINITY
    }
}

/// A row's scale and its inverse from its largest |x| (infinite when a value is not finite).
/// Rows that are not finite, or so small that the inverse would overflow, quantize to zero
/// (their base output is not finite, or the row's terms vanish at f32 precision anyway).
fn row_scale(peak: f32) -> (f32, f32) {
    if peak.is_finite() && peak >= f32::MIN_POSITIVE * QX_MAX {
        let s = peak / QX_MAX;
        (s, 1.0 / s)
    } else {
        (0.0, 0.0)
    }
}

/// `ys [rows, d_out] = scale * B^T (A x)` for each row of x, given as [`QuantizedRows`]
/// (`qx [rows, d_in]`, `sx [rows]`), with `slot16` the slot's region of the bf16 copy and
/// `ints` its bytes of the byte table, laid out by [`quantize`].
#[allow(clippy::too_many_arguments)]
pub fn terms(ys: &mut [f32], qx: &[i16], sx: &[f32], slot16: &[u16], ints: &[u8], r: usize, scale: f32, d_in: usize, d_out: usize) {
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        // SAFETY: the CPU has AVX-512 F, BW and VNNI.
        return terms_with(ys, qx, sx, slot16, ints, r, scale, d_in, d_out, |t, qx, qa| unsafe { x86::shrink(t, qx, qa) }, |y, qu, su, qb| unsafe { x86::expand(y, qu, su, qb) });
    }
    terms_with(ys, qx, sx, slot16, ints, r, scale, d_in, d_out, shrink_portable, expand_portable)
}

#[cfg(target_arch = "x86_64")]
fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512vnni"))
}

/// [`terms`] with a given shrink (`t_j = integer sums of qA qx as f32`, 2048 inputs at a time)
/// and expansion (`y_c = (sum_j qu_j qB^T[j, c]) as f32 * su`); the rest is shared.
#[allow(clippy::too_many_arguments)]
fn terms_with(
    ys: &mut [f32],
    qx: &[i16],
    sx: &[f32],
    slot16: &[u16],
    ints: &[u8],
    r: usize,
    scale: f32,
    d_in: usize,
    d_out: usize,
    shrink: impl Fn(&mut [f32], &[i16], &[u8]),
    expand: impl Fn(&mut [f32], &[i16], f32, &[u8]),
) {
    let len = r * (d_in + d_out);
    assert!(slot16.len() == len && ints.len() == len && fits(d_in, d_out), "lora_int8 terms: {} and {} values for rank {r} over {d_in} -> {d_out}", slot16.len(), ints.len());
    let rows = ys.len() / d_out.max(1);
    assert!(d_out > 0 && ys.len() % d_out == 0 && qx.len() == rows * d_in && sx.len() == rows, "lora_int8 terms: {} outputs for {} inputs", ys.len(), qx.len());
    let (qa, qb) = ints.split_at(r * d_in);
    let scales = bytes(slot16);
    // Per-rank vectors on the stack for the usual ranks (a decode step makes thousands of calls).
    let (mut t_small, mut qu_small, mut t_large, mut qu_large) = ([0f32; 64], [0i16; 64], Vec::new(), Vec::new());
    let (t, qu): (&mut [f32], &mut [i16]) = if r <= 64 {
        (&mut t_small[..r], &mut qu_small[..r])
    } else {
        t_large.resize(r, 0.0);
        qu_large.resize(r, 0);
        (&mut t_large, &mut qu_large)
    };
    let qmax = qu_max(r);
    for ((y, qx), &sx) in ys.chunks_exact_mut(d_out).zip(qx.chunks_exact(d_in)).zip(sx) {
        shrink(t, qx, qa);
        // u_j = t_j * (scale sA_j sx) * sB_j, then 16 bits with one scale for the row.
        for (j, tj) in t.iter_mut().enumerate() {
            *tj = *tj * (scale * scale_at(scales, j) * sx) * scale_at(scales, r + j);
        }
        let su = t.iter().fold(0f32, |m, v| m.max(v.abs())) / qmax;
        // (A scale whose inverse would overflow: the terms vanish at f32 precision.)
        let (su, inv) = if su >= f32::MIN_POSITIVE { (su, 1.0 / su) } else { (0.0, 0.0) };
        for (q, &u) in qu.iter_mut().zip(t.iter()) {
            *q = (u * inv).round_ties_even() as i16;
        }
        expand(y, qu, su, qb);
    }
}

/// Integer sum of rank row j's products over inputs `range` (value by value).
fn row_sum(qa: &[u8], qx: &[i16], j: usize, r: usize, range: std::ops::Range<usize>) -> i32 {
    range.map(|i| qa[a_index(j, i, r, qx.len())] as i8 as i32 * qx[i] as i32).sum()
}

/// The shrink's sums at the kernel's points: every [`SUPER`] inputs of the whole chunks, then
/// the inputs past the last whole chunk.
fn shrink_portable(t: &mut [f32], qx: &[i16], qa: &[u8]) {
    let (r, d_in) = (t.len(), qx.len());
    let full = d_in / CHUNK * CHUNK;
    for (j, tj) in t.iter_mut().enumerate() {
        *tj = (0..full).step_by(SUPER).map(|s| row_sum(qa, qx, j, r, s..(s + SUPER).min(full)) as f32).sum::<f32>();
        *tj += row_sum(qa, qx, j, r, full..d_in) as f32;
    }
}

/// Output c of the expansion: `(sum_j qu_j qB^T[j, c]) as f32 * su`.
fn expand_one(qu: &[i16], su: f32, qb: &[u8], c: usize, d_out: usize) -> f32 {
    let r = qu.len();
    qu.iter().enumerate().map(|(j, &q)| q as i32 * qb[b_index(j, c, r, d_out)] as i8 as i32).sum::<i32>() as f32 * su
}

fn expand_portable(y: &mut [f32], qu: &[i16], su: f32, qb: &[u8]) {
    let d_out = y.len();
    for (c, yc) in y.iter_mut().enumerate() {
        *yc = expand_one(qu, su, qb, c, d_out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{expand_one, peak_with, row_scale, row_sum, BLOCK, CHUNK, SUPER};
    use crate::cpu::lora_bf16::GROUP;
    use std::arch::x86_64::*;

    /// [`super::quantize_row`] 16 values at a time.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_row(q: &mut [i16], x: &[f32]) -> f32 {
        let n = x.len();
        let full = n / 16 * 16;
        let (mut peak, mut not_finite, max) = (_mm512_setzero_ps(), 0u16, _mm512_set1_ps(f32::MAX));
        for i in (0..full).step_by(16) {
            let v = _mm512_abs_ps(_mm512_loadu_ps(x.as_ptr().add(i)));
            peak = _mm512_max_ps(peak, v);
            // Not <= f32::MAX, or unordered: infinite or NaN.
            not_finite |= _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(v, max);
        }
        let peak = if not_finite != 0 { f32::INFINITY } else { _mm512_reduce_max_ps(peak) };
        let peak = x[full..].iter().fold(peak, peak_with);
        let (s, inv) = row_scale(peak);
        if s == 0.0 {
            q.fill(0);
            return s;
        }
        let (iv, lo, hi) = (_mm512_set1_ps(inv), _mm512_set1_epi32(-(super::QX_MAX as i32)), _mm512_set1_epi32(super::QX_MAX as i32));
        for i in (0..full).step_by(16) {
            // Round to nearest even (the default rounding mode), as `round_ties_even`.
            let qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), iv));
            let qi = _mm512_min_epi32(_mm512_max_epi32(qi, lo), hi);
            _mm256_storeu_si256(q.as_mut_ptr().add(i) as *mut __m256i, _mm512_cvtsepi32_epi16(qi));
        }
        for (q, &v) in q[full..].iter_mut().zip(&x[full..]) {
            *q = (v * inv).round_ties_even().clamp(-super::QX_MAX, super::QX_MAX) as i16;
        }
        s
    }

    /// 32 integers at `p` as 16-bit lanes.
    #[inline(always)]
    unsafe fn widen(p: *const u8) -> __m512i {
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const __m256i))
    }

    /// The shrink's sums for one row: rank rows in groups of up to 8, each group one pass over
    /// its contiguous part of A with qx's chunk loaded once for all its rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn shrink(t: &mut [f32], qx: &[i16], qa: &[u8]) {
        let (r, d_in) = (t.len(), qx.len());
        for q in 0..r.div_ceil(GROUP) {
            let rows = &mut t[q * GROUP..(q * GROUP + GROUP).min(r)];
            let part = &qa[q * GROUP * d_in..q * GROUP * d_in + rows.len() * d_in];
            match rows.len() {
                8 => group::<8>(rows, qx, part),
                7 => group::<7>(rows, qx, part),
                6 => group::<6>(rows, qx, part),
                5 => group::<5>(rows, qx, part),
                4 => group::<4>(rows, qx, part),
                3 => group::<3>(rows, qx, part),
                2 => group::<2>(rows, qx, part),
                _ => group::<1>(rows, qx, part),
            }
        }
        let full = d_in / CHUNK * CHUNK;
        for (j, tj) in t.iter_mut().enumerate() {
            *tj += row_sum(qa, qx, j, r, full..d_in) as f32;
        }
    }

    /// `G` rank rows' sums over the whole chunks (`part` is their group, arranged), exact in
    /// 32 bits over each [`SUPER`] inputs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group<const G: usize>(t: &mut [f32], qx: &[i16], part: &[u8]) {
        let (ap, xp) = (part.as_ptr(), qx.as_ptr());
        let chunks = qx.len() / CHUNK;
        t.fill(0.0);
        for s in (0..chunks).step_by(SUPER / CHUNK) {
            let mut acc = [_mm512_setzero_si512(); G];
            for c in s..(s + SUPER / CHUNK).min(chunks) {
                let xv = _mm512_loadu_si512(xp.add(CHUNK * c) as *const _);
                for (jj, acc_j) in acc.iter_mut().enumerate() {
                    *acc_j = _mm512_dpwssd_epi32(*acc_j, widen(ap.add((c * G + jj) * CHUNK)), xv);
                }
            }
            for (tj, acc_j) in t.iter_mut().zip(acc) {
                *tj += _mm512_reduce_add_epi32(acc_j) as f32;
            }
        }
    }

    /// The expansion: per block of 64 outputs, four 16-lane integer sums over the rank pairs
    /// (the block's integers read as one run), each output then scaled by `su`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn expand(y: &mut [f32], qu: &[i16], su: f32, qb: &[u8]) {
        let (r, d_out) = (qu.len(), y.len());
        let (bp, yp) = (qb.as_ptr(), y.as_mut_ptr());
        let full = d_out / BLOCK * BLOCK;
        let sv = _mm512_set1_ps(su);
        for c in (0..full).step_by(BLOCK) {
            let block = bp.add(c * r);
            let mut acc = [_mm512_setzero_si512(); 4];
            for (p, pair) in qu.chunks_exact(2).enumerate() {
                let w = _mm512_set1_epi32((pair[0] as u16 as i32) | ((pair[1] as i32) << 16));
                for (l, acc_l) in acc.iter_mut().enumerate() {
                    *acc_l = _mm512_dpwssd_epi32(*acc_l, widen(block.add(p * 2 * BLOCK + 32 * l)), w);
                }
            }
            if r % 2 == 1 {
                // The odd rank's last row: each 32-bit lane's high half is the value's sign
                // extension, multiplied by the zero high half of w.
                let w = _mm512_set1_epi32(qu[r - 1] as u16 as i32);
                for (l, acc_l) in acc.iter_mut().enumerate() {
                    let b = _mm512_cvtepi8_epi32(_mm_loadu_si128(block.add((r - 1) * BLOCK + 16 * l) as *const __m128i));
                    *acc_l = _mm512_dpwssd_epi32(*acc_l, b, w);
                }
            }
            for (l, acc_l) in acc.iter().enumerate() {
                _mm512_storeu_ps(yp.add(c + 16 * l), _mm512_mul_ps(_mm512_cvtepi32_ps(*acc_l), sv));
            }
        }
        for (c, yc) in y.iter_mut().enumerate().skip(full) {
            *yc = expand_one(qu, su, qb, c, d_out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::rand_vec as values;

    /// The values a slot's integers and scales stand for, `[A [r, d_in], B^T [r, d_out]]`.
    fn dequantized(slot16: &[u16], ints: &[u8], r: usize, d_in: usize, d_out: usize) -> Vec<f32> {
        let (scales, (qa, qb)) = (bytes(slot16), ints.split_at(r * d_in));
        let a = (0..r).flat_map(|j| (0..d_in).map(move |i| qa[a_index(j, i, r, d_in)] as i8 as f32 * scale_at(scales, j)));
        let bt = (0..r).flat_map(|j| (0..d_out).map(move |c| qb[b_index(j, c, r, d_out)] as i8 as f32 * scale_at(scales, r + j)));
        a.chain(bt).collect()
    }

    /// A quantized slot: (original values, its region of the bf16 copy, its integers, the
    /// values they stand for).
    fn slot(r: usize, d_in: usize, d_out: usize) -> (Vec<f32>, Vec<u16>, Vec<u8>, Vec<f32>) {
        let mut plain = values(r * (d_in + d_out), 7);
        // A zero rank row (scale 0) and one with a single large value.
        plain[..d_in].fill(0.0);
        if r > 1 {
            plain[d_in + 3] = 9.0;
        }
        let original = plain.clone();
        let (mut slot16, mut ints) = (vec![0u16; plain.len()], vec![0u8; plain.len()]);
        quantize(&mut slot16, &mut ints, &plain, r, d_in, d_out);
        let quantized = dequantized(&slot16, &ints, r, d_in, d_out);
        (original, slot16, ints, quantized)
    }

    #[test]
    fn the_out_layout_places_every_value_once() {
        for (r, d_out) in [(1, 64), (8, 192), (9, 130), (17, 63), (3, 1)] {
            let mut seen = vec![false; r * d_out];
            for j in 0..r {
                for c in 0..d_out {
                    let at = b_index(j, c, r, d_out);
                    assert!(!seen[at], "B ({j}, {c}) of rank {r} lands on a used place");
                    seen[at] = true;
                }
            }
        }
    }

    #[test]
    fn rows_quantize_alike_on_every_path() {
        for d_in in [8, 31, 576, 1537] {
            let mut x = values(d_in, 5);
            x[d_in / 2] = 3.0;
            let q = QuantizedRows::new(&x, d_in);
            let mut portable = vec![0i16; d_in];
            let s = quantize_row(&mut portable, &x);
            assert_eq!((q.qx.clone(), q.sx[0].to_bits()), (portable.clone(), s.to_bits()), "{d_in} inputs");
            assert_eq!(q.qx[d_in / 2], QX_MAX as i16);
            assert!(x.iter().zip(&q.qx).all(|(&v, &k)| (v - k as f32 * s).abs() <= 0.5 * s * (1.0 + 1e-5)), "{d_in} inputs: a value off by more than half a step");
            // Rows with a value that is not finite (in the vector part or the tail), or too
            // small for the scale's inverse, quantize to zero on both paths.
            for (at, v) in [(3, f32::NAN), (3, f32::INFINITY), (d_in - 1, f32::NAN), (d_in - 1, f32::NEG_INFINITY)] {
                let mut bad = x.clone();
                bad[at] = v;
                let q = QuantizedRows::new(&bad, d_in);
                let s = quantize_row(&mut portable, &bad);
                assert!(q.sx[0] == 0.0 && s == 0.0 && q.qx.iter().chain(&portable).all(|&k| k == 0), "{d_in} inputs, {v} at {at}");
            }
            let tiny: Vec<f32> = x.iter().map(|v| v * 1e-36).collect();
            let q = QuantizedRows::new(&tiny, d_in);
            let s = quantize_row(&mut portable, &tiny);
            assert!(q.sx[0] == 0.0 && s == 0.0 && q.qx.iter().chain(&portable).all(|&k| k == 0), "{d_in} tiny inputs");
        }
    }

    #[test]
    fn quantized_values_are_within_half_a_step_of_the_originals() {
        for (r, d_in, d_out) in [(8, 576, 1536), (3, 70, 130), (17, 31, 63), (1, 3, 1)] {
            let (original, _, _, quantized) = slot(r, d_in, d_out);
            for (part, d, off) in [("A", d_in, 0), ("B", d_out, r * d_in)] {
                for j in 0..r {
                    let row = |v: &[f32]| v[off + j * d..off + (j + 1) * d].to_vec();
                    let (o, q) = (row(&original), row(&quantized));
                    let step = o.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    for (i, (o, q)) in o.iter().zip(&q).enumerate() {
                        assert!((o - q).abs() <= step * 0.5 * (1.0 + 1e-5), "{part} ({j}, {i}) of rank {r}: {o} became {q}, step {step}");
                    }
                }
            }
        }
    }

    /// The kernel (AVX-512 VNNI where the CPU has it) equals the portable loop bit for bit, and
    /// both the f64 reference on the quantized values within the 16-bit steps, over ranks
    /// around the group size, odd ranks, and dims with and without tails (over 2048 inputs
    /// too, where the integer sums restart).
    #[test]
    fn terms_match_the_portable_loop_and_the_reference() {
        for (rows, r, d_in, d_out, scale) in
            [(1, 8, 576, 1536, 2.0), (3, 1, 64, 64, 1.0), (2, 9, 70, 130, 0.5), (4, 16, 96, 192, 0.25), (1, 17, 31, 63, 1.0), (2, 64, 128, 256, 0.125), (2, 65, 96, 128, 0.5), (1, 3, 8, 5, 1.0), (1, 1, 2, 2, 1.0), (2, 8, 4200, 70, 1.0), (2, 7, 64, 200, 1.0)]
        {
            let (_, slot16, ints, quantized) = slot(r, d_in, d_out);
            let x = values(rows * d_in, 3);
            let q = QuantizedRows::new(&x, d_in);
            let mut ys = vec![f32::NAN; rows * d_out];
            terms(&mut ys, &q.qx, &q.sx, &slot16, &ints, r, scale, d_in, d_out);
            let mut portable = vec![f32::NAN; rows * d_out];
            terms_with(&mut portable, &q.qx, &q.sx, &slot16, &ints, r, scale, d_in, d_out, shrink_portable, expand_portable);
            let what = format!("rows {rows} rank {r} {d_in}->{d_out}");
            assert!(ys.iter().zip(&portable).all(|(k, p)| k.to_bits() == p.to_bits()), "{what}: kernel and portable loop differ");
            let (a, bt) = quantized.split_at(r * d_in);
            let want = crate::cpu::lora_reference(&x, a, bt, r, scale, d_in, d_out);
            let peak = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (c, (g, w)) in ys.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 5e-4 * peak.max(1e-3), "{what}: output {c}: {g} against {w}");
            }
        }
    }
}
