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
//! that dies after answering has it when it starts again.
//!
//! Watchers share one bounded broadcast of changes: publishing costs one
//! send however many watch, and a watcher that falls more than the buffer
//! behind is sent a fresh snapshot marked as a reset, so a slow reader
//! holds nothing but its place.

pub mod grpc;
pub mod model;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use futures::Stream;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};

use super::model::GroupKey;
use super::persist;
use crate::error::Error;
use model::{ConfigKey, ContentType, Item, Version};

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

impl Limits {
    /// Checks the limits against each other and the registry's message
    /// size, naming the key at fault.
    pub fn validate(&self, max_message_size: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_content_bytes >= 1 && self.max_content_bytes + 64 * 1024 <= max_message_size,
            "registry.configs.max_content_bytes is {}; it must be at least 1 and leave 64 KiB under registry.limits.max_message_size ({max_message_size})",
            self.max_content_bytes
        );
        for (key, value) in [
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
    /// Its new current version; of a delete, the last it had.
    pub version: Arc<Version>,
}

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// The config centre. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct Configs {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    incarnation: u64,
    state: Mutex<State>,
    events: broadcast::Sender<Arc<Event>>,
    watches: Arc<Semaphore>,
    /// Where changes are made durable; none: memory only.
    store: Option<Arc<persist::Store>>,
    /// Why changes are refused, when this store cannot keep them.
    refuse_changes: Option<&'static str>,
}

#[derive(Default)]
struct State {
    revision: u64,
    items: BTreeMap<ConfigKey, Item>,
    per_namespace: HashMap<Arc<str>, usize>,
    history: VecDeque<Arc<Event>>,
    /// The latest revision whose change is no longer in `history`.
    history_floor: u64,
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
    /// A config centre over `stored`, making changes durable in `store`
    /// when there is one; `incarnation` is the registry's.
    pub fn new(
        limits: &Limits,
        incarnation: u64,
        stored: Stored,
        store: Option<Arc<persist::Store>>,
    ) -> Configs {
        let mut state = State {
            revision: stored.revision,
            history_floor: stored.revision,
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
                incarnation,
                state: Mutex::new(state),
                events: broadcast::channel(limits.watch_buffer).0,
                watches: Arc::new(Semaphore::new(limits.max_watches)),
                store,
                refuse_changes: None,
            }),
        }
    }

    /// A config centre whose store cannot hold it yet: reads answer
    /// nothing and changes are refused, saying `why`.
    pub fn unavailable(limits: &Limits, incarnation: u64, why: &'static str) -> Configs {
        let mut configs = Configs::new(limits, incarnation, Stored::default(), None);
        Arc::get_mut(&mut configs.inner)
            .expect("just made")
            .refuse_changes = Some(why);
        configs
    }

    /// The limits it keeps to.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The registry's incarnation: revisions of another mean nothing here.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// The config revision reached.
    pub fn revision(&self) -> u64 {
        self.inner.state.lock().revision
    }

    /// Items held, over all namespaces.
    pub fn len(&self) -> usize {
        self.inner.state.lock().items.len()
    }

    /// Whether it holds no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Config watch streams open now.
    pub fn watchers(&self) -> usize {
        self.inner.events.receiver_count()
    }

    /// Publishes `publish`: its content, checked against its type, becomes
    /// the item's new current version. Answers that version once durable.
    pub async fn publish(&self, publish: Publish) -> Result<Arc<Version>, Error> {
        self.writable()?;
        let limit = self.inner.limits.max_content_bytes;
        if publish.content.len() > limit {
            return Err(Error::invalid(
                "content",
                format!(
                    "is {} bytes; at most {limit} are allowed (registry.configs.max_content_bytes)",
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
        } = publish;
        let content: Arc<str> = Arc::from(content);
        self.change(&key, expect, |revision| {
            Some(Version {
                version: revision,
                md5: model::md5_hex(&content),
                content,
                content_type,
                by,
                at_ms: now_ms(),
                rolled_back_from: 0,
            })
        })
        .await
        .map(|v| v.expect("a publish makes a version"))
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
        self.writable()?;
        let kept = {
            let state = self.inner.state.lock();
            let item = state.items.get(key).ok_or_else(|| not_found(key))?;
            item.version(version).cloned().ok_or_else(|| {
                let kept: Vec<String> = item
                    .versions
                    .iter()
                    .map(|v| v.version.to_string())
                    .collect();
                Error::NotFound(format!(
                    "config {key} keeps no version {version}; it keeps {}",
                    kept.join(", ")
                ))
            })?
        };
        self.change(key, expect, |revision| {
            Some(Version {
                version: revision,
                content: kept.content.clone(),
                content_type: kept.content_type,
                md5: kept.md5.clone(),
                by,
                at_ms: now_ms(),
                rolled_back_from: kept.version,
            })
        })
        .await
        .map(|v| v.expect("a rollback makes a version"))
    }

    /// Deletes `key` and its history; answers the revision of the change.
    pub async fn delete(&self, key: &ConfigKey, expect: Expect) -> Result<u64, Error> {
        self.writable()?;
        if !self.inner.state.lock().items.contains_key(key) {
            return Err(not_found(key));
        }
        self.change(key, expect, |_| None).await?;
        Ok(self.revision())
    }

    /// The one way an item changes: under the lock, checks `expect`,
    /// makes the new version (or none: a delete) at the next revision,
    /// hands the change to the store in that order, applies it and tells
    /// the watchers; then waits until the change is durable.
    async fn change(
        &self,
        key: &ConfigKey,
        expect: Expect,
        make: impl FnOnce(u64) -> Option<Version>,
    ) -> Result<Option<Arc<Version>>, Error> {
        let (made, durable) = {
            let mut state = self.inner.state.lock();
            let current = state.items.get(key).map(|item| item.current().version);
            expect.check(key, current)?;
            if current.is_none() {
                let held = state
                    .per_namespace
                    .get(&key.namespace)
                    .copied()
                    .unwrap_or(0);
                let max = self.inner.limits.max_items_per_namespace;
                if held >= max {
                    return Err(Error::ResourceExhausted(format!(
                        "namespace {} holds {held} config items, the most allowed (registry.configs.max_items_per_namespace); delete one first",
                        key.namespace
                    )));
                }
            }
            let revision = state.revision + 1;
            let made = make(revision).map(Arc::new);
            let record = match &made {
                Some(version) => persist::Change::ConfigVersion {
                    key: key.clone(),
                    version: version.as_ref().clone(),
                    keep: self.inner.limits.history,
                },
                None => persist::Change::ConfigDeleted {
                    key: key.clone(),
                    revision,
                },
            };
            let durable = self.inner.store.as_ref().map(|store| store.submit(record));
            let event = state.apply(key, made.clone(), revision, &self.inner.limits);
            let _ = self.inner.events.send(event);
            (made, durable)
        };
        if let Some(durable) = durable {
            durable.await.map_err(|err| {
                tracing::error!(%err, config = %key, "cannot store a config change");
                Error::Unavailable("the registry cannot store config changes now; try again".into())
            })?;
        }
        Ok(made)
    }

    fn writable(&self) -> Result<(), Error> {
        match self.inner.refuse_changes {
            None => Ok(()),
            Some(why) => Err(Error::FailedPrecondition(why.into())),
        }
    }

    /// The item `key` as it is now.
    pub fn get(&self, key: &ConfigKey) -> Result<(Arc<Version>, u64), Error> {
        let state = self.inner.state.lock();
        let item = state.items.get(key).ok_or_else(|| not_found(key))?;
        Ok((item.current().clone(), state.revision))
    }

    /// The kept version `version` of `key`.
    pub fn get_version(&self, key: &ConfigKey, version: u64) -> Result<Arc<Version>, Error> {
        let state = self.inner.state.lock();
        let item = state.items.get(key).ok_or_else(|| not_found(key))?;
        item.version(version).cloned().ok_or_else(|| {
            Error::NotFound(format!(
                "config {key} keeps no version {version}; History lists those it keeps"
            ))
        })
    }

    /// The versions kept of `key`, newest first.
    pub fn history(&self, key: &ConfigKey) -> Result<Vec<Arc<Version>>, Error> {
        let state = self.inner.state.lock();
        let item = state.items.get(key).ok_or_else(|| not_found(key))?;
        Ok(item.versions.clone())
    }

    /// One page of the items of `group` whose data id contains `search`,
    /// with how many match in all and the revision read at.
    pub fn list(
        &self,
        group: &GroupKey,
        search: &str,
        page: usize,
        page_size: usize,
    ) -> (Vec<(ConfigKey, Arc<Version>)>, usize, u64) {
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
        for (key, item) in matching {
            if total >= page.saturating_sub(1) * page_size && items.len() < page_size {
                items.push((key.clone(), item.current().clone()));
            }
            total += 1;
        }
        (items, total, state.revision)
    }

    /// Watches `selector` from `start_revision` (0: a snapshot first);
    /// `incarnation` is the one the revision came from (0: this one).
    pub fn watch(
        &self,
        selector: Selector,
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
        let state = self.inner.state.lock();
        let receiver = self.inner.events.subscribe();
        let stale = incarnation != 0 && incarnation != self.inner.incarnation;
        let first = match start_revision {
            0 => state.snapshot(&selector, false),
            _ if stale => state.snapshot(&selector, true),
            from => match state.replay(&selector, from) {
                Some(events) => WatchItem::Replay(events, state.revision),
                None => state.snapshot(&selector, true),
            },
        };
        drop(state);
        Ok(ConfigWatch {
            configs: self.clone(),
            selector,
            receiver,
            pending: Some(first),
            _permit: permit,
        })
    }
}

fn not_found(key: &ConfigKey) -> Error {
    Error::NotFound(format!("no config {key}"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl State {
    /// Applies a change made at `revision` to `key` (`None`: deleted) and
    /// keeps it in the history; answers the event watchers are sent.
    fn apply(
        &mut self,
        key: &ConfigKey,
        made: Option<Arc<Version>>,
        revision: u64,
        limits: &Limits,
    ) -> Arc<Event> {
        self.revision = revision;
        let event = match made {
            Some(version) => {
                match self.items.get_mut(key) {
                    Some(item) => {
                        item.versions.insert(0, version.clone());
                        item.versions.truncate(limits.history);
                    }
                    None => {
                        *self.per_namespace.entry(key.namespace.clone()).or_default() += 1;
                        self.items.insert(
                            key.clone(),
                            Item {
                                key: key.clone(),
                                versions: vec![version.clone()],
                            },
                        );
                    }
                }
                Event {
                    revision,
                    kind: ChangeKind::Put,
                    key: key.clone(),
                    version,
                }
            }
            None => {
                let item = self.items.remove(key).expect("a delete of an item held");
                if let Some(count) = self.per_namespace.get_mut(&key.namespace) {
                    *count -= 1;
                    if *count == 0 {
                        self.per_namespace.remove(&key.namespace);
                    }
                }
                Event {
                    revision,
                    kind: ChangeKind::Deleted,
                    key: key.clone(),
                    version: item.current().clone(),
                }
            }
        };
        let event = Arc::new(event);
        self.history.push_back(event.clone());
        while self.history.len() > limits.watch_history {
            if let Some(old) = self.history.pop_front() {
                self.history_floor = old.revision;
            }
        }
        event
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

    fn snapshot(&self, selector: &Selector, reset: bool) -> WatchItem {
        let items = match selector {
            Selector::Item(key) => self
                .items
                .get(key)
                .map(|item| (key.clone(), item.current().clone()))
                .into_iter()
                .collect(),
            Selector::Group(group) => self
                .items
                .iter()
                .filter(|(key, _)| key.in_group(group))
                .map(|(key, item)| (key.clone(), item.current().clone()))
                .collect(),
        };
        WatchItem::Snapshot {
            reset,
            items,
            revision: self.revision,
        }
    }
}

/// What a config watch yields.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// Every item watched, as of `revision`.
    Snapshot {
        /// The watcher's earlier state is void.
        reset: bool,
        /// Each item with its current version.
        items: Vec<(ConfigKey, Arc<Version>)>,
        /// The revision it was read at.
        revision: u64,
    },
    /// The changes a resuming watcher missed, up to `revision` (the
    /// second field), in order; none when it missed nothing.
    Replay(Vec<Arc<Event>>, u64),
    /// One change.
    Change(Arc<Event>),
}

/// A watch of the config centre: its first item, then each change in
/// order, a reset snapshot when it fell too far behind; ends when the
/// centre is dropped (the gRPC face ends it at shutdown).
pub struct ConfigWatch {
    configs: Configs,
    selector: Selector,
    receiver: broadcast::Receiver<Arc<Event>>,
    pending: Option<WatchItem>,
    _permit: OwnedSemaphorePermit,
}

impl ConfigWatch {
    /// The next item, or `None` once the centre is gone.
    pub async fn next(&mut self) -> Option<WatchItem> {
        if let Some(first) = self.pending.take() {
            return Some(first);
        }
        loop {
            match self.receiver.recv().await {
                Ok(event) if self.selector.matches(&event.key) => {
                    return Some(WatchItem::Change(event));
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let state = self.configs.inner.state.lock();
                    // Taken together under the lock: nothing falls between
                    // the snapshot and the changes after it.
                    self.receiver = self.configs.inner.events.subscribe();
                    return Some(state.snapshot(&self.selector, true));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// As a stream, for the gRPC face.
    pub fn into_stream(self) -> impl Stream<Item = WatchItem> + Send {
        futures::stream::unfold(self, |mut watch| async move {
            watch.next().await.map(|item| (item, watch))
        })
    }
}
