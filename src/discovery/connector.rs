//! Reaching the registry: a list of addresses (`a,b,c`) tried in turn,
//! with back-off and jitter between rounds.

use std::time::Duration;

use backon::BackoffBuilder;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::pb::registry::registry_client;
use crate::server::Connections;
use crate::shutdown::Shutdown;

/// A registry client that shows this process's [`Credential`] on every
/// call.
pub type RegistryClient = registry_client::RegistryClient<InterceptedService<Channel, Credential>>;

/// The token a process shows the registry, as `authorization` metadata
/// marked sensitive (so no `Debug` of a request prints it); none when the
/// process has no token.
#[derive(Debug, Clone, Default)]
pub struct Credential(Option<MetadataValue<Ascii>>);

impl Credential {
    /// Shows `token` as `Bearer <token>`. One that is not printable ASCII
    /// cannot be a token: nothing is shown, and the registry says so.
    pub fn bearer(token: &str) -> Credential {
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim())).ok();
        Credential(value.map(|mut value| {
            value.set_sensitive(true);
            value
        }))
    }
}

impl Interceptor for Credential {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Reaches the registry: the addresses to try in turn and the back-off between
/// rounds, so each resolver and registrar reconnects the same way.
#[derive(Debug, Clone)]
pub struct Connector {
    /// Each address as given, beside its endpoint.
    endpoints: Vec<(String, Endpoint)>,
    max_backoff: Duration,
    credential: Credential,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no registry address given")]
    Empty,
    #[error("registry address {0:?} is not host:port: {1}")]
    BadAddress(String, String),
    #[error(transparent)]
    Tls(#[from] crate::server::TlsError),
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
        let tls = connections.tls.client()?;
        let endpoints = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|addr| {
                let bad = |reason: String| Error::BadAddress(addr.into(), reason);
                let uri = match addr.split_once("://") {
                    // A token must never go in the clear to a registry
                    // that the TLS settings say to reach over TLS.
                    Some(("http", _)) if tls.is_some() => {
                        return Err(bad(
                            "TLS is on (connections.tls.ca): give https:// or no scheme".into(),
                        ));
                    }
                    Some(_) => addr.to_string(),
                    None => format!("{}://{addr}", connections.tls.scheme()),
                };
                let endpoint = connections
                    .endpoint(uri, connect_timeout)
                    .map_err(|err| bad(err.to_string()))?;
                let endpoint = match &tls {
                    Some(tls) => {
                        let host = endpoint.uri().host().unwrap_or_default().to_string();
                        endpoint
                            .tls_config(tls.for_host(&host))
                            .map_err(|err| bad(err.to_string()))?
                    }
                    None => endpoint,
                };
                Ok((addr.to_string(), endpoint))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(Error::Empty);
        }
        Ok(Self {
            endpoints,
            max_backoff,
            credential: Credential::default(),
        })
    }

    /// The same, showing `credential` on every call.
    pub fn showing(mut self, credential: Credential) -> Self {
        self.credential = credential;
        self
    }

    /// A connected client: each address in turn, then a back-off, until one
    /// answers; `None` once `shutdown` fires.
    pub async fn connect(&self, shutdown: &Shutdown) -> Option<RegistryClient> {
        self.connect_named(shutdown).await.map(|(client, _)| client)
    }

    /// [`Connector::connect`], also answering which address (as given)
    /// it reached.
    pub async fn connect_named(&self, shutdown: &Shutdown) -> Option<(RegistryClient, String)> {
        let (channel, addr) = self.connect_channel(shutdown).await?;
        Some((registry_client::RegistryClient::new(channel), addr))
    }

    /// A connected channel to the registry showing this process's
    /// credential, for any of its APIs (the config centre's too), and the
    /// address reached; `None` once `shutdown` fires.
    pub async fn connect_channel(
        &self,
        shutdown: &Shutdown,
    ) -> Option<(InterceptedService<Channel, Credential>, String)> {
        let mut delays = self.backoff();
        loop {
            for (addr, endpoint) in &self.endpoints {
                match endpoint.connect().await {
                    Ok(channel) => {
                        let channel = InterceptedService::new(channel, self.credential.clone());
                        return Some((channel, addr.clone()));
                    }
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
