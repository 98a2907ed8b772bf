//! What the registry tells a Prometheus: what it holds now (services and
//! instances by namespace and health, leases, watchers and what is
//! queued for them, its revision), read at each scrape; and what it has
//! done (leases expired, resets sent to watchers, probes), counted as it
//! happens. Calls by RPC and code are counted by the server's layer.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;

use super::store::{Registry, WeakRegistry};
use crate::telemetry::Metrics;

/// What a lease's deadline did to an instance.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Expiry {
    /// `unhealthy` (past the unhealthy timeout, or its stream broke) or
    /// `removed` (past the delete timeout).
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Probe {
    /// `healthy` or `unhealthy`.
    result: &'static str,
}

/// What the registry counts as it happens; always counted (an atomic
/// add), exposed once a role's metrics register them.
#[derive(Clone, Debug)]
pub(super) struct Counters {
    expiries: Family<Expiry, Counter>,
    resets: Counter,
    probes: Family<Probe, Counter>,
}

impl Default for Counters {
    /// Every expiry and probe outcome at 0 from the start, so that
    /// rate() sees the first.
    fn default() -> Self {
        let counters = Counters {
            expiries: Family::default(),
            resets: Counter::default(),
            probes: Family::default(),
        };
        for outcome in ["unhealthy", "removed"] {
            drop(counters.expiries.get_or_create(&Expiry { outcome }));
        }
        for result in ["healthy", "unhealthy"] {
            drop(counters.probes.get_or_create(&Probe { result }));
        }
        counters
    }
}

impl Counters {
    /// A lease's deadline made an instance unhealthy.
    pub(super) fn went_unhealthy(&self) {
        self.expiries
            .get_or_create(&Expiry {
                outcome: "unhealthy",
            })
            .inc();
    }

    /// A lease's deadline removed an instance.
    pub(super) fn removed(&self) {
        self.expiries
            .get_or_create(&Expiry { outcome: "removed" })
            .inc();
    }

    /// A watcher was sent a reset: it fell behind, or resumed from where
    /// the registry can no longer replay.
    pub(super) fn reset_sent(&self) {
        self.resets.inc();
    }

    /// A persistent instance was probed.
    pub(super) fn probed(&self, healthy: bool) {
        let result = if healthy { "healthy" } else { "unhealthy" };
        self.probes.get_or_create(&Probe { result }).inc();
    }
}

impl Registry {
    /// Registers the registry's figures with a role's `metrics`.
    pub fn measure(&self, metrics: &Metrics) {
        let counters = self.counters().clone();
        metrics.register(|registry| {
            let registry = registry.sub_registry_with_prefix("registry");
            registry.register(
                "lease_expiries",
                "Instances a lease's deadline made unhealthy or removed",
                counters.expiries,
            );
            registry.register(
                "watch_resets",
                "Resets sent to watchers that fell behind or resumed from too far back",
                counters.resets,
            );
            registry.register(
                "probes",
                "Health probes of persistent instances, by result",
                counters.probes,
            );
        });
        metrics.collect(Census(self.downgrade()));
    }
}

/// What the registry holds, read at each scrape.
#[derive(Debug)]
struct Census(WeakRegistry);

impl Collector for Census {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(registry) = self.0.upgrade() else {
            return Ok(());
        };
        let stats = registry.stats();
        let census = registry.census();
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64| {
            let metric = ConstGauge::new(value as i64);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        {
            let mut services = encoder.encode_descriptor(
                "registry_services",
                "Services held, by namespace",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (namespace, count) in &census {
                let labels = [("namespace", namespace.as_ref())];
                ConstGauge::new(count.services as i64).encode(services.encode_family(&labels)?)?;
            }
        }
        {
            let mut instances = encoder.encode_descriptor(
                "registry_instances",
                "Instances registered, by namespace and health",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (namespace, count) in &census {
                for (health, value) in [
                    ("healthy", count.healthy),
                    ("unhealthy", count.instances - count.healthy),
                ] {
                    let labels = [("namespace", namespace.as_ref()), ("health", health)];
                    ConstGauge::new(value as i64).encode(instances.encode_family(&labels)?)?;
                }
            }
        }
        gauge(
            &mut encoder,
            "registry_leases",
            "Leases alive",
            stats.leases as u64,
        )?;
        gauge(
            &mut encoder,
            "registry_watchers",
            "Watch subscriptions open",
            stats.watchers as u64,
        )?;
        gauge(
            &mut encoder,
            "registry_watch_queued_bytes",
            "Changes queued for watchers that have not read them yet, in bytes",
            stats.queued_bytes as u64,
        )?;
        gauge(
            &mut encoder,
            "registry_revision",
            "The registry's revision, bumped by every change",
            stats.revision,
        )
    }
}
