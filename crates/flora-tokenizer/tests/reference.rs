//! Token ids must equal llama.cpp's for every case of
//! testdata/smollm2/tokenizer_ref.json, and decoding must give the text back.

mod common;

/// (text, expected ids) of every reference case.
fn cases() -> Vec<(String, Vec<u32>)> {
    let json = common::read_json("tokenizer_ref.json");
    let cases = json["cases"].as_array().expect("`cases` array");
    cases
        .iter()
        .map(|c| {
            let text = c["text"].as_str().expect("case text").to_string();
            let ids = c["ids"]
                .as_array()
                .expect("case ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect();
            (text, ids)
        })
        .collect()
}

#[test]
fn ids_match_llama_cpp() {
    let tok = common::tokenizer();
    let cases = cases();
    assert_eq!(cases.len(), 66, "reference file changed size");
    let mut failures = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text).expect("encode");
        if &got != want {
            failures.push(format!("{text:?}\n   want {want:?}\n    got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn decode_round_trips() {
    let tok = common::tokenizer();
    for (text, ids) in cases() {
        assert_eq!(tok.decode(&ids).expect("decode"), text, "ids {ids:?}");
    }
}

#[test]
fn model_metadata() {
    let tok = common::tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.pad_id(), Some(2));
    assert!(!tok.add_bos());
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("Ġthe"), Some(260));
    assert_eq!(tok.id_to_token(198), Some("Ċ"));
    assert!((0..17).all(|id| tok.is_special(id)));
    assert!(!tok.is_special(17) && !tok.is_special(49151) && !tok.is_special(u32::MAX));
}

#[test]
fn skip_special_tokens() {
    let tok = common::tokenizer();
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
    assert_eq!(tok.decode_with(&ids, true).unwrap(), "user\nhi");
    assert!(tok.decode(&[49152]).is_err(), "out-of-range id must fail");
}
