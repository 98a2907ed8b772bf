//! `shop-mesh bench discovery`: what discovery and balancing cost per
//! call, beside the same calls over one plain channel, and how fast a
//! killed instance stops drawing calls.
//!
//! Everything runs in this process: a registry, three target instances
//! (each serving `grpc.health.v1.Health`, registered as `bench-target`),
//! and the callers. Each instance is [`Isolated`], so it can be killed the
//! way a crashed process dies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::histogram;
use crate::discovery::{self, Announce, BalancedChannel, Mesh};
use crate::harness::Isolated;
use crate::roles::Spawned;

const TARGET: &str = "bench-target";
/// A service of one instance, to set balanced and plain side by side on
/// the very same instance.
const SINGLE: &str = "bench-single";

/// `shop-mesh bench discovery`: what the balanced channel costs a call
/// beside a plain one, and how fast a killed instance leaves it.
#[derive(Debug, Clone, clap::Args)]
pub struct DiscoveryBench {
    /// Calls per measured run.
    #[arg(long, default_value_t = 20_000)]
    pub calls: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Runs of each kind, alternating plain and balanced.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Instances killed, one at a time, to time their removal.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
}

/// A target instance: health and reflection only, registered as `name`.
fn target(registry: SocketAddr, name: &str) -> anyhow::Result<Isolated> {
    let config = discovery::Config {
        registry: registry.to_string(),
        ..Default::default()
    };
    Isolated::start(config, Announce::new(name), |_, routes| routes)
}

type Run = (f64, Histogram<u64>);

impl DiscoveryBench {
    /// Measures, then prints a Markdown table.
    pub async fn run(self) -> anyhow::Result<()> {
        let dir =
            std::env::temp_dir().join(format!("shop-mesh-bench-discovery-{}", std::process::id()));
        let mut registry_config = crate::registry::Config {
            data_dir: dir.clone(),
            ..Default::default()
        };
        // What is measured is the balanced channel, not the credentials.
        registry_config.auth.enabled = false;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let registry_role = Spawned::registry(
            &registry_config,
            (&Default::default(), &Default::default()),
            listener,
        )?;
        let registry = registry_role.addr;

        let targets = (0..3)
            .map(|_| target(registry, TARGET))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let single = target(registry, SINGLE)?;
        let mesh = Mesh::new(
            &discovery::Config {
                registry: registry.to_string(),
                ..Default::default()
            },
            &Default::default(),
        )?;
        let spread = mesh.channel(TARGET);
        let balanced = mesh.channel(SINGLE);
        wait_for(&spread, |n| n == 3).await?;
        wait_for(&balanced, |n| n == 1).await?;
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", single.addr))?
            .tcp_nodelay(true)
            .connect()
            .await?;

        println!(
            "shop-mesh discovery bench: {} calls a run, {} in flight, grpc.health.v1.Health/Check",
            self.calls, self.concurrency
        );
        let mut plain_runs = Vec::new();
        let mut balanced_runs = Vec::new();
        let mut spread_runs = Vec::new();
        for _ in 0..self.rounds {
            plain_runs.push(self.measure(HealthClient::new(plain.clone())).await?);
            balanced_runs.push(self.measure(HealthClient::new(balanced.clone())).await?);
            spread_runs.push(self.measure(HealthClient::new(spread.clone())).await?);
        }
        let kills = self.kill_to_removal(registry, &spread).await?;

        println!();
        println!("| run | calls/s | p50 | p99 |");
        println!("|---|---|---|---|");
        let kinds = [
            ("plain channel to one instance", &plain_runs),
            ("balanced channel, the same one instance", &balanced_runs),
            ("balanced channel, three instances", &spread_runs),
        ];
        for (name, runs) in kinds {
            for (rate, latency) in runs {
                println!(
                    "| {name} | {rate:.0} | {} µs | {} µs |",
                    latency.value_at_quantile(0.5),
                    latency.value_at_quantile(0.99)
                );
            }
        }
        println!();
        println!(
            "balanced / plain on the same instance, medians of the runs: p50 {:.3}, p99 {:.3}, calls/s {:.3}",
            median(&balanced_runs, |r| r.1.value_at_quantile(0.5) as f64)
                / median(&plain_runs, |r| r.1.value_at_quantile(0.5) as f64),
            median(&balanced_runs, |r| r.1.value_at_quantile(0.99) as f64)
                / median(&plain_runs, |r| r.1.value_at_quantile(0.99) as f64),
            median(&balanced_runs, |r| r.0) / median(&plain_runs, |r| r.0),
        );
        println!(
            "kill to removal from the caller's set, {} kills: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            kills.len(),
            kills.value_at_quantile(0.5) as f64 / 1000.0,
            kills.value_at_quantile(0.99) as f64 / 1000.0,
            kills.max() as f64 / 1000.0
        );
        drop((targets, single));
        registry_role.stop().await?;
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    async fn measure<T>(&self, client: HealthClient<T>) -> anyhow::Result<Run>
    where
        T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
        T::Future: Send,
        T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
        <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
        T::Error: Into<tonic::codegen::StdError>,
    {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..self.concurrency)
            .map(|_| {
                let (mut client, next, total) = (client.clone(), next.clone(), self.calls);
                tokio::spawn(async move {
                    let mut latency = histogram();
                    while next.fetch_add(1, Ordering::Relaxed) < total {
                        let call = Instant::now();
                        client.check(HealthCheckRequest::default()).await?;
                        latency.saturating_record(call.elapsed().as_micros() as u64);
                    }
                    Ok::<_, tonic::Status>(latency)
                })
            })
            .collect();
        let mut all = histogram();
        for task in tasks {
            all.add(task.await??)?;
        }
        Ok((self.calls as f64 / started.elapsed().as_secs_f64(), all))
    }

    /// Starts a fourth instance, waits until the caller holds it, kills
    /// it, and times until the caller's set no longer holds it: after that
    /// no call can be routed to it.
    async fn kill_to_removal(
        &self,
        registry: SocketAddr,
        channel: &BalancedChannel,
    ) -> anyhow::Result<Histogram<u64>> {
        let mut times = histogram();
        for _ in 0..self.kills {
            let mut target = target(registry, TARGET)?;
            let addr = target.addr;
            tokio::time::timeout(
                Duration::from_secs(10),
                channel.wait_for(|a| a.contains(&addr)),
            )
            .await
            .context("the new instance never reached the caller")?;
            // Steady state: its KeepAlive stream opens one round trip after
            // it registered; a kill inside that window is caught by the
            // unhealthy timeout instead, which is not what this measures.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let killed = Instant::now();
            target.kill();
            tokio::time::timeout(
                Duration::from_secs(10),
                channel.wait_for(|a| !a.contains(&addr)),
            )
            .await
            .context("the killed instance was never removed")?;
            times.saturating_record(killed.elapsed().as_micros() as u64);
        }
        Ok(times)
    }
}

fn median(runs: &[Run], value: impl Fn(&Run) -> f64) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(value).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn wait_for(channel: &BalancedChannel, ready: impl Fn(usize) -> bool) -> anyhow::Result<()> {
    tokio::time::timeout(
        Duration::from_secs(10),
        channel.wait_for(|a| ready(a.len())),
    )
    .await
    .context("the targets never registered")
}
