//! A replica: the shards of one tensor-parallel group, driven together. Every step
//! goes to every rank at once; rank 0's answer is the result, and any rank's failure
//! fails the step (the replica cannot continue without it).

use anyhow::{bail, Context, Result};
use sirocco_model::MistralConfig;
use sirocco_proto::shard::v1 as pb;
use sirocco_proto::shard::v1::shard_client::ShardClient;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// What the ranks of a replica reported when it was connected.
#[derive(Clone, Debug)]
pub struct ReplicaInfo {
    pub config: MistralConfig,
    pub world_size: usize,
    pub kv_capacity_tokens: usize,
    pub kv_block_size: usize,
    pub kv_positions_per_seq: usize,
    pub fingerprint: String,
}

pub struct Replica {
    pub id: usize,
    pub addrs: Vec<String>,
    clients: Vec<ShardClient<Channel>>,
    pub info: ReplicaInfo,
}

const MAX_MESSAGE: usize = 256 << 20;

async fn connect_one(addr: &str, deadline: Instant) -> Result<(ShardClient<Channel>, pb::InfoResponse)> {
    let uri = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("bad shard address {addr:?}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2));
    let mut last_log = Instant::now();
    loop {
        let attempt = async {
            let ch = endpoint.connect().await?;
            let mut c = ShardClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            let info = c.info(pb::InfoRequest {}).await?.into_inner();
            anyhow::Ok((c, info))
        };
        match attempt.await {
            Ok(x) => return Ok(x),
            Err(e) if Instant::now() < deadline => {
                if last_log.elapsed() > Duration::from_secs(5) {
                    tracing::info!(shard = addr, error = %e, "waiting for shard");
                    last_log = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context(format!("shard {addr} did not answer in time"))),
        }
    }
}

impl Replica {
    /// Connects to every rank (waiting for them to come up until `timeout`) and checks
    /// that they form one replica: ranks in order, same world size, same model.
    pub async fn connect(id: usize, addrs: &[String], timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut clients = Vec::new();
        let mut infos = Vec::new();
        for a in addrs {
            let (c, i) = connect_one(a, deadline).await?;
            clients.push(c);
            infos.push(i);
        }
        let first = &infos[0];
        for (pos, (i, a)) in infos.iter().zip(addrs).enumerate() {
            if i.rank as usize != pos || i.world_size as usize != addrs.len() {
                bail!(
                    "replica {id}: shard {a} is rank {} of {}, but was listed as rank {pos} of {}",
                    i.rank,
                    i.world_size,
                    addrs.len()
                );
            }
            if i.fingerprint != first.fingerprint {
                bail!(
                    "replica {id}: shard {a} serves a different model (fingerprint {} vs {})",
                    i.fingerprint,
                    first.fingerprint
                );
            }
        }
        let config: MistralConfig =
            serde_json::from_str(&first.config_json).context("shard sent an unreadable config")?;
        Ok(Replica {
            id,
            addrs: addrs.to_vec(),
            clients,
            info: ReplicaInfo {
                config,
                world_size: addrs.len(),
                kv_capacity_tokens: infos.iter().map(|i| i.kv_capacity_tokens as usize).min().unwrap_or(0),
                kv_block_size: first.kv_block_size as usize,
                kv_positions_per_seq: first.kv_positions_per_seq as usize,
                fingerprint: first.fingerprint.clone(),
            },
        })
    }

    /// Runs one step on every rank; returns rank 0's response.
    pub async fn step(&self, req: pb::StepRequest) -> Result<pb::StepResponse> {
        let calls = self
            .clients
            .iter()
            .zip(&self.addrs)
            .enumerate()
            .map(|(rank, (c, addr))| {
                let mut c = c.clone();
                let req = req.clone();
                async move {
                    c.step(req)
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| anyhow::anyhow!("rank {rank} ({addr}): {}", s.message()))
                }
            });
        // The first failure fails the step at once: a stalled rank must not hold the
        // others' answers (or the clients) hostage.
        let mut results = futures::future::try_join_all(calls).await?;
        Ok(results.swap_remove(0))
    }
}
