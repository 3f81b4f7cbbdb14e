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
    /// Divisors of RoPE's angles, one per frequency (head_dim / 2), as Llama 3.1+ scales
    /// RoPE: the GGUF tensor `rope_freqs.weight`, or computed from config.json's `llama3`
    /// rope scaling. None: plain RoPE.
    pub rope_freq_factors: Option<Vec<f32>>,
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
        let head_dim = u("attention.key_length").unwrap_or(hidden / n_heads.max(1));
        refuse_gguf_rope_variants(content, head_dim)?;
        let cfg = Self {
            n_layers: u("block_count")?,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            intermediate: u("feed_forward_length")?,
            vocab,
            rope_theta: f("rope.freq_base", 10_000.0),
            rms_eps: f("attention.layer_norm_rms_epsilon", 1e-5),
            context: u("context_length").unwrap_or(2048),
            tie_embeddings,
            // Read with the tensors (weights.rs).
            rope_freq_factors: None,
        };
        cfg.validate()
    }

    /// From a HF `config.json` (LlamaForCausalLM, or Mistral without sliding windows, which is
    /// the same model); refuses other model types and the Llama variants this model file does
    /// not implement (RoPE scaling, partial rotary dimensions, biased projections, activations
    /// other than SiLU), which would otherwise load and give wrong logits. RoPE's settings are
    /// read from `rope_parameters` (transformers 5) or `rope_theta` / `rope_scaling` (before).
    pub fn from_hf_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            model_type: Option<String>,
            architectures: Option<Vec<String>>,
            rope_parameters: Option<serde_json::Value>,
            rope_scaling: Option<serde_json::Value>,
            partial_rotary_factor: Option<f32>,
            attention_bias: Option<bool>,
            mlp_bias: Option<bool>,
            hidden_act: Option<String>,
            sliding_window: Option<usize>,
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
        let unsupported = |what: String| Err(ModelError::Unsupported(format!("config.json: {what}")));
        let context = h.max_position_embeddings.unwrap_or(2048);
        match h.model_type.as_deref() {
            None | Some("llama") => {}
            Some("mistral") if h.sliding_window.is_none_or(|w| w >= context) => {}
            Some("mistral") => return unsupported("sliding-window attention (mistral's sliding_window) is not implemented".into()),
            Some(t) => return unsupported(format!("model_type {t:?}: flora runs Llama-family checkpoints (model_type \"llama\")")),
        }
        let known = |a: &String| ["llamaforcausallm", "mistralforcausallm"].contains(&a.to_ascii_lowercase().as_str());
        if let Some(a) = h.architectures.as_ref().filter(|a| !a.iter().any(known)) {
            return unsupported(format!("architectures {a:?}: flora runs LlamaForCausalLM checkpoints"));
        }
        let (params, scaling) = (h.rope_parameters.as_ref().filter(|v| !v.is_null()), h.rope_scaling.as_ref().filter(|v| !v.is_null()));
        let rule = |r: &serde_json::Value| (r.get("rope_type").or_else(|| r.get("type")).and_then(|v| v.as_str()).map(str::to_ascii_lowercase), r.get("factor").and_then(|v| v.as_f64()));
        if let (Some(p), Some(s)) = (params, scaling) {
            if rule(p) != rule(s) {
                return unsupported(format!("rope_parameters {p} and rope_scaling {s} disagree"));
            }
        }
        let rope = params.or(scaling);
        let rope_theta = rope.and_then(|r| r.get("rope_theta")).and_then(|v| v.as_f64()).map(|v| v as f32).or(h.rope_theta).unwrap_or(10_000.0);
        let head_dim = h.head_dim.unwrap_or(h.hidden_size / h.num_attention_heads.max(1));
        let mut rope_freq_factors = None;
        if let Some(rope) = rope {
            let (kind, factor) = rule(rope);
            let num = |k: &str| rope.get(k).and_then(|v| v.as_f64());
            match (kind.as_deref().unwrap_or("default"), factor) {
                ("default", _) => {}
                // These rules leave RoPE as it is at factor 1 (longrope does not: it has
                // factors of its own).
                ("linear" | "dynamic" | "yarn" | "llama3", Some(f)) if f == 1.0 => {}
                ("llama3", Some(factor)) => {
                    let (Some(low), Some(high), Some(original)) = (num("low_freq_factor"), num("high_freq_factor"), num("original_max_position_embeddings")) else {
                        return unsupported(format!("RoPE scaling {rope}: llama3 scaling needs low_freq_factor, high_freq_factor and original_max_position_embeddings"));
                    };
                    if !(factor > 0.0 && low > 0.0 && low < high && original > 0.0) {
                        return unsupported(format!("RoPE scaling {rope}: llama3 scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor"));
                    }
                    rope_freq_factors = Some(llama3_freq_factors(head_dim, rope_theta, factor, low, high, original));
                }
                _ => return unsupported(format!("RoPE scaling {rope}: not implemented (plain RoPE and Llama 3's llama3 scaling only)")),
            }
        }
        if let Some(f) = h.partial_rotary_factor.filter(|f| *f != 1.0) {
            return unsupported(format!("partial_rotary_factor {f}: RoPE over part of a head is not implemented"));
        }
        if h.attention_bias == Some(true) || h.mlp_bias == Some(true) {
            return unsupported("attention_bias / mlp_bias: projections with biases are not implemented".into());
        }
        if let Some(act) = h.hidden_act.as_deref().filter(|a| *a != "silu") {
            return unsupported(format!("hidden_act {act:?}: the MLP is SwiGLU (silu)"));
        }
        Self {
            n_layers: h.num_hidden_layers,
            hidden: h.hidden_size,
            n_heads: h.num_attention_heads,
            n_kv_heads: h.num_key_value_heads.unwrap_or(h.num_attention_heads),
            head_dim,
            intermediate: h.intermediate_size,
            vocab: h.vocab_size,
            rope_theta,
            rms_eps: h.rms_norm_eps.unwrap_or(1e-5),
            context,
            tie_embeddings: h.tie_word_embeddings.unwrap_or(false),
            rope_freq_factors,
        }
        .validate()
    }

    /// This configuration as a HF `config.json` (LlamaForCausalLM), as [`Self::from_hf_json`]
    /// reads it. RoPE frequency factors are refused: config.json expresses them only as the
    /// parameters of a scaling rule, which the factors do not keep.
    pub fn to_hf_json(&self) -> Result<serde_json::Value> {
        if self.rope_freq_factors.is_some() {
            return Err(ModelError::Unsupported("writing RoPE frequency factors (Llama 3.1 scaling) as config.json".into()));
        }
        Ok(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "num_hidden_layers": self.n_layers, "hidden_size": self.hidden, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "intermediate_size": self.intermediate,
            "vocab_size": self.vocab, "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.context, "tie_word_embeddings": self.tie_embeddings,
        }))
    }

    /// Checks the hyper-parameters fit together (heads, dimensions, RoPE factors).
    pub(crate) fn validate(self) -> Result<Self> {
        let ok = self.n_layers > 0
            && self.n_heads > 0
            && self.n_kv_heads > 0
            && self.n_heads % self.n_kv_heads == 0
            && self.head_dim % 2 == 0
            && self.head_dim > 0
            && self.vocab > 0
            && self.intermediate > 0
            && self.rope_freq_factors.as_ref().is_none_or(|f| f.len() == self.head_dim / 2 && f.iter().all(|x| x.is_finite() && *x > 0.0));
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
            rope_freq_factors: None,
        }
    }
}

/// Refuses the RoPE variants a Llama GGUF can declare that this model file does not implement:
/// scaling other than none (or any rule at factor 1), and rotation over part of a head
/// (`rope.dimension_count` < head_dim). Loading them anyway would give wrong logits without an
/// error. (Llama 3.1's divisors come as a tensor, read in weights.rs.)
fn refuse_gguf_rope_variants(content: &gguf_file::Content, head_dim: usize) -> Result<()> {
    let md = &content.metadata;
    // llama.cpp reads a factor without a type (and the older `rope.scale_linear`) as linear.
    let factor = ["llama.rope.scaling.factor", "llama.rope.scale_linear"].iter().find_map(|k| md.get(*k).and_then(|v| v.to_f32().ok()));
    let default_kind = if factor.is_some() { "linear" } else { "none" };
    let scaling = md.get("llama.rope.scaling.type").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or(default_kind);
    let factor = factor.unwrap_or(1.0);
    // Every scaling rule leaves RoPE as it is at factor 1.
    if !(scaling == "none" || factor == 1.0) {
        return Err(ModelError::Unsupported(format!(
            "RoPE scaling {scaling:?} (factor {factor}) is not implemented (plain RoPE only)"
        )));
    }
    if let Some(dims) = md.get("llama.rope.dimension_count").and_then(|v| v.to_u32().ok()) {
        if dims as usize != head_dim {
            return Err(ModelError::Unsupported(format!(
                "RoPE over {dims} of a head's {head_dim} dimensions (llama.rope.dimension_count) is not implemented"
            )));
        }
    }
    Ok(())
}

/// Llama 3.1's RoPE scaling as divisors of the angles, one per frequency (what llama.cpp's
/// converter stores as `rope_freqs.weight`): frequencies whose wavelength exceeds
/// `original / low` positions turn `factor` times slower, those shorter than `original / high`
/// stay, and those between are interpolated smoothly.
pub fn llama3_freq_factors(head_dim: usize, theta: f32, factor: f64, low: f64, high: f64, original: f64) -> Vec<f32> {
    crate::layers::rope_frequencies(head_dim, theta)
        .into_iter()
        .map(|freq| {
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < original / high {
                1.0
            } else if wavelen > original / low {
                factor as f32
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}
