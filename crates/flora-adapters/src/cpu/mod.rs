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
