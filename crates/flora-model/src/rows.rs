//! Row-wise element-wise ops of the inference step, on plain `[rows, dim]` buffers (no
//! gradient): fused so a decode step does not pay a candle op, an allocation and a pass over
//! memory per primitive (RMSNorm alone is six candle ops). The math equals `crate::layers`'
//! differentiable versions, which the batch-invariance tests compare against.

use flora_adapters::cpu::vecops::exp_in_place;
use rayon::prelude::*;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;
/// Fewer rows (a decode step) run on the calling thread: handing them to the pool costs more
/// than the pass itself (measured: SwiGLU at 32 rows took twice as long in parallel).
const PARALLEL_MIN_ROWS: usize = 256;

fn for_rows(buf: &mut [f32], dim: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if buf.len() >= PARALLEL_MIN_ROWS * dim {
        buf.par_chunks_mut(ROWS_PER_TASK * dim).enumerate().for_each(|(t, block)| {
            for (i, row) in block.chunks_exact_mut(dim).enumerate() {
                f(t * ROWS_PER_TASK + i, row);
            }
        });
    } else {
        buf.chunks_exact_mut(dim).enumerate().for_each(|(i, row)| f(i, row));
    }
}

/// `out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w` for every row `i` of `x [rows, dim]`.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    let mut out = vec![0f32; x.len()];
    for_rows(&mut out, dim, |i, o| {
        let xr = &x[i * dim..(i + 1) * dim];
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &wv) in o.iter_mut().zip(xr).zip(w) {
            *o = v * inv * wv;
        }
    });
    out
}

/// `h += d` (the residual connection).
pub fn add_into(h: &mut [f32], d: &[f32]) {
    for (a, b) in h.iter_mut().zip(d) {
        *a += b;
    }
}

/// `gate = silu(gate) * up` in place (SwiGLU's input to the down projection).
pub fn silu_mul_into(gate: &mut [f32], up: &[f32], dim: usize) {
    for_rows(gate, dim, |i, g| {
        let u = &up[i * dim..(i + 1) * dim];
        #[cfg(target_arch = "x86_64")]
        if flora_adapters::cpu::has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked at run time).
            return unsafe { silu_mul_row_avx512(g, u) };
        }
        silu_mul_row(g, u)
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_row_avx512(g: &mut [f32], u: &[f32]) {
    silu_mul_row(g, u)
}

/// `g = g / (1 + e^-g) * u`, in three vectorized passes over the row.
#[inline(always)]
fn silu_mul_row(g: &mut [f32], u: &[f32]) {
    let mut e: Vec<f32> = g.iter().map(|v| -v).collect();
    exp_in_place(&mut e);
    for ((gv, &ev), &uv) in g.iter_mut().zip(&e).zip(u) {
        *gv = *gv / (1.0 + ev) * uv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn fused_rows_equal_the_differentiable_layers() {
        let (rows, dim) = (40, 24);
        let x: Vec<f32> = (0..rows * dim).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 / dim as f32).collect();
        let dev = Device::Cpu;
        let xt = Tensor::from_vec(x.clone(), (rows, dim), &dev).unwrap();
        let wt = Tensor::from_vec(w.clone(), dim, &dev).unwrap();
        let want: Vec<f32> = crate::layers::rms_norm(&xt, &wt, 1e-5).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = rms_norm_rows(&x, &w, 1e-5);
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs())));
        let up: Vec<f32> = x.iter().map(|v| v * 0.3 - 0.1).collect();
        let upt = Tensor::from_vec(up.clone(), (rows, dim), &dev).unwrap();
        let want: Vec<f32> = (xt.silu().unwrap() * upt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let mut got = x.clone();
        silu_mul_into(&mut got, &up, dim);
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs())));
    }
}
