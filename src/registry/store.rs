//! [`Registry`]: the registry's whole state behind one type with a narrow
//! interface (register, deregister, query, keep alive, watch), so that a
//! replicated store can later go under it without touching the gRPC layer.
//!
//! One mutex guards the state. Every operation is short and in memory
//! (persistence happens outside the lock), and one lock keeps the
//! invariant that matters most simple: every change bumps the revision by
//! exactly one, lands in the history and reaches the watchers in the same
//! order.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::num::NonZeroU64;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::{Notify, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::model::{
    ChangeKind, Event, GroupKey, Instance, InstanceAddr, InstanceSpec, LeaseId, Registered,
    ServiceKey, ServicePage, ServiceSettings, ServiceSummary, ServiceView, TimingOverrides,
    Timings, is_link_local,
};
use super::watch::{Inbox, Position, Selector, Start, Subscription, WatchStream};
use super::{Config, Error, persist, probe};

/// The registry. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    /// Random per run: revisions of another run mean nothing here.
    incarnation: u64,
    state: Mutex<State>,
    /// Wakes the reaper when a lease deadline earlier than its current one
    /// is scheduled.
    reaper: Arc<Notify>,
    /// One permit per watch stream open.
    watches: Arc<Semaphore>,
    store: Option<persist::Store>,
    probes: Mutex<HashMap<(ServiceKey, InstanceAddr), AbortHandle>>,
    closed: CancellationToken,
}

/// Counts for tests, metrics and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub revision: u64,
    pub services: usize,
    pub instances: usize,
    pub leases: usize,
    pub watchers: usize,
    /// Changes queued for watchers, in bytes, over all of them: bounded
    /// by the number of watchers times the per-watcher budget.
    pub queued_bytes: usize,
}

struct State {
    revision: u64,
    services: BTreeMap<ServiceKey, Service>,
    services_per_namespace: HashMap<Arc<str>, usize>,
    /// Lease ids are drawn at random, never counted: a restarted registry
    /// must not hand out an id that a client of the previous run still
    /// holds (it would join that client's lease on re-registering), and a
    /// lease id is the only proof of owning a lease.
    leases: HashMap<LeaseId, Lease>,
    /// At most one entry per lease (the lease's `queued`); a heartbeat only
    /// moves a deadline later, so entries are re-checked when they fire
    /// rather than moved on every heartbeat.
    deadlines: BTreeSet<(Millis, LeaseId)>,
    /// What `Millis` count from.
    epoch: Instant,
    history: VecDeque<Event>,
    history_limit: usize,
    next_watcher: u64,
    by_service: HashMap<ServiceKey, Vec<Subscription>>,
    by_group: HashMap<GroupKey, Vec<Subscription>>,
}

/// A registration as applied: what to answer, the instance now stored, and
/// the one it replaced (to undo it if storing fails).
struct Applied {
    registered: Registered,
    instance: Arc<Instance>,
    previous: Option<Arc<Instance>>,
}

struct Service {
    key: Arc<ServiceKey>,
    settings: ServiceSettings,
    /// Settings were set explicitly: the service outlives its instances
    /// and is persisted.
    explicit: bool,
    instances: HashSet<Slot>,
    healthy: usize,
}

/// An instance in its service's set, found by its address: the set holds
/// one pointer per instance, not a copy of the key.
#[derive(Debug, Clone)]
struct Slot(Arc<Instance>);

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        self.0.addr == other.0.addr
    }
}

impl Eq for Slot {}

impl Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.addr.hash(state)
    }
}

impl Borrow<InstanceAddr> for Slot {
    fn borrow(&self) -> &InstanceAddr {
        &self.0.addr
    }
}

impl Service {
    fn get(&self, addr: &InstanceAddr) -> Option<&Arc<Instance>> {
        self.instances.get(addr).map(|slot| &slot.0)
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.instances.iter().map(|slot| &slot.0)
    }
}

/// Milliseconds since the registry opened: lease times take 8 bytes each
/// where an `Instant` takes 16, and there is a lease per instance.
type Millis = u64;

struct Lease {
    last_seen: Millis,
    /// KeepAlive streams attached now.
    streams: u32,
    /// A stream broke and none has resumed: the instances are unhealthy
    /// until a heartbeat arrives.
    orphaned: bool,
    /// Its instances, as last stored (kept current by whoever replaces
    /// one); nearly always exactly one.
    members: SmallVec<[Arc<Instance>; 1]>,
    /// The lease's entry in `deadlines`, if any.
    queued: Option<NonZeroU64>,
}

impl Lease {
    fn forget(&mut self, key: &ServiceKey, addr: &InstanceAddr) {
        self.members
            .retain(|m| !(*m.service == *key && m.addr == *addr));
    }
}

impl Registry {
    /// Opens the registry: loads what `config.data_dir` holds, starts the
    /// lease reaper and the health probes of persistent instances.
    pub async fn open(config: &Config) -> Result<Registry, persist::Error> {
        let (store, loaded) = persist::Store::open(&config.data_dir)?;
        let registry = Registry::with_store(config, Some(store));
        {
            let mut state = registry.inner.state.lock();
            for (key, settings) in loaded.services {
                let service = state.ensure_service(&key);
                service.explicit = true;
                service.settings = settings;
            }
            for mut instance in loaded.instances {
                // Health is not stored: it is probed again.
                instance.healthy = false;
                instance.ephemeral = false;
                instance.lease = 0;
                let key = instance.service.as_ref().clone();
                let service = state.ensure_service(&key);
                instance.service = service.key.clone();
                let instance = Arc::new(instance);
                state.put(instance.clone());
                registry.start_probe(&instance);
            }
            tracing::info!(
                services = state.services.len(),
                revision = state.revision,
                "loaded persistent state"
            );
        }
        Ok(registry)
    }

    /// A registry that keeps nothing on disk: persistent instances last as
    /// long as the process. For tests and benchmarks.
    pub fn in_memory(config: &Config) -> Registry {
        Registry::with_store(config, None)
    }

    fn with_store(config: &Config, store: Option<persist::Store>) -> Registry {
        let inner = Arc::new(Inner {
            config: config.clone(),
            incarnation: rand::random::<u64>() | 1,
            state: Mutex::new(State {
                revision: 0,
                services: BTreeMap::new(),
                services_per_namespace: HashMap::new(),
                leases: HashMap::new(),
                deadlines: BTreeSet::new(),
                epoch: Instant::now(),
                history: VecDeque::new(),
                history_limit: config.limits.watch_history,
                next_watcher: 1,
                by_service: HashMap::new(),
                by_group: HashMap::new(),
            }),
            reaper: Arc::new(Notify::new()),
            watches: Arc::new(Semaphore::new(config.limits.max_watches)),
            store,
            probes: Mutex::new(HashMap::new()),
            closed: CancellationToken::new(),
        });
        tokio::spawn(reap(
            Arc::downgrade(&inner),
            inner.reaper.clone(),
            inner.closed.clone(),
        ));
        Registry { inner }
    }

    /// Stops the reaper and the probes and ends every watch. Idempotent.
    pub fn close(&self) {
        self.inner.closed.cancel();
        for (_, probe) in self.inner.probes.lock().drain() {
            probe.abort();
        }
        let mut state = self.inner.state.lock();
        state.by_service.clear();
        state.by_group.clear();
    }

    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Adds an instance, or updates the one with the same identity.
    pub async fn register(&self, spec: InstanceSpec, lease: LeaseId) -> Result<Registered, Error> {
        let timings = self.resolve_timings(spec.timings)?;
        let ip = spec.addr.ip;
        if is_link_local(ip) && !self.inner.config.allow_link_local {
            return Err(Error::invalid(
                "ip",
                format!(
                    "{ip} is link-local, reachable from one network link only; \
                     set registry.allow_link_local to accept such addresses"
                ),
            ));
        }
        let Applied {
            registered,
            instance,
            previous,
        } = self
            .inner
            .state
            .lock()
            .register(&self.inner, spec, lease, timings)?;
        if instance.ephemeral {
            self.inner.reaper.notify_one();
            return Ok(registered);
        }
        let stored = persist::Subject::Instance(&instance.service, &instance.addr);
        if let Err(err) = self.persist(stored).await {
            // Undo, so memory never claims what the disk does not hold.
            let mut state = self.inner.state.lock();
            match previous {
                Some(previous) => state.put(previous),
                None => {
                    state.remove(&instance.service, &instance.addr);
                }
            }
            return Err(err);
        }
        self.start_probe(&instance);
        Ok(registered)
    }

    /// Removes an instance at once.
    pub async fn deregister(&self, key: &ServiceKey, addr: &InstanceAddr) -> Result<u64, Error> {
        let (removed, revision) = {
            let mut state = self.inner.state.lock();
            let removed = state.remove(key, addr).ok_or_else(|| {
                Error::NotFound(format!(
                    "no instance {}:{} in cluster {} of service {key}",
                    addr.ip, addr.port, addr.cluster
                ))
            })?;
            if let Some(lease) = state.leases.get_mut(&removed.lease) {
                lease.forget(key, addr);
            }
            (removed, state.revision)
        };
        if !removed.ephemeral {
            if let Some(probe) = self
                .inner
                .probes
                .lock()
                .remove(&(key.clone(), addr.clone()))
            {
                probe.abort();
            }
            if let Err(err) = self.persist(persist::Subject::Instance(key, addr)).await {
                // The instance is gone from memory but maybe not from disk:
                // it would come back after a restart. Say so.
                tracing::error!(%err, "deregistered instance may reappear after a restart");
                return Err(err);
            }
        }
        Ok(revision)
    }

    /// Sets the own settings of a service that exists (has instances, or
    /// had settings set). Settings of an unknown name are refused: they
    /// would make a service that nothing uses, and enough of them would
    /// fill the namespace.
    pub async fn update_service(
        &self,
        key: &ServiceKey,
        settings: ServiceSettings,
    ) -> Result<(), Error> {
        let previous = {
            let mut state = self.inner.state.lock();
            let service = state
                .services
                .get_mut(key)
                .ok_or_else(|| unknown_service(key))?;
            let previous = (service.explicit, service.settings.clone());
            service.settings = settings;
            service.explicit = true;
            previous
        };
        if let Err(err) = self.persist(persist::Subject::Service(key)).await {
            // Undo, so memory never claims what the disk does not hold.
            let mut state = self.inner.state.lock();
            if let Some(service) = state.services.get_mut(key) {
                (service.explicit, service.settings) = previous;
            }
            return Err(err);
        }
        Ok(())
    }

    /// Deletes a service that has no instances left, with its settings.
    pub async fn delete_service(&self, key: &ServiceKey) -> Result<(), Error> {
        let removed = {
            let mut state = self.inner.state.lock();
            let service = state
                .services
                .get(key)
                .ok_or_else(|| unknown_service(key))?;
            let count = service.instances.len();
            if count > 0 {
                return Err(Error::FailedPrecondition(format!(
                    "service {key} still has {count} instance(s); deregister them first"
                )));
            }
            state.drop_service(key)
        };
        if let Err(err) = self.persist(persist::Subject::Service(key)).await {
            let mut state = self.inner.state.lock();
            if let Some(settings) = removed {
                let service = state.ensure_service(key);
                service.settings = settings;
                service.explicit = true;
            }
            return Err(err);
        }
        Ok(())
    }

    /// The services of a group, sorted by name, one page of them.
    pub fn list_services(&self, group: &GroupKey, page: usize, page_size: usize) -> ServicePage {
        let state = self.inner.state.lock();
        let in_group = state.group_range(group);
        let mut services = Vec::new();
        let mut total = 0;
        for (key, service) in in_group {
            if total >= page.saturating_sub(1) * page_size && services.len() < page_size {
                services.push(ServiceSummary {
                    key: key.clone(),
                    instance_count: service.instances.len(),
                    healthy_count: service.healthy,
                    protect_threshold: service.settings.protect_threshold,
                });
            }
            total += 1;
        }
        ServicePage {
            services,
            total,
            revision: state.revision,
        }
    }

    /// One service's instances, sorted by cluster, ip and port.
    pub fn get_service(
        &self,
        key: &ServiceKey,
        healthy_only: bool,
        clusters: &[String],
    ) -> Result<ServiceView, Error> {
        let state = self.inner.state.lock();
        let service = state
            .services
            .get(key)
            .ok_or_else(|| unknown_service(key))?;
        let in_clusters = |i: &Arc<Instance>| {
            clusters.is_empty() || clusters.iter().any(|c| **c == *i.addr.cluster)
        };
        let mut instances: Vec<_> = service.iter().filter(|i| in_clusters(i)).cloned().collect();
        let total = instances.len();
        let healthy = instances.iter().filter(|i| i.healthy).count();
        let threshold = service.settings.protect_threshold;
        let protection_triggered =
            healthy_only && total > 0 && (healthy as f64) < threshold * total as f64;
        if healthy_only && !protection_triggered {
            instances.retain(|i| i.healthy);
        }
        instances.sort_by(|a, b| a.addr.cmp(&b.addr));
        Ok(ServiceView {
            key: key.clone(),
            instances,
            revision: state.revision,
            protect_threshold: threshold,
            protection_triggered,
        })
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

    /// Watches a service or a group from `start_revision` (0: a snapshot
    /// first). `incarnation` is the one the revision came from (0: this one).
    pub fn watch(
        &self,
        selector: Selector,
        start_revision: u64,
        incarnation: u64,
    ) -> Result<WatchStream, Error> {
        let permit = self
            .inner
            .watches
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Error::ResourceExhausted(format!(
                    "the registry serves at most {} watches at once",
                    self.inner.config.limits.max_watches
                ))
            })?;
        let budget = self.inner.config.limits.watch_queue_bytes;
        let mut state = self.inner.state.lock();
        let stale_incarnation = incarnation != 0 && incarnation != self.inner.incarnation;
        let start = match start_revision {
            0 => Start::Snapshot { reset: false },
            _ if stale_incarnation => Start::Snapshot { reset: true },
            // A replay larger than a watcher may queue would pin that much
            // for a watcher that may never read it: a snapshot is cheaper.
            from => match state.replay(&selector, from) {
                Some(events)
                    if events.iter().map(|e| e.instance.footprint()).sum::<usize>() <= budget =>
                {
                    Start::Replay(events)
                }
                _ => Start::Snapshot { reset: true },
            },
        };
        let subscription = state.subscribe(&self.inner.config, &selector);
        let revision = state.revision;
        drop(state);
        Ok(WatchStream::new(
            self.clone(),
            selector,
            subscription,
            revision,
            start,
            permit,
        ))
    }

    pub fn stats(&self) -> Stats {
        let state = self.inner.state.lock();
        let subscriptions = state
            .by_service
            .values()
            .chain(state.by_group.values())
            .flatten();
        let (watchers, queued_bytes) =
            subscriptions.fold((0, 0), |(n, q), sub| (n + 1, q + sub.queued_bytes()));
        Stats {
            revision: state.revision,
            services: state.services.len(),
            instances: state.services.values().map(|s| s.instances.len()).sum(),
            leases: state.leases.len(),
            watchers,
            queued_bytes,
        }
    }

    /// Records a probe's verdict on a persistent instance.
    pub(super) fn set_probed_health(&self, key: &ServiceKey, addr: &InstanceAddr, healthy: bool) {
        let mut state = self.inner.state.lock();
        let Some(current) = state.services.get(key).and_then(|s| s.get(addr)) else {
            return;
        };
        if current.healthy != healthy && !current.ephemeral {
            let changed = Arc::new(Instance {
                healthy,
                ..(**current).clone()
            });
            state.put(changed);
        }
    }

    /// A new subscription for a watcher that fell behind, and the revision
    /// it starts after.
    pub(super) fn resubscribe(&self, selector: &Selector) -> ((u64, Inbox), u64) {
        let mut state = self.inner.state.lock();
        let subscription = state.subscribe(&self.inner.config, selector);
        (subscription, state.revision)
    }

    /// Up to `max` instances of the selector's, in snapshot order, after
    /// `after`; whether more follow; and the revision they were read at.
    pub(super) fn snapshot_chunk(
        &self,
        selector: &Selector,
        after: Option<&Position>,
        max: usize,
    ) -> (Vec<Arc<Instance>>, bool, u64) {
        let state = self.inner.state.lock();
        let (chunk, more) = state.snapshot_chunk(selector, after, max);
        (chunk, more, state.revision)
    }

    pub(super) fn unsubscribe(&self, selector: &Selector, id: u64) {
        let mut state = self.inner.state.lock();
        match selector {
            Selector::Service(key) => remove_subscription(&mut state.by_service, key, id),
            Selector::Group(group) => remove_subscription(&mut state.by_group, group, id),
        }
    }

    fn resolve_timings(&self, asked: TimingOverrides) -> Result<Timings, Error> {
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

    /// Stores what memory now holds for `subject`, if this registry keeps
    /// a store; returns once it is durable.
    async fn persist(&self, subject: persist::Subject<'_>) -> Result<(), Error> {
        let Some(store) = &self.inner.store else {
            return Ok(());
        };
        // Submitted under the state lock, so the store takes changes in the
        // order memory took them and ends with what memory holds.
        let durable = store.submit(self.inner.state.lock().persistent(subject));
        durable.await.map_err(|err| {
            tracing::error!(dir = %store.dir().display(), %err, "cannot store the registry's persistent state");
            Error::Unavailable("the registry cannot store persistent state now; try again".into())
        })
    }

    fn start_probe(&self, instance: &Arc<Instance>) {
        let id = (instance.service.as_ref().clone(), instance.addr.clone());
        let mut probes = self.inner.probes.lock();
        if probes.contains_key(&id) || self.inner.closed.is_cancelled() {
            return;
        }
        let task = tokio::spawn(probe::run(
            Arc::downgrade(&self.inner).into(),
            instance.clone(),
            self.inner.config.probe_interval,
            self.inner.config.probe_timeout,
            self.inner.closed.clone(),
        ));
        probes.insert(id, task.abort_handle());
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// A registry that probes hold without keeping it alive.
pub(super) struct WeakRegistry(Weak<Inner>);

impl From<Weak<Inner>> for WeakRegistry {
    fn from(weak: Weak<Inner>) -> Self {
        WeakRegistry(weak)
    }
}

impl WeakRegistry {
    pub fn upgrade(&self) -> Option<Registry> {
        self.0.upgrade().map(|inner| Registry { inner })
    }
}

/// Heartbeats of one KeepAlive stream; see [`Registry::keep_alive`].
pub struct KeepAlive {
    registry: Registry,
    /// Leases this session is attached to.
    leases: Vec<LeaseId>,
}

impl KeepAlive {
    /// A heartbeat for `lease`; answers the heartbeat interval it expects.
    pub fn beat(&mut self, lease: LeaseId) -> Result<Duration, Error> {
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

impl Drop for KeepAlive {
    fn drop(&mut self) {
        let inner = &self.registry.inner;
        let mut state = inner.state.lock();
        for lease in self.leases.drain(..) {
            state.detach(inner, lease);
        }
    }
}

impl State {
    fn ensure_service(&mut self, key: &ServiceKey) -> &mut Service {
        if !self.services.contains_key(key) {
            *self
                .services_per_namespace
                .entry(key.namespace.clone())
                .or_default() += 1;
        }
        self.services.entry(key.clone()).or_insert_with(|| Service {
            key: Arc::new(key.clone()),
            settings: ServiceSettings::default(),
            explicit: false,
            instances: HashSet::new(),
            healthy: 0,
        })
    }

    fn check_service_room(&self, config: &Config, key: &ServiceKey) -> Result<(), Error> {
        let limit = config.limits.max_services_per_namespace;
        let count = self
            .services_per_namespace
            .get(&key.namespace)
            .copied()
            .unwrap_or(0);
        if count >= limit {
            return Err(Error::ResourceExhausted(format!(
                "namespace {} already holds {limit} services, the limit",
                key.namespace
            )));
        }
        Ok(())
    }

    fn register(
        &mut self,
        inner: &Inner,
        spec: InstanceSpec,
        lease_id: LeaseId,
        timings: Timings,
    ) -> Result<Applied, Error> {
        let config = &inner.config;
        let existing = self
            .services
            .get(&spec.service)
            .and_then(|s| s.get(&spec.addr))
            .cloned();
        match &existing {
            Some(existing) if existing.ephemeral != spec.ephemeral => {
                return Err(Error::FailedPrecondition(format!(
                    "instance {} is registered as {}; deregister it before registering it as {}",
                    existing.id(),
                    if existing.ephemeral {
                        "ephemeral"
                    } else {
                        "persistent"
                    },
                    if spec.ephemeral {
                        "ephemeral"
                    } else {
                        "persistent"
                    },
                )));
            }
            Some(_) => {}
            None => {
                let limit = config.limits.max_instances_per_service;
                match self.services.get(&spec.service) {
                    Some(service) if service.instances.len() >= limit => {
                        return Err(Error::ResourceExhausted(format!(
                            "service {} already has {limit} instances, the limit",
                            spec.service
                        )));
                    }
                    Some(_) => {}
                    None => self.check_service_room(config, &spec.service)?,
                }
            }
        }
        if spec.ephemeral && lease_id != 0 && !self.leases.contains_key(&lease_id) {
            return Err(Error::NotFound(format!(
                "lease {lease_id} is unknown or expired; register without a lease id for a new one"
            )));
        }

        let now = self.now();
        // Registering a known instance without a lease id keeps its lease:
        // registering twice is one registration.
        let lease_id = match (&existing, lease_id) {
            (Some(existing), 0) if self.leases.contains_key(&existing.lease) => existing.lease,
            _ => lease_id,
        };
        let lease_id = match (spec.ephemeral, lease_id) {
            (false, _) => 0,
            (true, 0) => {
                let id = self.new_lease_id();
                self.leases.insert(
                    id,
                    Lease {
                        last_seen: now,
                        streams: 0,
                        orphaned: false,
                        members: SmallVec::new(),
                        queued: None,
                    },
                );
                id
            }
            (true, id) => id,
        };
        if let Some(existing) = &existing
            && existing.lease != lease_id
            && let Some(old) = self.leases.get_mut(&existing.lease)
        {
            old.forget(&spec.service, &spec.addr);
        }

        let service_key = self.ensure_service(&spec.service).key.clone();
        let instance = Arc::new(Instance {
            service: service_key.clone(),
            addr: spec.addr,
            weight: spec.weight,
            enabled: spec.enabled,
            // A registration is a sign of life; a persistent instance keeps
            // what its probe last said.
            healthy: spec.ephemeral || existing.as_ref().is_some_and(|e| e.healthy),
            ephemeral: spec.ephemeral,
            metadata: spec.metadata,
            timings,
            lease: lease_id,
        });
        if existing.as_deref() != Some(&*instance) {
            self.put(instance.clone());
        }
        if let Some(lease) = self.leases.get_mut(&lease_id) {
            lease.last_seen = now;
            lease.orphaned = false;
            lease.forget(&service_key, &instance.addr);
            lease.members.push(instance.clone());
            self.evaluate(inner, lease_id, now);
        }
        let registered = Registered {
            instance_id: instance.id(),
            lease: lease_id,
            revision: self.revision,
            heartbeat_interval: timings.heartbeat_interval(),
        };
        Ok(Applied {
            registered,
            instance,
            previous: existing,
        })
    }

    /// A lease id no lease has now, unguessable: 64 bits from a
    /// cryptographically secure generator.
    fn new_lease_id(&self) -> LeaseId {
        loop {
            let id: LeaseId = rand::random();
            if id != 0 && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    fn heartbeat(&mut self, inner: &Inner, id: LeaseId, attach: bool) -> Result<Duration, Error> {
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

    fn detach(&mut self, inner: &Inner, id: LeaseId) {
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
    fn evaluate(&mut self, inner: &Inner, id: LeaseId, now: Millis) {
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
                continue;
            }
            let healthy = !orphaned && now < unhealthy_at;
            let current = if healthy != current.healthy {
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
    fn reap(&mut self, inner: &Inner) -> Option<Instant> {
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

    fn now(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    /// Stores an instance (new or changed) and publishes the change. The
    /// caller keeps its lease's member current.
    fn put(&mut self, instance: Arc<Instance>) {
        let service = self.ensure_service(&instance.service);
        let previous = service
            .instances
            .replace(Slot(instance.clone()))
            .map(|slot| slot.0);
        if previous.as_ref().is_some_and(|p| p.healthy) {
            service.healthy -= 1;
        }
        if instance.healthy {
            service.healthy += 1;
        }
        self.publish(ChangeKind::Put, instance);
    }

    /// Removes an instance and publishes it; drops the service when it has
    /// nothing left worth keeping.
    fn remove(&mut self, key: &ServiceKey, addr: &InstanceAddr) -> Option<Arc<Instance>> {
        let service = self.services.get_mut(key)?;
        let removed = service.instances.take(addr)?.0;
        if removed.healthy {
            service.healthy -= 1;
        }
        if service.instances.is_empty() && !service.explicit {
            self.drop_service(key);
        }
        self.publish(ChangeKind::Removed, removed.clone());
        Some(removed)
    }

    /// Forgets a service (the caller checked it is empty); answers its
    /// settings if they had been set explicitly.
    fn drop_service(&mut self, key: &ServiceKey) -> Option<ServiceSettings> {
        let service = self.services.remove(key)?;
        if let Some(count) = self.services_per_namespace.get_mut(&key.namespace) {
            *count -= 1;
            if *count == 0 {
                self.services_per_namespace.remove(&key.namespace);
            }
        }
        service.explicit.then_some(service.settings)
    }

    fn publish(&mut self, kind: ChangeKind, instance: Arc<Instance>) {
        self.revision += 1;
        let event = Event {
            revision: self.revision,
            kind,
            instance,
        };
        if let Some(subs) = self.by_service.get_mut(&*event.instance.service) {
            subs.retain(|sub| sub.offer(&event));
        }
        if !self.by_group.is_empty()
            && let Some(subs) = self.by_group.get_mut(&event.instance.service.group_key())
        {
            subs.retain(|sub| sub.offer(&event));
        }
        if self.history_limit > 0 {
            if self.history.len() == self.history_limit {
                self.history.pop_front();
            }
            self.history.push_back(event);
        }
    }

    fn group_range<'a>(
        &'a self,
        group: &'a GroupKey,
    ) -> impl Iterator<Item = (&'a ServiceKey, &'a Service)> + 'a {
        let start = ServiceKey {
            namespace: group.namespace.clone(),
            group: group.group.clone(),
            name: Arc::from(""),
        };
        self.services
            .range(start..)
            .take_while(move |(key, _)| key.in_group(group))
    }

    fn snapshot_chunk(
        &self,
        selector: &Selector,
        after: Option<&Position>,
        max: usize,
    ) -> (Vec<Arc<Instance>>, bool) {
        let services: Box<dyn Iterator<Item = (&ServiceKey, &Service)>> = match selector {
            Selector::Service(key) => Box::new(self.services.get_key_value(key).into_iter()),
            Selector::Group(group) => match after {
                Some((service, _)) => Box::new(
                    self.services
                        .range(service.clone()..)
                        .take_while(move |(key, _)| key.in_group(group)),
                ),
                None => Box::new(self.group_range(group)),
            },
        };
        // One more than asked tells whether more follow.
        let mut chunk = Vec::with_capacity(max + 1);
        for (key, service) in services {
            let mut instances: Vec<_> = match after {
                Some((from, addr)) if from == key => {
                    service.iter().filter(|i| i.addr > *addr).cloned().collect()
                }
                _ => service.iter().cloned().collect(),
            };
            instances.sort_unstable_by(|a, b| a.addr.cmp(&b.addr));
            let room = max + 1 - chunk.len();
            chunk.extend(instances.into_iter().take(room));
            if chunk.len() > max {
                break;
            }
        }
        let more = chunk.len() > max;
        chunk.truncate(max);
        (chunk, more)
    }

    /// The events after `from - 1` that the selector sees, or `None` when
    /// the history no longer reaches back that far (or `from` is ahead).
    fn replay(&self, selector: &Selector, from: u64) -> Option<Vec<Event>> {
        let first_kept = self
            .history
            .front()
            .map_or(self.revision + 1, |e| e.revision);
        if from < first_kept || from > self.revision + 1 {
            return None;
        }
        let skip = (from - first_kept) as usize;
        Some(
            self.history
                .iter()
                .skip(skip)
                .filter(|e| selector.matches(&e.instance.service))
                .cloned()
                .collect(),
        )
    }

    fn subscribe(&mut self, config: &Config, selector: &Selector) -> (u64, Inbox) {
        let id = self.next_watcher;
        self.next_watcher += 1;
        let (subscription, inbox) = Subscription::new(id, config.limits.watch_queue_bytes);
        match selector {
            Selector::Service(key) => self
                .by_service
                .entry(key.clone())
                .or_default()
                .push(subscription),
            Selector::Group(group) => self
                .by_group
                .entry(group.clone())
                .or_default()
                .push(subscription),
        }
        (id, inbox)
    }

    /// What must survive a restart of `subject`, as memory holds it now.
    fn persistent(&self, subject: persist::Subject<'_>) -> persist::Change {
        match subject {
            persist::Subject::Instance(key, addr) => {
                match self.services.get(key).and_then(|s| s.get(addr)) {
                    Some(instance) if !instance.ephemeral => {
                        persist::Change::Put((**instance).clone())
                    }
                    _ => persist::Change::Remove {
                        service: key.clone(),
                        addr: addr.clone(),
                    },
                }
            }
            persist::Subject::Service(key) => persist::Change::Settings {
                service: key.clone(),
                settings: self
                    .services
                    .get(key)
                    .filter(|s| s.explicit)
                    .map(|s| s.settings.clone()),
            },
        }
    }
}

fn unknown_service(key: &ServiceKey) -> Error {
    Error::NotFound(format!("service {key} is not registered"))
}

fn remove_subscription<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Vec<Subscription>>,
    key: &K,
    id: u64,
) {
    if let Some(subs) = map.get_mut(key) {
        subs.retain(|s| s.id != id);
        if subs.is_empty() {
            map.remove(key);
        }
    }
}

/// The lease reaper: sleeps until the earliest lease deadline (or until
/// an earlier one is scheduled), then brings the due leases up to date.
async fn reap(inner: Weak<Inner>, wake: Arc<Notify>, closed: CancellationToken) {
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let next = strong.state.lock().reap(&strong);
        drop(strong);
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
