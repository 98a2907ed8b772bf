//! A registered service on a runtime of its own, for benchmarks and tests
//! that need to kill an instance the way a crashed process dies: dropping
//! the runtime closes its sockets at once, with no goodbye, so the
//! registry sees its KeepAlive stream break.

use std::net::SocketAddr;

use tokio::sync::oneshot;
use tonic::service::Routes;

use crate::discovery::{self, Announce};
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
}

impl Isolated {
    /// Binds 127.0.0.1:0, then serves `add(bound address, health and
    /// reflection routes)` registered per `announce`, until shutdown.
    pub fn start(
        config: discovery::Config,
        announce: Announce,
        add: impl FnOnce(SocketAddr, Routes) -> Routes + Send + 'static,
    ) -> anyhow::Result<Isolated> {
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
                    let server = Server::new(shutdown.clone(), &Connections::default())
                        .await
                        .expect("plaintext needs no files");
                    let routes = add(addr, server.routes(&[]));
                    discovery::serve(&server, routes, listener, announce, &config, shutdown).await
                };
                let _ = tx.send(served.await);
            }
        });
        Ok(Isolated {
            addr,
            shutdown,
            runtime: Some(runtime),
            exited: Some(exited),
        })
    }

    /// Gone at once, sockets and all, as with kill -9.
    pub fn kill(&mut self) {
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
