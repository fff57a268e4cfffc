//! Reading tool calls back out of an answer: `[TOOL_CALLS]` (after optional whitespace)
//! then a JSON array of `{"name", "arguments"}` objects, or one such object, as
//! Mistral's models write them; whole, or while the answer streams, holding back text
//! that may yet turn out to be calls. And the calls in OpenAI's shapes (a message's
//! `tool_calls`, a stream's `delta.tool_calls`).

use super::tools::TOOL_CALLS;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// A call the model made.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Call {
    pub(super) id: String,
    pub(super) name: String,
    /// The arguments object, as the model wrote it.
    pub(super) arguments: String,
}

impl Call {
    fn openai(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// Finds the calls in an answer to a request that offered tools.
#[derive(Clone, Debug)]
pub(super) struct CallReader {
    /// The tools offered: a call to any other is not one the client can answer.
    names: Vec<String>,
    /// The id of the `[TOOL_CALLS]` special token, where the vocabulary has one.
    marker_id: Option<u32>,
}

impl CallReader {
    pub(super) fn new(names: Vec<String>, marker_id: Option<u32>) -> Self {
        CallReader { names, marker_id }
    }

    /// A token's text as calls are read from it: decoding skips special tokens, so
    /// the marker's token is spelled out here.
    pub(super) fn spell<'a>(&self, id: u32, text: &'a str) -> Cow<'a, str> {
        if Some(id) == self.marker_id {
            Cow::Owned(format!("{TOOL_CALLS}{text}"))
        } else {
            Cow::Borrowed(text)
        }
    }

    /// The calls `text` makes, if it is nothing but calls to offered tools.
    pub(super) fn calls(&self, text: &str) -> Option<Vec<Call>> {
        let rest = text.trim_start().strip_prefix(TOOL_CALLS)?.trim();
        let items: Vec<&RawValue> = match rest.as_bytes().first() {
            Some(b'[') => serde_json::from_str(rest).ok()?,
            Some(b'{') => vec![serde_json::from_str(rest).ok()?],
            _ => return None,
        };
        if items.is_empty() {
            return None;
        }
        items.into_iter().map(|item| self.call(item)).collect()
    }

    fn call(&self, item: &RawValue) -> Option<Call> {
        let fields: BTreeMap<String, &RawValue> = serde_json::from_str(item.get()).ok()?;
        let name: String = serde_json::from_str(fields.get("name")?.get()).ok()?;
        let arguments = fields.get("arguments")?.get();
        (arguments.starts_with('{') && self.names.contains(&name)).then(|| Call {
            // Nine alphanumerics: Mistral's chat templates refuse any other id when a
            // client sends the call back, and OpenAI's clients take any string.
            id: uuid::Uuid::new_v4().simple().to_string()[..9].to_string(),
            name,
            arguments: arguments.to_string(),
        })
    }

    /// Reads a streamed answer.
    pub(super) fn stream(self) -> CallStream {
        CallStream {
            reader: self,
            state: State::Undecided,
            held: String::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// All so far is whitespace or the start of the marker.
    Undecided,
    /// Plain text: it streams as it comes.
    Text,
    /// It began with the marker: held back until the answer ends.
    Calls,
}

/// A streamed answer, held back while it may still be calls.
#[derive(Debug)]
pub(super) struct CallStream {
    reader: CallReader,
    state: State,
    held: String,
}

impl CallStream {
    /// Takes the next token: the text to send now as content, or `None` while it is
    /// held back.
    pub(super) fn push(&mut self, id: u32, text: &str) -> Option<String> {
        let text = self.reader.spell(id, text);
        if self.state == State::Text {
            return Some(text.into_owned());
        }
        self.held.push_str(&text);
        if self.state == State::Undecided {
            let t = self.held.trim_start();
            if t.starts_with(TOOL_CALLS) {
                self.state = State::Calls;
            } else if !TOOL_CALLS.starts_with(t) {
                self.state = State::Text;
                return Some(std::mem::take(&mut self.held));
            }
        }
        None
    }

    /// At the end of the answer: its calls, or else the text still held back.
    pub(super) fn finish(&mut self) -> Result<Vec<Call>, String> {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Calls => self.reader.calls(&held).ok_or(held),
            _ => Err(held),
        }
    }
}

/// The message of a whole answer that calls tools.
pub(super) fn message(calls: &[Call]) -> Value {
    json!({"role": "assistant", "content": null, "tool_calls": calls.iter().map(Call::openai).collect::<Vec<_>>()})
}

/// The stream deltas of `calls`, as OpenAI's clients put calls together: each call
/// opens with its index, id, type and name (its arguments empty), then its arguments
/// follow in one piece.
pub(super) fn deltas(calls: &[Call]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            [
                json!({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                       "function": {"name": c.name, "arguments": ""}}]}),
                json!({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]}),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader() -> CallReader {
        CallReader::new(vec!["get_weather".into(), "get-time".into()], Some(7))
    }

    fn named(calls: &[Call]) -> Vec<(&str, &str)> {
        calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect()
    }

    #[test]
    fn calls_are_read_from_mistral_s_format() {
        let r = reader();
        let c = r
            .calls(r#" [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "n": 1.50}}, {"arguments": {}, "name": "get-time", "id": "x"}] "#)
            .unwrap();
        assert_eq!(
            named(&c),
            [("get_weather", r#"{"city": "Paris", "n": 1.50}"#), ("get-time", "{}")],
            "arguments are passed on as the model wrote them"
        );
        for call in &c {
            assert!(
                call.id.len() == 9 && call.id.bytes().all(|b| b.is_ascii_alphanumeric()),
                "{}",
                call.id
            );
        }
        assert_ne!(c[0].id, c[1].id);
        // Mistral also writes a lone object.
        let c = r
            .calls(r#"[TOOL_CALLS]{"name": "get-time", "arguments": {"tz": "UTC"}}"#)
            .unwrap();
        assert_eq!(named(&c), [("get-time", r#"{"tz": "UTC"}"#)]);
    }

    #[test]
    fn anything_else_is_text() {
        let r = reader();
        for text in [
            "Paris is sunny.",
            r#"{"name": "get_weather", "arguments": {}}"#,
            "[TOOL_CALLS]",
            "[TOOL_CALLS] []",
            r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {}}"#,
            r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {}}] and more"#,
            r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": "{}"}]"#,
            r#"[TOOL_CALLS] [{"name": "get_weather"}]"#,
            r#"[TOOL_CALLS] [{"name": "rm_rf", "arguments": {}}]"#,
            r#"[TOOL_CALLS] [{"name": 3, "arguments": {}}]"#,
            r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {}}, 5]"#,
            r#"Sure: [TOOL_CALLS] [{"name": "get_weather", "arguments": {}}]"#,
        ] {
            assert_eq!(r.calls(text), None, "{text}");
        }
    }

    /// Streams `tokens` (id, text): the text sent as it came, and how the answer ended.
    fn stream(tokens: &[(u32, &str)]) -> (Vec<Option<String>>, Result<Vec<Call>, String>) {
        let mut s = reader().stream();
        let sent = tokens.iter().map(|&(id, t)| s.push(id, t)).collect();
        (sent, s.finish())
    }

    #[test]
    fn streamed_text_is_held_back_only_while_it_may_be_calls() {
        let (sent, end) = stream(&[(1, " "), (1, "[TOOL"), (1, "S are"), (1, " fun")]);
        assert_eq!(sent, [None, None, Some(" [TOOLS are".into()), Some(" fun".into())]);
        assert_eq!(end, Err(String::new()));
        let (sent, end) = stream(&[(1, "Hi"), (1, " [TOOL_CALLS]")]);
        assert_eq!(sent, [Some("Hi".into()), Some(" [TOOL_CALLS]".into())]);
        assert_eq!(end, Err(String::new()));
        // Cut short: what was held back is text after all.
        let (sent, end) = stream(&[(1, "[TOOL_"), (1, "CALLS] [{\"name\"")]);
        assert_eq!(sent, [None, None]);
        assert_eq!(end, Err("[TOOL_CALLS] [{\"name\"".into()));
        let (_, end) = stream(&[(1, "[TOOL")]);
        assert_eq!(end, Err("[TOOL".into()));
    }

    #[test]
    fn streamed_calls_come_at_the_end_whether_the_marker_is_text_or_a_special_token() {
        let args = r#"{"tz": "CET"}"#;
        let body = format!(r#" [{{"name": "get-time", "arguments": {args}}}]"#);
        for marker in [[(1, "[TOOL_"), (1, "CALLS]")], [(7, ""), (1, "")]] {
            let tokens: Vec<(u32, &str)> = marker.iter().copied().chain([(1, body.as_str())]).collect();
            let (sent, end) = stream(&tokens);
            assert!(sent.iter().all(Option::is_none), "{sent:?}");
            assert_eq!(named(&end.unwrap()), [("get-time", args)]);
        }
        // The special token's id is read only where the vocabulary has it.
        let mut s = CallReader::new(vec!["get-time".into()], None).stream();
        assert_eq!(s.push(7, ""), None);
        assert_eq!(s.push(1, &body), Some(body.clone()));
    }

    #[test]
    fn calls_take_openai_s_shapes() {
        let calls = [
            Call {
                id: "call_1".into(),
                name: "f".into(),
                arguments: "{}".into(),
            },
            Call {
                id: "call_2".into(),
                name: "g".into(),
                arguments: r#"{"a": 1}"#.into(),
            },
        ];
        assert_eq!(
            message(&calls[..1]),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        );
        let d = deltas(&calls);
        assert_eq!(d.len(), 4);
        assert_eq!(
            d[2],
            json!({"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "g", "arguments": ""}}]})
        );
        assert_eq!(
            d[3],
            json!({"tool_calls": [{"index": 1, "function": {"arguments": "{\"a\": 1}"}}]})
        );
    }
}
