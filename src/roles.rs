//! The roles as the process runs them: the shop's three as one type (how
//! each is named, which section of the configuration it reads, how it
//! serves), and [`Spawned`], the one way a role is started inside this
//! process, whoever starts it (`up`, the benchmarks, the tests). The command
//! line starts the same `run` functions in a process of their own.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::server::Connections;
use crate::shop::{ORDER_SERVICE, PRODUCT_SERVICE, ServiceConfig, USER_SERVICE};
use crate::shutdown::Shutdown;

/// One of the seed's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShopRole {
    /// `server-user`: users by id.
    User,
    /// `server-product`: products and their stock.
    Product,
    /// `server-order`: places orders through the other two.
    Order,
}

impl ShopRole {
    /// Its name on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            ShopRole::User => "user",
            ShopRole::Product => "product",
            ShopRole::Order => "order",
        }
    }

    /// The service name it registers under.
    pub fn service(self) -> &'static str {
        match self {
            ShopRole::User => USER_SERVICE,
            ShopRole::Product => PRODUCT_SERVICE,
            ShopRole::Order => ORDER_SERVICE,
        }
    }

    /// Its section of the configuration.
    pub fn config(self, config: &Config) -> &ServiceConfig {
        match self {
            ShopRole::User => &config.user,
            ShopRole::Product => &config.product,
            ShopRole::Order => &config.order,
        }
    }

    /// Serves the role on `listener` until `shutdown`.
    pub async fn run(
        self,
        config: &Config,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        match self {
            ShopRole::User => crate::user::run(config, listener, shutdown).await,
            ShopRole::Product => crate::product::run(config, listener, shutdown).await,
            ShopRole::Order => crate::order::run(config, listener, shutdown).await,
        }
    }
}

/// A role serving in this process on a listener of its own, stopped by a
/// shutdown of its own: the one handle `up` and the tests keep for each
/// role they start, so a role starts the same way whoever starts it.
pub struct Spawned {
    /// The role's name on the command line ("registry", "user", ...).
    pub name: &'static str,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Cancelled to stop this role alone, the way SIGTERM stops a process.
    pub shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
    /// What the task ended with, once awaited: a JoinHandle cannot be
    /// awaited twice, and both [`Spawned::exited`] and [`Spawned::stop`]
    /// may want it.
    ended: Option<Result<(), String>>,
}

impl Spawned {
    /// Serves the registry on `listener` until [`Spawned::shutdown`].
    pub fn registry(
        config: &crate::registry::Config,
        (connections, telemetry): (&Connections, &crate::telemetry::Config),
        listener: TcpListener,
    ) -> std::io::Result<Spawned> {
        let (config, connections, telemetry) =
            (config.clone(), connections.clone(), telemetry.clone());
        Self::spawn("registry", listener, move |listener, shutdown| async move {
            crate::registry::run(&config, &connections, &telemetry, listener, shutdown).await
        })
    }

    /// Serves `role` on `listener` until [`Spawned::shutdown`].
    pub fn shop(
        role: ShopRole,
        config: &Config,
        listener: TcpListener,
    ) -> std::io::Result<Spawned> {
        let config = config.clone();
        Self::spawn(
            role.name(),
            listener,
            move |listener, shutdown| async move { role.run(&config, listener, shutdown).await },
        )
    }

    fn spawn<F, Fut>(name: &'static str, listener: TcpListener, run: F) -> std::io::Result<Spawned>
    where
        F: FnOnce(TcpListener, Shutdown) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let addr = listener.local_addr()?;
        let shutdown = Shutdown::new();
        let task = tokio::spawn(run(listener, shutdown.clone()));
        Ok(Spawned {
            name,
            addr,
            shutdown,
            task,
            ended: None,
        })
    }

    /// Whether the role has stopped (on its own, or after its shutdown).
    pub fn is_finished(&self) -> bool {
        self.ended.is_some() || self.task.is_finished()
    }

    /// Waits for the role to end and answers how it ended; an error names
    /// the role and its address. Safe to call again once it has ended.
    pub async fn exited(&mut self) -> anyhow::Result<()> {
        if self.ended.is_none() {
            let ended = match (&mut self.task).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(format!("{err:#}")),
                Err(err) => Err(format!("its task failed: {err}")),
            };
            self.ended = Some(ended);
        }
        match &self.ended {
            Some(Err(err)) => Err(anyhow::anyhow!("the {} at {}: {err}", self.name, self.addr)),
            _ => Ok(()),
        }
    }

    /// Stops the role as SIGTERM would (a service deregisters and drains)
    /// and answers how it ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.exited().await
    }
}
