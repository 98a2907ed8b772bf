//! The registry role: `shop-mesh registry`. A Nacos-class naming service
//! over gRPC: registration, leases kept alive over a stream, health
//! (heartbeats for ephemeral instances, probes for persistent ones), and a
//! watch that pushes every change at once.

pub mod cluster;
pub mod configs;
pub mod console;
mod grpc;
mod http;
mod metrics;
pub mod model;
pub mod nacos;
mod persist;
mod probe;
mod store;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub use crate::error::Error;
pub use cluster::{ClusterInfo, EtcdInfo, EtcdMember, RegistryNode};
pub use grpc::RegistryService;
pub use persist::Error as DataDirError;
pub use probe::HEALTH_SERVICE_KEY;
pub use store::{
    ADMIN_TOKEN_FILE, IDENTITY_KEY_FILE, KeepAlive, Liveness, Registry, Stats, WatcherView,
};
pub use watch::{SNAPSHOT_CHUNK, Selector, WatchItem, WatchStream, Watcher};

use crate::pb::config::configs_server::ConfigsServer;
use crate::pb::registry::registry_server::RegistryServer;
use crate::shutdown::Shutdown;

/// The registry's default port, Nacos's.
pub const DEFAULT_PORT: u16 = 8848;

/// `shop-mesh registry` flags; each overrides its configuration key.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Address to listen on [config: registry.listen].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Where persistent instances and service settings are kept
    /// [config: registry.data_dir].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Where the registry's state lives: this process's memory (and its
    /// data dir), or an etcd cluster that any number of registry nodes
    /// share [config: registry.store].
    #[arg(long, value_enum)]
    pub store: Option<StoreKind>,
    /// The etcd cluster's client endpoints, a,b,c
    /// [config: registry.etcd.endpoints].
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// The prefix of every key the registry writes in etcd
    /// [config: registry.etcd.prefix].
    #[arg(long)]
    pub etcd_prefix: Option<String>,
    /// Serve /metrics on this address instead of --listen's port
    /// [config: registry.metrics_listen].
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
}

impl Args {
    /// Lays the flags that were given over `config`; absent flags leave it as
    /// it is.
    pub fn apply(&self, config: &mut Config) {
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(store) = self.store {
            config.store = store;
        }
        if let Some(endpoints) = &self.etcd_endpoints {
            config.etcd.endpoints = endpoints.clone();
        }
        if let Some(prefix) = &self.etcd_prefix {
            config.etcd.prefix = prefix.clone();
        }
        if let Some(listen) = self.metrics_listen {
            config.metrics_listen = Some(listen);
        }
    }
}

/// Where the registry's state lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In this process; persistent instances and settings in its data dir.
    /// One registry process.
    #[default]
    Memory,
    /// In an etcd cluster: any number of registry nodes over it are one
    /// registry, and losing a node loses nothing.
    Etcd,
}

/// The `[registry.etcd]` section: the etcd cluster a `store = "etcd"`
/// registry keeps its state in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client endpoints of the etcd members (host:port or URLs); calls
    /// move to the next when one is unreachable or without a leader.
    pub endpoints: Vec<String>,
    /// Every key the registry writes starts with this, so several
    /// registries (or other tools) can share one etcd cluster.
    pub prefix: String,
    /// How long connecting to an etcd member may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long one etcd call may take before the next member is tried.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The TTL of the etcd lease by which one node holds the probing of
    /// persistent instances: how long their health may go unprobed after
    /// that node dies without a word (a clean stop hands it over at
    /// once). Also that of the lease of the key by which each node says it
    /// is up: how long GetCluster may still list a node that died. etcd's
    /// minimum is 2 s.
    #[serde(with = "humantime_serde")]
    pub prober_ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "/shop-mesh".into(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            prober_ttl: Duration::from_secs(5),
        }
    }
}

/// The shortest `registry.auth.identity_ttl` taken.
pub const MIN_IDENTITY_TTL: Duration = Duration::from_secs(10);

/// The `[registry.auth]` section: whether callers must show a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Every call but health checks and reflection needs a token whose
    /// scope covers it (see [`crate::auth`]).
    pub enabled: bool,
    /// Reads (GetService, ListServices, Watch, GetCluster) need no token
    /// even when `enabled`.
    pub open_reads: bool,
    /// Tokens the registry keeps at most.
    pub max_tokens: usize,
    /// How long a service identity (IssueIdentity) is accepted.
    #[serde(with = "humantime_serde")]
    pub identity_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            open_reads: false,
            max_tokens: 10_000,
            identity_ttl: Duration::from_secs(600),
        }
    }
}

/// The `[registry.console]` section: the console in a browser, on the
/// registry's port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serves the console (its pages and its login); the JSON API is
    /// served either way.
    pub enabled: bool,
    /// The console user's password. Unset: the one whose hash is in the
    /// data dir, made at the first start (see [`console`]).
    pub password: crate::auth::Secret,
    /// A session unused this long lapses.
    #[serde(with = "humantime_serde")]
    pub session_idle: Duration,
    /// A session lapses this long after its login, however much it is used.
    #[serde(with = "humantime_serde")]
    pub session_max: Duration,
    /// Sessions open at once; logging in past it ends the least recently
    /// used.
    pub max_sessions: usize,
    /// Login attempts one client address may make a minute.
    pub login_attempts_per_minute: u32,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            password: crate::auth::Secret::default(),
            session_idle: Duration::from_secs(30 * 60),
            session_max: Duration::from_secs(12 * 3600),
            max_sessions: 1000,
            login_attempts_per_minute: 5,
        }
    }
}

/// The `[registry.nacos]` section: Nacos's naming protocols, for the
/// clients of Nacos (see [`nacos`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NacosConfig {
    /// Serves Nacos's 1.x open API under `/nacos/v1/` on the registry's
    /// port, and its 2.x gRPC API on `grpc_listen`.
    pub enabled: bool,
    /// Where the 2.x gRPC API listens. Unset: the registry's address with
    /// its port + 1000 (9848 beside 8848), where Nacos clients look for
    /// it.
    pub grpc_listen: Option<SocketAddr>,
}

impl Default for NacosConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            grpc_listen: None,
        }
    }
}

impl NacosConfig {
    /// Where the 2.x gRPC API listens beside a registry on `registry`.
    pub fn grpc_addr(&self, registry: SocketAddr) -> anyhow::Result<SocketAddr> {
        if let Some(addr) = self.grpc_listen {
            return Ok(addr);
        }
        let port = registry.port().checked_add(1000).ok_or_else(|| {
            anyhow::anyhow!(
                "the registry's port {} leaves no room for Nacos's gRPC port (+1000); set registry.nacos.grpc_listen",
                registry.port()
            )
        })?;
        Ok(SocketAddr::new(registry.ip(), port))
    }
}

/// The `[registry]` configuration section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the gRPC server listens; defaults to 0.0.0.0 on [`DEFAULT_PORT`].
    pub listen: SocketAddr,
    /// Where `/metrics` is served instead of `listen`'s port (over plain
    /// HTTP/1.1, for an address only Prometheus reaches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Directory holding persistent instances and service settings; locked by
    /// one registry at a time.
    pub data_dir: PathBuf,
    /// Default heartbeat interval of an ephemeral instance.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Default time without a heartbeat before an instance is unhealthy.
    #[serde(with = "humantime_serde")]
    pub unhealthy_timeout: Duration,
    /// Default time without a heartbeat before an instance is removed.
    #[serde(with = "humantime_serde")]
    pub delete_timeout: Duration,
    /// Lower bound of every timing an instance may ask for (heartbeat
    /// interval and both timeouts): keeps heartbeats from flooding the
    /// registry.
    #[serde(with = "humantime_serde")]
    pub min_heartbeat_interval: Duration,
    /// Upper bound of every timing an instance may ask for.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// How often each persistent instance is health-probed.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How long one probe may take; no answer in time counts as unhealthy.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// How long a stopping registry waits for open calls before it exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Accept instances at link-local addresses (169.254.0.0/16,
    /// fe80::/10), which only hosts on the same link can reach.
    pub allow_link_local: bool,
    /// The `[registry.limits]` section.
    pub limits: Limits,
    /// Where the state lives: `memory` (one process) or `etcd` (a
    /// cluster of registry nodes).
    pub store: StoreKind,
    /// The etcd cluster, when `store` is `etcd`.
    pub etcd: EtcdConfig,
    /// The `[registry.auth]` section.
    pub auth: AuthConfig,
    /// The `[registry.console]` section.
    pub console: ConsoleConfig,
    /// The `[registry.nacos]` section.
    pub nacos: NacosConfig,
    /// The `[registry.configs]` section: the config centre's limits.
    pub configs: configs::Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            metrics_listen: None,
            data_dir: PathBuf::from("data/registry"),
            heartbeat_interval: Duration::from_secs(5),
            unhealthy_timeout: Duration::from_secs(15),
            delete_timeout: Duration::from_secs(30),
            min_heartbeat_interval: Duration::from_millis(500),
            max_timeout: Duration::from_secs(3600),
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
            allow_link_local: false,
            limits: Limits::default(),
            store: StoreKind::default(),
            etcd: EtcdConfig::default(),
            auth: AuthConfig::default(),
            console: ConsoleConfig::default(),
            nacos: NacosConfig::default(),
            configs: configs::Limits::default(),
        }
    }
}

/// Limits that keep one client from taking the registry down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Instances one service may hold; registrations beyond it are refused.
    pub max_instances_per_service: usize,
    /// Services one namespace may hold; registrations that would add more are
    /// refused.
    pub max_services_per_namespace: usize,
    /// Watch streams open at once.
    pub max_watches: usize,
    /// Changes kept for watchers that resume; older resumes get a reset.
    pub watch_history: usize,
    /// Bytes of changes queued for one watcher that is not reading
    /// before it is sent a reset instead.
    pub watch_queue_bytes: usize,
    /// Largest request message, in bytes.
    pub max_message_size: usize,
    /// Largest page a service listing may ask for; a request for 0 gets this or
    /// 100, whichever is smaller.
    pub max_page_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_instances_per_service: 10_000,
            max_services_per_namespace: 100_000,
            max_watches: 10_000,
            watch_history: 10_000,
            watch_queue_bytes: 1024 * 1024,
            max_message_size: 4 * 1024 * 1024,
            max_page_size: 1000,
        }
    }
}

/// Serves the registry on `listener`, holding connections as
/// `connections` say and measuring itself as `telemetry` says, until
/// `shutdown`.
pub async fn run(
    config: &Config,
    connections: &crate::server::Connections,
    telemetry: &crate::telemetry::Config,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    // Renewed halfway, an identity must outlive a call or two.
    anyhow::ensure!(
        config.auth.identity_ttl >= MIN_IDENTITY_TTL,
        "registry.auth.identity_ttl is {:?}; it must be at least {MIN_IDENTITY_TTL:?}",
        config.auth.identity_ttl
    );
    config.configs.validate(config.limits.max_message_size)?;
    if config.store == StoreKind::Etcd {
        config.configs.fits_in_etcd()?;
    }
    // How persistent instances are probed: over TLS when the mesh is.
    let probe_tls = connections.tls.client()?;
    let (registry, _lock) = match config.store {
        StoreKind::Memory => {
            // Held until the registry stops: one registry to a data dir.
            let lock = persist::DirLock::acquire(&config.data_dir, listener.local_addr()?).await?;
            (Registry::open_probing(config, probe_tls).await?, Some(lock))
        }
        StoreKind::Etcd => (Registry::join(config, connections, probe_tls).await?, None),
    };
    registry.ensure_admin_token(&config.data_dir).await?;
    let metrics = telemetry.metrics();
    registry.measure(&metrics);
    let face = RegistryService::new(registry.clone(), shutdown.clone())
        .listening_on(listener.local_addr()?);
    let config_face = configs::grpc::ConfigService::new(registry.clone(), shutdown.clone());
    let api = http::routes(face.clone()).merge(http::configs::routes(config_face.clone()));
    let api = if config.nacos.enabled {
        api.merge(nacos::open_api::routes(face.clone()))
    } else {
        api
    };
    let api = if config.console.enabled {
        let console =
            console::Console::open(config, registry.clone(), connections.tls.serves()).await?;
        api.route_layer(axum::middleware::from_fn_with_state(
            console.clone(),
            console::Console::guard,
        ))
        .merge(console.routes())
    } else {
        api
    };
    let service =
        RegistryServer::new(face.clone()).max_decoding_message_size(config.limits.max_message_size);
    let configs =
        ConfigsServer::new(config_face).max_decoding_message_size(config.limits.max_message_size);
    let mut server = crate::server::Server::new(shutdown.clone(), connections).await?;
    server.limit_message_size(config.limits.max_message_size);
    // The JSON API shares the port, over HTTP/1.1 as well as HTTP/2.
    server.serve_http1();
    server.measure(&metrics, config.metrics_listen);
    let routes = server
        .routes(&[
            <RegistryServer<RegistryService> as tonic::server::NamedService>::NAME,
            <ConfigsServer<configs::grpc::ConfigService> as tonic::server::NamedService>::NAME,
        ])
        .add_service(service)
        .add_service(configs);
    let routes = tonic::service::Routes::from(
        routes
            .into_axum_router()
            .merge(api)
            .fallback(http::no_such_path),
    );
    server
        .health()
        .set_serving::<RegistryServer<RegistryService>>()
        .await;
    registry.announce(listener.local_addr()?);
    match config.store {
        StoreKind::Memory => {
            tracing::info!(addr = %listener.local_addr()?, data_dir = %config.data_dir.display(), "registry serving")
        }
        StoreKind::Etcd => {
            tracing::info!(addr = %listener.local_addr()?, etcd = %config.etcd.endpoints.join(","), "registry serving")
        }
    }
    // Nacos's port stops with the registry's, whatever stopped that.
    let nacos_stop = shutdown.child_token();
    let nacos = if config.nacos.enabled {
        serve_nacos(
            config,
            (connections, &metrics),
            &face,
            listener.local_addr()?,
            &nacos_stop,
        )
        .await?
    } else {
        None
    };
    let stop = shutdown.clone().cancelled_owned();
    let result = server
        .serve(routes, listener, config.shutdown_grace, stop)
        .await;
    nacos_stop.cancel();
    if let Some(nacos) = nacos {
        let _ = nacos.await;
    }
    // Hands the probing of persistent instances over before the process
    // can exit, so a clean stop leaves no gap in them.
    registry.leave().await;
    result
}

/// Starts Nacos's 2.x gRPC API beside a registry serving at `registry`
/// (see [`NacosConfig::grpc_addr`]), on the same connection settings,
/// until `shutdown`; answers its task. Where `registry.nacos.grpc_listen`
/// is set, a port it cannot have stops the registry; where it is the
/// registry's port + 1000 by default, the registry serves without it,
/// saying so.
async fn serve_nacos(
    config: &Config,
    (connections, metrics): (&crate::server::Connections, &crate::telemetry::Metrics),
    face: &RegistryService,
    registry: SocketAddr,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let asked = config.nacos.grpc_addr(registry)?;
    let listener = match crate::server::bind(asked, "Nacos's gRPC API", None).await {
        Ok(listener) => listener,
        Err(err) if config.nacos.grpc_listen.is_none() => {
            tracing::warn!(error = %format!("{err:#}"), "Nacos 2.x clients cannot connect: set registry.nacos.grpc_listen to a free address");
            return Ok(None);
        }
        Err(err) => {
            return Err(err.context(
                "set registry.nacos.grpc_listen to a free address, or registry.nacos.enabled = false",
            ));
        }
    };
    let mut server = crate::server::Server::new(shutdown.clone(), connections).await?;
    server.limit_message_size(config.limits.max_message_size);
    server.count_calls(metrics);
    let remote = nacos::Remote::new(face.clone(), shutdown.clone());
    let routes = remote.routes(config.limits.max_message_size);
    server
        .health()
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tracing::info!(addr = %listener.local_addr()?, "Nacos 2.x gRPC API serving");
    let grace = config.shutdown_grace;
    let stop = shutdown.clone().cancelled_owned();
    Ok(Some(tokio::spawn(async move {
        server.serve(routes, listener, grace, stop).await
    })))
}
