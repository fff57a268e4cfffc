//! A real etcd server for tests: Debian's `etcd` binary on free 127.0.0.1 ports with
//! a temporary data directory, killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdServer {
    pub client_url: String,
    peer_url: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl EtcdServer {
    pub fn start() -> EtcdServer {
        let client = super::cluster::free_port();
        let peer = super::cluster::free_port();
        let mut e = EtcdServer {
            client_url: format!("http://127.0.0.1:{client}"),
            peer_url: format!("http://127.0.0.1:{peer}"),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        e.resume();
        e
    }

    /// Starts (again) on the same ports and data.
    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &self.client_url,
                "--advertise-client-urls",
                &self.client_url,
            ])
            .args([
                "--listen-peer-urls",
                &self.peer_url,
                "--initial-advertise-peer-urls",
                &self.peer_url,
            ])
            .args(["--initial-cluster", &format!("test={}", self.peer_url)])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the etcd binary is needed (Debian package etcd-server; scripts/test.sh installs it)");
        self.child = Some(child);
        self.wait_up();
    }

    fn wait_up(&self) {
        let addr = self.client_url.trim_start_matches("http://").to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Let it elect itself leader.
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Kills the server (its data stays for `resume`).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
