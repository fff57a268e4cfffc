//! Processes under test: signals, a process's children as /proc shows them, and a
//! whole `sirocco serve` cluster run as one process (killed with its children when
//! the handle drops).

use super::cluster::free_port;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} {pid} failed");
}

/// The state letter /proc gives `pid` (R, S, T, Z, ...), or None once it is gone.
pub fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the state follows it.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether `pid` is a process that has not exited (a zombie has exited).
pub fn alive(pid: u32) -> bool {
    state(pid).is_some_and(|s| s != 'Z')
}

/// The processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out.sort_unstable();
    out
}

/// Polls `f` until it is true; panics with `what` (and `context()`) after `limit`.
pub fn wait_until(limit: Duration, what: &str, context: impl Fn() -> String, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}\n{}", context());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `sirocco serve` as a process.
pub struct Serve {
    pub child: Child,
    pub listen: String,
    pub http: String,
    pub log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Serve {
    /// Starts `serve --model <model> --tp <tp> --replicas <replicas>` plus `extra`.
    pub fn start(model: &Path, tp: usize, replicas: usize, extra: &[&str]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let listen = format!("127.0.0.1:{}", free_port());
        let http = format!("127.0.0.1:{}", free_port());
        let child = Command::new(super::sirocco_bin())
            .args(["serve", "--model", model.to_str().unwrap()])
            .args(["--tp", &tp.to_string(), "--replicas", &replicas.to_string()])
            .args(["--listen", &listen, "--http-addr", &http])
            .args(extra)
            .env("RAYON_NUM_THREADS", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Serve {
            child,
            listen,
            http,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The shard processes serve runs now.
    pub fn shards(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    /// Waits until a generation through the router succeeds.
    pub fn wait_serving(&self, limit: Duration) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let addr = format!("http://{}", self.listen);
        wait_until(
            limit,
            "serve did not answer a generation",
            || self.log(),
            || {
                rt.block_on(async {
                    let Ok(c) = super::requests::connect(&addr).await else {
                        return false;
                    };
                    super::requests::stream_all(c, super::requests::ids_request(&[1, 5, 9], 3))
                        .await
                        .is_ok()
                })
            },
        );
    }

    /// Waits for serve to exit; returns whether it exited successfully.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.success();
            }
            assert!(Instant::now() < deadline, "serve did not exit in time\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let shards = self.shards();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in shards {
            if alive(pid) {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
}
