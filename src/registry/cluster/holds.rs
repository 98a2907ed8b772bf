//! The registry leases a node holds: those whose clients beat through it.
//!
//! In etcd a registry lease is the keys it keeps: its alive key and its
//! instances. They hang on the etcd leases of the node that holds the
//! lease, two a node, granted at its start ([`NodeLeases`]): the alive
//! keys on one whose time to live is the registry's unhealthy timeout, the
//! instances on one whose time to live is its delete timeout. A
//! registration costs etcd one write, batched with others, and no grant.
//!
//! The holder times its clients' silence itself ([`Silences`]), as the
//! memory store's reaper does: a client silent past its unhealthy timeout
//! (or whose last KeepAlive stream broke) loses its alive key, and one
//! silent past its delete timeout loses its instances. Every such write
//! is fenced on the key still hanging on the holder's etcd lease, so a
//! node that lost a client to another node cannot touch what that node
//! holds now.
//!
//! A node that dies takes nothing with it at once: its clients resume on
//! another node, which takes their keys over (puts them again under its
//! own etcd leases) on their first beat there. What nobody takes over,
//! etcd removes when the dead node's leases expire: the alive keys within
//! the unhealthy timeout, the instances within the delete timeout, as if
//! their owners had gone silent at the moment the node died.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Node;
use super::keys::Key;
use crate::etcd::{self, Cmp, Compare, Etcd, LeaseId as EtcdLease, Op, Txn};
use crate::registry::model::{LeaseId, Timings};

/// The etcd leases a node hangs its clients' keys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::registry) struct NodeLeases {
    /// The alive keys', whose time to live is the unhealthy timeout.
    pub alive: EtcdLease,
    /// The instances', whose time to live is the delete timeout.
    pub instances: EtcdLease,
}

impl NodeLeases {
    /// Grants a node's two etcd leases: the alive keys' for `unhealthy`,
    /// the instances' for `delete`.
    pub(super) async fn grant(
        etcd: &Etcd,
        (unhealthy, delete): (Duration, Duration),
    ) -> Result<NodeLeases, etcd::Error> {
        let (alive, instances) =
            tokio::try_join!(etcd.lease_grant(unhealthy), etcd.lease_grant(delete))?;
        Ok(NodeLeases {
            alive: alive.id,
            instances: instances.id,
        })
    }
}

/// What [`Node::held`] guards.
pub(in crate::registry) struct Holding {
    /// The etcd leases the node's clients' keys hang on.
    pub leases: NodeLeases,
    /// When a renewal of `leases.alive` that etcd confirmed was sent (or
    /// the grant asked for).
    pub renewed: Instant,
    /// The clients it holds.
    pub silences: Silences,
}

impl Node {
    /// The etcd leases this node hangs its clients' keys on now.
    pub(in crate::registry) fn leases(&self) -> NodeLeases {
        self.held.lock().leases
    }

    /// Whether this node holds `lease` healthy, as both its own
    /// bookkeeping and its view (whose alive key hangs on this node's
    /// lease) say, and its own etcd lease is known to be alive: then a
    /// beat of it is answered without etcd. A node that has not renewed
    /// its lease for half its time to live (etcd out of its reach) says
    /// no, so its clients' beats go to etcd, fail, and move them to a node
    /// that can keep their keys.
    pub(in crate::registry) fn holds_healthy(
        &self,
        lease: LeaseId,
        alive_on: Option<EtcdLease>,
    ) -> bool {
        let held = self.held.lock();
        alive_on == Some(held.leases.alive)
            && held.renewed.elapsed() < self.lease_ttls.0 / 2
            && held.silences.holds_healthy(lease)
    }

    /// A sign of life of the client of `lease`: this node holds it from
    /// now on. Answers the etcd leases to hang its keys on, read in the
    /// same step, so a lease granted meanwhile cannot leave keys on the
    /// new lease that no silence of the old bookkeeping times out.
    pub(in crate::registry) fn heard(&self, lease: LeaseId, timings: &Timings) -> NodeLeases {
        let mut held = self.held.lock();
        if held.silences.heard(lease, timings, Instant::now()) {
            self.timer.notify_one();
        }
        held.leases
    }

    /// Counts a KeepAlive stream through this node attached to `lease`.
    pub(in crate::registry) fn attach(&self, lease: LeaseId) {
        self.held.lock().silences.attach(lease);
    }

    /// A KeepAlive stream attached to `leases` ended: those it was the
    /// last stream of lose their alive key, in the background (a stream
    /// ends in a destructor, which cannot wait).
    pub(in crate::registry) fn detach(self: &Arc<Self>, leases: Vec<LeaseId>) {
        let silent: Vec<Silent> = {
            let mut held = self.held.lock();
            leases
                .into_iter()
                .filter_map(|lease| held.silences.detach(lease))
                .collect()
        };
        if silent.is_empty() {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            for silent in silent {
                if let Err(err) = node.take_alive(silent).await {
                    // Asked again later; the alive key goes at the
                    // unhealthy timeout then, not at once.
                    tracing::warn!(%err, "cannot mark the instances of a broken KeepAlive stream unhealthy");
                    node.retry(silent);
                }
            }
        });
    }

    /// Deletes the alive key of a silent lease if it still hangs on this
    /// node's lease and the client has not been heard from since: its
    /// instances turn unhealthy on every node.
    pub(in crate::registry) async fn take_alive(&self, silent: Silent) -> Result<(), etcd::Error> {
        let Some(mine) = self.still_silent(silent) else {
            return Ok(());
        };
        let key = self.key(&Key::Alive(silent.due.lease()));
        let txn = Txn::new()
            .when([Compare::lease(&key, Cmp::Equal, Some(mine.alive))])
            .and_then([Op::delete(&key)]);
        self.etcd.txn(txn).await.map(drop)
    }

    /// Deletes the instances at `keys` of an expired lease, each only if it
    /// still hangs on this node's lease and the lease's alive key is gone
    /// (a client heard from again puts it back first). Then stops holding
    /// the lease, unless its client was heard from meanwhile.
    pub(in crate::registry) async fn take_instances(
        &self,
        silent: Silent,
        keys: &[String],
    ) -> Result<(), etcd::Error> {
        let Some(mine) = self.still_silent(silent) else {
            return Ok(());
        };
        let alive = self.key(&Key::Alive(silent.due.lease()));
        let takes = keys.iter().map(|key| {
            let txn = Txn::new()
                .when([
                    Compare::lease(key, Cmp::Equal, Some(mine.instances)),
                    Compare::absent(&alive),
                ])
                .and_then([Op::delete(key)]);
            self.etcd.txn(txn)
        });
        futures::future::try_join_all(takes).await?;
        self.held.lock().silences.forget_if(silent);
        Ok(())
    }

    /// This node's etcd leases if `silent` still stands: the client has
    /// not been heard from since it was decided.
    fn still_silent(&self, silent: Silent) -> Option<NodeLeases> {
        let held = self.held.lock();
        held.silences.still(silent).then_some(held.leases)
    }

    /// What has come due, and when the next will.
    pub(in crate::registry) fn due(&self) -> (Vec<Silent>, Option<Instant>) {
        let mut held = self.held.lock();
        (held.silences.due(Instant::now()), held.silences.next())
    }

    /// The write `silent` called for failed: asks for it again in a second.
    pub(in crate::registry) fn retry(&self, silent: Silent) {
        let at = Instant::now() + RETRY;
        self.held.lock().silences.retry(silent, at);
        self.timer.notify_one();
    }

    /// Keeps this node's etcd leases alive until `closed`. When etcd says
    /// they are gone (it could not be reached for longer than they live,
    /// or someone revoked them), their keys went with them: the node
    /// grants new ones and holds nothing until its clients are heard
    /// from again (who find their lease gone, and register anew).
    pub(in crate::registry) async fn keep_leases(self: Arc<Self>, closed: CancellationToken) {
        let every = self.lease_ttls.0.min(self.lease_ttls.1) / 3;
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let leases = self.leases();
            let mut renewals =
                [leases.alive, leases.instances].map(|id| self.etcd.lease_keepalive(id));
            'renew: loop {
                tokio::select! {
                    _ = closed.cancelled() => return,
                    _ = ticks.tick() => {}
                    _ = self.lost.notified() => {}
                }
                let sent = Instant::now();
                let mut renewed = true;
                for renewal in &mut renewals {
                    match tokio::time::timeout(every, renewal.beat()).await {
                        Ok(Ok(Some(_))) => continue,
                        Ok(Ok(None)) => break 'renew,
                        Ok(Err(err)) => {
                            tracing::warn!(%err, "cannot renew this registry node's etcd lease")
                        }
                        Err(_) => {
                            tracing::warn!("no answer renewing this registry node's etcd lease")
                        }
                    }
                    // The next beat opens a new stream, perhaps to another
                    // member: one that hangs is not waited on again.
                    *renewal = self.etcd.lease_keepalive(renewal.lease());
                    renewed = false;
                }
                if renewed {
                    self.held.lock().renewed = sent;
                }
            }
            tracing::warn!(
                "this registry node's etcd leases expired, and the keys of its clients with them; granting new ones (its clients register again)"
            );
            let mut pauses = super::backoff().build();
            let (asked, granted) = loop {
                let asked = Instant::now();
                let grant = NodeLeases::grant(&self.etcd, self.lease_ttls);
                let failed = tokio::select! {
                    _ = closed.cancelled() => return,
                    granted = grant => match granted {
                        Ok(granted) => break (asked, granted),
                        Err(err) => err,
                    },
                };
                tracing::warn!(err = %failed, "cannot grant this registry node's etcd leases");
                let pause = pauses.next().unwrap_or(Duration::from_secs(2));
                tokio::select! {
                    _ = closed.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            };
            *self.held.lock() = Holding {
                leases: granted,
                renewed: asked,
                silences: Silences::default(),
            };
        }
    }
}

/// How long a failed write of a silence waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// What a client's silence calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::registry) enum Due {
    /// Past the unhealthy timeout, or the last stream broke: the alive key
    /// goes.
    Unhealthy(LeaseId),
    /// Past the delete timeout: the instances go.
    Expired(LeaseId),
}

impl Due {
    /// The lease it is about.
    pub fn lease(self) -> LeaseId {
        match self {
            Due::Unhealthy(lease) | Due::Expired(lease) => lease,
        }
    }
}

/// A [`Due`] as decided: it stands only while the client has not been
/// heard from since (its lease's generation is still the one it was
/// decided at).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::registry) struct Silent {
    /// What the silence calls for.
    pub due: Due,
    generation: u64,
}

/// One lease this node holds.
#[derive(Debug)]
struct Held {
    last_seen: Instant,
    unhealthy: Duration,
    delete: Duration,
    /// KeepAlive streams through this node attached to it.
    streams: u32,
    /// Its alive key has been taken (or is being): it is not held healthy.
    silent: bool,
    /// Its entry in the deadlines, if any.
    queued: Option<Instant>,
    /// Bumped by every sign of life: a silence decided before one no
    /// longer stands.
    generation: u64,
}

/// The silence of the clients whose leases this node holds: when each was
/// last heard from, and the deadlines that follows from it. Pure
/// bookkeeping; the node makes the writes each [`Due`] calls for.
#[derive(Debug, Default)]
pub(in crate::registry) struct Silences {
    held: HashMap<LeaseId, Held>,
    /// At most one entry a lease (its `queued`); a sign of life only moves
    /// a deadline later, so entries are checked again when they come
    /// rather than moved on every beat.
    deadlines: BTreeSet<(Instant, LeaseId)>,
}

impl Silences {
    /// Whether this node holds `lease` and holds it healthy.
    pub fn holds_healthy(&self, lease: LeaseId) -> bool {
        self.held.get(&lease).is_some_and(|held| !held.silent)
    }

    /// A sign of life from the client of `lease` (a registration, a
    /// beat): this node holds it, healthy, with `timings`. Answers
    /// whether its next deadline is earlier than any before, so the timer
    /// must be woken.
    pub fn heard(&mut self, lease: LeaseId, timings: &Timings, now: Instant) -> bool {
        let held = self.held.entry(lease).or_insert(Held {
            last_seen: now,
            unhealthy: Duration::ZERO,
            delete: Duration::ZERO,
            streams: 0,
            silent: false,
            queued: None,
            generation: 0,
        });
        held.last_seen = now;
        held.generation += 1;
        held.unhealthy = Duration::from_millis(timings.unhealthy_timeout_ms.into());
        held.delete = Duration::from_millis(timings.delete_timeout_ms.into());
        held.silent = false;
        let due = now + held.unhealthy;
        self.schedule(lease, due)
    }

    /// A KeepAlive stream through this node attached to `lease`.
    pub fn attach(&mut self, lease: LeaseId) {
        if let Some(held) = self.held.get_mut(&lease) {
            held.streams += 1;
        }
    }

    /// A KeepAlive stream attached to `lease` ended: when it was the last
    /// one, the lease has turned silent, and its alive key must go at
    /// once.
    pub fn detach(&mut self, lease: LeaseId) -> Option<Silent> {
        let held = self.held.get_mut(&lease)?;
        held.streams = held.streams.saturating_sub(1);
        if held.streams > 0 || held.silent {
            return None;
        }
        held.silent = true;
        Some(Silent {
            due: Due::Unhealthy(lease),
            generation: held.generation,
        })
    }

    /// Whether `silent` still stands: its client has not been heard from
    /// since it was decided.
    pub fn still(&self, silent: Silent) -> bool {
        self.held
            .get(&silent.due.lease())
            .is_some_and(|held| held.generation == silent.generation)
    }

    /// Stops holding the lease of `silent` (its instances are gone) if it
    /// still stands.
    pub fn forget_if(&mut self, silent: Silent) {
        let lease = silent.due.lease();
        if !self.still(silent) {
            return;
        }
        if let Some(held) = self.held.remove(&lease)
            && let Some(at) = held.queued
        {
            self.deadlines.remove(&(at, lease));
        }
    }

    /// A write `silent` called for failed: ask again at `at`, if it still
    /// stands.
    pub fn retry(&mut self, silent: Silent, at: Instant) {
        if !self.still(silent) {
            return;
        }
        let lease = silent.due.lease();
        if let Some(held) = self.held.get_mut(&lease) {
            if let Due::Unhealthy(_) = silent.due {
                held.silent = false;
            }
            self.schedule(lease, at);
        }
    }

    /// Takes what has come due by `now`, in deadline order.
    pub fn due(&mut self, now: Instant) -> Vec<Silent> {
        let mut due = Vec::new();
        while let Some(&(at, lease)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(held) = self.held.get_mut(&lease) else {
                continue;
            };
            held.queued = None;
            let unhealthy_at = held.last_seen + held.unhealthy;
            let delete_at = held.last_seen + held.delete;
            let generation = held.generation;
            let decided = |due| Silent { due, generation };
            if now >= delete_at {
                // Stays held until the instances are gone: the node
                // forgets it then, or asks again.
                held.silent = true;
                due.push(decided(Due::Expired(lease)));
            } else if now >= unhealthy_at {
                if !held.silent {
                    held.silent = true;
                    due.push(decided(Due::Unhealthy(lease)));
                }
                self.schedule(lease, delete_at);
            } else {
                self.schedule(lease, unhealthy_at);
            }
        }
        due
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Queues `lease` at `at` unless it is queued as early already;
    /// answers whether `at` is now the earliest deadline of all.
    fn schedule(&mut self, lease: LeaseId, at: Instant) -> bool {
        let Some(held) = self.held.get_mut(&lease) else {
            return false;
        };
        if held.queued.is_some_and(|queued| queued <= at) {
            return false;
        }
        if let Some(queued) = held.queued.replace(at) {
            self.deadlines.remove(&(queued, lease));
        }
        self.deadlines.insert((at, lease));
        self.deadlines.first().is_some_and(|first| first.0 == at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timings(unhealthy_s: u32, delete_s: u32) -> Timings {
        Timings {
            heartbeat_interval_ms: 1000,
            unhealthy_timeout_ms: unhealthy_s * 1000,
            delete_timeout_ms: delete_s * 1000,
        }
    }

    /// What is due after `secs` more seconds of the paused clock.
    async fn after(silences: &mut Silences, secs: u64) -> Vec<Silent> {
        tokio::time::advance(Duration::from_secs(secs)).await;
        silences.due(Instant::now())
    }

    fn dues(silent: &[Silent]) -> Vec<Due> {
        silent.iter().map(|s| s.due).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_lease_turns_unhealthy_then_expires_on_its_own_timings() {
        let mut silences = Silences::default();
        silences.heard(1, &timings(15, 30), Instant::now());
        silences.heard(2, &timings(5, 10), Instant::now());
        assert_eq!(dues(&after(&mut silences, 4).await), []);
        assert_eq!(dues(&after(&mut silences, 1).await), [Due::Unhealthy(2)]);
        assert!(!silences.holds_healthy(2));
        let expired = after(&mut silences, 5).await;
        assert_eq!(dues(&expired), [Due::Expired(2)]);
        silences.forget_if(expired[0]);
        assert_eq!(dues(&after(&mut silences, 5).await), [Due::Unhealthy(1)]);
        assert_eq!(dues(&after(&mut silences, 14).await), []);
        let expired = after(&mut silences, 1).await;
        assert_eq!(dues(&expired), [Due::Expired(1)]);
        silences.forget_if(expired[0]);
        assert!(silences.held.is_empty());
        assert_eq!(silences.next(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn every_sign_of_life_moves_the_deadlines() {
        let mut silences = Silences::default();
        silences.heard(1, &timings(15, 30), Instant::now());
        for _ in 0..10 {
            assert_eq!(dues(&after(&mut silences, 10).await), []);
            silences.heard(1, &timings(15, 30), Instant::now());
        }
        assert!(silences.holds_healthy(1));
        // Silent after it had turned unhealthy: a beat makes it healthy.
        assert_eq!(dues(&after(&mut silences, 20).await), [Due::Unhealthy(1)]);
        silences.heard(1, &timings(15, 30), Instant::now());
        assert!(silences.holds_healthy(1));
        assert_eq!(dues(&after(&mut silences, 29).await), [Due::Unhealthy(1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silence_decided_before_a_sign_of_life_no_longer_stands() {
        let mut silences = Silences::default();
        silences.heard(1, &timings(15, 30), Instant::now());
        let unhealthy = after(&mut silences, 15).await[0];
        assert!(silences.still(unhealthy));
        let expired = after(&mut silences, 15).await[0];
        // The client comes back while the writes are on their way.
        silences.heard(1, &timings(15, 30), Instant::now());
        assert!(!silences.still(unhealthy) && !silences.still(expired));
        silences.forget_if(expired);
        silences.retry(unhealthy, Instant::now());
        assert!(silences.holds_healthy(1), "still held, and healthy");
        assert_eq!(dues(&after(&mut silences, 14).await), []);
        assert_eq!(dues(&after(&mut silences, 1).await), [Due::Unhealthy(1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_stream_to_break_turns_the_lease_silent_at_once() {
        let mut silences = Silences::default();
        silences.heard(1, &timings(15, 30), Instant::now());
        silences.attach(1);
        silences.attach(1);
        assert_eq!(silences.detach(1), None, "another stream is still attached");
        let silent = silences.detach(1).expect("the last one");
        assert_eq!(silent.due, Due::Unhealthy(1));
        assert!(!silences.holds_healthy(1));
        assert_eq!(silences.detach(1), None, "said once");
        // Its instances still go at the delete timeout, not the unhealthy.
        assert_eq!(dues(&after(&mut silences, 15).await), []);
        assert_eq!(dues(&after(&mut silences, 15).await), [Due::Expired(1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_asked_for_again() {
        let mut silences = Silences::default();
        silences.heard(1, &timings(15, 30), Instant::now());
        let unhealthy = after(&mut silences, 15).await[0];
        silences.retry(unhealthy, Instant::now() + Duration::from_secs(1));
        assert_eq!(dues(&after(&mut silences, 1).await), [Due::Unhealthy(1)]);
        let expired = after(&mut silences, 14).await[0];
        assert_eq!(expired.due, Due::Expired(1));
        silences.retry(expired, Instant::now() + Duration::from_secs(1));
        assert_eq!(dues(&after(&mut silences, 1).await), [Due::Expired(1)]);
    }

    #[test]
    fn an_earlier_deadline_wakes_the_timer_and_a_later_one_does_not() {
        let mut silences = Silences::default();
        let now = Instant::now();
        assert!(silences.heard(1, &timings(15, 30), now));
        assert!(!silences.heard(2, &timings(20, 30), now));
        assert!(silences.heard(3, &timings(5, 30), now));
    }
}
