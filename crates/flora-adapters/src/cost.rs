//! Cost model: predicts the time of each way to execute an fLoRA segment from machine constants,
//! and picks the cheaper one. See docs/cost-model.md for the derivation and how it generalises
//! the paper's Eq. 7.
//!
//! Constants (measured by [`CostModel::measure`], or `flora bench layers`):
//! - `gemm_rate(m)`: sustained FLOP/s of a `[m, d] x [d, d]` product, per row count `m`
//!   (small `m` is bandwidth-bound, large `m` compute-bound);
//! - `bandwidth`: bytes/s of a streaming element-wise pass;
//! - `call_overhead`: seconds of fixed cost per extra kernel call.

use crate::cpu::matmul::{matmul, MatRef};
use std::time::Instant;

#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    /// `(rows, FLOP/s)` sorted by rows; interpolated in log(rows).
    pub gemm_rate: Vec<(usize, f64)>,
    /// Bytes per second of a streaming element-wise pass.
    pub bandwidth: f64,
    /// Seconds per extra kernel call.
    pub call_overhead: f64,
}

impl Default for CostModel {
    /// Constants measured on a 2-core AVX-512 machine (see docs/bench/); good enough to choose
    /// paths before [`CostModel::measure`] has run.
    fn default() -> Self {
        Self {
            gemm_rate: vec![(1, 6e9), (8, 40e9), (32, 110e9), (64, 150e9), (256, 190e9), (1024, 200e9)],
            bandwidth: 12e9,
            call_overhead: 3e-6,
        }
    }
}

impl CostModel {
    /// FLOP/s of a GEMM with `m` rows.
    pub fn rate(&self, m: usize) -> f64 {
        let t = &self.gemm_rate;
        let m = m.max(1) as f64;
        if m <= t[0].0 as f64 {
            return t[0].1;
        }
        for w in t.windows(2) {
            let ((m0, r0), (m1, r1)) = ((w[0].0 as f64, w[0].1), (w[1].0 as f64, w[1].1));
            if m <= m1 {
                let f = (m.ln() - m0.ln()) / (m1.ln() - m0.ln());
                return r0 + f * (r1 - r0);
            }
        }
        t[t.len() - 1].1
    }

    /// Seconds of a standalone `[m, k] x [k, n]` GEMM.
    pub fn gemm_time(&self, m: usize, k: usize, n: usize) -> f64 {
        self.call_overhead + 2.0 * (m * k * n) as f64 / self.rate(m)
    }

    /// Extra seconds an fLoRA segment of `n_rows` at rank `r` adds when its r scaled row copies
    /// join the shared base GEMM of `shared_rows` rows in total (paper Eq. 6): the growth of that
    /// GEMM (nearly free while it is bandwidth-bound, decode; r*n rows of work once it is
    /// compute-bound, prefill), plus stacking the copies and reducing the r outputs.
    pub fn flora_vectorized_time(&self, shared_rows: usize, n_rows: usize, r: usize, d_in: usize, d_out: usize) -> f64 {
        let extra = r * n_rows;
        let grow = self.gemm_time(shared_rows.max(extra), d_in, d_out) - self.gemm_time(shared_rows.max(extra) - extra, d_in, d_out);
        let bytes = 4.0 * 2.0 * (extra * (d_in + d_out)) as f64;
        grow.max(0.0) + bytes / self.bandwidth
    }

    /// Seconds of running the segment on its own merged weight, built tile by tile in cache
    /// (r multiply-adds per weight element) and consumed at once by the segment's GEMM, which
    /// streams W0 once like any GEMM of `n_rows` rows.
    pub fn flora_merged_time(&self, n_rows: usize, r: usize, d_in: usize, d_out: usize) -> f64 {
        let dd = (d_in * d_out) as f64;
        let build = 2.0 * r as f64 * dd / (0.5 * self.rate(1 << 20));
        let tiles = d_in.div_ceil(64) as f64 * self.call_overhead;
        build + tiles + self.gemm_time(n_rows, d_in, d_out)
    }

    /// Whether the merged path is predicted faster for a segment whose vectorized rows would
    /// join a shared GEMM of `shared_rows` rows.
    pub fn prefers_merged(&self, shared_rows: usize, n_rows: usize, r: usize, d_in: usize, d_out: usize) -> bool {
        self.flora_merged_time(n_rows, r, d_in, d_out) < self.flora_vectorized_time(shared_rows, n_rows, r, d_in, d_out)
    }

    /// The paper's Eq. 7 decision (fLoRA vs bmm-LoRA) in its own terms, for comparison:
    /// fLoRA is cheaper iff `2 c1 / (d c2) + 1/r >= 1`.
    pub fn paper_eq7_flora_cheaper(c1: f64, c2: f64, d: usize, r: usize) -> bool {
        2.0 * c1 / (d as f64 * c2) + 1.0 / r as f64 >= 1.0
    }

    /// Measures the constants on this machine at width `d` (about a second).
    pub fn measure(d: usize) -> Self {
        let w: Vec<f32> = (0..d * d).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
        let mut gemm_rate = Vec::new();
        for m in [1usize, 8, 32, 64, 256, 1024] {
            let x: Vec<f32> = (0..m * d).map(|i| ((i % 5) as f32 - 2.0) * 0.1).collect();
            let mut y = vec![0f32; m * d];
            let secs = median_secs(|| matmul(&mut y, d, MatRef::row_major(&x, m, d), MatRef::row_major(&w, d, d), 1.0, 0.0), 0.15);
            gemm_rate.push((m, 2.0 * (m * d * d) as f64 / secs));
        }
        let src = vec![1.0f32; 1 << 22];
        let mut dst = vec![0f32; 1 << 22];
        let secs = median_secs(
            || {
                for (o, i) in dst.iter_mut().zip(&src) {
                    *o = *o * 0.5 + *i;
                }
            },
            0.1,
        );
        let bandwidth = 3.0 * 4.0 * (1 << 22) as f64 / secs;
        let mut tiny = vec![0f32; 16];
        let one = vec![1f32; 16];
        let call_overhead = median_secs(|| matmul(&mut tiny, 4, MatRef::row_major(&one, 4, 4), MatRef::row_major(&one, 4, 4), 1.0, 0.0), 0.02);
        Self { gemm_rate, bandwidth, call_overhead }
    }
}

/// Median seconds of `f` over repeated runs lasting about `budget_s` (at least 3 runs).
pub fn median_secs(mut f: impl FnMut(), budget_s: f64) -> f64 {
    f();
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < 3 || (start.elapsed().as_secs_f64() < budget_s && samples.len() < 1000) {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_prefers_vectorized_prefill_prefers_merged() {
        let c = CostModel::default();
        // Decode: one row at rank 4 joining a 32-row shared GEMM costs almost nothing there,
        // while merging would stream the weight once more for a single row.
        assert!(!c.prefers_merged(32 + 4, 1, 4, 576, 576));
        assert!(!c.prefers_merged(32 + 4, 1, 4, 4096, 4096));
        // Prefill: a 64-row segment at rank 8 would add 512 rows of GEMM work.
        assert!(c.prefers_merged(512, 64, 8, 576, 576));
        assert!(c.prefers_merged(512, 64, 4, 4096, 4096));
    }

    #[test]
    fn paper_eq7() {
        // c1 >> c2 with small d favours fLoRA; rank 1 always does.
        assert!(CostModel::paper_eq7_flora_cheaper(1.0, 1.0, 4096, 1));
        assert!(!CostModel::paper_eq7_flora_cheaper(1.0, 1.0, 4096, 8));
        assert!(CostModel::paper_eq7_flora_cheaper(1000.0, 1.0, 1024, 8));
    }
}
