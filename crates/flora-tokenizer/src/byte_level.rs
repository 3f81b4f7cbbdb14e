//! GPT-2 byte-level alphabet: every byte 0..=255 is mapped to a printable
//! Unicode character so that vocabulary strings are valid text (`Ġ` = space,
//! `Ċ` = newline). This module holds the reverse mapping used for decoding.

use std::collections::HashMap;
use std::sync::OnceLock;

/// The byte -> char table of GPT-2 (`bytes_to_unicode` in the original code):
/// printable Latin-1 bytes map to themselves, the others to U+0100 onwards.
fn byte_to_char_table() -> [char; 256] {
    let printable = |b: u32| {
        (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0u32..256 {
        let c = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        // All values are < 0x200, hence valid scalar values.
        table[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    table
}

/// Returns the byte-level character that stands for `byte`.
pub fn byte_to_char(byte: u8) -> char {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(byte_to_char_table)[byte as usize]
}

fn char_to_byte_map() -> &'static HashMap<char, u8> {
    static MAP: OnceLock<HashMap<char, u8>> = OnceLock::new();
    MAP.get_or_init(|| (0u8..=255).map(|b| (byte_to_char(b), b)).collect())
}

/// Converts a byte-level vocabulary string back into raw bytes. Characters
/// outside the byte-level alphabet (which a well-formed vocabulary never
/// contains) are kept as their own UTF-8 bytes, like llama.cpp does.
pub fn decode_token(token: &str) -> Vec<u8> {
    let map = char_to_byte_map();
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match map.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// Converts raw bytes to their byte-level string (the inverse of [`decode_token`]).
pub fn encode_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_to_char(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_characters() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'\t'), 'ĉ');
        assert_eq!(byte_to_char(b'a'), 'a');
    }

    #[test]
    fn round_trip_all_bytes() {
        let all: Vec<u8> = (0u8..=255).collect();
        let s = encode_bytes(&all);
        assert_eq!(s.chars().count(), 256);
        assert_eq!(decode_token(&s), all);
    }
}
