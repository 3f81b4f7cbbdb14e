//! Loading the model and its tokenizer for the commands that run the model.

use anyhow::{bail, Context, Result};
use flora_adapters::WeightFormat;
use flora_model::Llama;
use flora_tokenizer::Tokenizer;
use std::path::Path;
use std::time::Instant;

/// The help text of every `--model` flag.
pub const MODEL_HELP: &str = "Model: a Llama-family GGUF file, or a safetensors checkpoint in Hugging Face layout (a directory \
with config.json, *.safetensors and tokenizer.json). Default: $FLORA_MODEL, else SmolLM2-135M-Instruct (fetched into the cache)";

/// The help text of every `--weights` flag.
pub const WEIGHTS_HELP: &str = "Number format of the base weights in inference: f32 (exact to the f32 reference) or bf16 \
(half the bytes, AVX512-BF16 kernels; logits within about 1% of f32). Default: bf16 where the CPU has AVX512-BF16, else f32";

/// The help text of every `--lora-tables` flag.
pub const LORA_TABLES_HELP: &str = "How bf16 inference stores LoRA adapters' A and B: bf16, or int8 (8-bit integers with a scale \
per rank row: half the bytes each decode step streams per distinct adapter, and faster at higher ranks; an adapter's \
contribution changes by up to half a quantization step per value). f32 weights keep f32 tables either way";

/// The model (dequantized to f32; inference GEMMs in `weights`, default [`WeightFormat::fastest_here`])
/// and its tokenizer: from the GGUF metadata, or from `tokenizer.json` (and its config files)
/// beside a safetensors checkpoint.
pub fn model_and_tokenizer(model: Option<&Path>, weights: Option<WeightFormat>) -> Result<(Llama, Tokenizer)> {
    let path = flora_model::default_model::resolve_model(model)?;
    let t = Instant::now();
    let ck = flora_model::weights::load(&path)?;
    let tok = match ck.gguf.as_ref() {
        Some(content) => Tokenizer::from_gguf_content(content),
        None => Tokenizer::from_hf_dir(checkpoint_dir(&path)),
    }
    .with_context(|| format!("tokenizer of {}", path.display()))?;
    if tok.vocab_size() > ck.config.vocab {
        bail!("{}: the tokenizer has {} tokens but the model's embedding only {} rows", path.display(), tok.vocab_size(), ck.config.vocab);
    }
    let mut llama = Llama::from_checkpoint(ck)?;
    let format = weights.unwrap_or_else(WeightFormat::fastest_here);
    llama.set_weight_format(format)?;
    tracing_free_log(&format!("loaded {} in {:.1}s ({format} weights)", path.display(), t.elapsed().as_secs_f64()));
    Ok((llama, tok))
}

/// Only the tokenizer (for `flora tokenize`: no weights are read).
pub fn tokenizer(model: Option<&Path>) -> Result<Tokenizer> {
    let path = flora_model::default_model::resolve_model(model)?;
    if is_safetensors_checkpoint(&path) { Tokenizer::from_hf_dir(checkpoint_dir(&path)) } else { Tokenizer::from_gguf(&path) }
        .with_context(|| format!("tokenizer of {}", path.display()))
}

/// A checkpoint directory, or a `.safetensors` file in one (as `flora_model::weights::load` reads them).
fn is_safetensors_checkpoint(path: &Path) -> bool {
    path.is_dir() || path.extension().is_some_and(|e| e == "safetensors")
}

/// The directory holding a checkpoint's config and tokenizer files.
fn checkpoint_dir(path: &Path) -> &Path {
    if path.is_dir() {
        path
    } else {
        path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    }
}

/// Status lines go to stderr so stdout carries only the command's output.
pub fn tracing_free_log(msg: &str) {
    eprintln!("flora: {msg}");
}

/// Log lines (tracing) to stderr; `RUST_LOG` overrides the default level (info).
pub fn init_logging() {
    init_logging_at("info");
}

/// Log lines to stderr at `level` unless `RUST_LOG` says otherwise.
pub fn init_logging_at(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}
