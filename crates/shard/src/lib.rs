//! A shard: one tensor-parallel rank of a replica, in a process of its own. It loads
//! its slice of the model, joins its peers' collective, and serves the internal
//! `sirocco.shard.v1` API: every rank receives the same steps in the same order, and
//! rank 0 answers with the sampled tokens.
//!
//! A shard whose collective breaks (a peer died or stalled) cannot take part in any
//! later step, so it reports the failure and exits rather than hang.

pub mod convert;
mod service;

use anyhow::{Context, Result};
use candle_core::Device;
use sirocco_collective::{Collective, TcpCollective};
use sirocco_engine::{EngineOptions, Rank};
use sirocco_model::{Mistral, ModelSource, Partition};
use sirocco_proto::shard::v1::shard_server::ShardServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use service::ShardService;

/// How to start a shard.
#[derive(Clone, Debug)]
pub struct ShardOptions {
    pub model: ModelSource,
    pub rank: usize,
    pub world_size: usize,
    /// Where this shard serves the internal gRPC API.
    pub listen: SocketAddr,
    /// Where rank 0 listens for its peers' collective connections.
    pub peer_addr: String,
    pub engine: EngineOptions,
    /// How long a collective operation waits for a peer before failing.
    pub collective_timeout: Duration,
}

/// Loads the rank and serves until `shutdown` resolves or the collective breaks.
pub async fn run(opts: ShardOptions, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let started = Instant::now();
    let o = opts.clone();
    let (rank, info) = tokio::task::spawn_blocking(move || load(&o))
        .await
        .context("loading task panicked")??;
    tracing::info!(
        rank = opts.rank,
        world = opts.world_size,
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        kv_capacity_tokens = info.kv_capacity_tokens,
        "shard loaded"
    );
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<String>(1);
    let service = ShardService::new(rank, info, fatal_tx);
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    tracing::info!(addr = %opts.listen, rank = opts.rank, "shard serving");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut fatal: Option<String> = None;
    let stop = async {
        tokio::select! {
            _ = shutdown => {},
            msg = fatal_rx.recv() => { fatal = msg; },
        }
    };
    tonic::transport::Server::builder()
        .add_service(
            ShardServer::new(service)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
        )
        .serve_with_incoming_shutdown(incoming, stop)
        .await?;
    match fatal {
        Some(msg) => anyhow::bail!("shard stopped: {msg}"),
        None => {
            tracing::info!(rank = opts.rank, "shard stopped");
            Ok(())
        }
    }
}

fn load(opts: &ShardOptions) -> Result<(Rank, service::Info)> {
    let loaded = opts.model.open()?;
    let part = Partition::new(&loaded.config, opts.rank, opts.world_size)?;
    tracing::info!(rank = opts.rank, world = opts.world_size, peer = %opts.peer_addr, "joining the collective");
    let coll = TcpCollective::connect(opts.rank, opts.world_size, &opts.peer_addr, opts.collective_timeout)
        .with_context(|| format!("rank {} could not join the collective at {}", opts.rank, opts.peer_addr))?;
    let coll: Arc<dyn Collective> = Arc::new(coll);
    let model = Mistral::load(
        &loaded.config,
        loaded.weights.as_ref(),
        part,
        opts.engine.dtype,
        &Device::Cpu,
        coll,
    )?;
    let capacity = opts.engine.kv_capacity_tokens(&model);
    let info = service::Info {
        rank: opts.rank,
        world_size: opts.world_size,
        config_json: serde_json::to_string(&loaded.config)?,
        kv_capacity_tokens: capacity,
        kv_block_size: opts.engine.kv_block_size,
        kv_positions_per_seq: loaded.config.kv_positions(),
        fingerprint: loaded.fingerprint(),
        dtype: format!("{:?}", opts.engine.dtype).to_lowercase(),
    };
    Ok((Rank::new(model, capacity, opts.engine.kv_block_size), info))
}
