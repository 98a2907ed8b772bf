//! A cluster node's view: etcd's changes applied to [`State`] in etcd's
//! order, so that queries and watches on any node read the same state.
//!
//! Revisions: one etcd revision may change several instances (a
//! transaction, or a lease whose alive key expired). The changes derived
//! from etcd's revision R are numbered `R << 16` plus their place among
//! them, and the last of them is `R << 16 | 0xFFFF`: so a watcher that saw
//! all of R asks next for `(R + 1) << 16`, and a node that started from
//! etcd's state at R can tell it from one that saw only part of R (which
//! it cannot replay, and resets). Every node applies the same etcd changes
//! to the same state, and takes a lease's instances in key order, so each
//! change has the same revision on every node, and a watcher may resume on
//! any of them.

use std::sync::Arc;

use smallvec::SmallVec;

use super::lease::Lease;
use super::{Registry, State};
use crate::auth::Grant;
use crate::etcd::{EventKind, LeaseId as EtcdLease};
use crate::registry::Config;
use crate::registry::cluster::election::Election;
use crate::registry::cluster::keys::{self, Key};
use crate::registry::cluster::{Feed, Node};
use crate::registry::model::{Event, Instance, InstanceAddr, LeaseId, ServiceKey, ServiceSettings};
use crate::server::Connections;

/// Bits of a revision that number the changes of one etcd revision.
pub const SUB_REVISION_BITS: u32 = 16;

/// The place of the last change of an etcd revision.
const LAST_OF_REVISION: u64 = (1 << SUB_REVISION_BITS) - 1;

/// The revision a write that etcd made at `etcd_revision` is answered
/// with: that of the last change of its etcd revision, so a watch from
/// the next misses nothing after it.
pub(super) fn revision_of(etcd_revision: i64) -> u64 {
    (etcd_revision.max(0) as u64) << SUB_REVISION_BITS | LAST_OF_REVISION
}

/// One key as etcd changed it: its new value, or None when deleted.
#[derive(Debug, Clone, Copy)]
pub struct KeyChange<'a> {
    /// The key, as etcd has it.
    pub key: &'a [u8],
    /// Its value after the change; None: the key was deleted.
    pub value: Option<&'a [u8]>,
    /// The etcd lease it hangs on after the change.
    pub lease: Option<EtcdLease>,
}

impl<'a> KeyChange<'a> {
    fn of(kv: &'a crate::etcd::Kv) -> KeyChange<'a> {
        KeyChange {
            key: &kv.key,
            value: Some(&kv.value),
            lease: kv.lease,
        }
    }
}

impl Registry {
    /// Joins the registry cluster on `config.etcd`: connects, reads the
    /// whole state into this node's view and follows etcd's changes from
    /// there. Answers once the view holds the state, so a node never
    /// serves an empty registry while it loads. From then on the node
    /// also campaigns to be the one that probes persistent instances
    /// (over TLS with `probe_tls` when it is given).
    pub async fn join(
        config: &Config,
        connections: &Connections,
        probe_tls: Option<crate::server::Dialer>,
    ) -> Result<Registry, crate::etcd::Error> {
        let lease_ttls = (config.unhealthy_timeout, config.delete_timeout);
        let node = Arc::new(Node::connect(&config.etcd, lease_ttls, connections).await?);
        let signer = super::identity::from_etcd(&node).await?;
        let registry = Registry::with_store(config, None, Some(node.clone()), (signer, probe_tls));
        let weak = Arc::downgrade(&registry.inner);
        let prefix = node.prefix.clone();
        let apply = move |feed: Feed| {
            if let Some(inner) = weak.upgrade() {
                inner.configs.apply_feed(&prefix, &feed);
                inner.state.lock().apply_feed(&prefix, feed);
            }
        };
        tokio::spawn(node.clone().feed(apply, registry.inner.closed.clone()));
        tokio::spawn(node.clone().keep_leases(registry.inner.closed.clone()));
        tokio::spawn(super::replicated::time_silences(
            Arc::downgrade(&registry.inner),
            node.clone(),
            registry.inner.closed.clone(),
        ));
        node.caught_up(1).await;
        // Only once the view is loaded: a node elected before would not
        // know what to probe.
        let election = Election::start(
            node.etcd.clone(),
            keys::prober(&node.prefix),
            config.etcd.prober_ttl,
            registry.inner.closed.child_token(),
        );
        tokio::spawn(super::probes::supervise(
            Arc::downgrade(&registry.inner),
            election.leads(),
            node.applied(),
            registry.inner.closed.clone(),
        ));
        let _ = registry.inner.election.set(election);
        tracing::info!(
            endpoints = %node.etcd.endpoints(),
            prefix = %node.prefix,
            instances = registry.stats().instances,
            "joined the registry cluster"
        );
        Ok(registry)
    }

    /// The cluster this registry is a node of, if its state lives in etcd.
    pub(in crate::registry) fn node(&self) -> Option<&Arc<Node>> {
        self.inner.node.as_ref()
    }
}

impl State {
    /// Applies one step of etcd's feed.
    fn apply_feed(&mut self, prefix: &str, feed: Feed) {
        match feed {
            Feed::Load { revision, kvs } => self.reload_etcd(
                prefix,
                revision.max(0) as u64,
                kvs.iter().map(KeyChange::of),
            ),
            Feed::Changes { revision, events } => self.apply_etcd(
                prefix,
                revision.max(0) as u64,
                events.iter().map(|event| KeyChange {
                    key: &event.kv.key,
                    value: match event.kind {
                        EventKind::Put => Some(event.kv.value.as_slice()),
                        EventKind::Delete => None,
                    },
                    lease: event.kv.lease,
                }),
            ),
        }
    }

    /// Applies what etcd changed at `etcd_revision` under `prefix`, in
    /// etcd's order. Keys this registry did not write, and values it
    /// cannot read, are logged and skipped: they must not stop the view.
    pub(in crate::registry) fn apply_etcd<'a>(
        &mut self,
        prefix: &str,
        etcd_revision: u64,
        changes: impl IntoIterator<Item = KeyChange<'a>>,
    ) {
        self.held_back = Some(Vec::new());
        for change in changes {
            let Some(key) = Key::decode(prefix, change.key) else {
                tracing::debug!(key = %String::from_utf8_lossy(change.key), "not a registry key; skipped");
                continue;
            };
            match (key, change.value) {
                (Key::Instance(service, addr), Some(value)) => {
                    match serde_json::from_slice::<Instance>(value) {
                        Ok(record) => self.put_replicated(&service, addr, record),
                        Err(err) => {
                            tracing::warn!(%service, %err, "an unreadable instance record; skipped")
                        }
                    }
                }
                (Key::Instance(service, addr), None) => self.remove_replicated(&service, &addr),
                (Key::Alive(lease), value) => self.set_alive(lease, value.is_some(), change.lease),
                (Key::Settings(service), Some(value)) => {
                    match serde_json::from_slice::<ServiceSettings>(value) {
                        Ok(settings) => {
                            let entry = self.ensure_service(&service);
                            entry.settings = settings;
                            entry.explicit = true;
                        }
                        Err(err) => {
                            tracing::warn!(%service, %err, "unreadable service settings; skipped")
                        }
                    }
                }
                (Key::Settings(service), None) => self.unset_settings(&service),
                (Key::Token(id), Some(value)) => match serde_json::from_slice::<Grant>(value) {
                    Ok(grant) if grant.id == id => {
                        self.tokens.insert(id, Arc::new(grant));
                    }
                    _ => tracing::warn!(%id, "an unreadable token grant; skipped"),
                },
                (Key::Token(id), None) => {
                    self.tokens.remove(&id);
                }
                // Which nodes are up is read from etcd when asked; the
                // config centre keeps its own view.
                (Key::Node { .. } | Key::Config(_) | Key::ConfigVersion(..), _) => {}
            }
        }
        let held = self.held_back.take().unwrap_or_default();
        let base = etcd_revision << SUB_REVISION_BITS;
        let last = base | LAST_OF_REVISION;
        let count = held.len();
        for (place, (kind, instance)) in held.into_iter().enumerate() {
            let revision = if place + 1 == count {
                last
            } else {
                base + place as u64 + 1
            };
            self.emit(Event {
                revision,
                kind,
                instance,
            });
        }
        self.revision = self.revision.max(last);
    }

    /// Brings the view to what etcd held at `etcd_revision`, whatever it
    /// held before (nothing, at a node's start; or a state from before a
    /// compaction this node's watch missed): what is gone is removed and
    /// what is new or changed is put, so watchers see the difference as
    /// changes. The history before cannot be replayed across the gap: a
    /// watcher that saw less than `etcd_revision` is reset.
    pub(in crate::registry) fn reload_etcd<'a>(
        &mut self,
        prefix: &str,
        etcd_revision: u64,
        kvs: impl IntoIterator<Item = KeyChange<'a>>,
    ) {
        let kvs: Vec<KeyChange<'a>> = kvs.into_iter().collect();
        let present: std::collections::HashSet<&[u8]> = kvs.iter().map(|kv| kv.key).collect();
        let mut held: Vec<String> = Vec::new();
        for service in self.services.values() {
            if service.explicit {
                held.push(Key::Settings((*service.key).clone()).encode(prefix));
            }
            for instance in service.iter() {
                held.push(
                    Key::Instance((*service.key).clone(), instance.addr.clone()).encode(prefix),
                );
            }
        }
        for id in self.tokens.keys() {
            held.push(Key::Token(*id).encode(prefix));
        }
        for (id, lease) in &self.leases {
            if !lease.orphaned {
                held.push(Key::Alive(*id).encode(prefix));
            }
        }
        let gone: Vec<String> = held
            .into_iter()
            .filter(|key| !present.contains(key.as_bytes()))
            .collect();
        let is_alive = |key: &[u8]| matches!(Key::decode(prefix, key), Some(Key::Alive(_)));
        // Alive keys first, so an instance put is healthy at once.
        let puts = kvs
            .iter()
            .filter(|kv| is_alive(kv.key))
            .chain(kvs.iter().filter(|kv| !is_alive(kv.key)))
            .copied();
        let deletes = gone.iter().map(|key| KeyChange {
            key: key.as_bytes(),
            value: None,
            lease: None,
        });
        self.apply_etcd(prefix, etcd_revision, deletes.chain(puts));
        self.history.clear();
        self.history_floor = self.revision;
    }

    fn put_replicated(&mut self, service: &ServiceKey, addr: InstanceAddr, mut record: Instance) {
        let previous = self
            .services
            .get(service)
            .and_then(|s| s.get(&addr))
            .cloned();
        record.service = self.ensure_service(service).key.clone();
        record.addr = addr;
        if record.ephemeral {
            let lease = self.leases.entry(record.lease).or_insert_with(orphan);
            record.healthy = !lease.orphaned;
        }
        let instance = Arc::new(record);
        if let Some(previous) = &previous
            && previous.lease != instance.lease
        {
            self.forget_member(previous);
        }
        if let Some(lease) = self
            .leases
            .get_mut(&instance.lease)
            .filter(|_| instance.ephemeral)
        {
            lease.forget(service, &instance.addr);
            lease.members.push(instance.clone());
        }
        if previous.as_deref() != Some(&*instance) {
            self.put(instance);
        }
    }

    fn remove_replicated(&mut self, service: &ServiceKey, addr: &InstanceAddr) {
        if let Some(removed) = self.remove(service, addr) {
            self.forget_member(&removed);
        }
    }

    /// Drops `instance` from its lease's members, and the lease once it
    /// has neither members nor an alive key.
    fn forget_member(&mut self, instance: &Instance) {
        if let Some(lease) = self.leases.get_mut(&instance.lease) {
            lease.forget(&instance.service, &instance.addr);
            if lease.members.is_empty() && lease.orphaned {
                self.leases.remove(&instance.lease);
            }
        }
    }

    /// A lease's alive key appeared (hanging on the etcd lease
    /// `alive_on`) or went: its instances turn healthy or unhealthy, in
    /// key order.
    fn set_alive(&mut self, id: LeaseId, alive: bool, alive_on: Option<EtcdLease>) {
        let lease = self.leases.entry(id).or_insert_with(orphan);
        lease.orphaned = !alive;
        lease.alive_on = alive_on.filter(|_| alive);
        if !alive && lease.members.is_empty() {
            self.leases.remove(&id);
            return;
        }
        let mut members = std::mem::take(&mut lease.members);
        members.sort_by(|a, b| (&a.service, &a.addr).cmp(&(&b.service, &b.addr)));
        let mut kept = SmallVec::new();
        for member in members {
            let member = if member.healthy == alive {
                member
            } else {
                let changed = Arc::new(Instance {
                    healthy: alive,
                    ..(*member).clone()
                });
                self.put(changed.clone());
                changed
            };
            kept.push(member);
        }
        if let Some(lease) = self.leases.get_mut(&id) {
            lease.members = kept;
        }
    }

    fn unset_settings(&mut self, service: &ServiceKey) {
        let Some(entry) = self.services.get_mut(service) else {
            return;
        };
        if entry.instances.is_empty() {
            self.drop_service(service);
        } else {
            entry.explicit = false;
            entry.settings = ServiceSettings::default();
        }
    }
}

/// A lease known only from an instance that names it: not alive until its
/// alive key is seen.
fn orphan() -> Lease {
    Lease {
        last_seen: 0,
        streams: 0,
        orphaned: true,
        members: SmallVec::new(),
        queued: None,
        alive_on: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;
    use crate::registry::model::{ChangeKind, Metadata, Timings};
    use crate::registry::watch::{Selector, WatchItem};
    use crate::registry::{Config, Registry};

    const PREFIX: &str = "/p";

    fn service() -> ServiceKey {
        ServiceKey::parse("", "", "svc").unwrap()
    }

    fn addr(port: u16) -> InstanceAddr {
        InstanceAddr::parse("", "10.0.0.1", port.into()).unwrap()
    }

    fn record(port: u16, lease: LeaseId) -> (String, Vec<u8>) {
        let instance = Instance {
            service: Arc::new(service()),
            addr: addr(port),
            weight: 1.0,
            enabled: true,
            healthy: true,
            ephemeral: true,
            metadata: Metadata::default(),
            timings: Timings {
                heartbeat_interval_ms: 5000,
                unhealthy_timeout_ms: 15000,
                delete_timeout_ms: 30000,
            },
            lease,
        };
        (
            Key::Instance(service(), addr(port)).encode(PREFIX),
            serde_json::to_vec(&instance).unwrap(),
        )
    }

    fn alive(lease: LeaseId) -> String {
        Key::Alive(lease).encode(PREFIX)
    }

    fn apply(registry: &Registry, revision: u64, changes: &[(&str, Option<&[u8]>)]) {
        registry.inner.state.lock().apply_etcd(
            PREFIX,
            revision,
            changes.iter().map(|(key, value)| KeyChange {
                lease: None,
                key: key.as_bytes(),
                value: *value,
            }),
        );
    }

    /// A key as a range read returns it.
    fn put<'a>((key, value): (&'a [u8], &'a [u8])) -> KeyChange<'a> {
        KeyChange {
            key,
            value: Some(value),
            lease: None,
        }
    }

    async fn next(watch: &mut crate::registry::watch::WatchStream) -> WatchItem {
        tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("an item")
            .expect("the watch goes on")
    }

    fn healthy(registry: &Registry, port: u16) -> Option<bool> {
        let view = registry.get_service(&service(), false, &[]).ok()?;
        view.instances
            .iter()
            .find(|i| i.addr.port == port)
            .map(|i| i.healthy)
    }

    #[tokio::test]
    async fn an_instance_is_healthy_while_its_lease_is_alive() {
        let registry = Registry::in_memory(&Config::default());
        let (key, value) = record(80, 2);
        apply(
            &registry,
            5,
            &[(&alive(2), Some(b"")), (&key, Some(&value))],
        );
        assert_eq!(healthy(&registry, 80), Some(true));
        apply(&registry, 6, &[(&alive(2), None)]);
        assert_eq!(healthy(&registry, 80), Some(false), "the alive key went");
        apply(&registry, 7, &[(&alive(2), Some(b""))]);
        assert_eq!(healthy(&registry, 80), Some(true), "a heartbeat came back");
        apply(&registry, 8, &[(&key, None)]);
        assert_eq!(healthy(&registry, 80), None, "removed");
        assert_eq!(registry.stats().leases, 1, "the lease is still alive");
        apply(&registry, 9, &[(&alive(2), None)]);
        assert_eq!(registry.stats().leases, 0, "nothing left of the lease");
    }

    #[tokio::test]
    async fn a_registry_nodes_key_coming_and_going_changes_nothing_in_the_view() {
        let registry = Registry::in_memory(&Config::default());
        let (key, value) = record(80, 2);
        apply(
            &registry,
            5,
            &[(&alive(2), Some(b"")), (&key, Some(&value))],
        );
        let mut watch = registry.watch(Selector::Service(service()), 0, 0).unwrap();
        assert!(matches!(next(&mut watch).await, WatchItem::Snapshot { .. }));
        let before = registry.stats();
        let node = Key::Node {
            addr: "10.0.0.9:8848".parse().unwrap(),
            id: 1,
        }
        .encode(PREFIX);
        let said = br#"{"address": "10.0.0.9:8848", "started_ms": 1, "version": "0.1.0"}"#;
        apply(&registry, 6, &[(&node, Some(said))]);
        apply(&registry, 7, &[(&node, None)]);
        let after = registry.stats();
        assert_eq!(
            (after.services, after.instances, after.leases),
            (before.services, before.instances, before.leases)
        );
        assert_eq!(healthy(&registry, 80), Some(true));
        apply(&registry, 8, &[(&key, None)]);
        let WatchItem::Change(event) = next(&mut watch).await else {
            panic!("a change");
        };
        assert_eq!(
            (event.kind, event.revision >> SUB_REVISION_BITS),
            (ChangeKind::Removed, 8),
            "the first change the watcher sees is the removal"
        );
    }

    #[tokio::test]
    async fn an_instance_seen_before_its_alive_key_is_unhealthy_until_it_comes() {
        let registry = Registry::in_memory(&Config::default());
        let (key, value) = record(80, 2);
        apply(&registry, 5, &[(&key, Some(&value))]);
        assert_eq!(healthy(&registry, 80), Some(false));
        apply(&registry, 6, &[(&alive(2), Some(b""))]);
        assert_eq!(healthy(&registry, 80), Some(true));
    }

    #[tokio::test]
    async fn changes_of_one_etcd_revision_are_numbered_under_it_in_key_order() {
        let registry = Registry::in_memory(&Config::default());
        let mut watch = registry.watch(Selector::Service(service()), 0, 0).unwrap();
        assert!(matches!(next(&mut watch).await, WatchItem::Snapshot { .. }));
        // Registered in the order 82, 80, 81 under one lease.
        let records: Vec<_> = [82, 80, 81].map(|port| record(port, 2)).into();
        let alive_key = alive(2);
        let mut changes: Vec<(&str, Option<&[u8]>)> = vec![(&alive_key, Some(b""))];
        for (key, value) in &records {
            changes.push((key, Some(value)));
        }
        apply(&registry, 3, &changes);
        apply(&registry, 4, &[(&alive_key, None)]);
        let mut seen = Vec::new();
        for _ in 0..6 {
            let WatchItem::Change(event) = next(&mut watch).await else {
                panic!("a change");
            };
            seen.push((
                event.revision,
                event.kind,
                event.instance.addr.port,
                event.instance.healthy,
            ));
        }
        let r3 = 3 << SUB_REVISION_BITS;
        let r4 = 4 << SUB_REVISION_BITS;
        assert_eq!(
            seen,
            [
                (r3 + 1, ChangeKind::Put, 82, true),
                (r3 + 2, ChangeKind::Put, 80, true),
                (r3 | LAST_OF_REVISION, ChangeKind::Put, 81, true),
                (r4 + 1, ChangeKind::Put, 80, false),
                (r4 + 2, ChangeKind::Put, 81, false),
                (r4 | LAST_OF_REVISION, ChangeKind::Put, 82, false),
            ]
        );
    }

    #[tokio::test]
    async fn a_node_that_loaded_later_numbers_later_changes_as_one_that_watched_all_along() {
        let watched = Registry::in_memory(&Config::default());
        let loaded = Registry::in_memory(&Config::default());
        let alive_key = alive(2);
        let records: Vec<_> = [82, 80].map(|port| record(port, 2)).into();
        apply(
            &watched,
            3,
            &[
                (&alive_key, Some(b"")),
                (&records[0].0, Some(&records[0].1)),
            ],
        );
        apply(&watched, 4, &[(&records[1].0, Some(&records[1].1))]);
        // The other node starts at etcd revision 4: a range in key order.
        let mut range: Vec<(&[u8], &[u8])> = vec![
            (alive_key.as_bytes(), b""),
            (records[0].0.as_bytes(), &records[0].1),
            (records[1].0.as_bytes(), &records[1].1),
        ];
        range.sort();
        loaded
            .inner
            .state
            .lock()
            .reload_etcd(PREFIX, 4, range.into_iter().map(put));
        let from = watched.stats().revision + 1;
        let mut on_watched = watched
            .watch(Selector::Service(service()), from, 0)
            .unwrap();
        let mut on_loaded = loaded.watch(Selector::Service(service()), from, 0).unwrap();
        for registry in [&watched, &loaded] {
            apply(registry, 5, &[(&alive_key, None)]);
        }
        for _ in 0..2 {
            let (WatchItem::Change(a), WatchItem::Change(b)) =
                (next(&mut on_watched).await, next(&mut on_loaded).await)
            else {
                panic!("changes on both nodes");
            };
            assert_eq!(
                (a.revision, a.instance.addr.port, a.instance.healthy),
                (b.revision, b.instance.addr.port, b.instance.healthy)
            );
        }
    }

    #[tokio::test]
    async fn a_watcher_older_than_a_nodes_start_is_reset_there() {
        let registry = Registry::in_memory(&Config::default());
        let (key, value) = record(80, 2);
        registry.inner.state.lock().reload_etcd(
            PREFIX,
            9,
            [put((key.as_bytes(), value.as_slice()))],
        );
        // A watcher that saw only the first change of revision 9.
        let mut watch = registry
            .watch(
                Selector::Service(service()),
                (9 << SUB_REVISION_BITS) + 2,
                0,
            )
            .unwrap();
        assert!(matches!(
            next(&mut watch).await,
            WatchItem::Snapshot { reset: true, .. }
        ));
        // One that saw all of it misses nothing.
        let mut watch = registry
            .watch(Selector::Service(service()), 10 << SUB_REVISION_BITS, 0)
            .unwrap();
        let (key, value) = record(81, 2);
        apply(&registry, 10, &[(&key, Some(&value))]);
        let WatchItem::Change(event) = next(&mut watch).await else {
            panic!("the change after the node's start, not a reset");
        };
        assert_eq!(event.instance.addr.port, 81);
    }

    #[tokio::test]
    async fn keys_and_values_not_ours_are_skipped() {
        let registry = Registry::in_memory(&Config::default());
        let (key, _) = record(80, 2);
        apply(
            &registry,
            5,
            &[
                ("/p/unknown/thing", Some(b"x")),
                ("/elsewhere/i/a", Some(b"x")),
                (&key, Some(b"not json")),
            ],
        );
        assert_eq!(registry.stats().instances, 0);
        let (key, value) = record(81, 2);
        apply(&registry, 6, &[(&key, Some(&value))]);
        assert_eq!(registry.stats().instances, 1, "the view goes on");
    }
}
