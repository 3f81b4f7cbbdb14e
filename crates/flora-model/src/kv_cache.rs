//! Per-sequence KV cache: for every layer, the RoPE'd keys and the values of all positions so far.

/// Keys and values of one sequence, `[len, kv_dim]` per layer, row-major.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize, kv_dim: usize) -> Self {
        Self { k: vec![Vec::new(); n_layers], v: vec![Vec::new(); n_layers], kv_dim, len: 0 }
    }

    /// Positions cached so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|x| x.capacity() * 4).sum()
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
