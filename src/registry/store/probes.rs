//! Supervision of the health probes of persistent instances: one probe
//! task per instance, and where their verdicts land.
//!
//! In memory, the registry probes every persistent instance it holds and
//! a verdict changes memory. On a cluster node, only the elected node
//! probes (see [`crate::registry::cluster::election`]): it follows its
//! view, starting a probe for each persistent instance that appears and
//! stopping the probe of one that goes, and stops them all when it no
//! longer leads. A verdict that changes an instance's health is written to
//! etcd, and every node's view, its own included, learns it from there.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Inner, Registry};
use crate::etcd::{Cmp, Compare, Op, Txn};
use crate::registry::cluster::Node;
use crate::registry::cluster::keys::{self, Key};
use crate::registry::model::{Instance, InstanceAddr, ServiceKey};
use crate::registry::probe;

/// How long the prober lets the view settle after a change before it
/// looks again: a burst of registrations is then one pass, not one each.
const SETTLE: Duration = Duration::from_millis(100);

impl Registry {
    /// Whether this registry probes the persistent instances now: always
    /// in memory; on a cluster node, while it is the elected one.
    pub fn leads_probes(&self) -> bool {
        match self.node() {
            None => !self.inner.closed.is_cancelled(),
            Some(_) => self
                .inner
                .election
                .get()
                .is_some_and(|election| *election.leads().borrow()),
        }
    }

    /// Records a probe's verdict on a persistent instance.
    pub(in crate::registry) async fn probed(
        &self,
        key: &ServiceKey,
        addr: &InstanceAddr,
        healthy: bool,
    ) {
        match self.node() {
            None => self.set_probed_health(key, addr, healthy),
            Some(node) => self.write_probed_health(node, key, addr, healthy).await,
        }
    }

    /// Records a probe's verdict on a persistent instance in memory.
    pub(in crate::registry) fn set_probed_health(
        &self,
        key: &ServiceKey,
        addr: &InstanceAddr,
        healthy: bool,
    ) {
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

    /// Writes a verdict that changes an instance's health to etcd. The
    /// record is read back first and written on two conditions: that it
    /// has not changed since (a re-registration or a deregistration in
    /// between wins, and the next probe tries again), and that this node
    /// still holds the prober's key (a node that lost it without noticing
    /// yet must not overwrite its successor's verdicts).
    async fn write_probed_health(
        &self,
        node: &Node,
        key: &ServiceKey,
        addr: &InstanceAddr,
        healthy: bool,
    ) {
        let differs = {
            let state = self.inner.state.lock();
            let current = state.services.get(key).and_then(|s| s.get(addr));
            current.is_some_and(|i| !i.ephemeral && i.healthy != healthy)
        };
        let fence = self.inner.election.get().and_then(|e| e.fence());
        let (true, Some(fence)) = (differs, fence) else {
            return;
        };
        let instance_key = node.key(&Key::Instance(key.clone(), addr.clone()));
        let kv = match node.etcd.get(&instance_key).await {
            Ok(Some(kv)) => kv,
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(%err, %key, ?addr, "cannot read an instance to record its probe");
                return;
            }
        };
        let Ok(mut record) = serde_json::from_slice::<Instance>(&kv.value) else {
            return;
        };
        if record.ephemeral || record.healthy == healthy {
            return;
        }
        record.healthy = healthy;
        // It was read from a record that serialised, so it serialises.
        let value = serde_json::to_vec(&record).expect("an instance record serialises");
        let txn = Txn::new()
            .when([
                Compare::mod_revision(&instance_key, Cmp::Equal, kv.mod_revision),
                Compare::lease(keys::prober(&node.prefix), Cmp::Equal, Some(fence)),
            ])
            .and_then([Op::put(&instance_key, value, None)]);
        match node.etcd.txn(txn).await {
            Ok(done) if !done.succeeded => {
                tracing::debug!(%key, ?addr, "a probe's verdict lost to a newer change or prober")
            }
            Ok(_) => tracing::info!(%key, ?addr, healthy, "probed health changed"),
            Err(err) => tracing::warn!(%err, %key, ?addr, "cannot record a probe's verdict"),
        }
    }

    pub(in crate::registry) fn start_probe(&self, instance: &Arc<Instance>) {
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
            self.inner.probe_tls.clone(),
            self.inner.closed.clone(),
        ));
        probes.insert(id, task.abort_handle());
    }

    /// Probes exactly the persistent instances in the view.
    fn reconcile_probes(&self) {
        let wanted: Vec<Arc<Instance>> = {
            let state = self.inner.state.lock();
            state
                .services
                .values()
                .flat_map(|service| service.iter())
                .filter(|instance| !instance.ephemeral)
                .cloned()
                .collect()
        };
        let ids: HashSet<(&ServiceKey, &InstanceAddr)> = wanted
            .iter()
            .map(|instance| (instance.service.as_ref(), &instance.addr))
            .collect();
        self.inner.probes.lock().retain(|(key, addr), probe| {
            let keep = ids.contains(&(key, addr));
            if !keep {
                probe.abort();
            }
            keep
        });
        for instance in &wanted {
            self.start_probe(instance);
        }
    }

    fn stop_probes(&self) {
        for (_, probe) in self.inner.probes.lock().drain() {
            probe.abort();
        }
    }
}

/// A cluster node's probing: while `leads` says this node is the
/// elected one, its probes follow its view, which `applied` says has
/// moved; they stop when it no longer leads, and for good when `closed`.
pub(super) async fn supervise(
    registry: Weak<Inner>,
    mut leads: watch::Receiver<bool>,
    mut applied: watch::Receiver<i64>,
    closed: CancellationToken,
) {
    loop {
        let elected = async { leads.wait_for(|leads| *leads).await.is_ok() };
        tokio::select! {
            _ = closed.cancelled() => return,
            elected = elected => if !elected { return },
        }
        loop {
            // Held only for the pass: a registry dropped without closing
            // still ends.
            let Some(inner) = registry.upgrade() else {
                return;
            };
            applied.borrow_and_update();
            Registry { inner }.reconcile_probes();
            tokio::select! {
                _ = closed.cancelled() => return,
                changed = leads.changed() => {
                    if changed.is_err() || !*leads.borrow_and_update() {
                        if let Some(inner) = registry.upgrade() {
                            Registry { inner }.stop_probes();
                        }
                        break;
                    }
                }
                changed = applied.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep(SETTLE).await;
                }
            }
        }
    }
}

/// A registry that probes hold without keeping it alive.
#[derive(Debug)]
pub(in crate::registry) struct WeakRegistry(Weak<Inner>);

impl From<Weak<Inner>> for WeakRegistry {
    fn from(weak: Weak<Inner>) -> Self {
        WeakRegistry(weak)
    }
}

impl Registry {
    /// A handle that does not keep the registry alive.
    pub(in crate::registry) fn downgrade(&self) -> WeakRegistry {
        WeakRegistry(Arc::downgrade(&self.inner))
    }
}

impl WeakRegistry {
    pub fn upgrade(&self) -> Option<Registry> {
        self.0.upgrade().map(|inner| Registry { inner })
    }
}
