//! Incremental decoding for streaming generation: ids arrive one by one and
//! text is released as soon as it is valid UTF-8, holding back the bytes of
//! a character split across tokens until the rest arrives.

use crate::error::Result;
use crate::Tokenizer;

/// Turns a stream of token ids into text pieces. The concatenation of all
/// pieces plus [`StreamDecoder::finish`] equals `Tokenizer::decode_with` on
/// the whole id sequence (invalid bytes become U+FFFD in both).
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    utf8: Utf8Stream,
}

impl<'a> StreamDecoder<'a> {
    pub(crate) fn new(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        Self { tokenizer, skip_special, utf8: Utf8Stream::default() }
    }

    /// Adds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        Ok(self.utf8.push(self.tokenizer.id_bytes(id, self.skip_special)?))
    }

    /// Releases whatever is left; an incomplete trailing character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        self.utf8.finish()
    }

    /// Whether bytes of an incomplete character are being held back.
    pub fn has_pending(&self) -> bool {
        self.utf8.has_pending()
    }
}

/// The tokenizer-free half of [`StreamDecoder`]: bytes in, complete UTF-8 text out. Owns no
/// borrow, so long-lived per-request state (a server's sequences) can hold it and feed it
/// `Tokenizer::id_bytes`.
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    /// Bytes received but not yet released (an incomplete character).
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes; returns the text that became complete (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        self.take_complete()
    }

    /// Releases whatever is left; an incomplete trailing character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }

    /// Whether bytes of an incomplete character are being held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Releases the longest prefix of `pending` whose decoding cannot change
    /// with more input: everything except a trailing, still-completable sequence.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // Valid by the check above, so this never replaces anything.
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..valid]));
                    match e.error_len() {
                        // Invalid sequence: same replacement as `from_utf8_lossy`.
                        Some(len) => {
                            out.push('\u{FFFD}');
                            start = valid + len;
                        }
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}
