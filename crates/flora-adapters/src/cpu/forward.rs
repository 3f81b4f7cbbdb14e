//! Forward kernel of one adapted projection over a heterogeneous batch.
//!
//! Semantics (per row i with slot s; W0 [d_out, d_in], stored transposed as `wt` [d_in, d_out]):
//!   base   : y_i = W0 x_i
//!   LoRA   : y_i = W0 x_i + s (B (A x_i))
//!   IA3    : y_i = l o (W0 x_i)          | y_i = W0 (l o x_i)   (input side)
//!   fLoRA  : y_i = (1/r) sum_j a_j o (W0 (b_j o x_i))  (replaces the base output)
//! Execution:
//!   1. ONE shared GEMM with W0 over the stacked rows of every segment except merged fLoRA
//!      segments (base/LoRA/IA3 rows, l o x rows, and the r copies b_j o x of vectorized fLoRA
//!      rows); when every row enters unchanged, x itself is the GEMM input (no copy).
//!   2. Merged fLoRA segments: W = W0 o (1/r) sum_j a_j b_j^T built tile by tile (64 rows of
//!      [d_in, d_out] at a time, cache-resident) and consumed by the segment's GEMM at once.
//!   3. Epilogues per segment: LoRA shrink/expand (gather-style, the segment's own rank, no
//!      padding), IA3 scaling, fLoRA rank reduction.

use super::bf16::PackedBf16;
use super::matmul::{matmul, MatRef};
use super::vecops::{axpy, dot, mul_acc, mul_into, scale_by, with_scratch};
use crate::batch::Segment;
use crate::params::{Bf16Tables, SlotSpec};
use crate::plan::{LayerPlan, SegmentExec};
use rayon::prelude::*;

/// Scratch buffer ([`with_scratch`]) of the LoRA terms in [`forward_pooled`].
const LORA_TERMS: usize = 4;

/// Rows at or below which LoRA shrink/expand runs as per-row dot/axpy loops instead of GEMM calls.
const LORA_ROW_LOOP_MAX: usize = 4;

/// The base weight as the kernels see it: `wt = W0^T [d_in, d_out]` in f32 (merged fLoRA
/// tiles, backward) and, when the weight runs in bf16, its packed copy for the shared GEMM.
#[derive(Clone, Copy)]
pub struct BaseRef<'a> {
    pub wt: &'a [f32],
    pub bf16: Option<&'a PackedBf16>,
}

impl BaseRef<'_> {
    /// `c [m, d_out] = a [m, d_in] · W0^T`: the shared base GEMM, in the weight's format.
    pub fn gemm(&self, c: &mut [f32], a: &[f32], m: usize, di: usize, dout: usize) {
        match self.bf16 {
            Some(p) => super::bf16::gemm(c, dout, a, di, m, p),
            None => matmul(c, dout, MatRef::row_major(a, m, di), MatRef::row_major(self.wt, di, dout), 1.0, 0.0),
        }
    }

    /// [`Self::gemm`] into a new `[m, d_out]` matrix (in bf16 without a zeroing pass first).
    pub fn gemm_new(&self, a: &[f32], m: usize, di: usize, dout: usize) -> Vec<f32> {
        match self.bf16 {
            Some(p) => {
                assert_eq!((p.k(), p.n()), (di, dout), "bf16 gemm: weight of {}x{}, not {di}x{dout}", p.k(), p.n());
                super::bf16::gemm_new(a, di, m, p)
            }
            None => {
                let mut c = vec![0f32; m * dout];
                self.gemm(&mut c, a, m, di, dout);
                c
            }
        }
    }
}

/// `y [n, d_out]` for `x [n, d_in]`.
/// `params16`: the table's bf16 copy, when it was packed for bf16 inference.
pub fn forward(x: &[f32], base: BaseRef, params: &[f32], params16: Option<&Bf16Tables>, plan: &LayerPlan) -> Vec<f32> {
    let (n, di, dout) = (plan.n_rows, plan.d_in, plan.d_out);
    let wt = base.wt;
    assert_eq!(x.len(), n * di, "forward: x has {} values, expected {n}x{di}", x.len());
    assert_eq!(wt.len(), di * dout, "forward: weight has {} values, expected {di}x{dout}", wt.len());
    // LoRA with bf16 tables runs beside the bf16 base GEMM (see `forward_pooled`).
    if let (true, Some(packed), Some(p16)) = (plan.all_direct(), base.bf16, params16) {
        if plan.segments.iter().any(|(_, e)| beside_gemm(e)) {
            let adapters = Some(PooledAdapters { params, params16: p16, plan });
            return forward_pooled(x, n, di, &[Pooled { packed, adapters }]).pop().expect("one projection");
        }
    }
    let mut y = if plan.all_direct() {
        base.gemm_new(x, n, di, dout)
    } else {
        let mut y = vec![0f32; n * dout];
        shared_stacked_gemm(x, base, params, plan, &mut y);
        y
    };
    // Merged fLoRA segments: several run in parallel (each single-threaded, no per-call
    // dispatch); a lone one uses all threads inside its GEMMs.
    let merged: Vec<(&mut [f32], &Segment, &SegmentExec)> =
        split_segments_mut(&mut y, dout, &plan.segments).into_iter().filter(|(_, _, e)| matches!(e, SegmentExec::FloraMerged(_))).collect();
    let run = |(ys, seg, exec): (&mut [f32], &Segment, &SegmentExec)| {
        if let SegmentExec::FloraMerged(spec) = exec {
            merged_segment(ys, &x[seg.start * di..(seg.start + seg.len) * di], seg.len, wt, spec, params, di, dout);
        }
    };
    if merged.len() > 1 && super::matmul::n_threads() > 1 {
        merged.into_par_iter().for_each(|job| super::matmul::serial(|| run(job)));
    } else {
        merged.into_iter().for_each(run);
    }
    epilogues(x, params, params16, plan, &mut y, false);
    y
}

/// Whether a segment runs beside the bf16 base GEMM in [`forward_pooled`] (when the call has
/// bf16 tables): LoRA, whose terms do not depend on the base output.
fn beside_gemm(exec: &SegmentExec) -> bool {
    matches!(exec, SegmentExec::Lora(_))
}

/// One projection of [`forward_pooled`]: its packed bf16 base weight and, if it has adapters,
/// their tables and plan (every row entering the GEMM unchanged: `plan.all_direct()`).
pub struct Pooled<'a> {
    pub packed: &'a PackedBf16,
    pub adapters: Option<PooledAdapters<'a>>,
}

/// A projection's adapter tables (f32, and the bf16 copy LoRA reads) and plan.
pub struct PooledAdapters<'a> {
    pub params: &'a [f32],
    pub params16: &'a Bf16Tables,
    pub plan: &'a LayerPlan,
}

/// `x [n, d_in]` through several bf16 projections that share it (a block's q, k and v; gate and
/// up), each output as [`forward`] computes it. Their GEMM column ranges and their LoRA segments'
/// terms (`scale * B^T (A x)` from the bf16 tables: independent of the base output) form
/// one pool of work, and the threads meet once for all the projections. Decode rows (GEMMs
/// split in per-thread shares): each thread streams its share of every GEMM in turn, then
/// takes LoRA segments. More rows: odd-numbered
/// workers start on the LoRA terms (streaming adapter tables, memory-bound) while the others
/// start on the GEMMs (arithmetic-bound), and each then helps with what is left of the other.
/// LoRA terms go to a buffer of their own; once out of work, every thread adds segments' terms
/// to the outputs as soon as a segment's terms and its projection's GEMM are complete. The
/// remaining epilogues (IA3 on the output) follow.
pub fn forward_pooled(x: &[f32], n: usize, di: usize, projs: &[Pooled]) -> Vec<Vec<f32>> {
    assert_eq!(x.len(), n * di, "forward_pooled: x has {} values, expected {n}x{di}", x.len());
    // (projection, segment, slot, the projection's tables, its d_out) of every LoRA segment
    // that runs beside the GEMMs.
    let mut lora: Vec<(usize, &Segment, &SlotSpec, &Bf16Tables, usize)> = Vec::new();
    for (pi, p) in projs.iter().enumerate() {
        assert_eq!(p.packed.k(), di, "forward_pooled: projection {pi} takes {} inputs, not {di}", p.packed.k());
        if let Some(a) = &p.adapters {
            assert!(a.plan.all_direct() && a.plan.n_rows == n, "forward_pooled: projection {pi} has rows that do not enter the GEMM unchanged");
            lora.extend(a.plan.segments.iter().filter_map(|(seg, exec)| match exec {
                SegmentExec::Lora(spec) => Some((pi, seg, spec, a.params16, p.packed.n())),
                _ => None,
            }));
        }
    }
    // The outputs, written whole by their GEMMs (no zeroing pass), `[n, d_out]` each.
    let mut ys: Vec<Vec<f32>> = projs.iter().map(|p| Vec::with_capacity(n * p.packed.n())).collect();
    // x rounded to bf16 pairs once, for every GEMM and every LoRA shrink.
    let kp = di.div_ceil(2);
    let mut x16 = vec![0u32; n * kp];
    if n > 0 {
        super::bf16::round_rows(&mut x16, x, di, n, di);
    }
    // And quantized once for every 8-bit LoRA shrink, if any.
    let int8 = lora.iter().any(|&(_, _, _, p16, dout)| p16.lora.int8_at(di, dout));
    let xq = int8.then(|| super::lora_int8::QuantizedRows::new(x, di));
    // Each LoRA segment's terms `[len, d_out]`, in the order of `lora` (reused scratch: fresh
    // pages per call cost page faults).
    let terms_len = lora.iter().map(|&(_, seg, _, _, dout)| seg.len * dout).sum();
    with_scratch(LORA_TERMS, terms_len, |terms| {
        let mut parts = Vec::with_capacity(lora.len());
        let mut rest = &mut terms[..];
        for &(_, seg, _, _, dout) in &lora {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(seg.len * dout);
            parts.push(std::sync::Mutex::new(mine));
            rest = tail;
        }
        // Segments whose terms are written: `lora_done[k]` once segment k's are; `lora_failed`
        // if one panicked (the adds then give up instead of waiting forever).
        let lora_done: Vec<std::sync::atomic::AtomicBool> = lora.iter().map(|_| false.into()).collect();
        let lora_failed = std::sync::atomic::AtomicBool::new(false);
        let (next_lora, next_add) = (std::sync::atomic::AtomicUsize::new(0), std::sync::atomic::AtomicUsize::new(0));
        let run_lora = || {
            let k = next_lora.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(&(_, seg, spec, p16, dout)) = lora.get(k) else { return false };
            let _flag = super::team::FlagOnUnwind(&lora_failed);
            let rows = match &xq {
                Some(q) if p16.lora.int8_at(di, dout) => {
                    let (qx, sx) = q.rows(seg.start, seg.len, di);
                    LoraRows::Int8(qx, sx)
                }
                _ => LoraRows::Bf16(&x16[seg.start * kp..(seg.start + seg.len) * kp]),
            };
            lora_slot_terms(&mut parts[k].lock().expect("one writer per segment"), rows, p16, spec, di, dout);
            lora_done[k].store(true, std::sync::atomic::Ordering::Release);
            true
        };
        let gemms: Vec<super::bf16::GemmParts> =
            ys.iter_mut().zip(projs).map(|(y, p)| super::bf16::GemmParts::over_rounded_uninit(&mut y.spare_capacity_mut()[..n * p.packed.n()], p.packed.n(), &x16, n, p.packed)).collect();
        // Last, every thread adds segments' terms to their projection's output as soon as
        // both are complete (every thread claims segments until none is left before it gets
        // here, and the add computes any GEMM range still unclaimed, so the waits end).
        let add_terms = || loop {
            let k = next_add.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(&(pi, seg, ..)) = lora.get(k) else { return };
            super::team::spin_until(|| lora_done[k].load(std::sync::atomic::Ordering::Acquire), &lora_failed, "LoRA terms");
            // SAFETY: segments cover disjoint rows, and each is added once (claimed above).
            unsafe { gemms[pi].add_to_rows_when_done(seg.start, &parts[k].lock().expect("terms written")) };
        };
        let items = gemms.iter().map(|g| g.len()).sum::<usize>() + lora.len();
        let decode = gemms.iter().all(|g| g.is_decode());
        let run_gemms = || gemms.iter().for_each(|g| while g.run_next() {});
        let workers = if decode { gemms.iter().map(|g| g.len()).max().unwrap_or(1) } else { super::matmul::n_threads().min(items) };
        super::team::par_for(workers, |w| {
            if decode {
                // Bandwidth-bound: each thread streams its own share of every GEMM in turn
                // (one run through the arena), then helps with the LoRA terms; a late thread's
                // shares are taken by whichever call comes first, one per GEMM and call.
                gemms.iter().for_each(|g| {
                    g.run_one();
                });
                while run_lora() {}
            } else if w % 2 == 1 {
                while run_lora() {}
                run_gemms();
            } else {
                run_gemms();
                while run_lora() {}
            }
            add_terms();
        });
    });
    for (y, p) in ys.iter_mut().zip(projs) {
        // SAFETY: every range of every GEMM ran (the loop above returned), so each wrote its
        // n rows of d_out values.
        unsafe { y.set_len(n * p.packed.n()) };
        if let Some(a) = &p.adapters {
            epilogues(x, a.params, Some(a.params16), a.plan, y, true);
        }
    }
    ys
}

/// Step 1 when some rows do not enter the GEMM unchanged: stack, one GEMM, scatter.
fn shared_stacked_gemm(x: &[f32], base: BaseRef, params: &[f32], plan: &LayerPlan, y: &mut [f32]) {
    let (di, dout) = (plan.d_in, plan.d_out);
    let n_st = plan.n_stacked_rows();
    if n_st == 0 {
        return;
    }
    with_scratch(1, n_st * di, |xs| {
        stack_inputs(x, params, plan, xs);
        with_scratch(2, n_st * dout, |zs| {
            base.gemm(zs, xs, n_st, di, dout);
            let mut r0 = 0;
            for (seg, exec) in &plan.segments {
                let ys = &mut y[seg.start * dout..(seg.start + seg.len) * dout];
                match exec {
                    SegmentExec::FloraMerged(_) => {}
                    SegmentExec::FloraVectorized(spec) => {
                        let (_, a) = spec.parts(params, di, dout);
                        reduce_rank(ys, &zs[r0 * dout..], a, spec, seg.len, dout);
                    }
                    _ => ys.copy_from_slice(&zs[r0 * dout..(r0 + seg.len) * dout]),
                }
                r0 += exec.stacked_rows(seg.len);
            }
        })
    });
}

/// Fills the shared GEMM's input: per segment its rows, `l o x` rows, or the r blocks
/// `b_j o x` (block j holds all rows of the segment).
pub(crate) fn stack_inputs(x: &[f32], params: &[f32], plan: &LayerPlan, xs: &mut [f32]) {
    let (di, dout) = (plan.d_in, plan.d_out);
    let mut r0 = 0;
    for (seg, exec) in &plan.segments {
        let xseg = &x[seg.start * di..(seg.start + seg.len) * di];
        let out = &mut xs[r0 * di..(r0 + exec.stacked_rows(seg.len)) * di];
        match exec {
            SegmentExec::FloraMerged(_) => {}
            SegmentExec::FloraVectorized(spec) => {
                let (b, _) = spec.parts(params, di, dout);
                for (j, block) in out.chunks_exact_mut(seg.len * di).enumerate() {
                    let bj = &b[j * di..(j + 1) * di];
                    for (o, xr) in block.chunks_exact_mut(di).zip(xseg.chunks_exact(di)) {
                        mul_into(o, xr, bj);
                    }
                }
            }
            SegmentExec::Ia3In(spec) => {
                let (l, _) = spec.parts(params, di, dout);
                for (o, xr) in out.chunks_exact_mut(di).zip(xseg.chunks_exact(di)) {
                    mul_into(o, xr, l);
                }
            }
            _ => out.copy_from_slice(xseg),
        }
        r0 += exec.stacked_rows(seg.len);
    }
}

/// `y_row = scale * sum_j a_j o z_j[row]` where `z` holds r blocks of `len` rows.
fn reduce_rank(ys: &mut [f32], z: &[f32], a: &[f32], spec: &SlotSpec, len: usize, dout: usize) {
    ys.fill(0.0);
    for j in 0..spec.rank {
        let aj = &a[j * dout..(j + 1) * dout];
        for (row, yr) in ys.chunks_exact_mut(dout).enumerate() {
            mul_acc(yr, spec.scale, aj, &z[(j * len + row) * dout..(j * len + row + 1) * dout]);
        }
    }
}

/// Rows of the merged weight built per tile: `MERGE_TILE x d_out` floats stay in L2 while the
/// tile's GEMM consumes them, so W0 is read once and the merged weight never goes to memory.
const MERGE_TILE: usize = 64;

/// `ys [len, d_out] = xs (W0 o scale b^T a)^T`, building the merged weight tile by tile
/// (rows `k0..k0+MERGE_TILE` of `[d_in, d_out]`) and accumulating each tile's product.
#[allow(clippy::too_many_arguments)]
fn merged_segment(ys: &mut [f32], xs: &[f32], len: usize, wt: &[f32], spec: &SlotSpec, params: &[f32], di: usize, dout: usize) {
    with_scratch(0, MERGE_TILE.min(di) * dout, |tile| {
        let mut k0 = 0;
        while k0 < di {
            let kt = MERGE_TILE.min(di - k0);
            let tile = &mut tile[..kt * dout];
            merged_rows(tile, wt, spec, params, di, dout, k0);
            let xv = MatRef { data: &xs[k0..], rows: len, cols: kt, rs: di, cs: 1 };
            matmul(ys, dout, xv, MatRef::row_major(tile, kt, dout), 1.0, if k0 == 0 { 0.0 } else { 1.0 });
            k0 += kt;
        }
    });
}

/// Rows `k0..k0 + out.len()/d_out` of the merged weight: row i is `wt[i] o (scale * sum_j b_j[i] a_j)`.
fn merged_rows(out: &mut [f32], wt: &[f32], spec: &SlotSpec, params: &[f32], di: usize, dout: usize, k0: usize) {
    let (b, a) = spec.parts(params, di, dout);
    let build = |(k, wrow): (usize, &mut [f32])| {
        let i = k0 + k;
        wrow.fill(0.0);
        for j in 0..spec.rank {
            axpy(wrow, spec.scale * b[j * di + i], &a[j * dout..(j + 1) * dout]);
        }
        scale_by(wrow, &wt[i * dout..(i + 1) * dout]);
    };
    if out.len() * spec.rank < (1 << 16) || super::matmul::n_threads() == 1 {
        out.chunks_exact_mut(dout).enumerate().for_each(build);
    } else {
        out.par_chunks_exact_mut(dout).enumerate().for_each(build);
    }
}

/// The whole merged weight `wm [d_in, d_out] = wt o (scale * b^T a)` (backward pass).
pub(crate) fn merged_weight(wm: &mut [f32], wt: &[f32], spec: &SlotSpec, params: &[f32], di: usize, dout: usize) {
    merged_rows(wm, wt, spec, params, di, dout, 0);
}

/// Step 3: LoRA shrink/expand and IA3 output scaling, segments in parallel when worth it.
/// `beside`: LoRA was done beside the GEMM ([`forward_pooled`]).
fn epilogues(x: &[f32], params: &[f32], params16: Option<&Bf16Tables>, plan: &LayerPlan, y: &mut [f32], beside: bool) {
    let (di, dout) = (plan.d_in, plan.d_out);
    let mine = |e: &SegmentExec| matches!(e, SegmentExec::Lora(_) | SegmentExec::Ia3Out(_)) && !(beside && beside_gemm(e));
    let work: usize = plan
        .segments
        .iter()
        .filter(|(_, e)| mine(e))
        .map(|(s, e)| match e {
            SegmentExec::Lora(spec) => 2 * s.len * spec.rank * (di + dout),
            SegmentExec::Ia3Out(_) => s.len * dout,
            _ => 0,
        })
        .sum();
    if work == 0 {
        return;
    }
    let jobs: Vec<(&mut [f32], &Segment, &SegmentExec)> = split_segments_mut(y, dout, &plan.segments)
        .into_iter()
        .filter(|(_, _, e)| mine(e))
        .collect();
    let run = |(ys, seg, exec): (&mut [f32], &Segment, &SegmentExec)| {
        let xs = &x[seg.start * di..(seg.start + seg.len) * di];
        match exec {
            SegmentExec::Lora(spec) => lora_add(ys, xs, spec, params, params16, seg.len, di, dout),
            SegmentExec::Ia3Out(spec) => {
                let (_, l) = spec.parts(params, di, dout);
                ys.chunks_exact_mut(dout).for_each(|yr| scale_by(yr, l));
            }
            _ => {}
        }
    };
    if work < (1 << 18) || jobs.len() == 1 {
        jobs.into_iter().for_each(run);
    } else {
        jobs.into_par_iter().for_each(run);
    }
}

/// `ys [len, d_out] += scale * (xs A^T) B^T` with A `[r, d_in]`, B^T `[r, d_out]` of the slot.
#[allow(clippy::too_many_arguments)]
fn lora_add(ys: &mut [f32], xs: &[f32], spec: &SlotSpec, params: &[f32], params16: Option<&Bf16Tables>, len: usize, di: usize, dout: usize) {
    let (a, bt) = spec.parts(params, di, dout);
    let r = spec.rank;
    if let Some(p16) = params16 {
        // bf16 inference: the bf16 copy (half the bytes or less), row by row at every length,
        // so a row's output does not depend on its segment's length (the tables of one segment
        // stay in cache across its rows).
        lora_rows_bf16(ys, xs, p16, spec, di, dout)
    } else if len <= LORA_ROW_LOOP_MAX {
        lora_rows(ys, xs, a, bt, spec, di, dout)
    } else {
        let mut t = vec![0f32; len * r];
        matmul(&mut t, r, MatRef::row_major(xs, len, di), MatRef::row_major(a, r, di).t(), spec.scale, 0.0);
        matmul(ys, dout, MatRef::row_major(&t, len, r), MatRef::row_major(bt, r, dout), 1.0, 1.0);
    }
}

/// [`lora_rows`] over the bf16 copy (bf16 inference): the terms ([`lora_slot_terms`]) are
/// summed on their own and then added to the base output, as [`forward_pooled`] does: a LoRA
/// row gets the same bits whichever path its step takes (the pooled one when every row enters
/// the GEMM unchanged, this one beside fLoRA or input-side IA3 rows).
fn lora_rows_bf16(ys: &mut [f32], xs: &[f32], p16: &Bf16Tables, spec: &SlotSpec, di: usize, dout: usize) {
    let rows = xs.len() / di;
    // The rows as the slot's kernel reads them: rounded to bf16 (like the base GEMM's input)
    // or quantized for the 8-bit shrink.
    let (mut x16, mut xq) = (Vec::new(), None);
    if p16.lora.int8_at(di, dout) {
        xq = Some(super::lora_int8::QuantizedRows::new(xs, di));
    } else if rows > 0 {
        x16.resize(rows * di.div_ceil(2), 0u32);
        super::bf16::round_rows(&mut x16, xs, di, rows, di);
    }
    let input = match &xq {
        Some(q) => LoraRows::Int8(&q.qx, &q.sx),
        None => LoraRows::Bf16(&x16),
    };
    with_scratch(LORA_TERMS, rows * dout, |terms| {
        lora_slot_terms(terms, input, p16, spec, di, dout);
        axpy(ys, 1.0, terms);
    });
}

/// A LoRA segment's rows in the form its slot's kernel reads: bf16 pairs (`[len, ceil(d_in /
/// 2)]`) for bf16 tables, quantized (`qx [len, d_in]`, `sx [len]`) for 8-bit ones (the caller
/// picks by `p16.lora.int8_at`).
enum LoraRows<'a> {
    Bf16(&'a [u32]),
    Int8(&'a [i16], &'a [f32]),
}

/// A LoRA slot's terms `ys [len, d_out] = scale * B^T (A x)` from the bf16 copy, by the kernel
/// of the slot's format there.
fn lora_slot_terms(ys: &mut [f32], rows: LoraRows, p16: &Bf16Tables, spec: &SlotSpec, di: usize, dout: usize) {
    match rows {
        LoraRows::Int8(qx, sx) => {
            let range = spec.range(di, dout);
            super::lora_int8::terms(ys, qx, sx, &p16.values[range.clone()], &p16.ints[range], spec.rank, spec.scale, di, dout);
        }
        LoraRows::Bf16(x16) => {
            let (a, bt) = spec.parts(&p16.values, di, dout);
            super::lora_bf16::terms(ys, x16, a, bt, spec.rank, spec.scale, di, dout);
        }
    }
}

/// Short segments of [`lora_add`] with f32 tables: per row, `t = scale * A x` by dots, then
/// `y += B^T t` by axpys.
#[allow(clippy::too_many_arguments)]
fn lora_rows(ys: &mut [f32], xs: &[f32], a: &[f32], bt: &[f32], spec: &SlotSpec, di: usize, dout: usize) {
    let mut t = vec![0f32; spec.rank];
    for (yr, xr) in ys.chunks_exact_mut(dout).zip(xs.chunks_exact(di)) {
        for (j, tj) in t.iter_mut().enumerate() {
            *tj = spec.scale * dot(&a[j * di..(j + 1) * di], xr);
        }
        for (j, &tj) in t.iter().enumerate() {
            axpy(yr, tj, &bt[j * dout..(j + 1) * dout]);
        }
    }
}

/// Splits `y` (rows of width `d`) into the disjoint row ranges of sorted, non-overlapping segments.
pub(crate) fn split_segments_mut<'a, 'p>(
    mut y: &'a mut [f32],
    d: usize,
    segments: &'p [(Segment, SegmentExec)],
) -> Vec<(&'a mut [f32], &'p Segment, &'p SegmentExec)> {
    let mut out = Vec::with_capacity(segments.len());
    let mut consumed = 0;
    for (seg, exec) in segments {
        let (_, rest) = std::mem::take(&mut y).split_at_mut((seg.start - consumed) * d);
        let (mine, rest) = rest.split_at_mut(seg.len * d);
        out.push((mine, seg, exec));
        y = rest;
        consumed = seg.start + seg.len;
    }
    out
}
