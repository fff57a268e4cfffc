//! Starts real sirocco processes on 127.0.0.1 for end-to-end tests: shard processes
//! and a router, each a `sirocco` subprocess, all killed when the handle drops.

use sirocco_proto::v1 as pb;
use sirocco_proto::v1::sirocco_client::SiroccoClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A loopback port for a test server (see `ports`: never an ephemeral one).
pub fn free_port() -> u16 {
    super::ports::free_port().unwrap()
}

pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub router_addr: String,
    /// The router's /metrics, /health and /ready.
    pub http_addr: String,
    /// `shard_metrics[replica][rank]`: each shard's /metrics address.
    pub shard_metrics: Vec<Vec<String>>,
    /// `shards[replica][rank]`
    pub shards: Vec<Vec<Proc>>,
    pub shard_addrs: Vec<Vec<String>>,
    pub router: Option<Proc>,
    /// How the router was started, to start it again.
    router_cmd: Vec<String>,
    pub log_dir: tempfile::TempDir,
}

#[derive(Clone)]
pub struct ClusterSpec<'a> {
    pub model: Option<&'a Path>,
    pub tp: usize,
    pub replicas: usize,
    pub router_args: Vec<String>,
    pub shard_args: Vec<String>,
    /// etcd endpoint: shards register there and the router discovers them.
    pub etcd: Option<String>,
}

impl Default for ClusterSpec<'_> {
    fn default() -> Self {
        ClusterSpec {
            model: None,
            tp: 2,
            replicas: 1,
            router_args: Vec::new(),
            shard_args: Vec::new(),
            etcd: None,
        }
    }
}

impl<'a> ClusterSpec<'a> {
    /// One replica of `model` on one rank, the router's defaults otherwise.
    pub fn one(model: &'a Path) -> Self {
        ClusterSpec {
            model: Some(model),
            tp: 1,
            ..Default::default()
        }
    }
}

/// Starts `sirocco args`, its log appended to `<log_dir>/<name>.log`.
fn spawn(name: &str, args: &[String], log_dir: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log_dir.join(format!("{name}.log")))
        .unwrap();
    let child = Command::new(super::sirocco_bin())
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc {
        name: name.into(),
        child,
    }
}

fn shard_args(spec: &ClusterSpec, replica: usize, rank: usize, addr: &str, peer: &str) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "shard".into(),
        "--rank".into(),
        rank.to_string(),
        "--world-size".into(),
        spec.tp.to_string(),
        "--listen".into(),
        addr.to_string(),
    ];
    match &spec.etcd {
        Some(e) => args.extend(["--etcd".into(), e.clone(), "--replica".into(), format!("r{replica}")]),
        None => args.extend(["--peer-addr".into(), peer.to_string()]),
    }
    if let Some(m) = spec.model {
        args.push("--model".into());
        args.push(m.display().to_string());
    }
    args.extend(spec.shard_args.iter().cloned());
    args
}

impl Cluster {
    /// Starts the cluster, again on fresh ports if one that `free_port` handed out was
    /// taken by another process before ours bound it.
    pub fn start(spec: ClusterSpec) -> Cluster {
        let mut attempt = 0;
        loop {
            let c = Cluster::launch(spec.clone());
            match c.wait_ready() {
                Ok(()) => return c,
                Err(logs) if attempt < 2 && logs.contains("Address already in use") => attempt += 1,
                Err(logs) => panic!("cluster did not come up:\n{logs}"),
            }
        }
    }

    fn launch(spec: ClusterSpec) -> Cluster {
        let log_dir = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            router_addr: format!("127.0.0.1:{}", free_port()),
            http_addr: format!("127.0.0.1:{}", free_port()),
            shard_metrics: Vec::new(),
            shards: Vec::new(),
            shard_addrs: Vec::new(),
            router: None,
            router_cmd: Vec::new(),
            log_dir,
        };
        for _ in 0..spec.replicas {
            c.add_replica(&spec);
        }
        let mut args: Vec<String> = vec![
            "router".into(),
            "--listen".into(),
            c.router_addr.clone(),
            "--http-addr".into(),
            c.http_addr.clone(),
        ];
        match &spec.etcd {
            Some(e) => args.extend(["--etcd".into(), e.clone()]),
            None => {
                for a in &c.shard_addrs {
                    args.push("--shards".into());
                    args.push(a.join(","));
                }
            }
        }
        if let Some(m) = spec.model {
            args.push("--model".into());
            args.push(m.display().to_string());
        }
        args.extend(spec.router_args.iter().cloned());
        c.router = Some(spawn("router", &args, c.log_dir.path()));
        c.router_cmd = args;
        c
    }

    /// Kills the router (SIGKILL); the shards stay up.
    pub fn stop_router(&mut self) {
        if let Some(mut r) = self.router.take() {
            r.child.kill().unwrap();
            r.child.wait().unwrap();
        }
    }

    /// Starts the router again on the same addresses (after [`Cluster::stop_router`])
    /// and waits until it serves. Its log goes on in `router.log`.
    pub fn start_router(&mut self) {
        self.router = Some(spawn("router", &self.router_cmd, self.log_dir.path()));
        if let Err(logs) = self.wait_ready() {
            panic!("the router did not come back:\n{logs}");
        }
    }

    /// Starts the shard processes of one more replica (named `r<index>` in etcd).
    pub fn add_replica(&mut self, spec: &ClusterSpec) -> usize {
        let r = self.shards.len();
        let peer = format!("127.0.0.1:{}", free_port());
        let mut procs = Vec::new();
        let mut addrs = Vec::new();
        let mut metrics = Vec::new();
        for rank in 0..spec.tp {
            let addr = format!("127.0.0.1:{}", free_port());
            let metrics_addr = format!("127.0.0.1:{}", free_port());
            let mut args = shard_args(spec, r, rank, &addr, &peer);
            args.extend(["--metrics-addr".into(), metrics_addr.clone()]);
            procs.push(spawn(&format!("shard-{r}-{rank}"), &args, self.log_dir.path()));
            addrs.push(addr);
            metrics.push(metrics_addr);
        }
        self.shards.push(procs);
        self.shard_addrs.push(addrs);
        self.shard_metrics.push(metrics);
        r
    }

    /// Sends SIGTERM to a shard (it drains when on etcd).
    pub fn terminate_shard(&mut self, replica: usize, rank: usize) {
        let pid = self.shards[replica][rank].child.id();
        Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.log_dir.path()).unwrap() {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!(
                "--- {}\n{}\n",
                p.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        out
    }

    /// Streams `reqs` concurrently; calls `during` once `after` streams have 10 tokens.
    pub fn run_streams(
        &mut self,
        reqs: Vec<pb::GenerateRequest>,
        after: usize,
        during: impl FnOnce(&mut Cluster),
    ) -> Vec<(Vec<u32>, pb::Finished)> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let handles: Vec<_> = rt.block_on(async {
            let mut v = Vec::new();
            for req in reqs {
                let mut client = self.client().await;
                let tx = tx.clone();
                v.push(tokio::spawn(async move {
                    let mut s = client.generate_stream(req).await?.into_inner();
                    let mut ids = Vec::new();
                    while let Some(ev) = s.message().await? {
                        match ev.event {
                            Some(pb::generate_stream_response::Event::Token(t)) => {
                                ids.push(t.id);
                                if ids.len() == 10 {
                                    let _ = tx.send(());
                                }
                            }
                            Some(pb::generate_stream_response::Event::Finished(f)) => {
                                return Ok::<_, tonic::Status>((ids, f))
                            }
                            None => {}
                        }
                    }
                    Err(tonic::Status::internal("no finish event"))
                }));
            }
            for _ in 0..after {
                rx.recv().await;
            }
            v
        });
        during(self);
        rt.block_on(async {
            let mut out = Vec::new();
            for (i, h) in handles.into_iter().enumerate() {
                out.push(
                    h.await
                        .unwrap()
                        .unwrap_or_else(|e| panic!("request {i}: {e}\n{}", self.logs())),
                );
            }
            out
        })
    }

    /// The router's whole log so far.
    pub fn router_log(&self) -> String {
        std::fs::read_to_string(self.log_dir.path().join("router.log")).unwrap_or_default()
    }

    fn wait_ready(&self) -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ok = rt.block_on(async {
                let mut c = SiroccoClient::connect(format!("http://{}", self.router_addr))
                    .await
                    .ok()?;
                match c.model_info(pb::ModelInfoRequest {}).await {
                    // An API key in force also means the router is up.
                    Ok(_) => Some(()),
                    Err(s) if s.code() == tonic::Code::Unauthenticated => Some(()),
                    Err(_) => None,
                }
            });
            if ok.is_some() {
                return Ok(());
            }
            let logs = self.logs();
            if Instant::now() > deadline || logs.contains("Address already in use") {
                return Err(logs);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub async fn client(&self) -> SiroccoClient<Channel> {
        SiroccoClient::connect(format!("http://{}", self.router_addr))
            .await
            .unwrap()
    }

    /// How many times a replica has joined the router's rotation so far.
    /// Polls `/v1/cluster` until the first replica's KV holds nothing (panics after 10 s).
    pub async fn wait_kv_free(&self) {
        let start = Instant::now();
        loop {
            let (_, body) = super::http::get(&self.http_addr, "/v1/cluster").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["replicas"][0]["kv_used_tokens"] == 0 {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "KV still held: {v:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn joins(&self) -> usize {
        self.router_log().matches("replica joins the rotation").count()
    }

    /// Waits until the router's log shows `n` replicas joining the rotation.
    pub fn wait_joined(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.joins() < n {
            assert!(Instant::now() < deadline, "replicas did not join:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for a shard to exit on its own; panics unless it exits successfully
    /// within `limit`.
    pub fn wait_shard_exit(&mut self, replica: usize, rank: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.shards[replica][rank].child.try_wait().unwrap() {
                assert!(status.success(), "shard {replica}/{rank} exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "shard {replica}/{rank} did not leave within {limit:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills a shard with SIGKILL.
    pub fn kill_shard(&mut self, replica: usize, rank: usize) {
        let p = &mut self.shards[replica][rank];
        p.child.kill().unwrap();
        p.child.wait().unwrap();
    }
}

/// Prints the cluster's logs when a test fails while it is alive.
pub struct LogsOnPanic<'a>(pub &'a Cluster);

impl Drop for LogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0.logs());
        }
    }
}

/// A model directory with generated weights, for tests that need shapes or a
/// tokenizer the shared references do not have.
pub fn generated_model(dir: &Path, config: &sirocco_model::MistralConfig, tokenizer: Option<&Path>) -> PathBuf {
    let tensors = sirocco_model::generated_tensors(config, 11).unwrap();
    sirocco_model::weights::write_checkpoint(dir, &tensors, 1).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config.to_hf_json()).unwrap(),
    )
    .unwrap();
    if let Some(t) = tokenizer {
        std::fs::copy(t, dir.join("tokenizer.json")).unwrap();
    }
    dir.to_path_buf()
}
