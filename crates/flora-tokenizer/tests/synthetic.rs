//! Tokenizer behaviour on a tiny vocabulary built in code (no model file).

mod common;

use common::synthetic::{self, END, HELLO, SP_WORLD, START, TOOL, TWELVE};
use flora_tokenizer::{ChatMessage, Error, Tokenizer};

fn tok(pre: &str) -> Tokenizer {
    Tokenizer::from_metadata(synthetic::metadata(pre)).expect("synthetic tokenizer")
}

fn byte(c: char) -> u32 {
    c as u32 // ids 0..256 are the bytes themselves
}

#[test]
fn merges_apply() {
    let t = tok("smollm");
    assert_eq!(t.encode("hello world").unwrap(), vec![HELLO, SP_WORLD]);
    assert_eq!(t.encode("").unwrap(), Vec::<u32>::new());
    assert_eq!(t.encode("hex").unwrap(), vec![256, byte('x')]);
}

#[test]
fn smollm_splits_digits_gpt2_does_not() {
    assert_eq!(
        tok("smollm").encode("12").unwrap(),
        vec![byte('1'), byte('2')]
    );
    assert_eq!(tok("gpt2").encode("12").unwrap(), vec![TWELVE]);
}

#[test]
fn special_and_user_defined_tokens_in_text() {
    let t = tok("smollm");
    assert_eq!(
        t.encode("<|start|>hello<|end|>").unwrap(),
        vec![START, HELLO, END]
    );
    assert_eq!(t.encode("<tool>x").unwrap(), vec![TOOL, byte('x')]);
    // A near miss is plain text.
    let ids = t.encode("<|end |>").unwrap();
    assert!(!ids.contains(&END), "{ids:?}");
    assert!(t.is_special(END) && t.is_special(START));
    assert!(!t.is_special(TOOL) && !t.is_special(HELLO));
}

#[test]
fn decode_round_trip_and_skip_special() {
    let t = tok("smollm");
    let text = "<|start|>héllo wörld 12\t\n<tool> 🍕<|end|>";
    let ids = t.encode(text).unwrap();
    assert_eq!(t.decode(&ids).unwrap(), text);
    assert_eq!(
        t.decode_with(&ids, true).unwrap(),
        "héllo wörld 12\t\n<tool> 🍕"
    );
    let err = t.decode(&[9999]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TokenOutOfRange {
                id: 9999,
                vocab_size: 269
            }
        ),
        "{err}"
    );
}

#[test]
fn streaming_holds_split_characters() {
    let t = tok("smollm");
    let ids = t.encode("é!").unwrap();
    assert_eq!(ids, vec![0xC3, 0xA9, byte('!')]);
    let mut dec = t.stream_decoder(false);
    assert_eq!(dec.push(0xC3).unwrap(), "");
    assert_eq!(dec.push(0xA9).unwrap(), "é");
    assert_eq!(dec.push(byte('!')).unwrap(), "!");
    assert_eq!(dec.finish(), "");
    // An invalid byte is replaced at once; a dangling lead byte at the end.
    assert_eq!(dec.push(0xFF).unwrap(), "\u{FFFD}");
    assert_eq!(dec.push(0xE6).unwrap(), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
    assert_eq!(t.decode(&[0xFF, 0xE6]).unwrap(), "\u{FFFD}\u{FFFD}");
    // A lead byte followed by a non-continuation byte.
    let mut dec = t.stream_decoder(false);
    assert_eq!(dec.push(0xE6).unwrap(), "");
    assert_eq!(dec.push(byte('a')).unwrap(), "\u{FFFD}a");
    assert_eq!(t.decode(&[0xE6, byte('a')]).unwrap(), "\u{FFFD}a");
}

#[test]
fn accessors() {
    let t = tok("smollm");
    assert_eq!(t.vocab_size(), 269);
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(START), Some(END), None)
    );
    assert_eq!(t.token_to_id("Ġworld"), Some(SP_WORLD));
    assert_eq!(t.token_to_id("<|end|>"), Some(END));
    assert_eq!(t.token_to_id("nope"), None);
    assert_eq!(t.id_to_token(HELLO), Some("hello"));
}

#[test]
fn other_pre_tokenizers_build() {
    for pre in ["gpt2", "gpt-2", "llama-bpe", "default"] {
        let t = tok(pre);
        let ids = t.encode("hello world 12345, ok!").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "hello world 12345, ok!", "{pre}");
    }
}

#[test]
fn refuses_unknown_pre_tokenizer_and_model() {
    let err = Tokenizer::from_metadata(synthetic::metadata("qwen2")).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedPreTokenizer(p) if p == "qwen2"),
        "{err}"
    );

    let mut md = synthetic::metadata("smollm");
    md.pre = None;
    let err = Tokenizer::from_metadata(md).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.pre"), "{err}");

    let mut md = synthetic::metadata("smollm");
    md.model = "llama".into();
    let err = Tokenizer::from_metadata(md).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedModel(m) if m == "llama"),
        "{err}"
    );
}

#[test]
fn refuses_inconsistent_metadata() {
    let mut md = synthetic::metadata("smollm");
    md.merges.push("x zzz".into()); // `zzz` is not in the vocabulary
    assert!(matches!(
        Tokenizer::from_metadata(md),
        Err(Error::Tokenizer(_))
    ));

    let mut md = synthetic::metadata("smollm");
    md.merges.push("nospace".into());
    let err = Tokenizer::from_metadata(md).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

    let mut md = synthetic::metadata("smollm");
    md.token_types.pop();
    assert!(matches!(
        Tokenizer::from_metadata(md),
        Err(Error::InvalidKey { .. })
    ));

    let mut md = synthetic::metadata("smollm");
    md.eos_id = Some(10_000);
    let err = Tokenizer::from_metadata(md).unwrap_err();
    assert!(err.to_string().contains("eos_token_id"), "{err}");
}

#[test]
fn chat_template_uses_metadata() {
    let t = tok("smollm");
    let out = t
        .chat_template()
        .unwrap()
        .render(&[ChatMessage::user("hi")], false)
        .unwrap();
    assert_eq!(out, "<|start|>user: hi<|end|>");
    assert_eq!(t.encode(&out).unwrap()[0], START);
}
