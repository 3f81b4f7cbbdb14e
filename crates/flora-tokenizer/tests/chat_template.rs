//! The GGUF chat template renders SmolLM2's ChatML format.

mod common;

use flora_tokenizer::{ChatMessage, ChatTemplate, Error};

const DEFAULT_SYSTEM: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

#[test]
fn template_source_matches_recorded_metadata() {
    // gguf_meta.json records the template read from the same file by Python.
    let meta = common::read_json("gguf_meta.json");
    let recorded = meta["chat_template"]
        .as_str()
        .expect("chat_template in gguf_meta.json");
    let template = common::tokenizer().chat_template().expect("template");
    let ours = template.render(&[ChatMessage::user("x")], false).unwrap();
    let direct = ChatTemplate::new(recorded, "<|im_start|>", "<|im_end|>")
        .unwrap()
        .render(&[ChatMessage::user("x")], false)
        .unwrap();
    assert_eq!(ours, direct);
}

#[test]
fn user_message_gets_default_system_and_generation_prompt() {
    let template = common::tokenizer().chat_template().unwrap();
    let out = template.render(&[ChatMessage::user("hi")], true).unwrap();
    assert_eq!(
        out,
        format!("{DEFAULT_SYSTEM}<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    );
    let no_prompt = template.render(&[ChatMessage::user("hi")], false).unwrap();
    assert_eq!(
        no_prompt,
        format!("{DEFAULT_SYSTEM}<|im_start|>user\nhi<|im_end|>\n")
    );
}

#[test]
fn rendered_prompt_matches_reference_case_and_ids() {
    // The `chat` case of tokenizer_ref.json is a rendered ChatML prompt.
    let tok = common::tokenizer();
    let template = tok.chat_template().unwrap();
    let msgs = [
        ChatMessage::system("You are helpful."),
        ChatMessage::user("What is 2+2?"),
    ];
    let prompt = template.render(&msgs, true).unwrap();
    let json = common::read_json("tokenizer_ref.json");
    let case = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"].as_str() == Some(prompt.as_str()))
        .unwrap_or_else(|| panic!("rendered prompt {prompt:?} is not a reference case"));
    let want: Vec<u32> = case["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(tok.encode(&prompt).unwrap(), want);
}

#[test]
fn from_gguf_content_and_missing_template() {
    let path = common::model_path();
    let mut file = std::fs::File::open(&path).unwrap();
    let mut content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let t = ChatTemplate::from_gguf_content(&content).unwrap();
    assert!(t
        .render(&[ChatMessage::user("a")], true)
        .unwrap()
        .ends_with("<|im_start|>assistant\n"));

    content.metadata.remove("tokenizer.chat_template");
    let err = ChatTemplate::from_gguf_content(&content).unwrap_err();
    assert!(matches!(err, Error::NoChatTemplate), "{err}");
    assert!(err.to_string().contains("no chat template"), "{err}");
    let tok = flora_tokenizer::Tokenizer::from_gguf_content(&content).unwrap();
    assert!(matches!(tok.chat_template(), Err(Error::NoChatTemplate)));
}

/// The ids of a JSON array of numbers.
fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn logits_reference_prompts() {
    // logits_ref.json records `chat_messages` rendered by jinja2 with
    // add_generation_prompt=True (prompt `chat`), and the input ids of every prompt.
    let tok = common::tokenizer();
    let json = common::read_json("logits_ref.json");
    let messages: Vec<ChatMessage> = json["chat_messages"]
        .as_array()
        .expect("chat_messages")
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    let prompts = json["prompts"].as_array().expect("prompts");
    let chat = prompts
        .iter()
        .find(|p| p["name"] == "chat")
        .expect("`chat` prompt");
    let rendered = tok
        .chat_template()
        .unwrap()
        .render(&messages, true)
        .unwrap();
    assert_eq!(rendered, chat["text"].as_str().unwrap());
    for p in prompts {
        let text = p["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&p["input_ids"]),
            "prompt {}",
            p["name"]
        );
    }
}
