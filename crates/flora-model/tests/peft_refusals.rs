//! Adapter directories flora cannot apply faithfully are refused by name instead of loading to
//! wrong logits: DoRA, fan_in_fan_out, per-module rank / alpha patterns, biases, other PEFT
//! types, a rank that disagrees with the config, stray, missing or misshapen tensors, layers
//! the model lacks. rsLoRA's scale (alpha / sqrt(r), not alpha / r) is read.

mod common;

use candle_core::{Device, Tensor};
use common::random_adapter;
use flora_adapters::{AdapterKind, AdapterWeights};
use flora_model::peft::{load_adapter_dir, save_adapter_dir};
use flora_model::{LlamaConfig, Proj};
use std::collections::HashMap;
use std::path::Path;

const KEY: &str = "base_model.model.model.layers";

/// A rank-4 LoRA adapter on q and v of the tiny model, saved with alpha 8.
fn saved_lora(dir: &Path) {
    let a = random_adapter(&LlamaConfig::tiny(), AdapterKind::Lora, 4, &[Proj::Q, Proj::V], 9);
    save_adapter_dir(&a, dir, Some(8.0)).unwrap();
}

fn edit_config(dir: &Path, change: serde_json::Value) {
    let path = dir.join("adapter_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (k, v) in change.as_object().unwrap() {
        config[k] = v.clone();
    }
    std::fs::write(path, config.to_string()).unwrap();
}

fn edit_tensors(dir: &Path, change: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    change(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

fn load_err(dir: &Path) -> String {
    match load_adapter_dir(dir, "tester", &LlamaConfig::tiny()) {
        Ok(_) => panic!("{} must be refused", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn lora_scales(dir: &Path) -> Vec<f32> {
    let a = load_adapter_dir(dir, "tester", &LlamaConfig::tiny()).unwrap();
    a.weights.values().map(|w| match w {
        AdapterWeights::Lora { scale, .. } => *scale,
        _ => panic!("not LoRA"),
    }).collect()
}

#[test]
fn lora_scale_is_alpha_over_r_or_over_its_root_with_rslora() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lora");
    saved_lora(&dir);
    assert!(lora_scales(&dir).iter().all(|s| *s == 2.0), "alpha 8 / r 4");
    edit_config(&dir, serde_json::json!({"use_rslora": true}));
    assert!(lora_scales(&dir).iter().all(|s| *s == 4.0), "alpha 8 / sqrt(4)");
    // PEFT writes empty patterns; they mean nothing.
    edit_config(&dir, serde_json::json!({"use_rslora": false, "rank_pattern": {}, "alpha_pattern": {}}));
    assert!(lora_scales(&dir).iter().all(|s| *s == 2.0));
}

#[test]
fn configs_flora_cannot_apply_are_refused() {
    let cases = [
        (serde_json::json!({"use_dora": true}), "DoRA"),
        (serde_json::json!({"fan_in_fan_out": true}), "fan_in_fan_out"),
        (serde_json::json!({"rank_pattern": {"q_proj": 8}}), "rank_pattern"),
        (serde_json::json!({"alpha_pattern": {"v_proj": 16}}), "alpha_pattern"),
        (serde_json::json!({"bias": "lora_only"}), "bias"),
        (serde_json::json!({"peft_type": "ADALORA"}), "peft_type \"ADALORA\""),
        (serde_json::json!({"r": 8}), "adapter_config says r = Some(8)"),
    ];
    for (change, want) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lora");
        saved_lora(&dir);
        edit_config(&dir, change.clone());
        let err = load_err(&dir);
        assert!(err.contains("adapter tester") && err.contains(want), "{change}: {err}");
    }
}

#[test]
fn tensors_flora_cannot_apply_are_refused() {
    let (q_dim, hidden) = (LlamaConfig::tiny().q_dim(), LlamaConfig::tiny().hidden);
    type Edit = Box<dyn FnOnce(&mut HashMap<String, Tensor>)>;
    let zeros = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    let cases: Vec<(Edit, String)> = vec![
        // DoRA's magnitude vector without use_dora in the config.
        (
            Box::new(move |t| {
                t.insert(format!("{KEY}.0.self_attn.q_proj.lora_magnitude_vector"), zeros(q_dim));
            }),
            "unexpected tensor lora_magnitude_vector".into(),
        ),
        (Box::new(move |t| { t.insert("base_model.model.lm_head.lora_A.weight".into(), zeros(4)); }), "unexpected tensor key".into()),
        (Box::new(|t| { t.remove(&format!("{KEY}.1.self_attn.v_proj.lora_B.weight")); }), "layers.1.self_attn.v_proj: missing lora_B.weight".into()),
        (
            Box::new(|t| {
                let a = t.remove(&format!("{KEY}.1.self_attn.q_proj.lora_A.weight")).unwrap();
                let b = t.remove(&format!("{KEY}.1.self_attn.q_proj.lora_B.weight")).unwrap();
                t.insert(format!("{KEY}.5.self_attn.q_proj.lora_A.weight"), a);
                t.insert(format!("{KEY}.5.self_attn.q_proj.lora_B.weight"), b);
            }),
            "targets layer 5, the model has 2".into(),
        ),
        (
            Box::new(move |t| {
                let bad = Tensor::zeros((4, hidden + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
                t.insert(format!("{KEY}.0.self_attn.v_proj.lora_A.weight"), bad);
            }),
            "layers.0.self_attn.v_proj: adapter tester: lora A has shape [4, 33], expected [_, 32]".into(),
        ),
    ];
    for (i, (edit, want)) in cases.into_iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lora");
        saved_lora(&dir);
        edit_tensors(&dir, edit);
        let err = load_err(&dir);
        assert!(err.contains(&want), "case {i}: {err}");
    }
}
