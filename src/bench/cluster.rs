//! `shop-mesh bench cluster`: the registry on etcd beside the registry in
//! memory and beside plain etcd puts, in one run on one 3-member etcd
//! cluster started here; then how long a caller whose registry node was
//! killed is blind to changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use super::{BenchRegistry, Rate, RegistryBench, connect, histogram, timed_calls, us};
use crate::discovery::{self, Mesh};
use crate::etcd::Etcd;
use crate::harness::EtcdCluster;
use crate::pb::registry as pb;
use crate::pb::registry::registry_client::RegistryClient;

/// `shop-mesh bench cluster`: what keeping the registry's state in etcd
/// costs, measured against the same work in memory and against etcd alone.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterBench {
    /// Instances each registry registers (each with its own lease), and
    /// keys the plain etcd run puts.
    #[arg(long, default_value_t = 5_000)]
    pub instances: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long to run queries.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub query_time: Duration,
    /// Other watch streams open while watch latency is measured.
    #[arg(long, default_value_t = 100)]
    pub watchers: usize,
    /// Watch deliveries to time.
    #[arg(long, default_value_t = 500)]
    pub samples: usize,
    /// Registry nodes killed, one at a time, to time the caller's reroute.
    #[arg(long, default_value_t = 5)]
    pub kills: usize,
}

/// What one registry gave.
struct Measured {
    registrations: Rate,
    queries: Rate,
    watch: Histogram<u64>,
}

impl ClusterBench {
    /// Measures, then prints a Markdown table.
    pub async fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.instances > 0 && self.concurrency > 0 && self.kills > 0,
            "--instances, --concurrency and --kills must be at least 1"
        );
        let etcd = EtcdCluster::start(3)
            .await?
            .context("the cluster bench needs etcd (apt-get install etcd-server)")?;
        let endpoints = etcd.endpoints();
        println!(
            "shop-mesh cluster bench: {} registrations each, {} in flight, a 3-member etcd cluster on this machine",
            self.instances, self.concurrency
        );
        let raw = self.plain_puts(&endpoints).await?;
        let bench = RegistryBench {
            registry: None,
            instances: self.instances,
            per_service: 10,
            concurrency: self.concurrency,
            connections: 4,
            query_time: self.query_time,
            watchers: self.watchers,
            samples: self.samples,
            persistent: false,
            security: vec![super::Security::Off],
            token_file: None,
        };
        let memory = measure(&bench, &[]).await?;
        let cluster = cluster_flags(&endpoints, "/bench");
        let on_etcd = measure(&bench, &cluster).await?;
        let reroute = self.reroute(&endpoints).await?;

        println!();
        println!("| measure | registry in memory | registry on etcd | plain etcd |");
        println!("|---|---|---|---|");
        println!(
            "| registrations/s (puts/s for plain etcd) | {} | {} | {} |",
            memory.registrations.summary(),
            on_etcd.registrations.summary(),
            raw.summary()
        );
        println!(
            "| GetService queries/s | {} | {} | - |",
            memory.queries.summary(),
            on_etcd.queries.summary()
        );
        println!(
            "| watch delivery, register to event, p50 / p99 | {} / {} | {} / {} | - |",
            us(memory.watch.value_at_quantile(0.5)),
            us(memory.watch.value_at_quantile(0.99)),
            us(on_etcd.watch.value_at_quantile(0.5)),
            us(on_etcd.watch.value_at_quantile(0.99)),
        );
        println!(
            "| kill -9 of the caller's registry node to its next change seen, {} kills: p50 / max | - | {} / {} | - |",
            reroute.len(),
            ms(reroute.value_at_quantile(0.5)),
            ms(reroute.max())
        );
        drop(etcd);
        Ok(())
    }

    /// Plain puts of `instances` keys of an instance record's size, as
    /// many in flight as the registries get.
    async fn plain_puts(&self, endpoints: &[String]) -> anyhow::Result<Rate> {
        let etcd = Etcd::connect(endpoints, Duration::from_secs(3))?;
        let value = Arc::new(vec![b'x'; 300]);
        timed_calls(self.instances, self.concurrency, |_| {
            let (etcd, value) = (etcd.clone(), value.clone());
            move |i| {
                let (etcd, value) = (etcd.clone(), value.clone());
                async move {
                    etcd.put(format!("/bench-plain/{i}"), value.as_slice(), None)
                        .await
                        .map(drop)
                        .map_err(|err| tonic::Status::unavailable(err.to_string()))
                }
            }
        })
        .await
    }

    /// Two registry nodes; a caller's mesh that watches through the first;
    /// the first killed; the time until the caller sees a registration
    /// made through the second. The first comes back between kills.
    async fn reroute(&self, endpoints: &[String]) -> anyhow::Result<Histogram<u64>> {
        let flags = cluster_flags(endpoints, "/bench-reroute");
        let (mut first, first_addr) = BenchRegistry::start_with(&flags).await?;
        let (_second, second_addr) = BenchRegistry::start_with(&flags).await?;
        let mut writer = RegistryClient::new(connect(second_addr, 1).await?.remove(0));
        let bin = std::env::current_exe()?;
        let mut times = histogram();
        for round in 0..self.kills {
            let service = format!("reroute-{round}");
            let mesh = Mesh::new(
                &discovery::Config {
                    registry: format!("{first_addr},{second_addr}"),
                    reconnect_max_backoff: Duration::from_millis(200),
                    ..Default::default()
                },
                &Default::default(),
            )?;
            let channel = mesh.channel(&service);
            register(&mut writer, &service, 1).await?;
            tokio::time::timeout(Duration::from_secs(30), channel.wait_for(|e| e.len() == 1))
                .await
                .context("the caller never saw the first instance")?;
            let killed = Instant::now();
            first.process.kill().await?;
            register(&mut writer, &service, 2).await?;
            tokio::time::timeout(Duration::from_secs(60), channel.wait_for(|e| e.len() == 2))
                .await
                .context("the caller never saw the change after the kill")?;
            times.saturating_record(killed.elapsed().as_micros() as u64);
            first.process.restart(&bin).await?;
        }
        Ok(times)
    }
}

/// Registers, through `client`, instance `n` of `service` on loopback,
/// with timeouts longer than the bench.
async fn register(
    client: &mut RegistryClient<tonic::transport::Channel>,
    service: &str,
    n: u32,
) -> anyhow::Result<()> {
    client
        .register(pb::RegisterRequest {
            instance: Some(pb::Instance {
                service: service.into(),
                ip: "127.0.0.1".into(),
                port: 40_000 + n,
                unhealthy_timeout_ms: Some(30 * 60 * 1000),
                delete_timeout_ms: Some(60 * 60 * 1000),
                ..Default::default()
            }),
            lease_id: 0,
        })
        .await
        .context("register")?;
    Ok(())
}

/// The flags of a registry node on `endpoints`, its keys under `prefix`.
fn cluster_flags(endpoints: &[String], prefix: &str) -> Vec<String> {
    vec![
        "--store".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        endpoints.join(","),
        "--etcd-prefix".into(),
        prefix.into(),
    ]
}

/// Registrations, queries and watch delivery of a registry started with
/// `flags`.
async fn measure(bench: &RegistryBench, flags: &[String]) -> anyhow::Result<Measured> {
    let (registry, addr) = BenchRegistry::start_with(flags).await?;
    let channels = super::clients(
        &connect(addr, bench.connections).await?,
        &Default::default(),
    );
    let registrations = bench.register_all(&channels).await?;
    let queries = bench.query(&channels).await?;
    let watch = bench.watch_latency(&channels).await?;
    drop(registry);
    Ok(Measured {
        registrations,
        queries,
        watch,
    })
}

fn ms(micros: u64) -> String {
    format!("{:.0} ms", micros as f64 / 1000.0)
}
