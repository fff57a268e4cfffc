//! `serve`'s shard processes, supervised. A thread of its own starts them, reaps
//! every exit at once (no zombies), and restarts a replica whose shard died: its
//! other ranks are stopped too (their collective lost a member and cannot take a new
//! one), and the whole replica starts again as a new run, after a backoff that grows
//! while it keeps failing. Meanwhile the router has taken the replica out of rotation
//! (its steps fail, its keys vanish). The children die with `serve` however it ends:
//! an orderly stop terminates them, and the kernel sends them SIGTERM if `serve`
//! itself is killed.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How to start one shard process.
#[derive(Clone, Debug)]
pub struct ShardCommand {
    pub args: Vec<OsString>,
    pub envs: Vec<(String, String)>,
}

/// How often children are checked.
const POLL: Duration = Duration::from_millis(100);
/// First wait before a failed replica starts again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A replica up this long has recovered: its next failure waits [`FIRST_BACKOFF`] again.
const STABLE: Duration = Duration::from_secs(60);
/// How long children may take to leave after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

struct ReplicaProcs {
    index: usize,
    shards: Vec<ShardCommand>,
    /// Running children by rank; empty while the replica waits to start.
    children: Vec<Child>,
    started: Instant,
    next_start: Instant,
    failures: u32,
}

pub struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts every replica's shards (`replicas[r][rank]`) and watches over them. With
    /// `run_ids`, each start of a replica passes `--run-id` with a fresh id.
    pub fn start(exe: PathBuf, replicas: Vec<Vec<ShardCommand>>, run_ids: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let now = Instant::now();
        let procs = replicas
            .into_iter()
            .enumerate()
            .map(|(index, shards)| ReplicaProcs {
                index,
                shards,
                children: Vec::new(),
                started: now,
                next_start: now,
                failures: 0,
            })
            .collect();
        // The children's parent-death signal follows the thread that spawned them, so
        // one long-lived thread spawns them all.
        let thread = std::thread::Builder::new()
            .name("shard-supervisor".into())
            .spawn(move || supervise(&exe, procs, run_ids, &flag))
            .expect("cannot start the supervisor thread");
        Supervisor {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Supervisor {
    /// Stops every shard: SIGTERM, then SIGKILL for those still there after a grace.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn supervise(exe: &std::path::Path, mut replicas: Vec<ReplicaProcs>, run_ids: bool, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        for r in &mut replicas {
            if r.children.is_empty() {
                if Instant::now() >= r.next_start {
                    r.start(exe, run_ids);
                }
                continue;
            }
            if let Some((rank, status)) = r.exited() {
                r.failures = if r.started.elapsed() >= STABLE {
                    1
                } else {
                    r.failures + 1
                };
                let wait = FIRST_BACKOFF
                    .saturating_mul(1 << (r.failures - 1).min(5))
                    .min(MAX_BACKOFF);
                tracing::error!(
                    replica = r.index,
                    rank,
                    %status,
                    restart_in_s = wait.as_secs(),
                    failures = r.failures,
                    "shard exited; stopping its replica's other ranks and restarting the replica"
                );
                for c in &mut r.children {
                    kill(c);
                }
                r.children.clear();
                r.next_start = Instant::now() + wait;
            }
        }
        std::thread::sleep(POLL);
    }
    let mut all: Vec<Child> = replicas.into_iter().flat_map(|r| r.children).collect();
    for c in &all {
        signal(c, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        all.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        if all.is_empty() {
            return;
        }
        std::thread::sleep(POLL);
    }
    for c in &mut all {
        tracing::warn!(pid = c.id(), "shard did not stop in time; killing it");
        kill(c);
    }
}

impl ReplicaProcs {
    fn start(&mut self, exe: &std::path::Path, run_ids: bool) {
        let run_id = format!("{:016x}{:08x}", rand::random::<u64>(), self.index);
        for (rank, shard) in self.shards.iter().enumerate() {
            let mut cmd = Command::new(exe);
            cmd.args(&shard.args);
            if run_ids {
                cmd.args(["--run-id", &run_id]);
            }
            cmd.envs(shard.envs.iter().map(|(k, v)| (k, v)));
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: runs in the child between fork and exec and calls only
            // async-signal-safe functions (prctl, getppid, setpgid); it touches no
            // memory of the parent's and allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    // Die with serve, even if serve is killed without a chance to stop us.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // serve died before the line above took effect (an error code,
                    // not a message: nothing may allocate here).
                    if libc::getppid() != parent {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    // A process group of its own: Ctrl-C in serve's terminal reaches
                    // serve, which stops the shards in order, not the shards directly.
                    if libc::setpgid(0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            match cmd.spawn() {
                Ok(child) => {
                    tracing::info!(replica = self.index, rank, pid = child.id(), %run_id, "shard started");
                    self.children.push(child);
                }
                Err(e) => {
                    tracing::error!(replica = self.index, rank, error = %e, "cannot start a shard process");
                    for c in &mut self.children {
                        kill(c);
                    }
                    self.children.clear();
                    self.next_start = Instant::now() + MAX_BACKOFF;
                    return;
                }
            }
        }
        self.started = Instant::now();
    }

    /// The first child that has exited (reaped), with its rank and status.
    fn exited(&mut self) -> Option<(usize, std::process::ExitStatus)> {
        self.children
            .iter_mut()
            .enumerate()
            .find_map(|(rank, c)| c.try_wait().ok().flatten().map(|s| (rank, s)))
    }
}

fn signal(c: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) with the pid of a child we have not reaped yet, so the pid
    // still names our child (a reaped pid could have been reused).
    unsafe {
        libc::kill(c.id() as libc::pid_t, sig);
    }
}

/// SIGKILL and reap.
fn kill(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}
