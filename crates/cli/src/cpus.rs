//! `--cpus`: the cores a shard computes on. Shards of one machine each get their own
//! cores, and the compute threads (rayon's pool, which the matmuls and attention run
//! on) are pinned one per core, so that ranks neither oversubscribe nor migrate.

use anyhow::{bail, Context, Result};

/// Parses a core list such as `0-3,6`.
pub fn parse(s: &str) -> Result<Vec<usize>> {
    let mut cores = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("bad --cpus entry {part:?}: use core numbers and ranges, e.g. 0-3,6");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().with_context(bad)?, b.trim().parse().with_context(bad)?);
                if a > b {
                    bail!(bad());
                }
                cores.extend(a..=b);
            }
            None => cores.push(part.parse().with_context(bad)?),
        }
    }
    cores.sort_unstable();
    cores.dedup();
    if cores.is_empty() {
        bail!("--cpus names no core");
    }
    Ok(cores)
}

/// Formats cores as `parse` reads them.
pub fn format(cores: &[usize]) -> String {
    cores.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// Builds rayon's global pool with one thread per core of `cores`, each pinned to its
/// core, and confines the calling thread (and so every thread started after it: the
/// rank thread that also computes, the runtime's) to `cores`. Must run before
/// anything uses rayon.
pub fn pin(cores: &[usize]) -> Result<()> {
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    if let Some(missing) = cores.iter().find(|c| !available.contains(c)) {
        bail!("--cpus: core {missing} is not available to this process (it may use {available:?})");
    }
    // candle sizes its own matmul parallelism by this variable.
    std::env::set_var("RAYON_NUM_THREADS", cores.len().to_string());
    let pinned = cores.to_vec();
    rayon::ThreadPoolBuilder::new()
        .num_threads(cores.len())
        .thread_name(|i| format!("compute-{i}"))
        .start_handler(move |i| {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: pinned[i] }) {
                tracing::warn!(core = pinned[i], "could not pin a compute thread");
            }
        })
        .build_global()
        .context("the compute thread pool was already started")?;
    confine_process_threads(cores);
    tracing::info!(cores = %format(cores), "compute threads pinned");
    Ok(())
}

/// Restricts the calling thread to `cores`; threads it starts inherit that.
fn confine_process_threads(cores: &[usize]) {
    #[cfg(target_os = "linux")]
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays inside it for the
    // core numbers that `pin` checked exist; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cores {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "could not confine the shard's threads to its cores");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cores;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_lists_parse_and_round_trip() {
        assert_eq!(parse("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse(" 2 , 1,1 ").unwrap(), vec![1, 2]);
        assert_eq!(parse(&format(&[0, 4, 5])).unwrap(), vec![0, 4, 5]);
        for bad in ["", "a", "3-1", "1-x", ","] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
