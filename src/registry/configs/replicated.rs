//! The config centre on a cluster node: its items live in etcd, one head
//! key an item (which versions it keeps, and its gray one) and one key
//! each version, so no key grows with an item's history and a version of
//! the largest content fits in one etcd request.
//!
//! A change is one etcd transaction on one item's keys, made only if the
//! head is still at the mod revision this node's view read it at: so a
//! compare-and-set, and every rule checked against the view, holds
//! against the writers of every node; a node whose view was behind reads
//! again and decides again. The change is acknowledged once etcd
//! committed it and this node's view applied it, so a node killed after
//! answering has lost nothing: the change is in etcd.
//!
//! A version's number is the etcd revision that wrote it (its key's
//! create revision), the same on every node; the view puts each item
//! together from its keys as the cluster's feed brings them, and its
//! watchers see each change at etcd's revision, so a watcher may resume
//! on any node.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::model::{ConfigKey, Gray, GrayRule, Item, Version};
use super::{Applied, Configs, Error, Expect, Limits, Mutation, State};
use crate::etcd::{self, Cmp, Compare, EventKind, Op, Txn};
use crate::registry::cluster::keys::{self, Key};
use crate::registry::cluster::{Feed, Node};

/// An item's head, as etcd holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    /// The place the next version takes in the item's own sequence.
    next: u64,
    /// The places of the versions kept, the current one first.
    kept: Vec<u64>,
    /// The gray version's place, and the rule that picks its clients.
    #[serde(default)]
    gray: Option<(u64, GrayRule)>,
}

/// A cluster node's copy of the config keys etcd holds, from which its
/// view's items are put together.
#[derive(Default)]
pub(super) struct Replica {
    /// Each item's head, and the head key's mod revision.
    heads: HashMap<ConfigKey, (Head, i64)>,
    /// Each item's versions, by place.
    versions: HashMap<ConfigKey, BTreeMap<u64, Arc<Version>>>,
}

impl Configs {
    /// [`Configs::change`] on a cluster node: decides the change against
    /// this node's view, writes it to etcd on the condition that the
    /// item's head is as the view read it, and answers once the view has
    /// applied it; when another node changed the item first, decides
    /// again on the view that now holds that change.
    pub(super) async fn change_replicated(
        &self,
        node: &Node,
        key: &ConfigKey,
        expect: Expect,
        make: impl Fn(Option<&Item>) -> Result<Mutation, Error>,
    ) -> Result<(u64, Option<Arc<Version>>), Error> {
        loop {
            let (txn, made) = {
                let state = self.inner.state.lock();
                let mutation = state.decide(key, expect, &self.inner.limits, &make)?;
                state
                    .replica
                    .txn(node, key, mutation, self.inner.limits.history)
            };
            // The view has applied the transaction's revision by now:
            // what it wrote, or what made it fail.
            let result = node.commit(txn).await?;
            if result.succeeded {
                let revision = result.revision.max(0) as u64;
                let made = made.map(|mut version| {
                    version.version = revision;
                    Arc::new(version)
                });
                return Ok((revision, made));
            }
        }
    }

    /// Applies one step of the cluster's feed to this node's items:
    /// etcd's changes of one revision, or its whole state at a revision
    /// (at the node's start, or after a gap in its watch), whose
    /// difference from the view the watchers are sent as changes.
    /// A step with no config key in it (most are: registrations, leases)
    /// costs a look at each key's bytes, and not the centre's lock.
    pub(in crate::registry) fn apply_feed(&self, prefix: &str, feed: &Feed) {
        let limits = &self.inner.limits;
        let ours = |kv: &&etcd::Kv| keys::is_config(prefix, &kv.key);
        match feed {
            Feed::Changes { revision, events } => {
                let changes: Vec<(&etcd::Kv, bool)> = events
                    .iter()
                    .map(|event| (&event.kv, event.kind == EventKind::Put))
                    .filter(|(kv, _)| ours(kv))
                    .collect();
                if changes.is_empty() {
                    return;
                }
                let mut state = self.inner.state.lock();
                let touched = state.replica.take(prefix, changes.into_iter());
                state.settle(touched, (*revision).max(0) as u64, limits);
            }
            Feed::Load { revision, kvs } => {
                let revision = (*revision).max(0) as u64;
                let mut state = self.inner.state.lock();
                let held: Vec<ConfigKey> = state.items.keys().cloned().collect();
                state.replica = Replica::default();
                let changes = kvs.iter().filter(ours).map(|kv| (kv, true));
                let mut touched = state.replica.take(prefix, changes);
                touched.extend(held);
                state.settle(touched, revision, limits);
                // What came before the gap cannot be replayed across it.
                state.history.clear();
                state.revision = state.revision.max(revision);
                state.history_floor = state.revision;
            }
        }
    }
}

impl State {
    /// Brings the items `touched` to what the replica holds, as changes
    /// made at `revision`.
    fn settle(&mut self, touched: BTreeSet<ConfigKey>, revision: u64, limits: &Limits) {
        for key in touched {
            let now = self.replica.item(&key);
            let applied = match (now, self.items.get(&key)) {
                (Some(item), held) if held != Some(&item) => Applied::Replace(item),
                (None, Some(_)) => Applied::Delete,
                _ => continue,
            };
            let event = self.apply(&key, applied, revision, limits);
            self.send(event);
        }
    }
}

impl Replica {
    /// Takes in etcd's changes to config keys (each a key as it now is,
    /// and whether it is there); answers the items they touched. Keys
    /// and values this registry cannot read are logged and skipped.
    fn take<'a>(
        &mut self,
        prefix: &str,
        changes: impl Iterator<Item = (&'a etcd::Kv, bool)>,
    ) -> BTreeSet<ConfigKey> {
        let mut touched = BTreeSet::new();
        for (kv, present) in changes {
            match Key::decode(prefix, &kv.key) {
                Some(Key::Config(key)) => {
                    if !present {
                        self.heads.remove(&key);
                    } else {
                        match serde_json::from_slice::<Head>(&kv.value) {
                            Ok(head) => {
                                self.heads.insert(key.clone(), (head, kv.mod_revision));
                            }
                            Err(err) => {
                                tracing::warn!(config = %key, %err, "an unreadable config head; skipped");
                                continue;
                            }
                        }
                    }
                    touched.insert(key);
                }
                Some(Key::ConfigVersion(key, place)) => {
                    let versions = self.versions.entry(key.clone()).or_default();
                    if !present {
                        versions.remove(&place);
                    } else {
                        match serde_json::from_slice::<Version>(&kv.value) {
                            Ok(mut version) => {
                                version.version = kv.create_revision.max(0).unsigned_abs();
                                versions.insert(place, Arc::new(version));
                            }
                            Err(err) => {
                                tracing::warn!(config = %key, %err, "an unreadable config version; skipped");
                            }
                        }
                    }
                    if versions.is_empty() {
                        self.versions.remove(&key);
                    }
                    touched.insert(key);
                }
                _ => {}
            }
        }
        touched
    }

    /// The item `key` as its keys in etcd make it, if it has a head that
    /// keeps a version etcd holds.
    fn item(&self, key: &ConfigKey) -> Option<Item> {
        let (head, _) = self.heads.get(key)?;
        let versions = self.versions.get(key);
        let version = |place: &u64| versions.and_then(|v| v.get(place)).cloned();
        let kept: Vec<Arc<Version>> = head.kept.iter().filter_map(version).collect();
        if kept.is_empty() {
            tracing::warn!(config = %key, "a config head keeps no version etcd holds; skipped");
            return None;
        }
        let gray = head.gray.as_ref().and_then(|(place, rule)| {
            Some(Arc::new(Gray {
                version: version(place)?,
                rule: rule.clone(),
            }))
        });
        Some(Item {
            key: key.clone(),
            versions: kept,
            gray,
        })
    }

    /// The transaction that makes `mutation` of `key`, keeping `history`
    /// versions, on the condition that its head is as this replica holds
    /// it; and the version it makes, to be numbered by its revision.
    fn txn(
        &self,
        node: &Node,
        key: &ConfigKey,
        mutation: Mutation,
        history: usize,
    ) -> (Txn, Option<Version>) {
        let head_key = node.key(&Key::Config(key.clone()));
        let (mut head, at) = self.heads.get(key).cloned().unwrap_or_default();
        let unchanged = match at {
            0 => Compare::absent(&head_key),
            at => Compare::mod_revision(&head_key, Cmp::Equal, at),
        };
        let txn = Txn::new().when([unchanged]);
        let version_key = |place: u64| node.key(&Key::ConfigVersion(key.clone(), place));
        let mut ops = Vec::new();
        let drop_gray = |head: &mut Head, ops: &mut Vec<Op>| {
            if let Some((place, _)) = head.gray.take() {
                ops.push(Op::delete(version_key(place)));
            }
        };
        let write = |head: &mut Head, version: &Version, ops: &mut Vec<Op>| {
            let place = head.next;
            head.next += 1;
            let value = serde_json::to_vec(version).expect("a config version serialises");
            ops.push(Op::put(version_key(place), value, None));
            place
        };
        let made = match mutation {
            Mutation::Delete => {
                return (
                    txn.and_then([
                        Op::delete(&head_key),
                        Op::delete_prefix(keys::versions_of(&node.prefix, key)),
                    ]),
                    None,
                );
            }
            Mutation::Put(version) => {
                let place = write(&mut head, &version, &mut ops);
                head.kept.insert(0, place);
                Some(version)
            }
            Mutation::Promote(version) => {
                drop_gray(&mut head, &mut ops);
                let place = write(&mut head, &version, &mut ops);
                head.kept.insert(0, place);
                Some(version)
            }
            Mutation::Gray(Some((version, rule))) => {
                drop_gray(&mut head, &mut ops);
                let place = write(&mut head, &version, &mut ops);
                head.gray = Some((place, rule));
                Some(version)
            }
            Mutation::Gray(None) => {
                drop_gray(&mut head, &mut ops);
                None
            }
        };
        let dropped = head.kept.split_off(history.min(head.kept.len()));
        ops.extend(
            dropped
                .into_iter()
                .map(|place| Op::delete(version_key(place))),
        );
        let value = serde_json::to_vec(&head).expect("a config head serialises");
        ops.push(Op::put(&head_key, value, None));
        (txn.and_then(ops), made)
    }
}
