//! Shared helpers for the integration tests: locating the real model and the
//! reference data, and loading the tokenizer once per test binary.
#![allow(dead_code)]

pub mod synthetic;

use std::path::PathBuf;
use std::sync::OnceLock;

use flora_tokenizer::Tokenizer;

/// The model file: `$FLORA_MODEL`, else the default model in the cache (`$FLORA_CACHE_DIR`,
/// default `~/.cache/flora`), fetched there on first use. Panics (fails the test) if neither works.
pub fn model_path() -> PathBuf {
    flora_model::default_model::resolve_model(None).unwrap_or_else(|e| {
        panic!("{e} (scripts/reference/fetch_model.sh fetches the default model)")
    })
}

/// The SmolLM2 tokenizer, loaded once per test binary.
pub fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = model_path();
        Tokenizer::from_gguf(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
    })
}

/// A file under `testdata/smollm2/`.
pub fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/smollm2")
        .join(name)
}

/// Parses a JSON file of `testdata/smollm2/`.
pub fn read_json(name: &str) -> serde_json::Value {
    let path = testdata(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// A fresh path in the temp directory, unique per process and tag.
pub fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("flora-tokenizer-{}-{tag}", std::process::id()))
}
