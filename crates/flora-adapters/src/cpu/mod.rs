//! CPU implementations of the adapter kernels (f32). A CUDA backend implements the same
//! `forward` / `backward` contract (see docs/architecture.md).

pub mod backward;
pub mod bf16;
pub mod forward;
pub mod lora_bf16;
pub mod lora_int8;
pub mod matmul;
pub mod skinny;
pub mod team;
pub mod vecops;

pub use skinny::has_avx512;

/// The obvious LoRA terms in f64 over plain tables (A `[r, d_in]`, B^T `[r, d_out]`, `x [rows,
/// d_in]`): `ys = scale * B^T (A x)`, for the LoRA kernels' tests.
#[cfg(test)]
pub(crate) fn lora_reference(x: &[f32], a: &[f32], bt: &[f32], r: usize, scale: f32, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut ys = Vec::with_capacity(x.len() / d_in * d_out);
    for xr in x.chunks_exact(d_in) {
        let t: Vec<f64> = (0..r).map(|j| (0..d_in).map(|i| a[j * d_in + i] as f64 * xr[i] as f64).sum::<f64>() * scale as f64).collect();
        ys.extend((0..d_out).map(|c| (0..r).map(|j| t[j] * bt[j * d_out + c] as f64).sum::<f64>() as f32));
    }
    ys
}

/// Deterministic values in [-0.5, 0.5) for the kernels' tests.
#[cfg(test)]
pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}
