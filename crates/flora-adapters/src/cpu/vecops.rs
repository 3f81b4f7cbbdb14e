//! Small vector kernels (written so LLVM vectorizes them) and scratch buffers.

use std::cell::RefCell;

/// `sum_i a[i] * b[i]` with 16 independent accumulators (vectorizes; f32 sums are not reassociated otherwise).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_widened(a, b, |x| x)
}

#[inline(always)]
fn dot_widened<T: Copy>(a: &[T], b: &[f32], widen: impl Fn(T) -> f32) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += widen(x[l]) * y[l];
        }
    }
    // Pairwise (tree) reduction: vector adds, not a chain of 15 dependent scalar adds.
    for width in [8, 4, 2, 1] {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    let mut s = acc[0];
    for (x, y) in ar.iter().zip(br) {
        s += widen(*x) * y;
    }
    s
}

/// `e^x` for every element, in place: Cody-Waite range reduction and a degree-6 polynomial,
/// branch-free so LLVM vectorizes it (libm's scalar `expf` was a tenth of a decode step).
/// Relative error below 3e-7; inputs under -87 give 0, over 88 give `e^88`.
#[inline(always)]
pub fn exp_in_place(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    for x in xs.iter_mut() {
        // Selects, not f32::clamp: clamp's NaN rules keep LLVM from vectorizing the loop.
        let v = if *x < -87.0 { -87.0 } else if *x > 88.0 { 88.0 } else { *x };
        let t = v * LOG2E + ROUND;
        let n = t - ROUND;
        let r = v - n * LN2_HI - n * LN2_LO;
        let p = 1.987_569_1e-4f32;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5;
        let e = p * r * r + r + 1.0;
        // n as an integer straight from t's low mantissa bits (an `as i32` cast saturates,
        // which LLVM does not vectorize); |n| <= 127 after the clamp.
        let ni = t.to_bits().wrapping_sub(ROUND.to_bits());
        let scale = f32::from_bits(ni.wrapping_add(127) << 23);
        *x = if *x < -87.0 { 0.0 } else { e * scale };
    }
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    axpy_widened(y, alpha, x, |v| v)
}

/// [`axpy`] with `x` widened to f32 by `widen`.
#[inline(always)]
pub fn axpy_widened<T: Copy>(y: &mut [f32], alpha: f32, x: &[T], widen: impl Fn(T) -> f32) {
    debug_assert_eq!(y.len(), x.len());
    for (o, &i) in y.iter_mut().zip(x) {
        *o += alpha * widen(i);
    }
}

/// `out = a o b` (element-wise).
#[inline]
pub fn mul_into(out: &mut [f32], a: &[f32], b: &[f32]) {
    debug_assert!(out.len() == a.len() && a.len() == b.len());
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x * y;
    }
}

/// `out += alpha * (a o b)`.
#[inline]
pub fn mul_acc(out: &mut [f32], alpha: f32, a: &[f32], b: &[f32]) {
    debug_assert!(out.len() == a.len() && a.len() == b.len());
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o += alpha * x * y;
    }
}

/// `y o= l`.
#[inline]
pub fn scale_by(y: &mut [f32], l: &[f32]) {
    debug_assert_eq!(y.len(), l.len());
    for (o, s) in y.iter_mut().zip(l) {
        *o *= s;
    }
}

thread_local! {
    static SCRATCH: RefCell<[Vec<f32>; 5]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
}

/// Runs `f` with thread-local scratch buffer number `which` (0..5) of at least `len` elements
/// (contents unspecified). Reusing buffers avoids page-faulting fresh multi-MB allocations on
/// every call. A nested call with the same `which` (the buffer is out) gets a fresh one.
pub fn with_scratch<R>(which: usize, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut s.borrow_mut()[which]));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|s| s.borrow_mut()[which] = buf);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut xs: Vec<f32> = (0..40000).map(|i| 88.0 - (i as f32) * 0.0044).collect();
        xs.extend([0.0, -1e-30, 1e-30, -86.9, -87.5, -1000.0, f32::NEG_INFINITY]);
        let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        exp_in_place(&mut xs);
        for (i, (g, w)) in xs.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 3e-7 * w + 1e-37, "exp #{i}: {g} vs {w}");
        }
    }

    #[test]
    fn dot_matches_f64() {
        for n in [0, 1, 15, 16, 17, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "n = {n}");
        }
    }
}
