//! Tokenizer for flora, built from the metadata of a GGUF model file or from a Hugging Face
//! checkpoint's `tokenizer.json`.
//!
//! * [`Tokenizer`]: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the
//!   pre-tokenizer named by `tokenizer.ggml.pre` (`smollm`, `gpt2`,
//!   `llama-bpe`, `default`); special tokens written in text are recognised.
//!   Produces the same ids as llama.cpp. [`Tokenizer::from_hf_dir`] reads a Hugging Face
//!   `tokenizer.json` (byte-level BPE) and its config files instead.
//! * [`StreamDecoder`] / [`Utf8Stream`]: incremental decoding for streamed generation;
//!   [`StopFilter`]: stop strings over streamed text.
//! * [`ChatTemplate`]: the model's Jinja chat template (`tokenizer.chat_template`).
//!
//! ```no_run
//! # fn main() -> flora_tokenizer::Result<()> {
//! use flora_tokenizer::{ChatMessage, Tokenizer};
//! let tok = Tokenizer::from_gguf("model.gguf")?;
//! let prompt = tok.chat_template()?.render(&[ChatMessage::user("Hi!")], true)?;
//! let ids = tok.encode(&prompt)?;
//! assert_eq!(tok.decode(&ids)?, prompt);
//! # Ok(()) }
//! ```

pub mod byte_level;
mod chat;
mod error;
mod gguf;
mod hf;
mod metadata;
mod pretokenizer;
mod stop;
mod stream;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::{Error, Result};
pub use metadata::{TokenType, TokenizerMetadata};
pub use pretokenizer::PreTokenizerKind;
pub use stop::StopFilter;
pub use stream::{StreamDecoder, Utf8Stream};
pub use tokenizer::Tokenizer;
