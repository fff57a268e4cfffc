//! OpenAI tool calling on chat requests: the body's `tools`, `tool_choice` and
//! `parallel_tool_calls`, and the tool fields of its messages, checked field by field;
//! which tools the prompt offers; and, when a call is required, the grammar (llguidance
//! Lark) that lets the model write nothing but calls, in Mistral's format
//! `[TOOL_CALLS] [{"name": ..., "arguments": {...}}]`. Reading the calls back out of
//! the answer is [`super::tool_calls`]'s.

use super::request::FieldError;
use super::tool_calls::CallReader;
use serde_json::{json, Map, Value};
use sirocco_proto::v1 as pb;
use sirocco_tokenizer::{Tokenizer, Tool, ToolCall};

/// The most tools a request may offer.
pub(super) const MAX_TOOLS: usize = 128;
/// The most bytes of JSON all tools together may take: each is copied into the prompt
/// and into the grammar, which the structured-output limits bound too.
pub(super) const MAX_TOOLS_BYTES: usize = 128 << 10;
/// How a Mistral model opens a turn of calls: a special token where its vocabulary has
/// one, else this text.
pub(super) const TOOL_CALLS: &str = "[TOOL_CALLS]";
/// The most calls one turn may hold when a call is required: a model that never
/// closes its list (a small or random-weight one repeating itself) ends its turn here,
/// with calls a client can answer, instead of running out of tokens mid-call.
pub(super) const MAX_CALLS: usize = 32;
/// The body fields of tool calling, which only chat accepts.
pub(super) const FIELDS: [&str; 3] = ["tools", "tool_choice", "parallel_tool_calls"];

/// What the model may or must do with the tools (`tool_choice`).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) enum ToolChoice {
    /// Never call one: the tools are not offered and the answer is plain text.
    #[default]
    None,
    /// Call tools or answer in text, as the model likes.
    Auto,
    /// Call at least one tool.
    Required,
    /// Call this function.
    Function(String),
}

/// A chat request's tools and what it asks of them.
#[derive(Clone, Debug, Default)]
pub(super) struct Tools {
    tools: Vec<Tool>,
    choice: ToolChoice,
    /// Whether a turn may hold several calls (`parallel_tool_calls`, true unless false).
    parallel: bool,
}

impl Tools {
    /// The tools the prompt offers: none when the model must not call any.
    pub(super) fn offered(&self) -> &[Tool] {
        match self.choice {
            ToolChoice::None => &[],
            _ => &self.tools,
        }
    }

    /// Constrains `params` so that a call is made, where `tool_choice` requires one;
    /// says whether it did. A request that already constrains its output
    /// (`response_format`) cannot also be held to tool calls.
    pub(super) fn constrain(
        &self,
        params: &mut pb::SamplingParameters,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<bool, FieldError> {
        let callable: Vec<&Tool> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return Ok(false),
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Function(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
        };
        if params.constraint.is_some() {
            return Err(FieldError::invalid(
                "tool_choice",
                "a `tool_choice` that requires a call constrains the output, so it cannot be combined with \
                 `response_format` or guided decoding",
            ));
        }
        let grammar = grammar(&callable, self.parallel, marker_id(tokenizer));
        params.constraint = Some(pb::Constraint {
            kind: Some(pb::constraint::Kind::Lark(grammar)),
        });
        Ok(true)
    }

    /// What reads calls back out of the answer; `None` when the request does not let
    /// the model call tools, and its answer is text whatever it says.
    pub(super) fn reader(&self, tokenizer: Option<&Tokenizer>) -> Option<CallReader> {
        let names = self.offered().iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        (!names.is_empty()).then(|| CallReader::new(names, marker_id(tokenizer)))
    }
}

/// The id of Mistral's `[TOOL_CALLS]` special token in the served vocabulary.
fn marker_id(tokenizer: Option<&Tokenizer>) -> Option<u32> {
    tokenizer.and_then(|t| t.special_token_id(TOOL_CALLS))
}

/// The grammar of a turn of calls to `tools`: the marker, then a JSON array of one call
/// (or, with `parallel`, 1 to [`MAX_CALLS`]) `{"name": <a tool's name>, "arguments": <JSON
/// its parameters accept>}`, written as Mistral writes it (`json.dumps` spacing).
///
/// Each tool's arguments are a `%json` rule of their own, so that each parameter
/// schema stays a root: its `$ref`s to `#/...` still point into it. The special token
/// is named by its id (`<[id]>`): llguidance reads `<[...]>` as ids, never as a
/// token's text.
pub(super) fn grammar(tools: &[&Tool], parallel: bool, marker: Option<u32>) -> String {
    let marker = match marker {
        Some(id) => format!("<[{id}]>"),
        None => lark_string(TOOL_CALLS),
    };
    let calls = if parallel {
        format!(r#""[" call (", " call){{0,{}}} "]""#, MAX_CALLS - 1)
    } else {
        r#""[" call "]""#.to_string()
    };
    // A space may follow the marker: Mistral's tokenizers write `[TOOL_CALLS] [`.
    let mut g = format!("start: {marker} \" \"? {calls}\n");
    let alternatives: Vec<String> = (0..tools.len()).map(|i| format!("call_{i}")).collect();
    g.push_str(&format!("call: {}\n", alternatives.join(" | ")));
    for (i, t) in tools.iter().enumerate() {
        let head = lark_string(&format!(r#"{{"name": {}, "arguments": "#, json!(t.name)));
        g.push_str(&format!("call_{i}: {head} args_{i} \"}}\"\n"));
        g.push_str(&format!("args_{i}: %json {}\n", arguments_schema(t)));
    }
    g
}

/// `s` as a Lark string literal (llguidance's use JSON's escapes).
fn lark_string(s: &str) -> String {
    Value::String(s.into()).to_string()
}

/// A tool's parameter schema as its calls' `arguments` must match it: an object, with
/// no free whitespace (a model, a random-weight one above all, could otherwise spend
/// its tokens on spaces) and the spacing Mistral's models write. A schema's own
/// `x-guidance` options win.
fn arguments_schema(t: &Tool) -> Value {
    let mut schema = match &t.parameters {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    schema.entry("type").or_insert_with(|| json!("object"));
    schema
        .entry("x-guidance")
        .or_insert_with(|| json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
    Value::Object(schema)
}

/// Parses `tools`, `tool_choice` and `parallel_tool_calls` of a chat body.
pub(super) fn parse(m: &Map<String, Value>) -> Result<Tools, FieldError> {
    let tools = match m.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => parse_tools(list)?,
        Some(_) => return Err(FieldError::invalid("tools", "`tools` must be a list of tools")),
    };
    let parallel = match m.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(FieldError::wrong_type(
                "parallel_tool_calls",
                "`parallel_tool_calls` must be a boolean",
            ))
        }
    };
    let choice = parse_choice(m.get("tool_choice"), &tools)?;
    Ok(Tools {
        tools,
        choice,
        parallel,
    })
}

fn parse_tools(list: &[Value]) -> Result<Vec<Tool>, FieldError> {
    if list.len() > MAX_TOOLS {
        return Err(FieldError::invalid(
            "tools",
            format!("at most {MAX_TOOLS} tools are accepted, got {}", list.len()),
        ));
    }
    let bytes: usize = list.iter().map(|t| t.to_string().len()).sum();
    if bytes > MAX_TOOLS_BYTES {
        return Err(FieldError::invalid(
            "tools",
            format!("the tools take {bytes} bytes of JSON; at most {MAX_TOOLS_BYTES} are accepted"),
        ));
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let tool = parse_tool(i, v)?;
        if tools.iter().any(|t| t.name == tool.name) {
            return Err(FieldError::invalid(
                &format!("tools[{i}].function.name"),
                format!("two tools are named `{}`", tool.name),
            ));
        }
        tools.push(tool);
    }
    Ok(tools)
}

fn parse_tool(i: usize, v: &Value) -> Result<Tool, FieldError> {
    let at = format!("tools[{i}]");
    let obj = object(&at, v, &["type", "function"])?;
    if obj.get("type").and_then(Value::as_str) != Some("function") {
        return Err(FieldError::invalid(
            &format!("{at}.type"),
            format!("`{at}.type` must be \"function\" (the only kind of tool)"),
        ));
    }
    let at = format!("{at}.function");
    let f = object(&at, obj.get("function").unwrap_or(&Value::Null), &FUNCTION_KEYS)?;
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    if !valid_name(name) {
        return Err(FieldError::invalid(
            &format!("{at}.name"),
            format!("`{at}.name` must be 1 to 64 letters, digits, underscores or dashes, got {name:?}"),
        ));
    }
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(FieldError::wrong_type(
                &format!("{at}.description"),
                format!("`{at}.description` must be a string"),
            ))
        }
    };
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(schema)) => {
            if schema.get("type").is_some_and(|t| t != "object") {
                return Err(FieldError::invalid(
                    &format!("{at}.parameters"),
                    format!("`{at}.parameters` must describe an object (its `type` is \"object\")"),
                ));
            }
            Some(p.clone())
        }
        Some(_) => {
            return Err(FieldError::invalid(
                &format!("{at}.parameters"),
                format!("`{at}.parameters` must be a JSON Schema of an object"),
            ))
        }
    };
    match f.get("strict") {
        None | Some(Value::Null | Value::Bool(_)) => {}
        Some(_) => {
            return Err(FieldError::wrong_type(
                &format!("{at}.strict"),
                format!("`{at}.strict` must be a boolean"),
            ))
        }
    }
    Ok(Tool {
        name: name.to_string(),
        description,
        parameters,
    })
}

/// The keys of a tool's `function`. `strict` is accepted as OpenAI clients send it:
/// a required or named call always follows the schema, an `auto` one is never held to it.
const FUNCTION_KEYS: [&str; 4] = ["name", "description", "parameters", "strict"];

/// `v` as a JSON object with no keys but `keys`.
fn object<'a>(at: &str, v: &'a Value, keys: &[&str]) -> Result<&'a Map<String, Value>, FieldError> {
    let Value::Object(obj) = v else {
        return Err(FieldError::invalid(at, format!("`{at}` must be an object")));
    };
    if let Some(k) = obj.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(FieldError::invalid(
            &format!("{at}.{k}"),
            format!("`{at}.{k}` is not supported by sirocco"),
        ));
    }
    Ok(obj)
}

/// OpenAI's rule for function names: `^[a-zA-Z0-9_-]{1,64}$`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_choice(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, FieldError> {
    let bad = |msg: String| FieldError::invalid("tool_choice", msg);
    let choice = match v {
        None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(format!(
                    "`tool_choice` must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \
                     \"function\": {{\"name\": ...}}}}, got {other:?}"
                )))
            }
        },
        Some(Value::Object(o)) => {
            let name = match (o.get("type").and_then(Value::as_str), o.get("function")) {
                (Some("function"), Some(Value::Object(f))) => f.get("name").and_then(Value::as_str),
                _ => None,
            };
            let name = name.ok_or_else(|| {
                bad("`tool_choice` names a function as {\"type\": \"function\", \"function\": {\"name\": ...}}".into())
            })?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(bad(format!("`tool_choice` names `{name}`, which is not among `tools`")));
            }
            ToolChoice::Function(name.to_string())
        }
        Some(_) => return Err(bad("`tool_choice` must be a string or an object".into())),
    };
    if tools.is_empty() && choice != ToolChoice::None {
        return Err(bad("`tool_choice` needs `tools` to choose from".into()));
    }
    Ok(choice)
}

/// A message's tool fields: an assistant's `tool_calls`, a tool result's
/// `tool_call_id`. Other roles carry neither.
pub(super) fn message_fields(i: usize, role: &str, x: &Value) -> Result<(Vec<ToolCall>, Option<String>), FieldError> {
    let bad = |msg: String| FieldError::invalid("messages", msg);
    let sent = |k: &str| x.get(k).filter(|v| !v.is_null());
    let calls = match (sent("tool_calls"), role) {
        (None, _) => Vec::new(),
        (Some(Value::Array(calls)), "assistant") => calls
            .iter()
            .enumerate()
            .map(|(j, c)| message_call(&format!("messages[{i}].tool_calls[{j}]"), c))
            .collect::<Result<_, _>>()?,
        (Some(_), "assistant") => return Err(bad(format!("messages[{i}].tool_calls must be a list"))),
        (Some(_), _) => return Err(bad(format!("messages[{i}]: only assistant messages carry tool_calls"))),
    };
    let id = match (sent("tool_call_id"), role) {
        (Some(Value::String(id)), "tool") if !id.is_empty() => Some(id.clone()),
        (_, "tool") => {
            return Err(bad(format!(
                "messages[{i}].tool_call_id is required: the id of the call this tool message answers"
            )))
        }
        (None, _) => None,
        (Some(_), _) => return Err(bad(format!("messages[{i}]: only tool messages carry a tool_call_id"))),
    };
    Ok((calls, id))
}

/// One call of an assistant message, as OpenAI's answers spell it:
/// `{"id", "type": "function", "function": {"name", "arguments": "<JSON object>"}}`.
fn message_call(at: &str, c: &Value) -> Result<ToolCall, FieldError> {
    let bad = |msg: String| FieldError::invalid("messages", msg);
    let id = c.get("id").and_then(Value::as_str).filter(|s| !s.is_empty());
    let function = c.get("function");
    let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
    let arguments = function.and_then(|f| f.get("arguments")).and_then(Value::as_str);
    let typed = matches!(c.get("type"), None | Some(Value::Null)) || c.get("type") == Some(&json!("function"));
    let (Some(id), Some(name), Some(arguments), true) = (id, name, arguments, typed) else {
        return Err(bad(format!(
            "{at} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}} with strings"
        )));
    };
    if !matches!(serde_json::from_str(arguments), Ok(Value::Object(_))) {
        return Err(bad(format!(
            "{at}.function.arguments must be a JSON object, as a string"
        )));
    }
    Ok(ToolCall {
        id: id.to_string(),
        name: name.to_string(),
        arguments: arguments.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::error::ApiError;
    use axum::http::StatusCode;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather",
               "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                              "required": ["city"], "additionalProperties": false}}})
    }

    fn time() -> Value {
        json!({"type": "function", "function": {"name": "get-time", "strict": true}})
    }

    fn body(fields: Value) -> Map<String, Value> {
        let Value::Object(m) = fields else { unreachable!() };
        m
    }

    fn tools(fields: Value) -> Result<Tools, FieldError> {
        parse(&body(fields))
    }

    /// The field a refusal names, and its status.
    fn refused(fields: Value) -> (String, StatusCode) {
        let e: ApiError = tools(fields.clone()).expect_err(&fields.to_string()).into();
        (e.param.unwrap_or_default(), e.status)
    }

    #[test]
    fn each_bad_tool_field_is_named() {
        let bad = StatusCode::BAD_REQUEST;
        let wrong_type = StatusCode::UNPROCESSABLE_ENTITY;
        let function = |f: Value| json!({"tools": [{"type": "function", "function": f}]});
        let cases = [
            (json!({"tools": {}}), "tools", bad),
            (json!({"tools": [3]}), "tools[0]", bad),
            (
                json!({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}),
                "tools[0].type",
                bad,
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f"}, "x": 1}]}),
                "tools[0].x",
                bad,
            ),
            (json!({"tools": [{"type": "function"}]}), "tools[0].function", bad),
            (function(json!({"name": ""})), "tools[0].function.name", bad),
            (function(json!({"name": "a b"})), "tools[0].function.name", bad),
            (function(json!({"name": "x".repeat(65)})), "tools[0].function.name", bad),
            (
                function(json!({"name": "f", "description": 1})),
                "tools[0].function.description",
                wrong_type,
            ),
            (
                function(json!({"name": "f", "parameters": []})),
                "tools[0].function.parameters",
                bad,
            ),
            (
                function(json!({"name": "f", "parameters": {"type": "string"}})),
                "tools[0].function.parameters",
                bad,
            ),
            (
                function(json!({"name": "f", "strict": "yes"})),
                "tools[0].function.strict",
                wrong_type,
            ),
            (
                function(json!({"name": "f", "returns": {}})),
                "tools[0].function.returns",
                bad,
            ),
            (json!({"tools": [weather(), weather()]}), "tools[1].function.name", bad),
            (json!({"tools": vec![time(); MAX_TOOLS + 1]}), "tools", bad),
            (
                json!({"tools": [weather()], "tool_choice": "always"}),
                "tool_choice",
                bad,
            ),
            (json!({"tools": [weather()], "tool_choice": 1}), "tool_choice", bad),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function"}}),
                "tool_choice",
                bad,
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "get-time"}}}),
                "tool_choice",
                bad,
            ),
            (json!({"tool_choice": "required"}), "tool_choice", bad),
            (json!({"tools": [], "tool_choice": "auto"}), "tool_choice", bad),
            (
                json!({"tools": [weather()], "parallel_tool_calls": 1}),
                "parallel_tool_calls",
                wrong_type,
            ),
        ];
        for (fields, field, status) in cases {
            assert_eq!(refused(fields.clone()), (field.to_string(), status), "{fields}");
        }
        let huge = json!({"type": "function", "function": {"name": "f", "description": "x".repeat(MAX_TOOLS_BYTES)}});
        assert_eq!(refused(json!({"tools": [huge]})), ("tools".into(), bad));
    }

    #[test]
    fn tool_choice_decides_what_is_offered_and_read() {
        let t = tools(json!({"tools": [weather(), time()]})).unwrap();
        assert_eq!(
            (t.choice.clone(), t.parallel),
            (ToolChoice::Auto, true),
            "OpenAI's defaults"
        );
        assert_eq!(t.offered().len(), 2);
        assert!(t.reader(None).is_some());
        let none = tools(json!({"tools": [weather()], "tool_choice": "none"})).unwrap();
        assert!(none.offered().is_empty() && none.reader(None).is_none());
        let named = tools(json!({"tools": [weather(), time()], "parallel_tool_calls": false,
                                 "tool_choice": {"type": "function", "function": {"name": "get-time"}}}))
        .unwrap();
        assert_eq!(
            (named.choice.clone(), named.parallel, named.offered().len()),
            (ToolChoice::Function("get-time".into()), false, 2)
        );
        let plain = tools(json!({"tool_choice": "none"})).unwrap();
        assert_eq!(plain.choice, ToolChoice::None);
        assert!(tools(json!({})).unwrap().reader(None).is_none());
    }

    fn lark(params: &pb::SamplingParameters) -> &str {
        match &params.constraint {
            Some(pb::Constraint {
                kind: Some(pb::constraint::Kind::Lark(g)),
            }) => g,
            other => panic!("not a grammar: {other:?}"),
        }
    }

    #[test]
    fn only_a_required_or_named_call_constrains_the_output() {
        let mut params = pb::SamplingParameters::default();
        for choice in [json!("auto"), json!("none")] {
            let t = tools(json!({"tools": [weather()], "tool_choice": choice})).unwrap();
            assert!(!t.constrain(&mut params, None).unwrap());
            assert_eq!(params.constraint, None, "{choice}");
        }
        let named = tools(json!({"tools": [weather(), time()],
                                 "tool_choice": {"type": "function", "function": {"name": "get-time"}}}))
        .unwrap();
        assert!(named.constrain(&mut params, None).unwrap());
        let g = lark(&params);
        assert!(g.contains(r#""{\"name\": \"get-time\", \"arguments\": ""#), "{g}");
        assert!(!g.contains("get_weather"), "only the named function: {g}");
        // Already constrained (response_format): refused, naming tool_choice.
        let e = named.constrain(&mut params, None).unwrap_err();
        assert_eq!(e.field, "tool_choice");
        assert!(e.message.contains("response_format"), "{}", e.message);
    }

    #[test]
    fn the_grammar_allows_calls_to_the_tools_only() {
        let t = tools(json!({"tools": [weather(), time()], "tool_choice": "required"})).unwrap();
        let all: Vec<&Tool> = t.tools.iter().collect();
        let args_weather = r#"{"type":"object","properties":{"city":{"enum":["Paris","Oslo"]}},"required":["city"],"additionalProperties":false,"x-guidance":{"whitespace_flexible":false,"item_separator":", ","key_separator":": "}}"#;
        let args_time = r#"{"type":"object","x-guidance":{"whitespace_flexible":false,"item_separator":", ","key_separator":": "}}"#;
        assert_eq!(
            grammar(&all, true, None),
            [
                r#"start: "[TOOL_CALLS]" " "? "[" call (", " call){0,31} "]""#.to_string(),
                "call: call_0 | call_1".into(),
                r#"call_0: "{\"name\": \"get_weather\", \"arguments\": " args_0 "}""#.into(),
                format!("args_0: %json {args_weather}"),
                r#"call_1: "{\"name\": \"get-time\", \"arguments\": " args_1 "}""#.into(),
                format!("args_1: %json {args_time}"),
                String::new(),
            ]
            .join("\n")
        );
        // One call only, opened by the special token where the vocabulary has it.
        let g = grammar(&all[1..], false, Some(5));
        assert!(
            g.starts_with("start: <[5]> \" \"? \"[\" call \"]\"\ncall: call_0\n"),
            "{g}"
        );
        // A schema's own llguidance options win.
        let own = Tool {
            name: "f".into(),
            description: None,
            parameters: Some(json!({"x-guidance": {"whitespace_flexible": true}})),
        };
        assert!(
            grammar(&[&own], false, None).contains(r#"{"x-guidance":{"whitespace_flexible":true},"type":"object"}"#)
        );
    }

    /// The built-in tokenizer, with Mistral's `[TOOL_CALLS]` as a special token when
    /// `marker`: (the tokenizer, the marker's id).
    fn tokenizer(marker: bool) -> (Tokenizer, Option<u32>) {
        let tok = Tokenizer::builtin();
        if !marker {
            return (tok, None);
        }
        let id = tok.vocab_size() as u32;
        let mut json: Value = serde_json::from_str(&tok.to_json().unwrap()).unwrap();
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(json!({"id": id, "content": TOOL_CALLS,
            "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        let tok = Tokenizer::from_json_str(&json.to_string()).unwrap();
        assert_eq!(tok.special_token_id(TOOL_CALLS), Some(id));
        (tok, Some(id))
    }

    #[test]
    fn whatever_the_model_picks_within_the_grammar_is_calls_the_reader_accepts() {
        use rand::{Rng, SeedableRng};
        use sirocco_structured::{allows, Constraint, Grammars};
        let alarm = json!({"type": "function", "function": {"name": "set-alarm", "parameters": {
            "type": "object", "additionalProperties": false, "required": ["hour", "label"],
            "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                           "label": {"type": "string", "pattern": "^[a-z]{1,6}$"}}}}});
        let schemas = |name: &str| -> Value {
            let t = if name == "get_weather" {
                weather()
            } else {
                alarm.clone()
            };
            t["function"]["parameters"].clone()
        };
        for marker in [false, true] {
            let (tok, marker_id) = tokenizer(marker);
            let grammars = Grammars::new(&tok, tok.vocab_size()).unwrap();
            for (choice, parallel) in [
                (json!("required"), true),
                (json!({"type": "function", "function": {"name": "set-alarm"}}), false),
            ] {
                let t = tools(json!({"tools": [weather(), alarm], "tool_choice": choice,
                                     "parallel_tool_calls": parallel}))
                .unwrap();
                let mut params = pb::SamplingParameters::default();
                assert!(t.constrain(&mut params, Some(&tok)).unwrap());
                let compiled = grammars.compile(&Constraint::Lark(lark(&params).into())).unwrap();
                let reader = t.reader(Some(&tok)).unwrap();
                let eos = tok.eos_id().unwrap();
                let mut seen = std::collections::BTreeSet::new();
                for seed in 0..20 {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    let mut f = compiled.follow();
                    let mut text = String::new();
                    let mut first = None;
                    while !f.is_finished() {
                        let allowed = f.allowed().unwrap();
                        let ids: Vec<u32> = (0..allowed.len() as u32 * 32)
                            .filter(|&i| allows(&allowed, i))
                            .collect();
                        let id = ids[rng.random_range(0..ids.len())];
                        f.commit(id).unwrap();
                        if id == eos {
                            break;
                        }
                        first.get_or_insert(id);
                        text.push_str(&reader.spell(id, &tok.decode(&[id], true).unwrap()));
                    }
                    if marker {
                        assert_eq!(first, marker_id, "the special token opens the calls: {text}");
                    }
                    let calls = reader.calls(&text).unwrap_or_else(|| panic!("not calls: {text}"));
                    assert!(parallel || calls.len() == 1, "{text}");
                    for c in calls {
                        assert!(parallel || c.name == "set-alarm", "{text}");
                        let args: Value = serde_json::from_str(&c.arguments).unwrap();
                        assert!(jsonschema::is_valid(&schemas(&c.name), &args), "{text}");
                        seen.insert(c.name);
                    }
                }
                assert_eq!(seen.len(), if parallel { 2 } else { 1 }, "{seen:?}");
            }
        }
    }

    #[test]
    fn message_tool_fields_are_checked() {
        let call = json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}});
        let (calls, id) = message_fields(1, "assistant", &json!({"tool_calls": [call]})).unwrap();
        assert_eq!(
            (calls, id),
            (
                vec![ToolCall {
                    id: "call_1".into(),
                    name: "f".into(),
                    arguments: "{\"a\": 1}".into()
                }],
                None
            )
        );
        let (calls, id) = message_fields(2, "tool", &json!({"tool_call_id": "call_1", "content": "x"})).unwrap();
        assert_eq!((calls.len(), id.as_deref()), (0, Some("call_1")));
        let cases = [
            ("tool", json!({"content": "x"}), "messages[3].tool_call_id is required"),
            (
                "tool",
                json!({"tool_call_id": ""}),
                "messages[3].tool_call_id is required",
            ),
            ("user", json!({"tool_call_id": "a"}), "only tool messages"),
            ("user", json!({"tool_calls": [call]}), "only assistant messages"),
            ("assistant", json!({"tool_calls": call}), "must be a list"),
            (
                "assistant",
                json!({"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}),
                "messages[3].tool_calls[0] must be",
            ),
            (
                "assistant",
                json!({"tool_calls": [{"id": "c", "type": "code", "function": {"name": "f", "arguments": "{}"}}]}),
                "messages[3].tool_calls[0] must be",
            ),
            (
                "assistant",
                json!({"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}),
                "messages[3].tool_calls[0].function.arguments must be a JSON object",
            ),
        ];
        for (role, x, want) in cases {
            let e = message_fields(3, role, &x).unwrap_err();
            assert_eq!(e.field, "messages");
            assert!(e.message.contains(want), "{role} {x}: {}", e.message);
        }
    }
}
