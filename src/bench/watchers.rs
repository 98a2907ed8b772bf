//! `shop-mesh bench watchers`: what watchers that stop reading cost the
//! registry. Two registries are started in turn and given the same work
//! (register every instance, then change every one of them, twice); one of
//! them also serves watchers of the whole group that take the first answer
//! of their snapshot and then read nothing more. The figure is the
//! resident memory of each at the end, and their ratio.

use std::time::Duration;

use anyhow::Context;

use super::{BenchRegistry, RegistryBench, bench_instance, connect};
use crate::pb::registry as pb;
use crate::pb::registry::registry_client::RegistryClient;

/// `shop-mesh bench watchers`: whether watchers that stop reading slow
/// the registry for everyone else.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchersBench {
    /// Instances to register.
    #[arg(long, default_value_t = 200_000)]
    pub instances: usize,
    /// Instances per service.
    #[arg(long, default_value_t = 10)]
    pub per_service: usize,
    /// Watchers of the whole group that stop reading.
    #[arg(long, default_value_t = 20)]
    pub watchers: usize,
    /// Times every instance is changed after the watchers stall.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
}

impl WatchersBench {
    /// Measures, then prints a Markdown table.
    pub async fn run(self) -> anyhow::Result<()> {
        println!(
            "shop-mesh watchers bench: {} instances ({} per service), changed {} times",
            self.instances, self.per_service, self.rounds
        );
        let without = self.measure(0).await?;
        let with = self.measure(self.watchers).await?;
        let mib = |bytes: u64| bytes as f64 / 1048576.0;
        println!();
        println!("| registry | resident memory |");
        println!("|---|---|");
        println!("| no watchers | {:.1} MiB |", mib(without));
        println!(
            "| {} group watchers that stopped reading | {:.1} MiB |",
            self.watchers,
            mib(with)
        );
        println!("| ratio | {:.2}× |", with as f64 / without.max(1) as f64);
        Ok(())
    }

    /// Resident memory of a fresh registry after the work, with
    /// `stalled` watchers.
    async fn measure(&self, stalled: usize) -> anyhow::Result<u64> {
        let (spawned, addr) = BenchRegistry::start().await?;
        let load = RegistryBench {
            registry: Some(addr),
            instances: self.instances,
            per_service: self.per_service,
            concurrency: 128,
            connections: 4,
            query_time: Duration::ZERO,
            watchers: 0,
            samples: 0,
            persistent: false,
            security: vec![super::Security::Off],
            token_file: None,
        };
        let channels = super::clients(&connect(addr, load.connections).await?, &Default::default());
        load.register_all(&channels).await?;

        // Each watcher on a connection of its own, as separate clients
        // would be; its stream is held and never read again.
        let mut held = Vec::with_capacity(stalled);
        for _ in 0..stalled {
            let channel = connect(addr, 1).await?.remove(0);
            let mut stream = RegistryClient::new(channel)
                .watch(pb::WatchRequest::default())
                .await?
                .into_inner();
            stream.message().await?.context("the watch closed")?;
            held.push(stream);
        }
        for round in 1..=self.rounds {
            // Each round changes a metadata value: every instance becomes a
            // new version.
            let changed = move |i, per_service| {
                let mut instance = bench_instance(i, per_service);
                instance.metadata.insert("round".into(), round.to_string());
                instance
            };
            load.register_each(&channels, changed).await?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = spawned
            .rss_bytes()
            .context("cannot read the registry's memory")?;
        println!(
            "  {stalled} stalled watchers: {:.1} MiB",
            rss as f64 / 1048576.0
        );
        drop(held);
        Ok(rss)
    }
}
