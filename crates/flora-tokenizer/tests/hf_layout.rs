//! A Hugging Face checkpoint's tokenizer (`tokenizer.json` + `tokenizer_config.json`) gives the
//! same ids as llama.cpp on the reference corpus, the same chat prompt and special tokens as the
//! GGUF; `save_hf_dir` writes a directory that reads back the same; bad files are clear errors.

mod common;

use flora_tokenizer::{ChatMessage, Error, Tokenizer, TokenizerMetadata, TokenType};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// (text, ids) of every case of testdata/smollm2/tokenizer_ref.json (llama.cpp's ids).
fn cases() -> Vec<(String, Vec<u32>)> {
    let json = common::read_json("tokenizer_ref.json");
    let ids = |c: &Value| c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    json["cases"].as_array().unwrap().iter().map(|c| (c["text"].as_str().unwrap().to_string(), ids(c))).collect()
}

fn metadata() -> TokenizerMetadata {
    let path = common::model_path();
    let content = candle_core::quantized::gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    TokenizerMetadata::from_gguf(&content).unwrap()
}

/// SmolLM2's tokenizer as its Hugging Face checkpoint spells it: the vocabulary and merges of
/// the GGUF with the pipeline written the way the `tokenizers` library does for this model
/// (single digits split first, then the byte-level regex split), none of flora's own regexes.
fn write_smollm2_hf_files(dir: &Path) {
    let md = metadata();
    let vocab: serde_json::Map<String, Value> = md.tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<Value> = md
        .tokens
        .iter()
        .zip(&md.token_types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == TokenType::Control)
        .map(|(id, (t, _))| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": md.merges},
    });
    let config = json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "add_prefix_space": false, "chat_template": md.chat_template, "tokenizer_class": "GPT2Tokenizer",
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

fn fresh_dir(tag: &str) -> PathBuf {
    let d = common::temp_path(tag);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Same ids as llama.cpp, same decoded text, same specials and chat prompt as the GGUF.
fn assert_like_the_gguf(tok: &Tokenizer) {
    let gguf = common::tokenizer();
    let mut failures = Vec::new();
    for (text, want) in cases() {
        let got = tok.encode(&text).unwrap();
        if got != want {
            failures.push(format!("{text:?}\n   want {want:?}\n    got {got:?}"));
        }
        assert_eq!(tok.decode(&want).unwrap(), text);
    }
    assert!(failures.is_empty(), "{} cases differ:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(tok.vocab_size(), gguf.vocab_size());
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (gguf.bos_id(), gguf.eos_id(), gguf.pad_id()));
    assert!((0..tok.vocab_size() as u32).all(|id| tok.is_special(id) == gguf.is_special(id)));
    let msgs = [ChatMessage::system("You are helpful."), ChatMessage::user("What is 2+2?")];
    let render = |t: &Tokenizer| t.chat_template().unwrap().render(&msgs, true).unwrap();
    assert_eq!(render(tok), render(gguf));
    let ids = tok.encode(&render(tok)).unwrap();
    assert_eq!(ids, gguf.encode(&render(gguf)).unwrap());
    assert_eq!(tok.decode_with(&ids, true).unwrap(), gguf.decode_with(&ids, true).unwrap());
}

#[test]
fn hf_checkpoint_tokenizer_matches_llama_cpp() {
    let dir = fresh_dir("hf-smollm2");
    write_smollm2_hf_files(&dir);
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(tok.pre_tokenizer(), None);
    assert_like_the_gguf(&tok);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn saved_hf_dir_reads_back_the_same() {
    let dir = fresh_dir("hf-saved");
    common::tokenizer().save_hf_dir(&dir).unwrap();
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_like_the_gguf(&tok);
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn token_ids_from_config_files_and_template_file() {
    // No tokenizer_config.json: eos from generation_config.json, bos from config.json, template
    // from chat_template.jinja.
    let dir = fresh_dir("hf-ids");
    common::tokenizer().save_hf_dir(&dir).unwrap();
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [2, 0]}"#).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"bos_token_id": 1, "eos_token_id": 0}"#).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}").unwrap();
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (Some(1), Some(2), None));
    assert_eq!(tok.chat_template().unwrap().render(&[ChatMessage::user("hi")], false).unwrap(), "<user>hi");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_hf_tokenizer_files_are_clear_errors() {
    let dir = fresh_dir("hf-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(matches!(err, Error::HfFile { .. }) && err.to_string().contains("tokenizer.json") && err.to_string().contains("missing"), "{err}");

    std::fs::write(dir.join("tokenizer.json"), "{\"model\": ").unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("not valid JSON"), "{err}");

    // A SentencePiece-style vocabulary (byte fallback, `▁` for spaces) is refused, not garbled.
    let sp = json!({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                    "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}]}});
    std::fs::write(dir.join("tokenizer.json"), sp.to_string()).unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(matches!(err, Error::UnsupportedModel(_)), "{err}");

    // A tokenizer.json the `tokenizers` library rejects.
    let broken = json!({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}, "decoder": {"type": "ByteLevel"}});
    std::fs::write(dir.join("tokenizer.json"), broken.to_string()).unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");

    // An eos id beyond the vocabulary.
    common::tokenizer().save_hf_dir(&dir).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(dir.join("config.json"), r#"{"eos_token_id": 999999}"#).unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("eos token id"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
