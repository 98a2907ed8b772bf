//! What every role's gRPC server carries: `grpc.health.v1.Health` (SERVING
//! only once the role is ready), server reflection v1 and v1alpha (grpcurl
//! 1.8 speaks only v1alpha), the keepalives of [`Connections`] so dead
//! peers are noticed, and a graceful stop bounded by a grace period.
//! Connections reach tonic through [`accept`], which bounds and times them.

mod accept;
mod connections;
mod file_limit;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::shutdown::Shutdown;

pub use accept::Connection;
pub use connections::Connections;
pub use file_limit::raise_file_limit;

pub struct Server {
    health: HealthReporter,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    shutdown: Shutdown,
    connections: Connections,
}

impl Server {
    /// A server whose health reads NOT_SERVING until [`Server::serve`],
    /// holding connections as `connections` say.
    pub async fn new(shutdown: Shutdown, connections: &Connections) -> Self {
        let health = HealthReporter::new();
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        Self {
            health,
            health_service,
            shutdown,
            connections: connections.clone(),
        }
    }

    /// The settings its connections are held to, for the clients it
    /// starts (its registration) to hold theirs the same way.
    pub fn connections(&self) -> &Connections {
        &self.connections
    }

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
        let v1 = reflection()
            .build_v1()
            .expect("embedded descriptors are valid");
        let v1alpha = reflection()
            .build_v1alpha()
            .expect("embedded descriptors are valid");
        Routes::new(self.health_service.clone())
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
        let server = self
            .connections
            .server()
            .layer(tower::util::MapResponseLayer::new(caller_faults))
            .add_routes(routes)
            .serve_with_incoming_shutdown(accept::incoming(listener, &self.connections), stop);
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

/// tonic answers a request it cannot decode (bytes that are not the
/// message, a truncated gRPC frame, a bad compression flag) with INTERNAL,
/// and one over the size limit with OUT_OF_RANGE. Both are the caller's
/// doing, not the server's, so they are answered INVALID_ARGUMENT and
/// RESOURCE_EXHAUSTED here. The roles' own handlers never answer either
/// code, so every such answer a server would send is one of these cases.
fn caller_faults<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let (code, prefix) = match headers.get("grpc-status").map(|code| code.as_bytes()) {
        Some(b"13") => ("3", "malformed%20request:%20"),
        Some(b"11") => ("8", ""),
        _ => return response,
    };
    headers.insert("grpc-status", http::HeaderValue::from_static(code));
    // grpc-message is percent-encoded; the prefix is too.
    let message = headers
        .get("grpc-message")
        .and_then(|message| message.to_str().ok())
        .unwrap_or("");
    if let Ok(message) = http::HeaderValue::from_str(&format!("{prefix}{message}")) {
        headers.insert("grpc-message", message);
    }
    response
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
