//! Discovery, the client side of the registry: services register
//! themselves ([`Registration`]), and callers reach a service by name over a
//! [`BalancedChannel`] fed by a [`resolver`] that watches it. No address is
//! ever written into a caller.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use shop_mesh::discovery::{Config, Mesh};
//! use tonic_health::pb::health_client::HealthClient;
//!
//! let mesh = Mesh::new(&Config::default(), &Default::default())?;
//! let mut client = HealthClient::new(mesh.channel("server-product"));
//! # Ok(()) }
//! ```

mod balancer;
mod connector;
pub mod endpoint;
mod identity;
pub mod metrics;
mod registrar;
pub mod resolver;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::{CancellationToken, DropGuard};

pub use balancer::{BalanceConfig, BalancedChannel, RetrySafe, retry_safe};
pub use connector::{Connector, Credential, RegistryClient};
pub use endpoint::EjectionPolicy;
pub use identity::{Callers, Identities};
pub use registrar::Registration;
pub use resolver::{Change, EndpointInfo, Target};

use crate::auth::Secret;
use crate::registry::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE};
use crate::server::Connections;
use crate::telemetry::Metrics;

/// The `[discovery]` configuration section: how services find the registry
/// and each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Registry addresses, tried in turn: `host:port[,host:port...]`.
    pub registry: String,
    /// Registry namespace this service registers in and looks others up in
    /// (default `public`).
    pub namespace: String,
    /// Registry group this service registers in and looks others up in (default
    /// `DEFAULT_GROUP`).
    pub group: String,
    /// The deadline of a call that sets none.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// How long connecting to the registry or to an instance may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a first call waits for the registry's first answer.
    #[serde(with = "humantime_serde")]
    pub resolve_timeout: Duration,
    /// Failures in a row that eject an endpoint.
    pub eject_after: u32,
    /// The first ejection's length; each further one doubles, up to the max.
    #[serde(with = "humantime_serde")]
    pub ejection_base: Duration,
    /// Longest ejection, however many ejections came before.
    #[serde(with = "humantime_serde")]
    pub ejection_max: Duration,
    /// Retries of retry-safe calls, as a share of calls.
    pub retry_percent: f32,
    /// How long endpoints a restarted registry has not confirmed are kept.
    #[serde(with = "humantime_serde")]
    pub stale_grace: Duration,
    /// The longest wait between attempts to reach the registry.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_backoff: Duration,
    /// How long a stopping service keeps serving after it deregistered, so
    /// callers see it gone before its listener closes.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// How long a stopping service waits for open calls once its listener
    /// has closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The token shown on every registry call (`SHOP_MESH__DISCOVERY__TOKEN`),
    /// when the registry checks credentials; never printed.
    pub token: Secret,
    /// A file holding the token instead (its first line), such as the
    /// registry's `admin.token`; empty: none.
    pub token_file: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            registry: "127.0.0.1:8848".into(),
            namespace: DEFAULT_NAMESPACE.into(),
            group: DEFAULT_GROUP.into(),
            call_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            resolve_timeout: Duration::from_secs(3),
            eject_after: 3,
            ejection_base: Duration::from_secs(1),
            ejection_max: Duration::from_secs(30),
            retry_percent: 0.2,
            stale_grace: Duration::from_secs(15),
            reconnect_max_backoff: Duration::from_secs(2),
            drain_delay: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(10),
            token: Secret::default(),
            token_file: PathBuf::new(),
        }
    }
}

impl Config {
    /// A connector to the registry addresses in `registry`; fails when none is
    /// given or one is not `host:port`.
    pub fn connector(&self, connections: &Connections) -> Result<Connector, connector::Error> {
        Connector::new(
            &self.registry,
            self.reconnect_max_backoff,
            self.connect_timeout,
            connections,
        )
        .map(|connector| connector.showing(self.credential()))
    }

    /// What every registry call shows: `token`, or the first line of
    /// `token_file`, or nothing. A file that cannot be read is logged and
    /// nothing is shown (the registry then says what it wants).
    pub fn credential(&self) -> Credential {
        if self.token.is_set() {
            return Credential::bearer(self.token.expose());
        }
        if self.token_file.as_os_str().is_empty() {
            return Credential::default();
        }
        match std::fs::read_to_string(&self.token_file) {
            Ok(text) => Credential::bearer(text.lines().next().unwrap_or_default()),
            Err(err) => {
                tracing::error!(file = %self.token_file.display(), %err, "cannot read the registry token file; calling without a token");
                Credential::default()
            }
        }
    }

    /// The identities `service` shows the services it calls, fetched from
    /// the registry with this section's token.
    pub fn identities(
        &self,
        connections: &Connections,
        service: &str,
    ) -> Result<Identities, connector::Error> {
        Ok(Identities::new(
            self.connector(connections)?,
            &self.namespace,
            service,
            self.call_timeout,
        ))
    }

    /// The check of the identities `me`'s callers show, with the registry's
    /// keys.
    pub fn callers(
        &self,
        connections: &Connections,
        me: &str,
    ) -> Result<Callers, connector::Error> {
        Ok(Callers::new(
            self.connector(connections)?,
            &self.namespace,
            me,
            self.call_timeout,
        ))
    }

    /// This section's call settings for a [`BalancedChannel`], with the shared
    /// `[connections]` settings.
    pub fn balance(
        &self,
        connections: &Connections,
    ) -> Result<BalanceConfig, crate::server::TlsError> {
        Ok(BalanceConfig {
            call_timeout: self.call_timeout,
            connect_timeout: self.connect_timeout,
            connections: connections.clone(),
            resolve_timeout: self.resolve_timeout,
            ejection: EjectionPolicy {
                eject_after: self.eject_after,
                base: self.ejection_base,
                max: self.ejection_max,
            },
            retry_percent: self.retry_percent,
            tls: connections.tls.client()?,
            metrics: None,
        })
    }
}

/// A caller's view of the mesh: one balanced channel per service it calls,
/// made on first use and shared after.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<MeshInner>,
}

struct MeshInner {
    config: Config,
    /// How every channel calls.
    balance: BalanceConfig,
    connector: Connector,
    channels: Mutex<HashMap<String, BalancedChannel>>,
    /// Stops every resolver when the mesh goes.
    stop: CancellationToken,
    _stop: DropGuard,
}

impl Mesh {
    /// Channels that find services as `config` says and hold their
    /// connections as `connections` (the `[connections]` section) say.
    pub fn new(config: &Config, connections: &Connections) -> Result<Self, connector::Error> {
        Self::measured(config, connections, &Metrics::off())
    }

    /// [`Mesh::new`], counting its calls, endpoints and watches into a
    /// role's `metrics` when they are on.
    pub fn measured(
        config: &Config,
        connections: &Connections,
        metrics: &Metrics,
    ) -> Result<Self, connector::Error> {
        let stop = CancellationToken::new();
        let mut balance = config.balance(connections)?;
        balance.metrics = metrics
            .enabled()
            .then(|| metrics::DiscoveryMetrics::new(metrics));
        let inner = Arc::new(MeshInner {
            config: config.clone(),
            balance,
            connector: config.connector(connections)?,
            channels: Mutex::new(HashMap::new()),
            stop: stop.clone(),
            _stop: stop.drop_guard(),
        });
        if metrics.enabled() {
            metrics.collect(metrics::Endpoints(Arc::downgrade(&inner)));
        }
        Ok(Self { inner })
    }

    /// A channel to every healthy instance of `service`, for any generated
    /// client: `ProductServiceClient::new(mesh.channel("server-product"))`.
    pub fn channel(&self, service: &str) -> BalancedChannel {
        let mut channels = self.inner.channels.lock();
        if let Some(channel) = channels.get(service) {
            return channel.clone();
        }
        let config = &self.inner.config;
        let changes = resolver::resolve(
            self.inner.connector.clone(),
            Target {
                namespace: config.namespace.clone(),
                group: config.group.clone(),
                service: service.into(),
            },
            config.stale_grace,
            self.inner.stop.child_token(),
            self.inner
                .balance
                .metrics
                .as_ref()
                .map(|metrics| metrics.watch(service))
                .unwrap_or_default(),
        );
        let channel = BalancedChannel::new(service, changes, self.inner.balance.clone());
        channels.insert(service.into(), channel.clone());
        channel
    }
}

/// How a service presents itself in the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct Announce {
    /// The name callers use (`server-product`).
    pub service: String,
    /// `host:port` others can reach; by default the bound address.
    pub advertise: Option<String>,
    /// Relative share of callers' traffic; 0 registers the instance but sends
    /// it none.
    pub weight: f64,
    /// Labels registered with the instance, for operators and tools; the
    /// balancer ignores them.
    pub metadata: HashMap<String, String>,
}

impl Announce {
    /// Announces `service` at the bound address, weight 1, no metadata.
    pub fn new(service: &str) -> Self {
        Self {
            service: service.into(),
            advertise: None,
            weight: 1.0,
            metadata: HashMap::new(),
        }
    }
}

/// Serves `routes` on `listener` and keeps the service registered while it
/// serves. On shutdown: health NOT_SERVING at once, then deregistration,
/// then (after the drain delay) the listener closes and open calls get the
/// shutdown grace to finish.
pub async fn serve(
    server: &crate::server::Server,
    routes: tonic::service::Routes,
    listener: tokio::net::TcpListener,
    announce: Announce,
    config: &Config,
    shutdown: crate::shutdown::Shutdown,
) -> anyhow::Result<()> {
    let bound = listener.local_addr()?;
    let addr = advertise_addr(bound, announce.advertise.as_deref())?;
    let instance = crate::pb::registry::Instance {
        namespace: config.namespace.clone(),
        group: config.group.clone(),
        service: announce.service.clone(),
        ip: addr.ip().to_string(),
        port: addr.port().into(),
        weight: Some(announce.weight),
        metadata: announce.metadata,
        ..Default::default()
    };
    let connector = config.connector(server.connections())?;
    let registration = Registration::start(connector, instance, shutdown, config.drain_delay);
    tracing::info!(service = %announce.service, %bound, advertised = %addr, "serving");
    server
        .serve(routes, listener, config.shutdown_grace, registration.left())
        .await
}

/// The address to register: `advertise` when given (`host:port`), else the
/// bound address; a wildcard bind (0.0.0.0, ::) becomes the host's primary
/// non-loopback address, never 0.0.0.0.
pub fn advertise_addr(bound: SocketAddr, advertise: Option<&str>) -> anyhow::Result<SocketAddr> {
    if let Some(advertise) = advertise {
        return advertise
            .to_socket_addrs()
            .map_err(|err| anyhow::anyhow!("--advertise {advertise:?} is not host:port: {err}"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("--advertise {advertise:?} resolves to no address"));
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    Ok(SocketAddr::new(
        primary_address(bound.is_ipv6()),
        bound.port(),
    ))
}

/// The first non-loopback address of an interface that is up; loopback
/// when there is none.
fn primary_address(v6: bool) -> IpAddr {
    let found = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|iface| iface.ip())
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified() && ip.is_ipv6() == v6);
    found.unwrap_or(if v6 {
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address_is_never_a_wildcard() {
        let bound: SocketAddr = "0.0.0.0:8070".parse().unwrap();
        let addr = advertise_addr(bound, None).unwrap();
        assert!(!addr.ip().is_unspecified());
        assert_eq!(addr.port(), 8070);

        let bound: SocketAddr = "127.0.0.1:8070".parse().unwrap();
        assert_eq!(advertise_addr(bound, None).unwrap(), bound);
        assert_eq!(
            advertise_addr(bound, Some("10.1.2.3:9000")).unwrap(),
            "10.1.2.3:9000".parse().unwrap()
        );
        assert!(advertise_addr(bound, Some("no-port")).is_err());
    }
}
