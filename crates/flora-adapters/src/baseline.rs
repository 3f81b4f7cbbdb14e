//! The paper's baseline for heterogeneous LoRA ("bmm LoRA", Sec. 3.2), kept as a measured
//! reference path: gather every row's A_i and B_i into `[n, r, d_in]` / `[n, d_out, r]`
//! tensors, then two batched matmuls. All adapters must share one rank (the baseline cannot
//! mix ranks without padding).

use candle_core::{Result, Tensor};

/// `y = x W0^T + scale * bmm(bmm(x, A_i^T), B_i^T)`.
/// `x [n, d_in]`, `w0t [d_in, d_out]`, `a_all [n_adapters, r, d_in]`, `b_all [n_adapters, d_out, r]`,
/// `row_adapter [n]` (u32 adapter index per row; every row is adapted).
pub fn lora_gather_bmm(x: &Tensor, w0t: &Tensor, a_all: &Tensor, b_all: &Tensor, row_adapter: &Tensor, scale: f64) -> Result<Tensor> {
    let base = x.matmul(w0t)?;
    let a = a_all.index_select(row_adapter, 0)?; // [n, r, d_in]
    let b = b_all.index_select(row_adapter, 0)?; // [n, d_out, r]
    let x3 = x.unsqueeze(1)?; // [n, 1, d_in]
    let t = x3.matmul(&a.transpose(1, 2)?)?; // [n, 1, r]
    let d = t.matmul(&b.transpose(1, 2)?)?; // [n, 1, d_out]
    base + (d.squeeze(1)? * scale)?
}
