//! [`Registry`]: the registry's rules over its state, behind one type with
//! a narrow interface (register, deregister, query, keep alive, watch).
//!
//! The rules and the state they govern are split by concept, a file each:
//!
//! - [`catalog`]: services and their instances: register, deregister,
//!   queries, service settings, the limits on both.
//! - [`lease`]: leases and their deadlines: heartbeats, KeepAlive
//!   sessions, and the reaper that marks an instance unhealthy after its
//!   unhealthy timeout (Nacos's 15 s) and removes it after its delete
//!   timeout (30 s).
//! - [`fanout`]: the history of changes and their fan-out to watchers
//!   (the stream side is [`super::watch`]).
//! - [`durable`]: what must survive a restart: loading it at open, and
//!   storing each persistent change before it is acknowledged.
//! - [`probes`]: the health probes of persistent instances.
//! - [`tokens`]: the credentials the registry accepts.
//!
//! The seam where state lives is [`State`] (the view every query and watch
//! reads, in memory) and [`durable`] (how a change is made to last).
//! Every rule above goes through them, so another store can go under the
//! registry by replacing those two and nothing in the gRPC layer.
//!
//! One mutex guards the state. Every operation is short and in memory
//! (storing happens outside the lock), and one lock keeps the invariant
//! that matters most simple: every change bumps the revision by exactly
//! one, lands in the history and reaches the watchers in the same order.

mod catalog;
mod durable;
mod fanout;
mod identity;
mod lease;
mod probes;
mod replicated;
mod tokens;
mod view;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::model::{ChangeKind, Event, GroupKey, Instance, InstanceAddr, LeaseId, ServiceKey};
use super::watch::Subscription;
use super::{Config, cluster, persist};
use crate::auth::identity::Signer;
use crate::auth::session::Sessions;
use crate::auth::{Grant, TokenId};
use catalog::Service;
use lease::{Lease, Millis, reap};

pub use fanout::WatcherView;
pub use identity::IDENTITY_KEY_FILE;
pub use lease::{KeepAlive, Liveness};
pub(super) use probes::WeakRegistry;
pub use tokens::ADMIN_TOKEN_FILE;

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
    store: Option<Arc<persist::Store>>,
    /// The config centre, on the same store.
    configs: super::configs::Configs,
    /// Set when the state lives in etcd: writes go there, and the view
    /// below is fed from there.
    node: Option<Arc<cluster::Node>>,
    probes: Mutex<HashMap<(ServiceKey, InstanceAddr), AbortHandle>>,
    /// On a cluster node, once its view is loaded: whether it is the one
    /// that probes.
    election: OnceLock<cluster::election::Election>,
    /// Once it serves: where, as GetCluster lists it (and on a cluster
    /// node, the key that lists it to the others).
    announced: OnceLock<cluster::announce::Announcement>,
    closed: CancellationToken,
    /// What service identities are signed with.
    signer: Signer,
    /// How persistent instances are probed over TLS, when the mesh runs
    /// on it.
    probe_tls: Option<crate::server::Dialer>,
    /// The console's sessions: credentials too, held by this node alone.
    sessions: Sessions,
    /// What it counts for its metrics.
    counters: super::metrics::Counters,
}

/// What one namespace holds, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespaceCount {
    /// Services in it.
    pub services: usize,
    /// Instances in it, healthy or not.
    pub instances: usize,
    /// Of those, the healthy ones.
    pub healthy: usize,
}

/// Counts for tests, metrics and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// The registry's current revision: bumped by every change.
    pub revision: u64,
    /// Services held, over all namespaces.
    pub services: usize,
    /// Instances registered, ephemeral and persistent.
    pub instances: usize,
    /// Leases alive.
    pub leases: usize,
    /// Watch subscriptions open.
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
    /// The latest revision whose change is no longer in `history`: a
    /// watcher that has seen less than it cannot be replayed to. Revisions
    /// need not be consecutive (a cluster's come from etcd), so this is
    /// kept rather than worked out from the first change kept.
    history_floor: u64,
    /// While a cluster node applies one etcd revision: its changes, to be
    /// numbered once all are known.
    held_back: Option<Vec<(ChangeKind, Arc<Instance>)>>,
    next_watcher: u64,
    by_service: HashMap<ServiceKey, Vec<Subscription>>,
    by_group: HashMap<GroupKey, Vec<Subscription>>,
    /// The grants of the tokens this registry accepts.
    tokens: HashMap<TokenId, Arc<Grant>>,
}

impl Registry {
    /// A registry that keeps nothing on disk: persistent instances last as
    /// long as the process. For tests and benchmarks.
    pub fn in_memory(config: &Config) -> Registry {
        Registry::with_store(config, None, None, (Signer::generate(), None))
    }

    /// A registry over `store` (and its config centre's `stored` items),
    /// or on a cluster `node`.
    fn with_store(
        config: &Config,
        store: Option<(persist::Store, super::configs::Stored)>,
        node: Option<Arc<cluster::Node>>,
        (signer, probe_tls): (Signer, Option<crate::server::Dialer>),
    ) -> Registry {
        use super::configs::{Configs, Keeper};
        let incarnation = node
            .as_ref()
            .map_or_else(|| rand::random::<u64>() | 1, |node| node.incarnation);
        let (store, configs) = match (store, &node) {
            (_, Some(node)) => (
                None,
                Configs::new(
                    config,
                    incarnation,
                    Default::default(),
                    Keeper::Etcd(node.clone()),
                ),
            ),
            (Some((store, stored)), None) => {
                let store = Arc::new(store);
                let keeper = Keeper::Disk(store.clone());
                (
                    Some(store),
                    Configs::new(config, incarnation, stored, keeper),
                )
            }
            (None, None) => (
                None,
                Configs::new(config, incarnation, Default::default(), Keeper::Memory),
            ),
        };
        let inner = Arc::new(Inner {
            config: config.clone(),
            incarnation,
            state: Mutex::new(State {
                revision: 0,
                services: BTreeMap::new(),
                services_per_namespace: HashMap::new(),
                leases: HashMap::new(),
                deadlines: BTreeSet::new(),
                epoch: Instant::now(),
                history: VecDeque::new(),
                history_limit: config.limits.watch_history,
                history_floor: 0,
                held_back: None,
                next_watcher: 1,
                by_service: HashMap::new(),
                by_group: HashMap::new(),
                tokens: HashMap::new(),
            }),
            reaper: Arc::new(Notify::new()),
            watches: Arc::new(Semaphore::new(config.limits.max_watches)),
            store,
            configs,
            node,
            probes: Mutex::new(HashMap::new()),
            election: OnceLock::new(),
            announced: OnceLock::new(),
            closed: CancellationToken::new(),
            counters: Default::default(),
            signer,
            probe_tls,
            sessions: Sessions::new(
                config.console.session_idle,
                config.console.session_max,
                config.console.max_sessions,
            ),
        });
        tokio::spawn(reap(
            Arc::downgrade(&inner),
            inner.reaper.clone(),
            inner.closed.clone(),
        ));
        Registry { inner }
    }

    /// Stops the reaper and the probes and ends every watch; a cluster
    /// node also gives up probing and its key that lists it as up, in the
    /// background ([`Registry::leave`] waits until etcd knows). Idempotent.
    pub fn close(&self) {
        self.inner.closed.cancel();
        for (_, probe) in self.inner.probes.lock().drain() {
            probe.abort();
        }
        let mut state = self.inner.state.lock();
        state.by_service.clear();
        state.by_group.clear();
    }

    /// Closes the registry and, on a cluster node, hands the probing over
    /// and deletes the key that lists the node as up: another node takes
    /// the probing at once, and GetCluster stops listing this one at once,
    /// instead of after this node's leases expire. Returns once etcd has
    /// been told, or could not be.
    pub async fn leave(&self) {
        self.close();
        let resign = async {
            if let Some(election) = self.inner.election.get() {
                election.resign().await;
            }
        };
        let withdraw = async {
            if let Some(announcement) = self.inner.announced.get() {
                announcement.withdraw().await;
            }
        };
        tokio::join!(resign, withdraw);
    }

    /// Random per run; a watcher that resumes with another run's incarnation
    /// gets a reset snapshot, since revisions of another run mean nothing here.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// The config centre, on this registry's store.
    pub fn configs(&self) -> &super::configs::Configs {
        &self.inner.configs
    }

    /// The console's sessions, which [`Registry::authorize`] accepts as
    /// it accepts tokens.
    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    /// The revision the registry (this node's view, on a cluster) has
    /// reached.
    pub fn revision(&self) -> u64 {
        self.inner.state.lock().revision
    }

    /// The configuration this registry was built with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Says that this registry serves on `addr`: GetCluster lists it
    /// from now on, and on a cluster node every node does, until it
    /// [leaves](Registry::leave) or its etcd lease for it expires. Once.
    pub fn announce(&self, addr: std::net::SocketAddr) {
        use cluster::announce::Announcement;
        self.inner.announced.get_or_init(|| match self.node() {
            None => Announcement::local(addr),
            Some(node) => Announcement::start(
                &node.etcd,
                &node.prefix,
                addr,
                self.inner.config.etcd.prober_ttl,
                self.inner.closed.child_token(),
            ),
        });
    }

    /// Where this node's state lives, the revision its view has reached,
    /// the registry nodes that are up, and on the etcd store the etcd
    /// cluster's members (both asked of etcd now, so this may take up to
    /// etcd's request timeout).
    pub async fn cluster_info(&self) -> cluster::ClusterInfo {
        let revision = self.inner.state.lock().revision;
        let announced = self.inner.announced.get();
        let (nodes, etcd) = match self.node() {
            None => (
                Ok(announced.map(|this| this.node()).into_iter().collect()),
                None,
            ),
            Some(node) => {
                let (nodes, members) = tokio::join!(
                    cluster::announce::list(&node.etcd, &node.prefix, announced),
                    node.members()
                );
                let etcd = cluster::EtcdInfo {
                    endpoints: self.inner.config.etcd.endpoints.clone(),
                    prefix: node.prefix.clone(),
                    members: members.map_err(|err| err.to_string()),
                };
                (nodes.map_err(|err| err.to_string()), Some(etcd))
            }
        };
        cluster::ClusterInfo {
            store: self.inner.config.store,
            revision,
            incarnation: self.inner.incarnation,
            nodes,
            etcd,
        }
    }

    /// What each namespace holds now, by name.
    pub fn census(&self) -> std::collections::BTreeMap<Arc<str>, NamespaceCount> {
        let state = self.inner.state.lock();
        let mut census = std::collections::BTreeMap::<Arc<str>, NamespaceCount>::new();
        for service in state.services.values() {
            let count = census.entry(service.key.namespace.clone()).or_default();
            count.services += 1;
            count.instances += service.instances.len();
            count.healthy += service.healthy;
        }
        census
    }

    pub(super) fn counters(&self) -> &super::metrics::Counters {
        &self.inner.counters
    }

    /// Counts of what the registry holds now.
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
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}
