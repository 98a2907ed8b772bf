//! The registry's side of watching: every change bumps the revision,
//! lands in the history and is offered to the watchers of its service and
//! its group; snapshots are read from here a chunk at a time.

use std::collections::HashMap;
use std::sync::Arc;

use super::catalog::Service;
use super::{Registry, State};
use crate::registry::model::{ChangeKind, Event, Instance, ServiceKey};
use crate::registry::watch::{
    Inbox, Position, Selector, Start, Subscription, WatchStream, Watcher,
};
use crate::registry::{Config, Error};

impl Registry {
    /// Watches a service or a group from `start_revision` (0: a snapshot
    /// first). `incarnation` is the one the revision came from (0: this one).
    pub fn watch(
        &self,
        selector: Selector,
        start_revision: u64,
        incarnation: u64,
    ) -> Result<WatchStream, Error> {
        self.watch_by(selector, start_revision, incarnation, Watcher::default())
    }

    /// [`Registry::watch`], for `who`, as [`Registry::watchers`] lists it.
    pub fn watch_by(
        &self,
        selector: Selector,
        start_revision: u64,
        incarnation: u64,
        who: Watcher,
    ) -> Result<WatchStream, Error> {
        let who = Arc::new(who);
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
        let subscription = state.subscribe(&self.inner.config, &selector, who.clone());
        let revision = state.revision;
        drop(state);
        Ok(WatchStream::new(
            self.clone(),
            (selector, who),
            subscription,
            revision,
            start,
            permit,
        ))
    }

    /// A new subscription for a watcher that fell behind, and the revision
    /// it starts after.
    pub(in crate::registry) fn resubscribe(
        &self,
        selector: &Selector,
        who: &Arc<Watcher>,
    ) -> ((u64, Inbox), u64) {
        let mut state = self.inner.state.lock();
        let subscription = state.subscribe(&self.inner.config, selector, who.clone());
        (subscription, state.revision)
    }

    /// Up to `max` instances of the selector's, in snapshot order, after
    /// `after`; whether more follow; and the revision they were read at.
    pub(in crate::registry) fn snapshot_chunk(
        &self,
        selector: &Selector,
        after: Option<&Position>,
        max: usize,
    ) -> (Vec<Arc<Instance>>, bool, u64) {
        let state = self.inner.state.lock();
        let (chunk, more) = state.snapshot_chunk(selector, after, max);
        (chunk, more, state.revision)
    }

    /// Who watches `service`: its own watchers, then those of its group,
    /// each with what is queued for it.
    pub fn watchers(&self, service: &ServiceKey) -> Vec<WatcherView> {
        let state = self.inner.state.lock();
        let own = state.by_service.get(service).into_iter().flatten();
        let group = state
            .by_group
            .get(&service.group_key())
            .into_iter()
            .flatten();
        own.map(|s| (s, false))
            .chain(group.map(|s| (s, true)))
            .map(|(s, whole_group)| WatcherView {
                id: s.id,
                who: s.who.clone(),
                whole_group,
                queued_bytes: s.queued_bytes(),
            })
            .collect()
    }

    pub(in crate::registry) fn unsubscribe(&self, selector: &Selector, id: u64) {
        let mut state = self.inner.state.lock();
        match selector {
            Selector::Service(key) => remove_subscription(&mut state.by_service, key, id),
            Selector::Group(group) => remove_subscription(&mut state.by_group, group, id),
        }
    }
}

/// One watcher of a service, as [`Registry::watchers`] answers it.
#[derive(Debug, Clone)]
pub struct WatcherView {
    /// The subscription's number, unique in this run.
    pub id: u64,
    /// Who watches.
    pub who: Arc<Watcher>,
    /// It watches the service's whole group, not the service alone.
    pub whole_group: bool,
    /// Changes queued for it and not yet read, in bytes.
    pub queued_bytes: usize,
}

impl State {
    /// Gives a change the next revision and offers it to its watchers; a
    /// cluster node holds its changes back until it has applied all of an
    /// etcd revision (see [`super::view`]).
    pub(in crate::registry) fn publish(&mut self, kind: ChangeKind, instance: Arc<Instance>) {
        if let Some(held) = &mut self.held_back {
            held.push((kind, instance));
            return;
        }
        self.revision += 1;
        self.emit(Event {
            revision: self.revision,
            kind,
            instance,
        });
    }

    /// Offers a numbered change to its watchers and keeps it for replays.
    pub(in crate::registry) fn emit(&mut self, event: Event) {
        let size = event.instance.footprint();
        if let Some(subs) = self.by_service.get_mut(&*event.instance.service) {
            subs.retain(|sub| sub.offer(&event, size));
        }
        if !self.by_group.is_empty()
            && let Some(subs) = self.by_group.get_mut(&event.instance.service.group_key())
        {
            subs.retain(|sub| sub.offer(&event, size));
        }
        if self.history_limit == 0 {
            self.history_floor = event.revision;
            return;
        }
        if self.history.len() == self.history_limit
            && let Some(dropped) = self.history.pop_front()
        {
            self.history_floor = dropped.revision;
        }
        self.history.push_back(event);
    }

    pub(in crate::registry) fn snapshot_chunk(
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

    /// The last `limit` changes the selector sees that the history still
    /// holds, oldest first.
    pub(in crate::registry) fn recent(&self, selector: &Selector, limit: usize) -> Vec<Event> {
        let mut recent: Vec<Event> = self
            .history
            .iter()
            .rev()
            .filter(|e| selector.matches(&e.instance.service))
            .take(limit)
            .cloned()
            .collect();
        recent.reverse();
        recent
    }

    /// The events after `from - 1` that the selector sees, or `None` when
    /// the history no longer reaches back that far (or `from` is ahead).
    pub(in crate::registry) fn replay(&self, selector: &Selector, from: u64) -> Option<Vec<Event>> {
        if from <= self.history_floor || from > self.revision + 1 {
            return None;
        }
        let skip = self.history.partition_point(|e| e.revision < from);
        Some(
            self.history
                .iter()
                .skip(skip)
                .filter(|e| selector.matches(&e.instance.service))
                .cloned()
                .collect(),
        )
    }

    pub(in crate::registry) fn subscribe(
        &mut self,
        config: &Config,
        selector: &Selector,
        who: Arc<Watcher>,
    ) -> (u64, Inbox) {
        let id = self.next_watcher;
        self.next_watcher += 1;
        let (subscription, inbox) = Subscription::new(id, config.limits.watch_queue_bytes, who);
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
