//! bf16 base weights for the shared base GEMM of inference: `C[m, n] = A[m, k] · W[k, n]`,
//! with `W` (a base weight stored `W0^T`) rounded to bf16 once, at load, and packed in column
//! panels, `A` rounded to bf16 per call, and every product accumulated in f32.
//!
//! Why: a decode step streams every weight once, so half the bytes is up to twice the speed
//! where memory bandwidth binds (small batches); and AVX512-BF16's `vdpbf16ps` does two
//! multiply-adds per f32 lane per instruction, twice the f32 FMA rate where arithmetic binds
//! (large batches, prefill). The price is bf16 precision (8 significant bits) of the weights
//! and of the projection inputs; see docs/model.md for what that does to logits.
//!
//! Packed layout: panel `p` holds columns `p*NR .. p*NR + NR` (zero past `n`). Inside a panel,
//! k-pair `q` (rows `2q`, `2q + 1`; zero past `k`) is `NR` u32 words, word `j` =
//! `bf16(W[2q][j]) | bf16(W[2q+1][j]) << 16`: the operand order of `vdpbf16ps` (per 32-bit
//! lane `lo*lo + hi*hi`). One 64-byte load then feeds 16 columns x 2 k-steps, and a panel is
//! one contiguous stream of `ceil(k/2) * NR` words.
//!
//! Runs the AVX512-BF16 kernel where the CPU has it (checked at run time), a portable scalar
//! loop over the same layout elsewhere; [`gemm_slow`] is the obvious reference for tests.

use rayon::prelude::*;

/// Columns per panel: three 16-lane vectors.
pub const NR: usize = 48;
/// Rows per register block (8 rows x 3 vectors = 24 accumulators).
const MR: usize = 8;
/// k-pairs per block: `KC * NR * 4` bytes = 24 KiB of the panel stay in L1 while every row
/// block of A passes over them.
const KC: usize = 128;
/// Rows of A per outer block (their bf16 copy, `MC * k * 2` bytes, stays in L2).
const MC: usize = 128;

/// Round to nearest even, as `vcvtne2ps2bf16` does (denormals flush to signed zero, NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    if x != 0.0 && x.abs() < f32::MIN_POSITIVE {
        return ((bits >> 16) & 0x8000) as u16;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A `[k, n]` row-major f32 matrix rounded to bf16 and packed in column panels (layout above).
///
/// The panels live in `words`, either the matrix's own buffer or a shared arena that
/// [`arrange_for_decode`] builds for a whole model: there each thread's share of the panels of
/// every weight follows the previous weight's share, so a decode step streams one contiguous
/// run per thread.
#[derive(Clone, Debug)]
pub struct PackedBf16 {
    words: std::sync::Arc<[u32]>,
    /// Runs of consecutive panels: `(first panel, word offset of that panel in words)`, by
    /// first panel, starting at panel 0.
    runs: Vec<(usize, usize)>,
    k: usize,
    n: usize,
    /// k-pairs: `ceil(k / 2)`.
    kp: usize,
}

/// Lays the panels of `weights` (in the order a decode step reads them) out in one arena,
/// thread-major: first every weight's first share of panels (as [`gemm`] splits a decode
/// GEMM over `threads`: `t * panels / threads ..`), then every weight's second share, and so
/// on. A decode step's thread then reads one contiguous run of memory from its first GEMM to
/// its last instead of restarting the hardware prefetcher at every GEMM (a token's GEMVs alone:
/// 7.75 ms as separate weights against 4.89 ms as one run, at a 52 GB/s reading). Values and
/// results do not change.
pub fn arrange_for_decode(weights: &mut [&mut PackedBf16], threads: usize) {
    let threads = threads.max(1);
    let total: usize = weights.iter().map(|w| w.panels() * w.kp * NR).sum();
    // Written in place (a Vec turned into an Arc would be copied: three times the bytes at
    // the peak instead of two).
    let mut arena = std::sync::Arc::<[u32]>::new_uninit_slice(total);
    let buf = std::sync::Arc::get_mut(&mut arena).expect("a fresh arena has one owner");
    let mut at = 0;
    let mut runs: Vec<Vec<(usize, usize)>> = vec![Vec::new(); weights.len()];
    for t in 0..threads {
        for (w, runs) in weights.iter().zip(runs.iter_mut()) {
            let (p0, p1) = decode_share(w.panels(), threads, t);
            if p0 < p1 {
                runs.push((p0, at));
                for p in p0..p1 {
                    for (dst, &word) in buf[at..].iter_mut().zip(w.panel(p)) {
                        dst.write(word);
                    }
                    at += w.kp * NR;
                }
            }
        }
    }
    assert_eq!(at, total, "bf16 arrange_for_decode: every panel placed once");
    // SAFETY: the loop above wrote all `total` words (asserted).
    let arena: std::sync::Arc<[u32]> = unsafe { arena.assume_init() };
    for (w, runs) in weights.iter_mut().zip(runs) {
        w.words = arena.clone();
        w.runs = if runs.is_empty() { vec![(0, 0)] } else { runs };
    }
}

/// Thread `t`'s share of `panels` in a decode GEMM split over `threads`.
fn decode_share(panels: usize, threads: usize, t: usize) -> (usize, usize) {
    (t * panels / threads, (t + 1) * panels / threads)
}

impl PackedBf16 {
    /// Packs `w [k, n]` (row-major).
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "bf16 pack: {} values for {k}x{n}", w.len());
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut words = vec![0u32; panels * kp * NR];
        let at = |i: usize, j: usize| {
            if i < k && j < n {
                f32_to_bf16(w[i * n + j]) as u32
            } else {
                0
            }
        };
        words
            .par_chunks_mut(kp * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for (q, row) in panel.chunks_exact_mut(NR).enumerate() {
                    for (jj, word) in row.iter_mut().enumerate() {
                        let j = p * NR + jj;
                        *word = at(2 * q, j) | (at(2 * q + 1, j) << 16);
                    }
                }
            });
        Self { words: words.into(), runs: vec![(0, 0)], k, n, kp }
    }

    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }
    /// Bytes held (padding included).
    pub fn bytes(&self) -> usize {
        self.panels() * self.kp * NR * 4
    }

    /// The bf16-rounded `W[i][j]`, as f32.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        assert!(
            i < self.k && j < self.n,
            "bf16 get: ({i}, {j}) outside {}x{}",
            self.k,
            self.n
        );
        let word = self.panel(j / NR)[(i / 2) * NR + j % NR];
        bf16_to_f32(if i % 2 == 0 {
            word as u16
        } else {
            (word >> 16) as u16
        })
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    fn panel(&self, p: usize) -> &[u32] {
        let &(first, offset) = self.runs.iter().rev().find(|r| r.0 <= p).expect("runs start at panel 0");
        let start = offset + (p - first) * self.kp * NR;
        &self.words[start..start + self.kp * NR]
    }
}

/// Whether this CPU runs the AVX512-BF16 kernel (else the portable loop runs).
pub fn has_native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of `a [m, k]` (row stride `lda`) rounded to bf16 pairs: `out [m, kp]` words, word `q` =
/// `bf16(a[2q]) | bf16(a[2q+1]) << 16`, zero past `k`.
pub fn round_rows(out: &mut [u32], a: &[f32], lda: usize, m: usize, k: usize) {
    let kp = k.div_ceil(2);
    assert!(out.len() >= m * kp, "bf16 round_rows: output too small");
    let row = |(i, o): (usize, &mut [u32])| round_row(o, &a[i * lda..i * lda + k]);
    if m >= 64 && super::matmul::n_threads() > 1 {
        out[..m * kp].par_chunks_mut(kp).enumerate().for_each(row);
    } else {
        out[..m * kp].chunks_mut(kp).enumerate().for_each(row);
    }
}

fn round_row(out: &mut [u32], x: &[f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if has_native_bf16() {
        // SAFETY: the CPU has AVX512-BF16; the kernel reads x[..32*chunks] and writes out[..16*chunks].
        done = unsafe { x86::round_row(out, x) };
    }
    for q in done / 2..out.len() {
        let lo = x.get(2 * q).map_or(0, |&v| f32_to_bf16(v) as u32);
        let hi = x.get(2 * q + 1).map_or(0, |&v| f32_to_bf16(v) as u32);
        out[q] = lo | (hi << 16);
    }
}

/// `out[i] = bf16(x[i])`, vectorized where the CPU has AVX512-BF16 (the same rounding).
pub fn round_slice(out: &mut [u16], x: &[f32]) {
    assert_eq!(out.len(), x.len(), "bf16 round_slice: lengths differ");
    let mut words = [0u32; 512];
    for (o, xs) in out.chunks_mut(1024).zip(x.chunks(1024)) {
        let words = &mut words[..xs.len().div_ceil(2)];
        round_row(words, xs);
        for (pair, w) in o.chunks_mut(2).zip(words.iter()) {
            pair[0] = *w as u16;
            if let Some(hi) = pair.get_mut(1) {
                *hi = (*w >> 16) as u16;
            }
        }
    }
}

/// Rounds `values` to bf16 in place (kept as f32) and returns the same values as bf16 bits:
/// an adapter table for bf16 inference, where every path must read the same numbers.
pub fn round_in_place(values: &mut [f32]) -> Vec<u16> {
    let mut halves = vec![0u16; values.len()];
    round_slice(&mut halves, values);
    for (v, &h) in values.iter_mut().zip(&halves) {
        *v = bf16_to_f32(h);
    }
    halves
}

thread_local! {
    static A_BF16: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A GEMM's output as [`GemmParts`] writes it: `len` values from `ptr`, borrowed mutably for
/// 'a, initialized or not (a range writes its values in its first k-block before it reads any
/// back).
struct C<'a> {
    ptr: *mut f32,
    len: usize,
    _c: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> C<'a> {
    fn from(c: &'a mut [f32]) -> Self {
        Self { ptr: c.as_mut_ptr(), len: c.len(), _c: std::marker::PhantomData }
    }

    fn from_uninit(c: &'a mut [std::mem::MaybeUninit<f32>]) -> Self {
        Self { ptr: c.as_mut_ptr().cast(), len: c.len(), _c: std::marker::PhantomData }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `c [m, n] (row stride ldc) = a [m, k] (row stride lda) · W`, overwriting `c`.
pub fn gemm(c: &mut [f32], ldc: usize, a: &[f32], lda: usize, m: usize, w: &PackedBf16) {
    run_all(&GemmParts::new(c, ldc, a, lda, m, w));
}

/// `a [m, k] (row stride lda) · W` as a new `[m, n]` matrix (no zeroing pass: the GEMM writes
/// every value).
pub fn gemm_new(a: &[f32], lda: usize, m: usize, w: &PackedBf16) -> Vec<f32> {
    let mut c = Vec::with_capacity(m * w.n);
    run_all(&GemmParts::new_uninit(&mut c.spare_capacity_mut()[..m * w.n], w.n, a, lda, m, w));
    // SAFETY: the GEMM wrote all m * n values (`with_rows`: every range ran, and each writes
    // all rows of its columns, or C was zeroed where there is nothing to sum).
    unsafe { c.set_len(m * w.n) };
    c
}

/// Runs every range of `parts`: as many calls as ranges, each computing one.
fn run_all(parts: &GemmParts) {
    super::team::par_for(parts.len(), |_| {
        parts.run_one();
    });
}

/// A bf16 GEMM (as [`gemm`]) prepared to run in parts: column ranges of C, each claimed by
/// whichever thread calls [`GemmParts::run_next`] first (any number may, concurrently). Lets a
/// caller run other work beside the GEMM on the same threads.
pub struct GemmParts<'a> {
    c: SendPtr,
    ldc: usize,
    /// A's rows rounded to bf16 pairs, `[m, kp]`: the caller's ([`Self::over_rounded`]) or the
    /// thread-local buffer, returned on drop.
    a16: std::borrow::Cow<'a, [u32]>,
    m: usize,
    w: &'a PackedBf16,
    /// Panel ranges `(p0, p1)`. Decode (at most [`MR`] rows, bandwidth-bound): one share per
    /// thread ([`decode_share`]), each thread taking its own (see [`Self::run_one`]). Else
    /// guided: large first, single panels last, claimed in order as threads come free, so they
    /// finish within about one panel of each other.
    ranges: Vec<(usize, usize)>,
    decode: bool,
    claimed: Box<[std::sync::atomic::AtomicBool]>,
    next: std::sync::atomic::AtomicUsize,
    /// Ranges computed so far.
    finished: std::sync::atomic::AtomicUsize,
    /// Set when a range panicked: waits for `finished` give up.
    failed: std::sync::atomic::AtomicBool,
    _c: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> GemmParts<'a> {
    pub fn new(c: &'a mut [f32], ldc: usize, a: &[f32], lda: usize, m: usize, w: &'a PackedBf16) -> Self {
        Self::with_rows(C::from(c), ldc, Self::round(a, lda, m, w), m, w)
    }

    /// [`Self::new`] over an uninitialized C: the GEMM writes its `m` rows of `n` values (the
    /// values between rows, if `ldc > n`, stay uninitialized).
    pub fn new_uninit(c: &'a mut [std::mem::MaybeUninit<f32>], ldc: usize, a: &[f32], lda: usize, m: usize, w: &'a PackedBf16) -> Self {
        Self::with_rows(C::from_uninit(c), ldc, Self::round(a, lda, m, w), m, w)
    }

    /// A's rows rounded to bf16 pairs, in the thread-local buffer.
    fn round(a: &[f32], lda: usize, m: usize, w: &PackedBf16) -> std::borrow::Cow<'a, [u32]> {
        assert!(m == 0 || (m - 1) * lda + w.k <= a.len(), "bf16 gemm: A out of bounds");
        let mut a16 = A_BF16.with(|buf| std::mem::take(&mut *buf.borrow_mut()));
        if a16.len() < m * w.kp {
            a16.resize(m * w.kp, 0);
        }
        round_rows(&mut a16, a, lda, m, w.k);
        std::borrow::Cow::Owned(a16)
    }

    /// [`Self::new`] over rows the caller has rounded already (`a16 [m, kp]`, as
    /// [`round_rows`] writes them): several GEMMs of one input round it once.
    pub fn over_rounded(c: &'a mut [f32], ldc: usize, a16: &'a [u32], m: usize, w: &'a PackedBf16) -> Self {
        assert!(a16.len() >= m * w.kp, "bf16 gemm: {} rounded words for {m} rows of {} pairs", a16.len(), w.kp);
        Self::with_rows(C::from(c), ldc, std::borrow::Cow::Borrowed(a16), m, w)
    }

    /// [`Self::over_rounded`] over an uninitialized C, as [`Self::new_uninit`].
    pub fn over_rounded_uninit(c: &'a mut [std::mem::MaybeUninit<f32>], ldc: usize, a16: &'a [u32], m: usize, w: &'a PackedBf16) -> Self {
        assert!(a16.len() >= m * w.kp, "bf16 gemm: {} rounded words for {m} rows of {} pairs", a16.len(), w.kp);
        Self::with_rows(C::from_uninit(c), ldc, std::borrow::Cow::Borrowed(a16), m, w)
    }

    fn with_rows(c: C<'a>, ldc: usize, a16: std::borrow::Cow<'a, [u32]>, m: usize, w: &'a PackedBf16) -> Self {
        let (k, n) = (w.k, w.n);
        assert!(m == 0 || n == 0 || (m - 1) * ldc + n <= c.len, "bf16 gemm: C out of bounds");
        // Column ranges of different threads must not share elements of C.
        assert!(m <= 1 || ldc >= n, "bf16 gemm: row stride {ldc} of C under its {n} columns");
        if w.kp == 0 && n > 0 {
            // No k-block writes C: a product over nothing is zero.
            for i in 0..m {
                // SAFETY: rows are within C (asserted above), which is borrowed mutably for 'a.
                unsafe { std::ptr::write_bytes(c.ptr.add(i * ldc), 0, n) };
            }
        }
        let c = c.ptr;
        let panels = if m == 0 { 0 } else { w.panels() };
        let flops = 2 * m * n * k;
        // Split once there is enough arithmetic or enough weight to stream: a decode step's
        // k and v projections (220 KB in bf16) already stream faster on two cores.
        let threads = super::matmul::n_threads();
        let split = !(flops < (1 << 20) && w.bytes() < (1 << 17) || threads == 1);
        let decode = split && m <= MR;
        let ranges = if !split {
            vec![(0, panels)]
        } else if decode {
            // One contiguous run of the weight per thread: every further range restarts the
            // hardware prefetcher's stream (a token's GEMVs: 6.5 ms this way against 7.8-8.2
            // ms in guided ranges, at a 53 GB/s reading), and `arrange_for_decode` lays each
            // thread's runs of consecutive weights end to end.
            (0..threads).map(|t| decode_share(panels, threads, t)).collect()
        } else {
            super::team::guided_ranges(panels, threads, 1)
        };
        let claimed = ranges.iter().map(|_| false.into()).collect();
        Self { c: SendPtr(c), ldc, a16, m, w, ranges, decode, claimed, next: 0.into(), finished: 0.into(), failed: false.into(), _c: std::marker::PhantomData }
    }

    /// Column ranges in all.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether the ranges are decode shares, one per thread.
    pub fn is_decode(&self) -> bool {
        self.decode
    }

    /// Computes range `i` unless some thread claimed it already; false then.
    fn run(&self, i: usize) -> bool {
        let Some(&(p0, p1)) = self.ranges.get(i) else { return false };
        if self.claimed[i].swap(true, std::sync::atomic::Ordering::AcqRel) {
            return false;
        }
        let a16 = &self.a16[..self.m * self.w.kp];
        let _flag = super::team::FlagOnUnwind(&self.failed);
        // SAFETY: range i is claimed once (above) and covers its own columns of C, which
        // `with_rows` borrowed mutably for 'a and checked against the shapes.
        unsafe { run_panels(self.c.0, self.ldc, a16, self.m, self.w, p0, p1) };
        self.finished.fetch_add(1, std::sync::atomic::Ordering::Release);
        true
    }

    /// Adds `values [rows, n]` to rows `r0..r0 + rows` of C once every range has been computed:
    /// computes the ranges no thread has claimed yet, then waits (spinning) for those other
    /// threads are still computing; panics if one of them panicked.
    ///
    /// # Safety
    /// Threads adding at the same time must add to disjoint rows.
    pub unsafe fn add_to_rows_when_done(&self, r0: usize, values: &[f32]) {
        let n = self.w.n;
        let rows = values.len().checked_div(n).unwrap_or(0);
        assert!(values.len() == rows * n && r0 + rows <= self.m, "bf16 gemm: {} values at row {r0} of {} rows of {n}", values.len(), self.m);
        while self.run_next() {}
        let done = || self.finished.load(std::sync::atomic::Ordering::Acquire) >= self.ranges.len();
        super::team::spin_until(done, &self.failed, "bf16 gemm");
        for (i, v) in values.chunks_exact(n.max(1)).enumerate() {
            // SAFETY: every range has finished (above), so no range writes C any more and
            // every value is written; rows are within the m rows `with_rows` checked against
            // C, and concurrent callers add disjoint rows (the caller's promise).
            let row = unsafe { std::slice::from_raw_parts_mut(self.c.0.add((r0 + i) * self.ldc), n) };
            super::vecops::axpy(row, 1.0, v);
        }
    }

    /// Claims the next unclaimed range in order and computes it; false when none was left.
    pub fn run_next(&self) -> bool {
        loop {
            let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= self.ranges.len() {
                return false;
            }
            if self.run(i) {
                return true;
            }
        }
    }

    /// Computes one range, false when none was left: for decode shares this thread's own
    /// share (by its index in the pool, so a thread reads the same share of every weight, one
    /// run through the arena), else any unclaimed one; otherwise the next in order.
    pub fn run_one(&self) -> bool {
        if !self.decode {
            return self.run_next();
        }
        let mine = rayon::current_thread_index().unwrap_or(0) % self.ranges.len();
        self.run(mine) || (0..self.ranges.len()).any(|i| self.run(i))
    }
}

impl Drop for GemmParts<'_> {
    fn drop(&mut self) {
        let std::borrow::Cow::Owned(a16) = std::mem::take(&mut self.a16) else { return };
        A_BF16.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < a16.len() {
                *buf = a16;
            }
        });
    }
}

/// Columns of panels `p0..p1` of C, all rows.
unsafe fn run_panels(
    c: *mut f32,
    ldc: usize,
    a16: &[u32],
    m: usize,
    w: &PackedBf16,
    p0: usize,
    p1: usize,
) {
    let kp = w.kp;
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    let native = has_native_bf16();
    for i0 in (0..m).step_by(MC) {
        let i1 = (i0 + MC).min(m);
        for p in p0..p1 {
            let j0 = p * NR;
            let nr = NR.min(w.n - j0);
            let panel = w.panel(p);
            for q0 in (0..kp).step_by(KC) {
                let kc = KC.min(kp - q0);
                for ib in (i0..i1).step_by(MR) {
                    let rows = MR.min(i1 - ib);
                    let a = &a16[ib * kp + q0..];
                    let b = &panel[q0 * NR..(q0 + kc) * NR];
                    let cb = c.add(ib * ldc + j0);
                    // `C[rows, nr] (+)= A[rows, kc pairs] · B[kc pairs, NR]`, adding from the second k-block.
                    #[cfg(target_arch = "x86_64")]
                    if native {
                        x86::block(rows, kc, a.as_ptr(), kp, b.as_ptr(), cb, ldc, nr, q0 > 0);
                        continue;
                    }
                    portable_block(rows, kc, a, kp, b, cb, ldc, nr, q0 > 0);
                }
            }
        }
    }
}

/// The same block, one lane at a time (CPUs without AVX512-BF16).
#[allow(clippy::too_many_arguments)]
unsafe fn portable_block(
    rows: usize,
    kc: usize,
    a: &[u32],
    lda: usize,
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    nr: usize,
    accumulate: bool,
) {
    let mut acc = [0f32; NR];
    for i in 0..rows {
        acc.fill(0.0);
        for q in 0..kc {
            let aw = a[i * lda + q];
            let (alo, ahi) = (bf16_to_f32(aw as u16), bf16_to_f32((aw >> 16) as u16));
            for (j, acc_j) in acc.iter_mut().enumerate().take(nr) {
                let bw = b[q * NR + j];
                *acc_j += alo * bf16_to_f32(bw as u16) + ahi * bf16_to_f32((bw >> 16) as u16);
            }
        }
        // Through the pointer: before the first k-block's store C may be uninitialized.
        for (j, v) in acc.iter().enumerate().take(nr) {
            let o = c.add(i * ldc + j);
            o.write(if accumulate { o.read() + v } else { *v });
        }
    }
}

/// The obvious reference: `c = bf16(a) · W` with f64 sums, for tests of [`gemm`].
pub fn gemm_slow(c: &mut [f32], ldc: usize, a: &[f32], lda: usize, m: usize, w: &PackedBf16) {
    for i in 0..m {
        for j in 0..w.n {
            let mut acc = 0f64;
            for p in 0..w.k {
                acc += bf16_to_f32(f32_to_bf16(a[i * lda + p])) as f64 * w.get(p, j) as f64;
            }
            c[i * ldc + j] = acc as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use crate::cpu::skinny::x86::lane_mask;
    use std::arch::x86_64::*;

    /// Rounds `x[..32*chunks]` into `out[..16*chunks]` (pairs in order); returns floats done.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn round_row(out: &mut [u32], x: &[f32]) -> usize {
        let chunks = (x.len() / 32).min(out.len() / 16);
        for ch in 0..chunks {
            let lo = _mm512_loadu_ps(x.as_ptr().add(32 * ch));
            let hi = _mm512_loadu_ps(x.as_ptr().add(32 * ch + 16));
            // Lower 16 bf16 lanes from the second operand: x[0..16] then x[16..32], in order.
            let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(16 * ch) as *mut _, packed);
        }
        chunks * 32
    }

    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(
        rows: usize,
        kc: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        nr: usize,
        accumulate: bool,
    ) {
        let masks = [lane_mask(nr, 0), lane_mask(nr, 16), lane_mask(nr, 32)];
        debug_assert!(rows <= MR);
        match rows {
            8 => micro::<8>(kc, a, lda, b, c, ldc, masks, accumulate),
            7 => micro::<7>(kc, a, lda, b, c, ldc, masks, accumulate),
            6 => micro::<6>(kc, a, lda, b, c, ldc, masks, accumulate),
            5 => micro::<5>(kc, a, lda, b, c, ldc, masks, accumulate),
            4 => micro::<4>(kc, a, lda, b, c, ldc, masks, accumulate),
            3 => micro::<3>(kc, a, lda, b, c, ldc, masks, accumulate),
            2 => micro::<2>(kc, a, lda, b, c, ldc, masks, accumulate),
            _ => micro::<1>(kc, a, lda, b, c, ldc, masks, accumulate),
        }
    }

    #[inline(always)]
    unsafe fn load_b(b: *const u32) -> __m512bh {
        std::mem::transmute(_mm512_loadu_si512(b as *const _))
    }

    #[inline(always)]
    unsafe fn splat_a(a: *const u32) -> __m512bh {
        std::mem::transmute(_mm512_set1_epi32(*a as i32))
    }

    /// `C[R, nr] (+)= A[R, kc pairs] · B`, accumulators in registers: each sum is one
    /// `vdpbf16ps` chain over the block's k-pairs in order, whatever `R`, so a row's bits do not
    /// depend on the other rows of its product. (Blocks of 1-2 rows used to keep a second
    /// chain for odd k-pairs against the instruction's latency; with the weights streaming from
    /// memory one chain is as fast: throwaway timing, 1 and 2 rows at 0.80-1.06x.)
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const R: usize>(
        kc: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        masks: [__mmask16; 3],
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        for q in 0..kc {
            let bp = b.add(q * NR);
            let (b0, b1, b2) = (load_b(bp), load_b(bp.add(16)), load_b(bp.add(32)));
            for i in 0..R {
                let av = splat_a(a.add(i * lda + q));
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
                acc[i][2] = _mm512_dpbf16_ps(acc[i][2], av, b2);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, &acc_v) in row.iter().enumerate() {
                if masks[v] == 0 {
                    continue;
                }
                let cp = c.add(i * ldc + v * 16);
                let out = if accumulate {
                    _mm512_add_ps(acc_v, _mm512_maskz_loadu_ps(masks[v], cp))
                } else {
                    acc_v
                };
                _mm512_mask_storeu_ps(cp, masks[v], out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu::rand_vec;

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
        assert_eq!(
            bf16_to_f32(f32_to_bf16(1.0 + 3.0 / 256.0)),
            1.0 + 1.0 / 64.0
        );
        assert_eq!(bf16_to_f32(f32_to_bf16(-2.5)), -2.5);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::MAX)), f32::INFINITY);
        assert_eq!(f32_to_bf16(-1e-40), 0x8000);
        for x in rand_vec(1000, 9) {
            let r = bf16_to_f32(f32_to_bf16(x));
            assert!((r - x).abs() <= x.abs() / 256.0, "{x} -> {r}");
        }
    }

    #[test]
    fn vector_rounding_equals_scalar() {
        for k in [1, 2, 31, 32, 33, 64, 577] {
            let x: Vec<f32> = rand_vec(k, k as u64).into_iter().map(|v| v * 1e3).collect();
            let mut fast = vec![0u32; k.div_ceil(2)];
            round_rows(&mut fast, &x, k, 1, k);
            let slow: Vec<u32> = (0..k.div_ceil(2))
                .map(|q| {
                    f32_to_bf16(x[2 * q]) as u32
                        | (x.get(2 * q + 1).map_or(0, |&v| f32_to_bf16(v) as u32) << 16)
                })
                .collect();
            assert_eq!(fast, slow, "k = {k}");
        }
    }

    #[test]
    fn slice_rounding_equals_scalar() {
        for n in [0, 1, 2, 1023, 1024, 1025, 3000] {
            let x: Vec<f32> = rand_vec(n, 7).into_iter().map(|v| v * 300.0).collect();
            let mut fast = vec![0u16; n];
            round_slice(&mut fast, &x);
            assert!(fast.iter().zip(&x).all(|(&h, &v)| h == f32_to_bf16(v)), "n = {n}");
        }
    }

    #[test]
    fn arranged_weights_keep_every_value_and_result() {
        // Several weights laid out thread-major in one arena, for 1-4 threads, used from pools
        // of 1-4 threads (matching or not): the same values and bit for bit the same products
        // as the weights packed on their own, decode and larger row counts alike.
        let shapes = [(576, 192), (70, 300), (33, 17), (200, 1000), (8, 48)];
        let own: Vec<PackedBf16> = shapes.iter().enumerate().map(|(i, &(k, n))| PackedBf16::pack(&rand_vec(k * n, 20 + i as u64), k, n)).collect();
        for arena_threads in 1..=4 {
            let mut arranged = own.clone();
            arrange_for_decode(&mut arranged.iter_mut().collect::<Vec<_>>(), arena_threads);
            for (w, a) in own.iter().zip(&arranged) {
                assert_eq!(w.bytes(), a.bytes());
                for (i, j) in [(0, 0), (w.k - 1, w.n - 1), (w.k / 2, w.n / 3)] {
                    assert_eq!(w.get(i, j), a.get(i, j));
                }
            }
            for pool_threads in 1..=4 {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(pool_threads).build().unwrap();
                for m in [1, 3, 8, 9, 40] {
                    for (w, a) in own.iter().zip(&arranged) {
                        let x = rand_vec(m * w.k, 30);
                        let (mut want, mut got) = (vec![0f32; m * w.n], vec![0f32; m * w.n]);
                        pool.install(|| {
                            gemm(&mut want, w.n, &x, w.k, m, w);
                            crate::cpu::team::with_team(|| gemm(&mut got, a.n, &x, a.k, m, a));
                        });
                        assert!(want == got, "{}x{}, m = {m}, arena {arena_threads}, pool {pool_threads}", w.k, w.n);
                        let mut slow = vec![0f32; m * w.n];
                        gemm_slow(&mut slow, w.n, &x, w.k, m, w);
                        assert!(want.iter().zip(&slow).all(|(x, y)| (x - y).abs() <= 1e-4), "{}x{}, m = {m}: vs slow", w.k, w.n);
                    }
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_other_rows() {
        // Row blocks of 1-8 rows, and more than MC rows: every row's bits equal its product
        // alone (one decode row) and in a block of 3, in pools of 1-3 threads. Odd and even
        // k-pair counts, a k-block tail (kp > KC), a column tail.
        for &(k, n) in &[(576, 192), (301, 100), (600, 97), (17, 48)] {
            let w = PackedBf16::pack(&rand_vec(k * n, 40), k, n);
            let x = rand_vec(140 * k, 41);
            for threads in 1..=3 {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let product = |rows: std::ops::Range<usize>| {
                        let mut c = vec![f32::NAN; rows.len() * n];
                        gemm(&mut c, n, &x[rows.start * k..rows.end * k], k, rows.len(), &w);
                        c
                    };
                    for m in [1, 2, 3, 5, 8, 9, 17, 140] {
                        let all = product(0..m);
                        for i in 0..m {
                            let want = product(i..i + 1);
                            assert!(all[i * n..(i + 1) * n].iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{k}x{n}, row {i} of {m}, {threads} threads: not the bits of the row alone");
                        }
                        let three = product(0..3.min(m));
                        assert!(three.iter().zip(&all).all(|(a, b)| a.to_bits() == b.to_bits()), "{k}x{n}, {m} rows: the first rows differ from a block of 3");
                    }
                });
            }
        }
    }

    #[test]
    fn packing_keeps_every_value() {
        let (k, n) = (7, 53);
        let w = rand_vec(k * n, 4);
        let p = PackedBf16::pack(&w, k, n);
        for i in 0..k {
            for j in 0..n {
                assert_eq!(p.get(i, j), bf16_to_f32(f32_to_bf16(w[i * n + j])));
            }
        }
    }

    #[test]
    fn gemm_matches_slow_across_shapes() {
        let shapes = [
            (0, 5, 7),
            (1, 1, 1),
            (1, 577, 129),
            (2, 576, 192),
            (3, 16, 17),
            (8, 300, 48),
            (9, 257, 97),
            (32, 576, 576),
            (33, 64, 200),
            (130, 65, 47),
            (140, 300, 100),
        ];
        for &(m, k, n) in &shapes {
            let a = rand_vec(m * (k + 3), 1);
            let w = rand_vec(k * n, 2);
            let p = PackedBf16::pack(&w, k, n);
            let ldc = n + 5;
            let mut fast = vec![f32::NAN; m * ldc];
            let mut slow = fast.clone();
            gemm(&mut fast, ldc, &a, k + 3, m, &p);
            gemm_slow(&mut slow, ldc, &a, k + 3, m, &p);
            for i in 0..m {
                for j in 0..n {
                    let (x, y) = (fast[i * ldc + j], slow[i * ldc + j]);
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + k as f32).sqrt(),
                        "{m}x{k}x{n} at ({i},{j}): {x} vs {y}"
                    );
                }
                // Padding columns of C are never written.
                assert!(
                    fast[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()),
                    "{m}x{k}x{n}: wrote past n"
                );
            }
            // Into a new matrix (uninitialized before the GEMM): the same bits. (The NaN start
            // above shows the GEMM writes every value.)
            let new = gemm_new(&a, k + 3, m, &p);
            assert_eq!(new.len(), m * n);
            for i in 0..m {
                let want: Vec<u32> = fast[i * ldc..i * ldc + n].iter().map(|v| v.to_bits()).collect();
                assert_eq!(new[i * n..(i + 1) * n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "{m}x{k}x{n}: row {i}");
            }
        }
    }

    #[test]
    fn portable_block_matches_native() {
        // The fallback runs on CPUs without AVX512-BF16; here it must agree with the native path.
        let (m, k, n) = (5, 70, 48);
        let a = rand_vec(m * k, 5);
        let p = PackedBf16::pack(&rand_vec(k * n, 6), k, n);
        let kp = k.div_ceil(2);
        let mut a16 = vec![0u32; m * kp];
        round_rows(&mut a16, &a, k, m, k);
        let mut portable = vec![0f32; m * n];
        unsafe {
            portable_block(
                m,
                kp,
                &a16,
                kp,
                p.panel(0),
                portable.as_mut_ptr(),
                n,
                n,
                false,
            )
        };
        let mut slow = vec![0f32; m * n];
        gemm_slow(&mut slow, n, &a, k, m, &p);
        for (x, y) in portable.iter().zip(&slow) {
            assert!((x - y).abs() <= 1e-4, "{x} vs {y}");
        }
    }
}
