//! A shard's keys in etcd, kept alive under a lease. If etcd becomes unreachable the
//! shard keeps serving; when etcd is back and the lease has expired meanwhile, the
//! keys are written again under a new lease.

use crate::etcd::Etcd;
use anyhow::Result;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Registration {
    etcd: Etcd,
    ttl: i64,
    lease: Arc<AtomicI64>,
    keys: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Registration {
    /// Takes a lease of `ttl` seconds and keeps it alive until [`Registration::leave`].
    pub async fn start(etcd: Etcd, ttl: Duration) -> Result<Self> {
        let ttl = ttl.as_secs().max(1) as i64;
        let lease = Arc::new(AtomicI64::new(etcd.grant(ttl).await?));
        let keys: Arc<Mutex<BTreeMap<String, Vec<u8>>>> = Arc::default();
        let keepalive = tokio::spawn(keep_alive(etcd.clone(), ttl, lease.clone(), keys.clone()));
        Ok(Registration {
            etcd,
            ttl,
            lease,
            keys,
            keepalive,
        })
    }

    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::SeqCst)
    }

    pub fn ttl(&self) -> i64 {
        self.ttl
    }

    /// Writes `key` under the lease, and again whenever the lease is renewed after an
    /// outage. A failure to write now is returned, but the key is still kept for later.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<()> {
        self.keys.lock().unwrap().insert(key.to_string(), value.clone());
        self.etcd.put(key, value, self.lease()).await?;
        Ok(())
    }

    /// Deletes the keys and revokes the lease (a clean shutdown).
    pub async fn leave(self) {
        self.keepalive.abort();
        let keys: Vec<String> = self.keys.lock().unwrap().keys().cloned().collect();
        for k in keys {
            if let Err(e) = self.etcd.delete(&k).await {
                tracing::warn!(key = %k, error = %e, "could not delete key on leaving");
            }
        }
        let _ = self.etcd.revoke(self.lease()).await;
    }
}

async fn keep_alive(etcd: Etcd, ttl: i64, lease: Arc<AtomicI64>, keys: Arc<Mutex<BTreeMap<String, Vec<u8>>>>) {
    let period = Duration::from_millis((ttl as u64 * 1000 / 3).max(200));
    let mut unreachable = false;
    loop {
        tokio::time::sleep(period).await;
        let id = lease.load(Ordering::SeqCst);
        let renewed = match etcd.keep_alive(id).await {
            Ok(t) if t > 0 => Ok(()),
            Ok(_) => {
                tracing::warn!(
                    lease = id,
                    "lease expired while etcd was unreachable; registering again"
                );
                reregister(&etcd, ttl, &lease, &keys).await
            }
            Err(e) => Err(e),
        };
        match renewed {
            Ok(()) if unreachable => {
                tracing::info!("etcd reachable again");
                unreachable = false;
            }
            Ok(()) => {}
            Err(e) if !unreachable => {
                tracing::warn!(error = %e, "etcd unreachable; serving on and retrying");
                unreachable = true;
            }
            Err(_) => {}
        }
    }
}

async fn reregister(etcd: &Etcd, ttl: i64, lease: &AtomicI64, keys: &Mutex<BTreeMap<String, Vec<u8>>>) -> Result<()> {
    let id = etcd.grant(ttl).await?;
    lease.store(id, Ordering::SeqCst);
    let entries: Vec<(String, Vec<u8>)> = keys
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in entries {
        etcd.put(&k, v, id).await?;
    }
    Ok(())
}
