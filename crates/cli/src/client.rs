//! `sirocco client`: sends one prompt (or, without one, a question as a chat turn) to
//! a router and streams the text to the terminal.

use anyhow::{Context, Result};
use clap::Args;
use sirocco_proto::v1 as pb;
use std::io::Write;

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The router's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Text to continue; without it, the client asks the model a question as a chat
    /// turn (its chat template makes the prompt).
    #[arg(long)]
    pub prompt: Option<String>,
    /// The question asked when no --prompt is given.
    #[arg(long, default_value = "What is the capital of France?")]
    pub ask: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub ignore_eos: bool,
}

pub fn run(a: ClientArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let addr = if a.addr.starts_with("http") {
            a.addr.clone()
        } else {
            format!("http://{}", a.addr)
        };
        let mut client = pb::sirocco_client::SiroccoClient::connect(addr.clone())
            .await
            .with_context(|| format!("cannot reach the router at {addr}"))?;
        let (input, shown) = match &a.prompt {
            Some(p) => (pb::generate_request::Input::Text(p.clone()), p.clone()),
            None => (
                pb::generate_request::Input::Chat(pb::Chat {
                    messages: vec![pb::ChatMessage {
                        role: "user".into(),
                        content: a.ask.clone(),
                    }],
                }),
                format!("> {}\n", a.ask),
            ),
        };
        let req = pb::GenerateRequest {
            input: Some(input),
            parameters: Some(pb::SamplingParameters {
                max_new_tokens: Some(a.max_new_tokens),
                temperature: Some(a.temperature),
                top_p: a.top_p,
                seed: a.seed,
                ignore_eos: a.ignore_eos,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut stream = client
            .generate_stream(req)
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
            .into_inner();
        let mut out = std::io::stdout();
        write!(out, "{shown}")?;
        while let Some(ev) = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        {
            match ev.event {
                Some(pb::generate_stream_response::Event::Token(t)) => {
                    write!(out, "{}", t.text)?;
                    out.flush()?;
                }
                Some(pb::generate_stream_response::Event::Finished(f)) => {
                    writeln!(out)?;
                    eprintln!(
                        "[{:?}: {} prompt + {} generated tokens]",
                        pb::FinishReason::try_from(f.reason).unwrap_or_default(),
                        f.prompt_tokens,
                        f.generated_tokens
                    );
                }
                None => {}
            }
        }
        Ok(())
    })
}
