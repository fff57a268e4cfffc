//! Structured output end to end, on real router and shard processes: with a
//! constraint, every output the random-weight models produce parses and validates
//! (JSON Schemas checked by a JSON Schema validator, choices, regexes, a Lark
//! grammar), over both APIs and with tensor parallelism; bad constraints are refused
//! before they are queued, naming the field; a constraint cut off by the token limit
//! ends with `length`; unconstrained requests batched beside constrained ones get
//! exactly what they get alone; the metrics count it all.

mod support;

use serde_json::{json, Value};
use sirocco_proto::v1 as pb;
use support::cluster::{Cluster, ClusterSpec};
use support::http::{get, post_json, samples, sum};
use support::ref_model;
use support::requests::{connect, stream_all};

/// The schemas every output is held to (tests/data/structured/schemas.json, the
/// set listed on the issue; the structured crate's random walks use it too).
fn schemas() -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/structured/schemas.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Sends `bodies` to `path` all at once (so that they share batches); returns each
/// answer's status and JSON body, in order.
async fn post_all(addr: &str, path: &str, bodies: Vec<Value>) -> Vec<(u16, Value)> {
    let handles: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let addr = addr.to_string();
            let path = path.to_string();
            tokio::spawn(async move {
                let (status, body) = post_json(&addr, &path, &[], &b).await;
                (status, serde_json::from_str(&body).unwrap_or(Value::Null))
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[test]
fn every_sample_validates_against_its_schema_over_openai() {
    let c = Cluster::start(ClusterSpec {
        tp: 1,
        ..Default::default()
    });
    let rt = support::rt();
    for schema in schemas() {
        let validator = jsonschema::validator_for(&schema).unwrap();
        // Half through response_format on chat, half through vLLM's guided_json on
        // completions.
        let bodies: Vec<(&str, Value)> = (0..50)
            .map(|seed| {
                if seed % 2 == 0 {
                    (
                        "/v1/chat/completions",
                        json!({"messages": [{"role": "user", "content": format!("Answer {seed}")}],
                               "max_tokens": 300, "temperature": 1.0, "seed": seed,
                               "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": true}}}),
                    )
                } else {
                    (
                        "/v1/completions",
                        json!({"prompt": format!("Answer {seed}:"), "max_tokens": 300, "temperature": 1.0,
                               "seed": seed, "guided_json": schema}),
                    )
                }
            })
            .collect();
        let chat: Vec<Value> = bodies
            .iter()
            .filter(|b| b.0.contains("chat"))
            .map(|b| b.1.clone())
            .collect();
        let plain: Vec<Value> = bodies
            .iter()
            .filter(|b| !b.0.contains("chat"))
            .map(|b| b.1.clone())
            .collect();
        let mut answers = rt.block_on(post_all(&c.http_addr, "/v1/chat/completions", chat));
        let chat_count = answers.len();
        answers.extend(rt.block_on(post_all(&c.http_addr, "/v1/completions", plain)));
        for (i, (status, body)) in answers.iter().enumerate() {
            assert_eq!(*status, 200, "{body}");
            let choice = &body["choices"][0];
            let text = if i < chat_count {
                choice["message"]["content"].as_str().unwrap()
            } else {
                choice["text"].as_str().unwrap()
            };
            assert_eq!(choice["finish_reason"], "stop", "{text:?} for {schema}");
            let v: Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON ({e}) for {schema}"));
            assert!(validator.is_valid(&v), "{text} does not validate against {schema}");
        }
    }
    let sent = 50.0 * schemas().len() as f64;
    let m = samples(&rt.block_on(get(&c.http_addr, "/metrics")).1);
    assert_eq!(
        sum(&m, "sirocco_structured_requests_total", &["kind=\"json_schema\""]),
        sent
    );
    assert!(sum(&m, "sirocco_structured_mask_seconds_count", &[]) > sent);
    assert_eq!(sum(&m, "sirocco_structured_compile_seconds_count", &[]), sent);
}

fn grpc_request(prompt: &str, seed: u64, max_new_tokens: u32, kind: pb::constraint::Kind) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Text(prompt.into())),
        parameters: Some(pb::SamplingParameters {
            max_new_tokens: Some(max_new_tokens),
            temperature: Some(1.0),
            seed: Some(seed),
            constraint: Some(pb::Constraint { kind: Some(kind) }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// gRPC constraints of every kind, on the odd reference model split over two
/// ranks (rank 0 samples under the mask the router sends both).
#[test]
fn grpc_choices_regexes_grammars_and_schemas_hold_with_tensor_parallelism() {
    use pb::constraint::Kind;
    let model = ref_model("odd");
    let c = Cluster::start(ClusterSpec {
        model: Some(&model),
        tp: 2,
        ..Default::default()
    });
    let tok = sirocco_tokenizer::Tokenizer::from_file(&model.join("tokenizer.json")).unwrap();
    let addr = format!("http://{}", c.router_addr);
    let rt = support::rt();
    let run = |reqs: Vec<pb::GenerateRequest>| -> Vec<Result<(String, pb::Finished), tonic::Status>> {
        rt.block_on(async {
            let client = connect(&addr).await.unwrap();
            let hs: Vec<_> = reqs
                .into_iter()
                .map(|r| tokio::spawn(stream_all(client.clone(), r)))
                .collect();
            let mut out = Vec::new();
            for h in hs {
                out.push(h.await.unwrap().map(|(ids, f)| (tok.decode(&ids, true).unwrap(), f)));
            }
            out
        })
    };
    let choices: Vec<String> = vec!["alpha".into(), "beta".into(), "gamma delta".into()];
    let reqs = (0..30)
        .map(|s| {
            grpc_request(
                "Pick one",
                s,
                50,
                Kind::Choice(pb::Choice {
                    choices: choices.clone(),
                }),
            )
        })
        .collect();
    for r in run(reqs) {
        let (text, f) = r.unwrap();
        assert!(choices.contains(&text), "{text:?}");
        assert_eq!(f.reason(), pb::FinishReason::Eos);
    }
    let reqs = (0..30)
        .map(|s| grpc_request("Code:", s, 50, Kind::Regex("[A-F]{2}-[0-9]{3}".into())))
        .collect();
    for r in run(reqs) {
        let (text, _) = r.unwrap();
        let (a, b) = text.split_once('-').unwrap_or_else(|| panic!("{text:?}"));
        assert!(a.len() == 2 && a.chars().all(|c| ('A'..='F').contains(&c)), "{text:?}");
        assert!(b.len() == 3 && b.chars().all(|c| c.is_ascii_digit()), "{text:?}");
    }
    let lark = "start: \"x = \" NUM \";\"\nNUM: /[1-9][0-9]?/";
    let reqs = (0..20)
        .map(|s| grpc_request("Set", s, 50, Kind::Lark(lark.into())))
        .collect();
    for r in run(reqs) {
        let (text, _) = r.unwrap();
        let n = text
            .strip_prefix("x = ")
            .and_then(|t| t.strip_suffix(';'))
            .unwrap_or_else(|| panic!("{text:?}"));
        assert!(n.parse::<u32>().is_ok_and(|n| (1..100).contains(&n)), "{text:?}");
    }
    for schema in schemas() {
        let validator = jsonschema::validator_for(&schema).unwrap();
        let reqs = (0..20)
            .map(|s| grpc_request("JSON:", s, 300, Kind::JsonSchema(schema.to_string())))
            .collect();
        for r in run(reqs) {
            let (text, f) = r.unwrap();
            assert_eq!(f.reason(), pb::FinishReason::Eos, "{text:?}");
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(validator.is_valid(&v), "{text} against {schema}");
        }
    }
    // Cut off by the limit: the output so far, finished by length.
    let schema = json!({"type": "array", "items": {"type": "integer"}, "minItems": 50});
    let r = run(vec![grpc_request("JSON:", 1, 5, Kind::JsonSchema(schema.to_string()))]);
    let (text, f) = r.into_iter().next().unwrap().unwrap();
    assert_eq!(f.reason(), pb::FinishReason::Length);
    assert!(text.starts_with('['), "{text:?}");
}

#[test]
fn bad_constraints_are_refused_naming_the_field_before_queueing() {
    use pb::constraint::Kind;
    let c = Cluster::start(ClusterSpec {
        tp: 1,
        ..Default::default()
    });
    let rt = support::rt();
    let addr = format!("http://{}", c.router_addr);
    let bad = [
        Kind::JsonSchema("{not json".into()),
        Kind::JsonSchema(r#"{"type": "integer", "minimum": 5, "maximum": 1}"#.into()),
        Kind::JsonSchema("[1, 2]".into()),
        Kind::Regex("(unclosed".into()),
        Kind::Choice(pb::Choice { choices: vec![] }),
        Kind::Lark("start: missing_rule".into()),
        Kind::Regex("a".repeat(300 << 10)),
    ];
    for kind in bad {
        let shown = format!("{kind:?}").chars().take(80).collect::<String>();
        let err = rt
            .block_on(async { stream_all(connect(&addr).await.unwrap(), grpc_request("x", 1, 10, kind)).await })
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{shown}: {err:?}");
        assert!(
            err.message().starts_with("parameters.constraint: "),
            "{shown}: {}",
            err.message()
        );
    }
    let http_bad = [
        (json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_json": {"type": "nope"}}), "guided_json"),
        (
            json!({"structured_outputs": {"grammar": "start: missing"}}),
            "structured_outputs",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 5, "maxLength": 2}}}}),
            "response_format",
        ),
    ];
    for (extra, field) in http_bad {
        let mut body = json!({"prompt": "x", "max_tokens": 5});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, text) = rt.block_on(post_json(&c.http_addr, "/v1/completions", &[], &body));
        assert_eq!(status, 400, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], field, "{text}");
    }
    // Refused before the queue: none was admitted, none generated a token.
    let m = samples(&rt.block_on(get(&c.http_addr, "/metrics")).1);
    assert_eq!(sum(&m, "sirocco_queue_time_seconds_count", &[]), 0.0);
    assert_eq!(sum(&m, "sirocco_generated_tokens_total", &[]), 0.0);
    assert_eq!(sum(&m, "sirocco_structured_requests_total", &[]), 0.0);
}

/// Masks are per sequence: unconstrained requests batched with constrained ones
/// decode exactly as they do alone.
#[test]
fn unconstrained_neighbours_are_untouched() {
    let c = Cluster::start(ClusterSpec {
        tp: 1,
        ..Default::default()
    });
    let rt = support::rt();
    let plain =
        |i: usize| json!({"prompt": format!("Story {i}:"), "max_tokens": 24, "temperature": 0.0, "ignore_eos": true});
    let alone: Vec<Value> = (0..4)
        .map(|i| {
            rt.block_on(post_all(&c.http_addr, "/v1/completions", vec![plain(i)]))
                .remove(0)
                .1
        })
        .collect();
    let mut bodies = Vec::new();
    for i in 0..4 {
        bodies.push(plain(i));
        bodies.push(
            json!({"prompt": format!("JSON {i}:"), "max_tokens": 200, "temperature": 1.0, "seed": i,
                           "guided_json": schemas()[0]}),
        );
    }
    let together = rt.block_on(post_all(&c.http_addr, "/v1/completions", bodies));
    for i in 0..4 {
        assert_eq!(
            together[2 * i].1["choices"][0]["text"],
            alone[i]["choices"][0]["text"],
            "request {i} changed beside constrained ones"
        );
        assert_eq!(together[2 * i + 1].1["choices"][0]["finish_reason"], "stop");
    }
}
