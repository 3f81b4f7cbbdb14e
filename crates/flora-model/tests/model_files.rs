//! Model files: safetensors checkpoints load and run like the in-memory model; a truncated,
//! foreign or corrupt file is a clear error.

use flora_model::{Llama, LlamaConfig, Logits, SeqStep};
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flora-model-files-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn safetensors_checkpoint_loads_and_matches() {
    let cfg = LlamaConfig::tiny();
    let dir = tmp("st");
    // Write a random checkpoint in HF layout, with config.json beside it.
    let mut rng = flora_adapters::init::WeightRng::new(3);
    let dev = candle_core::Device::Cpu;
    let mut tensors = std::collections::HashMap::new();
    let mut put = |name: String, dims: Vec<usize>| {
        let n: usize = dims.iter().product();
        tensors.insert(name, candle_core::Tensor::from_vec(rng.uniform(n, 0.3), dims, &dev).unwrap());
    };
    put("model.embed_tokens.weight".into(), vec![cfg.vocab, cfg.hidden]);
    put("model.norm.weight".into(), vec![cfg.hidden]);
    for i in 0..cfg.n_layers {
        put(format!("model.layers.{i}.input_layernorm.weight"), vec![cfg.hidden]);
        put(format!("model.layers.{i}.post_attention_layernorm.weight"), vec![cfg.hidden]);
        for p in flora_model::Proj::ALL {
            let (di, dout) = p.dims(&cfg);
            put(format!("model.layers.{i}.{}.weight", p.path()), vec![dout, di]);
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "num_hidden_layers": cfg.n_layers, "hidden_size": cfg.hidden, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.intermediate, "vocab_size": cfg.vocab,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps, "max_position_embeddings": cfg.context,
        "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let ck = flora_model::weights::load(&dir).unwrap();
    assert_eq!(ck.config, cfg);
    let model = Llama::from_checkpoint(ck).unwrap();
    let toks = [5u32, 9, 11, 2];
    let full: Vec<Vec<f32>> = model.forward_train(&[toks.to_vec()], &[None], None).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    let mut cache = model.new_cache();
    let step: Vec<Vec<f32>> = model.step(&mut [SeqStep { tokens: &toks, cache: &mut cache, slot: None, logits: Logits::All }], None).unwrap().to_vec2().unwrap();
    let d = full.iter().zip(&step).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    assert!(d < 1e-4);
    // A missing tensor is named.
    tensors_missing(&dir);
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
    assert!(err.contains("iq4.gguf") && (err.contains("20") || err.to_lowercase().contains("type")), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
