//! What every role's gRPC server carries: `grpc.health.v1.Health` (SERVING
//! only once the role is ready), server reflection v1 and v1alpha (grpcurl
//! 1.8 speaks only v1alpha), the keepalives of [`Connections`] so dead
//! peers are noticed, and a graceful stop bounded by a grace period.
//! Connections reach tonic through [`accept`], which bounds and times them;
//! requests, through [`decode`], which refuses malformed ones as the
//! caller's.

mod accept;
mod connections;
mod decode;
mod file_limit;
mod health;
mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;
use crate::telemetry::rpc::RpcLayer;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use accept::Connection;
pub use connections::Connections;
pub use file_limit::raise_file_limit;
pub use tls::{Dialer, Tls, TlsError};

use crate::pb::health::health_server::HealthServer;

/// Largest request message unless a role sets its own: tonic's default.
const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// What every role's gRPC server carries: the health service (NOT_SERVING
/// until it serves), reflection, the connection settings and the request
/// size limit, and the shutdown it stops on.
pub struct Server {
    health: HealthReporter,
    health_service: HealthServer<health::Health>,
    shutdown: Shutdown,
    connections: Connections,
    max_message_size: usize,
    /// The handshake of a TLS port; None: plaintext.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Whether HTTP/1.1 is served beside HTTP/2 (for a JSON API).
    http1: bool,
    /// What the role counts, and where `/metrics` is served if not on
    /// this port.
    metrics: Metrics,
    metrics_listen: Option<SocketAddr>,
    serves_metrics: bool,
}

impl Server {
    /// A server whose health reads NOT_SERVING until [`Server::serve`],
    /// holding connections as `connections` say (over TLS when they say
    /// so: its files are read now, so a bad one stops the role before it
    /// registers anywhere).
    pub async fn new(shutdown: Shutdown, connections: &Connections) -> Result<Self, TlsError> {
        let tls = connections.tls.acceptor()?;
        let health = HealthReporter::new();
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let health_service = HealthServer::new(health::Health::new(health.clone()));
        Ok(Self {
            health,
            health_service,
            shutdown,
            connections: connections.clone(),
            max_message_size: MAX_MESSAGE_SIZE,
            tls,
            http1: false,
            metrics: Metrics::off(),
            metrics_listen: None,
            serves_metrics: false,
        })
    }

    /// The settings its connections are held to, for the clients it
    /// starts (its registration) to hold theirs the same way.
    pub fn connections(&self) -> &Connections {
        &self.connections
    }

    /// The largest request message any service on this server reads: a
    /// larger one is refused as soon as its length is read. Set it before
    /// [`Server::routes`], and give the role's own services the same
    /// limit (`max_decoding_message_size`), which tonic then never reaches.
    pub fn limit_message_size(&mut self, bytes: usize) {
        self.max_message_size = bytes;
    }

    /// Serves HTTP/1.1 beside HTTP/2, for routes that browsers and curl
    /// call; gRPC needs HTTP/2 either way.
    pub fn serve_http1(&mut self) {
        self.http1 = true;
    }

    /// Counts the gRPC calls served into `metrics` and serves them at
    /// `/metrics`: on `listen` when given, else on this port (over
    /// HTTP/1.1, as Prometheus scrapes). Nothing, when they are off.
    pub fn measure(&mut self, metrics: &Metrics, listen: Option<SocketAddr>) {
        self.metrics = metrics.clone();
        self.metrics_listen = listen;
        self.serves_metrics = true;
    }

    /// Counts the gRPC calls served into `metrics`, served elsewhere
    /// (a second port of the same role).
    pub fn count_calls(&mut self, metrics: &Metrics) {
        self.metrics = metrics.clone();
    }

    /// The health status callers and the registry's probes see, for a role
    /// that reports more than serving or not.
    pub fn health(&self) -> &HealthReporter {
        &self.health
    }

    /// Health and reflection; the role adds its own services, named in
    /// `services` (`shopmesh.shop.v1.OrderService`) so that reflection
    /// lists those and no other service of the crate's protos.
    pub fn routes(&self, services: &[&str]) -> Routes {
        let reflection = || {
            let advertised = services.iter().copied().chain([
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]);
            advertised.fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |builder, name| builder.with_service_name(name),
            )
        };
        let limit = self.max_message_size;
        let v1 = reflection()
            .build_v1()
            .expect("embedded descriptors are valid")
            .max_decoding_message_size(limit);
        let v1alpha = reflection()
            .build_v1alpha()
            .expect("embedded descriptors are valid")
            .max_decoding_message_size(limit);
        Routes::new(self.health_service.clone().max_decoding_message_size(limit))
            .add_service(v1)
            .add_service(v1alpha)
    }

    /// Serves until `stop` resolves, then stops accepting and waits up to
    /// `grace` for open calls. Health reads NOT_SERVING from the moment
    /// the shutdown signal fires, which may be earlier than `stop` (a
    /// service first leaves the registry, then stops).
    pub async fn serve(
        &self,
        routes: Routes,
        listener: TcpListener,
        grace: Duration,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.health
            .set_service_status("", ServingStatus::Serving)
            .await;
        let (shutdown, health) = (self.shutdown.clone(), self.health.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
        });
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
        let stop = async move {
            stop.await;
            let _ = stopped_tx.send(());
        };
        let limit = self.max_message_size;
        let (routes, http1) = match self.metrics_listen {
            Some(_) => (routes, self.http1),
            None if self.serves_metrics && self.metrics.enabled() => (
                Routes::from(routes.into_axum_router().merge(self.metrics.routes())),
                true,
            ),
            None => (routes, self.http1),
        };
        // Held until serving ends, which stops the metrics' own port.
        let _metrics_port = self.serve_metrics_apart().await?;
        let server = self
            .connections
            .server()
            .accept_http1(http1)
            .layer(tower::util::MapRequestLayer::new(move |request| {
                decode::frames(request, limit)
            }))
            .layer(RpcLayer::new(&self.metrics))
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                accept::incoming(listener, &self.connections, self.tls.clone()),
                stop,
            );
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => return result.map_err(Into::into),
            _ = stopped_rx => {}
        }
        match tokio::time::timeout(grace, server).await {
            Ok(result) => result.map_err(Into::into),
            Err(_) => {
                tracing::warn!(
                    ?grace,
                    "open calls outlived the shutdown grace; closing them"
                );
                Ok(())
            }
        }
    }
}

impl Server {
    /// Serves `/metrics` on `metrics_listen`, when set and metrics are on,
    /// until the returned guard drops.
    async fn serve_metrics_apart(&self) -> anyhow::Result<Option<DropGuard>> {
        let Some(addr) = self
            .metrics_listen
            .filter(|_| self.serves_metrics && self.metrics.enabled())
        else {
            return Ok(None);
        };
        let listener = bind(addr, "metrics", None).await?;
        tracing::info!(addr = %listener.local_addr()?, "metrics served");
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let routes = self.metrics.routes();
        tokio::spawn(async move {
            let served = axum::serve(listener, routes)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::warn!(%err, "the metrics port stopped");
            }
        });
        Ok(Some(stop.drop_guard()))
    }
}

/// Binds `addr` for `what`; with `scan`, the first free port among that
/// many from it.
pub async fn bind(addr: SocketAddr, what: &str, scan: Option<u16>) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for offset in 0..scan.unwrap_or(1) {
        let Some(port) = addr.port().checked_add(offset) else {
            break;
        };
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(listener) => return Ok(listener),
            Err(err) => last = Some(err),
        }
    }
    let err = last.map_or_else(|| "no port to try".to_string(), |err| err.to_string());
    anyhow::bail!(
        "cannot listen on {addr} for {what}: {err} (is another process on that port? set another in the configuration)"
    )
}
