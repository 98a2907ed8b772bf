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
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::etcd::{self, Compare, Etcd, EventKind, LeaseId, Op, OpResult, Txn, WatchBatch};

/// How long a failed etcd call waits before it is tried again: short
/// next to a lease's TTL, so a takeover is not held up by it.
const RETRY: Duration = Duration::from_millis(250);

/// This node's part in the election of the prober.
pub(in crate::registry) struct Election {
    leads: watch::Receiver<bool>,
    /// The etcd lease this node campaigns with (0 before the first
    /// grant): what the key holds while this node leads.
    lease: Arc<AtomicI64>,
    resign: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
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
            etcd,
            key,
            // etcd grants whole seconds, 2 at least, whatever is asked.
            ttl: ttl.max(Duration::from_secs(2)),
            node_id: format!("{:016x}", rand::random::<u64>()),
            leads: leads_tx,
            lease: lease.clone(),
        };
        let task = tokio::spawn(campaign.run(resign.clone()));
        Election {
            leads,
            lease,
            resign,
            task: Mutex::new(Some(task)),
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
    /// been told (or could not be within its request timeout).
    pub(in crate::registry) async fn resign(&self) {
        self.resign.cancel();
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

struct Campaign {
    etcd: Etcd,
    key: String,
    ttl: Duration,
    node_id: String,
    leads: watch::Sender<bool>,
    lease: Arc<AtomicI64>,
}

/// Why a term of one lease ended.
enum Ended {
    /// Resigning: revoke the lease.
    Resigned,
    /// The lease is gone in etcd: grant another.
    LeaseLost,
}

impl Campaign {
    async fn run(self, resign: CancellationToken) {
        loop {
            let granted = tokio::select! {
                _ = resign.cancelled() => return,
                granted = self.etcd.lease_grant(self.ttl) => granted,
            };
            let lease = match granted {
                Ok(lease) => lease.id,
                Err(err) => {
                    tracing::warn!(%err, "cannot grant the lease to campaign for the prober with");
                    tokio::select! {
                        _ = resign.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => continue,
                    }
                }
            };
            self.lease.store(lease.0, Ordering::Relaxed);
            match self.term(lease, &resign).await {
                Ended::LeaseLost => self.step_down(),
                Ended::Resigned => {
                    self.step_down();
                    // Not longer than the TTL: by then the lease has
                    // expired anyway, and a stopping node must not wait
                    // on an etcd that does not answer.
                    match tokio::time::timeout(self.ttl, self.etcd.lease_revoke(lease)).await {
                        Ok(Ok(())) => tracing::info!("gave the probing of persistent instances up"),
                        Ok(Err(err)) => tracing::warn!(%err, "cannot give the prober's key up"),
                        Err(_) => tracing::warn!("no answer giving the prober's key up"),
                    }
                    return;
                }
            }
        }
    }

    /// Campaigns with `lease` for as long as it lives.
    async fn term(&self, lease: LeaseId, resign: &CancellationToken) -> Ended {
        let mut keepalive = self.etcd.lease_keepalive(lease);
        // When the lease was last known to have its whole TTL ahead; a
        // renewal counts from when it was sent, not answered.
        let mut renewed = Instant::now();
        let mut ticks = tokio::time::interval(self.ttl / 3);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether the key is this lease's, as last seen.
        let mut won = false;
        loop {
            let (holds, watched_from) = match self.try_win(lease).await {
                Ok(tried) => tried,
                // Revoked behind this node's back, or expired while etcd
                // could not be reached: the key is not this lease's to win.
                Err(err) if err.kind == etcd::ErrorKind::LeaseNotFound => return Ended::LeaseLost,
                Err(err) => {
                    tracing::warn!(%err, "cannot campaign for the prober");
                    self.step_down();
                    tokio::select! {
                        _ = resign.cancelled() => return Ended::Resigned,
                        _ = tokio::time::sleep(RETRY) => continue,
                    }
                }
            };
            if holds && !won {
                tracing::info!(node = %self.node_id, "this node probes the persistent instances now");
            }
            won = holds;
            self.leads
                .send_replace(won && renewed.elapsed() < self.safe_for());
            let watch = self.etcd.watch_prefix(&self.key, watched_from, false);
            let mut watch = tokio::select! {
                _ = resign.cancelled() => return Ended::Resigned,
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
                    _ = resign.cancelled() => return Ended::Resigned,
                    _ = ticks.tick() => {
                        let sent = Instant::now();
                        // Bounded by the tick, not by etcd's request
                        // timeout, so stepping down is not held up by it.
                        match tokio::time::timeout(self.ttl / 3, keepalive.beat()).await {
                            Ok(Ok(Some(_))) => renewed = sent,
                            Ok(Ok(None)) => return Ended::LeaseLost,
                            Ok(Err(err)) => tracing::warn!(%err, "cannot renew the prober's lease"),
                            Err(_) => tracing::warn!("no answer renewing the prober's lease"),
                        }
                        let leads = won && renewed.elapsed() < self.safe_for();
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
                                        || event.kv.lease != Some(lease))
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

    /// How long after a renewal this node may go on probing: a third of
    /// the TTL short of its expiry, for the clocks of etcd and this node
    /// and the time the renewal took to arrive.
    fn safe_for(&self) -> Duration {
        self.ttl * 2 / 3
    }

    fn step_down(&self) {
        self.leads
            .send_if_modified(|leads| std::mem::replace(leads, false));
    }
}
