//! What a caller's discovery tells a Prometheus, by the service called
//! (`server-product`): calls, attempts that failed, retries and the
//! retries the budget refused, calls failed for want of any endpoint,
//! ejections, how long picking an endpoint took (waiting for the
//! registry's first answer included), whether the watch on the registry
//! is open and how often it was opened; and, read at each scrape, the
//! endpoints known, active or ejected. Each call also counts as a
//! `grpc_client_*` call, by method and code.

use std::sync::Weak;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use tokio::time::Instant;

use crate::telemetry::rpc::{RpcMetrics, Side};
use crate::telemetry::{Metrics, latency_buckets};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Target {
    service: String,
}

/// A role's discovery counters, by service called.
#[derive(Clone, Debug)]
pub struct DiscoveryMetrics {
    calls: Family<Target, Counter>,
    failed_attempts: Family<Target, Counter>,
    retries: Family<Target, Counter>,
    retries_refused: Family<Target, Counter>,
    no_endpoint: Family<Target, Counter>,
    ejections: Family<Target, Counter>,
    pick: Family<Target, Histogram>,
    watching: Family<Target, Gauge>,
    watches_opened: Family<Target, Counter>,
    rpc: RpcMetrics,
}

impl DiscoveryMetrics {
    /// Registered with `metrics` under `discovery_`.
    pub fn new(metrics: &Metrics) -> Self {
        let this = Self {
            calls: Family::default(),
            failed_attempts: Family::default(),
            retries: Family::default(),
            retries_refused: Family::default(),
            no_endpoint: Family::default(),
            ejections: Family::default(),
            pick: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            watching: Family::default(),
            watches_opened: Family::default(),
            rpc: metrics.calls(Side::Client),
        };
        metrics.register(|registry| {
            let registry = registry.sub_registry_with_prefix("discovery");
            registry.register(
                "calls",
                "Calls made through a balanced channel, by service called",
                this.calls.clone(),
            );
            registry.register(
                "failed_attempts",
                "Attempts that failed on an endpoint (unreachable, UNAVAILABLE or out of time)",
                this.failed_attempts.clone(),
            );
            registry.register(
                "retries",
                "Failed retry-safe calls tried again on another endpoint",
                this.retries.clone(),
            );
            registry.register(
                "retry_budget_refusals",
                "Retries the retry budget refused, the call failing instead",
                this.retries_refused.clone(),
            );
            registry.register(
                "no_endpoint",
                "Calls failed at once: no endpoint known, or none with weight",
                this.no_endpoint.clone(),
            );
            registry.register(
                "ejections",
                "Endpoints ejected after failures in a row",
                this.ejections.clone(),
            );
            registry.register_with_unit(
                "pick",
                "Time to pick an endpoint, waiting for the registry's first answer included",
                Unit::Seconds,
                this.pick.clone(),
            );
            registry.register(
                "registry_watching",
                "1 while the watch of a service on the registry is open, 0 while it reconnects",
                this.watching.clone(),
            );
            registry.register(
                "registry_watches_opened",
                "Watches of a service opened on the registry: the first, then one per reconnect",
                this.watches_opened.clone(),
            );
        });
        this
    }

    /// The handles of one service called, taken once per channel so that
    /// a call touches no map.
    pub fn channel(&self, service: &str) -> ChannelMetrics {
        let target = Target {
            service: service.to_owned(),
        };
        ChannelMetrics {
            calls: self.calls.get_or_create_owned(&target),
            failed_attempts: self.failed_attempts.get_or_create_owned(&target),
            retries: self.retries.get_or_create_owned(&target),
            retries_refused: self.retries_refused.get_or_create_owned(&target),
            no_endpoint: self.no_endpoint.get_or_create_owned(&target),
            ejections: self.ejections.get_or_create_owned(&target),
            pick: self.pick.get_or_create_owned(&target),
            rpc: self.rpc.clone(),
        }
    }

    /// The handles of one service's watch on the registry.
    pub fn watch(&self, service: &str) -> WatchMetrics {
        let target = Target {
            service: service.to_owned(),
        };
        WatchMetrics {
            watching: self.watching.get_or_create_owned(&target),
            opened: self.watches_opened.get_or_create_owned(&target),
        }
    }
}

/// One balanced channel's counters.
#[derive(Clone, Debug)]
pub struct ChannelMetrics {
    pub(super) calls: Counter,
    pub(super) failed_attempts: Counter,
    pub(super) retries: Counter,
    pub(super) retries_refused: Counter,
    pub(super) no_endpoint: Counter,
    pub(super) ejections: Counter,
    pick: Histogram,
    pub(super) rpc: RpcMetrics,
}

impl ChannelMetrics {
    /// An endpoint was picked (or none could be) `started` ago.
    pub(super) fn picked(&self, started: Instant) {
        self.pick.observe(started.elapsed().as_secs_f64());
    }
}

/// One resolver's watch on the registry.
#[derive(Clone, Debug, Default)]
pub struct WatchMetrics {
    watching: Gauge,
    opened: Counter,
}

impl WatchMetrics {
    /// The watch is open.
    pub(super) fn opened(&self) {
        self.opened.inc();
        self.watching.set(1);
    }

    /// The watch broke or could not be opened.
    pub(super) fn closed(&self) {
        self.watching.set(0);
    }
}

/// The endpoints of every channel of a mesh, active or ejected, read at
/// each scrape.
#[derive(Debug)]
pub(super) struct Endpoints(pub(super) Weak<super::MeshInner>);

impl Collector for Endpoints {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(mesh) = self.0.upgrade() else {
            return Ok(());
        };
        let channels: Vec<_> = mesh
            .channels
            .lock()
            .iter()
            .map(|(service, channel)| (service.clone(), channel.clone()))
            .collect();
        let mut family = encoder.encode_descriptor(
            "discovery_endpoints",
            "Endpoints known for each service called, active or ejected",
            None,
            MetricType::Gauge,
        )?;
        let now = Instant::now();
        for (service, channel) in &channels {
            let (active, ejected) = channel.census(now);
            for (state, count) in [("active", active), ("ejected", ejected)] {
                let labels = [("service", service.as_str()), ("state", state)];
                ConstGauge::new(count as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
