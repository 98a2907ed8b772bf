//! The config centre: configuration items (namespace, group, data id →
//! content) that services read and watch, served by the registry beside
//! its naming API and kept in the same data dir.
//!
//! Its rules mirror the registry's. Every change (publish, rollback,
//! delete) bumps one config revision by exactly one under one lock, lands
//! in a bounded history and reaches the watchers in that order. An item's
//! version *is* the revision that made it, so a version is never reused,
//! even by an item deleted and published again, and a compare-and-set on
//! a version cannot be fooled by a delete in between.
//!
//! A change is written to the data dir before it is acknowledged (the
//! registry's change log, in the order memory took it), so a registry
//! that dies after answering has it when it starts again. On a cluster
//! node the change is made in etcd instead, and acknowledged once etcd
//! committed it and this node's view applied it (see [`replicated`]):
//! there the revisions are etcd's, which only go up.
//!
//! The watchers of one item (or one group) share a bounded broadcast of
//! its changes: publishing costs a send to the item's and the group's,
//! however many watch, and a watcher that falls more than the buffer
//! behind is sent a fresh snapshot marked as a reset, so a slow reader
//! holds nothing but its place.

pub mod grpc;
pub mod model;
pub mod replicated;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use futures::Stream;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};

use super::cluster::Node;
use super::model::GroupKey;
use super::persist;
use crate::auth::identity::now_ms;
use crate::error::Error;
use model::{Client, ConfigKey, ContentType, Gray, GrayRule, Item, Seen, Version};

/// The `[registry.configs]` section: the config centre's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest content of one item, in bytes.
    pub max_content_bytes: usize,
    /// Items one namespace may hold; publishing a new one beyond it is
    /// refused.
    pub max_items_per_namespace: usize,
    /// Versions kept of each item, the current one included: what
    /// History lists and Rollback may restore.
    pub history: usize,
    /// Changes kept for watchers that resume; older resumes get a reset.
    pub watch_history: usize,
    /// Changes a watcher may fall behind before it is sent a reset
    /// snapshot instead.
    pub watch_buffer: usize,
    /// Config watch streams open at once.
    pub max_watches: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_content_bytes: 256 * 1024,
            max_items_per_namespace: 10_000,
            history: 20,
            watch_history: 1000,
            watch_buffer: 256,
            max_watches: 10_000,
        }
    }
}

/// The most `max_content_bytes` may be on the etcd store: a version is
/// written in one request, which etcd limits to 1.5 MiB by default;
/// this leaves room for the item's head and the encoding.
pub const MAX_CONTENT_ON_ETCD: usize = 1024 * 1024;

/// Bytes of a publish request beside its content (names, type, rule):
/// the content limit leaves this much under the message size limit.
pub const REQUEST_OVERHEAD: usize = 4 * 1024;

impl Limits {
    /// Checks the limits, naming the key at fault.
    pub fn validate(&self, max_message_size: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            max_message_size > REQUEST_OVERHEAD,
            "registry.limits.max_message_size is {max_message_size}; the config centre needs more than {REQUEST_OVERHEAD} bytes"
        );
        for (key, value) in [
            ("max_content_bytes", self.max_content_bytes),
            ("history", self.history),
            ("watch_history", self.watch_history),
            ("watch_buffer", self.watch_buffer),
            ("max_watches", self.max_watches),
            ("max_items_per_namespace", self.max_items_per_namespace),
        ] {
            anyhow::ensure!(value >= 1, "registry.configs.{key} must be at least 1");
        }
        Ok(())
    }

    /// Checks that a version of the largest content fits in one etcd
    /// request, as etcd accepts them by default (`--max-request-bytes`,
    /// 1.5 MiB).
    pub fn fits_in_etcd(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_content_bytes <= MAX_CONTENT_ON_ETCD,
            "registry.configs.max_content_bytes is {}; on the etcd store at most {MAX_CONTENT_ON_ETCD} bytes, for a version is one etcd request and etcd refuses requests over 1.5 MiB",
            self.max_content_bytes
        );
        Ok(())
    }

    /// The largest content a publish may carry: `max_content_bytes`, or
    /// less when a request that large would not fit in a message.
    pub fn content_limit(&self, max_message_size: usize) -> usize {
        self.max_content_bytes
            .min(max_message_size.saturating_sub(REQUEST_OVERHEAD))
    }
}

/// What a change did to an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Published or rolled back: the item's new current version.
    Put,
    /// Deleted: its last version.
    Deleted,
}

/// One change, as watchers are sent it.
#[derive(Debug, Clone)]
pub struct Event {
    /// The config revision it made.
    pub revision: u64,
    /// What it did.
    pub kind: ChangeKind,
    /// The item changed.
    pub key: ConfigKey,
    /// Its current version after the change; of a delete, the last it
    /// had.
    pub version: Arc<Version>,
    /// Its gray version after the change.
    pub gray: Option<Arc<Gray>>,
}

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// One item.
    Item(ConfigKey),
    /// Every item of a group, including ones published later.
    Group(GroupKey),
}

impl Selector {
    /// Whether a change to `key` belongs on this watch.
    pub fn matches(&self, key: &ConfigKey) -> bool {
        match self {
            Selector::Item(item) => item == key,
            Selector::Group(group) => key.in_group(group),
        }
    }
}

/// The condition a change is made on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// None: the change is made whatever the item's version.
    Any,
    /// Only when there is no such item.
    Absent,
    /// Only when the item is at this version.
    Version(u64),
}

impl Expect {
    /// From the wire's optional version, where 0 means "absent".
    pub fn from_wire(expected: Option<u64>) -> Expect {
        match expected {
            None => Expect::Any,
            Some(0) => Expect::Absent,
            Some(version) => Expect::Version(version),
        }
    }

    fn check(self, key: &ConfigKey, current: Option<u64>) -> Result<(), Error> {
        let stale = |now: String, asked: String| {
            Error::FailedPrecondition(format!(
                "config {key} is {now}, not {asked}; read it again and retry"
            ))
        };
        match (self, current) {
            (Expect::Any, _) | (Expect::Absent, None) => Ok(()),
            (Expect::Version(asked), Some(now)) if asked == now => Ok(()),
            (Expect::Absent, Some(now)) => Err(stale(
                format!("at version {now}"),
                "absent as expected".into(),
            )),
            (Expect::Version(asked), now) => Err(stale(
                now.map_or("absent".into(), |now| format!("at version {now}")),
                format!("at version {asked}"),
            )),
        }
    }
}

/// What a publish asks for.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The item published.
    pub key: ConfigKey,
    /// Its new content.
    pub content: String,
    /// How the content is read (and checked).
    pub content_type: ContentType,
    /// The condition the publish is made on.
    pub expect: Expect,
    /// Who publishes: a credential's name, or empty.
    pub by: String,
    /// Publish as the gray version for the clients this rule picks.
    pub gray: Option<GrayRule>,
}

/// The config centre. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct Configs {
    inner: Arc<Inner>,
}

/// Where the centre's changes are made to last.
pub(in crate::registry) enum Keeper {
    /// Nowhere: memory only, for tests and benchmarks.
    Memory,
    /// The data dir's change log.
    Disk(Arc<persist::Store>),
    /// etcd, on a cluster node: a change is made there, and this node's
    /// view learns it from the cluster's feed like every other node's.
    Etcd(Arc<Node>),
}

struct Inner {
    limits: Limits,
    /// The largest content a publish may carry.
    content_limit: usize,
    incarnation: u64,
    state: Mutex<State>,
    watches: Arc<Semaphore>,
    keeper: Keeper,
}

#[derive(Default)]
struct State {
    revision: u64,
    items: BTreeMap<ConfigKey, Item>,
    per_namespace: HashMap<Arc<str>, usize>,
    history: VecDeque<Arc<Event>>,
    /// The latest revision whose change is no longer in `history`.
    history_floor: u64,
    /// The changes of each item and each group watched, each a bounded
    /// broadcast its watchers share: a change costs a send to its item's
    /// and its group's, however many watch other items.
    channels: HashMap<Selector, broadcast::Sender<Arc<Event>>>,
    /// Changes a watcher may fall behind on its channel.
    watch_buffer: usize,
    /// On a cluster node: the items as etcd holds them.
    replica: replicated::Replica,
}

/// What a config store loaded from the data dir.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Stored {
    /// The config revision reached.
    #[serde(default)]
    pub revision: u64,
    /// Every item, with the versions it keeps.
    #[serde(default)]
    pub items: Vec<Item>,
}

impl Configs {
    /// A config centre over `stored`, with the limits of the registry's
    /// `config`, making changes last in `keeper`; `incarnation` is the
    /// registry's.
    pub(in crate::registry) fn new(
        config: &super::Config,
        incarnation: u64,
        stored: Stored,
        keeper: Keeper,
    ) -> Configs {
        let limits = &config.configs;
        let mut state = State {
            revision: stored.revision,
            history_floor: stored.revision,
            watch_buffer: limits.watch_buffer,
            ..State::default()
        };
        for item in stored.items {
            if item.versions.is_empty() {
                continue;
            }
            *state
                .per_namespace
                .entry(item.key.namespace.clone())
                .or_default() += 1;
            state.items.insert(item.key.clone(), item);
        }
        Configs {
            inner: Arc::new(Inner {
                limits: limits.clone(),
                content_limit: limits.content_limit(config.limits.max_message_size),
                incarnation,
                state: Mutex::new(state),
                watches: Arc::new(Semaphore::new(limits.max_watches)),
                keeper,
            }),
        }
    }

    /// The registry's incarnation: revisions of another mean nothing here.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// Config watch streams open now.
    pub fn watchers(&self) -> usize {
        let state = self.inner.state.lock();
        state.channels.values().map(|c| c.receiver_count()).sum()
    }

    /// Publishes `publish`: its content, checked against its type, becomes
    /// the item's new current version, or with a gray rule its gray
    /// version. Answers that version once durable.
    pub async fn publish(&self, publish: Publish) -> Result<Arc<Version>, Error> {
        let limit = self.inner.content_limit;
        if publish.content.len() > limit {
            return Err(Error::invalid(
                "content",
                format!(
                    "is {} bytes; at most {limit} are allowed (registry.configs.max_content_bytes, within registry.limits.max_message_size)",
                    publish.content.len()
                ),
            ));
        }
        publish.content_type.check(&publish.content)?;
        crate::live::check(&publish.key, publish.content_type, &publish.content)?;
        let Publish {
            key,
            content,
            content_type,
            expect,
            by,
            gray,
        } = publish;
        let content: Arc<str> = Arc::from(content);
        let version = Version {
            version: 0,
            md5: model::md5_hex(&content),
            content,
            content_type,
            by,
            at_ms: now_ms(),
            rolled_back_from: 0,
        };
        self.change(&key, expect, |item| match &gray {
            None => Ok(Mutation::Put(version.clone())),
            Some(rule) if item.is_some() => Ok(Mutation::Gray(Some((version.clone(), rule.clone())))),
            Some(_) => Err(Error::FailedPrecondition(format!(
                "config {key} does not exist; a gray version goes beside a current one, so publish that first"
            ))),
        })
        .await
        .map(|(_, made)| made.expect("a publish makes a version"))
    }

    /// Publishes the kept version `version` of `key` again, as its new
    /// current version.
    pub async fn rollback(
        &self,
        key: &ConfigKey,
        version: u64,
        expect: Expect,
        by: String,
    ) -> Result<Arc<Version>, Error> {
        self.change(key, expect, |item| {
            let item = item.ok_or_else(|| not_found(key))?;
            let kept = item.version(version).ok_or_else(|| {
                let kept: Vec<String> = item
                    .versions
                    .iter()
                    .map(|v| v.version.to_string())
                    .collect();
                Error::NotFound(format!(
                    "config {key} keeps no version {version}; it keeps {}",
                    kept.join(", ")
                ))
            })?;
            Ok(Mutation::Put(kept.again(by.clone(), kept.version)))
        })
        .await
        .map(|(_, made)| made.expect("a rollback makes a version"))
    }

    /// Makes the gray version `gray_version` of `key` its current one,
    /// for every client.
    pub async fn promote(
        &self,
        key: &ConfigKey,
        gray_version: u64,
        by: String,
    ) -> Result<Arc<Version>, Error> {
        self.change(key, Expect::Any, |item| {
            let gray = the_gray(key, item, gray_version)?;
            Ok(Mutation::Promote(gray.version.again(by.clone(), 0)))
        })
        .await
        .map(|(_, made)| made.expect("a promotion makes a version"))
    }

    /// Drops the gray version `gray_version` of `key`; answers the
    /// revision of the change.
    pub async fn abandon(&self, key: &ConfigKey, gray_version: u64) -> Result<u64, Error> {
        self.change(key, Expect::Any, |item| {
            the_gray(key, item, gray_version)?;
            Ok(Mutation::Gray(None))
        })
        .await
        .map(|(at, _)| at)
    }

    /// Deletes `key` and its history; answers the revision of the change.
    pub async fn delete(&self, key: &ConfigKey, expect: Expect) -> Result<u64, Error> {
        self.change(key, expect, |item| {
            item.ok_or_else(|| not_found(key))?;
            Ok(Mutation::Delete)
        })
        .await
        .map(|(at, _)| at)
    }

    /// The one way an item changes: asks `make` for the change given the
    /// item as it is, once `expect` holds, and makes it where the centre
    /// keeps its changes. Answers the revision of the change and the
    /// version it made, if it made one, once the change will last.
    async fn change(
        &self,
        key: &ConfigKey,
        expect: Expect,
        make: impl Fn(Option<&Item>) -> Result<Mutation, Error>,
    ) -> Result<(u64, Option<Arc<Version>>), Error> {
        match &self.inner.keeper {
            Keeper::Etcd(node) => self.change_replicated(node, key, expect, make).await,
            Keeper::Memory | Keeper::Disk(_) => self.change_local(key, expect, make).await,
        }
    }

    /// [`Configs::change`] in this process: under the lock, numbers the
    /// change with the next revision, hands it to the data dir in that
    /// order, applies it and tells the watchers; then waits until it is
    /// durable.
    async fn change_local(
        &self,
        key: &ConfigKey,
        expect: Expect,
        make: impl Fn(Option<&Item>) -> Result<Mutation, Error>,
    ) -> Result<(u64, Option<Arc<Version>>), Error> {
        let (revision, made, durable) = {
            let mut state = self.inner.state.lock();
            let mutation = state.decide(key, expect, &self.inner.limits, make)?;
            let revision = state.revision + 1;
            let put = |mut version: Version, promoted: bool| {
                version.version = revision;
                let version = Arc::new(version);
                let record = persist::Change::ConfigVersion {
                    key: key.clone(),
                    version: version.as_ref().clone(),
                    keep: self.inner.limits.history,
                    clear_gray: promoted,
                };
                let applied = Applied::Put {
                    version: version.clone(),
                    clear_gray: promoted,
                };
                (record, (applied, Some(version)))
            };
            let (record, made) = match mutation {
                Mutation::Put(version) => put(version, false),
                Mutation::Promote(version) => put(version, true),
                Mutation::Gray(gray) => {
                    let gray = gray.map(|(mut version, rule)| {
                        version.version = revision;
                        Arc::new(Gray {
                            version: Arc::new(version),
                            rule,
                        })
                    });
                    let record = persist::Change::ConfigGray {
                        key: key.clone(),
                        gray: gray.as_deref().cloned(),
                        revision,
                    };
                    let made = gray.as_ref().map(|g| g.version.clone());
                    (record, (Applied::Gray(gray), made))
                }
                Mutation::Delete => (
                    persist::Change::ConfigDeleted {
                        key: key.clone(),
                        revision,
                    },
                    (Applied::Delete, None),
                ),
            };
            let durable = match &self.inner.keeper {
                Keeper::Disk(store) => Some(store.submit(record)),
                Keeper::Memory | Keeper::Etcd(_) => None,
            };
            let (applied, made) = made;
            let event = state.apply(key, applied, revision, &self.inner.limits);
            state.send(event);
            (revision, made, durable)
        };
        if let Some(durable) = durable {
            durable.await.map_err(|err| {
                tracing::error!(%err, config = %key, "cannot store a config change");
                Error::Unavailable("the registry cannot store config changes now; try again".into())
            })?;
        }
        Ok((revision, made))
    }

    /// The item `key` as `client` reads it now.
    pub fn get(&self, key: &ConfigKey, client: &Client) -> Result<Seen, Error> {
        let state = self.inner.state.lock();
        let item = state.items.get(key).ok_or_else(|| not_found(key))?;
        Ok(item.seen_by(client))
    }

    /// The kept version `version` of `key` (its gray one too).
    pub fn get_version(&self, key: &ConfigKey, version: u64) -> Result<Seen, Error> {
        let state = self.inner.state.lock();
        let item = state.items.get(key).ok_or_else(|| not_found(key))?;
        if let Some(gray) = item.gray.as_ref().filter(|g| g.version.version == version) {
            return Ok(gray.seen(key.clone()));
        }
        let kept = item.version(version).ok_or_else(|| {
            Error::NotFound(format!(
                "config {key} keeps no version {version}; History lists those it keeps"
            ))
        })?;
        Ok(Seen::of(key.clone(), kept, None, &Client::default()))
    }

    /// The item `key` as History lists it: its gray version (if any),
    /// then the versions kept, newest first.
    pub fn history(&self, key: &ConfigKey) -> Result<Vec<Seen>, Error> {
        let state = self.inner.state.lock();
        let item = state.items.get(key).ok_or_else(|| not_found(key))?;
        let gray = item.gray.iter().map(|gray| gray.seen(key.clone()));
        let kept = item.versions.iter().enumerate().map(|(n, version)| {
            let beside = if n == 0 { item.gray.as_ref() } else { None };
            Seen {
                key: key.clone(),
                version: version.clone(),
                gray_rule: None,
                gray_version: beside.map_or(0, |g| g.version.version),
            }
        });
        Ok(gray.chain(kept).collect())
    }

    /// One page of the items of `group` whose data id contains `search`,
    /// with how many match in all and the revision read at.
    pub fn list(
        &self,
        group: &GroupKey,
        search: &str,
        page: usize,
        page_size: usize,
    ) -> (Vec<Seen>, usize, u64) {
        let state = self.inner.state.lock();
        let start = ConfigKey {
            namespace: group.namespace.clone(),
            group: group.group.clone(),
            data_id: Arc::from(""),
        };
        let matching = state
            .items
            .range(start..)
            .take_while(|(key, _)| key.in_group(group))
            .filter(|(key, _)| key.data_id.contains(search));
        let mut total = 0;
        let mut items = Vec::new();
        for (_, item) in matching {
            if total >= page.saturating_sub(1) * page_size && items.len() < page_size {
                items.push(item.seen_by(&Client::default()));
            }
            total += 1;
        }
        (items, total, state.revision)
    }

    /// Watches `selector` for `client` from `start_revision` (0: a
    /// snapshot first); `incarnation` is the one the revision came from
    /// (0: this one).
    pub fn watch(
        &self,
        selector: Selector,
        client: Client,
        start_revision: u64,
        incarnation: u64,
    ) -> Result<ConfigWatch, Error> {
        let permit = self
            .inner
            .watches
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Error::ResourceExhausted(format!(
                    "the registry serves at most {} config watches at once (registry.configs.max_watches)",
                    self.inner.limits.max_watches
                ))
            })?;
        let mut state = self.inner.state.lock();
        // Subscribed under the lock: every change after what the first
        // answer shows, and none before.
        let mut watch = ConfigWatch {
            configs: self.clone(),
            receiver: state.subscribe(&selector),
            selector,
            client,
            pending: None,
            sent: HashMap::new(),
            _permit: permit,
        };
        let stale = incarnation != 0 && incarnation != self.inner.incarnation;
        let first = match start_revision {
            0 => watch.snapshot(&state, false),
            _ if stale => watch.snapshot(&state, true),
            from => match state.replay(&watch.selector, from) {
                Some(events) => {
                    WatchItem::Changes(events.iter().filter_map(|e| watch.seen(e)).collect())
                }
                None => watch.snapshot(&state, true),
            },
        };
        drop(state);
        watch.pending = Some(first);
        Ok(watch)
    }
}

/// The gray version of `key` that `item` has, if it is `version`.
fn the_gray<'a>(
    key: &ConfigKey,
    item: Option<&'a Item>,
    version: u64,
) -> Result<&'a Arc<Gray>, Error> {
    let item = item.ok_or_else(|| not_found(key))?;
    match &item.gray {
        Some(gray) if gray.version.version == version => Ok(gray),
        Some(gray) => Err(Error::FailedPrecondition(format!(
            "config {key}'s gray version is {}, not {version}; read it again and retry",
            gray.version.version
        ))),
        None => Err(Error::FailedPrecondition(format!(
            "config {key} has no gray version"
        ))),
    }
}

fn not_found(key: &ConfigKey) -> Error {
    Error::NotFound(format!("no config {key}"))
}

/// A change as `change` decides it, before it is numbered: its versions'
/// numbers are the revision that makes them, not yet known.
enum Mutation {
    /// A new current version.
    Put(Version),
    /// The gray version's content as the new current version; the gray
    /// version goes.
    Promote(Version),
    /// The gray version set, with the rule that picks its clients, or
    /// dropped.
    Gray(Option<(Version, GrayRule)>),
    Delete,
}

/// A mutation as the state applies it.
enum Applied {
    Put {
        version: Arc<Version>,
        clear_gray: bool,
    },
    Gray(Option<Arc<Gray>>),
    /// The whole item, as a cluster's store holds it.
    Replace(Item),
    Delete,
}

impl State {
    /// Checks `expect` against `key` as it is, asks `make` for the change
    /// and checks that a new item fits its namespace.
    fn decide(
        &self,
        key: &ConfigKey,
        expect: Expect,
        limits: &Limits,
        make: impl Fn(Option<&Item>) -> Result<Mutation, Error>,
    ) -> Result<Mutation, Error> {
        let item = self.items.get(key);
        expect.check(key, item.map(|item| item.current().version))?;
        let mutation = make(item)?;
        if item.is_none() {
            let held = self.per_namespace.get(&key.namespace).copied().unwrap_or(0);
            let max = limits.max_items_per_namespace;
            if held >= max {
                return Err(Error::ResourceExhausted(format!(
                    "namespace {} holds {held} config items, the most allowed (registry.configs.max_items_per_namespace); delete one first",
                    key.namespace
                )));
            }
        }
        Ok(mutation)
    }

    /// Applies a change made at `revision` to `key` and keeps it in the
    /// history; answers the event watchers are sent.
    fn apply(
        &mut self,
        key: &ConfigKey,
        applied: Applied,
        revision: u64,
        limits: &Limits,
    ) -> Arc<Event> {
        self.revision = revision;
        let (kind, item) = match applied {
            Applied::Put {
                version,
                clear_gray,
            } => {
                let item = match self.items.get_mut(key) {
                    Some(item) => {
                        item.versions.insert(0, version);
                        item.versions.truncate(limits.history);
                        if clear_gray {
                            item.gray = None;
                        }
                        item
                    }
                    None => {
                        *self.per_namespace.entry(key.namespace.clone()).or_default() += 1;
                        self.items.entry(key.clone()).or_insert(Item {
                            key: key.clone(),
                            versions: vec![version],
                            gray: None,
                        })
                    }
                };
                (ChangeKind::Put, item.clone())
            }
            Applied::Gray(gray) => {
                let item = self
                    .items
                    .get_mut(key)
                    .expect("a gray change of an item held");
                item.gray = gray;
                (ChangeKind::Put, item.clone())
            }
            Applied::Replace(item) => {
                if !self.items.contains_key(key) {
                    *self.per_namespace.entry(key.namespace.clone()).or_default() += 1;
                }
                self.items.insert(key.clone(), item.clone());
                (ChangeKind::Put, item)
            }
            Applied::Delete => {
                let item = self.items.remove(key).expect("a delete of an item held");
                if let Some(count) = self.per_namespace.get_mut(&key.namespace) {
                    *count -= 1;
                    if *count == 0 {
                        self.per_namespace.remove(&key.namespace);
                    }
                }
                (ChangeKind::Deleted, item)
            }
        };
        let event = Arc::new(Event {
            revision,
            kind,
            key: key.clone(),
            version: item.current().clone(),
            gray: item.gray.clone(),
        });
        self.history.push_back(event.clone());
        while self.history.len() > limits.watch_history {
            if let Some(old) = self.history.pop_front() {
                self.history_floor = old.revision;
            }
        }
        event
    }

    /// A receiver of the changes `selector` covers, from now on.
    fn subscribe(&mut self, selector: &Selector) -> broadcast::Receiver<Arc<Event>> {
        let capacity = self.watch_buffer;
        self.channels
            .entry(selector.clone())
            .or_insert_with(|| broadcast::channel(capacity).0)
            .subscribe()
    }

    /// Sends `event` to the watchers of its item and of its group; a
    /// channel no one reads any more goes.
    fn send(&mut self, event: Arc<Event>) {
        for selector in [
            Selector::Item(event.key.clone()),
            Selector::Group(GroupKey {
                namespace: event.key.namespace.clone(),
                group: event.key.group.clone(),
            }),
        ] {
            if let Some(channel) = self.channels.get(&selector)
                && channel.send(event.clone()).is_err()
            {
                self.channels.remove(&selector);
            }
        }
    }

    /// Every change after `from - 1` that `selector` covers, if the
    /// history still holds them all.
    fn replay(&self, selector: &Selector, from: u64) -> Option<Vec<Arc<Event>>> {
        if from <= self.history_floor || from > self.revision + 1 {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|e| e.revision >= from && selector.matches(&e.key))
                .cloned()
                .collect(),
        )
    }
}

/// What a config watch yields.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// Every item watched, as the watcher reads it, as of `revision`.
    Snapshot {
        /// The watcher's earlier state is void.
        reset: bool,
        /// Each item as the watcher reads it.
        items: Vec<Seen>,
        /// The revision it was read at.
        revision: u64,
    },
    /// Changes, in order: one as it happens, or those a resuming watcher
    /// missed (none when it missed nothing).
    Changes(Vec<WatchChange>),
}

/// One change, as one watcher reads it.
#[derive(Debug, Clone)]
pub struct WatchChange {
    /// The config revision it made.
    pub revision: u64,
    /// What it did.
    pub kind: ChangeKind,
    /// The item as the watcher reads it now; of a delete, as it was.
    pub seen: Seen,
}

/// A watch of the config centre for one client: its first item, then each
/// change in order (a change that leaves what the client reads as it was,
/// such as a gray version for other clients, is not sent), a reset
/// snapshot when it fell too far behind.
pub struct ConfigWatch {
    configs: Configs,
    selector: Selector,
    client: Client,
    receiver: broadcast::Receiver<Arc<Event>>,
    pending: Option<WatchItem>,
    /// The version of each item last sent.
    sent: HashMap<ConfigKey, u64>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        // The last watcher of its item or group takes the channel along.
        let mut state = self.configs.inner.state.lock();
        if state
            .channels
            .get(&self.selector)
            .is_some_and(|channel| channel.receiver_count() <= 1)
        {
            state.channels.remove(&self.selector);
        }
    }
}

impl ConfigWatch {
    /// The next item, or `None` once the centre is gone.
    pub async fn next(&mut self) -> Option<WatchItem> {
        if let Some(first) = self.pending.take() {
            return Some(first);
        }
        loop {
            // The channel is this selector's own: every event is one of
            // its items'.
            match self.receiver.recv().await {
                Ok(event) => {
                    if let Some(change) = self.seen(&event) {
                        return Some(WatchItem::Changes(vec![change]));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let configs = self.configs.clone();
                    let mut state = configs.inner.state.lock();
                    // Taken together under the lock: nothing falls between
                    // the snapshot and the changes after it.
                    self.receiver = state.subscribe(&self.selector);
                    return Some(self.snapshot(&state, true));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// `event` as this watcher reads it; none when what it reads did not
    /// change.
    fn seen(&mut self, event: &Event) -> Option<WatchChange> {
        let seen = Seen::of(
            event.key.clone(),
            &event.version,
            event.gray.as_ref(),
            &self.client,
        );
        match event.kind {
            ChangeKind::Deleted => {
                self.sent.remove(&event.key);
            }
            ChangeKind::Put => {
                let before = self.sent.insert(event.key.clone(), seen.version.version);
                if before == Some(seen.version.version) {
                    return None;
                }
            }
        }
        Some(WatchChange {
            revision: event.revision,
            kind: event.kind,
            seen,
        })
    }

    fn snapshot(&mut self, state: &State, reset: bool) -> WatchItem {
        let items: Vec<Seen> = match &self.selector {
            Selector::Item(key) => state
                .items
                .get(key)
                .map(|item| item.seen_by(&self.client))
                .into_iter()
                .collect(),
            Selector::Group(group) => state
                .items
                .values()
                .filter(|item| item.key.in_group(group))
                .map(|item| item.seen_by(&self.client))
                .collect(),
        };
        self.sent = items
            .iter()
            .map(|seen| (seen.key.clone(), seen.version.version))
            .collect();
        WatchItem::Snapshot {
            reset,
            items,
            revision: state.revision,
        }
    }

    /// As a stream, for the gRPC face.
    pub fn into_stream(self) -> impl Stream<Item = WatchItem> + Send {
        futures::stream::unfold(self, |mut watch| async move {
            watch.next().await.map(|item| (item, watch))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_limited_to_what_a_message_can_carry() {
        let limits = Limits::default();
        assert_eq!(limits.content_limit(4 * 1024 * 1024), 256 * 1024);
        assert_eq!(limits.content_limit(16 * 1024), 12 * 1024);
        assert!(limits.validate(16 * 1024).is_ok());
        assert!(limits.validate(REQUEST_OVERHEAD).is_err());
    }
}
