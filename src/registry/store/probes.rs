//! Supervision of the health probes of persistent instances: one probe
//! task per instance, and where their verdicts land.

use std::sync::{Arc, Weak};

use super::{Inner, Registry};
use crate::registry::model::{Instance, InstanceAddr, ServiceKey};
use crate::registry::probe;

impl Registry {
    /// Records a probe's verdict on a persistent instance.
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
            self.inner.closed.clone(),
        ));
        probes.insert(id, task.abort_handle());
    }
}

/// A registry that probes hold without keeping it alive.
pub(in crate::registry) struct WeakRegistry(Weak<Inner>);

impl From<Weak<Inner>> for WeakRegistry {
    fn from(weak: Weak<Inner>) -> Self {
        WeakRegistry(weak)
    }
}

impl WeakRegistry {
    pub fn upgrade(&self) -> Option<Registry> {
        self.0.upgrade().map(|inner| Registry { inner })
    }
}
