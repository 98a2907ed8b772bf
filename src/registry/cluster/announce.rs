//! Which registry nodes are up. Each node, once it serves, keeps a key of
//! its own, [`Key::Node`] (`{prefix}/n/<address>/<id>`), saying where it
//! listens, since when and which version it runs, on a short lease of its
//! own ([`super::own_lease`]): a node that stops cleanly revokes the lease,
//! so its key goes at once; one that dies leaves its key until the lease
//! expires, within `registry.etcd.prober_ttl`. GetCluster reads the keys
//! from etcd when it is asked; the view skips them.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::RegistryNode;
use super::keys::{self, Key};
use super::own_lease::{self, Ended, Holder, OwnLease, Renewal, Term};
use crate::etcd::{self, Etcd};

/// What a node's key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Said {
    address: SocketAddr,
    started_ms: u64,
    version: String,
}

/// This registry node as GetCluster lists it and, on a cluster node, what
/// keeps its key in etcd.
pub(in crate::registry) struct Announcement {
    addr: SocketAddr,
    /// This run's own: the key's, so that two nodes on one address (on
    /// two hosts) are two keys.
    id: u64,
    /// When it started serving, in Unix ms.
    started_ms: u64,
    holder: Option<Holder>,
}

impl Announcement {
    /// A node serving on `addr` alone (the memory store): nobody else to
    /// tell.
    pub fn local(addr: SocketAddr) -> Announcement {
        Announcement {
            addr,
            id: rand::random(),
            started_ms: now_ms(),
            holder: None,
        }
    }

    /// A node serving on `addr` that keeps its key under `prefix` in
    /// `etcd`, on leases of `ttl`, until [`Announcement::withdraw`] or
    /// `stop`.
    pub fn start(
        etcd: &Etcd,
        prefix: &str,
        addr: SocketAddr,
        ttl: Duration,
        stop: CancellationToken,
    ) -> Announcement {
        let mut announcement = Announcement::local(addr);
        let said = Said {
            address: addr,
            started_ms: announcement.started_ms,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let announcer = Announcer {
            etcd: etcd.clone(),
            key: Key::Node {
                addr,
                id: announcement.id,
            }
            .encode(prefix),
            said: serde_json::to_vec(&said).expect("plain fields serialize"),
        };
        announcement.holder = Some(own_lease::hold(
            etcd.clone(),
            ttl,
            "this node's announcement",
            stop,
            announcer,
        ));
        announcement
    }

    /// This node, as GetCluster lists it to its callers.
    pub fn node(&self) -> RegistryNode {
        RegistryNode {
            address: self.addr,
            started_ms: self.started_ms,
            version: env!("CARGO_PKG_VERSION").to_string(),
            answering: true,
        }
    }

    /// Deletes this node's key; returns once etcd has been told (or could
    /// not be within the lease's TTL).
    pub async fn withdraw(&self) {
        if let Some(holder) = &self.holder {
            holder.release().await;
        }
    }
}

/// The registry nodes up under `prefix`, as etcd has their keys now, in
/// address order; `answering` marks the node that asks, when it has
/// announced itself.
pub(in crate::registry) async fn list(
    etcd: &Etcd,
    prefix: &str,
    answering: Option<&Announcement>,
) -> Result<Vec<RegistryNode>, etcd::Error> {
    let (kvs, _) = etcd.get_prefix(keys::nodes(prefix)).await?;
    Ok(read(prefix, &kvs, answering.map(|this| this.id)))
}

/// The nodes that `kvs` (keys under `prefix`) announce, the one of id
/// `answering` marked. A key whose value cannot be read is skipped.
fn read(prefix: &str, kvs: &[etcd::Kv], answering: Option<u64>) -> Vec<RegistryNode> {
    let nodes = kvs.iter().filter_map(|kv| {
        let Some(Key::Node { id, .. }) = Key::decode(prefix, &kv.key) else {
            return None;
        };
        let said = serde_json::from_slice::<Said>(&kv.value)
            .inspect_err(|err| {
                let key = String::from_utf8_lossy(&kv.key);
                tracing::warn!(%key, %err, "an unreadable registry node's key; skipped");
            })
            .ok()?;
        Some(RegistryNode {
            address: said.address,
            started_ms: said.started_ms,
            version: said.version,
            answering: answering == Some(id),
        })
    });
    nodes.collect()
}

/// Keeps a node's key in etcd, on whichever lease of its own it holds.
struct Announcer {
    etcd: Etcd,
    key: String,
    said: Vec<u8>,
}

impl Term for Announcer {
    /// Puts the key under `lease`, trying again at each renewal until
    /// etcd takes it, and renews the lease until it is lost.
    async fn serve(&self, lease: &mut OwnLease, stop: &CancellationToken) -> Ended {
        let mut put = false;
        loop {
            if !put {
                let written = tokio::select! {
                    _ = stop.cancelled() => return Ended::Stopped,
                    written = self.etcd.put(&self.key, &self.said, Some(lease.id())) => written,
                };
                match written {
                    Ok(_) => put = true,
                    Err(err) if err.kind == etcd::ErrorKind::LeaseNotFound => return Ended::Lost,
                    Err(err) => {
                        tracing::warn!(%err, "cannot announce this registry node; trying again")
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Ended::Stopped,
                _ = lease.due() => {}
            }
            if lease.renew().await == Renewal::Lost {
                return Ended::Lost;
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: String, value: &str) -> etcd::Kv {
        etcd::Kv {
            key: key.into_bytes(),
            value: value.as_bytes().to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: Some(etcd::LeaseId(7)),
        }
    }

    fn node_key(addr: &str, id: u64) -> String {
        Key::Node {
            addr: addr.parse().unwrap(),
            id,
        }
        .encode("/p")
    }

    #[test]
    fn the_nodes_read_back_with_the_asking_one_marked_and_unreadable_ones_skipped() {
        let a = r#"{"address": "10.0.0.1:8848", "started_ms": 1700000000000, "version": "0.1.0"}"#;
        let b = r#"{"address": "10.0.0.2:8848", "started_ms": 1700000000001, "version": "0.2.0", "later": 1}"#;
        let kvs = [
            kv(node_key("10.0.0.1:8848", 1), a),
            kv(node_key("10.0.0.2:8848", 2), b),
            kv(node_key("10.0.0.3:8848", 3), "not json"),
            kv("/p/n/10.0.0.4:8848".into(), a),
        ];
        let nodes = read("/p", &kvs, Some(2));
        let listed: Vec<(String, &str, bool)> = nodes
            .iter()
            .map(|n| (n.address.to_string(), n.version.as_str(), n.answering))
            .collect();
        assert_eq!(
            listed,
            [
                ("10.0.0.1:8848".to_string(), "0.1.0", false),
                ("10.0.0.2:8848".to_string(), "0.2.0", true),
            ]
        );
        assert_eq!(nodes[0].started_ms, 1_700_000_000_000);
        assert!(read("/p", &kvs, None).iter().all(|n| !n.answering));
    }
}
