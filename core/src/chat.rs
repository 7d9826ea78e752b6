//! Chat prompts: the model's own Jinja chat template (`tokenizer.chat_template`), rendered
//! with minijinja and Python-compatible string methods, as transformers renders it.

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::Serialize;

use crate::error::GenerateError;

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// Render `messages` with `template`, ending with the assistant's turn opened. Messages
/// are [`Message`]s, or any serialisable shape a template reads (a multimodal template's
/// `content` lists of `{"type": "video"}` / `{"type": "text", "text": ...}` parts).
pub fn render<M: Serialize + ?Sized>(template: &str, messages: &M, bos: &str, eos: &str) -> Result<String, GenerateError> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, JinjaError> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
    });
    let err = |e: JinjaError| GenerateError::Template(e.to_string());
    env.add_template("chat", template).map_err(err)?;
    let tmpl = env.get_template("chat").map_err(err)?;
    tmpl.render(context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos,
        eos_token => eos,
    })
    .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_template_renders() {
        let t = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'].strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let s = render(t, &[Message::new("user", " hi ")], "", "").unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn multimodal_content_lists_render() {
        // SmolVLM2's template (transformers' DEFAULT_CHAT_TEMPLATE for it).
        let t = "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";
        let m = serde_json::json!([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why?"}]}]);
        assert_eq!(render(t, &m, "", "").unwrap(), "<|im_start|>User: <video>Why?<end_of_utterance>\nAssistant:");
        let m = serde_json::json!([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Why?"}]}]);
        assert_eq!(render(t, &m, "", "").unwrap(), "<|im_start|>User:<image>Why?<end_of_utterance>\nAssistant:");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = "{{ raise_exception('no system role') }}";
        assert!(render(t, &[] as &[Message], "", "").is_err());
    }
}
