//! Llama-family hyper-parameters, read from GGUF metadata or a HF config.json.

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file;
use serde::Deserialize;

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Longest sequence (prompt + generated) the model was trained for.
    pub context: usize,
    pub tie_embeddings: bool,
}

impl LlamaConfig {
    /// From the `llama.*` keys of a GGUF file; refuses other architectures.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if arch != "llama" {
            return Err(ModelError::Unsupported(format!(
                "architecture {arch:?}: flora runs Llama-family GGUF models (general.architecture = \"llama\")"
            )));
        }
        let u = |k: &str| -> Result<usize> {
            md.get(&format!("llama.{k}"))
                .ok_or_else(|| ModelError::BadModel(format!("GGUF metadata lacks llama.{k}")))?
                .to_u32()
                .map(|v| v as usize)
                .map_err(|e| ModelError::BadModel(format!("llama.{k}: {e}")))
        };
        let f = |k: &str, default: f32| md.get(&format!("llama.{k}")).and_then(|v| v.to_f32().ok()).unwrap_or(default);
        let hidden = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = u("attention.head_count_kv").unwrap_or(n_heads);
        let vocab = match md.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()) {
            Some(t) => t.len(),
            None => u("vocab_size")?,
        };
        let tie_embeddings = !content.tensor_infos.contains_key("output.weight");
        let cfg = Self {
            n_layers: u("block_count")?,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim: u("attention.key_length").unwrap_or(hidden / n_heads.max(1)),
            intermediate: u("feed_forward_length")?,
            vocab,
            rope_theta: f("rope.freq_base", 10_000.0),
            rms_eps: f("attention.layer_norm_rms_epsilon", 1e-5),
            context: u("context_length").unwrap_or(2048),
            tie_embeddings,
        };
        cfg.validate()
    }

    /// From a HF `config.json` (LlamaForCausalLM and compatible).
    pub fn from_hf_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            num_hidden_layers: usize,
            hidden_size: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            intermediate_size: usize,
            vocab_size: usize,
            rope_theta: Option<f32>,
            rms_norm_eps: Option<f32>,
            max_position_embeddings: Option<usize>,
            tie_word_embeddings: Option<bool>,
        }
        let h: Hf = serde_json::from_str(text).map_err(|e| ModelError::BadModel(format!("config.json: {e}")))?;
        Self {
            n_layers: h.num_hidden_layers,
            hidden: h.hidden_size,
            n_heads: h.num_attention_heads,
            n_kv_heads: h.num_key_value_heads.unwrap_or(h.num_attention_heads),
            head_dim: h.head_dim.unwrap_or(h.hidden_size / h.num_attention_heads.max(1)),
            intermediate: h.intermediate_size,
            vocab: h.vocab_size,
            rope_theta: h.rope_theta.unwrap_or(10_000.0),
            rms_eps: h.rms_norm_eps.unwrap_or(1e-5),
            context: h.max_position_embeddings.unwrap_or(2048),
            tie_embeddings: h.tie_word_embeddings.unwrap_or(false),
        }
        .validate()
    }

    fn validate(self) -> Result<Self> {
        let ok = self.n_layers > 0
            && self.n_heads > 0
            && self.n_kv_heads > 0
            && self.n_heads % self.n_kv_heads == 0
            && self.head_dim % 2 == 0
            && self.head_dim > 0
            && self.vocab > 0
            && self.intermediate > 0;
        if !ok {
            return Err(ModelError::BadModel(format!("inconsistent hyper-parameters: {self:?}")));
        }
        Ok(self)
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// A tiny random-model configuration for tests.
    pub fn tiny() -> Self {
        Self {
            n_layers: 2,
            hidden: 32,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            intermediate: 48,
            vocab: 97,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            context: 128,
            tie_embeddings: true,
        }
    }
}
