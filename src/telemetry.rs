//! What a running process tells its operators: log lines through
//! `tracing` (readable text by default, JSON on request; the level from
//! `RUST_LOG` when set, else from the configuration), each role's
//! [`Metrics`] for a Prometheus to scrape, and traces of calls across the
//! mesh exported over OTLP when a collector is configured.

mod metrics;
mod process;
pub mod rpc;

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub use metrics::{Metrics, latency_buckets};

/// The `[telemetry]` configuration section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Every role serves Prometheus metrics at `/metrics` (on its own
    /// port, or its section's `metrics_listen`) and counts its calls.
    pub metrics: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self { metrics: true }
    }
}

impl Config {
    /// A role's metrics as this section says.
    pub fn metrics(&self) -> Metrics {
        Metrics::new(self.metrics)
    }
}

/// Installs the global subscriber. Safe to call more than once (tests):
/// later calls leave the first subscriber in place.
pub fn init(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
