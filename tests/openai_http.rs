//! The OpenAI-compatible HTTP API's own behaviour, beyond what the official client
//! tests cover: greedy results equal `sirocco generate`, streaming equals
//! non-streaming, errors have OpenAI's shape and fitting status codes, chat
//! conversations are checked, and the API key guards HTTP and gRPC.

mod support;

use serde_json::{json, Value};
use support::cluster::{Cluster, ClusterSpec};
use support::http::{get, post_json};
use support::requests::*;
use support::*;

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
        .collect()
}

fn error_of(status: u16, body: &str) -> (u16, Value) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    (status, v["error"].clone())
}

#[test]
fn completions_match_generate_and_streaming_matches_whole() {
    let model = ref_model("odd");
    let cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        ..Default::default()
    });
    let expected = generate_alone(&model, &[1, 5, 9], 12);
    let rt = rt();
    let addr = cluster.http_addr.clone();
    rt.block_on(async {
        let body = json!({"model": "odd", "prompt": [1, 5, 9], "max_tokens": 12, "temperature": 0,
                          "ignore_eos": true, "return_token_ids": true});
        let (status, text) = post_json(&addr, "/v1/completions", &[], &body).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let ids: Vec<u32> = serde_json::from_value(v["choices"][0]["token_ids"].clone()).unwrap();
        assert_eq!(ids, expected);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );
        let whole = v["choices"][0]["text"].as_str().unwrap().to_string();

        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        sbody["stream_options"] = json!({"include_usage": true});
        let (status, text) = post_json(&addr, "/v1/completions", &[], &sbody).await;
        assert_eq!(status, 200);
        let data = sse_data(&text);
        assert_eq!(data.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0).and_then(|x| x["text"].as_str()).map(str::to_owned))
            .collect();
        assert_eq!(streamed, whole);
        let streamed_ids: Vec<u32> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0).and_then(|x| x.get("token_ids")).and_then(|t| t.as_array().cloned()))
            .flatten()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(streamed_ids, expected);
        let last = chunks.last().unwrap();
        assert_eq!(last["usage"]["completion_tokens"], 12);
        assert!(chunks.iter().any(|c| c["choices"].get(0).is_some_and(|x| x["finish_reason"] == "length")));

        // Chat: the Mistral format (odd ships no chat_template), streaming and not.
        let chat = json!({"model": "odd", "messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0, "ignore_eos": true});
        let (status, text) = post_json(&addr, "/v1/chat/completions", &[], &chat).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["usage"]["completion_tokens"], 6);
        let tok = sirocco_tokenizer::Tokenizer::from_file(&model.join("tokenizer.json")).unwrap();
        let prompt = tok.encode("<s>[INST] Be brief.\n\nHello [/INST]", false).unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], prompt.len());

        // The same conversation over gRPC: the same prompt, the same answer.
        let grpc_chat = sirocco_proto::v1::GenerateRequest {
            input: Some(sirocco_proto::v1::generate_request::Input::Chat(sirocco_proto::v1::Chat {
                messages: [("system", "Be brief."), ("user", "Hello")]
                    .map(|(role, content)| sirocco_proto::v1::ChatMessage {
                        role: role.into(),
                        content: content.into(),
                    })
                    .to_vec(),
            })),
            parameters: Some(sirocco_proto::v1::SamplingParameters {
                max_new_tokens: Some(6),
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let (ids, fin) = stream_all(cluster.client().await, grpc_chat.clone()).await.unwrap();
        assert_eq!(fin.prompt_tokens as usize, prompt.len());
        let mut with_ids = chat.clone();
        with_ids["return_token_ids"] = json!(true);
        let (_, text) = post_json(&addr, "/v1/chat/completions", &[], &with_ids).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json!(ids), v["choices"][0]["token_ids"], "{text}");
        let mut empty = grpc_chat;
        empty.input = Some(sirocco_proto::v1::generate_request::Input::Chat(Default::default()));
        let e = stream_all(cluster.client().await, empty).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("input.chat"), "{}", e.message());

        let (status, body) = get(&addr, "/v1/models").await;
        assert_eq!(status, 200);
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["data"][0]["id"], "odd");
    });
}

#[test]
fn errors_have_openai_shape_and_status() {
    let model = ref_model("odd");
    let cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        ..Default::default()
    });
    let rt = rt();
    let addr = cluster.http_addr.clone();
    rt.block_on(async {
        let cases = [
            (json!({"prompt": "hi", "n": 0}), 400, "n"),
            (json!({"prompt": "hi", "logit_bias": {"5": 1}}), 400, "logit_bias"),
            (json!({"prompt": "hi", "frobnicate": 1}), 400, "frobnicate"),
            (json!({"prompt": "hi", "temperature": -1}), 400, "temperature"),
            (json!({"prompt": "hi", "top_p": 2}), 400, "top_p"),
            (json!({"prompt": "hi", "max_tokens": "many"}), 422, "max_tokens"),
            (json!({"model": "gpt-4", "prompt": "hi"}), 404, "gpt-4"),
            (json!({"prompt": [1, 5000]}), 400, "5000"),
        ];
        for (body, want, needle) in cases {
            let (status, text) = post_json(&addr, "/v1/completions", &[], &body).await;
            let (status, err) = error_of(status, &text);
            assert_eq!(status, want, "{body}: {err}");
            assert!(err["message"].as_str().unwrap().contains(needle), "{body}: {err}");
            assert!(err["type"].is_string());
        }
        let (status, text) = support::http::request(&addr, "POST", "/v1/completions", &[], "{not json").await;
        assert_eq!(error_of(status, &text).0, 422);
        let bad_chat = [
            json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]),
            json!([{"role": "assistant", "content": "a"}]),
            json!([]),
        ];
        for messages in bad_chat {
            let (status, text) = post_json(&addr, "/v1/chat/completions", &[], &json!({"messages": messages})).await;
            let (status, err) = error_of(status, &text);
            assert_eq!(status, 400, "{err}");
            assert!(err["message"].as_str().unwrap().contains("messages"), "{err}");
        }
    });
}

#[test]
fn api_key_guards_http_and_grpc() {
    let model = ref_model("odd");
    let cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        router_args: vec!["--api-key".into(), "s3cret".into()],
        ..Default::default()
    });
    let rt = rt();
    let addr = cluster.http_addr.clone();
    rt.block_on(async {
        let body = json!({"prompt": [1, 5], "max_tokens": 2});
        let (status, _) = post_json(&addr, "/v1/completions", &[], &body).await;
        assert_eq!(status, 401);
        let (status, _) = post_json(&addr, "/v1/completions", &[("Authorization", "Bearer nope")], &body).await;
        assert_eq!(status, 401);
        let (status, text) = post_json(&addr, "/v1/completions", &[("Authorization", "Bearer s3cret")], &body).await;
        assert_eq!(status, 200, "{text}");
        // Health and metrics stay open for probes and scrapers.
        assert_eq!(get(&addr, "/ready").await.0, 200);

        let mut c = cluster.client().await;
        let err = c.generate(ids_request(&[1, 5], 2)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut req = tonic::Request::new(ids_request(&[1, 5], 2));
        req.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        let answered = c.generate(req).await;
        assert!(answered.is_ok(), "{answered:?}");
    });
}
