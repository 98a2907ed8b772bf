//! The shop as separate processes of the real binary: a registry (or
//! three registry nodes over a 3-member etcd cluster) on loopback, each
//! restarted where its clients look, then user, two products and two
//! orders on port 0, addresses read from their JSON logs ([`Process`]).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::harness::{EtcdCluster, Process};
use crate::registry::StoreKind;

/// Timings short enough that a fault and its recovery fit in seconds.
const ENV: &[(&str, &str)] = &[
    ("SHOP_MESH__REGISTRY__HEARTBEAT_INTERVAL", "1s"),
    ("SHOP_MESH__REGISTRY__MIN_HEARTBEAT_INTERVAL", "500ms"),
    ("SHOP_MESH__REGISTRY__UNHEALTHY_TIMEOUT", "3s"),
    ("SHOP_MESH__REGISTRY__DELETE_TIMEOUT", "6s"),
    ("SHOP_MESH__DISCOVERY__CALL_TIMEOUT", "2s"),
    ("SHOP_MESH__SHOP__PENDING_TIMEOUT", "4s"),
    ("SHOP_MESH__SHOP__SWEEP_INTERVAL", "500ms"),
];

/// Registry (or registry nodes), user, two products, two orders.
pub struct Deployment {
    /// The binary every process runs, and restarts with.
    pub bin: PathBuf,
    /// Where the processes keep their data, one folder a role.
    pub dir: PathBuf,
    /// The shared database, or None for SQLite files under `dir`.
    pub database_url: Option<String>,
    /// The registry, or the three registry nodes of a cluster.
    pub registries: Vec<Process>,
    /// The etcd cluster the registry nodes keep their state in, when they
    /// are a cluster.
    pub etcd: Option<EtcdCluster>,
    /// The one user service.
    pub user: Process,
    /// Two product services, so one can die while the other serves.
    pub products: Vec<Process>,
    /// Two order services, for the same reason.
    pub orders: Vec<Process>,
    /// The read-only token's file, for the load and the checks.
    pub reader: PathBuf,
    /// How the load and the checks connect: with the run's certificate
    /// under mutual TLS, when the deployment runs on it.
    pub connections: crate::server::Connections,
}

impl Deployment {
    /// Starts every process of `bin`, data under `dir`, on SQLite there or
    /// on `database_url`, and waits until each says where it listens. On
    /// the etcd store, a 3-member etcd cluster and three registry nodes
    /// over it come first.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        database_url: Option<&str>,
        store: StoreKind,
        tls: bool,
    ) -> anyhow::Result<Deployment> {
        let mut connections = crate::server::Connections::default();
        let mut env: Vec<(String, String)> = ENV
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        if tls {
            let made = crate::cert::make(&dir.join("tls"), &[])?;
            connections.tls = made.settings();
            env.extend(connections.tls.env());
        }
        let env_refs: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let env_refs = env_refs.as_slice();
        let (etcd, registries) = match store {
            StoreKind::Memory => (None, vec![registry(bin, dir, 0, &[], env_refs).await?]),
            StoreKind::Etcd => {
                let etcd = EtcdCluster::start(3).await?.context(
                    "the etcd store's scenarios need etcd (apt-get install etcd-server)",
                )?;
                let cluster = [
                    "--store".to_string(),
                    "etcd".into(),
                    "--etcd-endpoints".into(),
                    etcd.endpoints().join(","),
                ];
                let mut nodes = Vec::new();
                for node in 0..3 {
                    nodes.push(registry(bin, dir, node, &cluster, env_refs).await?);
                }
                (Some(etcd), nodes)
            }
        };
        let registry_addr = registries
            .iter()
            .map(|r| r.addr.clone())
            .collect::<Vec<_>>()
            .join(",");
        // The registry checks credentials, as it does by default: each
        // service gets a token of its own, as `up` hands them out, made
        // with the admin token the first node wrote.
        let mut discovery = crate::discovery::Config {
            registry: registry_addr.clone(),
            ..Default::default()
        };
        let services = [
            (crate::shop::USER_SERVICE, dir.join("user")),
            (crate::shop::PRODUCT_SERVICE, dir.join("product")),
            (crate::shop::ORDER_SERVICE, dir.join("order")),
        ];
        let handed = crate::up::credentials::hand_out(
            &discovery,
            &connections,
            &dir.join("registry-0"),
            &services,
            dir,
        )
        .await?;
        discovery.token_file = handed.reader.1.clone();
        let env = |role: &str| {
            let token = dir
                .join(role)
                .join(crate::up::credentials::SERVICE_TOKEN_FILE);
            let mut env = env.clone();
            env.push((
                "SHOP_MESH__DISCOVERY__TOKEN_FILE".into(),
                token.display().to_string(),
            ));
            env
        };
        let service = |role: &'static str| {
            let mut args = vec![
                role.to_string(),
                "--registry".into(),
                registry_addr.clone(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                dir.join(role).display().to_string(),
            ];
            if let Some(url) = database_url {
                args.extend(["--database-url".into(), url.to_string()]);
            }
            args
        };
        // One at a time: instances of one service sharing a database
        // migrate it once.
        let start = |role: &'static str| {
            let env = env(role);
            let args = service(role);
            async move {
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Process::start(bin, role, args, &env).await
            }
        };
        let user = start("user").await?;
        let mut products = Vec::new();
        for _ in 0..2 {
            products.push(start("product").await?);
        }
        let mut orders = Vec::new();
        for _ in 0..2 {
            orders.push(start("order").await?);
        }
        Ok(Deployment {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            database_url: database_url.map(str::to_owned),
            registries,
            etcd,
            user,
            products,
            orders,
            reader: discovery.token_file,
            connections,
        })
    }

    /// How a caller finds the services: every registry node, with the
    /// read-only token.
    pub fn discovery(&self) -> crate::discovery::Config {
        crate::discovery::Config {
            registry: self.registry_addr(),
            token_file: self.reader.clone(),
            ..Default::default()
        }
    }

    /// Where the services find the registry: every node, a,b,c.
    pub fn registry_addr(&self) -> String {
        self.registries
            .iter()
            .map(|r| r.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The database URL a role stores in.
    pub fn url(&self, role: &str) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.dir.join(role).join(format!("{role}.db")).display()
            ),
        }
    }

    /// SIGTERM to everything, services first; their exit codes.
    pub async fn stop(mut self) -> anyhow::Result<Vec<(&'static str, Option<i32>)>> {
        let mut codes = Vec::new();
        for process in self.orders.iter_mut().chain(self.products.iter_mut()) {
            codes.push((process.role, process.terminate().await?));
        }
        codes.push(("user", self.user.terminate().await?));
        for registry in &mut self.registries {
            codes.push(("registry", registry.terminate().await?));
        }
        Ok(codes)
    }
}

/// A registry (node `node` of a cluster, with `extra` flags) on loopback
/// port 0; a restart comes back on the port it got.
async fn registry(
    bin: &Path,
    dir: &Path,
    node: usize,
    extra: &[String],
    env: &[(&str, &str)],
) -> anyhow::Result<Process> {
    let mut args = vec![
        "registry".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join(format!("registry-{node}")).display().to_string(),
    ];
    args.extend(extra.iter().cloned());
    Process::start(bin, "registry", args, env).await
}
