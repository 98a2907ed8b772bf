//! The service catalog: services and their instances, registered,
//! replaced and removed under the registry's limits, and the queries over
//! them.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use smallvec::SmallVec;

use super::lease::Lease;
use super::{Inner, Registry, State};
use crate::registry::model::{
    ChangeKind, GroupKey, Instance, InstanceAddr, InstanceSpec, LeaseId, Registered, ServiceKey,
    ServicePage, ServiceSettings, ServiceSummary, ServiceView, Timings, is_link_local,
};
use crate::registry::{Config, Error, persist};

/// A registration as applied: what to answer, the instance now stored, and
/// the one it replaced (to undo it if storing fails).
pub(super) struct Applied {
    registered: Registered,
    instance: Arc<Instance>,
    previous: Option<Arc<Instance>>,
}

pub(super) struct Service {
    pub(super) key: Arc<ServiceKey>,
    pub(super) settings: ServiceSettings,
    /// Settings were set explicitly: the service outlives its instances
    /// and is persisted.
    pub(super) explicit: bool,
    pub(super) instances: HashSet<Slot>,
    pub(super) healthy: usize,
}

/// An instance in its service's set, found by its address: the set holds
/// one pointer per instance, not a copy of the key.
#[derive(Debug, Clone)]
pub(super) struct Slot(Arc<Instance>);

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
    pub(super) fn get(&self, addr: &InstanceAddr) -> Option<&Arc<Instance>> {
        self.instances.get(addr).map(|slot| &slot.0)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.instances.iter().map(|slot| &slot.0)
    }
}

/// A namespace, and each of its groups with the services it holds.
pub type Namespace = (Arc<str>, Vec<(Arc<str>, usize)>);

impl Registry {
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
        if let Some(node) = self.node() {
            return self.register_replicated(node, spec, lease, timings).await;
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
        if let Some(node) = self.node() {
            return self.deregister_replicated(node, key, addr).await;
        }
        let (removed, revision) = {
            let mut state = self.inner.state.lock();
            let removed = state
                .remove(key, addr)
                .ok_or_else(|| unknown_instance(key, addr))?;
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

    /// Changes an instance's weight or enabled flag in place, keeping its
    /// lease; answers the revision of the change.
    pub async fn update_instance(
        &self,
        key: &ServiceKey,
        addr: &InstanceAddr,
        change: crate::registry::model::InstanceChange,
    ) -> Result<u64, Error> {
        if let Some(node) = self.node() {
            return self
                .update_instance_replicated(node, key, addr, change)
                .await;
        }
        let (changed, previous, revision) = {
            let mut state = self.inner.state.lock();
            let previous = state
                .services
                .get(key)
                .and_then(|service| service.get(addr))
                .cloned()
                .ok_or_else(|| unknown_instance(key, addr))?;
            let changed = Arc::new(change.apply(&previous));
            state.put(changed.clone());
            (changed, previous, state.revision)
        };
        if !changed.ephemeral {
            let stored = persist::Subject::Instance(&changed.service, &changed.addr);
            if let Err(err) = self.persist(stored).await {
                // Undo, so memory never claims what the disk does not hold.
                self.inner.state.lock().put(previous);
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
        if let Some(node) = self.node() {
            return self.update_service_replicated(node, key, settings).await;
        }
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
        if let Some(node) = self.node() {
            return self.delete_service_replicated(node, key).await;
        }
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

    /// The services of a group whose names contain `search` (ignoring
    /// case; empty: all), sorted by name, one page of them.
    pub fn list_services(
        &self,
        group: &GroupKey,
        search: &str,
        page: usize,
        page_size: usize,
    ) -> ServicePage {
        let search = search.to_lowercase();
        let state = self.inner.state.lock();
        let in_group = state.group_range(group);
        let mut services = Vec::new();
        let mut total = 0;
        let matching = in_group
            .filter(|(key, _)| search.is_empty() || key.name.to_lowercase().contains(&search));
        for (key, service) in matching {
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

    /// Every namespace, its groups and how many services each holds,
    /// sorted by name.
    pub fn namespaces(&self) -> Vec<Namespace> {
        let state = self.inner.state.lock();
        let mut namespaces: Vec<Namespace> = Vec::new();
        for key in state.services.keys() {
            if namespaces.last().is_none_or(|(ns, _)| *ns != key.namespace) {
                namespaces.push((key.namespace.clone(), Vec::new()));
            }
            let groups = &mut namespaces.last_mut().expect("pushed").1;
            match groups.last_mut() {
                Some((group, count)) if *group == key.group => *count += 1,
                _ => groups.push((key.group.clone(), 1)),
            }
        }
        namespaces
    }

    /// The last `limit` changes `selector` sees, oldest first (as far back
    /// as the history goes), and the current revision.
    pub fn recent_changes(
        &self,
        selector: &crate::registry::Selector,
        limit: usize,
    ) -> (Vec<crate::registry::model::Event>, u64) {
        let state = self.inner.state.lock();
        (state.recent(selector, limit), state.revision)
    }

    /// The instance at `addr` in `service`, as stored (its lease with it).
    pub fn instance(&self, service: &ServiceKey, addr: &InstanceAddr) -> Option<Arc<Instance>> {
        let state = self.inner.state.lock();
        state.services.get(service)?.get(addr).cloned()
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
            metadata: service.settings.metadata.clone(),
        })
    }
}

impl State {
    pub(in crate::registry) fn ensure_service(&mut self, key: &ServiceKey) -> &mut Service {
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

    pub(in crate::registry) fn check_service_room(
        &self,
        config: &Config,
        key: &ServiceKey,
    ) -> Result<(), Error> {
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

    /// Whether `spec` may be registered: answers the instance it would
    /// replace, or why not (an instance of the other kind at its address,
    /// a full service, a full namespace).
    pub(in crate::registry) fn admit(
        &self,
        config: &Config,
        spec: &InstanceSpec,
    ) -> Result<Option<Arc<Instance>>, Error> {
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
        Ok(existing)
    }

    pub(in crate::registry) fn register(
        &mut self,
        inner: &Inner,
        spec: InstanceSpec,
        lease_id: LeaseId,
        timings: Timings,
    ) -> Result<Applied, Error> {
        let existing = self.admit(&inner.config, &spec)?;
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
                        alive_on: None,
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
        let instance = Arc::new(Instance::registered(
            spec,
            service_key.clone(),
            timings,
            lease_id,
            existing.as_deref(),
        ));
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

    /// Stores an instance (new or changed) and publishes the change. The
    /// caller keeps its lease's member current.
    pub(in crate::registry) fn put(&mut self, instance: Arc<Instance>) {
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
    pub(in crate::registry) fn remove(
        &mut self,
        key: &ServiceKey,
        addr: &InstanceAddr,
    ) -> Option<Arc<Instance>> {
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
    pub(in crate::registry) fn drop_service(
        &mut self,
        key: &ServiceKey,
    ) -> Option<ServiceSettings> {
        let service = self.services.remove(key)?;
        if let Some(count) = self.services_per_namespace.get_mut(&key.namespace) {
            *count -= 1;
            if *count == 0 {
                self.services_per_namespace.remove(&key.namespace);
            }
        }
        service.explicit.then_some(service.settings)
    }

    pub(in crate::registry) fn group_range<'a>(
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
}

/// The refusal of a call naming an instance that is not registered.
pub(super) fn unknown_instance(key: &ServiceKey, addr: &InstanceAddr) -> Error {
    Error::NotFound(format!(
        "no instance {}:{} in cluster {} of service {key}",
        addr.ip, addr.port, addr.cluster
    ))
}

pub(super) fn unknown_service(key: &ServiceKey) -> Error {
    Error::NotFound(format!("service {key} is not registered"))
}
