//! The JSON Schema constrained requests send: a built-in one, moderately complex (a
//! nested object, arrays with min and max items, an enum, bounded integers, strings
//! with a maxLength) and finite, so that every output can end by completing its JSON
//! well within the default --output-len; or one from --schema. Outputs are checked
//! against it.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

/// A customer record. Every property is required and no other is allowed, so the
/// grammar has an end, and the bounds keep the longest output to a few hundred
/// characters.
const BUILT_IN: &str = r#"{
  "type": "object",
  "properties": {
    "id": {"type": "integer", "minimum": 1, "maximum": 99999},
    "name": {"type": "string", "minLength": 1, "maxLength": 24},
    "status": {"enum": ["active", "suspended", "closed"]},
    "verified": {"type": "boolean"},
    "address": {
      "type": "object",
      "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
        "country": {"enum": ["FR", "DE", "IT", "ES", "GB", "US"]},
        "floor": {"type": "integer", "minimum": -2, "maximum": 120}
      },
      "required": ["city", "country", "floor"],
      "additionalProperties": false
    },
    "tags": {
      "type": "array",
      "items": {"type": "string", "minLength": 1, "maxLength": 12},
      "minItems": 1,
      "maxItems": 4
    },
    "scores": {
      "type": "array",
      "items": {"type": "integer", "minimum": 0, "maximum": 100},
      "minItems": 2,
      "maxItems": 5
    }
  },
  "required": ["id", "name", "status", "verified", "address", "tags", "scores"],
  "additionalProperties": false
}"#;

/// A schema as requests send it, and its validator.
#[derive(Clone)]
pub struct Schema {
    /// The schema as compact JSON text.
    pub text: Arc<str>,
    /// Where it came from, for the report: "built-in" or the file.
    pub name: String,
    /// None where the validator cannot compile it (a server may still accept it): its
    /// outputs are then only parsed.
    validator: Option<Arc<jsonschema::Validator>>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema")
            .field("name", &self.name)
            .field("text", &self.text)
            .field("checked", &self.validator.is_some())
            .finish()
    }
}

impl Schema {
    /// Whether `output` is JSON, and then whether it matches the schema (None where
    /// there is no validator). Leading U+FFFD are no part of it: a prompt of random ids
    /// can end inside a character, which the server's text completes (as U+FFFD) at
    /// the start of the output.
    pub fn check(&self, output: &str) -> (bool, Option<bool>) {
        let output = output.trim_start_matches(char::REPLACEMENT_CHARACTER);
        match serde_json::from_str::<Value>(output.trim()) {
            Ok(v) => (true, self.validator.as_ref().map(|s| s.is_valid(&v))),
            Err(_) => (false, self.validator.as_ref().map(|_| false)),
        }
    }
}

/// --schema FILE's schema, or the built-in one. A schema is a JSON object (or `true`);
/// anything else is refused here rather than by every request.
pub fn load(path: Option<&Path>) -> Result<Schema> {
    let (text, name) = match path {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("cannot read the schema {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (BUILT_IN.to_string(), "built-in".to_string()),
    };
    parse(&text, name)
}

/// The schema `text`, from `name`.
pub fn parse(text: &str, name: String) -> Result<Schema> {
    let v: Value = serde_json::from_str(text).with_context(|| format!("the schema {name} is not JSON"))?;
    if !(v.is_object() || v == Value::Bool(true)) {
        bail!("the schema {name} is not a JSON Schema: a JSON object expected");
    }
    Ok(Schema {
        text: v.to_string().into(),
        name,
        validator: jsonschema::validator_for(&v).ok().map(Arc::new),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_schema_is_compact_json_and_files_are_checked() {
        let s = load(None).unwrap();
        assert_eq!(s.name, "built-in");
        let v: Value = serde_json::from_str(&s.text).unwrap();
        let required = v["required"].as_array().unwrap();
        let properties = v["properties"].as_object().unwrap();
        // Every property is required, so the grammar must reach the end of the object.
        assert_eq!(required.len(), properties.len());
        assert!(!s.text.contains('\n'));
        let record = r#"{"id": 7, "name": "Ada", "status": "active", "verified": true,
            "address": {"city": "Lyon", "country": "FR", "floor": 3}, "tags": ["a"], "scores": [1, 2]}"#;
        assert_eq!(s.check(record), (true, Some(true)));
        assert_eq!(s.check(&record.replace("\"FR\"", "\"XX\"")), (true, Some(false)));
        assert_eq!(s.check("{\"id\": 7"), (false, Some(false)));
        assert_eq!(s.check(&format!("\u{FFFD}\u{FFFD}{record}")), (true, Some(true)));

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ok = load(Some(&write("ok.json", r#"{"type": "object"}"#))).unwrap();
        assert_eq!(&*ok.text, r#"{"type":"object"}"#);
        let err = |p: &Path| format!("{:#}", load(Some(p)).unwrap_err());
        assert!(err(&write("bad.json", "{not json")).contains("not JSON"));
        assert!(err(&write("list.json", "[1, 2]")).contains("JSON object expected"));
        assert!(err(&dir.path().join("missing.json")).contains("cannot read"));
    }
}
