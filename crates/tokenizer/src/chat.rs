//! Turning a chat conversation into a prompt: the model's own `chat_template` from
//! `tokenizer_config.json` when it has one (rendered with minijinja, as transformers
//! renders it with Jinja), else Mistral Instruct's format
//! `<s>[INST] user [/INST] answer</s>[INST] user [/INST]`, with a system message folded
//! into the first user turn as Mistral does.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// How a router renders conversations.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    /// The model's Jinja template, if it ships one.
    jinja: Option<String>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// The built-in Mistral format.
    pub fn mistral() -> Self {
        ChatTemplate {
            jinja: None,
            bos: "<s>".into(),
            eos: "</s>".into(),
        }
    }

    /// The chat format of whatever `--model` names: a checkpoint directory
    /// ([`ChatTemplate::from_model_dir`]), or a single file, which sirocco reads only
    /// as GGUF ([`ChatTemplate::from_gguf`]).
    #[cfg(feature = "gguf")]
    pub fn from_model(path: &Path) -> Result<Self> {
        if path.is_file() {
            Self::from_gguf(path)
        } else {
            Self::from_model_dir(path)
        }
    }

    /// Reads `tokenizer.chat_template` from a GGUF file, with the text of its BOS and
    /// EOS tokens; the Mistral format (with those tokens) when it has no template.
    #[cfg(feature = "gguf")]
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let context = || format!("cannot read the chat template of {}", path.display());
        let facts = crate::gguf::ChatFacts::from_metadata(&crate::gguf::read_metadata(path)?).with_context(context)?;
        Ok(ChatTemplate {
            jinja: facts.template,
            bos: facts.bos.unwrap_or_else(|| "<s>".into()),
            eos: facts.eos.unwrap_or_else(|| "</s>".into()),
        })
    }

    /// Reads `chat_template` (and the BOS/EOS spellings) from a model directory's
    /// `tokenizer_config.json`; falls back to the Mistral format.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.exists() {
            return Ok(Self::mistral());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let token = |k: &str, default: &str| crate::config_token(&v, k).unwrap_or(default).to_string();
        let jinja = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            _ => None,
        };
        Ok(ChatTemplate {
            jinja,
            bos: token("bos_token", "<s>"),
            eos: token("eos_token", "</s>"),
        })
    }

    /// The template and its BOS/EOS spellings as `tokenizer_config.json` keys, so that
    /// [`ChatTemplate::from_model_dir`] reads back this template.
    pub fn tokenizer_config(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"bos_token": self.bos, "eos_token": self.eos});
        if let Some(j) = &self.jinja {
            v["chat_template"] = serde_json::json!(j);
        }
        v
    }

    /// The prompt text for `messages`; it already holds BOS, so tokenize it without
    /// adding special tokens.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        check_conversation(messages)?;
        match &self.jinja {
            Some(t) => self.render_jinja(t, messages),
            None => Ok(self.render_mistral(messages)),
        }
    }

    fn render_mistral(&self, messages: &[ChatMessage]) -> String {
        let (system, rest) = match messages.first() {
            Some(m) if m.role == "system" => (Some(m.content.as_str()), &messages[1..]),
            _ => (None, messages),
        };
        let mut out = self.bos.clone();
        for (i, m) in rest.iter().enumerate() {
            if m.role == "user" {
                let content = match (i, system) {
                    (0, Some(s)) => format!("{s}\n\n{}", m.content),
                    _ => m.content.clone(),
                };
                out.push_str(&format!("[INST] {} [/INST]", content.trim()));
            } else {
                out.push_str(&format!(" {}{}", m.content.trim(), self.eos));
            }
        }
        out
    }

    fn render_jinja(&self, template: &str, messages: &[ChatMessage]) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template)
            .context("the model's chat_template does not parse")?;
        let out = env
            .get_template("chat")?
            .render(minijinja::context! {
                messages => messages_value(messages),
                bos_token => self.bos.clone(),
                eos_token => self.eos.clone(),
                add_generation_prompt => true,
            })
            .map_err(|e| anyhow::anyhow!("the model's chat_template refused the conversation: {e}"))?;
        Ok(out)
    }
}

fn messages_value(messages: &[ChatMessage]) -> minijinja::Value {
    let list: Vec<std::collections::BTreeMap<String, String>> = messages
        .iter()
        .map(|m| {
            [
                ("role".to_string(), m.role.clone()),
                ("content".to_string(), m.content.clone()),
            ]
            .into()
        })
        .collect();
    minijinja::Value::from(list)
}

/// Roles must be: an optional system message, then user and assistant turns
/// alternating, starting and ending with user.
fn check_conversation(messages: &[ChatMessage]) -> Result<()> {
    if messages.is_empty() {
        bail!("messages: the conversation is empty");
    }
    let start = usize::from(messages[0].role == "system");
    let turns = &messages[start..];
    if turns.is_empty() {
        bail!("messages: a system message needs a user message after it");
    }
    for (i, m) in messages.iter().enumerate() {
        if !["system", "user", "assistant"].contains(&m.role.as_str()) {
            bail!("messages[{i}].role must be system, user or assistant, got {:?}", m.role);
        }
    }
    for (k, m) in turns.iter().enumerate() {
        let want = if k % 2 == 0 { "user" } else { "assistant" };
        if m.role != want {
            bail!(
                "messages[{}]: expected a {want} message (after an optional system message, user and assistant turns alternate), got {}",
                k + start,
                m.role
            );
        }
    }
    if turns.last().map(|m| m.role.as_str()) != Some("user") {
        bail!("messages: the conversation must end with a user message");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn mistral_format_folds_the_system_message() {
        let t = ChatTemplate::mistral();
        let p = t
            .render(&[
                m("system", "Be brief."),
                m("user", "Hi"),
                m("assistant", "Hello!"),
                m("user", "Bye"),
            ])
            .unwrap();
        assert_eq!(p, "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] Bye [/INST]");
    }

    #[test]
    fn malformed_conversations_are_refused() {
        let t = ChatTemplate::mistral();
        let e = t
            .render(&[m("user", "a"), m("assistant", "b"), m("assistant", "c")])
            .unwrap_err();
        assert!(e.to_string().contains("messages[2]"), "{e}");
        assert!(t.render(&[]).is_err());
        assert!(t
            .render(&[m("user", "a"), m("assistant", "b")])
            .unwrap_err()
            .to_string()
            .contains("end with a user"));
        assert!(t.render(&[m("tool", "a")]).unwrap_err().to_string().contains("role"));
    }

    #[cfg(feature = "gguf")]
    #[test]
    fn gguf_files_carry_their_template_and_tokens() {
        use candle_core::quantized::gguf_file::{self, Value};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(|t| Value::String(t.into()));
        let md = [
            ("tokenizer.chat_template", Value::String(chatml.into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens.to_vec())),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ];
        let write = |md: &[(&str, Value)]| {
            let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
            gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &refs, &[]).unwrap();
        };
        write(&md);
        let t = ChatTemplate::from_model(&path).unwrap();
        assert_eq!((t.bos.as_str(), t.eos.as_str()), ("<|im_start|>", "<|im_end|>"));
        let p = t.render(&[m("user", "Hi")]).unwrap();
        assert_eq!(p, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        // No template: Mistral's format, spelled with the file's tokens.
        write(&md[1..]);
        let t = ChatTemplate::from_model(&path).unwrap();
        assert_eq!(t.render(&[m("user", "Hi")]).unwrap(), "<|im_start|>[INST] Hi [/INST]");
        std::fs::write(&path, b"GGUF").unwrap();
        let e = ChatTemplate::from_model(&path).unwrap_err().to_string();
        assert!(e.contains("m.gguf") && e.contains("not a valid GGUF"), "{e}");
    }

    #[test]
    fn jinja_templates_render_like_transformers() {
        // The template Mistral ships with its Instruct tokenizer_config.json (v0.1).
        let mistral = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";
        let t = ChatTemplate {
            jinja: Some(mistral.into()),
            bos: "<s>".into(),
            eos: "</s>".into(),
        };
        let p = t
            .render(&[m("user", "Hi"), m("assistant", "Hello!"), m("user", "Bye")])
            .unwrap();
        assert_eq!(p, "<s>[INST] Hi [/INST]Hello!</s> [INST] Bye [/INST]");
        // Python string methods, as HF templates use them.
        let t2 = ChatTemplate {
            jinja: Some("{% for m in messages %}{{ m['content'].strip().upper() }}{% endfor %}".into()),
            ..t.clone()
        };
        assert_eq!(t2.render(&[m("user", "  hi  ")]).unwrap(), "HI");
        let e = t.render(&[m("system", "x"), m("user", "y")]).unwrap_err();
        assert!(e.to_string().contains("roles must alternate"), "{e}");
    }
}
