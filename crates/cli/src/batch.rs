//! `sirocco batch`: a file of OpenAI batch requests (one JSON object per line:
//! `custom_id`, `method`, `url`, `body`) run through a running router's HTTP API at
//! full throughput, one result or error line written per input line as each
//! finishes. The output file is the resume point: a run interrupted (Ctrl-C, a kill,
//! a lost router) and started again with the same arguments runs only the lines the
//! output does not hold yet.

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use sirocco_router::batch_file::{
    answer_body, check_resume, default_priority, done_lines, parse_input, result_line, retryable, Line, Retry,
};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BatchArgs {
    /// The requests: one JSON object per line, as OpenAI's batch input
    /// (`{"custom_id", "method": "POST", "url": "/v1/chat/completions" or
    /// "/v1/completions", "body"}`).
    #[arg(long, value_name = "FILE.jsonl")]
    pub input: PathBuf,
    /// The results: one JSON object per input line, as OpenAI's batch output (`id`,
    /// `custom_id`, `response` {`status_code`, `request_id`, `body`}, `error`) with the
    /// input's 1-based `line`, in the order they finish. Lines it already holds are
    /// not run again.
    #[arg(long, value_name = "FILE.jsonl")]
    pub output: PathBuf,
    /// The router's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// The `priority` each request is sent with unless its body sets one: lower runs
    /// first, and interactive requests have 0, so a batch does not delay them (it
    /// still gains a level for each 10 s a request waits).
    #[arg(long, default_value_t = 10, allow_negative_numbers = true)]
    pub priority: i32,
    /// Sent as `authorization: Bearer KEY`, for a router started with --api-key.
    #[arg(long, env = "SIROCCO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// How long a request may keep failing to reach the router (refused connections,
    /// 429/502/503/504) before the run stops, to be resumed later.
    #[arg(long, default_value_t = 120)]
    pub retry_for_secs: u64,
}

/// What one request came to: the output line, whether it is a 200 answer, and the
/// completion tokens it made.
struct Outcome {
    line: String,
    ok: bool,
    tokens: u64,
}

/// Sends one request, retrying refused connections and busy answers for up to
/// `retry_for`; an answer of any other status is the line's result.
async fn run_one(
    http: &reqwest::Client,
    args: &BatchArgs,
    n: usize,
    custom_id: &str,
    url: &str,
    body: &Value,
) -> Result<Outcome> {
    let endpoint = format!("{}{url}", args.url.trim_end_matches('/'));
    let mut body = body.clone();
    default_priority(&mut body, args.priority.into());
    let mut retry = Retry::new(Duration::from_secs(args.retry_for_secs));
    loop {
        let mut req = http.post(&endpoint).json(&body);
        if let Some(k) = &args.api_key {
            req = req.bearer_auth(k);
        }
        let failure = match req.send().await {
            Ok(resp) if !retryable(resp.status().as_u16()) => {
                let status = resp.status().as_u16();
                let request_id = resp
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map_or_else(|| format!("line-{n}"), str::to_owned);
                let bytes = resp
                    .bytes()
                    .await
                    .with_context(|| format!("line {n}: reading the answer"))?;
                let body = answer_body(&bytes);
                let tokens = body["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                return Ok(Outcome {
                    line: result_line(n, Some(custom_id), Some((status, request_id, body)), None),
                    ok: status == 200,
                    tokens,
                });
            }
            Ok(resp) => format!("HTTP {}", resp.status()),
            Err(e) => format!("{e}"),
        };
        if !retry.pause().await {
            bail!(
                "line {n}: the router at {} kept failing for {}s ({failure})",
                args.url,
                args.retry_for_secs
            );
        }
    }
}

pub fn run(args: BatchArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("cannot read the batch input {}", args.input.display()))?;
    let lines = parse_input(&text, &args.input)?;
    let done = done_lines(&args.output)?;
    check_resume(
        &lines,
        &done,
        &args.input.display().to_string(),
        &args.output.display().to_string(),
    )?;
    let total = lines.len();
    let todo: Vec<(usize, Line)> = lines.into_iter().filter(|(n, _)| !done.contains_key(n)).collect();
    let skipped = total - todo.len();
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.output)
        .with_context(|| format!("cannot open the batch output {}", args.output.display()))?;
    if skipped > 0 {
        eprintln!(
            "resuming: {skipped} of {total} lines are in {} already",
            args.output.display()
        );
    }

    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("batch [{elapsed_precise}] {wide_bar} {pos}/{len} lines, {msg}, ETA {eta}")
    {
        bar.set_style(style);
    }
    bar.set_position(skipped as u64);
    bar.reset_eta();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let summary = rt.block_on(async {
        let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
        let (http, args) = (&http, &args);
        let mut results = futures::stream::iter(todo)
            .map(|(n, line)| async move {
                match line {
                    Line::Request { custom_id, url, body } => run_one(http, args, n, &custom_id, &url, &body).await,
                    Line::Invalid { custom_id, message } => Ok(Outcome {
                        line: result_line(
                            n,
                            custom_id.as_deref(),
                            None,
                            Some(json!({"code": "invalid_line", "message": message})),
                        ),
                        ok: false,
                        tokens: 0,
                    }),
                }
            })
            .buffer_unordered(args.concurrency as usize);
        let (start, mut tokens, mut written, mut failed) = (Instant::now(), 0u64, 0usize, 0usize);
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            let outcome = tokio::select! {
                next = results.next() => match next {
                    Some(o) => o?,
                    None => break,
                },
                _ = &mut ctrl_c => {
                    // Every finished line is written and flushed; those in flight
                    // run again on resume.
                    bar.abandon();
                    eprintln!(
                        "interrupted: {} of {total} lines are in {}; run the same command again to finish",
                        skipped + written,
                        args.output.display()
                    );
                    std::process::exit(130);
                }
            };
            out.write_all(outcome.line.as_bytes())
                .and_then(|()| out.flush())
                .with_context(|| format!("cannot write to {}", args.output.display()))?;
            written += 1;
            failed += usize::from(!outcome.ok);
            tokens += outcome.tokens;
            bar.inc(1);
            bar.set_message(format!(
                "{:.0} tok/s",
                tokens as f64 / start.elapsed().as_secs_f64().max(1e-3)
            ));
        }
        bar.finish();
        anyhow::Ok(format!(
            "{total} lines: {written} run now ({failed} of them errors, in the output), {skipped} before; \
             {tokens} tokens in {:.1}s",
            start.elapsed().as_secs_f64()
        ))
    })?;
    eprintln!("{summary}");
    Ok(())
}
