//! `shop-mesh bench`: measures a deployment, so anyone can check the
//! figures in BENCHMARKS.md on their own machine.
//!
//! Without `--registry`, the registry bench starts this same binary as a
//! child process (`shop-mesh registry` on a free loopback port) so that its
//! resident memory can be read; with it, it measures the registry given.
//! Registries started here run with credentials off unless a bench says
//! otherwise (`bench registry --security`): the other benches measure the
//! registry's own work.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

use crate::discovery::Credential;
use crate::pb::registry as pb;

/// A registry client as the benches hold one: showing a token, or none.
type RegistryClient = crate::discovery::RegistryClient;

mod cluster;
mod config;
mod console;
mod discovery;
mod idle;
mod nacos;
mod orders;
mod watchers;

pub use cluster::ClusterBench;
pub use config::ConfigBench;
pub use console::ConsoleBench;
pub use discovery::DiscoveryBench;
pub use idle::IdleBench;
pub use nacos::NacosBench;
pub use orders::OrdersBench;
pub use watchers::WatchersBench;

/// `shop-mesh bench`: what can be measured.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// The registry: registrations/s, queries/s, watch delivery latency and
    /// resident memory.
    Registry(RegistryCommand),
    /// Discovery and balancing: their cost per call beside a plain channel,
    /// and the time from an instance's death to its removal from callers.
    Discovery(DiscoveryBench),
    /// The shop: PlaceOrder and GetProduct through discovery, on SQLite or
    /// a scratch MySQL/PostgreSQL database.
    Orders(OrdersBench),
    /// The registry's memory with watchers of a whole group that stop
    /// reading while every instance changes, beside the same without them.
    Watchers(WatchersBench),
    /// Idle connections: health checks with thousands of connections open
    /// that never send a byte, and when the registry closes them.
    Idle(IdleBench),
    /// The registry on etcd beside the registry in memory and beside plain
    /// etcd puts, on one 3-member etcd cluster started here.
    Cluster(ClusterBench),
    /// The console: a page's load time with many services, and what open
    /// consoles cost the registry while it changes.
    Console(ConsoleBench),
    /// Nacos's 1.x HTTP API: shop-mesh beside r-nacos under the same wrk
    /// scripts, registrations/s, list queries/s and memory per instance.
    Nacos(NacosBench),
    /// The config centre: publishes/s, gets/s, and the push of a publish
    /// to a thousand watchers of one item.
    Config(ConfigBench),
}

/// `shop-mesh bench registry`: [`RegistryBench`]'s options, and
/// `--telemetry` for the registry started here.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryCommand {
    /// What to measure and how.
    #[command(flatten)]
    pub bench: RegistryBench,
    /// The registry's telemetry, and rounds.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// `shop-mesh bench registry`: a registry's write, read and watch rates.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryBench {
    /// A running registry to measure; by default one is started here.
    #[arg(long)]
    pub registry: Option<SocketAddr>,
    /// Instances to register (each with its own lease).
    #[arg(long, default_value_t = 100_000)]
    pub instances: usize,
    /// Instances per service.
    #[arg(long, default_value_t = 10)]
    pub per_service: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// HTTP/2 connections the calls share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// How long to run queries.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub query_time: Duration,
    /// Other watch streams open while watch latency is measured.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Watch deliveries to time.
    #[arg(long, default_value_t = 2000)]
    pub samples: usize,
    /// Register persistent instances (kept on disk and probed, each on its
    /// own loopback port, where nothing listens) instead of ephemeral ones:
    /// measures what storing a registration costs.
    #[arg(long)]
    pub persistent: bool,
    /// How the registry started here is guarded; several (off,tokens,tls)
    /// measure each in turn, in one run, side by side.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "off")]
    pub security: Vec<Security>,
    /// The token to show a registry given with --registry.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
}

/// How a bench's registry is guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Security {
    /// Credentials off, plaintext.
    Off,
    /// Credentials on (every call shows a token; the default), plaintext.
    Tokens,
    /// Credentials on, and mutual TLS.
    Tls,
}

impl Security {
    fn name(self) -> &'static str {
        match self {
            Security::Off => "credentials off, plaintext",
            Security::Tokens => "tokens",
            Security::Tls => "tokens + mutual TLS",
        }
    }
}

/// `--telemetry` and `--rounds`: what the roles a bench starts count and
/// export, and how often each is measured when several are compared.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Telemetry of the roles started here (the configuration's by
    /// default: metrics on); several (off,metrics) measure each in turn,
    /// in rounds, in one run, side by side.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub telemetry: Vec<TelemetryMode>,
    /// Rounds when several --telemetry modes are given: each round
    /// measures every mode once, the order turning round each time (ABBA),
    /// and the table gives the median of the rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// What the roles a bench starts count and export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TelemetryMode {
    /// Metrics off, tracing off: no /metrics, no calls counted.
    Off,
    /// Metrics on: every role counts its calls and serves /metrics.
    Metrics,
    /// Metrics on, and every call traced and exported over OTLP to a
    /// collector in the bench's process (which counts the spans).
    Tracing,
}

impl TelemetryMode {
    /// As tables and lines name it.
    fn name(self) -> &'static str {
        match self {
            TelemetryMode::Off => "off",
            TelemetryMode::Metrics => "metrics on",
            TelemetryMode::Tracing => "metrics + tracing",
        }
    }
}

/// One measurement's telemetry: its mode and, when tracing, the
/// collector the spans go to (for as long as this lives).
struct Telemetry {
    mode: TelemetryMode,
    collector: Option<crate::harness::Collector>,
}

impl Telemetry {
    /// Starts what `mode` needs (for tracing, a collector); none for no
    /// mode (the configuration's telemetry).
    async fn start(mode: Option<TelemetryMode>) -> anyhow::Result<Option<Telemetry>> {
        let Some(mode) = mode else { return Ok(None) };
        let collector = match mode {
            TelemetryMode::Tracing => Some(crate::harness::Collector::counting().await?),
            TelemetryMode::Off | TelemetryMode::Metrics => None,
        };
        Ok(Some(Telemetry { mode, collector }))
    }

    /// Sets a `[telemetry]` section as the mode says.
    fn apply(&self, telemetry: &mut crate::telemetry::Config) {
        telemetry.metrics = self.mode != TelemetryMode::Off;
        telemetry.otlp_endpoint = self
            .collector
            .as_ref()
            .map(crate::harness::Collector::endpoint)
            .unwrap_or_default();
    }

    /// The `[telemetry]` section of [`Telemetry::apply`] as the
    /// environment of a child process: a variable for each of its keys.
    fn env(&self) -> Vec<(String, String)> {
        let mut telemetry = crate::telemetry::Config::default();
        self.apply(&mut telemetry);
        let prefix = crate::config::ENV_PREFIX;
        vec![
            (
                format!("{prefix}TELEMETRY__METRICS"),
                telemetry.metrics.to_string(),
            ),
            (
                format!("{prefix}TELEMETRY__OTLP_ENDPOINT"),
                telemetry.otlp_endpoint,
            ),
        ]
    }

    /// Says how many spans the collector got, when there is one: proof
    /// that tracing was on while measured.
    fn report(&self) {
        if let Some(collector) = &self.collector {
            println!("    {} spans exported", collector.received());
        }
    }
}

impl TelemetryArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        for (i, mode) in self.telemetry.iter().enumerate() {
            if self.telemetry[..i].contains(mode) {
                bail!("--telemetry names {} twice", mode.name());
            }
        }
        Ok(())
    }

    /// Whether several modes are compared, in rounds.
    fn several(&self) -> bool {
        self.telemetry.len() > 1
    }

    /// The one mode asked for, or none (as the configuration says).
    fn single(&self) -> Option<TelemetryMode> {
        self.telemetry.first().copied()
    }

    /// Each round's order of the modes: as given, then turned round, and
    /// so on (ABBA).
    fn order(&self, round: usize) -> Vec<TelemetryMode> {
        let mut modes = self.telemetry.clone();
        if round % 2 == 1 {
            modes.reverse();
        }
        modes
    }

    /// Measures every mode `rounds` times, in [`TelemetryArgs::order`];
    /// `measure(mode)` gives the figures of each of `calls`. Each mode's
    /// figures, round by round.
    async fn in_rounds<F, Fut>(&self, calls: &[&str], mut measure: F) -> anyhow::Result<Rounds>
    where
        F: FnMut(TelemetryMode) -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<CallFigures>>>,
    {
        let mut rounds: Rounds = self
            .telemetry
            .iter()
            .map(|&mode| (mode, Vec::with_capacity(self.rounds)))
            .collect();
        for round in 0..self.rounds {
            for mode in self.order(round) {
                println!("  round {}/{}, {}:", round + 1, self.rounds, mode.name());
                let figures = measure(mode).await?;
                let line: Vec<String> = calls
                    .iter()
                    .zip(&figures)
                    .map(|(call, f)| format!("{call} p50 {}", us(f.p50)))
                    .collect();
                println!("    {}", line.join(", "));
                let (_, of_mode) = rounds
                    .iter_mut()
                    .find(|(m, _)| *m == mode)
                    .expect("every mode has its rounds");
                of_mode.push(figures);
            }
        }
        Ok(rounds)
    }
}

/// Per telemetry mode, its figures round by round: `rounds[r][c]` is
/// call `c` in round `r`.
type Rounds = Vec<(TelemetryMode, Vec<Vec<CallFigures>>)>;

/// What one run measured of one kind of call: latency in µs, and calls a
/// second and CPU time a call (µs, of the processes measured) where that
/// means something.
#[derive(Debug, Clone, Copy)]
struct CallFigures {
    p50: u64,
    p99: u64,
    rate: Option<f64>,
    cpu: Option<f64>,
}

impl CallFigures {
    fn of(latency: &Histogram<u64>, rate: Option<f64>) -> Self {
        Self {
            p50: latency.value_at_quantile(0.5),
            p99: latency.value_at_quantile(0.99),
            rate,
            cpu: None,
        }
    }

    /// With the CPU time a call took.
    fn cpu(self, cpu: Option<f64>) -> Self {
        Self { cpu, ..self }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The figures of several telemetry modes measured in rounds: a Markdown
/// table of each mode's median p50, p99 and rate over the rounds, then
/// each mode's median p50 over the base mode's (off when measured, else
/// the first), with the ratio in each round.
fn print_rounds(args: &TelemetryArgs, calls: &[&str], rounds: &Rounds) {
    let order: Vec<String> = (0..args.rounds)
        .map(|r| {
            let modes: Vec<&str> = args.order(r).iter().map(|m| m.name()).collect();
            modes.join(", ")
        })
        .collect();
    println!();
    println!(
        "Median of {} rounds; order in each round: {}.",
        args.rounds,
        order.join(" / ")
    );
    println!();
    println!("| call | telemetry | p50 | p99 | calls/s | CPU a call |");
    println!("|---|---|---|---|---|---|");
    // The median over the rounds of one figure of call `c`; none when a
    // round lacks it.
    let median_of =
        |c: usize, runs: &[Vec<CallFigures>], figure: fn(&CallFigures) -> Option<f64>| {
            runs.iter()
                .map(|round| figure(&round[c]))
                .collect::<Option<Vec<f64>>>()
                .map(median)
        };
    let p50 = |f: &CallFigures| Some(f.p50 as f64);
    for (c, call) in calls.iter().enumerate() {
        for (mode, runs) in rounds {
            let shown = |figure, format: fn(f64) -> String| {
                median_of(c, runs, figure).map_or_else(|| "–".to_string(), format)
            };
            println!(
                "| {call} | {} | {} | {} | {} | {} |",
                mode.name(),
                shown(p50, |v| us(v.round() as u64)),
                shown(|f| Some(f.p99 as f64), |v| us(v.round() as u64)),
                shown(|f| f.rate, |v| format!("{v:.0}")),
                shown(|f| f.cpu, |v| format!("{v:.1} µs")),
            );
        }
    }
    let (base, base_runs) = rounds
        .iter()
        .find(|(mode, _)| *mode == TelemetryMode::Off)
        .unwrap_or(&rounds[0]);
    println!();
    for (c, call) in calls.iter().enumerate() {
        for (mode, runs) in rounds.iter().filter(|(mode, _)| mode != base) {
            let ratio =
                |figure| Some(median_of(c, runs, figure)? / median_of(c, base_runs, figure)?);
            let each: Vec<String> = runs
                .iter()
                .zip(base_runs)
                .map(|(on, off)| format!("{:.2}", on[c].p50 as f64 / off[c].p50.max(1) as f64))
                .collect();
            println!(
                "{call}: {} ÷ {} at p50: {:.2} (rounds: {})",
                mode.name(),
                base.name(),
                ratio(p50).unwrap_or(f64::NAN),
                each.join(", ")
            );
            if let Some(cpu) = ratio(|f| f.cpu) {
                println!(
                    "{call}: {} ÷ {} in CPU a call: {cpu:.2}",
                    mode.name(),
                    base.name()
                );
            }
        }
    }
}

impl Bench {
    /// Runs the chosen benchmark and prints its table.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Bench::Registry(command) => command.bench.run(&command.telemetry).await,
            Bench::Discovery(bench) => bench.run().await,
            Bench::Orders(bench) => bench.run().await,
            Bench::Watchers(bench) => bench.run().await,
            Bench::Idle(bench) => bench.run().await,
            Bench::Cluster(bench) => bench.run().await,
            Bench::Console(bench) => bench.run().await,
            Bench::Nacos(bench) => bench.run().await,
            Bench::Config(bench) => bench.run().await,
        }
    }
}

/// A registry started for the bench, stopped when dropped.
struct BenchRegistry {
    process: crate::harness::Process,
    data_dir: std::path::PathBuf,
    /// How to reach it: TLS, and the token to show.
    access: Access,
}

/// How a bench client reaches a registry.
#[derive(Clone, Default)]
struct Access {
    tls: Option<tonic::transport::ClientTlsConfig>,
    credential: Credential,
}

impl Drop for BenchRegistry {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

impl BenchRegistry {
    /// This binary's registry on a port of loopback's own choosing.
    async fn start() -> anyhow::Result<(BenchRegistry, SocketAddr)> {
        Self::start_with(&[]).await
    }

    /// [`BenchRegistry::start`] with more flags (`--store etcd ...`).
    async fn start_with(extra: &[String]) -> anyhow::Result<(BenchRegistry, SocketAddr)> {
        Self::start_guarded(extra, Security::Off).await
    }

    /// [`BenchRegistry::start_with`], guarded as `security` says: with
    /// credentials, the bench shows the admin token the registry's first
    /// start wrote; with TLS, a development CA is made for the run.
    async fn start_guarded(
        extra: &[String],
        security: Security,
    ) -> anyhow::Result<(BenchRegistry, SocketAddr)> {
        Self::start_as(extra, security, None).await
    }

    /// [`BenchRegistry::start_guarded`], with the telemetry of `telemetry`
    /// (none: as the configuration says).
    async fn start_as(
        extra: &[String],
        security: Security,
        telemetry: Option<&Telemetry>,
    ) -> anyhow::Result<(BenchRegistry, SocketAddr)> {
        let data_dir = std::env::temp_dir().join(format!(
            "shop-mesh-bench-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let registry_dir = data_dir.join("registry");
        let args = ["registry", "--listen", "127.0.0.1:0", "--data-dir"]
            .into_iter()
            .map(String::from)
            .chain([registry_dir.display().to_string()])
            .chain(extra.iter().cloned())
            .collect();
        let mut env: Vec<(String, String)> = telemetry.map(Telemetry::env).unwrap_or_default();
        let mut access = Access::default();
        match security {
            Security::Off => {
                env.push(("SHOP_MESH__REGISTRY__AUTH__ENABLED".into(), "false".into()))
            }
            Security::Tokens => {}
            Security::Tls => {
                let tls = crate::cert::make(&data_dir.join("tls"), &[])?.settings();
                env.extend(tls.env());
                access.tls = tls.client()?.map(|tls| tls.for_host("127.0.0.1"));
            }
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let exe = std::env::current_exe()?;
        let process = crate::harness::Process::start(&exe, "registry", args, &env)
            .await
            .context("cannot start the registry")?;
        let addr = process.addr.parse().context("the registry's address")?;
        if security != Security::Off {
            // Written before the registry says it serves.
            let token =
                std::fs::read_to_string(registry_dir.join(crate::registry::ADMIN_TOKEN_FILE))
                    .context("the registry's first admin token")?;
            access.credential = Credential::bearer(token.trim());
        }
        Ok((
            BenchRegistry {
                process,
                data_dir,
                access,
            },
            addr,
        ))
    }

    fn pid(&self) -> Option<u32> {
        self.process.pid()?.as_raw().try_into().ok()
    }

    /// CPU time the registry has used (user + system).
    fn cpu_time(&self) -> Option<Duration> {
        self.process.cpu_time()
    }

    fn rss_bytes(&self) -> Option<u64> {
        self.process.rss_bytes()
    }
}

/// What one registry bench run measured.
struct Figures {
    registrations: Rate,
    queries: Rate,
    watch: Histogram<u64>,
    idle_rss: Option<u64>,
    loaded_rss: Option<u64>,
    registration_cpu: Option<f64>,
    query_cpu: Option<f64>,
}

impl RegistryBench {
    /// Measures, then prints a Markdown table for BENCHMARKS.md: one
    /// column, or one for each `--security` asked for, in one run; or,
    /// with several `--telemetry` modes, each mode's medians over rounds.
    pub async fn run(self, telemetry: &TelemetryArgs) -> anyhow::Result<()> {
        if self.per_service == 0 || self.concurrency == 0 || self.connections == 0 {
            bail!("--per-service, --concurrency and --connections must be at least 1");
        }
        if self.security.is_empty() {
            bail!("--security needs one of off, tokens, tls");
        }
        if self.registry.is_some() && (self.security.len() > 1 || self.security[0] == Security::Tls)
        {
            bail!(
                "--registry measures the registry given as it is: leave out --security (tls, and several side by side, start their own)"
            );
        }
        telemetry.check()?;
        if self.registry.is_some() && !telemetry.telemetry.is_empty() {
            bail!(
                "--registry measures the registry given as it is: leave out --telemetry (it sets the registry started here)"
            );
        }
        if telemetry.several() && self.security.len() > 1 {
            bail!("several --telemetry modes are measured with one --security");
        }
        println!(
            "shop-mesh registry bench: {} {} instances ({} per service), {} calls in flight over {} connections",
            self.instances,
            if self.persistent {
                "persistent"
            } else {
                "ephemeral"
            },
            self.per_service,
            self.concurrency,
            self.connections
        );
        if telemetry.several() {
            let (this, security) = (&self, self.security[0]);
            let calls = ["registrations", "GetService queries", "watch delivery"];
            let rounds = telemetry
                .in_rounds(&calls, move |mode| async move {
                    let f = this.measure(security, Some(mode)).await?;
                    Ok(vec![
                        CallFigures::of(&f.registrations.latency, Some(f.registrations.rate))
                            .cpu(f.registration_cpu),
                        CallFigures::of(&f.queries.latency, Some(f.queries.rate)).cpu(f.query_cpu),
                        CallFigures::of(&f.watch, None),
                    ])
                })
                .await?;
            print_rounds(telemetry, &calls, &rounds);
            return Ok(());
        }
        let mut all = Vec::new();
        for security in self.security.clone() {
            all.push((security, self.measure(security, telemetry.single()).await?));
        }
        if let [(_, one)] = all.as_slice() {
            self.print(one);
        } else {
            print_beside(&all);
        }
        Ok(())
    }

    /// One run against a registry guarded as `security` says, with the
    /// telemetry of `telemetry` (or the one given).
    async fn measure(
        &self,
        security: Security,
        telemetry: Option<TelemetryMode>,
    ) -> anyhow::Result<Figures> {
        let telemetry = Telemetry::start(telemetry).await?;
        let (spawned, addr, access) = match self.registry {
            Some(addr) => {
                let mut access = Access::default();
                if let Some(file) = &self.token_file {
                    let token = std::fs::read_to_string(file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    access.credential = Credential::bearer(token.trim());
                }
                (None, addr, access)
            }
            None => {
                let (spawned, addr) =
                    BenchRegistry::start_as(&[], security, telemetry.as_ref()).await?;
                let access = spawned.access.clone();
                (Some(spawned), addr, access)
            }
        };
        let clients = clients(
            &connect_with(addr, self.connections, access.tls.clone()).await?,
            &access.credential,
        );
        // Idle: started, one client connected, nothing registered.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle_rss = spawned.as_ref().and_then(BenchRegistry::rss_bytes);
        match &telemetry {
            Some(telemetry) => println!(
                "  {}; telemetry {} against {addr}",
                security.name(),
                telemetry.mode.name()
            ),
            None => println!("  {} against {addr}", security.name()),
        }
        let cpu = || spawned.as_ref().and_then(BenchRegistry::cpu_time);
        let cpu_before = cpu();
        let registrations = self.register_all(&clients).await?;
        let registration_cpu = cpu_per_call(cpu_before, cpu(), self.instances);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let loaded_rss = spawned.as_ref().and_then(BenchRegistry::rss_bytes);
        let cpu_before = cpu();
        let queries = self.query(&clients).await?;
        let query_cpu = cpu_per_call(cpu_before, cpu(), queries.calls);
        let watch = self.watch_latency(&clients).await?;
        // Stopped with SIGTERM, the registry flushes its last spans.
        if let Some(mut spawned) = spawned {
            spawned.process.terminate().await?;
        }
        if let Some(telemetry) = &telemetry {
            telemetry.report();
        }
        Ok(Figures {
            registrations,
            queries,
            watch,
            idle_rss,
            loaded_rss,
            registration_cpu,
            query_cpu,
        })
    }

    fn print(&self, f: &Figures) {
        println!();
        println!("| measure | result |");
        println!("|---|---|");
        println!("| registrations/s | {} |", f.registrations.summary());
        println!(
            "| GetService queries/s ({} instances a service) | {} |",
            self.per_service,
            f.queries.summary()
        );
        println!(
            "| watch delivery, register to event ({} other watches open) | p50 {}, p99 {}, max {} |",
            self.watchers,
            us(f.watch.value_at_quantile(0.5)),
            us(f.watch.value_at_quantile(0.99)),
            us(f.watch.max())
        );
        println!("| resident memory, idle | {} |", mib(f.idle_rss));
        println!(
            "| resident memory, {} instances | {} |",
            self.instances,
            mib(f.loaded_rss)
        );
        if let (Some(reg), Some(query)) = (f.registration_cpu, f.query_cpu) {
            println!(
                "| registry CPU per call (so calls/s per core without the bench client) | register {:.1} µs ({:.0}/s), GetService {:.1} µs ({:.0}/s) |",
                reg,
                1e6 / reg,
                query,
                1e6 / query
            );
        }
        if let (Some(idle), Some(loaded)) = (f.idle_rss, f.loaded_rss) {
            println!(
                "| memory per instance | {:.0} bytes |",
                loaded.saturating_sub(idle) as f64 / self.instances.max(1) as f64
            );
        }
    }

    /// Registers every instance, `concurrency` calls at a time.
    async fn register_all(&self, clients: &[RegistryClient]) -> anyhow::Result<Rate> {
        let instance = if self.persistent {
            persistent_instance
        } else {
            bench_instance
        };
        self.register_each(clients, instance).await
    }

    /// Registers `instance(i, per_service)` for every `i`, `concurrency`
    /// calls at a time.
    async fn register_each(
        &self,
        clients: &[RegistryClient],
        instance: impl Fn(usize, usize) -> pb::Instance + Clone + Send + 'static,
    ) -> anyhow::Result<Rate> {
        let per_service = self.per_service;
        timed_calls(self.instances, self.concurrency, |t| {
            let client = clients[t % clients.len()].clone();
            let instance = instance.clone();
            move |i| {
                let (mut client, request) = (
                    client.clone(),
                    pb::RegisterRequest {
                        instance: Some(instance(i, per_service)),
                        lease_id: 0,
                    },
                );
                async move { client.register(request).await.map(drop) }
            }
        })
        .await
    }

    /// GetService on random services for `query_time`.
    async fn query(&self, clients: &[RegistryClient]) -> anyhow::Result<Rate> {
        let services = self.instances.div_ceil(self.per_service).max(1);
        let done = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let until = started + self.query_time;
        let tasks: Vec<_> = (0..self.concurrency)
            .map(|t| {
                let mut client = clients[t % clients.len()].clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let mut latency = histogram();
                    while Instant::now() < until {
                        let service = format!("bench-{}", rand::random_range(0..services));
                        let call = Instant::now();
                        client
                            .get_service(pb::GetServiceRequest {
                                service,
                                healthy_only: true,
                                ..Default::default()
                            })
                            .await?;
                        latency.saturating_record(call.elapsed().as_micros() as u64);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(latency)
                })
            })
            .collect();
        let latency = merge(tasks).await?;
        let calls = done.load(Ordering::Relaxed);
        Ok(Rate {
            rate: calls as f64 / started.elapsed().as_secs_f64(),
            calls,
            latency,
        })
    }

    /// Opens `watchers` streams on other services, then times register →
    /// event on one more watcher, one registration at a time.
    async fn watch_latency(&self, clients: &[RegistryClient]) -> anyhow::Result<Histogram<u64>> {
        let services = self.instances.div_ceil(self.per_service).max(1);
        let mut background = tokio::task::JoinSet::new();
        for w in 0..self.watchers {
            let mut client = clients[w % clients.len()].clone();
            let mut stream = client
                .watch(pb::WatchRequest {
                    service: format!("bench-{}", w % services),
                    ..Default::default()
                })
                .await?
                .into_inner();
            background.spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
        }
        let mut client = clients[0].clone();
        let mut target = client
            .watch(pb::WatchRequest {
                service: "bench-watch".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        target.message().await?.context("the watch closed")?;
        let mut latency = histogram();
        for s in 0..self.samples {
            let mut instance = bench_instance(self.instances + s, 1);
            instance.service = "bench-watch".into();
            let sent = Instant::now();
            client
                .register(pb::RegisterRequest {
                    instance: Some(instance),
                    lease_id: 0,
                })
                .await?;
            target.message().await?.context("the watch closed")?;
            latency.saturating_record(sent.elapsed().as_micros() as u64);
        }
        background.abort_all();
        Ok(latency)
    }
}

/// Calls a second over a measured run, and each call's latency.
struct Rate {
    rate: f64,
    calls: usize,
    latency: Histogram<u64>,
}

impl Rate {
    /// "rate (p50 .., p99 ..)", as a table cell.
    fn summary(&self) -> String {
        format!(
            "{:.0} (p50 {}, p99 {})",
            self.rate,
            us(self.latency.value_at_quantile(0.5)),
            us(self.latency.value_at_quantile(0.99))
        )
    }
}

/// Microseconds of registry CPU per call between two readings.
fn cpu_per_call(before: Option<Duration>, after: Option<Duration>, calls: usize) -> Option<f64> {
    let used = after?.checked_sub(before?)?;
    Some(used.as_secs_f64() * 1e6 / calls.max(1) as f64)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Makes calls `0..total`, `concurrency` at a time: task `t` takes the
/// next index and makes its call with `task(t)`, until none is left; the
/// rate over all, and each call's latency.
async fn timed_calls<C, Fut>(
    total: usize,
    concurrency: usize,
    task: impl Fn(usize) -> C,
) -> anyhow::Result<Rate>
where
    C: FnMut(usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (mut call, next) = (task(t), next.clone());
            tokio::spawn(async move {
                let mut latency = histogram();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok(latency);
                    }
                    let started = Instant::now();
                    call(i).await?;
                    latency.saturating_record(started.elapsed().as_micros() as u64);
                }
            })
        })
        .collect();
    let latency = merge(tasks).await?;
    Ok(Rate {
        rate: total as f64 / started.elapsed().as_secs_f64(),
        calls: total,
        latency,
    })
}

async fn merge(
    tasks: Vec<tokio::task::JoinHandle<Result<Histogram<u64>, tonic::Status>>>,
) -> anyhow::Result<Histogram<u64>> {
    let mut all = histogram();
    for task in tasks {
        all.add(task.await??)?;
    }
    Ok(all)
}

fn us(micros: u64) -> String {
    if micros >= 10_000 {
        format!("{:.1} ms", micros as f64 / 1000.0)
    } else {
        format!("{micros} µs")
    }
}

/// Instance `i`: service `bench-{i / per_service}`, a distinct address,
/// and timeouts long enough that nothing expires during the bench.
fn bench_instance(i: usize, per_service: usize) -> pb::Instance {
    let ip = Ipv4Addr::from(0x0a00_0000 | (i as u32 & 0x00ff_ffff));
    pb::Instance {
        service: format!("bench-{}", i / per_service),
        ip: IpAddr::V4(ip).to_string(),
        port: 8080,
        unhealthy_timeout_ms: Some(30 * 60 * 1000),
        delete_timeout_ms: Some(60 * 60 * 1000),
        ..Default::default()
    }
}

/// Persistent instance `i`: like [`bench_instance`], but on loopback, so
/// the registry's probes of it stay on this machine.
fn persistent_instance(i: usize, per_service: usize) -> pb::Instance {
    const PORTS: usize = 50_000;
    let ip = Ipv4Addr::from(0x7f00_0001 + (i / PORTS) as u32);
    pb::Instance {
        ip: IpAddr::V4(ip).to_string(),
        port: (10_000 + i % PORTS) as u32,
        ephemeral: Some(false),
        ..bench_instance(i, per_service)
    }
}

/// Registry clients over `channels`, showing `credential`.
fn clients(channels: &[Channel], credential: &Credential) -> Vec<RegistryClient> {
    channels
        .iter()
        .map(|channel| {
            crate::pb::registry::registry_client::RegistryClient::with_interceptor(
                channel.clone(),
                credential.clone(),
            )
        })
        .collect()
}

/// Resident memory as a table cell.
fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

/// The figures of each `--security` side by side, with each one's share
/// of the first's.
fn print_beside(all: &[(Security, Figures)]) {
    let (_, base) = &all[0];
    let names: Vec<&str> = all.iter().map(|(s, _)| s.name()).collect();
    println!();
    println!("| measure | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(all.len()));
    let row = |label: &str, cell: &dyn Fn(&Figures) -> String| {
        let cells: Vec<String> = all.iter().map(|(_, f)| cell(f)).collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    let share = |value: f64, of: f64| {
        if of > 0.0 {
            format!(" ({:.0} %)", value / of * 100.0)
        } else {
            String::new()
        }
    };
    row("registrations/s", &|f| {
        format!(
            "{}{}",
            f.registrations.summary(),
            share(f.registrations.rate, base.registrations.rate)
        )
    });
    row("GetService queries/s", &|f| {
        format!(
            "{}{}",
            f.queries.summary(),
            share(f.queries.rate, base.queries.rate)
        )
    });
    row("watch delivery p50 / p99", &|f| {
        format!(
            "{} / {}",
            us(f.watch.value_at_quantile(0.5)),
            us(f.watch.value_at_quantile(0.99))
        )
    });
    row(
        "registry CPU per registration / GetService",
        &|f| match (f.registration_cpu, f.query_cpu) {
            (Some(r), Some(q)) => format!("{r:.1} µs / {q:.1} µs"),
            _ => "n/a".into(),
        },
    );
    row("resident memory, loaded", &|f| mib(f.loaded_rss));
}

async fn connect(addr: SocketAddr, connections: usize) -> anyhow::Result<Vec<Channel>> {
    connect_with(addr, connections, None).await
}

/// [`connect`] over TLS when `tls` is given.
async fn connect_with(
    addr: SocketAddr,
    connections: usize,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> anyhow::Result<Vec<Channel>> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut channels = Vec::with_capacity(connections);
    while channels.len() < connections {
        match endpoint.connect().await {
            Ok(channel) => channels.push(channel),
            Err(err) if Instant::now() > deadline => {
                bail!("cannot reach the registry at {addr}: {err}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(channels[0].clone());
    loop {
        let serving = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map(|r| {
                r.into_inner().status()
                    == tonic_health::pb::health_check_response::ServingStatus::Serving
            })
            .unwrap_or(false);
        if serving {
            return Ok(channels);
        }
        if Instant::now() > deadline {
            bail!("the registry at {addr} does not report SERVING");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
