//! The registry's writes when its state lives in etcd: the same rules as
//! in memory, checked against this node's view, then written to etcd and
//! answered once the view has applied them (see [`crate::registry::cluster`]).
//!
//! The view may lag another node's write by the time etcd takes to tell
//! this node, so the limits (instances a service, services a namespace)
//! are checked against what this node has seen: two nodes admitting at
//! once may pass a limit by the writes in flight, never by more.

use std::sync::Arc;
use std::time::Duration;

use super::{Inner, KeepAlive, Registry};
use crate::etcd::{self, LeaseId as EtcdLease, Op, Txn};
use crate::registry::Error;
use crate::registry::cluster::keys::{Key, etcd_leases, new_lease_id};
use crate::registry::cluster::{Node, unavailable};
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
        // A lease granted here has both its etcd leases; one kept or
        // asked for may have lost its alive lease to the unhealthy timeout.
        let mut fresh = false;
        let lease = if !spec.ephemeral {
            0
        } else {
            // Registering a known instance without a lease id keeps its
            // lease, as in memory: registering twice is one registration.
            let kept = existing.as_ref().map(|e| e.lease).filter(|l| *l != 0);
            match (asked_lease, kept) {
                (0, Some(kept)) if node.lease_alive(kept).await? => kept,
                (0, _) => {
                    let lease = new_lease_id();
                    node.grant(lease, &timings).await?;
                    fresh = true;
                    lease
                }
                (asked, _) => {
                    if !node.lease_alive(asked).await? {
                        return Err(Error::NotFound(format!(
                            "lease {asked} is unknown or expired; register without a lease id for a new one"
                        )));
                    }
                    asked
                }
            }
        };
        let (service, addr, ephemeral) = (spec.service.clone(), spec.addr.clone(), spec.ephemeral);
        let record = Instance::registered(
            spec,
            Arc::new(service.clone()),
            timings,
            lease,
            existing.as_deref(),
        );
        // Weights are checked finite, so the record always serialises.
        let value = serde_json::to_vec(&record).expect("an instance record serialises");
        let instance_key = node.key(&Key::Instance(service, addr));
        let mut ops = Vec::with_capacity(2);
        if let Some((instances, alive)) = etcd_leases(lease) {
            // A registration is a sign of life: the alive key comes back
            // with it.
            ops.push(Op::put(
                node.key(&Key::Alive(lease)),
                b"",
                Some(EtcdLease(alive)),
            ));
            ops.push(Op::put(&instance_key, &value, Some(EtcdLease(instances))));
        } else {
            ops.push(Op::put(&instance_key, &value, None));
        }
        let committed = match node.put_batched(ops.clone()).await {
            // The alive lease expired: grant it anew and write again (the
            // instances' lease was alive a moment ago; if it is gone too,
            // the second write says so).
            Err(Error::NotFound(_)) if ephemeral && !fresh => {
                node.revive(lease, &timings).await?;
                node.put_batched(ops).await?
            }
            committed => committed?,
        };
        Ok(Registered {
            instance_id: record.id(),
            lease,
            revision: super::view::revision_of(committed),
            heartbeat_interval: timings.heartbeat_interval(),
        })
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
            return Err(Error::NotFound(format!(
                "no instance {}:{} in cluster {} of service {key}",
                addr.ip, addr.port, addr.cluster
            )));
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
    /// [`KeepAlive::beat`] on a cluster node: renews both etcd leases of
    /// `lease` and brings its alive key back if it was gone (the
    /// session that held it broke, or it expired).
    pub(super) async fn beat_replicated(
        &mut self,
        node: &Arc<Node>,
        lease: LeaseId,
    ) -> Result<Duration, Error> {
        let gone = || {
            Error::NotFound(format!(
                "lease {lease} is unknown or expired; register again"
            ))
        };
        let (instances, alive) = etcd_leases(lease).ok_or_else(gone)?;
        let (renew_instances, renew_alive) = self.renewals.entry(lease).or_insert_with(|| {
            (
                node.etcd.lease_keepalive(EtcdLease(instances)),
                node.etcd.lease_keepalive(EtcdLease(alive)),
            )
        });
        match renew_instances.beat().await {
            Ok(Some(_)) => {}
            Ok(None) => {
                self.renewals.remove(&lease);
                return Err(gone());
            }
            Err(err) => return Err(unavailable(err)),
        }
        let inner = &self.registry.inner;
        let alive_expired = match renew_alive.beat().await {
            Ok(ttl) => ttl.is_none(),
            Err(err) => return Err(unavailable(err)),
        };
        if alive_expired {
            node.revive(lease, &inner.timings_of(lease)).await?;
        }
        let orphaned = inner
            .state
            .lock()
            .leases
            .get(&lease)
            .is_none_or(|l| l.orphaned);
        if orphaned {
            let put = Op::put(node.key(&Key::Alive(lease)), b"", Some(EtcdLease(alive)));
            node.commit(Txn::new().and_then([put])).await?;
        }
        if !self.leases.contains(&lease) {
            node.attach(lease);
            self.leases.push(lease);
        }
        Ok(inner.interval_of(lease))
    }
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

impl Node {
    /// Grants the two etcd leases of a new registry lease.
    pub(in crate::registry) async fn grant(
        &self,
        lease: LeaseId,
        timings: &Timings,
    ) -> Result<(), Error> {
        let (instances, alive) = etcd_leases(lease).expect("a lease id of this store");
        tokio::try_join!(
            self.grant_one(EtcdLease(instances), timings.delete_timeout_ms),
            self.grant_one(EtcdLease(alive), timings.unhealthy_timeout_ms),
        )?;
        Ok(())
    }

    /// Makes sure the alive lease of `lease` exists, granting it anew if
    /// it expired (its id is free again then).
    pub(in crate::registry) async fn revive(
        &self,
        lease: LeaseId,
        timings: &Timings,
    ) -> Result<(), Error> {
        let (_, alive) = etcd_leases(lease).expect("a lease id of this store");
        match self.etcd.lease_ttl(EtcdLease(alive)).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => {
                self.grant_one(EtcdLease(alive), timings.unhealthy_timeout_ms)
                    .await
            }
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn grant_one(&self, id: EtcdLease, ttl_ms: u32) -> Result<(), Error> {
        let ttl = Duration::from_millis(ttl_ms.into());
        match self.etcd.lease_grant_id(id, ttl).await {
            Ok(_) => Ok(()),
            // A grant retried after its answer was lost finds its own lease.
            Err(err) if err.message.contains("lease already exists") => Ok(()),
            Err(err) => Err(unavailable(err)),
        }
    }

    /// Whether the registry lease `lease` is still alive in etcd (its
    /// instances' lease has time left).
    pub(in crate::registry) async fn lease_alive(&self, lease: LeaseId) -> Result<bool, Error> {
        let Some((instances, _)) = etcd_leases(lease) else {
            return Ok(false);
        };
        match self.etcd.lease_ttl(EtcdLease(instances)).await {
            Ok(ttl) => Ok(ttl.is_some()),
            Err(err) => Err(unavailable(err)),
        }
    }
}
