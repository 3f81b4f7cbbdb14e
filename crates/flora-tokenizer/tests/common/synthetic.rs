//! A tiny byte-level BPE vocabulary built in code, so tokenizer behaviour can
//! be tested without the model file. Ids 0..256 are the single bytes (id =
//! byte value), then a few merged tokens, then special tokens.

use candle_core::quantized::gguf_file::{self, Value};
use flora_tokenizer::byte_level::encode_bytes;
use flora_tokenizer::{TokenType, TokenizerMetadata};

/// Merges in priority order; each adds the token `left + right`.
pub const MERGES: &[&str] = &[
    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
];
pub const HELLO: u32 = 259;
pub const SP_WORLD: u32 = 264;
pub const TWELVE: u32 = 265;
pub const END: u32 = 266;
pub const START: u32 = 267;
pub const TOOL: u32 = 268;

/// The synthetic vocabulary with pre-tokenizer `pre`.
pub fn metadata(pre: &str) -> TokenizerMetadata {
    let mut tokens: Vec<String> = (0u8..=255).map(|b| encode_bytes(&[b])).collect();
    for m in MERGES {
        tokens.push(m.replace(' ', ""));
    }
    let mut token_types = vec![TokenType::Normal; tokens.len()];
    for (t, ty) in [
        ("<|end|>", TokenType::Control),
        ("<|start|>", TokenType::Control),
        ("<tool>", TokenType::UserDefined),
    ] {
        tokens.push(t.to_string());
        token_types.push(ty);
    }
    TokenizerMetadata {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        tokens,
        merges: MERGES.iter().map(|m| m.to_string()).collect(),
        token_types,
        bos_id: Some(START),
        eos_id: Some(END),
        pad_id: None,
        add_bos: false,
        chat_template: Some(
            "{% for m in messages %}<|start|>{{ m.role }}: {{ m.content }}<|end|>{% endfor %}"
                .into(),
        ),
    }
}

/// Writes `md` as the metadata of a GGUF file with no tensors.
pub fn write_gguf(md: &TokenizerMetadata, path: &std::path::Path) {
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    let code = |t: &TokenType| match t {
        TokenType::Control => 3,
        TokenType::UserDefined => 4,
        _ => 1,
    };
    let mut kv: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.model", Value::String(md.model.clone())),
        ("tokenizer.ggml.tokens", strings(&md.tokens)),
        ("tokenizer.ggml.merges", strings(&md.merges)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(md.token_types.iter().map(|t| Value::I32(code(t))).collect()),
        ),
    ];
    if let Some(pre) = &md.pre {
        kv.push(("tokenizer.ggml.pre", Value::String(pre.clone())));
    }
    if let Some(id) = md.bos_id {
        kv.push(("tokenizer.ggml.bos_token_id", Value::U32(id)));
    }
    if let Some(id) = md.eos_id {
        kv.push(("tokenizer.ggml.eos_token_id", Value::U32(id)));
    }
    if let Some(t) = &md.chat_template {
        kv.push(("tokenizer.chat_template", Value::String(t.clone())));
    }
    let refs: Vec<(&str, &Value)> = kv.iter().map(|(k, v)| (*k, v)).collect();
    let mut file = std::fs::File::create(path).expect("create temp gguf");
    gguf_file::write(&mut file, &refs, &[]).expect("write temp gguf");
}
