//! Reaching the registry: a list of addresses (`a,b,c`) tried in turn,
//! with back-off and jitter between rounds.

use std::time::Duration;

use backon::BackoffBuilder;
use tonic::transport::{Channel, Endpoint};

use crate::pb::registry::registry_client::RegistryClient;
use crate::server::Connections;
use crate::shutdown::Shutdown;

/// Reaches the registry: the addresses to try in turn and the back-off between
/// rounds, so each resolver and registrar reconnects the same way.
#[derive(Debug, Clone)]
pub struct Connector {
    /// Each address as given, beside its endpoint.
    endpoints: Vec<(String, Endpoint)>,
    max_backoff: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no registry address given")]
    Empty,
    #[error("registry address {0:?} is not host:port: {1}")]
    BadAddress(String, String),
}

impl Connector {
    /// `addrs`: `host:port` (or `http://host:port`), comma-separated, each
    /// given up on after `connect_timeout` and held as `connections` say.
    /// `max_backoff` caps the wait between rounds, so a service is back
    /// within about that long after the registry returns.
    pub fn new(
        addrs: &str,
        max_backoff: Duration,
        connect_timeout: Duration,
        connections: &Connections,
    ) -> Result<Self, Error> {
        let endpoints = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|addr| {
                let uri = if addr.contains("://") {
                    addr.to_string()
                } else {
                    format!("http://{addr}")
                };
                connections
                    .endpoint(uri, connect_timeout)
                    .map(|endpoint| (addr.to_string(), endpoint))
                    .map_err(|err| Error::BadAddress(addr.into(), err.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(Error::Empty);
        }
        Ok(Self {
            endpoints,
            max_backoff,
        })
    }

    /// A connected client: each address in turn, then a back-off, until one
    /// answers; `None` once `shutdown` fires.
    pub async fn connect(&self, shutdown: &Shutdown) -> Option<RegistryClient<Channel>> {
        self.connect_named(shutdown).await.map(|(client, _)| client)
    }

    /// [`Connector::connect`], also answering which address (as given)
    /// it reached.
    pub async fn connect_named(
        &self,
        shutdown: &Shutdown,
    ) -> Option<(RegistryClient<Channel>, String)> {
        let mut delays = self.backoff();
        loop {
            for (addr, endpoint) in &self.endpoints {
                match endpoint.connect().await {
                    Ok(channel) => return Some((RegistryClient::new(channel), addr.clone())),
                    Err(err) => {
                        tracing::debug!(registry = %endpoint.uri(), %err, "registry unreachable")
                    }
                }
                if shutdown.is_cancelled() {
                    return None;
                }
            }
            let delay = delays.next().unwrap_or(self.max_backoff);
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Exponential with jitter, from 50 ms up to `max_backoff`.
    pub fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(self.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    }
}
