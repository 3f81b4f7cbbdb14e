//! Bad model files and unsupported tokenizers give clear errors.

mod common;

use candle_core::quantized::gguf_file::{Content, Value};
use common::synthetic;
use flora_tokenizer::{Error, Tokenizer};

#[test]
fn missing_file() {
    let path = common::temp_path("does-not-exist.gguf");
    let err = Tokenizer::from_gguf(&path).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("does-not-exist.gguf"), "{err}");
}

#[test]
fn not_a_gguf_file() {
    let path = common::temp_path("text.gguf");
    std::fs::write(&path, "this is a text file, not a model\n").unwrap();
    let err = Tokenizer::from_gguf(&path).unwrap_err();
    std::fs::remove_file(&path).ok();
    assert!(matches!(err, Error::InvalidGguf { .. }), "{err}");
    assert!(
        err.to_string().contains("is not a valid GGUF file"),
        "{err}"
    );
}

#[test]
fn synthetic_gguf_loads_and_truncated_copy_fails() {
    let path = common::temp_path("synthetic.gguf");
    synthetic::write_gguf(&synthetic::metadata("smollm"), &path);
    let tok = Tokenizer::from_gguf(&path).expect("synthetic GGUF loads");
    assert_eq!(
        tok.encode("hello world").unwrap(),
        vec![synthetic::HELLO, synthetic::SP_WORLD]
    );

    let bytes = std::fs::read(&path).unwrap();
    let short = common::temp_path("synthetic-truncated.gguf");
    // (The writer pads the end of the header, so cuts are made well inside it.)
    for len in [2, 10, bytes.len() / 2, bytes.len() * 9 / 10] {
        std::fs::write(&short, &bytes[..len]).unwrap();
        let err = Tokenizer::from_gguf(&short).unwrap_err();
        assert!(matches!(err, Error::InvalidGguf { .. }), "len {len}: {err}");
        eprintln!("truncated to {len} bytes: {err}");
    }
    std::fs::remove_file(&path).ok();
    std::fs::remove_file(&short).ok();
}

#[test]
fn synthetic_gguf_unknown_pre_tokenizer() {
    let path = common::temp_path("unknown-pre.gguf");
    synthetic::write_gguf(&synthetic::metadata("mystery-pre"), &path);
    let err = Tokenizer::from_gguf(&path).unwrap_err();
    std::fs::remove_file(&path).ok();
    assert!(
        err.to_string()
            .contains("unsupported pre-tokenizer `mystery-pre`"),
        "{err}"
    );
}

#[test]
fn truncated_real_model() {
    let bytes = std::fs::read(common::model_path()).unwrap();
    let path = common::temp_path("smollm2-truncated.gguf");
    std::fs::write(&path, &bytes[..1 << 20]).unwrap(); // cut inside the vocabulary
    let err = Tokenizer::from_gguf(&path).unwrap_err();
    std::fs::remove_file(&path).ok();
    assert!(matches!(err, Error::InvalidGguf { .. }), "{err}");
    eprintln!("{err}");
}

#[test]
fn real_model_with_unknown_pre_tokenizer_or_model() {
    let mut file = std::fs::File::open(common::model_path()).unwrap();
    let content = Content::read(&mut file).unwrap();

    let mut c = clone_content(&content);
    c.metadata
        .insert("tokenizer.ggml.pre".into(), Value::String("qwen2".into()));
    let err = Tokenizer::from_gguf_content(&c).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedPreTokenizer(p) if p == "qwen2"),
        "{err}"
    );

    let mut c = clone_content(&content);
    c.metadata
        .insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    let err = Tokenizer::from_gguf_content(&c).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedModel(m) if m == "llama"),
        "{err}"
    );

    let mut c = clone_content(&content);
    c.metadata.remove("tokenizer.ggml.tokens");
    let err = Tokenizer::from_gguf_content(&c).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.tokens"), "{err}");
}

/// `Content` is not `Clone`; copy the parts the tokenizer reads.
fn clone_content(c: &Content) -> Content {
    Content {
        magic: c.magic,
        metadata: c.metadata.clone(),
        tensor_infos: Default::default(),
        tensor_data_offset: c.tensor_data_offset,
    }
}
