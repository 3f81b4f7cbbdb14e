//! Skinny matrix product for decode-shaped work: `C[m, n] = beta*C + alpha * A[m, k] · B[k, n]`
//! with few rows `m` (one per sequence in a decode step) and a large row-major `B`
//! (a base weight stored `[d_in, d_out]`).
//!
//! Blocked general GEMM libraries pack `B` for reuse across many rows; with m = 32 that packing
//! is pure overhead. Here each `KC x NR` block of `B` is read straight from memory once and
//! reused from L1 for every `MR`-row block of `A`, so the weight is streamed once per call, in
//! k-blocks of KC whole rows (sequential reads). Columns are split across threads; for decode
//! rows (at most 4, small outputs) `k` is, and each thread streams its run of rows in order.
//! Either way a row's result has the same bits (see `fold_part`).
//!
//! Only compiled into use on x86-64 with AVX-512F (checked at run time); elsewhere
//! [`wants`] returns false and callers use the general path.

/// Rows per register block.
const MR: usize = 8;
/// Columns per register block: three 16-lane vectors.
const NR: usize = 48;
/// Rows of `B` per k-block: few enough that the hardware prefetcher can follow every row
/// stream (with 128 rows, batch-8 decode of the real model ran 2x slower).
const KC: usize = 16;
/// Largest `m` this kernel is chosen for.
pub const MAX_ROWS: usize = 64;

/// Whether the skinny kernel should run a product of this shape on this machine.
pub fn wants(m: usize, k: usize, n: usize) -> bool {
    m <= MAX_ROWS && k >= 8 && n >= 16 && has_avx512()
}

pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Row-major operands: `a` with row stride `lda`, `b` with row stride `ldb`, `c` with `ldc`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    m: usize,
    k: usize,
    b: &[f32],
    ldb: usize,
    n: usize,
    alpha: f32,
    beta: f32,
) {
    assert!(has_avx512(), "skinny kernel needs AVX-512F");
    assert!(m >= 1 && (m - 1) * lda + k <= a.len(), "skinny: A out of bounds");
    assert!((k - 1) * ldb + n <= b.len(), "skinny: B out of bounds");
    assert!((m - 1) * ldc + n <= c.len(), "skinny: C out of bounds");
    let n_panels = n.div_ceil(NR);
    // Threads pay off once there is enough arithmetic, or enough weight to stream (decode at
    // batch 1 is bandwidth-bound: two cores pull more bytes than one).
    let (flops, b_bytes) = (2 * m * n * k, 4 * k * n);
    let threads = super::matmul::n_threads();
    let parts = k_parts(k, n, threads);
    if m <= STREAM_MAX_ROWS && parts > 1 && m * n <= STREAM_MAX_OUTPUT {
        return split_k(c, ldc, a, lda, m, k, b, ldb, n, alpha, beta, parts);
    }
    // One chunk per thread (more made batch-1 f32 decode slower), claimed through `team`.
    let n_chunks = if flops < (1 << 20) && b_bytes < SPLIT_MIN_B_BYTES { 1 } else { threads.min(n_panels) };
    let panels_per_chunk = n_panels.div_ceil(n_chunks);
    let cp = SendPtr(c.as_mut_ptr());
    let run = |chunk: usize| {
        let j0 = chunk * panels_per_chunk * NR;
        let j1 = ((chunk + 1) * panels_per_chunk * NR).min(n);
        if j0 < j1 {
            let cp = cp;
            // Part sums for column chunks of whole panels, at most SUMS_FLOATS in all.
            let chunk_cols = (SUMS_FLOATS / m / NR).max(1) * NR;
            super::vecops::with_scratch(PART_SUMS, m * chunk_cols.min(j1 - j0), |sums| {
                // SAFETY: chunks write disjoint column ranges of C; bounds asserted above;
                // `sums` holds `[m, chunk]` part sums.
                unsafe { x86::run_columns(cp.0, ldc, a.as_ptr(), lda, m, k, b.as_ptr(), ldb, j0, j1, alpha, beta, parts, sums) }
            });
        }
    };
    super::team::par_for(n_chunks, run);
}

/// The parts `k` is cut into, which fix every output's arithmetic whichever way the work is
/// split (see [`fold_part`]): at most the threads, and few enough that the serial sum of the
/// parts' outputs (parts x m x n) stays under an eighth of one part's product ((k / parts) x m
/// x n); one for weights under 512 KiB (too small to split). Not a function of `m`: a row's
/// result is the same bits in a product of 1 row or 64.
fn k_parts(k: usize, n: usize, threads: usize) -> usize {
    if 4 * k * n < SPLIT_MIN_B_BYTES {
        1
    } else {
        threads.min(((k / 8) as f64).sqrt() as usize).max(1)
    }
}

/// Rows `k0..k1` of B in part `t` of `parts` (see [`k_parts`]).
fn part_bounds(k: usize, parts: usize, t: usize) -> (usize, usize) {
    (t * k / parts, (t + 1) * k / parts)
}

/// Every output of the kernel, whichever path computes it: part `t`'s sum `s_t` is one fused
/// multiply-add chain over its rows of B in order, starting from 0 (the column kernel carries
/// it across k-blocks through memory, `split_k` in one thread's run); then
/// `c = beta * c` (0 for `beta == 0`, without reading `c`) and `c += alpha * s_t` for t = 0, 1, ...
/// Both paths call this, so a row's bits depend on the thread count (through [`k_parts`]) but
/// not on the other rows of its product.
#[inline]
fn fold_part(row: &mut [f32], sums: &[f32], alpha: f32, beta: f32, first: bool) {
    if first {
        if beta == 0.0 {
            row.fill(0.0);
        } else if beta != 1.0 {
            row.iter_mut().for_each(|v| *v *= beta);
        }
    }
    super::vecops::axpy(row, alpha, sums);
}

/// Decode rows (at most [`STREAM_MAX_ROWS`]) whose partial output fits in L2 (`m * n` floats, see
/// [`STREAM_MAX_OUTPUT`]): the threads split `k`, not the columns, and each streams its run of
/// B's rows front to back, whole rows at a time (`x86::stream_rows`): one sequential read per
/// thread. Split by columns, a thread read a 192-byte piece of every row of a 16-row block in
/// turn (16 streams, half of every row): 0.58x of the bandwidth at batch 1. Each part sums
/// into its own `[m, n]` block, folded into C at the end in part order ([`fold_part`]; a few
/// KB against the weight's MB): the same bits as the column kernel's.
#[allow(clippy::too_many_arguments)]
fn split_k(c: &mut [f32], ldc: usize, a: &[f32], lda: usize, m: usize, k: usize, b: &[f32], ldb: usize, n: usize, alpha: f32, beta: f32, parts: usize) {
    // The caller's scratch (up to 1 MB at batch 1 over the LM head): a fresh allocation per
    // call came back from the kernel as pages to fault in, every GEMM of every token. The
    // parts add into their blocks, so they start from zero.
    super::vecops::with_scratch(PART_SUMS, parts * m * n, |sums| {
        sums.fill(0.0);
        let sp = SendPtr(sums.as_mut_ptr());
        super::team::par_for(parts, |t| {
            let (k0, k1) = part_bounds(k, parts, t);
            let sp = sp;
            // SAFETY: part t writes its own `[m, n]` block of `sums`; it reads rows k0..k1 <= k
            // of B and columns k0..k1 of A's m rows (asserted by the caller).
            unsafe { x86::stream_rows(sp.0.add(t * m * n), a.as_ptr().add(k0), lda, m, k1 - k0, b.as_ptr().add(k0 * ldb), ldb, n) };
        });
        for i in 0..m {
            let row = &mut c[i * ldc..i * ldc + n];
            for (t, part) in sums.chunks_exact(m * n).enumerate() {
                fold_part(row, &part[i * n..(i + 1) * n], alpha, beta, t == 0);
            }
        }
    })
}

/// The thread-local scratch buffer (`vecops::with_scratch`) that holds part sums (buffers 1
/// and 2 are held around GEMMs in `forward.rs`).
const PART_SUMS: usize = 3;
/// Weights below this many bytes are not split over k, nor over threads when the product is
/// small too (too little to stream to pay for the hand-off).
const SPLIT_MIN_B_BYTES: usize = 1 << 19;
/// Floats of part sums a thread of the column kernel keeps at once: 64 KiB, in L2 beside the
/// k-block of B (LM head, 32 rows: 13.0 ms against 23.0 ms with all 24576 columns of a thread
/// at once, 13.5 ms with 32 KiB, 15.5 ms with 512 KiB; throwaway timing).
const SUMS_FLOATS: usize = 16 << 10;
/// Largest `m * n` (floats of one part's output) for [`split_k`]: 256 KiB, within L2.
const STREAM_MAX_OUTPUT: usize = 64 << 10;
/// Most rows for [`split_k`]: A's broadcast values of four rows of B stay in registers (4 x
/// 4 vectors). With more rows the output's loads and stores per weight vector add up; the
/// column kernel keeps 8 rows' sums in registers.
const STREAM_MAX_ROWS: usize = 4;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{KC, MR, NR};
    use std::arch::x86_64::*;

    /// Columns `j0..j1` of C for all `m` rows, in column chunks of at most `sums.len() / m`:
    /// per chunk, part by part of k ([`super::part_bounds`]), each part's sums in `sums`
    /// (`[m, chunk width]`, dense), then folded into C ([`super::fold_part`]). Chunks keep the
    /// sums, which every k-block reads and writes, in L2: over the LM head's 49152 columns
    /// they were 3 MB per thread at 32 rows.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_columns(
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        lda: usize,
        m: usize,
        k: usize,
        b: *const f32,
        ldb: usize,
        j0: usize,
        j1: usize,
        alpha: f32,
        beta: f32,
        parts: usize,
        sums: &mut [f32],
    ) {
        let chunk = sums.len() / m;
        debug_assert!(chunk >= (j1 - j0).min(NR));
        let s = sums.as_mut_ptr();
        let mut jc = j0;
        while jc < j1 {
            let je = (jc + chunk).min(j1);
            let width = je - jc;
            for t in 0..parts {
                let (k0, k1) = super::part_bounds(k, parts, t);
                // k-blocks outside the panels: the KC rows of B a block needs are read left to
                // right across the chunk's panels (sequential within each row, few pages at a
                // time), instead of walking one narrow panel down all k rows (one page per row:
                // TLB-bound at d = 4096).
                let mut kb = k0;
                while kb < k1 {
                    let kc = KC.min(k1 - kb);
                    let first = kb == k0;
                    let mut jb = jc;
                    while jb < je {
                        let nr = NR.min(je - jb);
                        let masks = [lane_mask(nr, 0), lane_mask(nr, 16), lane_mask(nr, 32)];
                        let mut ib = 0;
                        while ib < m {
                            let mr = MR.min(m - ib);
                            let ap = a.add(ib * lda + kb);
                            let bp = b.add(kb * ldb + jb);
                            let sp = s.add(ib * width + (jb - jc));
                            match mr {
                                8 => micro::<8>(kc, ap, lda, bp, ldb, sp, width, masks, first),
                                7 => micro::<7>(kc, ap, lda, bp, ldb, sp, width, masks, first),
                                6 => micro::<6>(kc, ap, lda, bp, ldb, sp, width, masks, first),
                                5 => micro::<5>(kc, ap, lda, bp, ldb, sp, width, masks, first),
                                4 => micro::<4>(kc, ap, lda, bp, ldb, sp, width, masks, first),
                                3 => micro::<3>(kc, ap, lda, bp, ldb, sp, width, masks, first),
                                2 => micro::<2>(kc, ap, lda, bp, ldb, sp, width, masks, first),
                                _ => micro::<1>(kc, ap, lda, bp, ldb, sp, width, masks, first),
                            }
                            ib += MR;
                        }
                        jb += NR;
                    }
                    kb += KC;
                }
                for i in 0..m {
                    let row = std::slice::from_raw_parts_mut(c.add(i * ldc + jc), width);
                    super::fold_part(row, &sums[i * width..(i + 1) * width], alpha, beta, t == 0);
                }
            }
            jc = je;
        }
    }

    /// `out [m, n] += A[m, k] · B[k, n]` (row strides `lda`, `ldb`; `out` dense; m <= 4),
    /// reading B front to back: four rows at a time, each swept across all `n` columns, so the
    /// rows stream in order; `out` stays in L1/L2 (the caller keeps `m * n` small).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn stream_rows(out: *mut f32, a: *const f32, lda: usize, m: usize, k: usize, b: *const f32, ldb: usize, n: usize) {
        match m {
            1 => stream_rows_m::<1>(out, a, lda, k, b, ldb, n),
            2 => stream_rows_m::<2>(out, a, lda, k, b, ldb, n),
            3 => stream_rows_m::<3>(out, a, lda, k, b, ldb, n),
            4 => stream_rows_m::<4>(out, a, lda, k, b, ldb, n),
            _ => unreachable!("stream_rows takes at most 4 rows, got {m}"),
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn stream_rows_m<const M: usize>(out: *mut f32, a: *const f32, lda: usize, k: usize, b: *const f32, ldb: usize, n: usize) {
        let mut r = 0;
        while r < k {
            let rows = 4.min(k - r);
            // A's four values of each row for this block of B's rows, broadcast once.
            let mut av = [[_mm512_setzero_ps(); 4]; M];
            for (i, avi) in av.iter_mut().enumerate() {
                for (q, v) in avi.iter_mut().enumerate().take(rows) {
                    *v = _mm512_set1_ps(*a.add(i * lda + r + q));
                }
            }
            let mut j = 0;
            while j < n {
                let mask = lane_mask(n - j, 0);
                let mut w = [_mm512_setzero_ps(); 4];
                for (q, wq) in w.iter_mut().enumerate().take(rows) {
                    *wq = _mm512_maskz_loadu_ps(mask, b.add((r + q) * ldb + j));
                }
                for (i, avi) in av.iter().enumerate() {
                    let op = out.add(i * n + j);
                    let mut acc = _mm512_maskz_loadu_ps(mask, op);
                    // The same chain either way; a constant trip count lets the usual case unroll.
                    if rows == 4 {
                        for q in 0..4 {
                            acc = _mm512_fmadd_ps(avi[q], w[q], acc);
                        }
                    } else {
                        for q in 0..rows {
                            acc = _mm512_fmadd_ps(avi[q], w[q], acc);
                        }
                    }
                    _mm512_mask_storeu_ps(op, mask, acc);
                }
                j += 16;
            }
            r += 4;
        }
    }

    /// Mask of the valid lanes of the 16-lane vector starting at column `start` of an `nr`-wide block.
    pub(crate) fn lane_mask(nr: usize, start: usize) -> __mmask16 {
        let valid = nr.saturating_sub(start).min(16);
        if valid == 16 {
            0xFFFF
        } else {
            ((1u32 << valid) - 1) as __mmask16
        }
    }

    /// `S[R, nr] (+)= A[R, kc] · B[kc, nr]`: each sum's fused multiply-add chain continues
    /// from `S` (from 0 when `first`, without reading `S`), accumulators in registers.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const R: usize>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        s: *mut f32,
        lds: usize,
        masks: [__mmask16; 3],
        first: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        if !first {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, acc_v) in row.iter_mut().enumerate() {
                    if masks[v] != 0 {
                        *acc_v = _mm512_maskz_loadu_ps(masks[v], s.add(i * lds + v * 16));
                    }
                }
            }
        }
        for p in 0..kc {
            let bp = b.wrapping_add(p * ldb);
            // Weights stream from memory once: ask for the rows one k-block ahead early.
            let ahead = bp.wrapping_add(KC * ldb) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128));
            let b0 = _mm512_maskz_loadu_ps(masks[0], bp);
            let b1 = _mm512_maskz_loadu_ps(masks[1], bp.wrapping_add(16));
            let b2 = _mm512_maskz_loadu_ps(masks[2], bp.wrapping_add(32));
            for i in 0..R {
                let av = _mm512_set1_ps(*a.add(i * lda + p));
                acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
                acc[i][2] = _mm512_fmadd_ps(av, b2, acc[i][2]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, &acc_v) in row.iter().enumerate() {
                if masks[v] != 0 {
                    _mm512_mask_storeu_ps(s.add(i * lds + v * 16), masks[v], acc_v);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn stream_rows(_out: *mut f32, _a: *const f32, _lda: usize, _m: usize, _k: usize, _b: *const f32, _ldb: usize, _n: usize) {
        unreachable!("skinny kernel is only selected on x86-64 with AVX-512F")
    }

    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_columns(
        _c: *mut f32, _ldc: usize, _a: *const f32, _lda: usize, _m: usize, _k: usize,
        _b: *const f32, _ldb: usize, _j0: usize, _j1: usize, _alpha: f32, _beta: f32,
        _parts: usize, _sums: &mut [f32],
    ) {
        unreachable!("skinny kernel is only selected on x86-64 with AVX-512F")
    }
}
