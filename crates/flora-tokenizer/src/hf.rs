//! Loading a Hugging Face tokenizer from a checkpoint directory.
//!
//! * `tokenizer.json` (required): the whole encoding pipeline, run by the `tokenizers` crate as
//!   written. Only byte-level BPE is accepted (a `BPE` model and a `ByteLevel` decoder), the
//!   family GGUF calls `gpt2`: decoding reads each token's bytes from its byte-level string.
//! * `tokenizer_config.json` (optional): `chat_template`, `bos_token`, `eos_token`, `pad_token`,
//!   `add_bos_token`.
//! * `chat_template.jinja` (optional; newer checkpoints keep the template there).
//! * `generation_config.json`, `config.json` (optional): `bos_token_id` / `eos_token_id` when
//!   the tokenizer config names no such token.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::byte_level;
use crate::error::{Error, Result};
use crate::Tokenizer;

/// Builds the tokenizer of the checkpoint in `dir`.
pub(crate) fn load(dir: &Path) -> Result<Tokenizer> {
    let json_path = dir.join("tokenizer.json");
    let text = read_text(&json_path)?.ok_or_else(|| Error::HfFile {
        path: json_path.clone(),
        message: "missing: a safetensors checkpoint needs its tokenizer.json beside config.json".into(),
    })?;
    let json = parse_json(&json_path, &text)?;
    check_byte_level_bpe(&json_path, &json)?;
    let inner: tokenizers::Tokenizer = text.parse().map_err(|e: tokenizers::Error| Error::HfFile { path: json_path.clone(), message: e.to_string() })?;

    // id -> vocabulary string; ids the file leaves out stay empty and decode to nothing.
    let vocab = inner.get_vocab(true);
    let n = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
    let mut tokens = vec![String::new(); n];
    for (t, id) in vocab {
        tokens[id as usize] = t;
    }
    let added = inner.get_added_tokens_decoder();
    // An added token wins over a vocabulary entry with the same id (the text it is matched by).
    for (&id, a) in &added {
        if let Some(t) = tokens.get_mut(id as usize) {
            t.clone_from(&a.content);
        }
    }
    let special = (0..n as u32).map(|id| added.get(&id).is_some_and(|a| a.special)).collect();
    // Added tokens are literal text, matched before BPE (`tokens` holds their content).
    let token_bytes = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| if added.contains_key(&(id as u32)) { t.as_bytes().to_vec() } else { byte_level::decode_token(t) })
        .collect();

    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let model_config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
    let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
    let token_id = |name: &str| -> Option<u32> {
        let named = token_text(&config[format!("{name}_token")]).and_then(|s| inner.token_to_id(&s));
        named.or_else(|| first_id(&generation[format!("{name}_token_id")])).or_else(|| first_id(&model_config[format!("{name}_token_id")]))
    };
    let (bos_id, eos_id, pad_id) = (token_id("bos"), token_id("eos"), token_id("pad"));
    for (name, id) in [("bos", bos_id), ("eos", eos_id), ("pad", pad_id)] {
        if id.is_some_and(|id| id as usize >= n) {
            return Err(Error::HfFile { path: dir.to_path_buf(), message: format!("{name} token id {id:?} >= vocabulary size {n}") });
        }
    }
    let template_file = dir.join("chat_template.jinja");
    let chat_template = match chat_template(&config) {
        Some(t) => Some(t),
        None if template_file.exists() => Some(std::fs::read_to_string(&template_file).map_err(|source| Error::Io { path: template_file, source })?),
        None => None,
    };
    // Llama-3-style checkpoints leave `add_bos_token` out and add BOS in the post-processor.
    let bos_text = bos_id.and_then(|id| inner.id_to_token(id));
    let add_bos = config["add_bos_token"].as_bool().unwrap_or_else(|| bos_text.is_some_and(|b| post_processor_adds(&json["post_processor"], &b)));
    Ok(Tokenizer::assemble(inner, tokens, token_bytes, special, None, bos_id, eos_id, pad_id, add_bos, chat_template))
}

/// Writes `tok` in Hugging Face layout into `dir`: `tokenizer.json` (the encoding pipeline as
/// the `tokenizers` crate serializes it) and `tokenizer_config.json` (special tokens, chat
/// template). Each file goes to a temp name first and is renamed into place.
pub(crate) fn save(tok: &Tokenizer, dir: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let text = |id: Option<u32>| id.and_then(|id| tok.id_to_token(id)).map(str::to_string);
    let config = serde_json::json!({
        "bos_token": text(tok.bos_id()),
        "eos_token": text(tok.eos_id()),
        "pad_token": text(tok.pad_id()),
        "add_bos_token": tok.add_bos(),
        "chat_template": tok.chat_template_source(),
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let json = tok.inner().to_string(false).map_err(|e| Error::Tokenizer(e.to_string()))?;
    for (name, body) in [("tokenizer.json", json), ("tokenizer_config.json", serde_json::to_string_pretty(&config).expect("JSON values serialize"))] {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, body).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    Ok(())
}

/// The parsed JSON of `path`, or `None` if the file does not exist.
fn read_json(path: &Path) -> Result<Option<Value>> {
    read_text(path)?.map(|text| parse_json(path, &text)).transpose()
}

/// The text of `path`, or `None` if the file does not exist.
fn read_text(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path: path.to_path_buf(), source }),
    }
}

fn parse_json(path: &Path, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| Error::HfFile { path: path.to_path_buf(), message: format!("not valid JSON: {e}") })
}

/// Refuses tokenizers whose token bytes this crate cannot read (SentencePiece-style `▁`
/// vocabularies, WordPiece, Unigram): a wrong guess would silently garble decoded text.
fn check_byte_level_bpe(path: &PathBuf, json: &Value) -> Result<()> {
    let model = json["model"]["type"].as_str().unwrap_or("(none)");
    let decoder = &json["decoder"];
    let byte_level = |d: &Value| d["type"] == "ByteLevel";
    let decodes_bytes = byte_level(decoder) || decoder["decoders"].as_array().is_some_and(|ds| ds.iter().any(byte_level));
    if model == "BPE" && decodes_bytes {
        return Ok(());
    }
    let decoder = decoder["type"].as_str().unwrap_or("no");
    Err(Error::UnsupportedModel(format!("{}: a {model} model with {decoder} decoder", path.display())))
}

/// Whether a `tokenizer.json` post-processor puts special token `token` first in a single
/// sequence (`TemplateProcessing`, alone or in a `Sequence`).
fn post_processor_adds(pp: &Value, token: &str) -> bool {
    match pp["type"].as_str() {
        Some("TemplateProcessing") => pp["single"].as_array().and_then(|s| s.first()).is_some_and(|first| first["SpecialToken"]["id"] == token),
        Some("Sequence") => pp["processors"].as_array().is_some_and(|ps| ps.iter().any(|p| post_processor_adds(p, token))),
        _ => false,
    }
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    v.as_str().or_else(|| v["content"].as_str()).map(str::to_string)
}

/// A token id as config files write it: a number or a list whose first entry counts.
fn first_id(v: &Value) -> Option<u32> {
    v.as_u64().or_else(|| v.as_array()?.first()?.as_u64()).and_then(|id| u32::try_from(id).ok())
}

/// `chat_template`: a string, or a list of `{name, template}` (the one named `default`, else the first).
fn chat_template(config: &Value) -> Option<String> {
    let t = &config["chat_template"];
    if let Some(s) = t.as_str() {
        return Some(s.to_string());
    }
    let list = t.as_array()?;
    let default = list.iter().find(|e| e["name"] == "default").or_else(|| list.first())?;
    default["template"].as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_values_in_both_spellings() {
        assert_eq!(token_text(&json!("<s>")).as_deref(), Some("<s>"));
        assert_eq!(token_text(&json!({"__type": "AddedToken", "content": "</s>"})).as_deref(), Some("</s>"));
        assert_eq!(token_text(&Value::Null), None);
        assert_eq!(first_id(&json!(2)), Some(2));
        assert_eq!(first_id(&json!([7, 2])), Some(7));
        assert_eq!(first_id(&json!("2")), None);
        let named = json!({"chat_template": [{"name": "tool_use", "template": "a"}, {"name": "default", "template": "b"}]});
        assert_eq!(chat_template(&named).as_deref(), Some("b"));
        assert_eq!(chat_template(&json!({"chat_template": "c"})).as_deref(), Some("c"));
        assert_eq!(chat_template(&json!({})), None);
    }

    #[test]
    fn bos_added_by_the_post_processor() {
        let template = json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]});
        assert!(post_processor_adds(&template, "<|begin_of_text|>"));
        assert!(!post_processor_adds(&template, "<s>"));
        assert!(post_processor_adds(&json!({"type": "Sequence", "processors": [{"type": "ByteLevel"}, template]}), "<|begin_of_text|>"));
        assert!(!post_processor_adds(&json!({"type": "ByteLevel"}), "<|begin_of_text|>"));
        assert!(!post_processor_adds(&Value::Null, "<|begin_of_text|>"));
    }

    #[test]
    fn only_byte_level_bpe_is_accepted() {
        let p = PathBuf::from("tokenizer.json");
        assert!(check_byte_level_bpe(&p, &json!({"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}})).is_ok());
        let seq = json!({"model": {"type": "BPE"}, "decoder": {"type": "Sequence", "decoders": [{"type": "ByteLevel"}]}});
        assert!(check_byte_level_bpe(&p, &seq).is_ok());
        let sp = json!({"model": {"type": "BPE"}, "decoder": {"type": "Sequence", "decoders": [{"type": "Replace"}, {"type": "ByteFallback"}]}});
        let err = check_byte_level_bpe(&p, &sp).unwrap_err().to_string();
        assert!(err.contains("BPE model with Sequence decoder"), "{err}");
        assert!(check_byte_level_bpe(&p, &json!({"model": {"type": "WordPiece"}, "decoder": {"type": "WordPiece"}})).is_err());
    }
}
