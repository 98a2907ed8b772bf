//! What the three shop services (user, product, order) share: their
//! configuration and flags, their storage (sea-orm over SQLite, MySQL or
//! PostgreSQL), exact money, unique ids, and the one error type they answer
//! with.

pub mod db;
pub mod ids;
pub mod keys;
pub mod metrics;
pub mod money;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::error::Error;
pub use money::Money;

/// The user service's name in the registry.
pub const USER_SERVICE: &str = "server-user";
/// The product service's name in the registry; the order service finds it
/// by this name.
pub const PRODUCT_SERVICE: &str = "server-product";
/// The order service's name in the registry.
pub const ORDER_SERVICE: &str = "server-order";

/// The user service's default port (the `[user]` section's `listen`).
pub const USER_PORT: u16 = 8060;
/// The product service's default port (the `[product]` section's `listen`).
pub const PRODUCT_PORT: u16 = 8070;
/// The order service's default port (the `[order]` section's `listen`).
pub const ORDER_PORT: u16 = 8080;

/// The `[user]`, `[product]` and `[order]` configuration sections: where a
/// shop service listens and what it stores in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Where the service's gRPC server listens; 0.0.0.0 on the role's
    /// default port unless set. Registered as-is unless `advertise` says
    /// otherwise.
    pub listen: SocketAddr,
    /// `host:port` to register instead of the bound address (behind NAT,
    /// in a container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Holds the SQLite file when no database URL is given.
    pub data_dir: PathBuf,
    /// `sqlite://FILE?mode=rwc`, `mysql://USER:PASS@HOST/DB` or
    /// `postgres://USER:PASS@HOST/DB`; by default a SQLite file under
    /// `data_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Load the seed's rows into empty tables on start.
    pub seed_data: bool,
    /// Connections in the pool.
    pub max_connections: u32,
    /// Where `/metrics` is served instead of `listen`'s port (over plain
    /// HTTP/1.1, for an address only Prometheus reaches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
}

impl ServiceConfig {
    /// The defaults of the role `name` on `port`: `data/<name>`.
    pub fn for_role(name: &str, port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], port)),
            advertise: None,
            data_dir: PathBuf::from("data").join(name),
            database_url: None,
            seed_data: true,
            max_connections: 8,
            metrics_listen: None,
        }
    }

    /// How the service registered as `name` presents itself: at the
    /// address it advertises, if any.
    pub fn announce(&self, name: &str) -> crate::discovery::Announce {
        let mut announce = crate::discovery::Announce::new(name);
        announce.advertise = self.advertise.clone();
        announce
    }
}

/// The `[shop]` section: the rules of the order flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    /// The largest count one order may ask for.
    pub max_order_count: u32,
    /// How long an order instance's id worker lease lasts unrenewed; it is
    /// renewed at a third of that, and ids stop before it runs out.
    #[serde(with = "humantime_serde")]
    pub id_lease: Duration,
    /// An order still being placed after this long is taken to have died
    /// with its instance, and its stock deduction is restored.
    #[serde(with = "humantime_serde")]
    pub pending_timeout: Duration,
    /// How often an order instance looks for such orders.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            max_order_count: 10_000,
            id_lease: Duration::from_secs(30),
            pending_timeout: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(10),
        }
    }
}

/// The flags every shop service takes; each overrides its configuration key.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceArgs {
    /// Registry addresses, tried in turn: a,b,c [config: discovery.registry].
    #[arg(long)]
    pub registry: Option<String>,
    /// Address to listen on [config: <role>.listen].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// host:port to register instead of the bound address [config: <role>.advertise].
    #[arg(long)]
    pub advertise: Option<String>,
    /// Where the SQLite file lives [config: <role>.data_dir].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// sqlite://, mysql:// or postgres:// URL [config: <role>.database_url].
    #[arg(long)]
    pub database_url: Option<String>,
    /// Do not load the seed's rows into empty tables [config: <role>.seed_data].
    #[arg(long)]
    pub no_seed_data: bool,
    /// Serve /metrics on this address instead of --listen's port
    /// [config: <role>.metrics_listen].
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
}

impl ServiceArgs {
    /// Lays the flags that were given over the `[discovery]` section and
    /// the role's own; absent flags leave them as they are.
    pub fn apply(&self, discovery: &mut crate::discovery::Config, service: &mut ServiceConfig) {
        if let Some(registry) = &self.registry {
            discovery.registry = registry.clone();
        }
        if let Some(listen) = self.listen {
            service.listen = listen;
        }
        if let Some(advertise) = &self.advertise {
            service.advertise = Some(advertise.clone());
        }
        if let Some(dir) = &self.data_dir {
            service.data_dir = dir.clone();
        }
        if let Some(url) = &self.database_url {
            service.database_url = Some(url.clone());
        }
        if let Some(listen) = self.metrics_listen {
            service.metrics_listen = Some(listen);
        }
        if self.no_seed_data {
            service.seed_data = false;
        }
    }
}

/// Checks a request id: 1 to `max` printable characters.
pub fn parse_request_id(field: &str, value: &str, max: usize) -> Result<String, Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.chars().count() > max {
        return Err(Error::invalid(
            field,
            format!("is longer than {max} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "holds a control character"));
    }
    Ok(value.to_owned())
}

/// Checks an id field: a positive number.
pub fn parse_id(field: &str, value: i64) -> Result<i64, Error> {
    if value <= 0 {
        return Err(Error::invalid(
            field,
            format!("must be a positive id, got {value}"),
        ));
    }
    Ok(value)
}

/// A page size: 0 means the default (100), at most 1000.
pub fn page_size(value: i32) -> Result<u64, Error> {
    match value {
        0 => Ok(100),
        1..=1000 => Ok(value as u64),
        _ => Err(Error::invalid(
            "page_size",
            format!("must be between 0 and 1000, got {value}"),
        )),
    }
}

/// A page token: empty, or the id the last page ended at.
pub fn page_token(value: &str) -> Result<Option<i64>, Error> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .map(Some)
        .ok_or_else(|| {
            Error::invalid(
                "page_token",
                "is not a token this service gave; start again without one",
            )
        })
}

/// Serves a shop role's `routes` (health and reflection, plus what `add`
/// adds: the role's service, named `grpc_service`) on `listener`,
/// registered as the role's service, counting its calls into `metrics`
/// and serving them as its section says, until `shutdown`.
pub async fn serve(
    (config, role): (&crate::config::Config, crate::roles::ShopRole),
    metrics: &crate::telemetry::Metrics,
    grpc_service: &str,
    listener: tokio::net::TcpListener,
    add: impl FnOnce(tonic::service::Routes) -> tonic::service::Routes,
    shutdown: crate::shutdown::Shutdown,
) -> anyhow::Result<()> {
    let section = role.config(config);
    let mut server = crate::server::Server::new(shutdown.clone(), &config.connections).await?;
    server.measure(metrics, section.metrics_listen);
    let routes = add(server.routes(&[grpc_service]));
    let announce = section.announce(role.service());
    crate::discovery::serve(
        &server,
        routes,
        listener,
        announce,
        &config.discovery,
        shutdown,
    )
    .await
}
