//! What a running process tells its operators: log lines through
//! `tracing` (readable text by default, JSON on request; the level from
//! `RUST_LOG` when set, else from the configuration), each role's
//! [`Metrics`] for a Prometheus to scrape, and traces of calls across the
//! mesh exported over OTLP when a collector is configured.

mod metrics;
mod process;
pub mod rpc;
pub mod trace;

use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::{LogConfig, LogFormat};

pub use metrics::{Metrics, latency_buckets};

/// The `[telemetry]` configuration section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Every role serves Prometheus metrics at `/metrics` (on its own
    /// port, or its section's `metrics_listen`) and counts its calls.
    pub metrics: bool,
    /// The OTLP/gRPC collector traces are sent to
    /// (`http://collector:4317`); empty: no tracing.
    pub otlp_endpoint: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            metrics: true,
            otlp_endpoint: String::new(),
        }
    }
}

impl Config {
    /// A role's metrics as this section says.
    pub fn metrics(&self) -> Metrics {
        Metrics::new(self.metrics)
    }
}

/// Installs the global subscriber: log lines as `config` says, and the
/// layer traces go through (see [`trace`]), each with a filter of its
/// own, so the log level never decides what is traced. Safe to call more
/// than once (tests): later calls leave the first subscriber in place.
pub fn init(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let lines: Box<dyn Layer<Registry> + Send + Sync> = match config.format {
        LogFormat::Text => lines.with_filter(filter).boxed(),
        LogFormat::Json => lines.json().with_filter(filter).boxed(),
    };
    let spans = Targets::new().with_target("shop_mesh", tracing::Level::INFO);
    let installed = tracing_subscriber::registry()
        .with(lines)
        .with(trace::layer().with_filter(spans))
        .try_init();
    if installed.is_ok() {
        let _ = LOG_FILTER.set(handle);
    }
}

/// The log lines' filter, once [`init`] installed it: what
/// [`set_log_level`] replaces.
static LOG_FILTER: std::sync::OnceLock<tracing_subscriber::reload::Handle<EnvFilter, Registry>> =
    std::sync::OnceLock::new();

/// Checks a log filter as [`set_log_level`] would take it.
pub fn parse_log_level(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder()
        .with_regex(false)
        .parse(level)
        .map_err(|err| err.to_string())
}

/// Replaces the process's log filter with `level` (a `tracing` filter,
/// as `log.level` takes) while it runs. The filter is the process's: where
/// several roles share one (`up`), the last set wins. Answers whether a
/// filter was installed to replace.
pub fn set_log_level(level: &str) -> Result<bool, String> {
    let filter = parse_log_level(level)?;
    match LOG_FILTER.get() {
        Some(handle) => handle
            .reload(filter)
            .map(|()| true)
            .map_err(|e| e.to_string()),
        None => Ok(false),
    }
}

/// Starts exporting traces when `config` names a collector; the answer
/// stops it when dropped. Called within the runtime, after [`init`].
pub fn start_tracing(config: &Config) -> anyhow::Result<Option<trace::Exporting>> {
    if config.otlp_endpoint.is_empty() {
        return Ok(None);
    }
    trace::export(&config.otlp_endpoint).map(Some)
}
