//! Dense f32 matrix products used by every adapter kernel.
//!
//! Semantics: `C = beta * C + alpha * A · B` for strided row/column views.
//! Dispatch: skinny products (few rows, contiguous `B`) go to [`super::skinny`], which streams
//! `B` once for all rows; everything else goes to the `gemm` crate (AVX-512 with `x86-v4`).

use gemm::Parallelism;

/// A read-only strided matrix view: element (i, j) is at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `[rows, cols]` matrix stored contiguously.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert!(data.len() >= rows * cols, "buffer {} < {rows}x{cols}", data.len());
        Self { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        Self { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn is_row_contiguous(&self) -> bool {
        self.cs == 1
    }

    fn span_ok(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Number of worker threads kernels may use (rayon's pool, set by RAYON_NUM_THREADS), or 1
/// inside [`serial`].
pub fn n_threads() -> usize {
    if SERIAL.with(|s| s.get()) {
        1
    } else {
        rayon::current_num_threads().max(1)
    }
}

/// Runs `f` with every kernel it calls on this thread single-threaded: for callers that are
/// already parallel over independent work (segments), where nested threading only adds
/// dispatch overhead.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let was = SERIAL.with(|s| s.replace(true));
    let out = f();
    SERIAL.with(|s| s.set(was));
    out
}

fn parallelism(flops: usize) -> Parallelism {
    // Below ~1 MFLOP, threading costs more than it saves.
    if flops < (1 << 20) || n_threads() == 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(n_threads())
    }
}

/// `c[m, n] (row-major, row stride ldc) = beta * c + alpha * a · b`.
///
/// `beta == 0` overwrites `c` without reading it (so `c` may hold garbage).
pub fn matmul(c: &mut [f32], ldc: usize, a: MatRef, b: MatRef, alpha: f32, beta: f32) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dims {} vs {}", k, b.rows);
    assert!(a.span_ok() && b.span_ok(), "matmul: view out of bounds");
    assert!(m == 0 || n == 0 || (m - 1) * ldc + n <= c.len(), "matmul: output too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        scale_rows(c, ldc, m, n, beta);
        return;
    }
    if super::skinny::wants(m, k, n) && b.is_row_contiguous() && a.is_row_contiguous() {
        super::skinny::matmul_rows(c, ldc, a.data, a.rs, m, k, b.data, b.rs, n, alpha, beta);
        return;
    }
    // SAFETY: bounds were checked above; gemm reads/writes only inside the described views.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            beta != 0.0,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism(2 * m * n * k),
        );
    }
}

fn scale_rows(c: &mut [f32], ldc: usize, m: usize, n: usize, beta: f32) {
    for i in 0..m {
        for v in &mut c[i * ldc..i * ldc + n] {
            *v = if beta == 0.0 { 0.0 } else { *v * beta };
        }
    }
}

/// The obvious triple loop, for tests of [`matmul`].
pub fn matmul_slow(c: &mut [f32], ldc: usize, a: MatRef, b: MatRef, alpha: f32, beta: f32) {
    for i in 0..a.rows {
        for j in 0..b.cols {
            let mut acc = 0f64;
            for p in 0..a.cols {
                acc += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
            }
            let old = if beta == 0.0 { 0.0 } else { beta * c[i * ldc + j] };
            c[i * ldc + j] = old + alpha * acc as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu::rand_vec;

    #[test]
    fn decode_rows_split_over_k_match_slow_in_pools_of_1_to_4() {
        // At most 4 rows with enough weight: the threads split k (see `skinny::split_k`),
        // unevenly with 3 threads, and the parts' sums are added into C with alpha and beta;
        // 5-8 rows take the column kernel. Strided operands (padding must stay untouched),
        // beta 0 over a C holding NaN (must not be read), beta 1, 0.5 and -2; in a team too.
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for &(m, k, n) in &[(1, 1536, 576), (4, 576, 1536), (2, 2048, 100), (3, 577, 1000), (1, 203, 4000), (1, 4099, 33), (2, 1200, 17), (8, 576, 1536), (5, 2048, 100)] {
                let (lda, ldb, ldc) = (k + 3, n + 5, n + 7);
                for beta in [0.0f32, 1.0, 0.5, -2.0] {
                    for in_team in [false, true] {
                        let a = rand_vec(m * lda, 4);
                        let b = rand_vec(k * ldb, 5);
                        let (av, bv) = (MatRef { data: &a, rows: m, cols: k, rs: lda, cs: 1 }, MatRef { data: &b, rows: k, cols: n, rs: ldb, cs: 1 });
                        let mut c1 = rand_vec(m * ldc, 6);
                        if beta == 0.0 {
                            c1.iter_mut().step_by(3).for_each(|v| *v = f32::NAN);
                        }
                        let mut c2 = c1.clone();
                        pool.install(|| {
                            if in_team {
                                super::super::team::with_team(|| matmul(&mut c1, ldc, av, bv, 0.7, beta));
                            } else {
                                matmul(&mut c1, ldc, av, bv, 0.7, beta);
                            }
                        });
                        matmul_slow(&mut c2, ldc, av, bv, 0.7, beta);
                        for i in 0..m {
                            for j in 0..ldc {
                                let (x, y) = (c1[i * ldc + j], c2[i * ldc + j]);
                                let what = format!("{threads} threads, {m}x{k}x{n} beta={beta} team={in_team} [{i}, {j}]: {x} vs {y}");
                                if j >= n {
                                    assert!(x.to_bits() == y.to_bits(), "padding changed: {what}");
                                } else {
                                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{what}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_other_rows() {
        // Up to 4 rows of a large enough weight take split-k, more take the column kernel
        // (8-row register blocks, partial ones); a row's bits must be the same in either, so a
        // sequence's logits do not depend on what shares its decode step. Pools of 1-3 threads
        // (2 and 3 split k), alpha and beta applied, an output too wide for split-k beyond 1 row.
        // Without AVX-512 the general GEMM library runs these shapes and makes no such promise.
        if !super::super::skinny::has_avx512() {
            return;
        }
        for &(k, n) in &[(576, 576), (1536, 576), (577, 1000), (576, 60000)] {
            let b = rand_vec(k * n, 7);
            let a = rand_vec(64 * k, 8);
            let c0 = rand_vec(64 * n, 9);
            for threads in 1..=3 {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let product = |rows: std::ops::Range<usize>| {
                        let mut c = c0[rows.start * n..rows.end * n].to_vec();
                        let av = MatRef { data: &a[rows.start * k..rows.end * k], rows: rows.len(), cols: k, rs: k, cs: 1 };
                        super::super::team::with_team(|| matmul(&mut c, n, av, MatRef::row_major(&b, k, n), 0.7, 0.5));
                        c
                    };
                    let ms: &[usize] = if n > 10_000 { &[1, 2, 9] } else { &[1, 2, 4, 5, 8, 9, 17, 64] };
                    for &m in ms {
                        let all = product(0..m);
                        for i in [0, m / 2, m - 1] {
                            let want = product(i..i + 1);
                            assert!(all[i * n..(i + 1) * n].iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "{k}x{n}, row {i} of {m}, {threads} threads: not the bits of the row alone");
                        }
                        let four = product(0..4.min(m));
                        assert!(four.iter().zip(&all).all(|(x, y)| x.to_bits() == y.to_bits()), "{k}x{n}, {m} rows: the first rows differ from a product of 4");
                    }
                });
            }
        }
    }

    #[test]
    fn matches_slow_across_shapes_and_strides() {
        for &(m, k, n) in &[(1, 1, 1), (1, 577, 129), (3, 16, 17), (32, 576, 576), (33, 64, 200), (130, 65, 47), (7, 300, 1000), (40, 96, 3001)] {
            for transpose_b in [false, true] {
                for beta in [0.0f32, 1.0] {
                    let a = rand_vec(m * k, 1);
                    let b = rand_vec(k * n, 2);
                    let bv = if transpose_b { MatRef::row_major(&b, n, k).t() } else { MatRef::row_major(&b, k, n) };
                    let av = MatRef::row_major(&a, m, k);
                    let mut c1 = rand_vec(m * n, 3);
                    let mut c2 = c1.clone();
                    matmul(&mut c1, n, av, bv, 0.7, beta);
                    matmul_slow(&mut c2, n, av, bv, 0.7, beta);
                    for (x, y) in c1.iter().zip(&c2) {
                        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m}x{k}x{n} t={transpose_b} beta={beta}: {x} vs {y}");
                    }
                }
            }
        }
    }
}
