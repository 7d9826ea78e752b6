//! Chat prompts: the model's own Jinja chat template (`tokenizer.chat_template`), rendered
//! with minijinja and Python-compatible string methods, as transformers renders it.
//!
//! The template comes from a model file, so it is untrusted code, rendered in a sandbox:
//! no loader is set (no `include` or `import` reaches a file), it runs at most [`FUEL`]
//! instructions and [`MAX_RECURSION`] levels deep, and its output is capped at
//! [`MAX_OUTPUT`] bytes. A template past a bound is a clear error, not a hang or an
//! exhausted memory.

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::Serialize;

use crate::error::GenerateError;

/// Instructions one render may run. Real chat templates take about a hundred per message.
pub const FUEL: u64 = 5_000_000;
/// Nesting of macros, includes and calls a render may reach.
pub const MAX_RECURSION: usize = 100;
/// Bytes a render may write (far more than any context's worth of text).
pub const MAX_OUTPUT: usize = 8 << 20;

/// The render's output, refused past [`MAX_OUTPUT`].
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > MAX_OUTPUT {
            return Err(std::io::Error::other("the output cap"));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(MAX_RECURSION);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, JinjaError> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
    });
    let err = |e: JinjaError| GenerateError::Template(e.to_string());
    env.add_template("chat", template).map_err(err)?;
    let tmpl = env.get_template("chat").map_err(err)?;
    let mut out = Capped(Vec::new());
    let ctx = context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos,
        eos_token => eos,
    };
    tmpl.render_captured_to(ctx, &mut out).map_err(|e| match e.kind() {
        ErrorKind::WriteFailure => GenerateError::Template(format!("the output passed {} MiB", MAX_OUTPUT >> 20)),
        _ => err(e),
    })?;
    String::from_utf8(out.0).map_err(|e| GenerateError::Template(format!("the output is not UTF-8: {e}")))
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

    /// Hostile templates end with an error, quickly: an endless loop runs out of fuel,
    /// recursion stops at the limit, output stops at the cap, and no file can be read.
    #[test]
    fn hostile_templates_are_stopped() {
        let none: &[Message] = &[];
        let cases = [
            ("{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}", "fuel"),
            ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
            ("{% for i in range(1000) %}{{ 'x' * 10000000 }}{% endfor %}", "the output passed 8 MiB"),
            ("{% include '/etc/passwd' %}", "template not found"),
        ];
        for (t, needle) in cases {
            let t0 = std::time::Instant::now();
            let e = render(t, none, "", "").expect_err(t).to_string();
            println!("{t}: {e} ({:.0} ms)", t0.elapsed().as_secs_f64() * 1e3);
            assert!(e.contains(needle), "{t}: {e}");
            assert!(t0.elapsed().as_secs() < 5, "{t}: took {:?}", t0.elapsed());
        }
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = "{{ raise_exception('no system role') }}";
        assert!(render(t, &[] as &[Message], "", "").is_err());
    }
}
