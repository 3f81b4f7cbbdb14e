//! Loading model weights (f32, HF tensor names) from GGUF or safetensors checkpoints.
//!
//! GGUF files store llama.cpp's layout: names like `blk.3.attn_q.weight`, and the q/k
//! projections' rows permuted for interleaved RoPE. We map names to HF's
//! (`model.layers.3.self_attn.q_proj.weight`) and undo the permutation, so the model runs
//! HF's rotate-half RoPE and PEFT adapters (trained against HF layouts) apply unchanged.
//! Quantized tensors are dequantized to f32 at load.

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Named f32 tensors in HF naming, plus the config.
pub struct Checkpoint {
    pub config: LlamaConfig,
    pub tensors: HashMap<String, Tensor>,
    /// GGUF metadata (tokenizer, chat template) when loaded from GGUF.
    pub gguf: Option<gguf_file::Content>,
}

fn file_err(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::File { path: path.display().to_string(), msg: msg.to_string() }
}

/// Loads a `.gguf` file, or a directory / `.safetensors` file with a HF `config.json` beside it.
pub fn load(path: &Path) -> Result<Checkpoint> {
    if !path.exists() {
        return Err(file_err(path, "no such file or directory"));
    }
    let is_gguf = path.is_file() && {
        use std::io::Read;
        let mut magic = [0u8; 4];
        std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
    };
    if is_gguf {
        load_gguf(path)
    } else if path.is_dir() || path.extension().is_some_and(|e| e == "safetensors") {
        load_safetensors(path)
    } else {
        Err(file_err(path, "not a GGUF file (bad magic) nor a safetensors checkpoint"))
    }
}

fn gguf_name_to_hf(name: &str) -> Option<String> {
    let simple = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The GGUF tensor of Llama 3.1+'s RoPE frequency divisors ([`LlamaConfig::rope_freq_factors`]).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// A GGUF header that does not parse. A tensor type the reader does not know (its message is
/// "unknown dtype for tensor N") is a quantization flora cannot dequantize; say so.
fn gguf_header_error(msg: &str) -> String {
    match msg.split("unknown dtype for tensor ").nth(1) {
        Some(rest) => format!(
            "unsupported quantization: a tensor has ggml type {} (flora dequantizes F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K-Q8_K; re-quantize the model to one of these)",
            rest.chars().take_while(char::is_ascii_digit).collect::<String>()
        ),
        None => format!("unreadable GGUF header: {msg}"),
    }
}

/// Undoes llama.cpp's q/k row permutation: rows grouped [heads, hd/2, 2] -> [heads, 2, hd/2].
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (out, d_in) = w.dims2()?;
    let hd = out / n_heads;
    Ok(w.reshape((n_heads, hd / 2, 2, d_in))?.transpose(1, 2)?.reshape((out, d_in))?.contiguous()?)
}

fn load_gguf(path: &Path) -> Result<Checkpoint> {
    let mut file = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| file_err(path, gguf_header_error(&e.to_string())))?;
    let mut config = LlamaConfig::from_gguf(&content).map_err(|e| file_err(path, e))?;
    let file_len = file.metadata().map_err(|e| file_err(path, e))?.len();
    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let expected: Vec<String> = expected_tensors(&config).into_iter().map(|(name, _)| name).collect();
    let wanted: HashSet<&String> = expected.iter().collect();
    let model_tensor = |name: &str| gguf_name_to_hf(name).filter(|hf| wanted.contains(hf));
    // Refuse a missing or unknown tensor before reading any (a model can be gigabytes).
    let present: HashSet<String> = names.iter().filter_map(|n| model_tensor(n)).collect();
    if let Some(missing) = expected.iter().find(|name| !present.contains(*name)) {
        return Err(file_err(path, format!("missing tensor {missing}")));
    }
    let unknown: Vec<&str> = names.iter().filter(|n| n.as_str() != ROPE_FREQS && model_tensor(n).is_none()).map(|n| n.as_str()).collect();
    refuse_unknown(&unknown).map_err(|e| file_err(path, e))?;
    for name in names {
        let info = &content.tensor_infos[name];
        let hf = model_tensor(name);
        if hf.is_none() && name != ROPE_FREQS {
            continue;
        }
        let end = content.tensor_data_offset + info.offset + (info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64;
        if end > file_len {
            return Err(file_err(path, format!("truncated: tensor {name} ends at byte {end}, the file has {file_len}")));
        }
        let q = content.tensor(&mut file, name, &Device::Cpu).map_err(|e| file_err(path, format!("tensor {name}: {e}")))?;
        let t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| file_err(path, format!("tensor {name} ({:?}): cannot dequantize: {e}", info.ggml_dtype)))?
            .to_dtype(DType::F32)?;
        let Some(hf) = hf else {
            // Llama 3.1+'s RoPE scaling, one divisor per frequency.
            config.rope_freq_factors = Some(t.flatten_all()?.to_vec1()?);
            continue;
        };
        let t = if hf.ends_with("q_proj.weight") {
            unpermute_qk(&t, config.n_heads)?
        } else if hf.ends_with("k_proj.weight") {
            unpermute_qk(&t, config.n_kv_heads)?
        } else {
            t
        };
        tensors.insert(hf, t);
    }
    let config = match config.rope_freq_factors {
        Some(_) => config.validate().map_err(|e| file_err(path, format!("{ROPE_FREQS}: {e}")))?,
        None => config,
    };
    check_complete(&config, &tensors).map_err(|e| file_err(path, e))?;
    Ok(Checkpoint { config, tensors, gguf: Some(content) })
}

fn load_safetensors(path: &Path) -> Result<Checkpoint> {
    let dir = if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
    let cfg_text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| file_err(&dir.join("config.json"), e))?;
    let config = LlamaConfig::from_hf_json(&cfg_text)?;
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| file_err(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        return Err(file_err(&dir, "no .safetensors files"));
    }
    let mut tensors = HashMap::new();
    for f in files {
        let loaded = candle_core::safetensors::load(&f, &Device::Cpu).map_err(|e| file_err(&f, e))?;
        for (k, v) in loaded {
            // Older checkpoints save RoPE's frequency table as a buffer; it is recomputed.
            // A tied checkpoint may also save its LM head: it is the embedding, shared.
            if k.ends_with("rotary_emb.inv_freq") || (config.tie_embeddings && k == "lm_head.weight") {
                continue;
            }
            tensors.insert(k, v.to_dtype(DType::F32)?);
        }
    }
    let wanted: HashSet<String> = expected_tensors(&config).into_iter().map(|(name, _)| name).collect();
    let mut unknown: Vec<&str> = tensors.keys().filter(|k| !wanted.contains(*k)).map(String::as_str).collect();
    unknown.sort();
    check_complete(&config, &tensors).map_err(|e| file_err(path, e))?;
    refuse_unknown(&unknown).map_err(|e| file_err(path, e))?;
    Ok(Checkpoint { config, tensors, gguf: None })
}

/// Tensors the model does not use (biases, extra heads, extra layers) mean a variant this
/// model file does not implement: loading without them would give wrong logits silently.
fn refuse_unknown(unknown: &[&str]) -> std::result::Result<(), String> {
    if unknown.is_empty() {
        return Ok(());
    }
    let shown = unknown.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    let more = if unknown.len() > 5 { format!(" and {} more", unknown.len() - 5) } else { String::new() };
    Err(format!(
        "{} tensor(s) a Llama model does not have: {shown}{more} (a model variant flora does not implement)",
        unknown.len()
    ))
}

/// Every tensor the model needs is present with the right shape.
fn check_complete(cfg: &LlamaConfig, t: &HashMap<String, Tensor>) -> std::result::Result<(), String> {
    for (name, dims) in expected_tensors(cfg) {
        match t.get(&name) {
            None => return Err(format!("missing tensor {name}")),
            Some(x) if x.dims() != dims.as_slice() => return Err(format!("tensor {name} has shape {:?}, expected {dims:?}", x.dims())),
            _ => {}
        }
    }
    Ok(())
}

/// The tensors (HF names) and shapes a model of `cfg` is made of.
fn expected_tensors(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![cfg.vocab, cfg.hidden]),
        ("model.norm.weight".into(), vec![cfg.hidden]),
    ];
    if !cfg.tie_embeddings {
        want.push(("lm_head.weight".into(), vec![cfg.vocab, cfg.hidden]));
    }
    for i in 0..cfg.n_layers {
        let p = format!("model.layers.{i}");
        want.push((format!("{p}.input_layernorm.weight"), vec![cfg.hidden]));
        want.push((format!("{p}.post_attention_layernorm.weight"), vec![cfg.hidden]));
        want.push((format!("{p}.self_attn.q_proj.weight"), vec![cfg.q_dim(), cfg.hidden]));
        want.push((format!("{p}.self_attn.k_proj.weight"), vec![cfg.kv_dim(), cfg.hidden]));
        want.push((format!("{p}.self_attn.v_proj.weight"), vec![cfg.kv_dim(), cfg.hidden]));
        want.push((format!("{p}.self_attn.o_proj.weight"), vec![cfg.hidden, cfg.q_dim()]));
        want.push((format!("{p}.mlp.gate_proj.weight"), vec![cfg.intermediate, cfg.hidden]));
        want.push((format!("{p}.mlp.up_proj.weight"), vec![cfg.intermediate, cfg.hidden]));
        want.push((format!("{p}.mlp.down_proj.weight"), vec![cfg.hidden, cfg.intermediate]));
    }
    want
}

/// Random weights in HF naming for a model of `cfg` (tests, benchmarks): projections and
/// embeddings ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), norms ~ 1 + U(-0.2, 0.2); an LM head of its
/// own when the embeddings are untied.
pub fn random_tensors(cfg: &LlamaConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    use crate::model::Proj;
    let mut rng = flora_adapters::init::WeightRng::new(seed);
    let dev = Device::Cpu;
    let mut tensors = HashMap::new();
    let mut put = |name: String, dims: (usize, usize), rng: &mut flora_adapters::init::WeightRng| -> Result<()> {
        let t = Tensor::from_vec(rng.uniform(dims.0 * dims.1, 1.0 / (dims.1 as f32).sqrt()), dims, &dev)?;
        tensors.insert(name, t);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), (cfg.vocab, cfg.hidden), &mut rng)?;
    if !cfg.tie_embeddings {
        put("lm_head.weight".into(), (cfg.vocab, cfg.hidden), &mut rng)?;
    }
    for i in 0..cfg.n_layers {
        for pr in Proj::ALL {
            let (di, dout) = pr.dims(cfg);
            put(format!("model.layers.{i}.{}.weight", pr.path()), (dout, di), &mut rng)?;
        }
    }
    let norm = |rng: &mut flora_adapters::init::WeightRng| -> Result<Tensor> {
        let v: Vec<f32> = rng.uniform(cfg.hidden, 0.2).into_iter().map(|x| 1.0 + x).collect();
        Ok(Tensor::from_vec(v, cfg.hidden, &dev)?)
    };
    tensors.insert("model.norm.weight".into(), norm(&mut rng)?);
    for i in 0..cfg.n_layers {
        tensors.insert(format!("model.layers.{i}.input_layernorm.weight"), norm(&mut rng)?);
        tensors.insert(format!("model.layers.{i}.post_attention_layernorm.weight"), norm(&mut rng)?);
    }
    Ok(tensors)
}
