//! Chat templates: the Jinja template stored in GGUF `tokenizer.chat_template`,
//! rendered with minijinja the way Hugging Face `apply_chat_template` does
//! (trim_blocks + lstrip_blocks, loop controls, `raise_exception`, Python
//! string methods).

use candle_core::quantized::gguf_file::Content;
use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::metadata::TokenizerMetadata;

/// Name under which the template is registered in the environment.
const NAME: &str = "chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template with the model's BOS/EOS token strings.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; syntax errors are reported here rather than at render time.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, source.into())?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template of a GGUF model; [`Error::NoChatTemplate`] if it has none.
    pub fn from_gguf_content(content: &Content) -> Result<Self> {
        let md = TokenizerMetadata::from_gguf(content)?;
        let source = md.chat_template.clone().ok_or(Error::NoChatTemplate)?;
        let text = |id: Option<u32>| {
            id.and_then(|id| md.tokens.get(id as usize))
                .cloned()
                .unwrap_or_default()
        };
        Self::new(source, text(md.bos_id), text(md.eos_id))
    }

    /// Renders the conversation; with `add_generation_prompt` the prompt ends
    /// with the header of the assistant's reply.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(NAME)?;
        Ok(template.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })?)
    }
}

/// `raise_exception(msg)`: templates call it to reject a conversation.
fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_raises() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}\
                   {{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content.strip() }}{{ eos_token }}{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t.render(&[ChatMessage::user(" hi ")], false).unwrap();
        assert_eq!(out, "<s>[user] hi</s>");
        let err = t.render(&[ChatMessage::assistant("x")], false).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn syntax_error_is_reported_at_construction() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(matches!(err, Error::Template(_)), "{err}");
    }
}
