//! The registry's writes when its state lives in etcd: the same rules as
//! in memory, checked against this node's view, then written to etcd and
//! answered once the view has applied them (see [`crate::registry::cluster`]).
//!
//! The view may lag another node's write by the time etcd takes to tell
//! this node, so the limits (instances a service, services a namespace)
//! are checked against what this node has seen: two nodes admitting at
//! once may pass a limit by the writes in flight, never by more.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{Inner, KeepAlive, Registry};
use crate::etcd::{self, Cmp, Compare, MAX_TXN_OPS, Op, Txn};
use crate::registry::Error;
use crate::registry::cluster::Node;
use crate::registry::cluster::holds::{Due, Silent};
use crate::registry::cluster::keys::Key;
use crate::registry::model::{
    Instance, InstanceAddr, InstanceSpec, LeaseId, Registered, ServiceKey, ServiceSettings, Timings,
};

impl Registry {
    /// [`Registry::register`] on a cluster node.
    pub(super) async fn register_replicated(
        &self,
        node: &Node,
        spec: InstanceSpec,
        asked_lease: LeaseId,
        timings: Timings,
    ) -> Result<Registered, Error> {
        let existing = self.inner.state.lock().admit(&self.inner.config, &spec)?;
        let lease = if !spec.ephemeral {
            0
        } else {
            // Registering a known instance without a lease id keeps its
            // lease, as in memory: registering twice is one registration.
            let kept = existing.as_ref().map(|e| e.lease).filter(|l| *l != 0);
            match (asked_lease, kept) {
                (0, Some(kept)) => match self.hold(node, kept).await {
                    Ok(_) => kept,
                    Err(Error::NotFound(_)) => self.inner.state.lock().new_lease_id(),
                    Err(err) => return Err(err),
                },
                (0, None) => self.inner.state.lock().new_lease_id(),
                (asked, _) => match self.hold(node, asked).await {
                    Ok(_) => asked,
                    Err(Error::NotFound(_)) => {
                        return Err(Error::NotFound(format!(
                            "lease {asked} is unknown or expired; register without a lease id for a new one"
                        )));
                    }
                    Err(err) => return Err(err),
                },
            }
        };
        let (service, addr) = (spec.service.clone(), spec.addr.clone());
        let record = Instance::registered(
            spec,
            Arc::new(service.clone()),
            timings,
            lease,
            existing.as_deref(),
        );
        let instance_key = node.key(&Key::Instance(service, addr));
        let ops = if lease == 0 {
            vec![Op::put(&instance_key, record_value(&record), None)]
        } else {
            // A registration is a sign of life: the alive key comes back
            // with it, and this node holds the lease from now on.
            let held = node.heard(lease, &timings);
            vec![
                Op::put(node.key(&Key::Alive(lease)), b"", Some(held.alive)),
                Op::put(&instance_key, record_value(&record), Some(held.instances)),
            ]
        };
        let committed = node.put_batched(ops).await?;
        Ok(Registered {
            instance_id: record.id(),
            lease,
            revision: super::view::revision_of(committed),
            heartbeat_interval: timings.heartbeat_interval(),
        })
    }

    /// Makes this node the holder of `lease`, healthy: unless it is
    /// already, puts the lease's alive key and instances again under this
    /// node's etcd leases (the node that held them may be dead, or the
    /// client moved). Each instance is put again as etcd has it, on
    /// condition that it has not changed since it was read, so a
    /// deregistration or a registration made meanwhile through another
    /// node is never undone; one registered meanwhile is taken too.
    /// Answers the lease's timings; NotFound when it has neither instances
    /// nor an alive key left.
    pub(super) async fn hold(&self, node: &Node, lease: LeaseId) -> Result<Timings, Error> {
        let inner = &self.inner;
        let alive_key = node.key(&Key::Alive(lease));
        // The view may not have seen the lease yet (registered through
        // another node a moment ago): asked of etcd once before giving up.
        let mut asked_etcd = false;
        let mut alive_taken = false;
        // Instance keys put under this node's lease (or found gone) here.
        let mut taken: HashSet<String> = HashSet::new();
        for _ in 0..HOLD_ROUNDS {
            let (members, alive_on) = {
                let state = inner.state.lock();
                match state.leases.get(&lease) {
                    None => (Vec::new(), None),
                    Some(held) => (held.members.to_vec(), held.alive_on),
                }
            };
            if !alive_taken && node.holds_healthy(lease, alive_on) {
                return Ok(inner.timings_of(lease));
            }
            let pending: Vec<String> = members
                .iter()
                .map(|m| instance_key(node, m))
                .filter(|key| !taken.contains(key))
                .collect();
            if alive_taken && pending.is_empty() {
                return Ok(inner.timings_of(lease));
            }
            if !alive_taken && members.is_empty() && alive_on.is_none() {
                if asked_etcd {
                    break;
                }
                asked_etcd = true;
                match node.etcd.get(&alive_key).await {
                    Ok(Some(kv)) => node.caught_up(kv.mod_revision).await,
                    Ok(None) => break,
                    Err(err) => return Err(node.failed(err)),
                }
                continue;
            }
            // Heard first, so a silence decided before no longer stands;
            // the alive key first, so no instance is taken for expired
            // while its lease is taken over.
            let mine = node.heard(lease, &inner.timings_of(lease));
            if !alive_taken {
                let put = Op::put(&alive_key, b"", Some(mine.alive));
                node.commit(Txn::new().and_then([put])).await?;
                alive_taken = true;
            }
            for chunk in pending.chunks(MAX_TXN_OPS / 2) {
                let read = Txn::new().and_then(chunk.iter().map(Op::get));
                let read = node.etcd.txn(read).await.map_err(|err| node.failed(err))?;
                let mut compares = Vec::new();
                let mut puts = Vec::new();
                for (key, result) in chunk.iter().zip(&read.results) {
                    let kv = match result {
                        etcd::OpResult::Get(kvs) => kvs.first(),
                        _ => None,
                    };
                    let ours = kv.is_some_and(|kv| {
                        serde_json::from_slice::<Instance>(&kv.value)
                            .is_ok_and(|record| record.ephemeral && record.lease == lease)
                    });
                    match kv {
                        Some(kv) if ours => {
                            compares.push(Compare::mod_revision(key, Cmp::Equal, kv.mod_revision));
                            puts.push(Op::put(key, &kv.value, Some(mine.instances)));
                        }
                        // Gone, or another lease's (or persistent) now.
                        _ => {
                            taken.insert(key.clone());
                        }
                    }
                }
                if puts.is_empty() {
                    continue;
                }
                let committed = node
                    .commit(Txn::new().when(compares).and_then(puts))
                    .await?;
                if committed.succeeded {
                    taken.extend(chunk.iter().cloned());
                }
                // Otherwise one changed after it was read: read again.
            }
        }
        if alive_taken {
            return Err(Error::Unavailable(format!(
                "the instances of lease {lease} kept changing while this registry node took the lease over; try again"
            )));
        }
        Err(Error::NotFound(format!(
            "lease {lease} is unknown or expired; register again"
        )))
    }

    /// [`Registry::update_instance`] on a cluster node: the instance's
    /// record as etcd has it, changed and put back on the etcd lease it
    /// hangs on, fenced on its not having changed meanwhile.
    pub(super) async fn update_instance_replicated(
        &self,
        node: &Node,
        key: &ServiceKey,
        addr: &InstanceAddr,
        change: crate::registry::model::InstanceChange,
    ) -> Result<u64, Error> {
        let instance_key = node.key(&Key::Instance(key.clone(), addr.clone()));
        for _ in 0..HOLD_ROUNDS {
            let kv = node
                .etcd
                .get(&instance_key)
                .await
                .map_err(|err| node.failed(err))?
                .ok_or_else(|| super::catalog::unknown_instance(key, addr))?;
            let record: Instance = serde_json::from_slice(&kv.value).map_err(|err| {
                tracing::error!(key = %instance_key, %err, "an instance record in etcd does not read");
                Error::Unavailable(format!(
                    "the record of instance {}:{} in etcd does not read; see the registry's log",
                    addr.ip, addr.port
                ))
            })?;
            // Read from etcd, so it serialises back.
            let value = serde_json::to_vec(&change.apply(&record)).expect("an instance serialises");
            let committed = node
                .commit(
                    Txn::new()
                        .when([Compare::mod_revision(
                            &instance_key,
                            Cmp::Equal,
                            kv.mod_revision,
                        )])
                        .and_then([Op::put(&instance_key, value, kv.lease)]),
                )
                .await?;
            if committed.succeeded {
                return Ok(super::view::revision_of(committed.revision));
            }
        }
        Err(Error::Aborted(format!(
            "instance {}:{} kept changing while it was updated; try again",
            addr.ip, addr.port
        )))
    }

    /// [`Registry::deregister`] on a cluster node.
    pub(super) async fn deregister_replicated(
        &self,
        node: &Node,
        key: &ServiceKey,
        addr: &InstanceAddr,
    ) -> Result<u64, Error> {
        let instance_key = node.key(&Key::Instance(key.clone(), addr.clone()));
        let committed = node
            .commit(Txn::new().and_then([Op::delete(&instance_key)]))
            .await?;
        let deleted =
            matches!(committed.results.first(), Some(etcd::OpResult::Delete(n)) if *n > 0);
        if !deleted {
            return Err(super::catalog::unknown_instance(key, addr));
        }
        Ok(super::view::revision_of(committed.revision))
    }

    /// [`Registry::update_service`] on a cluster node.
    pub(super) async fn update_service_replicated(
        &self,
        node: &Node,
        key: &ServiceKey,
        settings: ServiceSettings,
    ) -> Result<(), Error> {
        if !self.inner.state.lock().services.contains_key(key) {
            return Err(super::catalog::unknown_service(key));
        }
        // The threshold is checked finite, so settings always serialise.
        let value = serde_json::to_vec(&settings).expect("service settings serialise");
        let settings_key = node.key(&Key::Settings(key.clone()));
        node.commit(Txn::new().and_then([Op::put(settings_key, value, None)]))
            .await?;
        Ok(())
    }

    /// [`Registry::delete_service`] on a cluster node: refused while the
    /// service has instances, checked in etcd itself, in the same
    /// transaction as the delete.
    pub(super) async fn delete_service_replicated(
        &self,
        node: &Node,
        key: &ServiceKey,
    ) -> Result<(), Error> {
        let count = match self.inner.state.lock().services.get(key) {
            None => return Err(super::catalog::unknown_service(key)),
            Some(service) => service.instances.len(),
        };
        if count > 0 {
            return Err(Error::FailedPrecondition(format!(
                "service {key} still has {count} instance(s); deregister them first"
            )));
        }
        let settings_key = node.key(&Key::Settings(key.clone()));
        let instances = crate::registry::cluster::keys::instances_of(&node.prefix, key);
        let committed = node
            .commit(
                Txn::new()
                    .when([etcd::Compare::none_under(&instances)])
                    .and_then([Op::delete(settings_key)]),
            )
            .await?;
        if !committed.succeeded {
            return Err(Error::FailedPrecondition(format!(
                "service {key} still has instances registered through another registry node; deregister them first"
            )));
        }
        Ok(())
    }
}

impl KeepAlive {
    /// [`KeepAlive::beat`] on a cluster node: a beat of a lease this node
    /// holds healthy is only noted here; any other makes this node its
    /// holder first ([`Registry::hold`]).
    pub(super) async fn beat_replicated(
        &mut self,
        node: &Arc<Node>,
        lease: LeaseId,
    ) -> Result<Duration, Error> {
        let timings = self.registry.hold(node, lease).await?;
        let _ = node.heard(lease, &timings);
        if !self.leases.contains(&lease) {
            node.attach(lease);
            self.leases.push(lease);
        }
        Ok(self.registry.inner.interval_of(lease))
    }
}

/// Carries out what the silences of the clients this node holds call for,
/// until `closed`: an alive key taken at the unhealthy timeout, the
/// instances at the delete timeout, each only while it still hangs on
/// this node's lease.
pub(super) async fn time_silences(
    inner: std::sync::Weak<Inner>,
    node: Arc<Node>,
    closed: tokio_util::sync::CancellationToken,
) {
    super::lease::on_deadlines(&node.timer, &closed, || {
        let (due, next) = node.due();
        if !due.is_empty() {
            let inner = inner.upgrade()?;
            // In the background, so a slow etcd holds up no deadline, and a
            // few at a time, so a thousand clients gone at once do not
            // become a thousand writes in flight.
            let node = node.clone();
            tokio::spawn(async move {
                futures::stream::iter(due)
                    .for_each_concurrent(SILENCES_IN_FLIGHT, |silent| {
                        let (inner, node) = (&inner, &node);
                        async move {
                            if let Err(err) = silence(inner, node, silent).await {
                                tracing::warn!(%err, "cannot time a silent client out in etcd; trying again");
                                node.retry(silent);
                            }
                        }
                    })
                    .await;
            });
        }
        Some(next)
    })
    .await;
}

/// Rounds of reading and taking over a lease's instances before a lease
/// whose instances keep changing is given up on (the caller retries).
const HOLD_ROUNDS: usize = 8;

/// Writes of silences in flight at once.
const SILENCES_IN_FLIGHT: usize = 16;

/// The writes one silence calls for.
async fn silence(inner: &Inner, node: &Node, silent: Silent) -> Result<(), etcd::Error> {
    node.take_alive(silent).await?;
    if let Due::Expired(lease) = silent.due {
        let keys: Vec<String> = inner
            .state
            .lock()
            .leases
            .get(&lease)
            .map(|held| held.members.iter().map(|m| instance_key(node, m)).collect())
            .unwrap_or_default();
        node.take_instances(silent, &keys).await?;
    }
    Ok(())
}

/// Where `instance` lives in etcd.
fn instance_key(node: &Node, instance: &Instance) -> String {
    node.key(&Key::Instance(
        (*instance.service).clone(),
        instance.addr.clone(),
    ))
}

/// An instance record as etcd stores it. Weights are checked finite, so
/// a record always serialises.
fn record_value(record: &Instance) -> Vec<u8> {
    serde_json::to_vec(record).expect("an instance record serialises")
}

impl Inner {
    /// The timings of the instances of `lease` (its first's), or the
    /// registry's defaults: what its etcd leases are granted with.
    pub(super) fn timings_of(&self, lease: LeaseId) -> Timings {
        let state = self.state.lock();
        let members = state.leases.get(&lease).map(|l| &l.members);
        members
            .and_then(|m| m.first())
            .map(|m| m.timings)
            .unwrap_or(Timings {
                heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u32,
                unhealthy_timeout_ms: self.config.unhealthy_timeout.as_millis() as u32,
                delete_timeout_ms: self.config.delete_timeout.as_millis() as u32,
            })
    }

    /// The heartbeat interval the instances of `lease` asked for (the
    /// shortest), or the registry's default.
    pub(super) fn interval_of(&self, lease: LeaseId) -> Duration {
        self.state
            .lock()
            .leases
            .get(&lease)
            .and_then(|l| {
                l.members
                    .iter()
                    .map(|m| m.timings.heartbeat_interval())
                    .min()
            })
            .unwrap_or(self.config.heartbeat_interval)
    }
}
