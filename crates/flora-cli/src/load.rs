//! Loading the model and its tokenizer for the commands that run the model.

use anyhow::{bail, Context, Result};
use flora_model::Llama;
use flora_tokenizer::Tokenizer;
use std::path::Path;
use std::time::Instant;

/// The model (dequantized to f32) and the tokenizer built from its GGUF metadata.
pub fn model_and_tokenizer(model: Option<&Path>) -> Result<(Llama, Tokenizer)> {
    let path = flora_model::default_model::resolve_model(model)?;
    let t = Instant::now();
    let ck = flora_model::weights::load(&path)?;
    let Some(content) = ck.gguf.as_ref() else {
        bail!("{}: flora builds its tokenizer from GGUF metadata; safetensors checkpoints are not runnable from the CLI yet", path.display());
    };
    let tok = Tokenizer::from_gguf_content(content).with_context(|| format!("tokenizer of {}", path.display()))?;
    let llama = Llama::from_checkpoint(ck)?;
    tracing_free_log(&format!("loaded {} in {:.1}s", path.display(), t.elapsed().as_secs_f64()));
    Ok((llama, tok))
}

/// Only the tokenizer (for `flora tokenize`: no weights are read).
pub fn tokenizer(model: Option<&Path>) -> Result<Tokenizer> {
    let path = flora_model::default_model::resolve_model(model)?;
    Tokenizer::from_gguf(&path).with_context(|| format!("tokenizer of {}", path.display()))
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
