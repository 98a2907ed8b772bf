//! `shop-mesh up`: the whole system on one machine, for a first look. The
//! registry and the three services run in this one process, but each
//! service has its own listener and its own database and registers
//! through the registry's gRPC API exactly as a separate process would;
//! the order service finds the others by name. Ctrl-C stops the services
//! first (each deregisters and drains), then the registry.
//!
//! With `--registries N --store etcd` the registry is N nodes over one
//! etcd cluster, each on a listener of its own, and every service is
//! given all N addresses.

pub mod credentials;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use crate::discovery::Mesh;
use crate::registry::StoreKind;
use crate::roles::{ShopRole, Spawned};
use crate::server::bind;
use crate::shop::{ORDER_SERVICE, PRODUCT_SERVICE, USER_SERVICE};
use crate::shutdown::Shutdown;

/// How long the services may take to start and register.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `shop-mesh up` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Instances of the user and of the product service, on the ports
    /// after their first (8061, 8071, ...), or the next free ones.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub replicas: u16,
    /// Registry nodes, on registry.listen's port and the next free ones;
    /// more than one needs `--store etcd`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub registries: u16,
    /// Where the registry's state lives [config: registry.store].
    #[arg(long, value_enum)]
    pub store: Option<StoreKind>,
    /// The etcd cluster's client endpoints, a,b,c
    /// [config: registry.etcd.endpoints].
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// Where the registry and the services keep their data (SQLite files).
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    /// The address every role listens on and registers.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Log at info level (up logs warnings only, so its summary stays
    /// readable; RUST_LOG wins over both).
    #[arg(long)]
    pub verbose: bool,
    /// Mutual TLS on every port, with a development CA and certificate
    /// made under <data-dir>/tls on the first run (as `shop-mesh cert`
    /// makes them) and reused after.
    #[arg(long)]
    pub tls: bool,
}

impl Args {
    /// Points every role's data under `data_dir`, on `host`, at the
    /// registry this process runs.
    pub fn apply(&self, config: &mut Config) {
        config.registry.data_dir = self.data_dir.join("registry");
        config.registry.listen.set_ip(self.host);
        if let Some(store) = self.store {
            config.registry.store = store;
        }
        if let Some(endpoints) = &self.etcd_endpoints {
            config.registry.etcd.endpoints = endpoints.clone();
        }
        config.discovery.registry = config.registry.listen.to_string();
        for (role, service) in [
            ("user", &mut config.user),
            ("product", &mut config.product),
            ("order", &mut config.order),
        ] {
            service.data_dir = self.data_dir.join(role);
            service.listen.set_ip(self.host);
            service.advertise = None;
        }
    }
}

/// One role a [`Stack`] runs, as its summary shows it.
#[derive(Debug, Clone)]
pub struct Running {
    /// The role's name on the command line.
    pub role: &'static str,
    /// Its registry name; empty for the registry.
    pub service: &'static str,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where it stores: a file, or a database URL without its password.
    pub store: String,
}

/// The registry and every service, running in this process: what `up`
/// shows a newcomer, and what `bench orders` measures.
pub struct Stack {
    /// What runs where, the registry nodes first.
    pub running: Vec<Running>,
    /// Cancelled while the services start: stop waiting for them.
    shutdown: Shutdown,
    registries: Vec<Spawned>,
    services: Vec<Spawned>,
    /// How a caller finds the services: every registry node, and (when
    /// the registry checks credentials) the read-only token up made.
    discovery: crate::discovery::Config,
    /// Where that token is kept, for the shell.
    reader_file: Option<PathBuf>,
}

impl Stack {
    /// Starts the registry on `config.registry.listen`, then `replicas`
    /// user and product instances and one order instance, and waits until
    /// all are registered (or `shutdown` fires).
    pub async fn start(
        config: &Config,
        replicas: u16,
        shutdown: Shutdown,
    ) -> anyhow::Result<Stack> {
        Self::start_cluster(config, 1, replicas, shutdown).await
    }

    /// [`Stack::start`] with `registries` registry nodes, the first on
    /// `config.registry.listen`, the others on the next free ports; more
    /// than one needs the etcd store (`config.registry.store`). Every
    /// service is given every node's address.
    pub async fn start_cluster(
        config: &Config,
        registries: u16,
        replicas: u16,
        shutdown: Shutdown,
    ) -> anyhow::Result<Stack> {
        anyhow::ensure!(registries >= 1, "at least one registry node is needed");
        anyhow::ensure!(
            registries == 1 || config.registry.store == StoreKind::Etcd,
            "{registries} registry nodes need a shared store: add --store etcd --etcd-endpoints \
             a,b,c (with the memory store there is one registry)"
        );
        let mut stack = Stack {
            running: Vec::new(),
            shutdown,
            registries: Vec::new(),
            services: Vec::new(),
            discovery: config.discovery.clone(),
            reader_file: None,
        };
        let store = match config.registry.store {
            StoreKind::Memory => config.registry.data_dir.display().to_string(),
            StoreKind::Etcd => format!(
                "etcd {} {}",
                config.registry.etcd.endpoints.join(","),
                config.registry.etcd.prefix
            ),
        };
        let mut next_port = config.registry.listen.port();
        for node in 0..registries {
            let first = SocketAddr::new(config.registry.listen.ip(), next_port);
            let listener = match bind(first, "the registry", (node > 0).then_some(64)).await {
                Ok(listener) => listener,
                Err(err) => return Err(stack.stop(Err(err)).await.unwrap_err()),
            };
            let registry = Spawned::registry(
                &config.registry,
                (&config.connections, &config.telemetry),
                listener,
            )?;
            // Port 0 (tests, benches) stays 0: each node gets its own.
            if next_port != 0 {
                next_port = registry.addr.port().saturating_add(1);
            }
            stack.running.push(Running {
                role: "registry",
                service: "",
                addr: registry.addr,
                store: store.clone(),
            });
            stack.registries.push(registry);
        }
        let mut config = config.clone();
        config.discovery.registry = stack
            .registries
            .iter()
            .map(|r| r.addr.to_string())
            .collect::<Vec<_>>()
            .join(",");
        stack.discovery.registry = config.discovery.registry.clone();
        let mut tokens = Vec::new();
        if config.registry.auth.enabled {
            let cli_dir = config
                .registry
                .data_dir
                .parent()
                .unwrap_or(&config.registry.data_dir)
                .to_path_buf();
            let services = [
                (USER_SERVICE, config.user.data_dir.clone()),
                (PRODUCT_SERVICE, config.product.data_dir.clone()),
                (ORDER_SERVICE, config.order.data_dir.clone()),
            ];
            let handing = credentials::hand_out(
                &config.discovery,
                &config.connections,
                &config.registry.data_dir,
                &services,
                &cli_dir,
            );
            // A registry that fails to start says why, rather than the
            // token it never wrote.
            let handed = tokio::select! {
                handed = handing => handed,
                err = stack.ended() => Err(err),
            };
            let handed = match handed {
                Ok(handed) => handed,
                Err(err) => return Err(stack.stop(Err(err)).await.unwrap_err()),
            };
            stack.discovery.token = handed.reader.0;
            stack.discovery.token_file = PathBuf::new();
            stack.reader_file = Some(handed.reader.1);
            tokens = handed.services;
        }
        match stack.spawn_services(&config, replicas, &tokens).await {
            Ok(()) => Ok(stack),
            Err(err) => Err(stack.stop(Err(err)).await.unwrap_err()),
        }
    }

    /// Where the (first) registry node listens.
    pub fn registry(&self) -> SocketAddr {
        self.registries[0].addr
    }

    /// How a caller of the services finds them: every registry node, and
    /// a read-only token when the registry checks credentials.
    pub fn discovery(&self) -> &crate::discovery::Config {
        &self.discovery
    }

    /// Where every registry node listens, the first first.
    pub fn registries(&self) -> Vec<SocketAddr> {
        self.registries.iter().map(|r| r.addr).collect()
    }

    /// Starts the services, each showing its token from `tokens` (by
    /// service name), when it has one.
    async fn spawn_services(
        &mut self,
        config: &Config,
        replicas: u16,
        tokens: &[(&'static str, crate::auth::Secret)],
    ) -> anyhow::Result<()> {
        let plan = [
            (ShopRole::User, replicas),
            (ShopRole::Product, replicas),
            (ShopRole::Order, 1),
        ];
        for (shop_role, count) in plan {
            let mut role_config = config.clone();
            if let Some((_, token)) = tokens.iter().find(|(s, _)| *s == shop_role.service()) {
                role_config.discovery.token = token.clone();
                role_config.discovery.token_file = PathBuf::new();
            }
            let config = &role_config;
            let service_config = shop_role.config(config);
            let mut next_port = service_config.listen.port();
            for replica in 0..count {
                let first = SocketAddr::new(service_config.listen.ip(), next_port);
                let listener = bind(first, shop_role.name(), (replica > 0).then_some(64)).await?;
                let spawned = Spawned::shop(shop_role, config, listener)?;
                // Port 0 (tests, benches) stays 0: each replica gets its own.
                if next_port != 0 {
                    next_port = spawned.addr.port().saturating_add(1);
                }
                self.running.push(Running {
                    role: shop_role.name(),
                    service: shop_role.service(),
                    addr: spawned.addr,
                    store: match &service_config.database_url {
                        Some(url) => crate::shop::db::redact(url),
                        None => service_config
                            .data_dir
                            .join(format!("{}.db", shop_role.name()))
                            .display()
                            .to_string(),
                    },
                });
                self.services.push(spawned);
            }
        }
        let shutdown = self.shutdown.clone();
        let mut watching = config.clone();
        watching.discovery = self.discovery.clone();
        tokio::select! {
            ready = registered(&watching, replicas.into()) => ready,
            err = self.ended() => Err(err),
            _ = shutdown.cancelled() => Ok(()),
        }
    }

    /// Resolves when a role ends on its own (it failed); until then, never.
    pub async fn ended(&mut self) -> anyhow::Error {
        let roles = self.registries.iter_mut().chain(self.services.iter_mut());
        let (ended, _, _) = futures::future::select_all(roles.map(|role| {
            Box::pin(async move {
                let name = role.name;
                let addr = role.addr;
                role.exited()
                    .await
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("the {name} at {addr} stopped"))
            })
        }))
        .await;
        ended
    }

    /// Stops the services (each deregisters and drains), then the
    /// registry; `result` is what ended the run, and wins over later errors.
    pub async fn stop(self, result: anyhow::Result<()>) -> anyhow::Result<()> {
        for service in &self.services {
            service.shutdown.cancel();
        }
        let mut result = result;
        for service in self.services {
            if let Err(err) = service.stop().await {
                tracing::error!("stopped with an error: {err:#}");
                if result.is_ok() {
                    result = Err(err);
                }
            }
        }
        for registry in self.registries {
            if let Err(err) = registry.stop().await
                && result.is_ok()
            {
                result = Err(err);
            }
        }
        result
    }
}

/// Runs everything until `shutdown`; prints what runs where once all of
/// it is registered.
pub async fn run(config: &Config, args: &Args, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut config = config.clone();
    if args.tls {
        let dir = args.data_dir.join("tls");
        let made = crate::cert::Made::in_dir(&dir);
        let made = if made.exist() {
            made
        } else if made.ca.exists() {
            anyhow::bail!(
                "{} holds a CA but not all of its files (an earlier run stopped while making them); delete the directory and run up --tls again",
                dir.display()
            );
        } else {
            crate::cert::make(&dir, &[args.host.to_string()])?
        };
        config.connections.tls = made.settings();
    }
    let config = &config;
    let mut stack =
        Stack::start_cluster(config, args.registries, args.replicas, shutdown.clone()).await?;
    if shutdown.is_cancelled() {
        return stack.stop(Ok(())).await;
    }
    let mut out = std::io::stdout().lock();
    write!(
        out,
        "{}",
        summary(
            &stack.running,
            &args.data_dir,
            stack.reader_file.as_deref(),
            &config.connections.tls,
            &format!(
                "{}{}",
                console_line(config, &stack.running),
                nacos_line(config, &stack.running)
            ),
        )
    )?;
    out.flush()?;
    drop(out);
    let result = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        err = stack.ended() => Err(err),
    };
    stack.stop(result).await
}

/// Where the console is and how to log in; nothing when it is off.
fn console_line(config: &Config, running: &[Running]) -> String {
    let console = &config.registry.console;
    let Some(registry) = running.iter().find(|r| r.role == "registry") else {
        return String::new();
    };
    if !console.enabled {
        return String::new();
    }
    let scheme = if config.connections.tls.serves() {
        "https"
    } else {
        "http"
    };
    let file = config
        .registry
        .data_dir
        .join(crate::registry::console::INITIAL_PASSWORD_FILE);
    let password = if console.password.is_set() {
        "the password registry.console.password sets".to_string()
    } else if file.exists() {
        format!("the password in {}", file.display())
    } else {
        "the password you set in it".to_string()
    };
    format!(
        "The console: {scheme}://{}/ (log in as {} with {password}).\n\n",
        registry.addr,
        crate::registry::console::USER
    )
}

/// Where Nacos's clients point; nothing when Nacos's protocols are off.
fn nacos_line(config: &Config, running: &[Running]) -> String {
    let nacos = &config.registry.nacos;
    let Some(registry) = running.iter().find(|r| r.role == "registry") else {
        return String::new();
    };
    if !nacos.enabled {
        return String::new();
    }
    let grpc = nacos
        .grpc_addr(registry.addr)
        .map_or_else(|err| format!("nowhere ({err})"), |addr| addr.to_string());
    let token = if config.registry.auth.enabled {
        " (with a shop-mesh token as the password)"
    } else {
        ""
    };
    format!(
        "Nacos clients: server address {}{token}; the 1.x HTTP API is there, \
         the 2.x gRPC API on {grpc}.\n\n",
        registry.addr
    )
}

/// Waits until every service is registered and healthy, as a caller sees
/// it through a watch.
async fn registered(config: &Config, replicas: usize) -> anyhow::Result<()> {
    let mesh = Mesh::new(&config.discovery, &config.connections)?;
    let all = async {
        for (service, count) in [
            (USER_SERVICE, replicas),
            (PRODUCT_SERVICE, replicas),
            (ORDER_SERVICE, 1),
        ] {
            mesh.channel(service)
                .wait_for(|endpoints| endpoints.len() >= count)
                .await;
        }
    };
    tokio::time::timeout(START_TIMEOUT, all)
        .await
        .map_err(|_| anyhow::anyhow!("the services did not all register within {START_TIMEOUT:?}"))
}

fn summary(
    running: &[Running],
    data_dir: &std::path::Path,
    reader_file: Option<&std::path::Path>,
    tls: &crate::server::Tls,
    console: &str,
) -> String {
    let rows: Vec<Vec<String>> = running
        .iter()
        .map(|r| {
            vec![
                r.role.to_string(),
                if r.service.is_empty() { "-" } else { r.service }.to_string(),
                r.addr.to_string(),
                r.store.clone(),
            ]
        })
        .collect();
    let registries: Vec<SocketAddr> = running
        .iter()
        .filter(|r| r.role == "registry")
        .map(|r| r.addr)
        .collect();
    let registry = registries[0];
    let order = running
        .iter()
        .find(|r| r.role == "order")
        .map_or(registry, |r| r.addr);
    let registry_flag = if registries.len() == 1
        && registry.port() == crate::registry::DEFAULT_PORT
        && registry.ip().is_loopback()
    {
        String::new()
    } else {
        let all: Vec<String> = registries.iter().map(ToString::to_string).collect();
        format!(" --registry {}", all.join(","))
    };
    let nodes = match (registries.len(), running[0].store.starts_with("etcd ")) {
        (1, false) => "a registry".to_string(),
        (1, true) => "a registry node on etcd".to_string(),
        (n, _) => format!("{n} registry nodes on etcd"),
    };
    let (exports, grpcurl) = if tls.serves() {
        (
            format!(
                "\x20 export {}\n",
                tls.env()
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            format!(
                "-cacert {} -cert {} -key {}",
                tls.ca.display(),
                tls.cert.display(),
                tls.key.display()
            ),
        )
    } else {
        (String::new(), "-plaintext".to_string())
    };
    let credentials = match reader_file {
        Some(file) => format!(
            "The registry checks credentials: each service was given a token that may register \
             it alone, and the shell a read-only one. The admin token, which makes more \
             (shop-mesh token create --token-file ...), is in {}.\n\n\
             Try (the exports let this shell read the registry):\n\
             \x20 export SHOP_MESH__DISCOVERY__TOKEN_FILE={}\n{exports}",
            data_dir
                .join("registry")
                .join(crate::registry::ADMIN_TOKEN_FILE)
                .display(),
            file.display()
        ),
        None => format!("Try:\n{exports}"),
    };
    format!(
        "shop-mesh is up: {nodes} and {} service instances, on SQLite under {}\n\n{}\n\
         {credentials}\
         \x20 shop-mesh order place --user 1001 --product 1001 --count 10{registry_flag}\n\
         \x20 shop-mesh product get 1001{registry_flag}\n\
         \x20 grpcurl {grpcurl} -d '{{\"user_id\":1001}}' {order} shopmesh.shop.v1.OrderService/ListOrders\n\n\
         {console}\
         Ctrl-C stops everything.\n",
        running.len() - registries.len(),
        data_dir.display(),
        crate::inspect::table(&["ROLE", "SERVICE", "ADDRESS", "STORE"], &rows),
    )
}
