//! Pre-tokenizers selected by GGUF `tokenizer.ggml.pre`, reproducing
//! llama.cpp's regex splits. llama.cpp applies a list of regexes in turn, each
//! splitting the pieces left by the previous one and keeping both matches and
//! the text between them; that is a sequence of `Split(.., Isolated)`. The
//! pieces are then mapped to the byte-level alphabet (no prefix space).

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::error::{Error, Result};

/// GPT-2's split regex (as llama.cpp writes it; its missing trailing `\s+`
/// alternative makes no difference since unmatched text is kept as a piece).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's split regex (llama.cpp's case-insensitive-contractions variant).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizers this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// SmolLM: each digit on its own, then the GPT-2 split.
    Smollm,
    /// Plain GPT-2 split.
    Gpt2,
    /// Llama 3 (`llama-bpe`): Llama 3 split; whole words in the vocabulary
    /// bypass the merges.
    Llama3,
    /// llama.cpp's fallback list (punctuation runs, GPT-2, number runs, 3-digit groups).
    Default,
}

impl PreTokenizerKind {
    /// Maps a `tokenizer.ggml.pre` value; unknown names are an error, never a guess.
    pub fn from_gguf_name(name: &str) -> Result<Self> {
        Ok(match name {
            "smollm" => Self::Smollm,
            "gpt2" | "gpt-2" => Self::Gpt2,
            "llama-bpe" | "llama3" | "llama-v3" => Self::Llama3,
            "default" => Self::Default,
            other => return Err(Error::UnsupportedPreTokenizer(other.to_string())),
        })
    }

    /// The regexes applied in turn, as in llama.cpp.
    fn regexes(self) -> &'static [&'static str] {
        match self {
            Self::Smollm => &[r"\p{N}", GPT2],
            Self::Gpt2 => &[GPT2],
            Self::Llama3 => &[LLAMA3],
            Self::Default => &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
        }
    }

    /// Whether a word found whole in the vocabulary skips BPE merging.
    pub fn ignore_merges(self) -> bool {
        matches!(self, Self::Llama3)
    }

    /// Builds the `tokenizers` pre-tokenizer for this kind.
    pub fn build(self) -> Result<PreTokenizerWrapper> {
        let mut steps = Vec::new();
        for re in self.regexes() {
            let split = Split::new(
                SplitPattern::Regex((*re).to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer(format!("bad pre-tokenizer regex {re:?}: {e}")))?;
            steps.push(PreTokenizerWrapper::Split(split));
        }
        // Regex splitting already done above: byte-level mapping only.
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, false, false,
        )));
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(steps)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_name_is_refused() {
        let err = PreTokenizerKind::from_gguf_name("qwen2").unwrap_err();
        assert!(
            err.to_string()
                .contains("unsupported pre-tokenizer `qwen2`"),
            "{err}"
        );
    }

    #[test]
    fn all_kinds_build() {
        for kind in [
            PreTokenizerKind::Smollm,
            PreTokenizerKind::Gpt2,
            PreTokenizerKind::Llama3,
            PreTokenizerKind::Default,
        ] {
            kind.build().expect("regexes compile");
        }
    }
}
