//! The tokenizer-related part of GGUF metadata, read into plain Rust types.
//! Keeping this separate from the tokenizer lets tests build a vocabulary in
//! code without a GGUF file.

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::{Error, Result};

/// Token type codes of `tokenizer.ggml.token_type` (llama.cpp `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    /// Special/control tokens such as `<|im_start|>`.
    Control,
    /// Tokens added by the user; matched in text like specials but not special.
    UserDefined,
    Unused,
    /// Raw byte tokens `<0xXX>` (SentencePiece-style vocabularies).
    Byte,
}

impl TokenType {
    /// Maps a GGUF token type code; unknown codes are treated as normal tokens.
    pub fn from_code(code: i64) -> Self {
        match code {
            0 => TokenType::Undefined,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

/// Everything needed to build a [`crate::Tokenizer`], as stored in GGUF metadata.
#[derive(Debug, Clone)]
pub struct TokenizerMetadata {
    /// `tokenizer.ggml.model` (only `gpt2`, i.e. byte-level BPE, is supported).
    pub model: String,
    /// `tokenizer.ggml.pre` (pre-tokenizer name); `None` when absent.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: id -> byte-level vocabulary string.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges`: BPE merges in priority order, as `"left right"`.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type`: one per token (all normal if absent).
    pub token_types: Vec<TokenType>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (informational; `encode` never adds BOS).
    pub add_bos: bool,
    /// `tokenizer.chat_template`, a Jinja template.
    pub chat_template: Option<String>,
}

impl TokenizerMetadata {
    /// Reads the tokenizer keys from parsed GGUF content.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let model = string(md.get("tokenizer.ggml.model"), "tokenizer.ggml.model")?
            .ok_or(Error::MissingKey("tokenizer.ggml.model"))?;
        let pre = string(md.get("tokenizer.ggml.pre"), "tokenizer.ggml.pre")?;
        let tokens = string_array(md.get("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")?
            .ok_or(Error::MissingKey("tokenizer.ggml.tokens"))?;
        let merges = string_array(md.get("tokenizer.ggml.merges"), "tokenizer.ggml.merges")?
            .unwrap_or_default();
        let token_types = match md.get("tokenizer.ggml.token_type") {
            None => vec![TokenType::Normal; tokens.len()],
            Some(v) => int_array(v, "tokenizer.ggml.token_type")?
                .into_iter()
                .map(TokenType::from_code)
                .collect(),
        };
        Ok(Self {
            model,
            pre,
            tokens,
            merges,
            token_types,
            bos_id: id(
                md.get("tokenizer.ggml.bos_token_id"),
                "tokenizer.ggml.bos_token_id",
            )?,
            eos_id: id(
                md.get("tokenizer.ggml.eos_token_id"),
                "tokenizer.ggml.eos_token_id",
            )?,
            pad_id: id(
                md.get("tokenizer.ggml.padding_token_id"),
                "tokenizer.ggml.padding_token_id",
            )?,
            add_bos: matches!(
                md.get("tokenizer.ggml.add_bos_token"),
                Some(Value::Bool(true))
            ),
            chat_template: string(md.get("tokenizer.chat_template"), "tokenizer.chat_template")?,
        })
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidKey {
        key,
        message: message.into(),
    }
}

fn string(v: Option<&Value>, key: &'static str) -> Result<Option<String>> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(
            key,
            format!("expected a string, found {:?}", other.value_type()),
        )),
    }
}

fn string_array(v: Option<&Value>, key: &'static str) -> Result<Option<Vec<String>>> {
    let Some(v) = v else { return Ok(None) };
    array(v, key)?
        .iter()
        .map(|item| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(invalid(
                key,
                format!("expected strings, found {:?}", other.value_type()),
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Any integer value as i64 (GGUF writers differ in the integer width they use).
fn as_i64(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x as i64,
        Value::I8(x) => x as i64,
        Value::U16(x) => x as i64,
        Value::I16(x) => x as i64,
        Value::U32(x) => x as i64,
        Value::I32(x) => x as i64,
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

/// The items of an array value; any other value is an error naming `key`.
fn array<'a>(v: &'a Value, key: &'static str) -> Result<&'a Vec<Value>> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(invalid(
            key,
            format!("expected an array, found {:?}", other.value_type()),
        )),
    }
}

fn int_array(v: &Value, key: &'static str) -> Result<Vec<i64>> {
    array(v, key)?
        .iter()
        .map(|item| as_i64(item).ok_or_else(|| invalid(key, "expected integers")))
        .collect()
}

/// A token id; negative values (llama.cpp writes -1 for "none") mean absent.
fn id(v: Option<&Value>, key: &'static str) -> Result<Option<u32>> {
    match v {
        None => Ok(None),
        Some(v) => {
            let x = as_i64(v).ok_or_else(|| invalid(key, "expected an integer token id"))?;
            Ok(u32::try_from(x).ok())
        }
    }
}
