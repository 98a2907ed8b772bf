//! `shop-mesh bench config`: the config centre's rates and its push. A
//! registry is started (credentials off, its data dir on disk, so every
//! publish is durable before it is answered) and measured for:
//!
//! - publishes/s over many items, with no watcher, then again with the
//!   watchers open;
//! - gets/s of random items;
//! - push latency: with `--watchers` streams all following one item (the
//!   many instances of a service following their settings), each publish
//!   is timed from the call to its arrival at every watcher; p50 and p99
//!   over all arrivals;
//! - the registry's resident memory with the watchers open.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{BenchRegistry, Rate, connect, histogram, mib, timed_calls, us};
use crate::pb::config as pb;
use crate::pb::config::configs_client::ConfigsClient;

type Client = ConfigsClient<tonic::transport::Channel>;

/// `shop-mesh bench config`: publishes/s, gets/s and push latency.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigBench {
    /// Publishes to time, spread over `--items` items.
    #[arg(long, default_value_t = 20_000)]
    pub publishes: usize,
    /// Items published to.
    #[arg(long, default_value_t = 1000)]
    pub items: usize,
    /// Bytes of content per publish.
    #[arg(long, default_value_t = 1024)]
    pub content_bytes: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the calls share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Gets to time.
    #[arg(long, default_value_t = 100_000)]
    pub gets: usize,
    /// Watch streams following one item while pushes are timed.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Publishes whose push to every watcher is timed.
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
}

impl ConfigBench {
    /// Measures, then prints a Markdown table for BENCHMARKS.md.
    pub async fn run(self) -> anyhow::Result<()> {
        if self.items == 0 || self.concurrency == 0 || self.connections == 0 {
            bail!("--items, --concurrency and --connections must be at least 1");
        }
        println!(
            "shop-mesh config bench: {} publishes of {} bytes over {} items, {} gets, {} calls in flight over {} connections; {} watchers of one item",
            self.publishes,
            self.content_bytes,
            self.items,
            self.gets,
            self.concurrency,
            self.connections,
            self.watchers
        );
        let (registry, addr) = BenchRegistry::start().await?;
        let clients: Vec<Client> = connect(addr, self.connections)
            .await?
            .into_iter()
            .map(ConfigsClient::new)
            .collect();
        let idle_rss = registry.rss_bytes();

        let publishes = self.publish(&clients, self.publishes).await?;
        println!("  publishes: {}", publishes.summary());
        let gets = self.get(&clients).await?;
        println!("  gets: {}", gets.summary());

        // The watchers, on connections of their own, as the instances of a
        // service would be.
        let watch_channels = connect(addr, self.connections.max(8)).await?;
        let (arrivals, mut arrived) = mpsc::unbounded_channel::<(u64, Instant)>();
        let mut watchers = Vec::with_capacity(self.watchers);
        for w in 0..self.watchers {
            let mut client = ConfigsClient::new(watch_channels[w % watch_channels.len()].clone());
            let mut stream = client
                .watch(pb::WatchRequest {
                    data_id: "pushed".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            stream.message().await?;
            let arrivals = arrivals.clone();
            watchers.push(tokio::spawn(async move {
                while let Ok(Some(answer)) = stream.message().await {
                    if arrivals.send((answer.revision, Instant::now())).is_err() {
                        return;
                    }
                }
            }));
        }
        drop(arrivals);
        let watched_rss = registry.rss_bytes();

        let mut push = histogram();
        let mut publisher = clients[0].clone();
        for n in 0..self.samples {
            let started = Instant::now();
            let revision = publisher
                .publish(pb::PublishRequest {
                    data_id: "pushed".into(),
                    content: format!("sample = {n}\n"),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .revision;
            let mut seen = 0;
            while seen < self.watchers {
                let Some((at, when)) =
                    tokio::time::timeout(Duration::from_secs(30), arrived.recv())
                        .await
                        .ok()
                        .flatten()
                else {
                    bail!(
                        "a watcher missed revision {revision}: {seen} of {} got it",
                        self.watchers
                    );
                };
                if at == revision {
                    seen += 1;
                    push.saturating_record(when.duration_since(started).as_micros() as u64);
                }
            }
        }
        println!(
            "  push to {} watchers: p50 {}, p99 {}",
            self.watchers,
            us(push.value_at_quantile(0.5)),
            us(push.value_at_quantile(0.99))
        );
        let watched_publishes = self.publish(&clients, self.publishes / 4).await?;
        for watcher in &watchers {
            watcher.abort();
        }

        println!();
        println!("| measure | figure |");
        println!("|---|---|");
        println!(
            "| publishes/s (durable, no watcher) | {} |",
            publishes.summary()
        );
        println!(
            "| publishes/s with {} watchers of another item | {} |",
            self.watchers,
            watched_publishes.summary()
        );
        println!("| gets/s | {} |", gets.summary());
        println!(
            "| push latency to {} watchers of one item | p50 {}, p99 {} ({} pushes) |",
            self.watchers,
            us(push.value_at_quantile(0.5)),
            us(push.value_at_quantile(0.99)),
            push.len()
        );
        println!(
            "| registry memory: at start / with {} items and {} watchers | {} / {} |",
            self.items,
            self.watchers,
            mib(idle_rss),
            mib(watched_rss)
        );
        drop(registry);
        Ok(())
    }

    /// `total` publishes over the items, `concurrency` at a time.
    async fn publish(&self, clients: &[Client], total: usize) -> anyhow::Result<Rate> {
        let content: Arc<str> = Arc::from("x".repeat(self.content_bytes));
        let items = self.items;
        timed_calls(total, self.concurrency, |t| {
            let client = clients[t % clients.len()].clone();
            let content = content.clone();
            move |i| {
                let mut client = client.clone();
                let request = pb::PublishRequest {
                    data_id: format!("bench-{}", i % items),
                    content: content.to_string(),
                    ..Default::default()
                };
                async move { client.publish(request).await.map(drop) }
            }
        })
        .await
    }

    /// `--gets` gets of random published items.
    async fn get(&self, clients: &[Client]) -> anyhow::Result<Rate> {
        let items = self.items.min(self.publishes).max(1);
        timed_calls(self.gets, self.concurrency, |t| {
            let client = clients[t % clients.len()].clone();
            move |_| {
                let mut client = client.clone();
                let request = pb::GetRequest {
                    data_id: format!("bench-{}", rand::random_range(0..items)),
                    ..Default::default()
                };
                async move { client.get(request).await.map(drop) }
            }
        })
        .await
    }
}
