//! The Python example clients in examples/python against a live router on the "odd"
//! reference model: `grpc_client.py` (stubs generated from proto/) on the gRPC API, and
//! `openai_client.py` (the official `openai` package) on the OpenAI-compatible HTTP API.
//! scripts/python-env.sh makes the virtual environment (.venv) and the stubs; these
//! tests fail, not skip, when it cannot (no python3, no venv module, no PyPI).

mod support;

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use support::cluster::{Cluster, ClusterSpec};
use support::requests::generate_alone;
use support::{python, ref_model, repo_root};

/// Runs `examples/python/<script> args...`: (success, stdout, stderr).
fn run_example(script: &str, args: &[&str]) -> (bool, String, String) {
    let path = repo_root().join("examples/python").join(script);
    let out = Command::new(python())
        .arg(&path)
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("SIROCCO_API_KEY")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JSON object an example prints with --json, which must exit with `ok`.
fn example_json(cluster: &Cluster, script: &str, args: &[&str], ok: bool) -> Value {
    let (success, stdout, stderr) = run_example(script, args);
    let context = || {
        format!(
            "{script} {args:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- cluster\n{}",
            cluster.logs()
        )
    };
    assert_eq!(success, ok, "exit status of {}", context());
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("output is not one JSON object ({e}): {}", context()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array of token ids: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn odd_cluster(model: &Path, router_args: Vec<String>) -> Cluster {
    Cluster::start(ClusterSpec {
        model: Some(model),
        router_args,
        ..Default::default()
    })
}

#[test]
fn grpc_client_streams_what_generate_alone_gives() {
    let model = ref_model("odd");
    let expected = generate_alone(&model, &[1, 5, 9], 8);
    let cluster = odd_cluster(&model, Vec::new());
    let addr = cluster.router_addr.as_str();

    let base = ["--addr", addr, "--max-new-tokens", "8", "--ignore-eos", "--json"];
    let out = example_json(
        &cluster,
        "grpc_client.py",
        &[&base[..], &["--token-ids", "1,5,9"]].concat(),
        true,
    );
    assert_eq!(ids(&out["token_ids"]), expected, "{out}");
    assert_eq!(out["generated_tokens"], 8, "{out}");
    assert_eq!(out["prompt_tokens"], 3, "{out}");
    assert_eq!(out["finish_reason"], "length", "{out}");
    assert!(out["text"].is_string(), "{out}");

    // ModelInfo, and Tokenize of the text prompt used next.
    let prompt = "The wind that blows";
    let info = example_json(
        &cluster,
        "grpc_client.py",
        &["--addr", addr, "--info", "--prompt", prompt],
        true,
    );
    assert_eq!(info["model_info"]["vocab_size"], 1000, "{info}");
    assert_eq!(info["model_info"]["tp"], 2, "{info}");
    let prompt_ids = ids(&info["tokenize"]["ids"]);
    assert!(!prompt_ids.is_empty(), "{info}");

    // A text prompt: the router tokenizes it as Tokenize does.
    let out = example_json(
        &cluster,
        "grpc_client.py",
        &[&base[..], &["--prompt", prompt]].concat(),
        true,
    );
    assert_eq!(out["prompt_tokens"], prompt_ids.len(), "{out}");
    assert_eq!(out["generated_tokens"], 8, "{out}");
    assert_eq!(ids(&out["token_ids"]), generate_alone(&model, &prompt_ids, 8), "{out}");
}

/// Whether the router serves POST /v1/completions (anything but 404/405).
fn has_openai_api(http_addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(http_addr) else {
        return false;
    };
    let body = "{}";
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {http_addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut resp = String::new();
    if s.write_all(req.as_bytes()).is_err() || s.read_to_string(&mut resp).is_err() {
        return false;
    }
    let status = resp.split_whitespace().nth(1).unwrap_or_default();
    !matches!(status, "" | "404" | "405")
}

#[test]
fn openai_client_completions_and_chat() {
    let model = ref_model("odd");
    let expected = generate_alone(&model, &[1, 5, 9], 8);
    let cluster = odd_cluster(&model, Vec::new());
    let addr = cluster.http_addr.as_str();
    assert!(
        has_openai_api(addr),
        "the router's HTTP server ({addr}) has no POST /v1/completions:\n{}",
        cluster.logs()
    );
    let extra = json!({"ignore_eos": true, "return_token_ids": true}).to_string();
    let common = ["--addr", addr, "--max-tokens", "8", "--temperature", "0", "--json"];
    let run = |args: &[&str], ok: bool| example_json(&cluster, "openai_client.py", &[&common[..], args].concat(), ok);

    // Completions, prompt as token ids, not streamed.
    let full = run(&["--token-ids", "1,5,9", "--extra-body", &extra], true);
    assert_eq!(full["object"], "text_completion", "{full}");
    let choice = &full["choices"][0];
    assert_eq!(ids(&choice["token_ids"]), expected, "{full}");
    assert_eq!(choice["finish_reason"], "length", "{full}");
    let text = choice["text"].as_str().unwrap();
    assert_eq!(full["usage"]["prompt_tokens"], 3, "{full}");
    assert_eq!(full["usage"]["completion_tokens"], 8, "{full}");
    assert_eq!(full["usage"]["total_tokens"], 11, "{full}");

    // The same streamed, with the usage chunk last.
    let streamed = run(&["--token-ids", "1,5,9", "--extra-body", &extra, "--stream"], true);
    assert_eq!(streamed["text"], text, "{streamed}");
    assert_eq!(streamed["finish_reason"], "length", "{streamed}");
    assert_eq!(streamed["usage"], full["usage"], "{streamed}");
    let chunks = streamed["chunks"].as_array().unwrap();
    let last = chunks.last().unwrap();
    assert_eq!(
        last["usage"], full["usage"],
        "the last chunk carries the usage: {streamed}"
    );
    assert_eq!(last["choices"], json!([]), "the usage chunk has no choices: {streamed}");
    assert_eq!(ids(&streamed["token_ids"]), expected, "{streamed}");

    // Chat, not streamed and streamed.
    let chat_args = [
        "--mode",
        "chat",
        "--prompt",
        "Hello",
        "--extra-body",
        r#"{"ignore_eos": true}"#,
    ];
    let chat = run(&chat_args, true);
    assert_eq!(chat["object"], "chat.completion", "{chat}");
    let message = &chat["choices"][0]["message"];
    assert_eq!(message["role"], "assistant", "{chat}");
    assert!(message["content"].is_string(), "{chat}");
    assert_eq!(chat["choices"][0]["finish_reason"], "length", "{chat}");
    assert_eq!(chat["usage"]["completion_tokens"], 8, "{chat}");
    let prompt_tokens = chat["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 1, "{chat}");
    assert_eq!(chat["usage"]["total_tokens"], prompt_tokens + 8, "{chat}");
    let chat_streamed = run(&[&chat_args[..], &["--stream"]].concat(), true);
    assert_eq!(chat_streamed["text"], message["content"], "{chat_streamed}");
    assert_eq!(chat_streamed["finish_reason"], "length", "{chat_streamed}");
    assert_eq!(chat_streamed["usage"], chat["usage"], "{chat_streamed}");

    // Unsupported parameters are refused, by name.
    for (mode, param, name) in [
        ("completion", r#"logit_bias={"5": 10}"#, "logit_bias"),
        (
            "chat",
            r#"functions=[{"name": "f", "parameters": {"type": "object"}}]"#,
            "functions",
        ),
    ] {
        let out = run(&["--mode", mode, "--prompt", "Hello", "--param", param], false);
        let error = &out["error"];
        assert!(
            matches!(
                error["type"].as_str(),
                Some("BadRequestError" | "UnprocessableEntityError")
            ),
            "{mode} with {param}: {out}"
        );
        assert!(
            error["message"].as_str().unwrap_or_default().contains(name),
            "the error names {name}: {out}"
        );
    }
}

#[test]
fn clients_send_the_api_key() {
    let model = ref_model("odd");
    let cluster = odd_cluster(&model, vec!["--api-key".into(), "sesame".into()]);

    let http = cluster.http_addr.as_str();
    let extra = r#"{"ignore_eos": true}"#;
    let args = [
        "--addr",
        http,
        "--token-ids",
        "1,5,9",
        "--max-tokens",
        "2",
        "--extra-body",
        extra,
        "--json",
    ];
    let out = example_json(
        &cluster,
        "openai_client.py",
        &[&args[..], &["--api-key", "sesame"]].concat(),
        true,
    );
    assert_eq!(out["usage"]["completion_tokens"], 2, "{out}");
    let out = example_json(
        &cluster,
        "openai_client.py",
        &[&args[..], &["--api-key", "wrong"]].concat(),
        false,
    );
    assert_eq!(out["error"]["type"], "AuthenticationError", "{out}");
    assert_eq!(out["error"]["status"], 401, "{out}");

    let grpc = cluster.router_addr.as_str();
    let args = [
        "--addr",
        grpc,
        "--token-ids",
        "1,5,9",
        "--max-new-tokens",
        "2",
        "--ignore-eos",
        "--json",
    ];
    let out = example_json(
        &cluster,
        "grpc_client.py",
        &[&args[..], &["--api-key", "sesame"]].concat(),
        true,
    );
    assert_eq!(out["generated_tokens"], 2, "{out}");
    let (ok, _, stderr) = run_example("grpc_client.py", &args);
    assert!(!ok && stderr.contains("UNAUTHENTICATED"), "without the key: {stderr}");
}

#[test]
fn openai_client_parses_required_and_named_tool_calls() {
    let model = ref_model("odd");
    let cluster = odd_cluster(&model, Vec::new());
    let addr = cluster.http_addr.as_str();
    // Strict, so that the client's stream helper parses the arguments too.
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "strict": true,
         "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 3}},
                        "required": ["city", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "strict": true,
         "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                        "required": ["zone"], "additionalProperties": false}}}
    ]);
    let schemas: std::collections::BTreeMap<&str, &Value> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["function"]["name"].as_str().unwrap(), &t["function"]["parameters"]))
        .collect();
    let tools_arg = tools.to_string();
    let common = [
        "--addr",
        addr,
        "--mode",
        "chat",
        "--prompt",
        "Weather in Paris?",
        "--tools",
        &tools_arg,
        // Room for a full turn of calls: a model this small may call until the
        // grammar closes the list (32 calls).
        "--max-tokens",
        "1500",
        "--temperature",
        "1",
        "--seed",
        "7",
        "--json",
    ];
    for choice in ["required", "get_time"] {
        let whole = example_json(
            &cluster,
            "openai_client.py",
            &[&common[..], &["--tool-choice", choice]].concat(),
            true,
        );
        let message = &whole["choices"][0]["message"];
        assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls", "{whole}");
        assert!(message["content"].is_null(), "{whole}");
        let calls = whole["calls"].as_array().unwrap();
        assert!(!calls.is_empty(), "{whole}");
        for call in calls {
            let name = call["name"].as_str().unwrap();
            assert!(choice == "required" || name == choice, "{whole}");
            let schema = schemas
                .get(name)
                .unwrap_or_else(|| panic!("{name} undeclared: {whole}"));
            assert!(jsonschema::is_valid(schema, &call["arguments"]), "{whole}");
        }
        let streamed = example_json(
            &cluster,
            "openai_client.py",
            &[&common[..], &["--tool-choice", choice, "--stream"]].concat(),
            true,
        );
        assert_eq!(streamed["finish_reason"], "tool_calls", "{streamed}");
        assert_eq!(streamed["text"], "", "{streamed}");
        let strip_ids = |calls: &Value| -> Vec<Value> {
            calls
                .as_array()
                .unwrap()
                .iter()
                .map(|c| json!([c["name"], c["arguments"]]))
                .collect()
        };
        assert_eq!(strip_ids(&streamed["calls"]), strip_ids(&whole["calls"]), "{streamed}");
        let arguments: Vec<&Value> = calls.iter().map(|c| &c["arguments"]).collect();
        assert_eq!(
            streamed["parsed_arguments"]
                .as_array()
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            arguments,
            "the stream helper parsed the arguments: {streamed}"
        );
        let events: Vec<&str> = streamed["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert!(events.contains(&"tool_calls.function.arguments.done"), "{events:?}");
    }
}

#[test]
fn openai_client_runs_a_batch_file_through_the_batch_api() {
    let model = ref_model("odd");
    let data = tempfile::tempdir().unwrap();
    let cluster = odd_cluster(&model, vec!["--data-dir".into(), data.path().display().to_string()]);
    let prompts = support::requests::prompts(12, 1000);
    let mut input: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({"custom_id": format!("p{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": true,
                            "return_token_ids": true}})
            .to_string()
        })
        .collect();
    input.push("not json".into());
    input.push(
        json!({"custom_id": "bad", "method": "POST", "url": "/v1/completions",
               "body": {"prompt": [1], "temperature": 5}})
        .to_string(),
    );
    let path = data.path().join("in.jsonl");
    std::fs::write(&path, input.join("\n") + "\n").unwrap();
    let out = example_json(
        &cluster,
        "openai_batch.py",
        &[
            "--addr",
            &cluster.http_addr,
            "--input",
            path.to_str().unwrap(),
            "--json",
        ],
        true,
    );
    let batch = &out["batch"];
    assert_eq!(batch["status"], "completed", "{out}");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 14, "completed": 12, "failed": 2}),
        "{out}"
    );
    assert_eq!(out["listed"], true, "{out}");
    assert_eq!(out["file"]["purpose"], "batch", "{out}");
    let results = out["output"].as_array().unwrap();
    assert_eq!(results.len(), 12, "{out}");
    for r in results {
        let i: usize = r["custom_id"].as_str().unwrap()[1..].parse().unwrap();
        let body = &r["response"]["body"];
        assert_eq!(r["response"]["status_code"], 200, "{r}");
        assert_eq!(
            ids(&body["choices"][0]["token_ids"]),
            generate_alone(&model, &prompts[i], 6),
            "{r}"
        );
    }
    let errors = out["errors"].as_array().unwrap();
    let malformed = errors.iter().find(|e| e["line"] == 13).expect("line 13's error");
    assert!(
        malformed["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 13: not JSON"),
        "{malformed}"
    );
    let bad = errors
        .iter()
        .find(|e| e["custom_id"] == "bad")
        .expect("the bad body's answer");
    assert_eq!(bad["response"]["status_code"], 400, "{bad}");
    assert_eq!(bad["response"]["body"]["error"]["param"], "temperature", "{bad}");
}
