//! Leases and their deadlines: heartbeats over KeepAlive sessions, and the
//! reaper that marks a lease's instances unhealthy after their unhealthy
//! timeout and removes them after their delete timeout.

use std::num::NonZeroU64;
use std::sync::{Arc, Weak};
use std::time::Duration;

use smallvec::SmallVec;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Inner, Registry, State};
use crate::etcd;
use crate::registry::Error;
use crate::registry::model::{
    Instance, InstanceAddr, LeaseId, ServiceKey, TimingOverrides, Timings,
};

/// Milliseconds since the registry opened: lease times take 8 bytes each
/// where an `Instant` takes 16, and there is a lease per instance.
pub(super) type Millis = u64;

/// What keeps ephemeral instances alive: the time of their last sign of
/// life and the KeepAlive streams attached to it.
pub(super) struct Lease {
    pub(super) last_seen: Millis,
    /// KeepAlive streams attached now.
    pub(super) streams: u32,
    /// A stream broke and none has resumed: the instances are unhealthy
    /// until a heartbeat arrives.
    pub(super) orphaned: bool,
    /// Its instances, as last stored (kept current by whoever replaces
    /// one); nearly always exactly one.
    pub(super) members: SmallVec<[Arc<Instance>; 1]>,
    /// The lease's entry in `deadlines`, if any.
    pub(super) queued: Option<NonZeroU64>,
    /// On a cluster node: the etcd lease its alive key hangs on, that of
    /// the node holding it (None while it has no alive key; always None
    /// in memory).
    pub(super) alive_on: Option<etcd::LeaseId>,
}

impl Lease {
    pub(super) fn forget(&mut self, key: &ServiceKey, addr: &InstanceAddr) {
        self.members
            .retain(|m| !(*m.service == *key && m.addr == *addr));
    }
}

/// How an instance is being kept, as the console shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Persistent: the registry probes it.
    Persistent,
    /// Its lease is being kept.
    Alive {
        /// Its last sign of life, in milliseconds since the Unix epoch,
        /// when this node holds its lease.
        last_beat_ms: Option<u64>,
    },
    /// Its KeepAlive stream broke, or its beats stopped, and none resumed.
    Orphaned {
        /// As for `Alive`.
        last_beat_ms: Option<u64>,
    },
}

impl Registry {
    /// How each instance of `service` is kept alive, by address.
    pub fn liveness(&self, service: &ServiceKey) -> Vec<(InstanceAddr, Liveness)> {
        let wall_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let state = self.inner.state.lock();
        let now = state.now();
        let Some(found) = state.services.get(service) else {
            return Vec::new();
        };
        found
            .iter()
            .map(|instance| {
                let liveness = if !instance.ephemeral {
                    Liveness::Persistent
                } else {
                    match state.leases.get(&instance.lease) {
                        Some(lease) => {
                            let last_beat_ms =
                                Some(wall_now.saturating_sub(now.saturating_sub(lease.last_seen)));
                            if lease.orphaned || !instance.healthy {
                                Liveness::Orphaned { last_beat_ms }
                            } else {
                                Liveness::Alive { last_beat_ms }
                            }
                        }
                        // Held by another node of a cluster.
                        None if instance.healthy => Liveness::Alive { last_beat_ms: None },
                        None => Liveness::Orphaned { last_beat_ms: None },
                    }
                };
                (instance.addr.clone(), liveness)
            })
            .collect()
    }

    /// A session of heartbeats, as one KeepAlive stream sends them. When
    /// the session ends (the stream broke or closed), the instances of its
    /// leases become unhealthy at once.
    pub fn keep_alive(&self) -> KeepAlive {
        KeepAlive {
            registry: self.clone(),
            leases: Vec::new(),
        }
    }

    /// One heartbeat of `lease` from a client that keeps no stream open
    /// (Nacos 1.x's HTTP beat): such a lease lives on its beats alone, so
    /// nothing orphans it between them. Answers the interval it expects.
    pub async fn beat(&self, lease: LeaseId) -> Result<Duration, Error> {
        if let Some(node) = self.node().cloned() {
            let timings = self.hold(&node, lease).await?;
            let _ = node.heard(lease, &timings);
            return Ok(self.inner.interval_of(lease));
        }
        let inner = &self.inner;
        inner.state.lock().heartbeat(inner, lease, false)
    }

    pub(in crate::registry) fn resolve_timings(
        &self,
        asked: TimingOverrides,
    ) -> Result<Timings, Error> {
        let config = &self.inner.config;
        let min = config.min_heartbeat_interval;
        let max = config.max_timeout;
        let pick = |field: &str, asked: Option<u64>, default: Duration| -> Result<u32, Error> {
            let ms = asked.unwrap_or(default.as_millis() as u64);
            let value = Duration::from_millis(ms);
            if value < min || value > max {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{ms} ms is outside this registry's bounds, {} to {} ms",
                        min.as_millis(),
                        max.as_millis()
                    ),
                ));
            }
            u32::try_from(ms).map_err(|_| Error::invalid(field, format!("{ms} ms is too long")))
        };
        let timings = Timings {
            heartbeat_interval_ms: pick(
                "heartbeat_interval_ms",
                asked.heartbeat_interval_ms,
                config.heartbeat_interval,
            )?,
            unhealthy_timeout_ms: pick(
                "unhealthy_timeout_ms",
                asked.unhealthy_timeout_ms,
                config.unhealthy_timeout,
            )?,
            delete_timeout_ms: pick(
                "delete_timeout_ms",
                asked.delete_timeout_ms,
                config.delete_timeout,
            )?,
        };
        if timings.unhealthy_timeout_ms <= timings.heartbeat_interval_ms {
            return Err(Error::invalid(
                "unhealthy_timeout_ms",
                format!(
                    "{} ms must be longer than the heartbeat interval, {} ms",
                    timings.unhealthy_timeout_ms, timings.heartbeat_interval_ms
                ),
            ));
        }
        if timings.delete_timeout_ms < timings.unhealthy_timeout_ms {
            return Err(Error::invalid(
                "delete_timeout_ms",
                format!(
                    "{} ms must not be shorter than the unhealthy timeout, {} ms",
                    timings.delete_timeout_ms, timings.unhealthy_timeout_ms
                ),
            ));
        }
        Ok(timings)
    }
}

impl State {
    /// A lease id no lease has now, unguessable: 64 bits from a
    /// cryptographically secure generator.
    pub(in crate::registry) fn new_lease_id(&self) -> LeaseId {
        loop {
            let id: LeaseId = rand::random();
            if id != 0 && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    pub(in crate::registry) fn heartbeat(
        &mut self,
        inner: &Inner,
        id: LeaseId,
        attach: bool,
    ) -> Result<Duration, Error> {
        let Some(_) = self.leases.get(&id) else {
            return Err(Error::NotFound(format!(
                "lease {id} is unknown or expired; register again"
            )));
        };
        let now = self.now();
        let lease = self.leases.get_mut(&id).expect("looked up above");
        lease.last_seen = now;
        lease.orphaned = false;
        if attach {
            lease.streams += 1;
        }
        let interval = lease
            .members
            .iter()
            .map(|i| i.timings.heartbeat_interval())
            .min()
            .unwrap_or(inner.config.heartbeat_interval);
        self.evaluate(inner, id, now);
        Ok(interval)
    }

    pub(in crate::registry) fn detach(&mut self, inner: &Inner, id: LeaseId) {
        let Some(lease) = self.leases.get_mut(&id) else {
            return;
        };
        lease.streams = lease.streams.saturating_sub(1);
        if lease.streams == 0 {
            lease.orphaned = true;
            let now = self.now();
            self.evaluate(inner, id, now);
        }
    }

    /// Brings a lease's instances up to date at `now`: healthy while the
    /// lease is attached or recently seen, unhealthy past the unhealthy
    /// timeout or when orphaned, removed past the delete timeout; then
    /// schedules the lease's next deadline.
    pub(in crate::registry) fn evaluate(&mut self, inner: &Inner, id: LeaseId, now: Millis) {
        let Some(lease) = self.leases.get_mut(&id) else {
            return;
        };
        let (last_seen, orphaned) = (lease.last_seen, lease.orphaned);
        let members = std::mem::take(&mut lease.members);
        let mut kept = SmallVec::new();
        let mut next: Option<Millis> = None;
        for member in members {
            let Some(current) = self
                .services
                .get(&*member.service)
                .and_then(|s| s.get(&member.addr))
                .cloned()
            else {
                continue;
            };
            let unhealthy_at = last_seen + u64::from(current.timings.unhealthy_timeout_ms);
            let delete_at = last_seen + u64::from(current.timings.delete_timeout_ms);
            if now >= delete_at {
                self.remove(&current.service, &current.addr);
                inner.counters.removed();
                continue;
            }
            let healthy = !orphaned && now < unhealthy_at;
            let current = if healthy != current.healthy {
                if !healthy {
                    inner.counters.went_unhealthy();
                }
                let changed = Arc::new(Instance {
                    healthy,
                    ..(*current).clone()
                });
                self.put(changed.clone());
                changed
            } else {
                current
            };
            let due = if healthy { unhealthy_at } else { delete_at };
            next = Some(next.map_or(due, |n| n.min(due)));
            kept.push(current);
        }
        let empty = kept.is_empty();
        let lease = self.leases.get_mut(&id).expect("looked up above");
        lease.members = kept;
        if empty {
            // A lease without instances lives a delete timeout, so a
            // client may still register on it.
            let expire_at = last_seen + inner.config.delete_timeout.as_millis() as u64;
            if now >= expire_at {
                if let Some(at) = lease.queued {
                    self.deadlines.remove(&(at.get(), id));
                }
                self.leases.remove(&id);
                return;
            }
            next = Some(expire_at);
        }
        // Deadlines are at least a timeout after `last_seen`, so never 0.
        let due = next.expect("set for a non-empty or unexpired lease").max(1);
        match lease.queued {
            Some(at) if at.get() <= due => {}
            queued => {
                if let Some(at) = queued {
                    self.deadlines.remove(&(at.get(), id));
                }
                let earliest = self.deadlines.first().map(|(at, _)| *at);
                self.deadlines.insert((due, id));
                lease.queued = NonZeroU64::new(due);
                if earliest.is_none_or(|at| due < at) {
                    inner.reaper.notify_one();
                }
            }
        }
    }

    /// Runs every lease whose deadline has come; answers the next deadline.
    pub(in crate::registry) fn reap(&mut self, inner: &Inner) -> Option<Instant> {
        let now = self.now();
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                return Some(self.epoch + Duration::from_millis(at));
            }
            self.deadlines.pop_first();
            if let Some(lease) = self.leases.get_mut(&id) {
                lease.queued = None;
            }
            self.evaluate(inner, id, now);
        }
        None
    }

    pub(in crate::registry) fn now(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }
}

/// Heartbeats of one KeepAlive stream; see [`Registry::keep_alive`].
pub struct KeepAlive {
    pub(super) registry: Registry,
    /// Leases this session is attached to.
    pub(super) leases: Vec<LeaseId>,
}

impl KeepAlive {
    /// A heartbeat for `lease`; answers the heartbeat interval it expects.
    pub async fn beat(&mut self, lease: LeaseId) -> Result<Duration, Error> {
        if let Some(node) = self.registry.node().cloned() {
            return self.beat_replicated(&node, lease).await;
        }
        let attach = !self.leases.contains(&lease);
        let inner = &self.registry.inner;
        let mut state = inner.state.lock();
        let interval = state.heartbeat(inner, lease, attach)?;
        if attach {
            self.leases.push(lease);
        }
        Ok(interval)
    }
}

impl KeepAlive {
    /// Ends the session because this registry is stopping, not because the
    /// client went: on a cluster node its client resumes on another node,
    /// so its instances stay healthy. In memory the registry goes with it.
    pub fn hand_over(&mut self) {
        if self.registry.node().is_some() {
            self.leases.clear();
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        if let Some(node) = self.registry.node() {
            node.detach(std::mem::take(&mut self.leases));
            return;
        }
        let inner = &self.registry.inner;
        let mut state = inner.state.lock();
        for lease in self.leases.drain(..) {
            state.detach(inner, lease);
        }
    }
}

/// The lease reaper: sleeps until the earliest lease deadline (or until
/// an earlier one is scheduled), then brings the due leases up to date.
pub(super) async fn reap(inner: Weak<Inner>, wake: Arc<Notify>, closed: CancellationToken) {
    on_deadlines(&wake, &closed, || {
        let strong = inner.upgrade()?;
        let next = strong.state.lock().reap(&strong);
        Some(next)
    })
    .await;
}

/// A timer over a set of deadlines: runs `due` (which does what has come
/// due and answers the next deadline, or None to stop), then sleeps until
/// that deadline, until `wake` says an earlier one was set, or until
/// `closed`.
pub(super) async fn on_deadlines(
    wake: &Notify,
    closed: &CancellationToken,
    mut due: impl FnMut() -> Option<Option<Instant>>,
) {
    loop {
        // Armed before `due` runs, so a deadline set meanwhile wakes it.
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(next) = due() else {
            return;
        };
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = notified => {}
            _ = sleep => {}
        }
    }
}
