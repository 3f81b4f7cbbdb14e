//! Model files: safetensors checkpoints load and run like the in-memory model, tied or
//! untied; Llama 3.1's RoPE scaling loads from GGUF and config.json alike; a truncated,
//! foreign or corrupt file, an unsupported quantization and a Llama variant the model file does
//! not implement are clear errors.

use candle_core::{DType, Device, Tensor};
use flora_model::weights::random_tensors;
use flora_model::{Llama, LlamaConfig, Logits, SeqStep};
use std::collections::HashMap;

/// `cfg`'s HF `config.json` with `extra` keys merged in.
fn hf_config(cfg: &LlamaConfig, extra: serde_json::Value) -> String {
    let mut config = cfg.to_hf_json().unwrap();
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    config.to_string()
}

fn write_checkpoint(dir: &std::path::Path, tensors: &HashMap<String, Tensor>, config: &str) {
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
}

/// Logits at every position of `toks` from the training forward and from one inference step;
/// they must agree.
fn logits_both_ways(model: &Llama, toks: &[u32]) -> Vec<Vec<f32>> {
    let full: Vec<Vec<f32>> = model.forward_train(&[toks.to_vec()], &[None], None).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    let mut cache = model.new_cache();
    let step: Vec<Vec<f32>> = model.step(&mut [SeqStep { tokens: toks, cache: &mut cache, slot: None, logits: Logits::All }], None).unwrap().to_vec2().unwrap();
    let d = full.iter().zip(&step).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    assert!(d < 1e-4, "training forward and inference step differ by {d}");
    step
}

#[test]
fn safetensors_checkpoint_loads_and_matches() {
    let cfg = LlamaConfig::tiny();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tensors = random_tensors(&cfg, 3).unwrap();
    write_checkpoint(dir, &tensors, &hf_config(&cfg, serde_json::json!({})));
    let ck = flora_model::weights::load(dir).unwrap();
    assert_eq!(ck.config, cfg);
    let model = Llama::from_checkpoint(ck).unwrap();
    logits_both_ways(&model, &[5, 9, 11, 2]);
    // A missing tensor is named.
    tensors_missing(dir);
}

/// An untied checkpoint reads its own LM head: with the head twice the embedding, every logit
/// is exactly twice the tied model's (scaling by 2 is exact in floating point). A tied
/// checkpoint that also saves `lm_head.weight` loads as tied.
#[test]
fn untied_lm_head_is_read() {
    let tied_cfg = LlamaConfig::tiny();
    let untied_cfg = LlamaConfig { tie_embeddings: false, ..LlamaConfig::tiny() };
    let toks = [7u32, 1, 30, 12, 3];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut tensors = random_tensors(&tied_cfg, 4).unwrap();
    write_checkpoint(dir, &tensors, &hf_config(&tied_cfg, serde_json::json!({})));
    let tied = logits_both_ways(&Llama::from_checkpoint(flora_model::weights::load(dir).unwrap()).unwrap(), &toks);

    let doubled = (tensors["model.embed_tokens.weight"].clone() * 2.0).unwrap();
    tensors.insert("lm_head.weight".into(), doubled);
    write_checkpoint(dir, &tensors, &hf_config(&untied_cfg, serde_json::json!({})));
    let ck = flora_model::weights::load(dir).unwrap();
    assert!(!ck.config.tie_embeddings);
    let untied = logits_both_ways(&Llama::from_checkpoint(ck).unwrap(), &toks);
    for (a, b) in tied.iter().flatten().zip(untied.iter().flatten()) {
        assert_eq!(2.0 * a, *b, "untied logits must be exactly twice the tied ones");
    }

    // Tied, with a (redundant) LM head saved: the embedding is used.
    write_checkpoint(dir, &tensors, &hf_config(&tied_cfg, serde_json::json!({})));
    let again = logits_both_ways(&Llama::from_checkpoint(flora_model::weights::load(dir).unwrap()).unwrap(), &toks);
    assert_eq!(again, tied);
}

/// Llama variants this model file does not implement are refused by name rather than loaded
/// to give wrong logits: other model types, RoPE scaling, partial rotary dimensions, biases,
/// other activations, tensors a Llama model does not have.
#[test]
fn unimplemented_llama_variants_in_safetensors_are_refused() {
    let cfg = LlamaConfig::tiny();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tensors = random_tensors(&cfg, 5).unwrap();
    let cases = [
        (serde_json::json!({"model_type": "qwen2"}), "model_type \"qwen2\""),
        (serde_json::json!({"architectures": ["Qwen2ForCausalLM"]}), "Qwen2ForCausalLM"),
        (serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}), "RoPE scaling"),
        (serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), "llama3 scaling needs low_freq_factor"),
        (
            serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
            "0 < low_freq_factor < high_freq_factor",
        ),
        (serde_json::json!({"rope_scaling": {"rope_type": "longrope", "factor": 1.0}}), "RoPE scaling"),
        (
            serde_json::json!({"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
            "disagree",
        ),
        (serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}), "RoPE scaling"),
        (serde_json::json!({"partial_rotary_factor": 0.5}), "partial_rotary_factor"),
        (serde_json::json!({"attention_bias": true}), "biases"),
        (serde_json::json!({"mlp_bias": true}), "biases"),
        (serde_json::json!({"hidden_act": "gelu"}), "gelu"),
        (serde_json::json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}}), "RoPE scaling"),
        (serde_json::json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 64}), "sliding-window"),
    ];
    for (extra, want) in cases {
        write_checkpoint(dir, &tensors, &hf_config(&cfg, extra.clone()));
        let err = flora_model::weights::load(dir).err().unwrap_or_else(|| panic!("{extra} must be refused")).to_string();
        assert!(err.contains("unsupported") && err.contains(want), "{extra}: {err}");
    }
    // Plain RoPE spelled out, any scaling by 1, an older spelling of the architecture, and
    // Mistral without sliding windows load as the same model.
    for extra in [
        serde_json::json!({"rope_scaling": {"rope_type": "default"}}),
        serde_json::json!({"rope_scaling": {"type": "linear", "factor": 1.0}}),
        serde_json::json!({"rope_scaling": {"type": "dynamic", "factor": 1.0}}),
        serde_json::json!({"architectures": ["LLaMAForCausalLM"]}),
        serde_json::json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": null}),
    ] {
        write_checkpoint(dir, &tensors, &hf_config(&cfg, extra.clone()));
        let ck = flora_model::weights::load(dir).unwrap_or_else(|e| panic!("{extra}: {e}"));
        assert_eq!(ck.config, cfg, "{extra}");
    }
    // transformers 5 keeps RoPE's base in rope_parameters.
    let extra = serde_json::json!({"rope_theta": null, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}});
    write_checkpoint(dir, &tensors, &hf_config(&cfg, extra));
    assert_eq!(flora_model::weights::load(dir).unwrap().config.rope_theta, 100000.0);
    // A bias tensor the config does not announce.
    let mut with_bias = tensors.clone();
    with_bias.insert("model.layers.0.self_attn.q_proj.bias".into(), Tensor::zeros(cfg.q_dim(), DType::F32, &Device::Cpu).unwrap());
    write_checkpoint(dir, &with_bias, &hf_config(&cfg, serde_json::json!({})));
    let err = flora_model::weights::load(dir).err().expect("an unknown tensor must be refused").to_string();
    assert!(err.contains("model.layers.0.self_attn.q_proj.bias") && err.contains("does not have"), "{err}");
}

/// Writes `hf` (HF names, f32) as a Llama GGUF of `cfg` in llama.cpp's layout (q/k rows
/// permuted for interleaved RoPE), with `extra` metadata and `extra_tensors` as given.
fn write_gguf(path: &std::path::Path, cfg: &LlamaConfig, hf: &HashMap<String, Tensor>, extra: &[(&str, candle_core::quantized::gguf_file::Value)], extra_tensors: &[(&str, Tensor)]) {
    use candle_core::quantized::{gguf_file::Value, GgmlDType, QTensor};
    let mut md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(cfg.hidden as u32)),
        ("llama.attention.head_count", Value::U32(cfg.n_heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(cfg.n_kv_heads as u32)),
        ("llama.vocab_size", Value::U32(cfg.vocab as u32)),
        ("llama.block_count", Value::U32(cfg.n_layers as u32)),
        ("llama.feed_forward_length", Value::U32(cfg.intermediate as u32)),
        ("llama.context_length", Value::U32(cfg.context as u32)),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_eps)),
    ];
    md.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    // HF rows [heads, 2, hd/2] -> llama.cpp's [heads, hd/2, 2] (what weights::unpermute_qk undoes).
    let permute = |w: &Tensor, heads: usize| {
        let (out, d_in) = w.dims2().unwrap();
        w.reshape((heads, 2, out / heads / 2, d_in)).unwrap().transpose(1, 2).unwrap().reshape((out, d_in)).unwrap().contiguous().unwrap()
    };
    let q = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q(&hf["model.embed_tokens.weight"])),
        ("output_norm.weight".into(), q(&hf["model.norm.weight"])),
    ];
    let projections = [("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")];
    for i in 0..cfg.n_layers {
        let layer = |name: &str| &hf[&format!("model.layers.{i}.{name}.weight")];
        tensors.push((format!("blk.{i}.attn_norm.weight"), q(layer("input_layernorm"))));
        tensors.push((format!("blk.{i}.ffn_norm.weight"), q(layer("post_attention_layernorm"))));
        for (gguf, name) in projections {
            let w = match gguf {
                "attn_q" => permute(layer(name), cfg.n_heads),
                "attn_k" => permute(layer(name), cfg.n_kv_heads),
                _ => layer(name).clone(),
            };
            tensors.push((format!("blk.{i}.{gguf}.weight"), q(&w)));
        }
    }
    tensors.extend(extra_tensors.iter().map(|(n, t)| (n.to_string(), q(t))));
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &tensor_refs).unwrap();
}

/// A tiny random Llama GGUF with `extra` metadata and `extra_tensors` (8 zeros each).
fn llama_gguf(path: &std::path::Path, extra: &[(&str, candle_core::quantized::gguf_file::Value)], extra_tensors: &[&str]) {
    let cfg = LlamaConfig::tiny();
    let zeros: Vec<(&str, Tensor)> = extra_tensors.iter().map(|n| (*n, Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap())).collect();
    write_gguf(path, &cfg, &random_tensors(&cfg, 1).unwrap(), extra, &zeros);
}

/// Logits at every position of `toks` from the model in `path`.
fn logits_of(path: &std::path::Path, toks: &[u32]) -> Vec<Vec<f32>> {
    logits_both_ways(&Llama::from_checkpoint(flora_model::weights::load(path).unwrap()).unwrap(), toks)
}

/// Llama 3.1's RoPE scaling loads from a GGUF (`rope_freqs.weight`) and from config.json
/// (`rope_scaling` of type llama3) to the same divisors, which equal the formula as
/// transformers writes it, and give the same logits; they change the logits against plain RoPE.
#[test]
fn llama3_rope_scaling_loads_from_gguf_and_config_json_alike() {
    let cfg = LlamaConfig { context: 512, ..LlamaConfig::tiny() };
    let (factor, low, high, original) = (8.0f64, 1.0f64, 4.0f64, 128.0f64);
    // transformers' form: inverse frequencies rescaled, the divisors are their ratios.
    let want: Vec<f32> = (0..cfg.head_dim / 2)
        .map(|i| {
            let inv = 1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / cfg.head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / inv;
            let (low_wavelen, high_wavelen) = (original / low, original / high);
            let mut scaled = if wavelen > low_wavelen { inv / factor } else { inv };
            let smooth = (original / wavelen - low) / (high - low);
            if !(wavelen < high_wavelen) && !(wavelen > low_wavelen) {
                scaled = (1.0 - smooth) * scaled / factor + smooth * scaled;
            }
            (inv / scaled) as f32
        })
        .collect();
    assert!(want.contains(&1.0) && want.contains(&8.0) && want.iter().any(|f| *f > 1.0 && *f < 8.0), "every branch: {want:?}");
    let tmp = tempfile::tempdir().unwrap();
    let tensors = random_tensors(&cfg, 6).unwrap();
    let scaling = serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": original}});
    write_checkpoint(tmp.path(), &tensors, &hf_config(&cfg, scaling));
    let from_json = flora_model::weights::load(tmp.path()).unwrap().config.rope_freq_factors.expect("factors from config.json");
    for (a, b) in from_json.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-6 * b, "{from_json:?} against {want:?}");
    }
    let gguf = tmp.path().join("llama3.gguf");
    write_gguf(&gguf, &cfg, &tensors, &[], &[("rope_freqs.weight", Tensor::new(from_json.as_slice(), &Device::Cpu).unwrap())]);
    assert_eq!(flora_model::weights::load(&gguf).unwrap().config.rope_freq_factors.as_deref(), Some(from_json.as_slice()));

    let toks: Vec<u32> = (0..200).map(|i| (i * 31 + 7) % cfg.vocab as u32).collect();
    let scaled = logits_of(tmp.path(), &toks);
    let d = scaled.iter().flatten().zip(logits_of(&gguf, &toks).iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-4, "GGUF and config.json differ by {d}");
    write_checkpoint(tmp.path(), &tensors, &hf_config(&cfg, serde_json::json!({})));
    let plain = logits_of(tmp.path(), &toks);
    let moved = scaled.iter().flatten().zip(plain.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved > 1e-3, "the factors must change the logits ({moved})");
    // Divisors of the wrong count are refused.
    write_gguf(&gguf, &cfg, &tensors, &[], &[("rope_freqs.weight", Tensor::ones(3, DType::F32, &Device::Cpu).unwrap())]);
    let err = flora_model::weights::load(&gguf).err().expect("3 divisors for 4 frequencies").to_string();
    assert!(err.contains("rope_freqs.weight") && err.contains("inconsistent hyper-parameters"), "{err}");
}

#[test]
fn unimplemented_llama_variants_in_gguf_are_refused() {
    use candle_core::quantized::gguf_file::Value;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("variant.gguf");
    let head_dim = LlamaConfig::tiny().head_dim as u32;
    let cases: Vec<(Vec<(&str, Value)>, Vec<&str>, &str)> = vec![
        (
            vec![("llama.rope.scaling.type", Value::String("yarn".into())), ("llama.rope.scaling.factor", Value::F32(4.0))],
            vec![],
            "RoPE scaling \"yarn\" (factor 4)",
        ),
        (
            vec![("llama.rope.scaling.type", Value::String("linear".into())), ("llama.rope.scaling.factor", Value::F32(4.0))],
            vec![],
            "RoPE scaling \"linear\" (factor 4)",
        ),
        (vec![("llama.rope.dimension_count", Value::U32(head_dim / 2))], vec![], "llama.rope.dimension_count"),
        (vec![("llama.rope.scaling.factor", Value::F32(2.0))], vec![], "RoPE scaling \"linear\" (factor 2)"),
        (vec![("llama.rope.scale_linear", Value::F32(2.0))], vec![], "RoPE scaling \"linear\" (factor 2)"),
        (vec![], vec!["blk.0.attn_q.bias"], "blk.0.attn_q.bias"),
        (vec![], vec!["blk.2.attn_q.weight"], "blk.2.attn_q.weight"),
    ];
    for (md, tensors, want) in cases {
        llama_gguf(&path, &md, &tensors);
        let err = flora_model::weights::load(&path).err().unwrap_or_else(|| panic!("{want}: must be refused")).to_string();
        assert!(err.contains("variant.gguf") && err.contains(want), "{want}: {err}");
    }
    // The same file without them loads, as do plain RoPE spelled out and scaling by 1.
    for md in [vec![], vec![("llama.rope.scaling.type", Value::String("none".into())), ("llama.rope.dimension_count", Value::U32(head_dim))], vec![("llama.rope.scaling.type", Value::String("yarn".into())), ("llama.rope.scaling.factor", Value::F32(1.0))]] {
        llama_gguf(&path, &md, &[]);
        let ck = flora_model::weights::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ck.config.n_layers, 2);
    }
}

fn tensors_missing(dir: &std::path::Path) {
    let mut t = candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    t.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let err = flora_model::weights::load(dir).err().expect("must fail").to_string();
    assert!(err.contains("missing tensor model.layers.1.mlp.up_proj.weight"), "{err}");
}

#[test]
fn foreign_and_corrupt_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let err = flora_model::weights::load(&junk).err().expect("must fail").to_string();
    assert!(err.contains("junk.gguf") && err.contains("not a GGUF"), "{err}");
    let fake = dir.join("header-only.gguf");
    std::fs::write(&fake, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let err = flora_model::weights::load(&fake).err().expect("must fail").to_string();
    assert!(err.contains("header-only.gguf"), "{err}");
}

#[test]
fn truncated_real_model_is_refused() {
    let path = flora_model::default_model::resolve_model(None).expect("default model (scripts/reference/fetch_model.sh fetches it)");
    let bytes = std::fs::read(&path).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = flora_model::weights::load(&cut).err().expect("must fail").to_string();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn non_llama_gguf_is_refused() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("gpt2.gguf");
    let t = QTensor::quantize(&candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let arch = gguf_file::Value::String("gpt2".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &t)]).unwrap();
    drop(f);
    let err = flora_model::weights::load(&path).err().expect("must fail").to_string();
    assert!(err.contains("gpt2") && err.contains("Llama-family"), "{err}");
}

/// A tensor in a quantization candle cannot read (IQ4_NL, type 20): a clear error, no panic.
#[test]
fn unsupported_quantization_is_refused() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("iq4.gguf");
    let t = QTensor::quantize(&candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let arch = gguf_file::Value::String("llama".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &t)]).unwrap();
    drop(f);
    // Tensor info: name, n_dims (u32), dims (u64 each), ggml type (u32), offset (u64).
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * n_dims;
    assert_eq!(u32::from_le_bytes(bytes[ty..ty + 4].try_into().unwrap()), 0, "F32 is type 0");
    bytes[ty..ty + 4].copy_from_slice(&20u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = flora_model::weights::load(&path).err().expect("must fail").to_string();
    assert!(err.contains("iq4.gguf") && err.contains("unsupported quantization: a tensor has ggml type 20 ("), "{err}");
}
