//! A safetensors checkpoint in Hugging Face layout runs from the command line like the GGUF it
//! was made from: the default model's weights (dequantized, f32) are written as
//! `model.safetensors` with a `config.json`, its tokenizer as `tokenizer.json` +
//! `tokenizer_config.json`; `flora tokenize` and greedy `flora generate` (plain and chat) must
//! print exactly what they print for the GGUF. A checkpoint without its tokenizer is a clear error.

use std::path::{Path, PathBuf};
use std::process::Command;

fn flora(args: &[&str], model: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flora")).args(args).arg("--model").arg(model).env("RAYON_NUM_THREADS", "2").output().expect("run flora");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Writes the checkpoint directory for `gguf` into `dir`.
fn write_hf_checkpoint(gguf: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ck = flora_model::weights::load(gguf).unwrap();
    let config = ck.config.to_hf_json().unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(&ck.tensors, dir.join("model.safetensors")).unwrap();
    flora_tokenizer::Tokenizer::from_gguf(gguf).unwrap().save_hf_dir(dir).unwrap();
}

#[test]
fn hf_checkpoint_runs_like_its_gguf() {
    let gguf = flora_model::default_model::resolve_model(None).expect("default model");
    let dir: PathBuf = std::env::temp_dir().join(format!("flora-hf-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_hf_checkpoint(&gguf, &dir);

    let text = "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>";
    let (ok, want, err) = flora(&["tokenize", text], &gguf);
    assert!(ok, "{err}");
    let (ok, got, err) = flora(&["tokenize", text], &dir);
    assert!(ok, "{err}");
    assert_eq!(got, want);

    for extra in [&["--prompt", "The capital of France is"][..], &["--chat", "--prompt", "Name a colour."][..]] {
        let args = [&["generate", "--max-tokens", "12", "--temperature", "0", "--weights", "f32"][..], extra].concat();
        let (ok, want, err) = flora(&args, &gguf);
        assert!(ok, "{err}");
        let (ok, got, err) = flora(&args, &dir);
        assert!(ok, "{err}");
        assert!(!want.trim().is_empty());
        assert_eq!(got, want, "{extra:?}");
    }

    // The weights file alone, by path, finds its directory's files too.
    let (ok, got, err) = flora(&["tokenize", "12345"], &dir.join("model.safetensors"));
    assert!(ok && got.trim() == "[33,34,35,36,37]", "{got} {err}");

    // Without tokenizer.json the error names the missing file; nothing panics.
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let (ok, _, err) = flora(&["generate", "--prompt", "hi", "--max-tokens", "1"], &dir);
    assert!(!ok && err.contains("tokenizer.json") && err.contains("missing") && !err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
