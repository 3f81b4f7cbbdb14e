//! Backward kernel of one adapted projection: gradients w.r.t. the input rows and every slot's
//! packed parameters (W0 is frozen: no gradient is formed for it).
//!
//! With upstream `g_i = dL/dy_i` [d_out] (s = slot scale):
//!   base   : dx = W0^T g
//!   LoRA   : t = A x, u = B^T g;  dx = W0^T g + s A^T u;  dA += s u x^T;  dB^T += s t g^T
//!   IA3 out: dx = W0^T (l o g);   dl += g o (W0 x)
//!   IA3 in : v = W0^T g;  dx = l o v;  dl += x o v
//!   fLoRA  : z_j = W0 (b_j o x), v_j = W0^T (s a_j o g);  dx = sum_j b_j o v_j;
//!            da_j += s g o z_j;  db_j += x o v_j           (vectorized)
//!            or with W = W0 o s b^T a and D = (x^T g) o W0^T:  dx = W^T g,
//!            da = s b D,  db = s a D^T                    (merged)
//! As in the forward, the W0^T products of all non-merged rows form ONE shared GEMM, and the
//! recomputed W0 products needed by IA3-out and vectorized fLoRA form one more.

use super::forward::{merged_weight, stack_inputs};
use super::matmul::{matmul, MatRef};
use super::vecops::{mul_acc, mul_into, with_scratch};
use crate::plan::{LayerPlan, SegmentExec};

/// Gradients of one call.
pub struct Grads {
    /// `[n, d_in]`
    pub dx: Vec<f32>,
    /// Same layout as the packed params.
    pub dparams: Vec<f32>,
}

pub fn backward(x: &[f32], wt: &[f32], params: &[f32], plan: &LayerPlan, g: &[f32]) -> Grads {
    let (n, di, dout) = (plan.n_rows, plan.d_in, plan.d_out);
    assert_eq!(g.len(), n * dout, "backward: upstream gradient has {} values, expected {n}x{dout}", g.len());
    let mut dx = vec![0f32; n * di];
    let mut dp = vec![0f32; params.len()];
    let w = MatRef::row_major(wt, di, dout);
    input_gradients(x, w, params, plan, g, &mut dx, &mut dp);
    recomputed_forward_terms(x, w, params, plan, g, &mut dp);
    for (seg, exec) in &plan.segments {
        let rows = seg.start..seg.start + seg.len;
        let (xs, gs) = (&x[rows.start * di..rows.end * di], &g[rows.start * dout..rows.end * dout]);
        let dxs = &mut dx[rows.start * di..rows.end * di];
        match exec {
            SegmentExec::Lora(spec) => {
                let (a, bt) = spec.parts(params, di, dout);
                let (r, s, len) = (spec.rank, spec.scale, seg.len);
                let mut t = vec![0f32; len * r];
                let mut u = vec![0f32; len * r];
                matmul(&mut t, r, MatRef::row_major(xs, len, di), MatRef::row_major(a, r, di).t(), 1.0, 0.0);
                matmul(&mut u, r, MatRef::row_major(gs, len, dout), MatRef::row_major(bt, r, dout).t(), 1.0, 0.0);
                // dx += s u A
                matmul(dxs, di, MatRef::row_major(&u, len, r), MatRef::row_major(a, r, di), s, 1.0);
                let (da, dbt) = dp[spec.offset..spec.offset + r * (di + dout)].split_at_mut(r * di);
                // dA += s u^T x ; dB^T += s t^T g
                matmul(da, di, MatRef::row_major(&u, len, r).t(), MatRef::row_major(xs, len, di), s, 1.0);
                matmul(dbt, dout, MatRef::row_major(&t, len, r).t(), MatRef::row_major(gs, len, dout), s, 1.0);
            }
            SegmentExec::FloraMerged(spec) => {
                let (b, a) = spec.parts(params, di, dout);
                let (r, s) = (spec.rank, spec.scale);
                with_scratch(0, di * dout, |wm| {
                    merged_weight(wm, wt, spec, params, di, dout);
                    // dx = g W^T   (W stored [d_in, d_out])
                    matmul(dxs, di, MatRef::row_major(gs, seg.len, dout), MatRef::row_major(wm, di, dout).t(), 1.0, 0.0);
                    // D = (x^T g) o wt   [d_in, d_out], reusing wm's buffer
                    matmul(wm, dout, MatRef::row_major(xs, seg.len, di).t(), MatRef::row_major(gs, seg.len, dout), 1.0, 0.0);
                    for (dv, wv) in wm.iter_mut().zip(wt) {
                        *dv *= wv;
                    }
                    let (db, da) = dp[spec.offset..spec.offset + r * (di + dout)].split_at_mut(r * di);
                    // da [r, d_out] += s b D ; db [r, d_in] += s a D^T
                    matmul(da, dout, MatRef::row_major(b, r, di), MatRef::row_major(wm, di, dout), s, 1.0);
                    matmul(db, di, MatRef::row_major(a, r, dout), MatRef::row_major(wm, di, dout).t(), s, 1.0);
                });
            }
            _ => {}
        }
    }
    Grads { dx, dparams: dp }
}

/// The shared `W0^T` GEMM over all non-merged rows, and what follows from it.
fn input_gradients(x: &[f32], w: MatRef, params: &[f32], plan: &LayerPlan, g: &[f32], dx: &mut [f32], dp: &mut [f32]) {
    let (di, dout) = (plan.d_in, plan.d_out);
    let n_st = plan.n_stacked_rows();
    if n_st == 0 {
        return;
    }
    let wt_t = w.t(); // [d_out, d_in]
    let plain = plan.segments.iter().all(|(_, e)| matches!(e, SegmentExec::Base | SegmentExec::Lora(_)));
    if plain {
        matmul(dx, di, MatRef::row_major(g, plan.n_rows, dout), wt_t, 1.0, 0.0);
        return;
    }
    with_scratch(1, n_st * dout, |gs_all| {
        // Stack the upstream rows each segment sends through W0^T.
        let mut r0 = 0;
        for (seg, exec) in &plan.segments {
            let gseg = &g[seg.start * dout..(seg.start + seg.len) * dout];
            let out = &mut gs_all[r0 * dout..(r0 + exec.stacked_rows(seg.len)) * dout];
            match exec {
                SegmentExec::FloraMerged(_) => {}
                SegmentExec::FloraVectorized(spec) => {
                    let (_, a) = spec.parts(params, di, dout);
                    for (j, block) in out.chunks_exact_mut(seg.len * dout).enumerate() {
                        let aj = &a[j * dout..(j + 1) * dout];
                        for (o, gr) in block.chunks_exact_mut(dout).zip(gseg.chunks_exact(dout)) {
                            o.fill(0.0);
                            mul_acc(o, spec.scale, gr, aj);
                        }
                    }
                }
                SegmentExec::Ia3Out(spec) => {
                    let (_, l) = spec.parts(params, di, dout);
                    for (o, gr) in out.chunks_exact_mut(dout).zip(gseg.chunks_exact(dout)) {
                        mul_into(o, gr, l);
                    }
                }
                _ => out.copy_from_slice(gseg),
            }
            r0 += exec.stacked_rows(seg.len);
        }
        with_scratch(2, n_st * di, |vs| {
            matmul(vs, di, MatRef::row_major(gs_all, n_st, dout), wt_t, 1.0, 0.0);
            let mut r0 = 0;
            for (seg, exec) in &plan.segments {
                let xseg = &x[seg.start * di..(seg.start + seg.len) * di];
                let dxs = &mut dx[seg.start * di..(seg.start + seg.len) * di];
                match exec {
                    SegmentExec::FloraMerged(_) => {}
                    SegmentExec::FloraVectorized(spec) => {
                        let (b, _) = spec.parts(params, di, dout);
                        let db = &mut dp[spec.offset..spec.offset + spec.rank * di];
                        for j in 0..spec.rank {
                            let bj = &b[j * di..(j + 1) * di];
                            for row in 0..seg.len {
                                let v = &vs[(r0 + j * seg.len + row) * di..(r0 + j * seg.len + row + 1) * di];
                                mul_acc(&mut dxs[row * di..(row + 1) * di], 1.0, bj, v);
                                mul_acc(&mut db[j * di..(j + 1) * di], 1.0, &xseg[row * di..(row + 1) * di], v);
                            }
                        }
                    }
                    SegmentExec::Ia3In(spec) => {
                        let (l, _) = spec.parts(params, di, dout);
                        let dl = &mut dp[spec.offset..spec.offset + di];
                        for row in 0..seg.len {
                            let v = &vs[(r0 + row) * di..(r0 + row + 1) * di];
                            mul_into(&mut dxs[row * di..(row + 1) * di], l, v);
                            mul_acc(dl, 1.0, &xseg[row * di..(row + 1) * di], v);
                        }
                    }
                    _ => dxs.copy_from_slice(&vs[r0 * di..(r0 + seg.len) * di]),
                }
                r0 += exec.stacked_rows(seg.len);
            }
        });
    });
}

/// Gradients that need the base products W0 x again (IA3 out, vectorized fLoRA): one GEMM over
/// just those segments' stacked rows.
fn recomputed_forward_terms(x: &[f32], w: MatRef, params: &[f32], plan: &LayerPlan, g: &[f32], dp: &mut [f32]) {
    let (di, dout) = (plan.d_in, plan.d_out);
    let needs = |e: &SegmentExec| matches!(e, SegmentExec::Ia3Out(_) | SegmentExec::FloraVectorized(_));
    let sub = LayerPlan {
        segments: plan.segments.iter().filter(|(_, e)| needs(e)).copied().collect(),
        ..plan.clone()
    };
    let n_st = sub.n_stacked_rows();
    if n_st == 0 {
        return;
    }
    with_scratch(1, n_st * di, |xs| {
        stack_inputs(x, params, &sub, xs);
        with_scratch(2, n_st * dout, |zs| {
            matmul(zs, dout, MatRef::row_major(xs, n_st, di), w, 1.0, 0.0);
            let mut r0 = 0;
            for (seg, exec) in &sub.segments {
                let gseg = &g[seg.start * dout..(seg.start + seg.len) * dout];
                match exec {
                    SegmentExec::Ia3Out(spec) => {
                        let dl = &mut dp[spec.offset..spec.offset + dout];
                        for row in 0..seg.len {
                            mul_acc(dl, 1.0, &gseg[row * dout..(row + 1) * dout], &zs[(r0 + row) * dout..(r0 + row + 1) * dout]);
                        }
                    }
                    SegmentExec::FloraVectorized(spec) => {
                        let r = spec.rank;
                        let da = &mut dp[spec.offset + r * di..spec.offset + r * (di + dout)];
                        for j in 0..r {
                            for row in 0..seg.len {
                                let z = &zs[(r0 + j * seg.len + row) * dout..(r0 + j * seg.len + row + 1) * dout];
                                mul_acc(&mut da[j * dout..(j + 1) * dout], spec.scale, &gseg[row * dout..(row + 1) * dout], z);
                            }
                        }
                    }
                    _ => {}
                }
                r0 += exec.stacked_rows(seg.len);
            }
        });
    });
}

