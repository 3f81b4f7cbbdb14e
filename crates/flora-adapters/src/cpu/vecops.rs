//! Small vector kernels (written so LLVM vectorizes them) and scratch buffers.

use std::cell::RefCell;

/// `sum_i a[i] * b[i]` with 16 independent accumulators (vectorizes; f32 sums are not reassociated otherwise).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    for (o, i) in y.iter_mut().zip(x) {
        *o += alpha * i;
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
    static SCRATCH: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// Runs `f` with thread-local scratch buffer number `which` (0..3) of at least `len` elements
/// (contents unspecified). Reusing buffers avoids page-faulting fresh multi-MB allocations on
/// every call. Do not nest calls with the same `which`.
pub fn with_scratch<R>(which: usize, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut s.borrow_mut()[which]));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|s| s.borrow_mut()[which] = buf);
    out
}
