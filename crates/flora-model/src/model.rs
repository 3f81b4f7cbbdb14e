//! The Llama-family model: RMSNorm, rotate-half RoPE, GQA attention, SwiGLU MLP, tied or untied
//! embeddings. Every projection (q, k, v, o, gate, up, down) goes through the adapter seam
//! `flora_adapters::adapted_linear`, with the rows' adapter slots in one `AdapterBatch`.
//!
//! Two entry points share the weights and the adapter seam:
//! - [`Llama::forward_train`]: full sequences `[b, t]`, differentiable (training, reference);
//! - [`Llama::step`]: one inference step over ragged sequences with KV caches (no gradient).

use crate::adapters::{Adapter, ModelAdapters, PreparedAdapter};
use crate::attention::{ragged_attention, Heads, Span};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::layers::{causal_attention, rms_norm, Rope};
use crate::rows;
use crate::weights::Checkpoint;
use candle_core::{DType, Tensor};
use flora_adapters::{adapted_linear, adapted_linear_rows, adapted_linear_rows_many, AdapterBatch, BaseWeight, ExecOptions, LoraTables, SlotId, WeightFormat};

/// The seven adaptable projections of a block, in PEFT's module names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// PEFT / HF module name (`q_proj`, ...).
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// Path inside a block (`self_attn.q_proj`, `mlp.down_proj`, ...).
    pub fn path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    pub fn from_module(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.module() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// `(d_in, d_out)` of this projection.
    pub fn dims(self, cfg: &LlamaConfig) -> (usize, usize) {
        match self {
            Proj::Q => (cfg.hidden, cfg.q_dim()),
            Proj::K | Proj::V => (cfg.hidden, cfg.kv_dim()),
            Proj::O => (cfg.q_dim(), cfg.hidden),
            Proj::Gate | Proj::Up => (cfg.hidden, cfg.intermediate),
            Proj::Down => (cfg.intermediate, cfg.hidden),
        }
    }
}

/// An RMSNorm weight `[hidden]`: the tensor (differentiable forward) and its values (the
/// inference step's fused rows, read without a tensor copy per layer and step).
struct Norm {
    w: Tensor,
    values: Vec<f32>,
}

impl Norm {
    fn new(w: Tensor) -> Result<Self> {
        let values = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        Ok(Self { w, values })
    }
}

struct Block {
    attn_norm: Norm,
    ffn_norm: Norm,
    proj: [BaseWeight; 7],
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: BaseWeight,
    rope: Rope,
    exec: ExecOptions,
    /// How bf16 inference stores LoRA tables (see [`Self::adapter_tables`]).
    lora_tables: LoraTables,
}

/// Which positions of a sequence need logits in a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// One sequence's part of an inference step.
pub struct SeqStep<'a> {
    /// New tokens (a prefill chunk, or one decode token).
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Adapter slot in the `ModelAdapters` of the step (None: base model).
    pub slot: Option<SlotId>,
    pub logits: Logits,
}

impl Llama {
    pub fn from_checkpoint(ck: Checkpoint) -> Result<Self> {
        let Checkpoint { config: cfg, mut tensors, .. } = ck;
        let cfg = cfg.validate()?;
        let mut take = |name: &str| tensors.remove(name).ok_or_else(|| ModelError::BadModel(format!("missing tensor {name}")));
        let embed = take("model.embed_tokens.weight")?;
        let lm_head = if cfg.tie_embeddings { BaseWeight::from_out_in(&embed)? } else { BaseWeight::from_out_in(&take("lm_head.weight")?)? };
        let norm = Norm::new(take("model.norm.weight")?)?;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let mut proj = Vec::with_capacity(7);
            for pr in Proj::ALL {
                proj.push(BaseWeight::from_out_in(&take(&format!("{p}.{}.weight", pr.path()))?)?);
            }
            blocks.push(Block {
                attn_norm: Norm::new(take(&format!("{p}.input_layernorm.weight"))?)?,
                ffn_norm: Norm::new(take(&format!("{p}.post_attention_layernorm.weight"))?)?,
                proj: proj.try_into().map_err(|_| ModelError::BadModel("projections".into()))?,
            });
        }
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.context, cfg.rope_freq_factors.as_deref());
        Ok(Self { cfg, embed, blocks, norm, lm_head, rope, exec: ExecOptions::default(), lora_tables: LoraTables::default() })
    }

    /// A random model (tests): weights ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), norms ~ 1.
    pub fn random(cfg: LlamaConfig, seed: u64) -> Result<Self> {
        let tensors = crate::weights::random_tensors(&cfg, seed)?;
        Self::from_checkpoint(Checkpoint { config: cfg, tensors, gguf: None })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// How fLoRA segments are executed (cost model or forced path).
    pub fn set_exec_options(&mut self, exec: ExecOptions) {
        self.exec = exec;
    }

    /// Runs the shared base GEMMs of inference in `format` (every projection and the LM head).
    /// Training and merged fLoRA tiles keep using the f32 weights.
    pub fn set_weight_format(&mut self, format: WeightFormat) -> Result<()> {
        for blk in &mut self.blocks {
            for w in &mut blk.proj {
                w.set_format(format)?;
            }
        }
        self.lm_head.set_format(format)?;
        // In the order a step reads them: each decode thread then streams one run of memory.
        let mut order: Vec<&mut BaseWeight> = self.blocks.iter_mut().flat_map(|b| b.proj.iter_mut()).collect();
        order.push(&mut self.lm_head);
        BaseWeight::arrange_bf16_for_decode(&mut order);
        Ok(())
    }

    pub fn weight_format(&self) -> WeightFormat {
        self.lm_head.format()
    }

    /// How bf16 inference stores LoRA tables from now on: bf16 values, or 8-bit integers with a
    /// scale per rank row (half the bytes a decode step streams per adapter; the adapter's
    /// terms are then within half a quantization step per value of the bf16 ones). Adapters
    /// prepared before must be prepared again. f32 inference keeps f32 tables either way.
    pub fn set_lora_tables(&mut self, lora: LoraTables) {
        self.lora_tables = lora;
    }

    /// The format adapters are prepared in for this model's inference: None with f32 weights
    /// (f32 tables); with bf16 weights, a bf16 copy whose LoRA slots are stored as
    /// [`Self::set_lora_tables`] said.
    pub fn adapter_tables(&self) -> Option<LoraTables> {
        (self.weight_format() == WeightFormat::Bf16).then_some(self.lora_tables)
    }

    /// Packs adapters for this model's inference steps: slot `i` is `adapters[i]`; with bf16
    /// weights the tables are rounded to bf16 and carry a bf16 copy that decode rows stream.
    /// (Training packs its variables with `ModelAdapters::pack`: f32, differentiable.)
    pub fn pack_adapters(&self, adapters: &[&Adapter]) -> Result<ModelAdapters> {
        let prepared = adapters.iter().map(|a| self.prepare_adapter(a)).collect::<Result<Vec<_>>>()?;
        self.pack_prepared(&prepared.iter().collect::<Vec<_>>())
    }

    /// Checks and lays out `adapter` for this model's inference tables in its current weight
    /// format, once; [`Self::pack_prepared`] then only copies values (the serving engine
    /// repacks whenever a slot changes).
    pub fn prepare_adapter(&self, adapter: &Adapter) -> Result<PreparedAdapter> {
        PreparedAdapter::new(&self.cfg, adapter, self.adapter_tables())
    }

    /// Inference tables of prepared adapters (slot i = `adapters[i]`); they must have been
    /// prepared in the current weight format.
    pub fn pack_prepared(&self, adapters: &[&PreparedAdapter]) -> Result<ModelAdapters> {
        let tables = self.adapter_tables();
        if adapters.iter().any(|a| a.bf16 != tables && !a.parts.is_empty()) {
            let lora = tables.map_or(String::new(), |l| format!(", {l} LoRA tables"));
            return Err(ModelError::BadInput(format!("an adapter was prepared for another table format than the model's ({} weights{lora})", self.weight_format())));
        }
        ModelAdapters::from_prepared(&self.cfg, adapters)
    }

    /// A fresh, empty KV cache for one sequence, in the weight format's precision: bf16
    /// weights keep keys and values in bf16 (half the bytes each decode step reads back, half
    /// the memory per token), f32 weights in f32. A cache made before a format change stays
    /// usable: attention reads each cache in its own format.
    pub fn new_cache(&self) -> KvCache {
        match self.weight_format() {
            WeightFormat::Bf16 => KvCache::new_bf16(self.cfg.n_layers, self.cfg.kv_dim()),
            WeightFormat::F32 => KvCache::new(self.cfg.n_layers, self.cfg.kv_dim()),
        }
    }

    /// Bytes of KV cache per token of a sequence made by [`Self::new_cache`].
    pub fn kv_bytes_per_token(&self) -> usize {
        self.new_cache().bytes_per_token()
    }

    fn heads(&self) -> Heads {
        Heads { n_heads: self.cfg.n_heads, n_kv_heads: self.cfg.n_kv_heads, head_dim: self.cfg.head_dim }
    }

    fn proj(&self, x: &Tensor, layer: usize, p: Proj, batch: &AdapterBatch, adapters: Option<&ModelAdapters>) -> Result<Tensor> {
        let la = adapters.and_then(|a| a.get(layer, p));
        Ok(adapted_linear(x, &self.blocks[layer].proj[p.index()], batch, la, &self.exec)?)
    }

    /// [`Self::proj`] on plain rows (inference step).
    fn proj_rows(&self, x: &[f32], layer: usize, p: Proj, batch: &AdapterBatch, adapters: Option<&ModelAdapters>) -> Result<Vec<f32>> {
        let la = adapters.and_then(|a| a.get(layer, p));
        Ok(adapted_linear_rows(x, &self.blocks[layer].proj[p.index()], batch, la, &self.exec)?)
    }

    /// [`Self::proj_rows`] of several projections that share their input (q, k, v; gate, up),
    /// run as one pool of work where the seam can (`adapted_linear_rows_many`).
    fn projs_rows<const N: usize>(&self, x: &[f32], layer: usize, ps: [Proj; N], batch: &AdapterBatch, adapters: Option<&ModelAdapters>) -> Result<[Vec<f32>; N]> {
        let projections = ps.map(|p| (&self.blocks[layer].proj[p.index()], adapters.and_then(|a| a.get(layer, p))));
        let outs = adapted_linear_rows_many(x, &projections, batch, &self.exec)?;
        Ok(outs.try_into().map_err(|_| ModelError::BadModel("projection outputs".into()))?)
    }

    fn mlp(&self, x: &Tensor, layer: usize, batch: &AdapterBatch, adapters: Option<&ModelAdapters>) -> Result<Tensor> {
        let gate = self.proj(x, layer, Proj::Gate, batch, adapters)?;
        let up = self.proj(x, layer, Proj::Up, batch, adapters)?;
        self.proj(&(gate.silu()? * up)?, layer, Proj::Down, batch, adapters)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            return Err(ModelError::BadInput(format!("token id {bad} is outside the vocabulary ({})", self.cfg.vocab)));
        }
        Ok(())
    }

    /// Full-sequence, differentiable forward. `tokens [b, t]`; `slots[i]` is example i's adapter.
    /// Returns logits `[b, t, vocab]`.
    pub fn forward_train(&self, tokens: &[Vec<u32>], slots: &[Option<SlotId>], adapters: Option<&ModelAdapters>) -> Result<Tensor> {
        let b = tokens.len();
        let t = tokens.first().map_or(0, |x| x.len());
        if b == 0 || t == 0 || tokens.iter().any(|x| x.len() != t) || slots.len() != b {
            return Err(ModelError::BadInput(format!("forward_train wants {b} equal-length sequences and one slot each")));
        }
        if t > self.cfg.context {
            return Err(ModelError::BadInput(format!("sequence of {t} tokens exceeds the context of {}", self.cfg.context)));
        }
        let flat: Vec<u32> = tokens.concat();
        self.check_tokens(&flat)?;
        let batch = AdapterBatch::from_runs(&slots.iter().map(|&s| (t, s)).collect::<Vec<_>>());
        let c = &self.cfg;
        let ids = Tensor::from_vec(flat, b * t, self.embed.device())?;
        let mut h = self.embed.index_select(&ids, 0)?; // [b*t, hidden]
        for (li, blk) in self.blocks.iter().enumerate() {
            let x = rms_norm(&h, &blk.attn_norm.w, c.rms_eps)?;
            let q = self.proj(&x, li, Proj::Q, &batch, adapters)?.reshape((b, t, c.n_heads, c.head_dim))?;
            let k = self.proj(&x, li, Proj::K, &batch, adapters)?.reshape((b, t, c.n_kv_heads, c.head_dim))?;
            let v = self.proj(&x, li, Proj::V, &batch, adapters)?.reshape((b, t, c.n_kv_heads, c.head_dim))?;
            let (q, k) = (self.rope.apply(&q)?, self.rope.apply(&k)?);
            let a = causal_attention(&q, &k, &v)?.reshape((b * t, c.q_dim()))?;
            h = (h + self.proj(&a, li, Proj::O, &batch, adapters)?)?;
            let x = rms_norm(&h, &blk.ffn_norm.w, c.rms_eps)?;
            h = (&h + self.mlp(&x, li, &batch, adapters)?)?;
        }
        let h = rms_norm(&h, &self.norm.w, c.rms_eps)?;
        let logits = adapted_linear(&h, &self.lm_head, &AdapterBatch::base_only(b * t), None, &self.exec)?;
        Ok(logits.reshape((b, t, c.vocab))?)
    }

    /// One inference step over ragged sequences. Appends to each sequence's cache and returns
    /// logits `[rows, vocab]` for the requested positions, sequence by sequence.
    pub fn step(&self, seqs: &mut [SeqStep], adapters: Option<&ModelAdapters>) -> Result<Tensor> {
        let rows = self.step_rows(seqs, adapters)?;
        let n = rows.len() / self.cfg.vocab;
        Ok(Tensor::from_vec(rows, (n, self.cfg.vocab), self.embed.device())?)
    }

    /// [`Llama::step`] with the logits as a plain `[rows, vocab]` buffer: what a sampler
    /// reads, without a copy out of a tensor (32 rows of SmolLM's logits are 6.3 MB).
    pub fn step_rows(&self, seqs: &mut [SeqStep], adapters: Option<&ModelAdapters>) -> Result<Vec<f32>> {
        // The step's ~200 parallel GEMMs are short: the pool's other workers spin for the
        // step's duration and take each GEMM's share at once (`team`), instead of sleeping
        // between GEMMs and being handed work through rayon's queues.
        flora_adapters::cpu::team::with_team(|| self.step_in_pool(seqs, adapters))
    }

    fn step_in_pool(&self, seqs: &mut [SeqStep], adapters: Option<&ModelAdapters>) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let mut spans = Vec::with_capacity(seqs.len());
        let mut tokens = Vec::new();
        let mut runs = Vec::with_capacity(seqs.len());
        let mut logit_rows = Vec::new();
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::BadInput("a sequence in the step has no tokens".into()));
            }
            if s.cache.len() + s.tokens.len() > c.context {
                return Err(ModelError::BadInput(format!(
                    "sequence would reach {} tokens, over the model's context of {}",
                    s.cache.len() + s.tokens.len(),
                    c.context
                )));
            }
            if s.cache.kv_dim() != c.kv_dim() {
                return Err(ModelError::BadInput("KV cache belongs to another model".into()));
            }
            let start = tokens.len();
            match s.logits {
                Logits::None => {}
                Logits::Last => logit_rows.push((start + s.tokens.len() - 1) as u32),
                Logits::All => logit_rows.extend((start..start + s.tokens.len()).map(|r| r as u32)),
            }
            spans.push(Span { start, len: s.tokens.len() });
            runs.push((s.tokens.len(), s.slot));
            tokens.extend_from_slice(s.tokens);
        }
        self.check_tokens(&tokens)?;
        let n = tokens.len();
        let batch = AdapterBatch::from_runs(&runs);
        let dev = self.embed.device().clone();
        // The step works on plain row buffers: the residual stream `h [n, hidden]` and every
        // projection's input and output.
        let mut h = self.embed.index_select(&Tensor::from_vec(tokens, n, &dev)?, 0)?.flatten_all()?.to_vec1::<f32>()?;
        let mut caches: Vec<&mut KvCache> = seqs.iter_mut().map(|s| &mut *s.cache).collect();
        for (li, blk) in self.blocks.iter().enumerate() {
            let x = rows::rms_norm_rows(&h, &blk.attn_norm.values, c.rms_eps);
            let [mut q, mut k, v] = self.projs_rows(&x, li, [Proj::Q, Proj::K, Proj::V], &batch, adapters)?;
            let a = ragged_attention(&mut q, &mut k, &v, &spans, &mut caches, li, self.heads(), &self.rope);
            rows::add_into(&mut h, &self.proj_rows(&a, li, Proj::O, &batch, adapters)?);
            let x = rows::rms_norm_rows(&h, &blk.ffn_norm.values, c.rms_eps);
            let [mut gate, up] = self.projs_rows(&x, li, [Proj::Gate, Proj::Up], &batch, adapters)?;
            rows::silu_mul_into(&mut gate, &up, c.intermediate);
            rows::add_into(&mut h, &self.proj_rows(&gate, li, Proj::Down, &batch, adapters)?);
        }
        for (cache, span) in caches.iter_mut().zip(&spans) {
            cache.advance(span.len);
        }
        let n_logits = logit_rows.len();
        if n_logits == 0 {
            return Ok(Vec::new());
        }
        let last: Vec<f32> = logit_rows.iter().flat_map(|&r| h[r as usize * c.hidden..(r as usize + 1) * c.hidden].iter().copied()).collect();
        let h = rows::rms_norm_rows(&last, &self.norm.values, c.rms_eps);
        Ok(adapted_linear_rows(&h, &self.lm_head, &AdapterBatch::base_only(n_logits), None, &self.exec)?)
    }
}
