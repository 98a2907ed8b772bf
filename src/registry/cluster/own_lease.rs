//! A short etcd lease of a node's own, for the keys that say something of
//! that node alone: that it probes ([`super::election`]), that it is up
//! ([`super::announce`]). While the node lives, the lease is renewed
//! every third of its time to live, and granted anew (with whatever the
//! node hangs on it put again) when etcd has lost it; when the node stops
//! cleanly, it is revoked, so its keys go at once; when the node dies,
//! they go as the lease expires.
//!
//! [`hold`] runs that life in the background; what a node does with each
//! lease it is granted is a [`Term`] of it.

use std::future::Future;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::etcd::{self, Etcd, LeaseId};

/// How long a failed etcd call waits before it is tried again: short next
/// to a lease's time to live, so a takeover is not held up by it.
pub(super) const RETRY: Duration = Duration::from_millis(250);

/// The shortest time to live etcd grants, whatever is asked.
const MIN_TTL: Duration = Duration::from_secs(2);

/// What a node does with one lease of its own, until the lease is lost or
/// the node stops: puts its keys under it, and renews it when
/// [`OwnLease::due`].
pub(super) trait Term: Send + Sync + 'static {
    /// Serves one lease; answers why it ended.
    fn serve(
        &self,
        lease: &mut OwnLease,
        stop: &CancellationToken,
    ) -> impl Future<Output = Ended> + Send;
}

/// Why a term of one lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// The node stops: the lease is revoked.
    Stopped,
    /// The lease is gone in etcd (expired, or revoked behind the node's
    /// back), and its keys with it: another is granted.
    Lost,
}

/// What one renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Renewal {
    /// etcd renewed it: it has its whole time to live ahead again.
    Renewed,
    /// etcd no longer has it.
    Lost,
    /// No answer in time: it may or may not have been renewed.
    Unanswered,
}

/// One lease of a node's own, as granted, and its renewals.
pub(super) struct OwnLease {
    id: LeaseId,
    ttl: Duration,
    /// What it is for, in logs.
    what: &'static str,
    etcd: Etcd,
    keepalive: etcd::KeepAlive,
    ticks: Interval,
    /// When a renewal that etcd confirmed was sent (or the grant asked
    /// for): the lease has lived since at least then.
    renewed: Instant,
}

impl OwnLease {
    /// Grants a lease of `ttl` (etcd's minimum at least), trying again
    /// until etcd grants one; None once `stop` is cancelled.
    async fn grant(
        etcd: &Etcd,
        ttl: Duration,
        what: &'static str,
        stop: &CancellationToken,
    ) -> Option<OwnLease> {
        let ttl = ttl.max(MIN_TTL);
        loop {
            let asked = Instant::now();
            let granted = tokio::select! {
                _ = stop.cancelled() => return None,
                granted = etcd.lease_grant(ttl) => granted,
            };
            match granted {
                Ok(lease) => {
                    let every = ttl / 3;
                    let mut ticks = tokio::time::interval_at(asked + every, every);
                    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    return Some(OwnLease {
                        id: lease.id,
                        ttl,
                        what,
                        etcd: etcd.clone(),
                        keepalive: etcd.lease_keepalive(lease.id),
                        ticks,
                        renewed: asked,
                    });
                }
                Err(err) => tracing::warn!(%err, "cannot grant a lease for {what}"),
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// The lease's id, to put keys under or fence writes on.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Its time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// When it was last known to have its whole time to live ahead.
    pub fn renewed(&self) -> Instant {
        self.renewed
    }

    /// Waits until the next renewal is due, a third of the time to live
    /// after the last. Cancel-safe: one branch of a `select!`, whose
    /// handler then calls [`OwnLease::renew`].
    pub async fn due(&mut self) {
        self.ticks.tick().await;
    }

    /// Renews the lease once. Bounded by the interval between renewals,
    /// not by etcd's request timeout, so whoever relies on the lease
    /// learns in time that it may be lapsing.
    pub async fn renew(&mut self) -> Renewal {
        let sent = Instant::now();
        match tokio::time::timeout(self.ttl / 3, self.keepalive.beat()).await {
            Ok(Ok(Some(_))) => {
                self.renewed = sent;
                Renewal::Renewed
            }
            Ok(Ok(None)) => Renewal::Lost,
            Ok(Err(err)) => {
                tracing::warn!(%err, "cannot renew the lease of {}", self.what);
                Renewal::Unanswered
            }
            Err(_) => {
                tracing::warn!("no answer renewing the lease of {}", self.what);
                // The next beat opens a new stream, perhaps to another
                // member: one that hangs is not waited on again.
                self.keepalive = self.etcd.lease_keepalive(self.id);
                Renewal::Unanswered
            }
        }
    }

    /// Revokes the lease, deleting its keys at once. Waits no longer than
    /// the time to live: by then the lease has expired anyway, and a
    /// stopping node must not wait on an etcd that does not answer.
    async fn revoke(self) {
        let what = self.what;
        match tokio::time::timeout(self.ttl, self.etcd.lease_revoke(self.id)).await {
            Ok(Ok(())) => tracing::info!("revoked the lease of {what}"),
            Ok(Err(err)) => tracing::warn!(%err, "cannot revoke the lease of {what}"),
            Err(_) => tracing::warn!("no answer revoking the lease of {what}"),
        }
    }
}

/// Leases of `ttl` held by `term` in the background, one after another,
/// until [`Holder::release`] or `stop`.
pub(super) struct Holder {
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Grants a lease of `ttl` and has `term` serve it; grants another each
/// time one is lost; revokes the last when `stop` is cancelled. `what`
/// names what the lease is for, in logs ("the prober's key").
pub(super) fn hold(
    etcd: Etcd,
    ttl: Duration,
    what: &'static str,
    stop: CancellationToken,
    term: impl Term,
) -> Holder {
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            while let Some(mut lease) = OwnLease::grant(&etcd, ttl, what, &stop).await {
                match term.serve(&mut lease, &stop).await {
                    Ended::Lost => {
                        tracing::warn!("etcd lost the lease of {what}; granting another")
                    }
                    Ended::Stopped => return lease.revoke().await,
                }
            }
        }
    });
    Holder {
        stop,
        task: Mutex::new(Some(task)),
    }
}

impl Holder {
    /// Stops holding, and revokes the lease; returns once etcd has been
    /// told (or could not be within the lease's time to live).
    pub async fn release(&self) {
        self.stop.cancel();
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}
