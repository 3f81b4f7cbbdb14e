//! Per-sequence KV cache: for every layer, the RoPE'd keys and the values of all positions so far,
//! in f32 or in bf16 (half the bytes that every decode step reads back; the cache follows the
//! model's weight format, see `Llama::new_cache`).

use flora_adapters::cpu::bf16::{bf16_to_f32, round_slice};

/// One layer's keys or values, `[len, kv_dim]` row-major, in the cache's element type.
#[derive(Clone, Debug)]
pub(crate) enum KvRows {
    F32(Vec<f32>),
    /// bf16 bits, rounded to nearest even.
    Bf16(Vec<u16>),
}

impl KvRows {
    fn len(&self) -> usize {
        match self {
            KvRows::F32(v) => v.len(),
            KvRows::Bf16(v) => v.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvRows::F32(v) => v.capacity() * 4,
            KvRows::Bf16(v) => v.capacity() * 2,
        }
    }

    fn reserve_exact(&mut self, values: usize) {
        match self {
            KvRows::F32(v) => v.reserve_exact(values),
            KvRows::Bf16(v) => v.reserve_exact(values),
        }
    }

    /// Appends rows given in f32 (rounded for a bf16 cache).
    pub(crate) fn push(&mut self, rows: &[f32]) {
        match self {
            KvRows::F32(v) => v.extend_from_slice(rows),
            KvRows::Bf16(v) => {
                let at = v.len();
                v.resize(at + rows.len(), 0);
                round_slice(&mut v[at..], rows);
            }
        }
    }

    /// The first `n` values, widened to f32 (what the tests compare against).
    #[cfg(test)]
    pub(crate) fn to_f32(&self, n: usize) -> Vec<f32> {
        match self {
            KvRows::F32(v) => v[..n].to_vec(),
            KvRows::Bf16(v) => v[..n].iter().map(|&h| bf16_to_f32(h)).collect(),
        }
    }
}

/// An element of a cache row: f32, or bf16 bits (`u16`).
pub(crate) trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// 16 elements at `p`, widened to f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX-512F and `p` points at 16 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl KvElem for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16_to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // bf16 bits to the high halves of 32-bit lanes: exactly the f32 they round from.
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))))
    }
}

/// Keys and values of one sequence, `[len, kv_dim]` per layer.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) k: Vec<KvRows>,
    pub(crate) v: Vec<KvRows>,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    /// An empty f32 cache.
    pub fn new(n_layers: usize, kv_dim: usize) -> Self {
        Self::with_rows(n_layers, kv_dim, || KvRows::F32(Vec::new()))
    }

    /// An empty bf16 cache: keys and values rounded to bf16 as they are appended.
    pub fn new_bf16(n_layers: usize, kv_dim: usize) -> Self {
        Self::with_rows(n_layers, kv_dim, || KvRows::Bf16(Vec::new()))
    }

    fn with_rows(n_layers: usize, kv_dim: usize, empty: impl Fn() -> KvRows) -> Self {
        Self { k: (0..n_layers).map(|_| empty()).collect(), v: (0..n_layers).map(|_| empty()).collect(), kv_dim, len: 0 }
    }

    /// Positions cached so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether keys and values are held in bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self.k.first(), Some(KvRows::Bf16(_)))
    }

    /// Makes room for `positions` in all (no reallocation, no copy, until the cache holds
    /// more; the serving engine reserves a sequence's prompt plus `max_tokens` on admission).
    pub fn reserve(&mut self, positions: usize) {
        let values = positions.saturating_sub(self.len) * self.kv_dim;
        for rows in self.k.iter_mut().chain(&mut self.v) {
            rows.reserve_exact(values);
        }
    }

    /// Bytes each position takes in every layer's keys and values.
    pub fn bytes_per_token(&self) -> usize {
        let elem = if self.is_bf16() { 2 } else { 4 };
        self.k.len() * 2 * self.kv_dim * elem
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(KvRows::bytes).sum()
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Called once per step after every layer appended its rows.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.k.iter().all(|k| k.len() == self.len * self.kv_dim));
    }
}
