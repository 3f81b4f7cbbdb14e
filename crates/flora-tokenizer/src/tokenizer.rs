//! The tokenizer: byte-level BPE built from GGUF vocabulary and merges.
//! Encoding is delegated to the `tokenizers` crate (BPE + added-token
//! matching); decoding is done here from a per-id byte table so that it is
//! exact and shared with the streaming decoder.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::AddedToken;

use crate::byte_level;
use crate::error::{Error, Result};
use crate::metadata::{TokenType, TokenizerMetadata};
use crate::pretokenizer::PreTokenizerKind;
use crate::stream::StreamDecoder;
use crate::ChatTemplate;

/// A byte-level BPE tokenizer (GGUF `tokenizer.ggml.model = "gpt2"`, or a Hugging Face
/// `tokenizer.json` with a BPE model and a ByteLevel decoder).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// id -> vocabulary string (byte-level alphabet for normal tokens).
    tokens: Vec<String>,
    /// id -> the bytes the token stands for in decoded text.
    token_bytes: Vec<Vec<u8>>,
    /// id -> whether the token is a special (CONTROL) token.
    special: Vec<bool>,
    token_to_id: HashMap<String, u32>,
    /// The GGUF pre-tokenizer; `None` for a `tokenizer.json`, whose pipeline is in the file.
    pre: Option<PreTokenizerKind>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("pre", &self.pre)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Reads the GGUF header of `path` and builds its tokenizer. Tensor data
    /// is not read.
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let content = crate::gguf::read_content(path.as_ref())?;
        Self::from_gguf_content(&content)
    }

    /// Builds the tokenizer from already parsed GGUF content.
    pub fn from_gguf_content(content: &Content) -> Result<Self> {
        Self::from_metadata(TokenizerMetadata::from_gguf(content)?)
    }

    /// Builds the tokenizer from tokenizer metadata (also usable for a
    /// vocabulary constructed in code).
    pub fn from_metadata(md: TokenizerMetadata) -> Result<Self> {
        if md.model != "gpt2" {
            return Err(Error::UnsupportedModel(md.model));
        }
        let pre_name = md
            .pre
            .as_deref()
            .ok_or(Error::MissingKey("tokenizer.ggml.pre"))?;
        let pre = PreTokenizerKind::from_gguf_name(pre_name)?;
        if md.token_types.len() != md.tokens.len() {
            return Err(Error::InvalidKey {
                key: "tokenizer.ggml.token_type",
                message: format!(
                    "{} types for {} tokens",
                    md.token_types.len(),
                    md.tokens.len()
                ),
            });
        }
        let n = md.tokens.len();
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", md.bos_id),
            ("tokenizer.ggml.eos_token_id", md.eos_id),
            ("tokenizer.ggml.padding_token_id", md.pad_id),
        ] {
            if id.is_some_and(|id| id as usize >= n) {
                return Err(Error::InvalidKey {
                    key,
                    message: format!("id {id:?} >= vocabulary size {n}"),
                });
            }
        }

        let inner = build_inner(&md, pre)?;
        let token_bytes = md
            .tokens
            .iter()
            .zip(&md.token_types)
            .map(|(t, ty)| token_bytes(t, *ty))
            .collect();
        let special = md
            .token_types
            .iter()
            .map(|t| *t == TokenType::Control)
            .collect();
        Ok(Self::assemble(
            inner,
            md.tokens,
            token_bytes,
            special,
            Some(pre),
            md.bos_id,
            md.eos_id,
            md.pad_id,
            md.add_bos,
            md.chat_template,
        ))
    }

    /// Reads a Hugging Face tokenizer (`tokenizer.json`, plus `tokenizer_config.json`,
    /// `config.json` and `chat_template.jinja` where present) from a checkpoint directory.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        crate::hf::load(dir.as_ref())
    }

    /// Writes this tokenizer in Hugging Face layout (`tokenizer.json`, `tokenizer_config.json`)
    /// into `dir`, which [`Tokenizer::from_hf_dir`] reads back; e.g. to run a GGUF model's
    /// weights saved as safetensors.
    pub fn save_hf_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        crate::hf::save(self, dir.as_ref())
    }

    /// The encoder (BPE model, pre-tokenizer, added tokens).
    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The chat template's Jinja source, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Puts the parts together; `tokens[i]`, `token_bytes[i]` and `special[i]` describe id `i`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        inner: tokenizers::Tokenizer,
        tokens: Vec<String>,
        token_bytes: Vec<Vec<u8>>,
        special: Vec<bool>,
        pre: Option<PreTokenizerKind>,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        pad_id: Option<u32>,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Self {
        // Later duplicates win, as in llama.cpp; ids a vocabulary leaves out (empty) are not names.
        let token_to_id = tokens.iter().enumerate().filter(|(_, t)| !t.is_empty()).map(|(i, t)| (t.clone(), i as u32)).collect();
        Self { inner, tokens, token_bytes, special, token_to_id, pre, bos_id, eos_id, pad_id, add_bos, chat_template }
    }

    /// Encodes `text` into token ids. Special tokens written in the text (such
    /// as `<|im_start|>`) become single tokens. No BOS/EOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, special tokens included. Invalid UTF-8 (e.g. a
    /// multi-byte character cut in the middle) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Decodes ids to text; with `skip_special`, special tokens produce no text.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.id_bytes(id, skip_special)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The bytes token `id` stands for (empty for a skipped special token).
    pub fn id_bytes(&self, id: u32, skip_special: bool) -> Result<&[u8]> {
        let bytes = self
            .token_bytes
            .get(id as usize)
            .ok_or(Error::TokenOutOfRange {
                id,
                vocab_size: self.tokens.len(),
            })?;
        Ok(if skip_special && self.special[id as usize] {
            &[]
        } else {
            bytes
        })
    }

    /// A decoder that turns ids into text incrementally (for streaming output).
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, skip_special)
    }

    /// The model's chat template, with this vocabulary's BOS/EOS strings.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let source = self.chat_template.as_deref().ok_or(Error::NoChatTemplate)?;
        let text = |id: Option<u32>| {
            id.and_then(|id| self.id_to_token(id))
                .unwrap_or("")
                .to_string()
        };
        ChatTemplate::new(source, text(self.bos_id), text(self.eos_id))
    }

    /// Beginning-of-sequence token id, if the model defines one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// End-of-sequence token id, if the model defines one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Padding token id, if the model defines one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Whether the GGUF asks for BOS to be prepended (`encode` never does it).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The id of a vocabulary string (byte-level form, e.g. `"Ġthe"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.token_to_id.get(token).copied()
    }

    /// The vocabulary string of `id`.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Number of tokens in the vocabulary (rows of the embedding matrix).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Whether `id` is a special (CONTROL) token; false for out-of-range ids.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The GGUF pre-tokenizer in use (`None` for a `tokenizer.json`, which carries its own).
    pub fn pre_tokenizer(&self) -> Option<PreTokenizerKind> {
        self.pre
    }
}

/// Bytes of one token in decoded text: special and user-defined tokens are
/// literal text, byte tokens `<0xXX>` one byte, the rest byte-level strings.
fn token_bytes(token: &str, ty: TokenType) -> Vec<u8> {
    match ty {
        TokenType::Control | TokenType::UserDefined => token.as_bytes().to_vec(),
        TokenType::Byte => parse_byte_token(token)
            .map(|b| vec![b])
            .unwrap_or_else(|| byte_level::decode_token(token)),
        _ => byte_level::decode_token(token),
    }
}

fn parse_byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// Splits a merge line `"left right"`; the separator is the first space after
/// the first character (as in llama.cpp).
fn split_merge(line: &str) -> Option<(String, String)> {
    let first = line.chars().next()?.len_utf8();
    let pos = first + line[first..].find(' ')?;
    Some((line[..pos].to_string(), line[pos + 1..].to_string()))
}

/// Builds the `tokenizers` encoder: BPE model, pre-tokenizer and the tokens
/// matched verbatim in text (CONTROL as special, USER_DEFINED as plain).
fn build_inner(md: &TokenizerMetadata, pre: PreTokenizerKind) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = md
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = md
        .merges
        .iter()
        .map(|m| {
            split_merge(m).ok_or_else(|| Error::InvalidKey {
                key: "tokenizer.ggml.merges",
                message: format!("merge {m:?} is not of the form \"left right\""),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges())
        .build()
        .map_err(|e| Error::Tokenizer(format!("cannot build BPE model: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre.build()?));
    // Decoding is done from `token_bytes`; the decoder makes a saved `tokenizer.json` complete.
    inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));

    let added = |ty: TokenType, special: bool| -> Vec<AddedToken> {
        md.tokens
            .iter()
            .zip(&md.token_types)
            .filter(|(t, tt)| **tt == ty && !t.is_empty())
            .map(|(t, _)| AddedToken::from(t.clone(), special).normalized(false))
            .collect()
    };
    inner
        .add_tokens(added(TokenType::UserDefined, false))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    inner
        .add_special_tokens(added(TokenType::Control, true))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_lines() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge("Ġt he"), Some(("Ġt".into(), "he".into())));
        assert_eq!(split_merge("nospace"), None);
        assert_eq!(split_merge(""), None);
    }

    #[test]
    fn byte_tokens() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(b'\n'));
        assert_eq!(parse_byte_token("<0xZZ>"), None);
    }
}
