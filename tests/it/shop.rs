//! The shop on each database: a registry, the user, product and order
//! roles in-process on port 0, and a private database per test (a temp dir
//! of SQLite files, or a fresh MariaDB or PostgreSQL database that is
//! dropped at the end).

mod ids;
mod migrations;
mod open;
mod orders;
mod products;

use std::time::Duration;

use sea_orm::{DatabaseConnection, EntityTrait, PaginatorTrait};
use shop_mesh::config::Config;
use shop_mesh::discovery::{BalancedChannel, Mesh};
use shop_mesh::pb::shop::order_service_client::OrderServiceClient;
use shop_mesh::pb::shop::product_service_client::ProductServiceClient;
use shop_mesh::roles::{ShopRole, Spawned};
use shop_mesh::shop::{ORDER_SERVICE, PRODUCT_SERVICE, ServiceConfig, USER_SERVICE};

use crate::TestRegistry;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MySql,
    Postgres,
}

/// A test for each database: `backend_tests!(name)` runs `name(Backend)`
/// as `name::sqlite`, `name::mysql` and `name::postgres`.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::super::Backend;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(Backend::Sqlite, concat!(stringify!($name), "_sqlite")).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                super::$name(Backend::MySql, concat!(stringify!($name), "_mysql")).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(Backend::Postgres, concat!(stringify!($name), "_postgres")).await
            }
        }
    )*};
}
pub(crate) use backend_tests;

/// A private database for one test.
pub struct TestDb {
    dir: tempfile::TempDir,
    /// MySQL and PostgreSQL: one fresh database that all roles share, as
    /// the seed's services share one schema; its admin URL and name.
    server: Option<(String, String, String)>,
}

impl TestDb {
    /// A fresh database, or None (with a SKIPPED line saying why) when the
    /// server is not reachable outside CI. In CI every backend must run.
    pub async fn create(backend: Backend, test: &str) -> Option<TestDb> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (admin, label, env) = match backend {
            Backend::Sqlite => {
                return Some(TestDb { dir, server: None });
            }
            Backend::MySql => (
                std::env::var("SHOP_MESH_TEST_MYSQL_URL")
                    .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into()),
                "MariaDB/MySQL",
                "SHOP_MESH_TEST_MYSQL_URL",
            ),
            Backend::Postgres => (
                std::env::var("SHOP_MESH_TEST_POSTGRES_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
                "PostgreSQL",
                "SHOP_MESH_TEST_POSTGRES_URL",
            ),
        };
        match reach(&admin).await {
            Ok(()) => {}
            Err(err) if std::env::var_os("CI").is_none() => {
                crate::skipped(&format!(
                    "{test}: {label} at {admin} is not reachable ({err}); start it or point {env} at one"
                ));
                return None;
            }
            Err(err) => panic!("{label} at {admin} must be reachable in CI: {err}"),
        };
        // Both servers allow 63 characters in a name.
        let short: String = test.chars().take(40).collect();
        let name = format!("sm_{short}_{:08x}", rand::random::<u32>());
        let url = shop_mesh::shop::db::create_database(&admin, &name)
            .await
            .unwrap_or_else(|err| panic!("create database {name}: {err}"));
        Some(TestDb {
            dir,
            server: Some((admin, name, url)),
        })
    }

    /// A role's configuration: port 0 on loopback, this test's database.
    pub fn service(&self, role: &str) -> ServiceConfig {
        let mut config = ServiceConfig::for_role(role, 0);
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.data_dir = self.dir.path().join(role);
        config.database_url = self.server.as_ref().map(|(_, _, url)| url.clone());
        config
    }

    /// A connection of the test's own to what `role` stores in.
    pub async fn connect(&self, role: &str) -> DatabaseConnection {
        let url = shop_mesh::shop::db::url(&self.service(role), role);
        shop_mesh::shop::db::connect(&url, 2)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
    }
}

/// Whether the server answers: a plain TCP connect first, so that one not
/// running is told at once rather than after the pool's timeout.
async fn reach(admin: &str) -> anyhow::Result<()> {
    let host = admin
        .split_once("://")
        .and_then(|(_, rest)| {
            rest.rsplit_once('@')
                .map_or(Some(rest), |(_, host)| Some(host))
        })
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| anyhow::anyhow!("no host in the URL"))?;
    tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(host))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {host} timed out"))??;
    shop_mesh::shop::db::connect(admin, 1)
        .await?
        .close()
        .await?;
    Ok(())
}

impl Drop for TestDb {
    /// Drops a server database, also when the test failed; a SQLite dir
    /// goes with its TempDir.
    fn drop(&mut self) {
        let Some((admin, name, _)) = self.server.take() else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot block on
        // itself: the statement runs on a thread with a runtime of its own.
        let dropped = std::thread::spawn({
            let name = name.clone();
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(shop_mesh::shop::db::drop_database(&admin, &name))?;
                anyhow::Ok(())
            }
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: dropping the test database {name} failed");
        }
    }
}

/// A registry, one user, `products` product and `orders` order instances.
pub struct TestShop {
    pub db: TestDb,
    pub config: Config,
    pub mesh: Mesh,
    pub registry: TestRegistry,
    roles: Vec<(ShopRole, Spawned)>,
}

impl TestShop {
    pub async fn start(
        backend: Backend,
        test: &str,
        products: usize,
        orders: usize,
    ) -> Option<TestShop> {
        Self::start_with(backend, test, products, orders, |_| {}).await
    }

    /// [`TestShop::start`] with the configuration adjusted first.
    pub async fn start_with(
        backend: Backend,
        test: &str,
        products: usize,
        orders: usize,
        adjust: impl FnOnce(&mut Config),
    ) -> Option<TestShop> {
        Self::start_beside(
            TestRegistry::start().await,
            backend,
            test,
            products,
            orders,
            adjust,
        )
        .await
    }

    /// [`TestShop::start_with`] on `registry`, one the test started.
    pub async fn start_beside(
        registry: TestRegistry,
        backend: Backend,
        test: &str,
        products: usize,
        orders: usize,
        adjust: impl FnOnce(&mut Config),
    ) -> Option<TestShop> {
        let db = TestDb::create(backend, test).await?;
        let mut config = Config::default();
        config.discovery.registry = registry.addr.to_string();
        config.user = db.service("user");
        config.product = db.service("product");
        config.order = db.service("order");
        adjust(&mut config);
        let mesh = Mesh::new(&config.discovery, &config.connections).expect("mesh");
        let mut shop = TestShop {
            db,
            config,
            mesh,
            registry,
            roles: Vec::new(),
        };
        shop.spawn(ShopRole::User).await;
        for _ in 0..products {
            shop.spawn(ShopRole::Product).await;
        }
        for _ in 0..orders {
            shop.spawn(ShopRole::Order).await;
        }
        for (service, count) in [
            (USER_SERVICE, 1),
            (PRODUCT_SERVICE, products),
            (ORDER_SERVICE, orders),
        ] {
            let channel = shop.mesh.channel(service);
            let ready = channel.wait_for(|endpoints| endpoints.len() == count);
            if tokio::time::timeout(Duration::from_secs(30), ready)
                .await
                .is_err()
            {
                for (role, spawned) in &mut shop.roles {
                    if spawned.is_finished() {
                        let ended = spawned.exited().await;
                        panic!("the {} role stopped: {ended:?}", role.name());
                    }
                }
                panic!("{service} never had {count} instances");
            }
        }
        Some(shop)
    }

    async fn spawn(&mut self, role: ShopRole) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let spawned = Spawned::shop(role, &self.config, listener).unwrap();
        self.roles.push((role, spawned));
    }

    /// Where the first instance of `role` serves.
    pub fn addr(&self, role: ShopRole) -> std::net::SocketAddr {
        let (_, spawned) = self
            .roles
            .iter()
            .find(|(running, _)| *running == role)
            .expect("an instance of the role");
        spawned.addr
    }

    /// Where every instance of `role` serves, in the order they started.
    pub fn addrs(&self, role: ShopRole) -> Vec<std::net::SocketAddr> {
        self.roles
            .iter()
            .filter(|(running, _)| *running == role)
            .map(|(_, spawned)| spawned.addr)
            .collect()
    }

    /// PlaceOrder and friends, through the registry like any caller.
    pub fn orders(&self) -> OrderServiceClient<BalancedChannel> {
        OrderServiceClient::new(self.mesh.channel(ORDER_SERVICE))
    }

    pub fn products(&self) -> ProductServiceClient<BalancedChannel> {
        ProductServiceClient::new(self.mesh.channel(PRODUCT_SERVICE))
    }

    /// The identity the order service shows the product service's stock
    /// calls, from this shop's registry.
    pub async fn order_identity(&self) -> String {
        let mut registry = self.registry.client().await;
        registry
            .issue_identity(shop_mesh::pb::registry::IssueIdentityRequest {
                namespace: String::new(),
                service: ORDER_SERVICE.into(),
                audience: PRODUCT_SERVICE.into(),
            })
            .await
            .expect("an identity of the order service")
            .into_inner()
            .identity
    }

    /// Sends the instances of `role` the shutdown SIGTERM would, without
    /// waiting for them to exit.
    pub fn signal(&self, role: ShopRole) {
        for (_, spawned) in self.roles.iter().filter(|(running, _)| *running == role) {
            spawned.shutdown.cancel();
        }
    }

    /// Stops every role as SIGTERM would and checks each exited cleanly.
    pub async fn stop(self) {
        for (_, spawned) in &self.roles {
            spawned.shutdown.cancel();
        }
        for (role, spawned) in self.roles {
            spawned
                .stop()
                .await
                .unwrap_or_else(|err| panic!("the {} role failed: {err:#}", role.name()));
        }
        self.registry.stop().await;
    }
}

/// `message` showing `identity`, as the order service sends a stock call.
pub fn shown<T>(identity: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        shop_mesh::auth::identity::IDENTITY_HEADER,
        identity.parse().expect("an identity is ASCII"),
    );
    request
}

/// Rows in `E`'s table.
pub async fn rows<E>(db: &DatabaseConnection, _table: E) -> u64
where
    E: EntityTrait,
    E::Model: Sync,
{
    E::find().count(db).await.expect("count rows")
}
