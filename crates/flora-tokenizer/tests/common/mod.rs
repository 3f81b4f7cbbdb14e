//! Shared helpers for the integration tests: locating the real model and the
//! reference data, and loading the tokenizer once per test binary.
#![allow(dead_code)]

pub mod synthetic;

use std::path::PathBuf;
use std::sync::OnceLock;

use flora_tokenizer::Tokenizer;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model file: `$FLORA_MODEL`, else `$FLORA_CACHE_DIR/models/<file>`,
/// else `~/.cache/flora/models/<file>`. Panics (fails the test) if missing.
pub fn model_path() -> PathBuf {
    let path = if let Some(p) = std::env::var_os("FLORA_MODEL") {
        PathBuf::from(p)
    } else {
        let cache = match std::env::var_os("FLORA_CACHE_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let home = std::env::var_os("HOME")
                    .expect("HOME is not set; set FLORA_MODEL or FLORA_CACHE_DIR");
                PathBuf::from(home).join(".cache/flora")
            }
        };
        cache.join("models").join(MODEL_FILE)
    };
    assert!(
        path.is_file(),
        "model file {} not found: run scripts/reference/fetch_model.sh \
         (or set FLORA_MODEL to a .gguf path)",
        path.display()
    );
    path
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
