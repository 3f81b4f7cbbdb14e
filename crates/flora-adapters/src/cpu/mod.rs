//! CPU implementations of the adapter kernels (f32). A CUDA backend implements the same
//! `forward` / `backward` contract (see docs/architecture.md).

pub mod backward;
pub mod bf16;
pub mod forward;
pub mod lora_bf16;
pub mod matmul;
pub mod skinny;
pub mod team;
pub mod vecops;

pub use skinny::has_avx512;
