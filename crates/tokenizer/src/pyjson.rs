//! JSON spelled as Python's `json.dumps` spells it (`", "` and `": "` between items,
//! optional indentation, optional `\uXXXX` for non-ASCII): the spelling Mistral's
//! tokenizers and transformers' `tojson` filter put in prompts, which a model was
//! trained on and so should see again.

use serde::Serialize;
use serde_json::ser::Formatter;
use serde_json::Value;
use std::io::{self, Write};

/// How to spell JSON; the default is `json.dumps(x, ensure_ascii=False)`.
#[derive(Clone, Debug)]
pub(crate) struct Style {
    pub(crate) item_separator: String,
    pub(crate) key_separator: String,
    /// Each level's indentation; `None` writes everything on one line.
    pub(crate) indent: Option<String>,
    pub(crate) ensure_ascii: bool,
    pub(crate) sort_keys: bool,
}

impl Default for Style {
    fn default() -> Self {
        Style {
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            indent: None,
            ensure_ascii: false,
            sort_keys: false,
        }
    }
}

impl Style {
    /// Python's default separators for `indent`: with one, items end their line, so
    /// the item separator loses its space.
    pub(crate) fn indented(indent: Option<String>) -> Self {
        let item_separator = if indent.is_some() { "," } else { ", " }.to_string();
        Style {
            item_separator,
            indent,
            ..Style::default()
        }
    }

    pub(crate) fn dumps(&self, v: &Value) -> String {
        let sorted;
        let v = if self.sort_keys {
            sorted = sort_keys(v.clone());
            &sorted
        } else {
            v
        };
        let mut out = Vec::new();
        let formatter = PyFormatter {
            style: self,
            level: 0,
            has_value: false,
        };
        let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
        // Writing a Value into memory cannot fail: its keys are strings, and a Vec
        // takes every byte.
        if v.serialize(&mut ser).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// `json.dumps(v, ensure_ascii=False)`.
pub(crate) fn dumps(v: &Value) -> String {
    Style::default().dumps(v)
}

fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sort_keys(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

struct PyFormatter<'a> {
    style: &'a Style,
    level: usize,
    /// Whether the innermost open array or object has a value yet.
    has_value: bool,
}

impl PyFormatter<'_> {
    fn open<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(bracket)
    }

    fn item<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(self.style.item_separator.as_bytes())?;
        }
        self.newline(w)
    }

    fn newline<W: ?Sized + Write>(&self, w: &mut W) -> io::Result<()> {
        if let Some(indent) = &self.style.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.level {
                w.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }
}

impl Formatter for PyFormatter<'_> {
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.item(w, first)
    }

    fn end_array_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.item(w, first)
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(self.style.key_separator.as_bytes())
    }

    fn end_object_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn write_string_fragment<W: ?Sized + Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        if !self.style.ensure_ascii {
            return w.write_all(fragment.as_bytes());
        }
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spelled_as_python_spells_it() {
        let v = json!({"b": [1, "é", {"x": null}], "a": {}, "c": []});
        // Keys keep their order, as a Python dict does.
        assert_eq!(dumps(&v), r#"{"b": [1, "é", {"x": null}], "a": {}, "c": []}"#);
        let ascii = Style {
            ensure_ascii: true,
            sort_keys: true,
            ..Style::default()
        };
        assert_eq!(
            ascii.dumps(&json!({"b": "é😀\n", "a": 1})),
            r#"{"a": 1, "b": "\u00e9\ud83d\ude00\n"}"#
        );
        assert_eq!(
            Style::indented(Some("  ".into())).dumps(&json!({"a": [1, 2], "b": {}})),
            "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": {}\n}"
        );
    }
}
