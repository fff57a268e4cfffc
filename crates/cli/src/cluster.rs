//! `sirocco shard`, `sirocco router` and `sirocco serve`: the serving processes.
//! `serve` (and plain `sirocco`) starts a whole cluster on this machine: one process
//! per shard, and the router in this process.

use anyhow::{Context, Result};
use clap::Args;
use sirocco_engine::EngineOptions;
use sirocco_model::{DeviceSpec, ModelSource};
use sirocco_router::{BatchConfig, Discovery, RouterOptions};
use sirocco_scheduler::SchedulerConfig;
use sirocco_shard::ShardOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Engine flags shared by `shard` and `serve`.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Compute and weight dtype: f32, bf16 or f16 (default: f32 on cpu, bf16 on cuda).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Where to compute: cpu, cuda or cuda:N (cuda needs a build with the cuda feature).
    /// `serve` gives shard k of its tp*replicas shards the ordinal N + k.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// KV cache budget per shard, in MiB.
    #[arg(long, default_value_t = 2048)]
    pub kv_cache_mib: usize,
    /// Token slots per KV cache block.
    #[arg(long, default_value_t = 64)]
    pub kv_block_size: usize,
    #[arg(long, value_parser = ["int8", "int4"], help = crate::QUANTIZE_HELP)]
    pub quantize: Option<String>,
}

impl EngineArgs {
    fn options(&self, tp: usize) -> Result<EngineOptions> {
        Ok(EngineOptions {
            tp,
            dtype: DeviceSpec::parse(&self.device)?.dtype_or_default(self.dtype.as_deref())?,
            device: DeviceSpec::parse(&self.device)?,
            kv_cache_bytes: self.kv_cache_mib << 20,
            kv_block_size: self.kv_block_size,
            quantize: self.quantize.as_deref().map(str::parse).transpose()?,
        })
    }
}

/// A feature turned on or off.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    On,
    Off,
}

/// Batching flags shared by `router` and `serve`.
#[derive(Args, Debug, Clone)]
pub struct RouterArgs {
    /// Requests waiting beyond this many (besides those a free batch slot takes at
    /// once) are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 512)]
    pub max_queue: usize,
    /// Seconds a request may wait in the queue for a replica to start it before it
    /// ends with RESOURCE_EXHAUSTED (HTTP 429); unbounded when absent.
    #[arg(long)]
    pub max_queue_wait: Option<f64>,
    /// Sequences decoded together by one replica.
    #[arg(long, default_value_t = SchedulerConfig::DEFAULT_MAX_BATCH_SIZE)]
    pub max_batch_size: usize,
    /// Prompt tokens of one sequence per step.
    #[arg(long, default_value_t = SchedulerConfig::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Prompt tokens of all sequences per step.
    #[arg(long, default_value_t = SchedulerConfig::DEFAULT_PREFILL_BUDGET)]
    pub prefill_budget: usize,
    /// Largest max_new_tokens a request may ask for (default: the model's context).
    #[arg(long)]
    pub max_new_tokens_limit: Option<usize>,
    /// Seconds to wait for shards to come up.
    #[arg(long, default_value_t = 300)]
    pub connect_timeout: u64,
    /// Seconds the requests of a failed replica wait for another replica before
    /// ending with UNAVAILABLE.
    #[arg(long, default_value_t = 5.0)]
    pub failover_timeout: f64,
    /// Address of the HTTP endpoints: /metrics, /health, /ready.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Seconds an HTTP client has to send a request's headers (an idle keep-alive
    /// connection: its next request's); then the connection closes.
    #[arg(long, default_value_t = 10.0)]
    pub http_header_timeout: f64,
    /// Seconds an HTTP client has to send a request's body; then it gets 408.
    #[arg(long, default_value_t = 30.0)]
    pub http_body_timeout: f64,
    /// Seconds since a replica's last completed step within which it counts as ready.
    #[arg(long, default_value_t = 10.0)]
    pub ready_window: f64,
    /// Seconds an idle replica waits between canary steps.
    #[arg(long, default_value_t = 2.0)]
    pub canary_interval: f64,
    /// Seconds a canary step may take before its replica is failed.
    #[arg(long, default_value_t = 5.0)]
    pub canary_timeout: f64,
    /// Seconds any step may take before its replica is failed.
    #[arg(long, default_value_t = 120.0)]
    pub step_timeout: f64,
    /// Seconds a step may always take; past them, a step 20 times slower than its
    /// replica's recent pace fails the replica (a stalled rank), up to --step-timeout.
    #[arg(long, default_value_t = 5.0)]
    pub step_deadline_floor: f64,
    /// Reuse the KV of prompt prefixes the shards already hold (requests may opt
    /// out), and route each request to the replica most likely to hold its prefix.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub prefix_cache: Switch,
    /// With the prefix cache, a replica holding a request's prefix takes it unless it
    /// runs more than this many sequences beyond the least busy replica.
    #[arg(long, default_value_t = 16)]
    pub route_imbalance: usize,
    /// Require this key (Authorization: Bearer KEY) on the HTTP /v1 API and the gRPC API.
    #[arg(long, env = "SIROCCO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Where the OpenAI Files and Batch APIs (/v1/files, /v1/batches) keep uploaded
    /// files, batches and their results; unfinished batches resume from here when the
    /// router starts. Default: $XDG_DATA_HOME/sirocco (~/.local/share/sirocco).
    #[arg(long, env = "SIROCCO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// The data directory when none is given: the user's data home, as XDG says.
fn default_data_dir() -> PathBuf {
    let home = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    home.join("sirocco")
}

#[derive(Args, Debug, Clone)]
pub struct ShardArgs {
    /// Hugging Face checkpoint directory or llama.cpp .gguf file; the built-in model when absent.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub rank: usize,
    #[arg(long)]
    pub world_size: usize,
    /// Address of this shard's internal gRPC API.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where rank 0 listens for the other ranks' collective connections (with --etcd,
    /// rank 0 picks a port and publishes it, so this may be left out).
    #[arg(long, required_unless_present = "etcd")]
    pub peer_addr: Option<String>,
    #[command(flatten)]
    pub membership: MembershipArgs,
    /// The replica this shard belongs to, when registering in etcd.
    #[arg(long, default_value = "r0")]
    pub replica: String,
    /// Seconds the shard's etcd lease lives without renewal.
    #[arg(long, default_value_t = 5)]
    pub lease_ttl: u64,
    /// This start of the replica's processes, the same for all its ranks (`serve`
    /// gives each start a fresh one): ranks join only a rendezvous of their own run.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Seconds a collective operation waits for a peer before the shard gives up.
    #[arg(long, default_value_t = 30)]
    pub collective_timeout: u64,
    /// Where this shard serves /metrics (none when absent).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Cores to compute on, e.g. 0-3 (one pinned compute thread each); all when absent.
    /// `serve` gives each of its CPU shards cores of its own.
    #[arg(long)]
    pub cpus: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Where membership lives, shared by `shard`, `router` and `serve`.
#[derive(Args, Debug, Clone)]
pub struct MembershipArgs {
    /// etcd endpoints (comma-separated URLs or host:port): register shards there and
    /// let the router discover them.
    #[arg(long)]
    pub etcd: Option<String>,
    /// The cluster's name: its key prefix in etcd.
    #[arg(long, default_value = "sirocco")]
    pub cluster: String,
}

#[derive(Args, Debug, Clone)]
pub struct RouterCmdArgs {
    /// Address of the public gRPC API.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// One replica's shard addresses in rank order, comma-separated; repeat per replica.
    #[arg(long, required_unless_present = "etcd")]
    pub shards: Vec<String>,
    #[command(flatten)]
    pub membership: MembershipArgs,
    /// The model directory or .gguf file, for its tokenizer and chat template (the built-in
    /// tokenizer when absent).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub router: RouterArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Hugging Face checkpoint directory or llama.cpp .gguf file; the built-in model when absent.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tensor-parallel degree: shard processes per replica.
    #[arg(long, default_value_t = 2)]
    pub tp: usize,
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Address of the public gRPC API.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub membership: MembershipArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub router: RouterArgs,
}

impl Default for ServeArgs {
    fn default() -> Self {
        use clap::FromArgMatches;
        let cmd = <ServeArgs as Args>::augment_args(clap::Command::new("serve"));
        ServeArgs::from_arg_matches(&cmd.get_matches_from(["serve"])).expect("defaults parse")
    }
}

impl ServeArgs {
    /// What plain `sirocco` serves: the trained default model (fetched on first use)
    /// over three tensor-parallel ranks (its 9 query and 3 KV heads allow 1, 3 or 9),
    /// or, when it cannot be had, the built-in model with a line saying why.
    pub fn out_of_the_box() -> Self {
        let mut a = ServeArgs::default();
        let m = crate::models::known(crate::models::DEFAULT).expect("the default model is known");
        match crate::models::fetch(m) {
            Ok(path) => {
                a.model = Some(path);
                a.tp = 3;
            }
            Err(e) => eprintln!(
                "sirocco: serving the built-in model (random weights, it babbles): {} could not be fetched \
                 ({e:#}); run `sirocco model fetch {}` once online",
                m.name, m.name
            ),
        }
        a
    }
}

/// Listens for Ctrl-C and SIGTERM from now on (the handlers are in place when this
/// returns, so a signal during start-up is not lost; needs a runtime context) and
/// resolves on the first.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down");
    })
}

/// A runtime, and a future that resolves on Ctrl-C or SIGTERM received from now on.
fn runtime_and_stop() -> Result<(
    tokio::runtime::Runtime,
    impl std::future::Future<Output = ()> + Send + 'static,
)> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let stop = {
        let _in_runtime = rt.enter();
        shutdown_signal()?
    };
    Ok((rt, stop))
}

pub fn run_shard(a: ShardArgs) -> Result<()> {
    if let Some(cpus) = &a.cpus {
        crate::cpus::pin(&crate::cpus::parse(cpus)?)?;
    }
    let opts = ShardOptions {
        model: ModelSource::from_arg(a.model.as_deref()),
        rank: a.rank,
        world_size: a.world_size,
        listen: a.listen,
        peer_addr: a.peer_addr.clone(),
        engine: a.engine.options(a.world_size)?,
        collective_timeout: Duration::from_secs(a.collective_timeout),
        metrics_addr: a.metrics_addr,
        membership: a.membership.etcd.as_ref().map(|e| sirocco_shard::MembershipOptions {
            endpoints: sirocco_membership::parse_endpoints(e),
            cluster: a.membership.cluster.clone(),
            replica: a.replica.clone(),
            lease_ttl: Duration::from_secs(a.lease_ttl),
            run_id: a.run_id.clone(),
        }),
    };
    let (rt, stop) = runtime_and_stop()?;
    rt.block_on(sirocco_shard::run(opts, stop))
}

fn router_options(
    listen: SocketAddr,
    replicas: Vec<Vec<String>>,
    membership: &MembershipArgs,
    model: Option<&std::path::Path>,
    r: &RouterArgs,
) -> Result<RouterOptions> {
    let tokenizer = crate::generate::load_tokenizer(model)?;
    let discovery = match &membership.etcd {
        Some(e) => Discovery::Etcd {
            endpoints: sirocco_membership::parse_endpoints(e),
            cluster: membership.cluster.clone(),
        },
        None => Discovery::Static(replicas),
    };
    let seconds = |flag: &str, s: f64| {
        Duration::try_from_secs_f64(s).with_context(|| format!("{flag} must be a number of seconds >= 0, got {s}"))
    };
    Ok(RouterOptions {
        listen,
        discovery,
        tokenizer,
        model_name: model.map_or("sirocco-builtin".into(), crate::models::served_name),
        max_queue: r.max_queue,
        batch: BatchConfig {
            schedule: SchedulerConfig {
                max_batch_size: r.max_batch_size,
                prefill_chunk: r.prefill_chunk.max(1),
                prefill_budget: r.prefill_budget.max(1),
            },
            failover_timeout: Duration::from_secs_f64(r.failover_timeout),
            canary_interval: Duration::from_secs_f64(r.canary_interval),
            canary_timeout: Duration::from_secs_f64(r.canary_timeout),
            step_timeout: Duration::from_secs_f64(r.step_timeout),
            step_deadline_floor: Duration::from_secs_f64(r.step_deadline_floor),
            prefix_cache: r.prefix_cache == Switch::On,
            route_imbalance: r.route_imbalance,
        },
        http_addr: r.http_addr,
        ready_window: Duration::from_secs_f64(r.ready_window),
        chat: match model {
            Some(path) => sirocco_tokenizer::ChatTemplate::from_model(path)?,
            None => sirocco_tokenizer::ChatTemplate::mistral(),
        },
        api_key: r.api_key.clone(),
        max_queue_wait: r.max_queue_wait.map(|s| seconds("--max-queue-wait", s)).transpose()?,
        http_header_timeout: seconds("--http-header-timeout", r.http_header_timeout)?,
        http_body_timeout: seconds("--http-body-timeout", r.http_body_timeout)?,
        max_new_tokens_limit: r.max_new_tokens_limit,
        connect_timeout: Duration::from_secs(r.connect_timeout),
        data_dir: r.data_dir.clone().unwrap_or_else(default_data_dir),
    })
}

pub fn run_router(a: RouterCmdArgs) -> Result<()> {
    let replicas = a
        .shards
        .iter()
        .map(|s| {
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect()
        })
        .collect();
    let opts = router_options(a.listen, replicas, &a.membership, a.model.as_deref(), &a.router)?;
    let (rt, stop) = runtime_and_stop()?;
    rt.block_on(sirocco_router::run(opts, stop))
}

fn free_port() -> Result<u16> {
    Ok(crate::ports::free_port()?)
}

pub fn run_serve(a: ServeArgs) -> Result<()> {
    // Refuse a bad degree here, before any process starts.
    let loaded = ModelSource::from_arg(a.model.as_deref()).open()?;
    sirocco_model::Partition::new(&loaded.config, 0, a.tp)?;
    // From here on a stop is honoured, even while the shards are still starting.
    let (rt, stop) = runtime_and_stop()?;
    let exe = std::env::current_exe().context("cannot find the sirocco executable")?;
    let (commands, replicas) = shard_commands(&a)?;
    let supervisor = crate::supervise::Supervisor::start(exe, commands, a.membership.etcd.is_some());
    let opts = router_options(a.listen, replicas.clone(), &a.membership, a.model.as_deref(), &a.router)?;
    println!(
        "sirocco: router gRPC on {} ({} replica(s) × tp {})",
        a.listen, a.replicas, a.tp
    );
    for (i, r) in replicas.iter().enumerate() {
        println!("sirocco: replica {i} shards {}", r.join(", "));
    }
    println!(
        "sirocco: web console and OpenAI API on http://{}/ (once a replica is up)",
        opts.http_addr
    );
    println!("sirocco: try `sirocco client` (asks a question) or `sirocco client --prompt \"Once upon\"`; Ctrl-C stops everything");
    let result = rt.block_on(sirocco_router::run(opts, stop));
    // The router's connections close with its runtime, so the shards leave at once.
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(supervisor);
    result
}

/// Per replica, per rank.
type PerShard<T> = Vec<Vec<T>>;

/// The command line of every shard `serve` starts, with the addresses of each
/// replica's shards. A restarted shard keeps its addresses.
fn shard_commands(a: &ServeArgs) -> Result<(PerShard<crate::supervise::ShardCommand>, PerShard<String>)> {
    let device = DeviceSpec::parse(&a.engine.device)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / (a.tp * a.replicas)).max(1);
    let core_ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let mut commands = Vec::new();
    let mut replicas = Vec::new();
    for replica in 0..a.replicas {
        let peer = format!("127.0.0.1:{}", free_port()?);
        let replica_name = format!("r{replica}");
        let mut addrs = Vec::new();
        let mut shards = Vec::new();
        for rank in 0..a.tp {
            let addr = format!("127.0.0.1:{}", free_port()?);
            let metrics_addr = format!("127.0.0.1:{}", free_port()?);
            let mut args: Vec<std::ffi::OsString> = Vec::new();
            let mut arg = |x: &str| args.push(x.into());
            for x in ["shard", "--rank", &rank.to_string(), "--world-size", &a.tp.to_string()] {
                arg(x);
            }
            for x in ["--listen", &addr, "--metrics-addr", &metrics_addr] {
                arg(x);
            }
            arg("--device");
            arg(&device.offset(replica * a.tp + rank).to_string());
            arg("--kv-cache-mib");
            arg(&a.engine.kv_cache_mib.to_string());
            arg("--kv-block-size");
            arg(&a.engine.kv_block_size.to_string());
            if let Some(d) = &a.engine.dtype {
                arg("--dtype");
                arg(d);
            }
            if let Some(q) = &a.engine.quantize {
                arg("--quantize");
                arg(q);
            }
            match &a.membership.etcd {
                Some(e) => {
                    for x in [
                        "--etcd",
                        e,
                        "--cluster",
                        &a.membership.cluster,
                        "--replica",
                        &replica_name,
                    ] {
                        arg(x);
                    }
                }
                None => {
                    arg("--peer-addr");
                    arg(&peer);
                }
            }
            let mut envs = Vec::new();
            // Shards of one machine share its cores rather than each taking all of them:
            // on the CPU each gets cores of its own (pinned) when there are enough.
            let shard_index = replica * a.tp + rank;
            if device == DeviceSpec::Cpu
                && core_ids.len() >= a.tp * a.replicas
                && std::env::var_os("RAYON_NUM_THREADS").is_none()
            {
                let per = core_ids.len() / (a.tp * a.replicas);
                let mine = &core_ids[shard_index * per..(shard_index + 1) * per];
                arg("--cpus");
                arg(&crate::cpus::format(mine));
            } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
                envs.push(("RAYON_NUM_THREADS".to_string(), threads.to_string()));
            }
            if let Some(m) = &a.model {
                args.push("--model".into());
                args.push(m.into());
            }
            tracing::info!(replica, rank, addr = %addr, metrics = %metrics_addr, "shard configured");
            shards.push(crate::supervise::ShardCommand { args, envs });
            addrs.push(addr);
        }
        commands.push(shards);
        replicas.push(addrs);
    }
    Ok((commands, replicas))
}
