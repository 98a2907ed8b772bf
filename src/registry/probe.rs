//! Health probes of persistent instances: the registry itself asks each
//! one `grpc.health.v1.Health/Check` at a fixed interval. SERVING is
//! healthy; any other answer, an error or no answer in time is not.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::model::Instance;
use super::store::WeakRegistry;

/// The metadata key naming the gRPC service to check; the whole server
/// ("") when absent.
pub const HEALTH_SERVICE_KEY: &str = "health.service";

pub(super) async fn run(
    registry: WeakRegistry,
    instance: Arc<Instance>,
    interval: Duration,
    timeout: Duration,
    tls: Option<crate::server::Dialer>,
    closed: CancellationToken,
) {
    let (key, addr) = (instance.service.as_ref().clone(), instance.addr.clone());
    let service = instance
        .metadata
        .get(HEALTH_SERVICE_KEY)
        .cloned()
        .unwrap_or_default();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = match addr.ip {
        std::net::IpAddr::V4(ip) => format!("{scheme}://{ip}:{}", addr.port),
        std::net::IpAddr::V6(ip) => format!("{scheme}://[{ip}]:{}", addr.port),
    };
    let endpoint = Endpoint::from_shared(uri).and_then(|endpoint| match tls {
        Some(tls) => endpoint.tls_config(tls.for_host(&addr.ip.to_string())),
        None => Ok(endpoint),
    });
    let channel = match endpoint {
        Ok(endpoint) => endpoint
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_lazy(),
        Err(err) => {
            tracing::error!(%err, instance = %instance.id(), "cannot probe");
            return;
        }
    };
    drop(instance);
    let mut client = HealthClient::new(channel);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let request = HealthCheckRequest {
            service: service.clone(),
        };
        let healthy = match client.check(request).await {
            Ok(answer) => answer.into_inner().status() == ServingStatus::Serving,
            Err(status) => {
                tracing::debug!(%key, ?addr, %status, "probe failed");
                false
            }
        };
        let Some(registry) = registry.upgrade() else {
            return;
        };
        registry.counters().probed(healthy);
        registry.probed(&key, &addr, healthy).await;
    }
}
