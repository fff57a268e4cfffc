//! Loopback ports for the processes `serve` (and the end-to-end tests) start.
//!
//! A port is chosen before the process that listens on it starts, so it is taken
//! from outside the kernel's ephemeral range: an outgoing connection (ours or any
//! other process's) is never handed such a port between our check and the child's
//! bind, which otherwise fails now and then with "Address already in use".

use std::sync::atomic::{AtomicU32, Ordering};

/// A loopback port nothing listens on now and the kernel will not hand out on its
/// own. Each process walks its own stretch of the range (by pid) and hands a port
/// out at most once.
pub fn free_port() -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = non_ephemeral_ports();
    let span = hi - lo;
    let start = std::process::id().wrapping_mul(997) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (lo + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free loopback port in {lo}..{hi}"),
    ))
}

/// The ports the kernel never assigns on its own: below its ephemeral range when
/// that leaves room, else above it.
fn non_ephemeral_ports() -> (u32, u32) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let (low, high) = range
        .and_then(|r| {
            let mut it = r.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    if low >= 12000 {
        (10000, low)
    } else {
        (high + 1, 65536)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_not_ephemeral() {
        let (lo, hi) = non_ephemeral_ports();
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let mut unique = ports.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
        for p in ports {
            assert!((lo..hi).contains(&(p as u32)));
        }
    }
}
