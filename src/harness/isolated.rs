//! A registered service on a runtime of its own, for benchmarks and tests
//! that need to kill an instance the way a crashed process dies: dropping
//! the runtime closes its sockets at once, with no goodbye, so the
//! registry sees its KeepAlive stream break. It can also hang first, as
//! a stopped process does.

use std::net::SocketAddr;

use tokio::sync::oneshot;
use tonic::service::Routes;

use crate::config::Config;
use crate::discovery::{self, Announce};
use crate::roles::ShopRole;
use crate::server::{Connections, Server};
use crate::shutdown::Shutdown;

/// The running service; dropping it is the crash.
pub struct Isolated {
    /// Where it serves and what it registered.
    pub addr: SocketAddr,
    /// Cancel for a graceful stop (deregister, drain).
    pub shutdown: Shutdown,
    runtime: Option<tokio::runtime::Runtime>,
    exited: Option<oneshot::Receiver<anyhow::Result<()>>>,
    /// Held while frozen; dropped, the blocked worker goes on.
    frozen: Option<std::sync::mpsc::Sender<()>>,
}

impl Isolated {
    /// Binds 127.0.0.1:0, then serves `add(bound address, health and
    /// reflection routes)` registered per `announce`, until shutdown.
    pub fn start(
        config: discovery::Config,
        announce: Announce,
        add: impl FnOnce(SocketAddr, Routes) -> Routes + Send + 'static,
    ) -> anyhow::Result<Isolated> {
        Self::run(move |listener, addr, shutdown| async move {
            let server = Server::new(shutdown.clone(), &Connections::default())
                .await
                .expect("plaintext needs no files");
            let routes = add(addr, server.routes(&[]));
            discovery::serve(&server, routes, listener, announce, &config, shutdown).await
        })
    }

    /// Binds 127.0.0.1:0 and runs a shop role there, as `config` says.
    pub fn role(role: ShopRole, config: &Config) -> anyhow::Result<Isolated> {
        let config = config.clone();
        Self::run(move |listener, _, shutdown| async move {
            role.run(&config, listener, shutdown).await
        })
    }

    fn run<F, Fut>(serve: F) -> anyhow::Result<Isolated>
    where
        F: FnOnce(tokio::net::TcpListener, SocketAddr, Shutdown) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shutdown = Shutdown::new();
        let (tx, exited) = oneshot::channel();
        runtime.spawn({
            let shutdown = shutdown.clone();
            async move {
                let served = async {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    serve(listener, addr, shutdown).await
                };
                let _ = tx.send(served.await);
            }
        });
        Ok(Isolated {
            addr,
            shutdown,
            runtime: Some(runtime),
            exited: Some(exited),
            frozen: None,
        })
    }

    /// Hangs, as a process stopped with SIGSTOP: its one worker thread
    /// blocks, so its sockets stay open and nothing on them is answered
    /// (its heartbeats stop too), until it is killed.
    pub fn freeze(&mut self) {
        let Some(runtime) = &self.runtime else { return };
        let (thaw, frozen) = std::sync::mpsc::channel::<()>();
        runtime.spawn(async move {
            let _ = frozen.recv();
        });
        self.frozen = Some(thaw);
    }

    /// Gone at once, sockets and all, as with kill -9.
    pub fn kill(&mut self) {
        // Lets a frozen worker go, so its thread ends with the runtime.
        self.frozen = None;
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// How the service ended, once it has (after a graceful stop).
    pub async fn exited(&mut self) -> anyhow::Result<()> {
        match self.exited.take() {
            Some(exited) => exited
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the service was killed"))),
            None => Err(anyhow::anyhow!("already waited for")),
        }
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        self.kill();
    }
}
