//! Turning a chat conversation into a prompt: the model's own `chat_template` from
//! `tokenizer_config.json` when it has one (rendered with minijinja, as transformers
//! renders it with Jinja, tools and tool calls included), else Mistral Instruct's format
//! `<s>[INST] user [/INST] answer</s>[INST] user [/INST]`, with a system message folded
//! into the first user turn as Mistral does, and tools, tool calls and tool results as
//! Mistral's v3 tokenizer writes them (`[AVAILABLE_TOOLS]`, `[TOOL_CALLS]`,
//! `[TOOL_RESULTS]`).

use crate::pyjson;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// The text; empty for an assistant turn that only calls tools.
    pub content: String,
    /// An assistant turn's calls to tools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` turn's: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// The bytes of text the message carries (content, and its calls' names, ids and
    /// arguments), which a prompt will copy.
    pub fn text_bytes(&self) -> usize {
        let calls: usize = self
            .tool_calls
            .iter()
            .map(|c| c.id.len() + c.name.len() + c.arguments.len())
            .sum();
        self.content.len() + calls + self.tool_call_id.as_ref().map_or(0, String::len)
    }
}

/// A call an assistant turn made to a tool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    /// The function called.
    pub name: String,
    /// A JSON object as text (OpenAI sends arguments as a string).
    pub arguments: String,
}

impl ToolCall {
    fn arguments_value(&self) -> Result<Value> {
        match serde_json::from_str(&self.arguments) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => bail!("the arguments of tool call {:?} are not a JSON object", self.id),
        }
    }
}

/// A function the model may call, as an OpenAI request declares it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON Schema of its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

impl Tool {
    /// The tool as OpenAI's `tools` lists it, which is also what transformers hands a
    /// template and what Mistral's tokenizer writes.
    pub fn openai(&self) -> Value {
        let mut function = serde_json::Map::new();
        function.insert("name".into(), json!(self.name));
        if let Some(d) = &self.description {
            function.insert("description".into(), json!(d));
        }
        if let Some(p) = &self.parameters {
            function.insert("parameters".into(), p.clone());
        }
        json!({"type": "function", "function": function})
    }
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
        self.render_with_tools(messages, &[])
    }

    /// The prompt text for `messages` with `tools` offered to the model (none: the
    /// prompt offers none).
    pub fn render_with_tools(&self, messages: &[ChatMessage], tools: &[Tool]) -> Result<String> {
        check_conversation(messages)?;
        match &self.jinja {
            Some(t) => self.render_jinja(t, messages, tools),
            None => self.render_mistral(messages, tools),
        }
    }

    fn render_mistral(&self, messages: &[ChatMessage], tools: &[Tool]) -> Result<String> {
        let (system, rest) = match messages.first() {
            Some(m) if m.role == "system" => (Some(m.content.as_str()), &messages[1..]),
            _ => (None, messages),
        };
        // Mistral lists the tools once, just before the last user turn, so that they
        // sit close to the question they serve.
        let last_user = rest.iter().rposition(|m| m.role == "user");
        let mut out = self.bos.clone();
        for (i, m) in rest.iter().enumerate() {
            match m.role.as_str() {
                "user" => {
                    if !tools.is_empty() && Some(i) == last_user {
                        let list = Value::Array(tools.iter().map(Tool::openai).collect());
                        out.push_str(&format!("[AVAILABLE_TOOLS] {}[/AVAILABLE_TOOLS]", pyjson::dumps(&list)));
                    }
                    let content = match (i, system) {
                        (0, Some(s)) => format!("{s}\n\n{}", m.content),
                        _ => m.content.clone(),
                    };
                    out.push_str(&format!("[INST] {} [/INST]", content.trim()));
                }
                "tool" => {
                    // Mistral's tokenizer passes a result that is JSON as that JSON.
                    let content = serde_json::from_str(&m.content).unwrap_or_else(|_| Value::String(m.content.clone()));
                    let id = mistral_call_id(m.tool_call_id.as_deref().unwrap_or_default());
                    let result = json!({"content": content, "call_id": id});
                    out.push_str(&format!("[TOOL_RESULTS] {}[/TOOL_RESULTS]", pyjson::dumps(&result)));
                }
                // As in Mistral's template, a turn that calls tools is just its calls.
                _ if !m.tool_calls.is_empty() => {
                    let calls = m
                        .tool_calls
                        .iter()
                        .map(|c| {
                            Ok(json!({"name": c.name, "arguments": c.arguments_value()?, "id": mistral_call_id(&c.id)}))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    out.push_str(&format!(
                        "[TOOL_CALLS] {}{}",
                        pyjson::dumps(&Value::Array(calls)),
                        self.eos
                    ));
                }
                _ => out.push_str(&format!(" {}{}", m.content.trim(), self.eos)),
            }
        }
        Ok(out)
    }

    fn render_jinja(&self, template: &str, messages: &[ChatMessage], tools: &[Tool]) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_filter("tojson", tojson);
        env.add_template("chat", template)
            .context("the model's chat_template does not parse")?;
        // transformers passes `tools=None` when a request offers none.
        let tools = if tools.is_empty() {
            minijinja::Value::from(())
        } else {
            minijinja::Value::from(minijinja::value::Serde(
                tools.iter().map(Tool::openai).collect::<Vec<_>>(),
            ))
        };
        let out = env
            .get_template("chat")?
            .render(minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages_value(messages)?)),
                tools => tools,
                bos_token => self.bos.clone(),
                eos_token => self.eos.clone(),
                add_generation_prompt => true,
            })
            .map_err(|e| anyhow::anyhow!("the model's chat_template refused the conversation: {e}"))?;
        Ok(out)
    }
}

/// The id Mistral's format gives a call: its last 9 characters. Mistral's models saw
/// 9-character ids only, and an OpenAI client sends back the longer ids the router
/// gave; vLLM shortens them the same way, and a call and its result stay paired.
fn mistral_call_id(id: &str) -> &str {
    match id.char_indices().rev().nth(8) {
        Some((at, _)) => &id[at..],
        None => id,
    }
}

/// The conversation as transformers hands it to a template: OpenAI's message shapes,
/// with each call's arguments as an object (as vLLM passes them, and as templates
/// that write `arguments|tojson` expect), and no content for a turn that only calls
/// tools.
fn messages_value(messages: &[ChatMessage]) -> Result<Vec<Value>> {
    messages
        .iter()
        .map(|m| {
            let mut v = serde_json::Map::new();
            v.insert("role".into(), json!(m.role));
            let content = if m.content.is_empty() && !m.tool_calls.is_empty() {
                Value::Null
            } else {
                json!(m.content)
            };
            v.insert("content".into(), content);
            if !m.tool_calls.is_empty() {
                let calls = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        Ok(json!({"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments_value()?}}))
                    })
                    .collect::<Result<Vec<_>>>()?;
                v.insert("tool_calls".into(), Value::Array(calls));
            }
            if let Some(id) = &m.tool_call_id {
                v.insert("tool_call_id".into(), json!(id));
            }
            Ok(Value::Object(v))
        })
        .collect()
}

/// transformers' `tojson` filter (`json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`); minijinja's own escapes HTML characters, which
/// would change the prompt.
fn tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> Result<minijinja::Value, minijinja::Error> {
    let bad = |msg: &str| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("tojson: {msg}"));
    let indent = match kwargs.get::<Option<minijinja::Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (i64::try_from(v.clone()), v.as_str()) {
            (Ok(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (_, Some(s)) => Some(s.to_string()),
            _ => return Err(bad("indent must be a number or a string")),
        },
    };
    let mut style = pyjson::Style::indented(indent);
    style.ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    style.sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    if let Some(sep) = kwargs.get::<Option<Vec<String>>>("separators")? {
        let [item, key] = <[String; 2]>::try_from(sep).map_err(|_| bad("separators must be two strings"))?;
        style.item_separator = item;
        style.key_separator = key;
    }
    kwargs.assert_all_used()?;
    let v = serde_json::to_value(&value).map_err(|e| bad(&e.to_string()))?;
    Ok(minijinja::Value::from_safe_string(style.dumps(&v)))
}

/// Roles must be: an optional system message, then user and assistant turns
/// alternating, starting with user; an assistant turn may call tools, each call
/// answered by `tool` messages right after it, which the alternation skips (as
/// Mistral's template does). The model answers a user turn or tool results.
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
        if !["system", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            bail!(
                "messages[{i}].role must be system, user, assistant or tool, got {:?}",
                m.role
            );
        }
        if !m.tool_calls.is_empty() && m.role != "assistant" {
            bail!("messages[{i}]: only assistant messages carry tool_calls");
        }
        for c in &m.tool_calls {
            c.arguments_value()
                .with_context(|| format!("messages[{i}].tool_calls"))?;
        }
        match (m.role == "tool", &m.tool_call_id) {
            (true, None) => bail!("messages[{i}]: a tool message needs the tool_call_id it answers"),
            (false, Some(_)) => bail!("messages[{i}]: only tool messages carry a tool_call_id"),
            _ => {}
        }
    }
    let mut turn = 0;
    for (k, m) in turns.iter().enumerate() {
        let i = k + start;
        let previous = k.checked_sub(1).map(|p| &turns[p]);
        let after_calls = previous.is_some_and(|p| !p.tool_calls.is_empty() || p.role == "tool");
        if m.role == "tool" {
            if !after_calls {
                bail!("messages[{i}]: a tool message must follow an assistant message with tool_calls, or another tool message");
            }
            continue;
        }
        if previous.is_some_and(|p| !p.tool_calls.is_empty()) {
            bail!(
                "messages[{i}]: the tool calls of messages[{}] need tool messages answering them first",
                i - 1
            );
        }
        if !m.tool_calls.is_empty() && k > 0 {
            continue;
        }
        let want = if turn % 2 == 0 { "user" } else { "assistant" };
        if m.role != want {
            bail!(
                "messages[{i}]: expected a {want} message (after an optional system message, user and assistant turns alternate), got {}",
                m.role
            );
        }
        turn += 1;
    }
    if !matches!(turns.last().map(|m| m.role.as_str()), Some("user" | "tool")) {
        bail!("messages: the conversation must end with a user message (or tool results)");
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
            ..Default::default()
        }
    }

    fn calls(calls: &[(&str, &str, &str)]) -> ChatMessage {
        ChatMessage {
            role: "assistant".into(),
            tool_calls: calls
                .iter()
                .map(|&(id, name, arguments)| ToolCall {
                    id: id.into(),
                    name: name.into(),
                    arguments: arguments.into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn result(id: &str, content: &str) -> ChatMessage {
        ChatMessage {
            tool_call_id: Some(id.into()),
            ..m("tool", content)
        }
    }

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: Some(
                json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            ),
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
        assert!(t.render(&[m("robot", "a")]).unwrap_err().to_string().contains("role"));
    }

    #[test]
    fn mistral_format_writes_tools_calls_and_results() {
        let t = ChatTemplate::mistral();
        let conversation = [
            m("system", "Be brief."),
            m("user", "Hi"),
            m("assistant", "Hello!"),
            m("user", "Weather in Paris and Oslo?"),
            calls(&[
                ("call_abcdefghi", "get_weather", r#"{"city": "Paris"}"#),
                ("XYZ", "get_weather", r#"{"city":"Oslo"}"#),
            ]),
            result("call_abcdefghi", r#"{"temp": 21}"#),
            result("XYZ", "rain"),
        ];
        let p = t.render_with_tools(&conversation, &[weather()]).unwrap();
        assert_eq!(
            p,
            concat!(
                "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>",
                r#"[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "#,
                r#""parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}][/AVAILABLE_TOOLS]"#,
                "[INST] Weather in Paris and Oslo? [/INST]",
                r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}, "#,
                r#"{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "XYZ"}]</s>"#,
                r#"[TOOL_RESULTS] {"content": {"temp": 21}, "call_id": "abcdefghi"}[/TOOL_RESULTS]"#,
                r#"[TOOL_RESULTS] {"content": "rain", "call_id": "XYZ"}[/TOOL_RESULTS]"#,
            )
        );
        // Without tools offered, the same conversation lists none.
        let p = t.render(&conversation).unwrap();
        assert!(!p.contains("AVAILABLE_TOOLS") && p.contains("[TOOL_CALLS]"), "{p}");
        // The tools go before the last user turn, wherever it is.
        let p = t
            .render_with_tools(&[m("user", "a"), m("assistant", "b"), m("user", "c")], &[weather()])
            .unwrap();
        assert!(p.starts_with("<s>[INST] a [/INST] b</s>[AVAILABLE_TOOLS] ["), "{p}");
        assert!(p.ends_with("[/AVAILABLE_TOOLS][INST] c [/INST]"), "{p}");
    }

    #[test]
    fn tool_turns_must_follow_the_calls_they_answer() {
        let t = ChatTemplate::mistral();
        let call = || calls(&[("id1", "f", "{}")]);
        let ok: &[&[ChatMessage]] = &[
            &[m("user", "a"), call(), result("id1", "r")],
            &[m("user", "a"), call(), result("id1", "r"), call(), result("id1", "r")],
            &[
                m("user", "a"),
                call(),
                result("id1", "r"),
                m("assistant", "b"),
                m("user", "c"),
            ],
        ];
        for c in ok {
            t.render(c).unwrap();
        }
        let refused: &[(&[ChatMessage], &str)] = &[
            (
                &[m("user", "a"), result("id1", "r")],
                "messages[1]: a tool message must follow",
            ),
            (
                &[m("user", "a"), call(), m("user", "b")],
                "messages[2]: the tool calls of messages[1]",
            ),
            (&[m("user", "a"), call()], "end with a user message"),
            (&[call(), result("id1", "r")], "messages[0]: expected a user message"),
            (
                &[m("user", "a"), call(), result("id1", "r"), m("user", "b")],
                "messages[3]: expected a assistant",
            ),
            (
                &[m("user", "a"), call(), m("tool", "r")],
                "messages[2]: a tool message needs the tool_call_id",
            ),
            (
                &[ChatMessage {
                    tool_call_id: Some("id1".into()),
                    ..m("user", "a")
                }],
                "messages[0]: only tool messages carry a tool_call_id",
            ),
            (
                &[m("user", "a"), calls(&[("id1", "f", "[1]")]), result("id1", "r")],
                "not a JSON object",
            ),
        ];
        for (c, want) in refused {
            let e = format!("{:#}", t.render(c).unwrap_err());
            assert!(e.contains(want), "{e} lacks {want:?}");
        }
        let mut user_calls = m("user", "a");
        user_calls.tool_calls = call().tool_calls;
        let e = t.render(&[user_calls]).unwrap_err().to_string();
        assert!(e.contains("only assistant messages carry tool_calls"), "{e}");
    }

    #[test]
    fn jinja_templates_see_tools_and_calls_as_transformers_passes_them() {
        // Shaped like Mistral's v0.3 template: every tool key by hand or through tojson,
        // a call's function through tojson, the id a result answers.
        let template = concat!(
            "{{ bos_token }}{% for message in messages %}",
            "{% if message.role == 'user' %}",
            "{% if tools is not none %}[AVAILABLE_TOOLS][{% for tool in tools %}{% set f = tool.function %}",
            "{% for key, val in f.items() %}{{ key }}={{ val|tojson if val is not string else val }};{% endfor %}",
            "{% endfor %}][/AVAILABLE_TOOLS]{% endif %}",
            "[INST] {{ message.content }} [/INST]",
            "{% elif message.tool_calls is defined and message.tool_calls is not none %}",
            "[TOOL_CALLS]{% for c in message.tool_calls %}{{ c.function|tojson }}/{{ c.id }}/{{ c.type }}/{{ message.content is none }}{% endfor %}{{ eos_token }}",
            "{% elif message.role == 'tool' %}[TOOL_RESULTS]{{ message.tool_call_id }}:{{ message.content }}[/TOOL_RESULTS]",
            "{% else %}{{ message.content }}{{ eos_token }}{% endif %}{% endfor %}",
            "{% if tools is none %}(no tools){% endif %}",
        );
        let t = ChatTemplate {
            jinja: Some(template.into()),
            bos: "<s>".into(),
            eos: "</s>".into(),
        };
        let conversation = [
            m("user", "Weather?"),
            calls(&[("abcdefghi", "get_weather", r#"{"city":"Paris","days":[1,2]}"#)]),
            result("abcdefghi", "sunny <&>"),
        ];
        let p = t.render_with_tools(&conversation, &[weather()]).unwrap();
        assert_eq!(
            p,
            concat!(
                "<s>[AVAILABLE_TOOLS][name=get_weather;description=Weather in a city;",
                r#"parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]};"#,
                "][/AVAILABLE_TOOLS][INST] Weather? [/INST]",
                r#"[TOOL_CALLS]{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}/abcdefghi/function/True</s>"#,
                "[TOOL_RESULTS]abcdefghi:sunny <&>[/TOOL_RESULTS]",
            )
        );
        let p = t.render(&[m("user", "Hi")]).unwrap();
        assert_eq!(p, "<s>[INST] Hi [/INST](no tools)");
        // tojson's keyword arguments are Python's.
        let t2 = ChatTemplate {
            jinja: Some(
                "{{ tools[0].function.parameters|tojson(indent=1, sort_keys=true, separators=[',', ':']) }}".into(),
            ),
            ..t.clone()
        };
        let p = t2.render_with_tools(&[m("user", "Hi")], &[weather()]).unwrap();
        assert_eq!(
            p,
            "{\n \"properties\":{\n  \"city\":{\n   \"type\":\"string\"\n  }\n },\n \"required\":[\n  \"city\"\n ],\n \"type\":\"object\"\n}"
        );
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
