//! The router's limits on what clients send, against real processes (router and
//! shards on 127.0.0.1): text is bounded in bytes before it is tokenized and the
//! router's memory comes back after huge requests; malformed protobuf is the
//! client's error; HTTP heads and bodies are bounded in time and size; OpenAI errors
//! name the OpenAI field; the queue bound counts only requests that cannot start,
//! and queue time can be bounded.

mod support;

use serde_json::{json, Value};
use sirocco_model::MistralConfig;
use sirocco_proto::v1 as pb;
use sirocco_proto::v1::sirocco_client::SiroccoClient;
use sirocco_tokenizer::Tokenizer;

use std::path::Path;
use std::time::{Duration, Instant};
use support::cluster::{generated_model, Cluster, ClusterSpec, LogsOnPanic};
use support::http::{get, post_json, samples, sum};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;

type Client = SiroccoClient<Channel>;

/// Replicas of one shard each.
fn cluster(model: &Path, replicas: usize, router_args: &[&str]) -> Cluster {
    Cluster::start(ClusterSpec {
        model: Some(model),
        tp: 1,
        replicas,
        router_args: router_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

fn odd_cluster(router_args: &[&str]) -> Cluster {
    cluster(&ref_model("odd"), 1, router_args)
}

/// A model of odd's vocabulary and tokenizer whose steps take milliseconds, so that
/// requests of a few thousand tokens outlast what a test does meanwhile.
fn slow_model(dir: &Path) -> std::path::PathBuf {
    let mut config = MistralConfig::from_file(&ref_model("odd").join("config.json")).unwrap();
    config.hidden_size = 512;
    config.intermediate_size = 1536;
    config.num_hidden_layers = 4;
    config.num_attention_heads = 8;
    config.num_key_value_heads = 4;
    config.head_dim = 64;
    let tokenizer = ref_model("odd").join("tokenizer.json");
    generated_model(dir, &config, Some(tokenizer.as_path()))
}

fn text_req(text: String, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Text(text)),
        parameters: Some(pb::SamplingParameters {
            max_new_tokens: Some(max_new_tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn long_req(max_new_tokens: u32) -> pb::GenerateRequest {
    let mut r = requests::ids_request(&[1, 5, 9], max_new_tokens);
    r.request_id = String::new();
    r
}

/// The process's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// What a connection answers before it closes: the status code (0 if none) and
/// everything read.
async fn read_answer(s: &mut tokio::net::TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    // A reset after the answer still leaves the answer.
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

/// POSTs a JSON body of any size; returns the status and the error object.
async fn post_big(addr: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let (status, text) = read_answer(&mut s).await;
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1);
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {text:.300}"));
    (status, v["error"].clone())
}

#[test]
fn oversized_text_is_refused_before_tokenizing_and_memory_comes_back() {
    let cluster = odd_cluster(&[]);
    let _logs = LogsOnPanic(&cluster);
    let pid = cluster.router.as_ref().unwrap().child.id();
    let tok = Tokenizer::from_file(&ref_model("odd").join("tokenizer.json")).unwrap();
    let longest = (0..tok.vocab_size() as u32)
        .filter_map(|i| tok.id_to_piece(i))
        .map(|p| p.len())
        .max()
        .unwrap();
    // odd's context is 2048 tokens; the bound has a floor of 64 KiB.
    let limit = (2048 * longest).max(64 << 10);
    let limit_words = format!("limit of {limit} bytes");
    let addr = cluster.http_addr.clone();
    block_on(async {
        let mut c = cluster.client().await;
        c.generate(text_req("Hello world".into(), 4)).await.unwrap();
        assert_eq!(get(&addr, "/health").await.0, 200);
        let before = rss_kib(pid);

        let three_mib = "x".repeat(3 << 20);
        let four_mib = "word".repeat(1 << 20);
        let e = c.generate(text_req(three_mib.clone(), 4)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        for w in ["input.text is 3145728 bytes", &limit_words] {
            assert!(e.message().contains(w), "{e:?} lacks {w:?}");
        }
        let e = c
            .tokenize(pb::TokenizeRequest {
                text: three_mib.clone(),
                add_special_tokens: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("text is 3145728 bytes") && e.message().contains(&limit_words));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let mut c = c.clone();
            let text = four_mib.clone();
            tasks.spawn(async move { c.generate_stream(text_req(text, 4)).await.map(|_| ()) });
        }
        while let Some(r) = tasks.join_next().await {
            let e = r.unwrap().unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains("input.text is 4194304 bytes"), "{e:?}");
        }
        // Within the bytes, over the context in tokens: refused by its token count.
        let many_tokens = "a b ".repeat(limit / 8);
        let e = c.generate(text_req(many_tokens.clone(), 4)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("over the context limit of 2048"), "{e:?}");
        let e = c
            .tokenize(pb::TokenizeRequest {
                text: many_tokens,
                add_special_tokens: None,
            })
            .await
            .unwrap_err();
        assert!(e.message().contains("over the context limit of 2048"), "{e:?}");
        // Past the message bound (4 MiB and 64 KiB) the transport refuses it unread.
        let e = c.generate(text_req("x".repeat(8 << 20), 4)).await.unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        assert!(e.message().contains(&((4 << 20) + (64 << 10)).to_string()), "{e:?}");

        let body = json!({"prompt": three_mib, "max_tokens": 4}).to_string();
        let (status, err) = post_big(&addr, "/v1/completions", body.as_bytes()).await;
        assert_eq!((status, err["param"].as_str()), (400, Some("prompt")), "{err}");
        let msg = err["message"].as_str().unwrap();
        assert!(
            msg.contains("prompt is 3145728 bytes") && msg.contains(&limit_words),
            "{err}"
        );
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let body = json!({"messages": [{"role": "user", "content": four_mib}]}).to_string();
            let addr = addr.clone();
            tasks.spawn(async move { post_big(&addr, "/v1/chat/completions", body.as_bytes()).await });
        }
        while let Some(r) = tasks.join_next().await {
            let (status, err) = r.unwrap();
            assert_eq!((status, err["param"].as_str()), (400, Some("messages")), "{err}");
            assert!(err["message"].as_str().unwrap().contains(&limit_words), "{err}");
        }
        // A body over the HTTP bound is refused from its Content-Length, unread.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/completions HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{{",
            64 << 20
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let (status, text) = read_answer(&mut s).await;
        assert_eq!(status, 413, "{text}");
        assert!(text.contains("over the limit of"), "{text}");

        let after = rss_kib(pid);
        eprintln!("router RSS: {before} KiB before, {after} KiB after");
        assert!(
            after < before + 100 * 1024,
            "the router grew from {before} KiB to {after} KiB"
        );
        let r = c
            .generate(text_req("Hello world".into(), 4))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.tokens.len(), 4);
        let (status, text) = post_json(
            &addr,
            "/v1/completions",
            &[],
            &json!({"prompt": "Hello", "max_tokens": 3}),
        )
        .await;
        assert_eq!(status, 200, "{text}");
    });
}

async fn channel(cluster: &Cluster) -> Channel {
    Channel::from_shared(format!("http://{}", cluster.router_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Sends each body as one request message, unchanged, to `method` of sirocco.v1.
async fn raw_unary(channel: Channel, method: &'static str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    use prost::bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    #[derive(Default)]
    struct Raw;
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }
    impl Encoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            buf.put_slice(&item);
            Ok(())
        }
    }
    impl Decoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
        }
    }

    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    grpc.unary(tonic::Request::new(body), path, Raw)
        .await
        .map(|r| r.into_inner())
}

#[test]
fn malformed_protobuf_is_invalid_argument() {
    let cluster = odd_cluster(&[]);
    let _logs = LogsOnPanic(&cluster);
    block_on(async {
        let channel = channel(&cluster).await;
        // Field 1 of TokenizeRequest is `text` and of GenerateRequest `input.text`:
        // tag 0x0a (length-delimited), then a length and the bytes.
        let cases: [(&str, &[u8]); 3] = [
            ("invalid UTF-8", &[0x0a, 0x02, 0xff, 0xfe]),
            ("truncated", &[0x0a, 0x10, b'a', b'b']),
            ("wrong wire type", &[0x0d, 1, 2, 3, 4]),
        ];
        for method in ["/sirocco.v1.Sirocco/Tokenize", "/sirocco.v1.Sirocco/Generate"] {
            for (name, bytes) in cases {
                let e = raw_unary(channel.clone(), method, bytes.to_vec()).await.unwrap_err();
                assert_eq!(e.code(), Code::InvalidArgument, "{method} {name}: {e:?}");
                assert!(e.message().contains("malformed protobuf message"), "{name}: {e:?}");
            }
        }
        // The same bytes, well formed, work.
        let ok = raw_unary(channel, "/sirocco.v1.Sirocco/Tokenize", vec![0x0a, 0x02, b'h', b'i']).await;
        assert!(ok.is_ok(), "{ok:?}");
    });
}

/// Sends `first`, then `next(i)` every 100 ms, until the server closes the
/// connection, which must happen within 4 s; returns when, and what it answered.
async fn trickle_until_closed(addr: &str, first: String, next: fn(usize) -> String) -> (Duration, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(first.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(next(i).as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let t0 = Instant::now();
    let mut buf = Vec::new();
    // A reset after the answer still leaves the answer.
    let read = tokio::time::timeout(Duration::from_secs(4), async {
        let _ = rd.read_to_end(&mut buf).await;
    })
    .await;
    let took = t0.elapsed();
    trickle.abort();
    assert!(read.is_ok(), "still open after {took:?}: {first:?}");
    (took, String::from_utf8_lossy(&buf).into_owned())
}

#[test]
fn http_heads_and_bodies_are_bounded_in_time_and_size() {
    let cluster = odd_cluster(&["--http-header-timeout", "1", "--http-body-timeout", "1"]);
    let _logs = LogsOnPanic(&cluster);
    let addr = cluster.http_addr.clone();
    block_on(async {
        // A body trickled a byte at a time is cut off at the body timeout.
        let head = format!("POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{");
        let (took, text) = trickle_until_closed(&addr, head, |_| " ".into()).await;
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(took >= Duration::from_millis(900), "cut off after {took:?}");

        // A head trickled a header at a time is cut off at the header timeout.
        let head = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n");
        let (_, text) = trickle_until_closed(&addr, head, |i| format!("X-Slow-{i}: 1\r\n")).await;
        assert!(!text.contains("200 OK"), "{text}");

        // A 100 KiB header: 431.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let big = "a".repeat(100 << 10);
        s.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nX-Big: {big}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (status, text) = read_answer(&mut s).await;
        assert_eq!(status, 431, "{text:.200}");

        // The server still answers.
        assert_eq!(get(&addr, "/health").await.0, 200);
        let (status, text) = post_json(
            &addr,
            "/v1/completions",
            &[],
            &json!({"prompt": [1, 5], "max_tokens": 2}),
        )
        .await;
        assert_eq!(status, 200, "{text}");
    });
}

#[test]
fn openai_errors_name_the_openai_field() {
    let cluster = odd_cluster(&[]);
    let _logs = LogsOnPanic(&cluster);
    let addr = cluster.http_addr.clone();
    let long_prompt: Vec<u32> = vec![5; 2040];
    let user = |content: &str| json!([{"role": "user", "content": content}]);
    block_on(async {
        const C: &str = "/v1/completions";
        const CH: &str = "/v1/chat/completions";
        let hi = "hi";
        let cases: Vec<(&str, Value, &str)> = vec![
            (C, json!({"prompt": hi, "max_tokens": 0}), "max_tokens"),
            (C, json!({"prompt": hi, "max_tokens": 5000}), "max_tokens"),
            (CH, json!({"messages": user(hi), "max_tokens": 0}), "max_tokens"),
            (
                CH,
                json!({"messages": user(hi), "max_completion_tokens": 0}),
                "max_completion_tokens",
            ),
            (C, json!({"prompt": hi, "temperature": -1}), "temperature"),
            (C, json!({"prompt": hi, "temperature": 2.5}), "temperature"),
            (CH, json!({"messages": user(hi), "temperature": 3}), "temperature"),
            (C, json!({"prompt": hi, "top_p": 0}), "top_p"),
            (C, json!({"prompt": hi, "top_p": 1.5}), "top_p"),
            (C, json!({"prompt": hi, "min_p": 2}), "min_p"),
            (C, json!({"prompt": hi, "repetition_penalty": 0}), "repetition_penalty"),
            (C, json!({"prompt": hi, "frequency_penalty": 3}), "frequency_penalty"),
            (C, json!({"prompt": hi, "presence_penalty": -3}), "presence_penalty"),
            (C, json!({"prompt": hi, "stop": vec!["a"; 9]}), "stop"),
            (C, json!({"prompt": hi, "stop": ""}), "stop"),
            (C, json!({"prompt": hi, "stop": 5}), "stop"),
            (C, json!({"prompt": hi, "stop_token_ids": [5000]}), "stop_token_ids"),
            (C, json!({"prompt": hi, "stop_token_ids": ["a"]}), "stop_token_ids"),
            (C, json!({"prompt": hi, "logprobs": 21}), "logprobs"),
            (
                CH,
                json!({"messages": user(hi), "logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (CH, json!({"messages": user(hi), "top_logprobs": 2}), "top_logprobs"),
            (CH, json!({"messages": user(hi), "logprobs": "yes"}), "logprobs"),
            (C, json!({"prompt": hi, "n": 0}), "n"),
            (C, json!({"prompt": hi, "n": 200}), "n"),
            (C, json!({"prompt": hi, "seed": -1}), "seed"),
            (C, json!({"prompt": hi, "top_k": -1}), "top_k"),
            (C, json!({"prompt": ""}), "prompt"),
            (C, json!({"prompt": []}), "prompt"),
            (C, json!({"prompt": [1, 5000]}), "prompt"),
            (C, json!({"max_tokens": 2}), "prompt"),
            (C, json!({"prompt": long_prompt, "max_tokens": 100}), "prompt"),
            (CH, json!({"max_tokens": 2}), "messages"),
            (CH, json!({"messages": [{"role": "user"}]}), "messages"),
            (
                CH,
                json!({"messages": user(&"a b ".repeat(3000)), "max_tokens": 2}),
                "messages",
            ),
        ];
        for (path, body, field) in cases {
            let (status, text) = post_json(&addr, path, &[], &body).await;
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{body}: not JSON: {text}"));
            let err = &v["error"];
            assert!(status == 400 || status == 422, "{path} {body}: {status} {text}");
            assert_eq!(err["param"].as_str(), Some(field), "{path} {body}: {err}");
            let msg = err["message"].as_str().unwrap();
            assert!(msg.contains(field), "{path} {body}: {msg}");
            for grpc in ["parameters.", "input.", "max_new_tokens"] {
                assert!(!msg.contains(grpc), "{path} {body}: {msg} names the gRPC field");
            }
        }

        // gRPC refuses top_logprobs without logprobs, as HTTP does.
        let mut c = cluster.client().await;
        let mut req = requests::ids_request(&[1, 5], 2);
        req.parameters.as_mut().unwrap().top_logprobs = 2;
        let e = c.generate(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("parameters.top_logprobs") && e.message().contains("parameters.logprobs"));
        req.parameters.as_mut().unwrap().logprobs = true;
        let r = c.generate(req).await.unwrap().into_inner();
        assert!(r.tokens.iter().all(|t| t.top_logprobs.len() == 2));
    });
}

#[test]
fn the_queue_bound_counts_only_requests_that_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let model = slow_model(dir.path());
    let cluster = cluster(&model, 2, &["--max-batch-size", "8", "--max-queue", "20"]);
    let _logs = LogsOnPanic(&cluster);
    let addr = cluster.http_addr.clone();
    block_on(async {
        let mut clients: Vec<Client> = Vec::new();
        for _ in 0..4 {
            clients.push(cluster.client().await);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let mut c = clients[i % clients.len()].clone();
            tasks.spawn(async move { c.generate_stream(long_req(2000)).await.map(|r| r.into_inner()) });
        }
        let (mut accepted, mut refused) = (Vec::new(), 0);
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok(stream) => accepted.push(stream),
                Err(e) if e.code() == Code::ResourceExhausted => refused += 1,
                Err(e) => panic!("neither accepted nor refused: {e:?}"),
            }
        }
        // Two replicas of 8 slots run 16; 20 more wait.
        assert_eq!((accepted.len(), refused), (36, 164));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = samples(&get(&addr, "/metrics").await.1);
            let (running, waiting) = (
                sum(&m, "sirocco_running_sequences", &[]),
                sum(&m, "sirocco_queue_depth", &[]),
            );
            if (running, waiting) == (16.0, 20.0) {
                break;
            }
            assert!(Instant::now() < deadline, "running {running}, waiting {waiting}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Every running request streams. Each stream is read as it arrives: a client
        // that leaves many small frames unread is disconnected by its own h2 library
        // (ENHANCE_YOUR_CALM), which is not what this test is about.
        let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut readers = tokio::task::JoinSet::new();
        for mut s in accepted {
            let first_tx = first_tx.clone();
            readers.spawn(async move {
                let _ = first_tx.send(s.message().await.map(|m| m.is_some()));
                // Keep reading until the test ends, so that nothing piles up.
                while let Ok(Some(_)) = s.message().await {}
            });
        }
        drop(first_tx);
        let mut streaming = 0;
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        while streaming < 16 {
            tokio::select! {
                _ = &mut deadline => break,
                first = first_rx.recv() => match first {
                    Some(got) => {
                        assert!(got.unwrap(), "a stream ended without a token");
                        streaming += 1;
                    }
                    None => break,
                },
            }
        }
        assert!(streaming >= 16, "{streaming} of the accepted requests stream");
    });
}

#[test]
fn max_queue_wait_refuses_requests_that_wait_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let model = slow_model(dir.path());
    let cluster = cluster(&model, 1, &["--max-batch-size", "1", "--max-queue-wait", "1"]);
    let _logs = LogsOnPanic(&cluster);
    let addr = cluster.http_addr.clone();
    block_on(async {
        let mut c = cluster.client().await;
        let mut running = c.generate_stream(long_req(2000)).await.unwrap().into_inner();
        running.message().await.unwrap().unwrap();

        let t0 = Instant::now();
        let mut waiting = c.generate_stream(long_req(3)).await.unwrap().into_inner();
        let http = tokio::spawn({
            let addr = addr.clone();
            async move {
                post_json(
                    &addr,
                    "/v1/completions",
                    &[],
                    &json!({"prompt": [1, 5], "max_tokens": 3}),
                )
                .await
            }
        });
        let e = waiting.message().await.unwrap_err();
        let took = t0.elapsed();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("--max-queue-wait"), "{e:?}");
        assert!(
            took >= Duration::from_millis(950) && took < Duration::from_secs(4),
            "{took:?}"
        );
        let (status, text) = http.await.unwrap();
        assert_eq!(status, 429, "{text}");
        assert!(text.contains("--max-queue-wait"), "{text}");

        // The running request was not touched, and the expired ones left the queue.
        assert!(running.message().await.unwrap().is_some());
        let m = samples(&get(&addr, "/metrics").await.1);
        assert_eq!(sum(&m, "sirocco_queue_depth", &[]), 0.0);
        assert_eq!(
            sum(&m, "sirocco_requests_total", &["outcome=\"resource_exhausted\""]),
            2.0
        );
        // Once the slot frees, requests are served again.
        drop(running);
        let r = c.generate(long_req(3)).await.unwrap().into_inner();
        assert_eq!(r.tokens.len(), 3);
    });
}
