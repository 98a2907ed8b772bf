//! One role's metrics, in Prometheus's text format at `/metrics`. Each
//! role holds its own set (in `up` and in the tests several roles share a
//! process, and each must count only what it did), under the
//! `shop_mesh_` prefix; the process's own figures (`process_*`,
//! `tokio_*`) keep their standard names. Components register their
//! counters when the role starts; figures that are read rather than
//! counted (what the registry holds, a pool's connections) are
//! [`Collector`]s read at each scrape.

use std::sync::{Arc, OnceLock};

use axum::response::IntoResponse;
use parking_lot::RwLock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;

use super::rpc::{RpcMetrics, Side};

/// The prefix of every metric of the mesh's own.
pub const PREFIX: &str = "shop_mesh";

/// Latency buckets, in seconds: 100 µs to about 13 s, doubling.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18)
}

/// A role's metrics: where its components register, and what `/metrics`
/// answers. Cheap to clone. Off (`telemetry.metrics = false`), it still
/// takes registrations but serves nothing, and the per-call layers are
/// not installed.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<RwLock<Registry>>,
    enabled: bool,
    /// The call counters of each side, registered once however many
    /// servers and channels count into them.
    calls: Arc<[OnceLock<RpcMetrics>; 2]>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.enabled)
            .finish()
    }
}

impl Metrics {
    /// A role's set; with `enabled`, it starts with the process's figures.
    pub fn new(enabled: bool) -> Self {
        let mut registry = Registry::default();
        if enabled {
            registry.register_collector(Box::new(super::process::Process));
        }
        Self {
            registry: Arc::new(RwLock::new(registry)),
            enabled,
            calls: Arc::default(),
        }
    }

    /// A set that serves nothing, for roles started without telemetry.
    pub fn off() -> Self {
        Self::new(false)
    }

    /// Whether `/metrics` is served and calls are counted.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Registers under the `shop_mesh_` prefix.
    pub fn register(&self, add: impl FnOnce(&mut Registry)) {
        let mut registry = self.registry.write();
        add(registry.sub_registry_with_prefix(PREFIX));
    }

    /// Adds a figure read at each scrape, under the `shop_mesh_` prefix.
    pub fn collect(&self, collector: impl Collector) {
        self.register(|registry| registry.register_collector(Box::new(collector)));
    }

    /// The counters of the gRPC calls this role serves or makes.
    pub fn calls(&self, side: Side) -> RpcMetrics {
        self.calls[side as usize]
            .get_or_init(|| RpcMetrics::new(self, side))
            .clone()
    }

    /// Everything, in Prometheus's text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; a collector that fails
        // leaves what it wrote so far.
        if let Err(err) = prometheus_text::encode(&mut text, &self.registry.read()) {
            tracing::warn!(%err, "a metrics collector failed; the scrape is cut short");
        }
        text
    }

    /// `GET /metrics`, for the role's HTTP routes; an empty router when
    /// metrics are off.
    pub fn routes(&self) -> axum::Router {
        if !self.enabled {
            return axum::Router::new();
        }
        let metrics = self.clone();
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(http::header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
                        metrics.encode(),
                    )
                        .into_response()
                }
            }),
        )
    }
}
