//! What survives a restart: the persistent instances and the services'
//! settings, loaded when the registry opens and stored change by change
//! before a change is acknowledged.

use std::sync::Arc;

use super::{Registry, State};
use crate::registry::{Config, Error, persist};

impl Registry {
    /// Opens the registry: loads what `config.data_dir` holds, starts the
    /// lease reaper and the health probes of persistent instances.
    pub async fn open(config: &Config) -> Result<Registry, persist::Error> {
        Registry::open_probing(config, None).await
    }

    /// [`Registry::open`], probing persistent instances over TLS with
    /// `probe_tls` when it is given.
    pub async fn open_probing(
        config: &Config,
        probe_tls: Option<crate::server::Dialer>,
    ) -> Result<Registry, persist::Error> {
        let (store, mut loaded) = persist::Store::open(&config.data_dir)?;
        let signer = super::identity::load_or_create(&config.data_dir)?;
        let configs = std::mem::take(&mut loaded.configs);
        let registry =
            Registry::with_store(config, Some((store, configs)), None, (signer, probe_tls));
        {
            let mut state = registry.inner.state.lock();
            for (key, settings) in loaded.services {
                let service = state.ensure_service(&key);
                service.explicit = true;
                service.settings = settings;
            }
            for mut instance in loaded.instances {
                // Health is not stored: it is probed again.
                instance.healthy = false;
                instance.ephemeral = false;
                instance.lease = 0;
                let key = instance.service.as_ref().clone();
                let service = state.ensure_service(&key);
                instance.service = service.key.clone();
                let instance = Arc::new(instance);
                state.put(instance.clone());
                registry.start_probe(&instance);
            }
            state.tokens = loaded
                .tokens
                .into_iter()
                .map(|grant| (grant.id, Arc::new(grant)))
                .collect();
            tracing::info!(
                services = state.services.len(),
                tokens = state.tokens.len(),
                revision = state.revision,
                "loaded persistent state"
            );
        }
        Ok(registry)
    }

    /// Stores what memory now holds for `subject`, if this registry keeps
    /// a store; returns once it is durable.
    pub(super) async fn persist(&self, subject: persist::Subject<'_>) -> Result<(), Error> {
        let Some(store) = &self.inner.store else {
            return Ok(());
        };
        // Submitted under the state lock, so the store takes changes in the
        // order memory took them and ends with what memory holds.
        let durable = store.submit(self.inner.state.lock().persistent(subject));
        durable.await.map_err(|err| {
            tracing::error!(dir = %store.dir().display(), %err, "cannot store the registry's persistent state");
            Error::Unavailable("the registry cannot store persistent state now; try again".into())
        })
    }
}

impl State {
    /// What must survive a restart of `subject`, as memory holds it now.
    pub(in crate::registry) fn persistent(&self, subject: persist::Subject<'_>) -> persist::Change {
        match subject {
            persist::Subject::Instance(key, addr) => {
                match self.services.get(key).and_then(|s| s.get(addr)) {
                    Some(instance) if !instance.ephemeral => {
                        persist::Change::Put((**instance).clone())
                    }
                    _ => persist::Change::Remove {
                        service: key.clone(),
                        addr: addr.clone(),
                    },
                }
            }
            persist::Subject::Service(key) => persist::Change::Settings {
                service: key.clone(),
                settings: self
                    .services
                    .get(key)
                    .filter(|s| s.explicit)
                    .map(|s| s.settings.clone()),
            },
            persist::Subject::Token(id) => persist::Change::Token {
                id,
                grant: self.tokens.get(&id).map(|grant| (**grant).clone()),
            },
        }
    }
}
