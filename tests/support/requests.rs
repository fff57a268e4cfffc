//! Requests and expected answers shared by the serving tests.

use super::sirocco_bin;
use sirocco_proto::v1 as pb;

pub fn ids_request(ids: &[u32], max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
            ids: ids.to_vec(),
        })),
        parameters: Some(pb::SamplingParameters {
            max_new_tokens: Some(max_new_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub async fn connect(
    addr: &str,
) -> Result<pb::sirocco_client::SiroccoClient<tonic::transport::Channel>, tonic::transport::Error> {
    pb::sirocco_client::SiroccoClient::connect(addr.to_string()).await
}

/// Streams a request to the end: (token ids, finish event) or the error status.
pub async fn stream_all(
    mut client: pb::sirocco_client::SiroccoClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
) -> Result<(Vec<u32>, pb::Finished), tonic::Status> {
    let mut s = client.generate_stream(req).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(ev) = s.message().await? {
        match ev.event {
            Some(pb::generate_stream_response::Event::Token(t)) => ids.push(t.id),
            Some(pb::generate_stream_response::Event::Finished(f)) => return Ok((ids, f)),
            None => {}
        }
    }
    Err(tonic::Status::internal("stream ended without a finish event"))
}

/// Deterministic prompts of mixed lengths, some longer than the window.
pub fn prompts(n: usize, vocab: u32) -> Vec<Vec<u32>> {
    let mut x = 12345u64;
    (0..n)
        .map(|i| {
            let len = [1, 3, 6, 7, 8, 15, 40, 90][i % 8];
            let mut p = vec![1];
            for _ in 1..len {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                p.push(3 + ((x >> 33) as u32 % (vocab - 3)));
            }
            p
        })
        .collect()
}

/// What `sirocco generate` gives for one prompt alone (greedy, no EOS stop).
pub fn generate_alone(model: &std::path::Path, ids: &[u32], n: usize) -> Vec<u32> {
    generate_cli(model, ids, n, &["--greedy"])
}

/// What `sirocco generate` gives with seeded sampling (temperature 0.9, top-p 0.95).
pub fn sample_alone(model: &std::path::Path, ids: &[u32], n: usize, seed: u64) -> Vec<u32> {
    let seed = seed.to_string();
    generate_cli(
        model,
        ids,
        n,
        &["--temperature", "0.9", "--top-p", "0.95", "--seed", &seed],
    )
}

fn generate_cli(model: &std::path::Path, ids: &[u32], n: usize, sampling: &[&str]) -> Vec<u32> {
    let ids_arg = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let out = std::process::Command::new(sirocco_bin())
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt-ids", &ids_arg])
        .args(["--max-new-tokens", &n.to_string(), "--ignore-eos", "--json"])
        .args(sampling)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
