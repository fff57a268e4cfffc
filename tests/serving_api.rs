//! The router's public API against real processes (router and shards on 127.0.0.1):
//! request validation that names the field and its range, the bounded queue,
//! streaming detokenization with the real Mistral tokenizer, Tokenize and ModelInfo,
//! stop tokens and stop sequences, and gRPC health and reflection (v1 and v1alpha).

mod support;

use candle_core::{Device, Tensor};
use serde_json::Value;
use sirocco_model::MistralConfig;
use sirocco_proto::v1 as pb;
use sirocco_proto::v1::generate_stream_response::Event;
use sirocco_proto::v1::sirocco_client::SiroccoClient;
use sirocco_tokenizer::Tokenizer;
use std::collections::{HashMap, HashSet};

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::cluster::{generated_model, Cluster, ClusterSpec, LogsOnPanic};
use support::*;
use tonic::transport::Channel;
use tonic::Code;

type Client = SiroccoClient<Channel>;

const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

fn odd_cluster(router_args: &[&str]) -> Cluster {
    Cluster::start(ClusterSpec {
        model: Some(&ref_model("odd")),
        tp: 2,
        router_args: router_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

fn odd_tokenizer() -> Tokenizer {
    Tokenizer::from_file(&ref_model("odd").join("tokenizer.json")).unwrap()
}

fn ids_req(ids: &[u32], parameters: pb::SamplingParameters) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
            ids: ids.to_vec(),
        })),
        parameters: Some(parameters),
        ..Default::default()
    }
}

fn text_req(text: &str, parameters: pb::SamplingParameters) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Text(text.into())),
        parameters: Some(parameters),
        ..Default::default()
    }
}

/// Greedy, `n` tokens, EOS ignored.
fn greedy(n: u32) -> pb::SamplingParameters {
    pb::SamplingParameters {
        max_new_tokens: Some(n),
        ignore_eos: true,
        ..Default::default()
    }
}

/// A whole GenerateStream: its token events and the final event.
struct Streamed {
    tokens: Vec<pb::Token>,
    finished: pb::Finished,
}

impl Streamed {
    fn text(&self) -> String {
        self.tokens.iter().map(|t| t.text.as_str()).collect()
    }

    fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.id).collect()
    }
}

async fn stream(c: &mut Client, req: pb::GenerateRequest) -> Result<Streamed, tonic::Status> {
    let mut s = c.generate_stream(req).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(m) = s.message().await? {
        match m.event.expect("an event") {
            Event::Token(t) => tokens.push(t),
            Event::Finished(finished) => {
                assert!(s.message().await?.is_none(), "events after Finished");
                return Ok(Streamed { tokens, finished });
            }
        }
    }
    panic!("the stream ended without a Finished event");
}

fn reason(f: &pb::Finished) -> pb::FinishReason {
    pb::FinishReason::try_from(f.reason).unwrap()
}

/// The text that generating `gen` after `prompt` adds: `decode(prompt ++ gen)` minus
/// `decode(prompt)`, special tokens skipped.
fn added_text(tok: &Tokenizer, prompt: &[u32], gen: &[u32]) -> String {
    let all: Vec<u32> = prompt.iter().chain(gen).copied().collect();
    let full = tok.decode(&all, true).unwrap();
    let before = tok.decode(prompt, true).unwrap();
    full.strip_prefix(before.as_str())
        .unwrap_or_else(|| panic!("decode({prompt:?}) = {before:?} is not a prefix of {full:?}"))
        .to_string()
}

#[test]
fn invalid_requests_name_the_field_and_range_and_the_router_keeps_serving() {
    let cluster = odd_cluster(&["--max-new-tokens-limit", "512"]);
    let _logs = LogsOnPanic(&cluster);
    block_on(async {
        let mut c = cluster.client().await;
        let p = pb::SamplingParameters::default;
        let ok_ids = [5, 6, 7];
        let with = |params: pb::SamplingParameters| ids_req(&ok_ids, params);
        let cases: Vec<(&str, pb::GenerateRequest, &[&str])> = vec![
            ("empty text", text_req("", p()), &["input.text", "empty"]),
            ("empty token_ids", ids_req(&[], p()), &["input.token_ids", "empty"]),
            (
                "no input",
                pb::GenerateRequest {
                    parameters: Some(p()),
                    ..Default::default()
                },
                &["input", "text", "token_ids"],
            ),
            (
                "token id out of vocabulary",
                ids_req(&[5, 1000, 6], p()),
                &["input.token_ids", "1000", "[0, 1000)"],
            ),
            (
                "over the context",
                ids_req(
                    &vec![5; 2000],
                    pb::SamplingParameters {
                        max_new_tokens: Some(100),
                        ..p()
                    },
                ),
                &["max_new_tokens", "2100", "context limit of 2048"],
            ),
            (
                "max_new_tokens 0",
                with(pb::SamplingParameters {
                    max_new_tokens: Some(0),
                    ..p()
                }),
                &["parameters.max_new_tokens", "[1, 512]", "got 0"],
            ),
            (
                "max_new_tokens over --max-new-tokens-limit",
                with(pb::SamplingParameters {
                    max_new_tokens: Some(513),
                    ..p()
                }),
                &["parameters.max_new_tokens", "[1, 512]", "got 513"],
            ),
            (
                "negative temperature",
                with(pb::SamplingParameters {
                    temperature: Some(-0.5),
                    ..p()
                }),
                &["parameters.temperature", ">= 0"],
            ),
            (
                "NaN temperature",
                with(pb::SamplingParameters {
                    temperature: Some(f32::NAN),
                    ..p()
                }),
                &["parameters.temperature", ">= 0"],
            ),
            (
                "top_p 0",
                with(pb::SamplingParameters {
                    top_p: Some(0.0),
                    ..p()
                }),
                &["parameters.top_p", "(0, 1]"],
            ),
            (
                "top_p 1.5",
                with(pb::SamplingParameters {
                    top_p: Some(1.5),
                    ..p()
                }),
                &["parameters.top_p", "(0, 1]", "1.5"],
            ),
            (
                "min_p 2",
                with(pb::SamplingParameters {
                    min_p: Some(2.0),
                    ..p()
                }),
                &["parameters.min_p", "[0, 1]"],
            ),
            (
                "repetition_penalty 0",
                with(pb::SamplingParameters {
                    repetition_penalty: Some(0.0),
                    ..p()
                }),
                &["parameters.repetition_penalty", "> 0"],
            ),
            (
                "frequency_penalty 3",
                with(pb::SamplingParameters {
                    frequency_penalty: Some(3.0),
                    ..p()
                }),
                &["parameters.frequency_penalty", "[-2, 2]"],
            ),
            (
                "presence_penalty -3",
                with(pb::SamplingParameters {
                    presence_penalty: Some(-3.0),
                    ..p()
                }),
                &["parameters.presence_penalty", "[-2, 2]"],
            ),
            (
                "9 stop sequences",
                with(pb::SamplingParameters {
                    stop_sequences: (0..9).map(|i| format!("stop{i}")).collect(),
                    ..p()
                }),
                &["parameters.stop_sequences", "at most 8", "got 9"],
            ),
            (
                "empty stop sequence",
                with(pb::SamplingParameters {
                    stop_sequences: vec!["ok".into(), String::new()],
                    ..p()
                }),
                &["parameters.stop_sequences[1]", "1 to 256 bytes"],
            ),
            (
                "top_logprobs 21",
                with(pb::SamplingParameters {
                    top_logprobs: 21,
                    ..p()
                }),
                &["parameters.top_logprobs", "[0, 20]", "21"],
            ),
            (
                "stop token id out of vocabulary",
                with(pb::SamplingParameters {
                    stop_token_ids: vec![2, 1000],
                    ..p()
                }),
                &["parameters.stop_token_ids", "1000", "[0, 1000)"],
            ),
        ];
        for (name, req, words) in cases {
            let unary = c.generate(req.clone()).await.expect_err(name);
            let streamed = c
                .generate_stream(req)
                .await
                .err()
                .unwrap_or_else(|| panic!("{name}: stream accepted"));
            for (rpc, s) in [("Generate", unary), ("GenerateStream", streamed)] {
                assert_eq!(s.code(), Code::InvalidArgument, "{name} via {rpc}: {s:?}");
                for w in words {
                    assert!(
                        s.message().contains(w),
                        "{name} via {rpc}: {:?} lacks {w:?}",
                        s.message()
                    );
                }
            }
        }

        // The router still serves, by text and by ids, unary and streamed.
        let r = c
            .generate(text_req("Hello world", greedy(4)))
            .await
            .unwrap()
            .into_inner();
        let f = r.finished.unwrap();
        assert_eq!(
            (reason(&f), f.generated_tokens, r.tokens.len()),
            (pb::FinishReason::Length, 4, 4)
        );
        let s = stream(&mut c, ids_req(&ok_ids, greedy(4))).await.unwrap();
        assert_eq!((reason(&s.finished), s.tokens.len()), (pb::FinishReason::Length, 4));
        assert_eq!(s.finished.prompt_tokens, 3);
    });
}

#[test]
fn a_full_queue_refuses_at_once_and_the_router_recovers() {
    let cluster = odd_cluster(&["--max-batch-size", "1", "--max-queue", "2"]);
    let _logs = LogsOnPanic(&cluster);
    block_on(async {
        let mut c = cluster.client().await;
        // A long request takes the only batch slot.
        let mut long = c
            .generate_stream(ids_req(&[5, 6, 7], greedy(2000)))
            .await
            .unwrap()
            .into_inner();
        let first = long.message().await.unwrap().unwrap();
        assert!(matches!(first.event, Some(Event::Token(_))), "{first:?}");
        let long_done = Arc::new(AtomicBool::new(false));
        let done = long_done.clone();
        let long_task = tokio::spawn(async move {
            while let Ok(Some(m)) = long.message().await {
                if matches!(m.event, Some(Event::Finished(_))) {
                    done.store(true, Ordering::SeqCst);
                }
            }
        });

        // Six more: two fit the queue, four are refused.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..6u32 {
            let (mut c, tx) = (c.clone(), tx.clone());
            tokio::spawn(async move {
                let r = c.generate(ids_req(&[8 + i, 9], greedy(4))).await;
                let _ = tx.send(r.map(|r| r.into_inner()));
            });
        }
        for _ in 0..4 {
            let r = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(
                !long_done.load(Ordering::SeqCst),
                "a refusal waited for the long request to finish"
            );
            let s = r.expect_err("only two requests fit the queue");
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            assert!(s.message().contains("queue"), "{:?}", s.message());
        }
        assert!(
            rx.try_recv().is_err(),
            "a queued request finished while the batch was full"
        );

        // Cancelling the long request frees the slot: the queued two, then a new one, run.
        long_task.abort();
        for _ in 0..2 {
            let r = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .unwrap()
                .unwrap();
            let f = r
                .expect("a queued request runs once the slot is free")
                .finished
                .unwrap();
            assert_eq!((reason(&f), f.generated_tokens), (pb::FinishReason::Length, 4));
        }
        let s = stream(&mut c, ids_req(&[5, 6, 7], greedy(3))).await.unwrap();
        assert_eq!(s.tokens.len(), 3);
    });
}

fn byte_id(b: u8) -> u32 {
    3 + b as u32
}

/// Writes a small Mistral-shaped model over the real 32000-token Mistral tokenizer, with
/// embeddings and `lm_head` rewritten so that it can only generate a few word pieces and
/// the byte-fallback sequences of whole 3- and 4-byte characters, each such character
/// between word pieces. Returns the ids it can generate.
fn byte_fallback_model(dir: &Path, tokenizer: &Path, tok: &Tokenizer) -> HashSet<u32> {
    let (vocab, hidden) = (32000, 64);
    let config = MistralConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        sliding_window: Some(16),
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        torch_dtype: None,
    };
    generated_model(dir, &config, Some(tokenizer));

    for b in [0x00u8, 0x0A, 0x80, 0xF0, 0xFF] {
        assert_eq!(tok.id_to_piece(byte_id(b)).unwrap(), format!("<0x{b:02X}>"));
    }
    // Word pieces: "▁", "滑", "中", "🔥", "é", "▁and", U+FE0F.
    let words = [28705u32, 31062, 28991, 30590, 28797, 304, 29096];
    assert_eq!(tok.id_to_piece(31062).unwrap(), "滑");
    assert_eq!(tok.id_to_piece(304).unwrap(), "▁and");
    // 😀 F0 9F 98 80, 🌬 F0 9F 8C AC, 风 E9 A3 8E, 叠 E5 8F A0, ∫ E2 88 AB.
    let chars = ["😀", "🌬", "风", "叠", "∫"];
    let mut next: Vec<(u8, u8)> = Vec::new();
    let (mut starts, mut finals) = (Vec::new(), Vec::new());
    for c in chars {
        let b = c.as_bytes();
        starts.push(b[0]);
        finals.push(*b.last().unwrap());
        next.extend(b.windows(2).map(|w| (w[0], w[1])));
    }
    next.sort();
    next.dedup();
    let mut mids: Vec<u8> = next.iter().map(|&(a, _)| a).collect();
    mids.dedup();
    assert!(
        finals.iter().all(|f| !mids.contains(f)),
        "a byte both ends and continues a character"
    );

    // State dimensions: 0 any other token, 1 after a word piece, 2 after a character's
    // last byte, 3.. after each byte that a character continues.
    let mid_dim = |b: u8| 3 + mids.iter().position(|&m| m == b).unwrap();
    let mut t: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut embed: Vec<f32> = t["model.embed_tokens.weight"].flatten_all().unwrap().to_vec1().unwrap();
    let state = |id: u32| -> usize {
        if words.contains(&id) {
            1
        } else if finals.iter().any(|&f| byte_id(f) == id) {
            2
        } else if let Some(&m) = mids.iter().find(|&&m| byte_id(m) == id) {
            mid_dim(m)
        } else {
            0
        }
    };
    for id in 0..vocab {
        let row = &mut embed[id * hidden..(id + 1) * hidden];
        row[..16].fill(0.0);
        row[state(id as u32)] = 1.0;
    }
    // Logits come from the state dimensions only: from any other token a word piece
    // follows; after a word piece, a word piece or a character's first byte; after a
    // continued byte, its successor; after a character's last byte, a word piece.
    let (a, b) = (4.0f32, 5.0f32);
    let mut head = vec![0f32; vocab * hidden];
    let mut set = |id: u32, dim: usize, v: f32| head[id as usize * hidden + dim] = v;
    for &w in &words {
        set(w, 0, b);
        set(w, 1, a);
        set(w, 2, a);
    }
    for &s in &starts {
        set(byte_id(s), 1, a);
    }
    for &(from, to) in &next {
        set(byte_id(to), mid_dim(from), a);
    }
    t.insert(
        "model.embed_tokens.weight".into(),
        Tensor::from_vec(embed, (vocab, hidden), &Device::Cpu).unwrap(),
    );
    t.insert(
        "lm_head.weight".into(),
        Tensor::from_vec(head, (vocab, hidden), &Device::Cpu).unwrap(),
    );
    t.insert(
        "model.norm.weight".into(),
        Tensor::ones(hidden, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let mut tensors: Vec<(String, Tensor)> = t.into_iter().collect();
    tensors.sort_by(|x, y| x.0.cmp(&y.0));
    sirocco_model::weights::write_checkpoint(dir, &tensors, 1).unwrap();

    let mut allowed: HashSet<u32> = words.into_iter().collect();
    allowed.extend(chars.iter().flat_map(|c| c.bytes().map(byte_id)));
    allowed
}

#[test]
fn streamed_text_equals_the_full_decode_with_the_mistral_tokenizer() {
    let tok_dir = shared_dir().join("tokenizers/mistral-7b-v0.1");
    let tok_path = tok_dir.join("tokenizer.json");
    let tok = Tokenizer::from_file(&tok_path).unwrap();
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(tok_dir.join("encodings.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    let u32s = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };

    let model_dir = tempfile::tempdir().unwrap();
    let allowed = byte_fallback_model(model_dir.path(), &tok_path, &tok);
    let cluster = Cluster::start(ClusterSpec {
        model: Some(model_dir.path()),
        tp: 2,
        ..Default::default()
    });
    let _logs = LogsOnPanic(&cluster);
    block_on(async {
        let mut c = cluster.client().await;
        let (mut held_back, mut all_text) = (0, String::new());
        for (i, case) in cases.iter().enumerate() {
            let (text, ids) = (case["text"].as_str().unwrap(), u32s(&case["ids"]));
            // The router tokenizes as SentencePiece does.
            for (bos, want) in [(false, &case["ids"]), (true, &case["ids_with_bos"])] {
                let t = c
                    .tokenize(pb::TokenizeRequest {
                        text: text.into(),
                        add_special_tokens: Some(bos),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(t.ids, u32s(want), "Tokenize({text:?}, bos {bos})");
                if !bos {
                    let pieces: Vec<&str> = case["pieces"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| p.as_str().unwrap())
                        .collect();
                    assert_eq!(t.pieces, pieces, "Tokenize({text:?}) pieces");
                }
            }
            if ids.is_empty() {
                continue;
            }

            let params = pb::SamplingParameters {
                max_new_tokens: Some(24),
                temperature: Some(1.0),
                seed: Some(100 + i as u64),
                ignore_eos: true,
                ..Default::default()
            };
            let s = stream(&mut c, ids_req(&ids, params.clone())).await.unwrap();
            let gen = s.ids();
            assert_eq!(s.finished.generated_tokens, 24, "{text:?}");
            assert_eq!(gen.len(), 24, "{text:?}: one token event per token");
            assert!(
                gen.iter().all(|g| allowed.contains(g)),
                "{text:?}: the model is not steered: {gen:?}"
            );
            let want = added_text(&tok, &ids, &gen);
            assert_eq!(s.text(), want, "{text:?}: streamed text vs the full decode of {gen:?}");
            // U+FFFD only where the full decode has it: a character cut off at the end.
            let pieces: Vec<&str> = s.tokens.iter().map(|t| t.text.as_str()).collect();
            for p in &pieces[..pieces.len() - 1] {
                assert!(!p.contains(REPLACEMENT), "{text:?}: {pieces:?}");
            }
            held_back += pieces.iter().filter(|p| p.is_empty()).count();
            all_text.push_str(&want);

            // Generate gives the same tokens and text for the same seed.
            let r = c.generate(ids_req(&ids, params)).await.unwrap().into_inner();
            assert_eq!(r.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), gen, "{text:?}");
            assert_eq!(r.text, s.text(), "{text:?}");
        }
        // Characters really were split across byte-fallback tokens.
        assert!(held_back > 20, "only {held_back} tokens held text back");
        let seen = ["😀", "🌬", "风", "叠", "∫"]
            .iter()
            .filter(|c| all_text.contains(*c))
            .count();
        assert!(seen >= 4, "{all_text:?}");
    });
}

/// Lists the router's services and fetches the API's file descriptor over the
/// server-reflection protocol `tonic_reflection::pb::$version`.
macro_rules! reflection_lists_services {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        let reqs = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("sirocco.v1.Sirocco".into()),
        ]
        .map(|m| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        });
        let mut answers = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
        match answers.message().await.unwrap().unwrap().message_response.unwrap() {
            MessageResponse::ListServicesResponse(l) => {
                let names: Vec<&str> = l.service.iter().map(|s| s.name.as_str()).collect();
                for want in ["sirocco.v1.Sirocco", "grpc.health.v1.Health"] {
                    assert!(
                        names.contains(&want),
                        "{}: {want} missing from {names:?}",
                        stringify!($version)
                    );
                }
            }
            other => panic!("{other:?}"),
        }
        match answers.message().await.unwrap().unwrap().message_response.unwrap() {
            MessageResponse::FileDescriptorResponse(f) => assert!(!f.file_descriptor_proto.is_empty()),
            other => panic!("{other:?}"),
        }
    }};
}

#[test]
fn tokenize_model_info_health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let cluster = odd_cluster(&[]);
    let _logs = LogsOnPanic(&cluster);
    let tok = odd_tokenizer();
    block_on(async {
        let mut c = cluster.client().await;
        for text in ["Hello world", "The quick brown fox, 42 times!", " leading  spaces\n"] {
            for bos in [true, false] {
                let r = c
                    .tokenize(pb::TokenizeRequest {
                        text: text.into(),
                        add_special_tokens: Some(bos),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.ids, tok.encode(text, bos).unwrap(), "{text:?} bos {bos}");
                let pieces: Vec<String> = r.ids.iter().map(|&i| tok.id_to_piece(i).unwrap()).collect();
                assert_eq!(r.pieces, pieces);
            }
        }
        // add_special_tokens defaults to true.
        let r = c
            .tokenize(pb::TokenizeRequest {
                text: "Hello".into(),
                add_special_tokens: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.ids, tok.encode("Hello", true).unwrap());

        let m = c.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(m.architecture, "MistralForCausalLM");
        assert_eq!(m.model, "odd");
        assert_eq!(
            (m.vocab_size, m.sliding_window, m.tp, m.replicas, m.max_context),
            (1000, 7, 2, 1, 2048)
        );
        assert_eq!(m.max_new_tokens_limit, 2048);
        assert_eq!((m.num_attention_heads, m.num_key_value_heads), (12, 4));

        let channel = Channel::from_shared(format!("http://{}", cluster.router_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        for service in ["sirocco.v1.Sirocco", ""] {
            let r = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.status, ServingStatus::Serving as i32, "health of {service:?}");
        }
        let unknown = health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);

        // Both reflection protocols: v1, and v1alpha for Python's grpcio-reflection
        // and older grpcurl.
        reflection_lists_services!(v1, channel.clone());
        reflection_lists_services!(v1alpha, channel);
    });
}

#[test]
fn stop_token_ids_and_stop_sequences_end_generation() {
    let cluster = odd_cluster(&[]);
    let _logs = LogsOnPanic(&cluster);
    let tok = odd_tokenizer();
    let p = ref_prompts("odd").into_iter().next().unwrap();
    block_on(async {
        let mut c = cluster.client().await;
        let free = stream(&mut c, ids_req(&p.input_ids, greedy(24))).await.unwrap();
        let gen = free.ids();
        assert_eq!(gen, p.greedy, "greedy tokens vs the reference");
        let text = free.text();
        assert_eq!(text, added_text(&tok, &p.input_ids, &gen));

        // (a) A stop token: generation ends with it (it is returned) at its first occurrence.
        let i = (4..gen.len())
            .find(|&i| !gen[..i].contains(&gen[i]))
            .expect("a new token after the 4th");
        let params = pb::SamplingParameters {
            stop_token_ids: vec![gen[i]],
            ..greedy(24)
        };
        let s = stream(&mut c, ids_req(&p.input_ids, params.clone())).await.unwrap();
        assert_eq!(reason(&s.finished), pb::FinishReason::StopSequence);
        assert_eq!(s.finished.generated_tokens as usize, i + 1);
        assert_eq!(s.ids(), gen[..=i], "one token event per token, the stop token last");
        assert!(!s.finished.stop.is_empty());
        let want = added_text(&tok, &p.input_ids, &gen[..=i]);
        // The stop token's text is returned, an incomplete character flushed as U+FFFD.
        assert_eq!(s.text(), want);
        let r = c.generate(ids_req(&p.input_ids, params)).await.unwrap().into_inner();
        assert_eq!((r.text, r.tokens.len()), (s.text(), i + 1));

        // (b) A stop sequence from the middle of the text, spanning two tokens' text.
        let mut ends = vec![0];
        for t in &free.tokens {
            ends.push(ends.last().unwrap() + t.text.len());
        }
        let stop = (1..free.tokens.len() - 1)
            .filter_map(|t| {
                let piece = &free.tokens[t].text;
                // Inside this token's text when it has more than one character.
                let start = ends[t]
                    + if piece.chars().count() > 1 {
                        piece.chars().next()?.len_utf8()
                    } else {
                        0
                    };
                let stop = text.get(start..ends[t + 2])?;
                (!stop.is_empty() && text.find(stop)? > 0 && stop.len() <= 256).then(|| stop.to_string())
            })
            .next()
            .expect("a stop sequence candidate");
        let pos = text.find(&stop).unwrap();
        // Generation stops at the token whose text completes the first occurrence.
        let stops_after = (1..=free.tokens.len()).find(|&n| ends[n] >= pos + stop.len()).unwrap();
        let params = pb::SamplingParameters {
            stop_sequences: vec!["never seen ~~~".into(), stop.clone()],
            ..greedy(24)
        };
        let s = stream(&mut c, ids_req(&p.input_ids, params.clone())).await.unwrap();
        assert_eq!(
            reason(&s.finished),
            pb::FinishReason::StopSequence,
            "stop {stop:?} in {text:?}"
        );
        assert_eq!(s.finished.stop, stop);
        assert_eq!(s.text(), &text[..pos], "stop {stop:?} in {text:?}");
        assert_eq!(s.finished.generated_tokens as usize, stops_after);
        assert_eq!(s.ids(), gen[..stops_after]);
        let r = c.generate(ids_req(&p.input_ids, params)).await.unwrap().into_inner();
        assert_eq!(r.text, &text[..pos]);
        assert_eq!(r.finished.unwrap().stop, stop);
    });
}
