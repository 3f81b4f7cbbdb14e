//! Adapter directories: LoRA and IA3 in PEFT's layout, fLoRA in ours (docs/adapter-format.md).
//!
//! A directory holds `adapter_config.json` and `adapter_model.safetensors`. Tensor keys are
//! PEFT's: `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.{suffix}` with suffix
//! `lora_A.weight` `[r, d_in]` / `lora_B.weight` `[d_out, r]` (LoRA), `ia3_l` `[d_out, 1]` or
//! `[1, d_in]` for feed-forward modules (IA3), `flora_a` `[r, d_out]` / `flora_b` `[r, d_in]` (fLoRA).

use crate::adapters::Adapter;
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::model::Proj;
use candle_core::{DType, Device, Tensor};
use flora_adapters::{AdapterKind, AdapterWeights};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The fields of `adapter_config.json` flora reads (PEFT's names).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub r: Option<usize>,
    #[serde(default)]
    pub lora_alpha: Option<f32>,
    #[serde(default)]
    pub use_rslora: Option<bool>,
    #[serde(default)]
    pub use_dora: Option<bool>,
    #[serde(default)]
    pub fan_in_fan_out: Option<bool>,
    #[serde(default)]
    pub target_modules: Option<serde_json::Value>,
    #[serde(default)]
    pub feedforward_modules: Option<serde_json::Value>,
    #[serde(default)]
    pub rank_pattern: Option<HashMap<String, serde_json::Value>>,
    #[serde(default)]
    pub alpha_pattern: Option<HashMap<String, serde_json::Value>>,
    #[serde(default)]
    pub bias: Option<String>,
}

const PREFIX: &str = "base_model.model.model.layers.";

/// Reads `adapter_config.json` of an adapter directory: the config and the adapter's kind.
/// (Cheap: the weights are not read.)
pub fn read_adapter_config(dir: &Path, name: &str) -> Result<(AdapterConfig, AdapterKind)> {
    let err = |msg: String| ModelError::Adapter { name: name.to_string(), msg };
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| err(format!("{}: {e}", cfg_path.display())))?;
    let ac: AdapterConfig = serde_json::from_str(&text).map_err(|e| err(format!("{}: {e}", cfg_path.display())))?;
    let kind = match ac.peft_type.to_ascii_uppercase().as_str() {
        "LORA" => AdapterKind::Lora,
        "IA3" => AdapterKind::Ia3,
        "FLORA" => AdapterKind::Flora,
        other => return Err(err(format!("peft_type {other:?} is not supported (LORA, IA3, FLORA)"))),
    };
    Ok((ac, kind))
}

/// Loads and validates an adapter directory for a model of config `cfg`.
pub fn load_adapter_dir(dir: &Path, name: &str, cfg: &LlamaConfig) -> Result<Adapter> {
    let err = |msg: String| ModelError::Adapter { name: name.to_string(), msg };
    let (ac, kind) = read_adapter_config(dir, name)?;
    if ac.use_dora == Some(true) {
        return Err(err("DoRA adapters are not supported".into()));
    }
    if ac.fan_in_fan_out == Some(true) {
        return Err(err("fan_in_fan_out adapters are not supported".into()));
    }
    if ac.rank_pattern.as_ref().is_some_and(|m| !m.is_empty()) || ac.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(err("per-module rank_pattern / alpha_pattern is not supported".into()));
    }
    if ac.bias.as_deref().is_some_and(|b| b != "none") {
        return Err(err(format!("bias {:?} is not supported (only \"none\")", ac.bias)));
    }
    let st_path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&st_path, &Device::Cpu).map_err(|e| err(format!("{}: {e}", st_path.display())))?;
    let feedforward: Vec<String> = match &ac.feedforward_modules {
        Some(serde_json::Value::Array(v)) => v.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => vec![],
    };
    // Group tensors by (layer, projection).
    let mut parts: BTreeMap<(usize, Proj), HashMap<String, Tensor>> = BTreeMap::new();
    for (key, t) in tensors {
        let (layer, proj, suffix) = parse_key(&key).ok_or_else(|| err(format!("unexpected tensor key {key:?}")))?;
        if layer >= cfg.n_layers {
            return Err(err(format!("tensor {key} targets layer {layer}, the model has {}", cfg.n_layers)));
        }
        parts.entry((layer, proj)).or_default().insert(suffix, t.to_dtype(DType::F32)?);
    }
    if parts.is_empty() {
        return Err(err("the adapter has no tensors".into()));
    }
    let mut weights = BTreeMap::new();
    let mut rank = 1;
    for ((layer, proj), mut m) in parts {
        let mut take = |s: &str| m.remove(s).ok_or_else(|| err(format!("layers.{layer}.{}: missing {s}", proj.path())));
        let w = match kind {
            AdapterKind::Lora => {
                let (a, b) = (take("lora_A.weight")?, take("lora_B.weight")?);
                let r = a.dims().first().copied().unwrap_or(0);
                if ac.r.is_some_and(|cr| cr != r) {
                    return Err(err(format!("layers.{layer}.{}: lora_A has rank {r}, adapter_config says r = {:?}", proj.path(), ac.r)));
                }
                rank = r;
                let alpha = ac.lora_alpha.unwrap_or(r as f32);
                let scale = if ac.use_rslora == Some(true) { alpha / (r as f32).sqrt() } else { alpha / r as f32 };
                AdapterWeights::Lora { a, b, scale }
            }
            AdapterKind::Flora => {
                let (a, b) = (take("flora_a")?, take("flora_b")?);
                rank = a.dims().first().copied().unwrap_or(0);
                AdapterWeights::Flora { a, b }
            }
            AdapterKind::Ia3 => {
                let l = take("ia3_l")?;
                let on_input = feedforward.iter().any(|f| f == proj.module());
                AdapterWeights::Ia3 { l: l.flatten_all()?, on_input }
            }
        };
        if let Some(extra) = m.keys().next() {
            return Err(err(format!("layers.{layer}.{}: unexpected tensor {extra}", proj.path())));
        }
        weights.insert((layer, proj), w);
    }
    let adapter = Adapter { name: name.to_string(), kind, rank, weights };
    // Validate shapes and values by packing once (errors name layer and adapter).
    crate::adapters::ModelAdapters::pack(cfg, &[&adapter])?;
    Ok(adapter)
}

/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> (3, Q, "lora_A.weight").
fn parse_key(key: &str) -> Option<(usize, Proj, String)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let (block, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.split_once('.')?;
    let proj = Proj::from_module(module)?;
    (proj.path().split_once('.')?.0 == block).then(|| (layer, proj, suffix.to_string()))
}

/// Writes an adapter directory (config + safetensors) atomically: files go to a temp directory
/// that is renamed into place.
pub fn save_adapter_dir(adapter: &Adapter, dir: &Path, alpha: Option<f32>) -> Result<()> {
    let err = |msg: String| ModelError::Adapter { name: adapter.name.clone(), msg };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut targets: Vec<&str> = Vec::new();
    let mut feedforward: Vec<&str> = Vec::new();
    for ((layer, proj), w) in &adapter.weights {
        let base = format!("{PREFIX}{layer}.{}", proj.path());
        targets.push(proj.module());
        match w {
            AdapterWeights::Lora { a, b, .. } => {
                tensors.push((format!("{base}.lora_A.weight"), a.clone()));
                tensors.push((format!("{base}.lora_B.weight"), b.clone()));
            }
            AdapterWeights::Flora { a, b } => {
                tensors.push((format!("{base}.flora_a"), a.clone()));
                tensors.push((format!("{base}.flora_b"), b.clone()));
            }
            AdapterWeights::Ia3 { l, on_input } => {
                let n = l.elem_count();
                let shaped = if *on_input { l.reshape((1, n))? } else { l.reshape((n, 1))? };
                if *on_input {
                    feedforward.push(proj.module());
                }
                tensors.push((format!("{base}.ia3_l"), shaped));
            }
        }
    }
    targets.sort();
    targets.dedup();
    feedforward.sort();
    feedforward.dedup();
    let config = serde_json::json!({
        "peft_type": match adapter.kind { AdapterKind::Lora => "LORA", AdapterKind::Ia3 => "IA3", AdapterKind::Flora => "FLORA" },
        "r": adapter.rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "bias": "none",
        "fan_in_fan_out": false,
        "task_type": "CAUSAL_LM",
    });
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| err(format!("{}: {e}", parent.display())))?;
    let tmp = parent.join(format!(".{}.tmp-{}", dir.file_name().and_then(|s| s.to_str()).unwrap_or("adapter"), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| err(format!("{}: {e}", tmp.display())))?;
    std::fs::write(tmp.join("adapter_config.json"), serde_json::to_string_pretty(&config).unwrap_or_default())
        .map_err(|e| err(e.to_string()))?;
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, tmp.join("adapter_model.safetensors")).map_err(|e| err(e.to_string()))?;
    if dir.exists() {
        let old = parent.join(format!(".{}.old-{}", dir.file_name().and_then(|s| s.to_str()).unwrap_or("adapter"), std::process::id()));
        std::fs::rename(dir, &old).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, dir).map_err(|e| err(e.to_string()))?;
        let _ = std::fs::remove_dir_all(old);
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}
