//! Structured output as OpenAI and vLLM clients ask for it: `response_format`
//! (`text`, `json_object`, `json_schema`), vLLM's `guided_json`, `guided_regex`,
//! `guided_choice`, `guided_grammar`, and its newer `structured_outputs` object. At
//! most one of them per request; each becomes the gRPC API's `Constraint`, which
//! validation compiles (and refuses, naming the body field, when it cannot).

use super::request::FieldError;
use serde_json::{Map, Value};
use sirocco_proto::v1 as pb;
use sirocco_proto::v1::constraint::Kind;

/// The body fields that ask for structured output.
pub(super) const FIELDS: &[&str] = &[
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
];

/// The constraint a body asks for, and the field that asked (named in errors).
pub(super) fn parse(m: &Map<String, Value>) -> Result<Option<(pb::Constraint, &'static str)>, FieldError> {
    let mut found: Option<(Kind, &'static str)> = None;
    for &field in FIELDS {
        let Some(v) = m.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let Some(kind) = kind(field, v)? else {
            continue;
        };
        if let Some((_, first)) = found {
            return Err(FieldError::invalid(
                field,
                format!("{field}: only one structured-output field per request ({first} is already given)"),
            ));
        }
        found = Some((kind, field));
    }
    Ok(found.map(|(kind, field)| (pb::Constraint { kind: Some(kind) }, field)))
}

fn kind(field: &'static str, v: &Value) -> Result<Option<Kind>, FieldError> {
    match field {
        "response_format" => response_format(v),
        "guided_json" => schema(field, v).map(Some),
        "guided_regex" => text(field, v).map(|s| Some(Kind::Regex(s))),
        "guided_choice" => choices(field, v).map(Some),
        "guided_grammar" => text(field, v).map(|s| Some(Kind::Lark(s))),
        _ => structured_outputs(v),
    }
}

/// OpenAI's `response_format`: `text` asks for nothing.
fn response_format(v: &Value) -> Result<Option<Kind>, FieldError> {
    const F: &str = "response_format";
    let o = v
        .as_object()
        .ok_or_else(|| FieldError::wrong_type(F, format!("{F} must be an object with a `type`")))?;
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Kind::JsonSchema(r#"{"type":"object"}"#.into()))),
        Some("json_schema") => {
            let js = o
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| FieldError::invalid(F, format!("{F}: type json_schema needs a `json_schema` object")))?;
            if let Some(name) = js.get("name") {
                let ok = name.as_str().is_some_and(|n| {
                    !n.is_empty()
                        && n.len() <= 64
                        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                });
                if !ok {
                    return Err(FieldError::invalid(
                        F,
                        format!("{F}.json_schema.name must be 1 to 64 letters, digits, '_' or '-'"),
                    ));
                }
            }
            if js.get("strict").is_some_and(|s| !s.is_boolean() && !s.is_null()) {
                return Err(FieldError::wrong_type(
                    F,
                    format!("{F}.json_schema.strict must be a boolean"),
                ));
            }
            // A missing schema allows any JSON, as OpenAI's API reads it.
            let schema = js.get("schema").cloned().unwrap_or_else(|| Value::Object(Map::new()));
            schema_kind(F, &schema).map(Some)
        }
        Some(other) => Err(FieldError::invalid(
            F,
            format!("{F}.type must be text, json_object or json_schema, got {other:?}"),
        )),
        None => Err(FieldError::invalid(F, format!("{F} needs a `type`"))),
    }
}

/// A JSON Schema given as an object or as its JSON text.
fn schema(field: &'static str, v: &Value) -> Result<Kind, FieldError> {
    match v {
        Value::String(s) => {
            let parsed: Value = serde_json::from_str(s)
                .map_err(|e| FieldError::invalid(field, format!("{field} is not a JSON Schema: {e}")))?;
            schema_kind(field, &parsed)
        }
        _ => schema_kind(field, v),
    }
}

fn schema_kind(field: &'static str, v: &Value) -> Result<Kind, FieldError> {
    if !(v.is_object() || v.is_boolean()) {
        return Err(FieldError::invalid(
            field,
            format!("{field}: a JSON Schema is an object"),
        ));
    }
    Ok(Kind::JsonSchema(v.to_string()))
}

fn text(field: &'static str, v: &Value) -> Result<String, FieldError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| FieldError::wrong_type(field, format!("{field} must be a string")))
}

fn choices(field: &'static str, v: &Value) -> Result<Kind, FieldError> {
    let list = v
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|c| c.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| FieldError::wrong_type(field, format!("{field} must be a list of strings")))?;
    Ok(Kind::Choice(pb::Choice { choices: list }))
}

/// vLLM's `structured_outputs`: one of `json`, `regex`, `choice`, `grammar`, or
/// `json_object: true`.
fn structured_outputs(v: &Value) -> Result<Option<Kind>, FieldError> {
    const F: &str = "structured_outputs";
    let o = v
        .as_object()
        .ok_or_else(|| FieldError::wrong_type(F, format!("{F} must be an object")))?;
    let mut kinds = Vec::new();
    for (k, v) in o {
        if v.is_null() || v == &Value::Bool(false) {
            continue;
        }
        kinds.push(match k.as_str() {
            "json" => schema(F, v)?,
            "regex" => Kind::Regex(text(F, v)?),
            "choice" => choices(F, v)?,
            "grammar" => Kind::Lark(text(F, v)?),
            "json_object" if v == &Value::Bool(true) => Kind::JsonSchema(r#"{"type":"object"}"#.into()),
            other => {
                return Err(FieldError::invalid(
                    F,
                    format!("{F}.{other} is not supported (json, regex, choice, grammar or json_object)"),
                ))
            }
        });
    }
    if kinds.len() > 1 {
        return Err(FieldError::invalid(
            F,
            format!("{F}: give one of json, regex, choice, grammar"),
        ));
    }
    Ok(kinds.pop())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parsed(v: Value) -> Result<Option<(Kind, &'static str)>, FieldError> {
        parse(v.as_object().unwrap()).map(|o| o.map(|(c, f)| (c.kind.unwrap(), f)))
    }

    #[test]
    fn each_form_becomes_its_constraint() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let cases = [
            (json!({"response_format": {"type": "text"}}), None),
            (
                json!({"response_format": {"type": "json_object"}}),
                Some(Kind::JsonSchema(r#"{"type":"object"}"#.into())),
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
                Some(Kind::JsonSchema(schema.to_string())),
            ),
            (
                json!({"guided_json": schema.to_string()}),
                Some(Kind::JsonSchema(schema.to_string())),
            ),
            (json!({"guided_regex": "[a-z]+"}), Some(Kind::Regex("[a-z]+".into()))),
            (
                json!({"guided_choice": ["x", "y"]}),
                Some(Kind::Choice(pb::Choice {
                    choices: vec!["x".into(), "y".into()],
                })),
            ),
            (
                json!({"guided_grammar": "start: \"a\""}),
                Some(Kind::Lark("start: \"a\"".into())),
            ),
            (
                json!({"structured_outputs": {"regex": "a|b"}}),
                Some(Kind::Regex("a|b".into())),
            ),
            (
                json!({"structured_outputs": {"json_object": true}}),
                Some(Kind::JsonSchema(r#"{"type":"object"}"#.into())),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(parsed(body.clone()).unwrap().map(|(k, _)| k), want, "{body}");
        }
    }

    #[test]
    fn bad_forms_name_their_field() {
        let cases = [
            (json!({"response_format": "json"}), "response_format"),
            (json!({"response_format": {"type": "yaml"}}), "response_format"),
            (json!({"response_format": {"type": "json_schema"}}), "response_format"),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}}),
                "response_format",
            ),
            (json!({"guided_json": "{not json"}), "guided_json"),
            (json!({"guided_json": 3}), "guided_json"),
            (json!({"guided_regex": 3}), "guided_regex"),
            (json!({"guided_choice": ["a", 1]}), "guided_choice"),
            (json!({"guided_regex": "a", "guided_choice": ["a"]}), "guided_choice"),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}),
                "structured_outputs",
            ),
            (json!({"structured_outputs": {"xml": "a"}}), "structured_outputs"),
        ];
        for (body, field) in cases {
            let e = parsed(body.clone()).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e:?}");
        }
    }
}
