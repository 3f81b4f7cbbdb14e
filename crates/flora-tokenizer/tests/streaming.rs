//! The streaming decoder, fed one token at a time, reproduces `decode`.

mod common;

use flora_tokenizer::Tokenizer;

/// Streams `ids` through a decoder; returns the pieces (finish() included).
fn stream(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> Vec<String> {
    let mut dec = tok.stream_decoder(skip_special);
    let mut pieces: Vec<String> = ids.iter().map(|&id| dec.push(id).expect("push")).collect();
    pieces.push(dec.finish());
    pieces
}

#[test]
fn emoji_and_cjk_token_by_token() {
    let tok = common::tokenizer();
    let texts = [
        "I love 🍕 and 🚀!",
        "👨\u{200d}👩\u{200d}👧\u{200d}👦 family",
        "🇫🇷🇯🇵 flags",
        "你好，世界！我爱编程。",
        "日本語のテキスト、カタカナとひらがな",
        "안녕하세요 세계",
        "<|im_start|>assistant\n答えは４２です 🎉<|im_end|>",
    ];
    for text in texts {
        let ids = tok.encode(text).unwrap();
        for skip in [false, true] {
            let pieces = stream(tok, &ids, skip);
            // Every piece is valid text on its own (it is a String) and none
            // carries a replacement character: characters are never cut.
            assert!(
                pieces.iter().all(|p| !p.contains('\u{FFFD}')),
                "{text:?}: {pieces:?}"
            );
            assert_eq!(
                pieces.concat(),
                tok.decode_with(&ids, skip).unwrap(),
                "{text:?}"
            );
        }
    }
}

#[test]
fn split_characters_are_held_back() {
    let tok = common::tokenizer();
    // 🍕 is 4 bytes spread over several byte-level tokens.
    let ids = tok.encode("🍕").unwrap();
    assert!(ids.len() > 1, "expected 🍕 to span tokens, got {ids:?}");
    let mut dec = tok.stream_decoder(false);
    for &id in &ids[..ids.len() - 1] {
        assert_eq!(dec.push(id).unwrap(), "");
        assert!(dec.has_pending());
    }
    assert_eq!(dec.push(ids[ids.len() - 1]).unwrap(), "🍕");
    assert!(!dec.has_pending());
}

#[test]
fn truncated_stream_matches_lossy_decode() {
    let tok = common::tokenizer();
    let ids = tok.encode("ok 🍕").unwrap();
    let cut = &ids[..ids.len() - 1];
    assert_eq!(stream(tok, cut, false).concat(), tok.decode(cut).unwrap());
}
