//! A request over gRPC (`sirocco.v1.Sirocco/GenerateStream`), each token event timed
//! as it arrives and its id kept, the prompt tokens the router says its prefix cache
//! served, and the router's `ModelInfo`.

use super::{Ask, Target};
use crate::bench::record::{Finish, Record};
use crate::bench::workload::Prompt;
use anyhow::{Context, Result};
use sirocco_proto::v1 as pb;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

fn status_msg(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

pub async fn connect(addr: &str) -> Result<Channel> {
    Endpoint::from_shared(addr.to_string())
        .with_context(|| format!("bad gRPC address {addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot reach the router at {addr}"))
}

/// A gRPC request carrying the bearer token, if any.
pub(super) fn grpc_request<T>(msg: T, bearer: Option<&str>) -> Result<tonic::Request<T>, String> {
    let mut req = tonic::Request::new(msg);
    if let Some(b) = bearer {
        let v = b
            .parse()
            .map_err(|_| "the API key is not a valid header value".to_string())?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

pub async fn model_info(channel: Channel, bearer: Option<&str>) -> Result<pb::ModelInfoResponse> {
    let mut c = pb::sirocco_client::SiroccoClient::new(channel);
    let info = c
        .model_info(grpc_request(pb::ModelInfoRequest {}, bearer).map_err(anyhow::Error::msg)?)
        .await
        .map_err(|s| anyhow::anyhow!("ModelInfo failed: {}", status_msg(&s)))?;
    Ok(info.into_inner())
}

impl Target {
    /// The gRPC request for `prompt` with what `ask` adds.
    pub(super) fn generate_request(&self, request_id: String, prompt: &Prompt, ask: &Ask) -> pb::GenerateRequest {
        let input = match prompt {
            Prompt::Ids(ids) => pb::generate_request::Input::TokenIds(pb::TokenIds { ids: ids.clone() }),
            Prompt::Text(t) => pb::generate_request::Input::Text(t.clone()),
        };
        let (max_new_tokens, ignore_eos) = self.limits(ask);
        let constraint = ask.json_schema.as_ref().map(|s| pb::Constraint {
            kind: Some(pb::constraint::Kind::JsonSchema(s.to_string())),
        });
        pb::GenerateRequest {
            input: Some(input),
            parameters: Some(pb::SamplingParameters {
                max_new_tokens: Some(max_new_tokens),
                temperature: Some(self.temperature),
                ignore_eos,
                constraint,
                ..Default::default()
            }),
            request_id,
            prefix_cache: ask.prefix_cache,
            ..Default::default()
        }
    }

    /// Request `i` goes on connection `i` modulo their number.
    pub(super) async fn send_grpc(
        &self,
        i: usize,
        request_id: String,
        prompt: &Prompt,
        ask: &Ask,
        start: Instant,
        rec: &mut Record,
    ) -> Result<(), String> {
        let req = grpc_request(self.generate_request(request_id, prompt, ask), self.bearer.as_deref())?;
        let mut client = pb::sirocco_client::SiroccoClient::new(self.channels[i % self.channels.len()].clone());
        let mut stream = client
            .generate_stream(req)
            .await
            .map_err(|s| status_msg(&s))?
            .into_inner();
        let mut last = None;
        while let Some(ev) = stream.message().await.map_err(|s| status_msg(&s))? {
            match ev.event {
                Some(pb::generate_stream_response::Event::Token(t)) => token(rec, t, start, &mut last),
                Some(pb::generate_stream_response::Event::Finished(f)) => return finished(rec, f, prompt),
                None => {}
            }
        }
        Err("stream ended without a finish event".into())
    }
}

/// Records a token event as it arrives.
pub(super) fn token(rec: &mut Record, t: pb::Token, start: Instant, last: &mut Option<std::time::Duration>) {
    rec.tokens(1, start.elapsed(), last);
    rec.output_ids.push(t.id);
    if rec.constrained {
        rec.text.push_str(&t.text);
    }
}

/// Settles the record of a request that finished with `f`.
pub(super) fn finished(rec: &mut Record, f: pb::Finished, prompt: &Prompt) -> Result<(), String> {
    rec.cached_prompt_tokens = Some(f.cached_prompt_tokens as usize);
    rec.finish = Some(match f.reason() {
        pb::FinishReason::Length => Finish::Length,
        pb::FinishReason::Cancelled => Finish::Cancelled,
        // The end of sequence, a stop, or the end of the constrained language: the
        // output is complete.
        _ => Finish::Complete,
    });
    rec.settle(
        prompt,
        Some(f.prompt_tokens as usize),
        Some(f.generated_tokens as usize),
        None,
    )
}
