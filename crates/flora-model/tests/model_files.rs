//! Model files: safetensors checkpoints load and run like the in-memory model; a truncated,
//! foreign or corrupt file is a clear error.

use candle_core::{DType, Device, Tensor};
use flora_model::{Llama, LlamaConfig, Logits, SeqStep};
use std::collections::HashMap;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flora-model-files-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Random tensors in HF layout for `cfg` (an LM head of its own when `lm_head` is given).
fn random_hf_tensors(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = flora_adapters::init::WeightRng::new(seed);
    let mut tensors = HashMap::new();
    let mut put = |name: String, dims: Vec<usize>| {
        let n: usize = dims.iter().product();
        tensors.insert(name, Tensor::from_vec(rng.uniform(n, 0.3), dims, &Device::Cpu).unwrap());
    };
    put("model.embed_tokens.weight".into(), vec![cfg.vocab, cfg.hidden]);
    put("model.norm.weight".into(), vec![cfg.hidden]);
    for i in 0..cfg.n_layers {
        put(format!("model.layers.{i}.input_layernorm.weight"), vec![cfg.hidden]);
        put(format!("model.layers.{i}.post_attention_layernorm.weight"), vec![cfg.hidden]);
        for p in flora_model::Proj::ALL {
            let (di, dout) = p.dims(cfg);
            put(format!("model.layers.{i}.{}.weight", p.path()), vec![dout, di]);
        }
    }
    tensors
}

/// A HF `config.json` for `cfg`, with `extra` keys merged in.
fn hf_config(cfg: &LlamaConfig, extra: serde_json::Value) -> String {
    let mut config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
        "num_hidden_layers": cfg.n_layers, "hidden_size": cfg.hidden, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.intermediate, "vocab_size": cfg.vocab,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps, "max_position_embeddings": cfg.context,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_scaling": null
    });
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
    let dir = tmp("st");
    let tensors = random_hf_tensors(&cfg, 3);
    write_checkpoint(&dir, &tensors, &hf_config(&cfg, serde_json::json!({})));
    let ck = flora_model::weights::load(&dir).unwrap();
    assert_eq!(ck.config, cfg);
    let model = Llama::from_checkpoint(ck).unwrap();
    logits_both_ways(&model, &[5, 9, 11, 2]);
    // A missing tensor is named.
    tensors_missing(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An untied checkpoint reads its own LM head: with the head twice the embedding, every logit
/// is exactly twice the tied model's (scaling by 2 is exact in floating point). A tied
/// checkpoint that also saves `lm_head.weight` loads as tied.
#[test]
fn untied_lm_head_is_read() {
    let tied_cfg = LlamaConfig::tiny();
    let untied_cfg = LlamaConfig { tie_embeddings: false, ..LlamaConfig::tiny() };
    let toks = [7u32, 1, 30, 12, 3];
    let dir = tmp("untied");
    let mut tensors = random_hf_tensors(&tied_cfg, 4);
    write_checkpoint(&dir, &tensors, &hf_config(&tied_cfg, serde_json::json!({})));
    let tied = logits_both_ways(&Llama::from_checkpoint(flora_model::weights::load(&dir).unwrap()).unwrap(), &toks);

    let doubled = (tensors["model.embed_tokens.weight"].clone() * 2.0).unwrap();
    tensors.insert("lm_head.weight".into(), doubled);
    write_checkpoint(&dir, &tensors, &hf_config(&untied_cfg, serde_json::json!({})));
    let ck = flora_model::weights::load(&dir).unwrap();
    assert!(!ck.config.tie_embeddings);
    let untied = logits_both_ways(&Llama::from_checkpoint(ck).unwrap(), &toks);
    for (a, b) in tied.iter().flatten().zip(untied.iter().flatten()) {
        assert_eq!(2.0 * a, *b, "untied logits must be exactly twice the tied ones");
    }

    // Tied, with a (redundant) LM head saved: the embedding is used.
    write_checkpoint(&dir, &tensors, &hf_config(&tied_cfg, serde_json::json!({})));
    let again = logits_both_ways(&Llama::from_checkpoint(flora_model::weights::load(&dir).unwrap()).unwrap(), &toks);
    assert_eq!(again, tied);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Llama variants this model file does not implement are refused by name rather than loaded
/// to give wrong logits: other model types, RoPE scaling, partial rotary dimensions, biases,
/// other activations, tensors a Llama model does not have.
#[test]
fn unimplemented_llama_variants_in_safetensors_are_refused() {
    let cfg = LlamaConfig::tiny();
    let dir = tmp("variants");
    let tensors = random_hf_tensors(&cfg, 5);
    let cases = [
        (serde_json::json!({"model_type": "qwen2"}), "model_type \"qwen2\""),
        (serde_json::json!({"architectures": ["MistralForCausalLM"]}), "MistralForCausalLM"),
        (serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), "RoPE scaling"),
        (serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}), "RoPE scaling"),
        (serde_json::json!({"partial_rotary_factor": 0.5}), "partial_rotary_factor"),
        (serde_json::json!({"attention_bias": true}), "biases"),
        (serde_json::json!({"mlp_bias": true}), "biases"),
        (serde_json::json!({"hidden_act": "gelu"}), "gelu"),
    ];
    for (extra, want) in cases {
        write_checkpoint(&dir, &tensors, &hf_config(&cfg, extra.clone()));
        let err = flora_model::weights::load(&dir).err().unwrap_or_else(|| panic!("{extra} must be refused")).to_string();
        assert!(err.contains("unsupported") && err.contains(want), "{extra}: {err}");
    }
    // Plain RoPE spelled out, and linear scaling by 1, are plain RoPE.
    for extra in [serde_json::json!({"rope_scaling": {"rope_type": "default"}}), serde_json::json!({"rope_scaling": {"type": "linear", "factor": 1.0}})] {
        write_checkpoint(&dir, &tensors, &hf_config(&cfg, extra.clone()));
        flora_model::weights::load(&dir).unwrap_or_else(|e| panic!("{extra}: {e}"));
    }
    // A bias tensor the config does not announce.
    let mut with_bias = tensors.clone();
    with_bias.insert("model.layers.0.self_attn.q_proj.bias".into(), Tensor::zeros(cfg.q_dim(), DType::F32, &Device::Cpu).unwrap());
    write_checkpoint(&dir, &with_bias, &hf_config(&cfg, serde_json::json!({})));
    let err = flora_model::weights::load(&dir).err().expect("an unknown tensor must be refused").to_string();
    assert!(err.contains("model.layers.0.self_attn.q_proj.bias") && err.contains("does not have"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A minimal Llama GGUF header with `extra` metadata and tensors; it need not load further
/// than the checks under test.
fn llama_gguf(path: &std::path::Path, extra: &[(&str, candle_core::quantized::gguf_file::Value)], extra_tensors: &[&str]) {
    use candle_core::quantized::{gguf_file::Value, GgmlDType, QTensor};
    let cfg = LlamaConfig::tiny();
    let mut md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(cfg.hidden as u32)),
        ("llama.attention.head_count", Value::U32(cfg.n_heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(cfg.n_kv_heads as u32)),
        ("llama.vocab_size", Value::U32(cfg.vocab as u32)),
        ("llama.block_count", Value::U32(cfg.n_layers as u32)),
        ("llama.feed_forward_length", Value::U32(cfg.intermediate as u32)),
    ];
    md.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    let t = QTensor::quantize(&Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let mut names = vec!["token_embd.weight"];
    names.extend_from_slice(extra_tensors);
    let tensors: Vec<(&str, &QTensor)> = names.iter().map(|n| (*n, &t)).collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &tensors).unwrap();
}

#[test]
fn unimplemented_llama_variants_in_gguf_are_refused() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tmp("gguf-variants");
    let path = dir.join("variant.gguf");
    let head_dim = LlamaConfig::tiny().head_dim as u32;
    let cases: Vec<(Vec<(&str, Value)>, Vec<&str>, &str)> = vec![
        (vec![("llama.rope.scaling.type", Value::String("yarn".into()))], vec![], "RoPE scaling \"yarn\""),
        (
            vec![("llama.rope.scaling.type", Value::String("linear".into())), ("llama.rope.scaling.factor", Value::F32(4.0))],
            vec![],
            "RoPE scaling \"linear\" (factor 4)",
        ),
        (vec![("llama.rope.dimension_count", Value::U32(head_dim / 2))], vec![], "llama.rope.dimension_count"),
        (vec![], vec!["rope_freqs.weight"], "rope_freqs.weight"),
        (vec![], vec!["blk.0.attn_q.bias"], "blk.0.attn_q.bias"),
    ];
    for (md, tensors, want) in cases {
        llama_gguf(&path, &md, &tensors);
        let err = flora_model::weights::load(&path).err().unwrap_or_else(|| panic!("{want}: must be refused")).to_string();
        assert!(err.contains("variant.gguf") && err.contains(want), "{want}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
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
    let dir = tmp("bad");
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let err = flora_model::weights::load(&junk).err().expect("must fail").to_string();
    assert!(err.contains("junk.gguf") && err.contains("not a GGUF"), "{err}");
    let fake = dir.join("header-only.gguf");
    std::fs::write(&fake, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let err = flora_model::weights::load(&fake).err().expect("must fail").to_string();
    assert!(err.contains("header-only.gguf"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn truncated_real_model_is_refused() {
    let path = flora_model::default_model::resolve_model(None).expect("default model (scripts/reference/fetch_model.sh fetches it)");
    let bytes = std::fs::read(&path).unwrap();
    let dir = tmp("trunc");
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = flora_model::weights::load(&cut).err().expect("must fail").to_string();
    assert!(err.contains("truncated"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn non_llama_gguf_is_refused() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let dir = tmp("arch");
    let path = dir.join("gpt2.gguf");
    let t = QTensor::quantize(&candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let arch = gguf_file::Value::String("gpt2".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &t)]).unwrap();
    drop(f);
    let err = flora_model::weights::load(&path).err().expect("must fail").to_string();
    assert!(err.contains("gpt2") && err.contains("Llama-family"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tensor in a quantization candle cannot read (IQ4_NL, type 20): a clear error, no panic.
#[test]
fn unsupported_quantization_is_refused() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let dir = tmp("quant");
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
    let _ = std::fs::remove_dir_all(&dir);
}
