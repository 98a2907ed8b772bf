//! Which registry node probes the persistent instances: one at a time, so
//! an instance is not asked N times an interval and its verdicts do not
//! race, and another as soon as that one is gone.
//!
//! The winner is the node whose etcd lease holds the key
//! `{prefix}/prober`. A node grants itself a short lease, keeps it alive,
//! and puts the key under it only when the key is absent (one
//! transaction, so two nodes cannot both win). The others watch the key
//! and try again when it is deleted: its holder revoked its lease on a
//! clean shutdown, or stopped renewing it and etcd let it expire. The
//! lease is also the fence: a verdict is written only on condition that
//! the key still holds this node's lease, so a node that lost the key
//! without noticing yet cannot overwrite its successor.
//!
//! A node that cannot renew its lease steps down before the lease could
//! have expired in etcd, whether or not it did: it cannot tell, and two
//! probers are worse than none for a moment.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::own_lease::{self, Ended, Holder, OwnLease, RETRY, Renewal, Term};
use crate::etcd::{self, Compare, Etcd, EventKind, LeaseId, Op, OpResult, Txn, WatchBatch};

/// This node's part in the election of the prober.
pub(in crate::registry) struct Election {
    leads: watch::Receiver<bool>,
    /// The etcd lease this node campaigns with (0 before the first
    /// grant): what the key holds while this node leads.
    lease: Arc<AtomicI64>,
    holder: Holder,
}

impl Election {
    /// Campaigns for `key` with leases of `ttl` until `resign` is
    /// cancelled; then revokes the lease, so another node takes over at
    /// once rather than after the TTL.
    pub(in crate::registry) fn start(
        etcd: Etcd,
        key: String,
        ttl: Duration,
        resign: CancellationToken,
    ) -> Election {
        let (leads_tx, leads) = watch::channel(false);
        let lease = Arc::new(AtomicI64::new(0));
        let campaign = Campaign {
            etcd: etcd.clone(),
            key,
            node_id: format!("{:016x}", rand::random::<u64>()),
            leads: leads_tx,
            lease: lease.clone(),
        };
        Election {
            leads,
            lease,
            holder: own_lease::hold(etcd, ttl, "the prober's key", resign, campaign),
        }
    }

    /// Whether this node leads now, and its changes.
    pub(in crate::registry) fn leads(&self) -> watch::Receiver<bool> {
        self.leads.clone()
    }

    /// The lease the key must hold for a write of this node's verdicts to
    /// go through.
    pub(in crate::registry) fn fence(&self) -> Option<LeaseId> {
        match self.lease.load(Ordering::Relaxed) {
            0 => None,
            id => Some(LeaseId(id)),
        }
    }

    /// Stops campaigning and gives the key up; returns once etcd has
    /// been told (or could not be within the lease's TTL).
    pub(in crate::registry) async fn resign(&self) {
        self.holder.release().await;
    }
}

struct Campaign {
    etcd: Etcd,
    key: String,
    node_id: String,
    leads: watch::Sender<bool>,
    lease: Arc<AtomicI64>,
}

impl Term for Campaign {
    /// Campaigns with `lease` for as long as it lives, and steps down
    /// when it ends.
    async fn serve(&self, lease: &mut OwnLease, resign: &CancellationToken) -> Ended {
        self.lease.store(lease.id().0, Ordering::Relaxed);
        let ended = self.term(lease, resign).await;
        self.step_down();
        ended
    }
}

impl Campaign {
    async fn term(&self, lease: &mut OwnLease, resign: &CancellationToken) -> Ended {
        // Whether the key is this lease's, as last seen.
        let mut won = false;
        loop {
            let (holds, watched_from) = match self.try_win(lease.id()).await {
                Ok(tried) => tried,
                // Revoked behind this node's back, or expired while etcd
                // could not be reached: the key is not this lease's to win.
                Err(err) if err.kind == etcd::ErrorKind::LeaseNotFound => return Ended::Lost,
                Err(err) => {
                    tracing::warn!(%err, "cannot campaign for the prober");
                    self.step_down();
                    tokio::select! {
                        _ = resign.cancelled() => return Ended::Stopped,
                        _ = tokio::time::sleep(RETRY) => continue,
                    }
                }
            };
            if holds && !won {
                tracing::info!(node = %self.node_id, "this node probes the persistent instances now");
            }
            won = holds;
            self.leads.send_replace(won && safe(lease));
            let watch = self.etcd.watch_prefix(&self.key, watched_from, false);
            let mut watch = tokio::select! {
                _ = resign.cancelled() => return Ended::Stopped,
                watch = watch => match watch {
                    Ok(watch) => watch,
                    Err(err) => {
                        tracing::warn!(%err, "cannot watch the prober's key");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                },
            };
            // Until the key changes, or the watch ends: then the
            // transaction tells again who holds it.
            loop {
                tokio::select! {
                    _ = resign.cancelled() => return Ended::Stopped,
                    _ = lease.due() => {
                        if lease.renew().await == Renewal::Lost {
                            return Ended::Lost;
                        }
                        let leads = won && safe(lease);
                        if *self.leads.borrow() != leads {
                            if !leads {
                                tracing::warn!("the prober's lease may have expired; probing stops");
                            }
                            self.leads.send_replace(leads);
                        }
                    }
                    batch = watch.next() => match batch {
                        Some(Ok(WatchBatch::Events { events, .. })) => {
                            let ours = events.iter().any(|event| {
                                event.kv.key == self.key.as_bytes()
                                    && (event.kind == EventKind::Delete
                                        || event.kv.lease != Some(lease.id()))
                            });
                            if ours {
                                break;
                            }
                        }
                        Some(Ok(WatchBatch::Progress { .. })) => {}
                        Some(Ok(WatchBatch::Compacted { .. })) | Some(Err(_)) | None => break,
                    },
                }
            }
        }
    }

    /// Puts the key under `lease` if nobody holds it: whether `lease`
    /// holds it now, and the revision to watch it from.
    async fn try_win(&self, lease: LeaseId) -> Result<(bool, i64), etcd::Error> {
        let txn = Txn::new()
            .when([Compare::absent(&self.key)])
            .and_then([Op::put(&self.key, &self.node_id, Some(lease))])
            .or_else([Op::get(&self.key)]);
        let result = self.etcd.txn(txn).await?;
        let holds = result.succeeded
            || matches!(
                result.results.first(),
                // A campaign of this lease whose answer was lost won.
                Some(OpResult::Get(kvs)) if kvs.first().is_some_and(|kv| kv.lease == Some(lease))
            );
        Ok((holds, result.revision + 1))
    }

    fn step_down(&self) {
        self.leads
            .send_if_modified(|leads| std::mem::replace(leads, false));
    }
}

/// Whether this node may go on probing under `lease`: up to a third of
/// the TTL short of its expiry after the last renewal, for the clocks of
/// etcd and this node and the time the renewal took to arrive.
fn safe(lease: &OwnLease) -> bool {
    lease.renewed().elapsed() < lease.ttl() * 2 / 3
}
