//! `shop-mesh bench`: measures a deployment.

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// The registry: registrations/s, queries/s, watch delivery latency, memory.
    Registry,
}

impl Bench {
    pub async fn run(self) -> anyhow::Result<()> {
        anyhow::bail!("not yet")
    }
}
