//! OpenAI tool calling end to end, on the "odd" reference model (random-like weights):
//! a required or named call is always a well-formed call to a declared function whose
//! arguments validate against its schema, whole or streamed; tools reach the prompt
//! (or not, with `tool_choice: "none"`) as the Mistral format writes them; a
//! conversation's calls and results are accepted; bad tool fields are refused by name.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use support::cluster::{Cluster, ClusterSpec};
use support::http::post_json;
use support::*;

/// Room for a full turn of 32 calls (about 40 tokens each) after the prompt, within
/// odd's context of 2048: a model this small may well keep calling until the grammar
/// closes the list.
const MAX_TOKENS: u64 = 1500;

fn odd_cluster() -> Cluster {
    Cluster::start(ClusterSpec {
        model: Some(&ref_model("odd")),
        ..Default::default()
    })
}

/// Bounded schemas (enums, integer ranges, short patterned strings), so that even
/// random weights finish a call well within the token budget.
fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city for the next days",
            "parameters": {"type": "object", "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                "required": ["city", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "set-alarm",
            "parameters": {"type": "object", "properties": {
                "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                "label": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
                "required": ["hour", "label"], "additionalProperties": false}}}
    ])
}

/// Each declared function's parameter schema, by name.
fn schemas() -> BTreeMap<String, Value> {
    tools()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let f = &t["function"];
            (f["name"].as_str().unwrap().to_string(), f["parameters"].clone())
        })
        .collect()
}

fn question() -> Value {
    json!([{"role": "user", "content": "What is the weather in Paris, and wake me at six?"}])
}

/// `(name, arguments)` of a call, after checking it is one of OpenAI's shape to a
/// declared function with arguments its schema accepts.
fn checked_call(call: &Value, context: &str) -> (String, Value) {
    let id = call["id"].as_str().unwrap_or_else(|| panic!("no id: {context}"));
    // Mistral's templates take back only ids of nine alphanumerics.
    assert!(
        id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "id {id}: {context}"
    );
    assert_eq!(call["type"], "function", "{context}");
    let name = call["function"]["name"].as_str().unwrap().to_string();
    let schema = schemas()
        .remove(&name)
        .unwrap_or_else(|| panic!("{name} was not declared: {context}"));
    let text = call["function"]["arguments"]
        .as_str()
        .unwrap_or_else(|| panic!("arguments are not a string: {context}"));
    let arguments: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("arguments {text:?} are not JSON ({e}): {context}"));
    let errors: Vec<String> = jsonschema::validator_for(&schema)
        .unwrap()
        .iter_errors(&arguments)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{name}({arguments}) breaks its schema: {errors:?}: {context}"
    );
    (name, arguments)
}

#[test]
fn required_calls_are_always_well_formed_calls_to_declared_functions() {
    let cluster = odd_cluster();
    let rt = rt();
    rt.block_on(async {
        let mut names = BTreeMap::<String, usize>::new();
        let mut counts = BTreeMap::<usize, usize>::new();
        for seed in 0..20u64 {
            // Half ask for one call only.
            let parallel = seed % 2 == 0;
            let body = json!({"messages": question(), "tools": tools(), "tool_choice": "required",
                              "parallel_tool_calls": parallel, "temperature": 1, "seed": seed,
                              "max_tokens": MAX_TOKENS});
            let (status, text) = post_json(&cluster.http_addr, "/v1/chat/completions", &[], &body).await;
            let context = format!("seed {seed}: {text}\n{}", cluster.logs());
            assert_eq!(status, 200, "{context}");
            let v: Value = serde_json::from_str(&text).unwrap();
            let choice = &v["choices"][0];
            assert_eq!(choice["finish_reason"], "tool_calls", "{context}");
            assert_eq!(choice["message"]["role"], "assistant", "{context}");
            assert_eq!(choice["message"]["content"], Value::Null, "{context}");
            let calls = choice["message"]["tool_calls"].as_array().unwrap();
            assert!(!calls.is_empty(), "{context}");
            if !parallel {
                assert_eq!(calls.len(), 1, "parallel_tool_calls is false: {context}");
            }
            assert!(calls.len() <= 32, "a turn holds at most 32 calls: {context}");
            *counts.entry(calls.len()).or_default() += 1;
            for call in calls {
                *names.entry(checked_call(call, &context).0).or_default() += 1;
            }
            assert!(
                v["usage"]["completion_tokens"].as_u64().unwrap() < MAX_TOKENS,
                "{context}"
            );
        }
        // The grammar leaves the model its choice of function.
        assert_eq!(names.len(), 2, "{names:?}");
        eprintln!("calls per answer: {counts:?}; functions: {names:?}");
    });
}

/// A streamed answer's calls, put together from their deltas as OpenAI's clients do,
/// and its finish reason; checks that no text was streamed.
fn streamed_calls(body: &str) -> (Vec<Value>, Value, Vec<u32>) {
    let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let mut calls: Vec<Value> = Vec::new();
    let mut finish = Value::Null;
    let mut ids = Vec::new();
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        assert!(
            choice["delta"]["content"].as_str().unwrap_or_default().is_empty(),
            "text streamed: {body}"
        );
        ids.extend(
            choice["token_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| x.as_u64().unwrap() as u32),
        );
        for delta in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = delta["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                assert!(
                    delta["id"].is_string() && delta["function"]["name"].is_string(),
                    "{body}"
                );
                assert_eq!(delta["function"]["arguments"], "", "{body}");
                calls.push(json!({"id": delta["id"], "type": delta["type"],
                                  "function": {"name": delta["function"]["name"], "arguments": ""}}));
            } else {
                let args = delta["function"]["arguments"].as_str().unwrap();
                let call = &mut calls[i]["function"]["arguments"];
                *call = json!(format!("{}{args}", call.as_str().unwrap()));
            }
        }
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    (calls, finish, ids)
}

#[test]
fn a_named_call_streams_as_it_comes_whole() {
    let cluster = odd_cluster();
    let rt = rt();
    rt.block_on(async {
        for seed in [3u64, 11] {
            let body = json!({"messages": question(), "tools": tools(), "seed": seed, "temperature": 1,
                              "tool_choice": {"type": "function", "function": {"name": "set-alarm"}},
                              "max_tokens": MAX_TOKENS, "return_token_ids": true});
            let (status, text) = post_json(&cluster.http_addr, "/v1/chat/completions", &[], &body).await;
            assert_eq!(status, 200, "{text}");
            let whole: Value = serde_json::from_str(&text).unwrap();
            let choice = &whole["choices"][0];
            assert_eq!(choice["finish_reason"], "tool_calls", "{text}");
            let calls = choice["message"]["tool_calls"].as_array().unwrap();
            let whole_calls: Vec<(String, Value)> = calls.iter().map(|c| checked_call(c, &text)).collect();
            assert!(whole_calls.iter().all(|(name, _)| name == "set-alarm"), "{text}");

            let mut sbody = body.clone();
            sbody["stream"] = json!(true);
            let (status, stream) = post_json(&cluster.http_addr, "/v1/chat/completions", &[], &sbody).await;
            assert_eq!(status, 200, "{stream}");
            let (calls, finish, ids) = streamed_calls(&stream);
            assert_eq!(finish, "tool_calls", "{stream}");
            let streamed: Vec<(String, Value)> = calls.iter().map(|c| checked_call(c, &stream)).collect();
            assert_eq!(streamed, whole_calls, "the same seed makes the same calls");
            assert_eq!(json!(ids), choice["token_ids"], "every token is streamed: {stream}");
        }
    });
}

#[test]
fn tools_reach_the_prompt_unless_none_and_conversations_carry_calls() {
    let model = ref_model("odd");
    let cluster = odd_cluster();
    let tok = sirocco_tokenizer::Tokenizer::from_file(&model.join("tokenizer.json")).unwrap();
    let rt = rt();
    rt.block_on(async {
        let conversation = json!([
            {"role": "user", "content": "Weather in Lima?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_0123456789", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Lima\", \"days\": 2}"}}]},
            {"role": "tool", "tool_call_id": "call_0123456789", "content": "{\"sky\": \"clear\"}"},
        ]);
        let prompt_tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
        let mut prompts = BTreeMap::new();
        for choice in ["auto", "none"] {
            let body = json!({"messages": conversation, "tools": tools(), "tool_choice": choice,
                              "max_tokens": 4, "temperature": 0});
            let (status, text) = post_json(&cluster.http_addr, "/v1/chat/completions", &[], &body).await;
            assert_eq!(status, 200, "{choice}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            if choice == "none" {
                let message = &v["choices"][0]["message"];
                assert!(message["content"].is_string() && message["tool_calls"].is_null(), "{text}");
                assert_ne!(v["choices"][0]["finish_reason"], "tool_calls", "{text}");
            }
            prompts.insert(choice, prompt_tokens(&v));
        }
        let history = concat!(
            r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lima", "days": 2}, "id": "123456789"}]</s>"#,
            r#"[TOOL_RESULTS] {"content": {"sky": "clear"}, "call_id": "123456789"}[/TOOL_RESULTS]"#,
        );
        let offered: Vec<Value> = tools().as_array().unwrap().to_vec();
        let with_tools = tok
            .encode(
                &format!(
                    "<s>[AVAILABLE_TOOLS] {}[/AVAILABLE_TOOLS][INST] Weather in Lima? [/INST]{history}",
                    python_json(&json!(offered))
                ),
                false,
            )
            .unwrap();
        let without = tok
            .encode(&format!("<s>[INST] Weather in Lima? [/INST]{history}"), false)
            .unwrap();
        assert_eq!(prompts["auto"], with_tools.len(), "the Mistral format, tools listed");
        assert_eq!(prompts["none"], without.len(), "with tool_choice none, no tools");
    });
}

/// JSON spelled as Python's `json.dumps` (`", "` and `": "`), for the values used here:
/// no string holds a quote, comma or colon.
fn python_json(v: &Value) -> String {
    let compact = v.to_string();
    let mut out = String::new();
    let mut in_string = false;
    for c in compact.chars() {
        out.push(c);
        match c {
            '"' => in_string = !in_string,
            ',' | ':' if !in_string => out.push(' '),
            _ => {}
        }
    }
    out
}

#[test]
fn bad_tool_fields_are_refused_by_name() {
    let cluster = odd_cluster();
    let rt = rt();
    rt.block_on(async {
        let weather = tools()[0].clone();
        let cases = [
            (
                json!({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}),
                "tools[0].function.name",
            ),
            (json!({"tools": [weather, weather]}), "tools[1].function.name"),
            (json!({"tools": [weather], "tool_choice": "sometimes"}), "tool_choice"),
            (
                json!({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "set-alarm"}}}),
                "tool_choice",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": [weather], "tool_choice": "required",
                       "response_format": {"type": "json_object"}}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather], "messages": [{"role": "user", "content": "a"},
                       {"role": "tool", "content": "r"}]}),
                "messages",
            ),
        ];
        for (mut body, param) in cases {
            if body.get("messages").is_none() {
                body["messages"] = question();
            }
            let (status, text) = post_json(&cluster.http_addr, "/v1/chat/completions", &[], &body).await;
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
            assert_eq!(
                (status, v["error"]["param"].as_str()),
                (400, Some(param)),
                "{body}: {text}"
            );
        }
        // Completions have no tools.
        let body = json!({"prompt": "x", "tools": tools()});
        let (status, text) = post_json(&cluster.http_addr, "/v1/completions", &[], &body).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("\"param\":\"tools\""), "{text}");
    });
}
