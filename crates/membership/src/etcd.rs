//! A small client for the parts of etcd's v3 API that membership needs. Every call
//! has a deadline, so an unreachable etcd is an error, never a hang.

use anyhow::{bail, Context, Result};
use sirocco_proto::etcd as pb;
use sirocco_proto::etcd::kv_client::KvClient;
use sirocco_proto::etcd::lease_client::LeaseClient;
use sirocco_proto::etcd::watch_client::WatchClient;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
    pub endpoints: Vec<String>,
}

/// The end of the key range holding every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => bail!("etcd {what}: {}", s.message()),
        Err(_) => bail!("etcd {what}: no answer within {CALL_TIMEOUT:?}"),
    }
}

impl Etcd {
    /// A client for `endpoints` (URLs); connections are made lazily and re-made after
    /// outages, so this succeeds even while etcd is down.
    pub fn new(endpoints: &[String]) -> Result<Self> {
        if endpoints.is_empty() {
            bail!("no etcd endpoint given");
        }
        let eps = endpoints
            .iter()
            .map(|e| {
                Ok(Endpoint::from_shared(e.clone())
                    .with_context(|| format!("bad etcd endpoint {e:?}"))?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true))
            })
            .collect::<Result<Vec<_>>>()?;
        let channel = Channel::balance_list(eps.into_iter());
        Ok(Etcd {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel.clone()),
            watch: WatchClient::new(channel),
            endpoints: endpoints.to_vec(),
        })
    }

    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<i64> {
        let r = timed(
            "put",
            self.kv.clone().put(pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value,
                lease,
            }),
        )
        .await?;
        Ok(r.header.map_or(0, |h| h.revision))
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let r = timed(
            "get",
            self.kv.clone().range(pb::RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            }),
        )
        .await?;
        Ok(r.kvs.into_iter().next().map(|kv| kv.value))
    }

    /// Every key under `prefix` with its value, and the store's revision.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(i64, Vec<(String, Vec<u8>)>)> {
        let r = timed(
            "range",
            self.kv.clone().range(pb::RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                ..Default::default()
            }),
        )
        .await?;
        let rev = r.header.map_or(0, |h| h.revision);
        Ok((
            rev,
            r.kvs
                .into_iter()
                .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value))
                .collect(),
        ))
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        timed(
            "delete",
            self.kv.clone().delete_range(pb::DeleteRangeRequest {
                key: key.as_bytes().to_vec(),
                range_end: Vec::new(),
            }),
        )
        .await?;
        Ok(())
    }

    /// A new lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<i64> {
        let r = timed(
            "lease grant",
            self.lease.clone().lease_grant(pb::LeaseGrantRequest { ttl, id: 0 }),
        )
        .await?;
        if !r.error.is_empty() {
            bail!("etcd lease grant: {}", r.error);
        }
        Ok(r.id)
    }

    pub async fn revoke(&self, id: i64) -> Result<()> {
        timed(
            "lease revoke",
            self.lease.clone().lease_revoke(pb::LeaseRevokeRequest { id }),
        )
        .await?;
        Ok(())
    }

    /// Renews lease `id` once; returns its new TTL (0: the lease had expired).
    pub async fn keep_alive(&self, id: i64) -> Result<i64> {
        let req = tokio_stream::once(pb::LeaseKeepAliveRequest { id });
        let mut stream = timed("keepalive", self.lease.clone().lease_keep_alive(req)).await?;
        match tokio::time::timeout(CALL_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(r))) => Ok(r.ttl),
            Ok(Ok(None)) => bail!("etcd keepalive: stream closed"),
            Ok(Err(s)) => bail!("etcd keepalive: {}", s.message()),
            Err(_) => bail!("etcd keepalive: no answer within {CALL_TIMEOUT:?}"),
        }
    }

    /// Watches every key under `prefix` from `start_revision` on.
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream> {
        let req = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                start_revision,
                progress_notify: true,
            })),
        };
        // The request stream must stay open, or etcd ends the watch.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(req).await.ok();
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let events = timed("watch", self.watch.clone().watch(stream)).await?;
        Ok(WatchStream { events, _requests: tx })
    }
}

/// A watch's responses. The request side stays open as long as this lives, since
/// etcd ends a watch whose request stream closes.
pub struct WatchStream {
    pub events: tonic::Streaming<pb::WatchResponse>,
    _requests: tokio::sync::mpsc::Sender<pb::WatchRequest>,
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
