//! What the shop's services tell a Prometheus: orders placed, refused
//! and failed (by the gRPC code they were answered with), compensations,
//! orders being placed and requests left unsettled; stock deductions and
//! restores; and each service's database: its pool and how long its
//! statements take.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use sea_orm::{DatabaseConnection, DbBackend};

use super::Error;
use crate::telemetry::rpc::code_name;
use crate::telemetry::{Metrics, latency_buckets};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
    /// The gRPC code the caller was answered with.
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Verdict {
    result: &'static str,
}

/// The order service's counters. Unregistered (the default, as in
/// tests), they count for no one.
#[derive(Clone, Debug, Default)]
pub struct OrderMetrics {
    orders: Family<Outcome, Counter>,
    compensations: Family<Verdict, Counter>,
    placing: Gauge,
    unsettled: Gauge,
}

impl OrderMetrics {
    /// Registered with `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let this = Self::default();
        // Every series at 0 from the start, so that rate() sees the first.
        for result in ["settled", "deferred"] {
            drop(this.compensations.get_or_create(&Verdict { result }));
        }
        metrics.register(|registry| {
            registry.register(
                "orders",
                "PlaceOrder calls by outcome (placed, refused: the request or the state refused it, failed: a dependency did) and the code answered",
                this.orders.clone(),
            );
            registry.register(
                "order_compensations",
                "Stock deductions of orders that were not written, restored (settled) or left to the sweeper (deferred)",
                this.compensations.clone(),
            );
            registry.register(
                "orders_in_flight",
                "PlaceOrder calls being handled",
                this.placing.clone(),
            );
            registry.register(
                "order_requests_unsettled",
                "Order requests neither placed nor undone, as of the sweeper's last look",
                this.unsettled.clone(),
            );
        });
        this
    }

    /// A PlaceOrder call begins; it ends when the guard drops.
    pub fn placing(&self) -> Placing<'_> {
        self.placing.inc();
        Placing(&self.placing)
    }

    /// A PlaceOrder call ended with `result`.
    pub fn placed<T>(&self, result: &Result<T, Error>) {
        let labels = match result {
            Ok(_) => Outcome {
                outcome: "placed",
                reason: "OK",
            },
            Err(err) => {
                let code = err.grpc_code();
                let outcome = match code {
                    tonic::Code::Unavailable
                    | tonic::Code::Aborted
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Internal
                    | tonic::Code::Unknown => "failed",
                    _ => "refused",
                };
                Outcome {
                    outcome,
                    reason: code_name(code),
                }
            }
        };
        self.orders.get_or_create(&labels).inc();
    }

    /// A compensation ended: `settled`, or deferred to the sweeper.
    pub fn compensated(&self, settled: bool) {
        let result = if settled { "settled" } else { "deferred" };
        self.compensations.get_or_create(&Verdict { result }).inc();
    }

    /// The sweeper counted `count` requests unsettled.
    pub fn unsettled(&self, count: u64) {
        self.unsettled.set(count as i64);
    }
}

/// An order being placed, counted until it drops.
pub struct Placing<'a>(&'a Gauge);

impl Drop for Placing<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The product service's counters.
#[derive(Clone, Debug, Default)]
pub struct StockMetrics {
    deductions: Family<Verdict, Counter>,
    restores: Family<Verdict, Counter>,
}

impl StockMetrics {
    /// Registered with `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let this = Self::default();
        // Every series at 0 from the start, so that rate() sees the first.
        for result in ["deducted", "cancelled", "refused"] {
            drop(this.deductions.get_or_create(&Verdict { result }));
        }
        for result in ["restored", "already_restored", "refused"] {
            drop(this.restores.get_or_create(&Verdict { result }));
        }
        metrics.register(|registry| {
            registry.register(
                "stock_deductions",
                "DeductStock calls: deducted, cancelled (its key was closed by a compensation) or refused",
                this.deductions.clone(),
            );
            registry.register(
                "stock_restores",
                "RestoreStock calls: restored, already restored (a repeat), or refused",
                this.restores.clone(),
            );
        });
        this
    }

    /// A deduction ended as `result`.
    pub fn deducted(&self, result: &'static str) {
        self.deductions.get_or_create(&Verdict { result }).inc();
    }

    /// A restore ended as `result`.
    pub fn restored(&self, result: &'static str) {
        self.restores.get_or_create(&Verdict { result }).inc();
    }
}

/// Registers a service's database with `metrics`: its pool, read at each
/// scrape, and the time each statement takes. sqlx reports no count of
/// callers waiting for a connection; a saturated pool shows as every
/// connection in use.
pub fn measure_database(db: &mut DatabaseConnection, metrics: &Metrics) {
    if !metrics.enabled() {
        return;
    }
    let statements =
        Family::<Verdict, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
    metrics.register(|registry| {
        registry.register_with_unit(
            "db_statement",
            "Time a database statement took, by result (ok or error)",
            Unit::Seconds,
            statements.clone(),
        );
    });
    let (ok, failed) = (
        statements.get_or_create_owned(&Verdict { result: "ok" }),
        statements.get_or_create_owned(&Verdict { result: "error" }),
    );
    db.set_metric_callback(move |info| {
        let histogram = if info.failed { &failed } else { &ok };
        histogram.observe(info.elapsed.as_secs_f64());
    });
    metrics.collect(Pool(db.clone()));
}

/// A database pool's connections, read at each scrape.
#[derive(Debug)]
struct Pool(DatabaseConnection);

impl Collector for Pool {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let db = &self.0;
        let (open, idle, max) = match db.get_database_backend() {
            DbBackend::Sqlite => {
                let pool = db.get_sqlite_connection_pool();
                (
                    pool.size(),
                    pool.num_idle(),
                    pool.options().get_max_connections(),
                )
            }
            DbBackend::MySql => {
                let pool = db.get_mysql_connection_pool();
                (
                    pool.size(),
                    pool.num_idle(),
                    pool.options().get_max_connections(),
                )
            }
            DbBackend::Postgres => {
                let pool = db.get_postgres_connection_pool();
                (
                    pool.size(),
                    pool.num_idle(),
                    pool.options().get_max_connections(),
                )
            }
            _ => return Ok(()),
        };
        let in_use = (open as usize).saturating_sub(idle);
        let mut connections = encoder.encode_descriptor(
            "db_pool_connections",
            "The database pool's open connections, in use or idle",
            None,
            MetricType::Gauge,
        )?;
        for (state, count) in [("in_use", in_use), ("idle", idle)] {
            ConstGauge::new(count as i64)
                .encode(connections.encode_family(&[("state", state)])?)?;
        }
        let max = ConstGauge::new(i64::from(max));
        max.encode(encoder.encode_descriptor(
            "db_pool_max_connections",
            "The most connections the database pool opens",
            None,
            max.metric_type(),
        )?)
    }
}
