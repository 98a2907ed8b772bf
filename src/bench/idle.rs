//! `shop-mesh bench idle`: a registry's health checks, each on a new
//! connection as a load balancer's probe makes them, before, while and
//! after thousands of connections that never send a byte are open; the
//! registry's CPU while they are; and when the registry closes them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::{BenchRegistry, histogram, us};
use crate::harness::cpu_time;

/// How long one health check (connect and answer) may take before it
/// counts as failed.
const PATIENCE: Duration = Duration::from_secs(1);

/// Silent connections opened at once: under the listen backlog, so that a
/// registry that accepts them promptly drops no SYN; and how long one may
/// take to open (a dropped SYN is sent again after a second).
const OPENING_AT_ONCE: usize = 64;
const OPEN_PATIENCE: Duration = Duration::from_secs(2);

/// Failed checks in a row after which a phase stops trying: the registry
/// is not answering, and every further check would only wait out its
/// patience.
const GIVE_UP_AFTER: usize = 10;

/// How long the registry's CPU is sampled with the silent connections open.
const CPU_WINDOW: Duration = Duration::from_secs(3);

/// `shop-mesh bench idle`: what idle connections cost a registry.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleBench {
    /// A running registry to measure; by default one is started here.
    #[arg(long)]
    pub registry: Option<SocketAddr>,
    /// The process id of the registry given with --registry, to report its
    /// CPU use.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Connections to open that send nothing.
    #[arg(long, default_value_t = 5000)]
    pub idle: usize,
    /// Health checks timed in each phase.
    #[arg(long, default_value_t = 100)]
    pub checks: usize,
    /// How long to watch the silent connections for the registry closing
    /// them.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub watch: Duration,
}

impl IdleBench {
    /// Measures, then prints a Markdown table.
    pub async fn run(self) -> anyhow::Result<()> {
        let (spawned, addr) = match self.registry {
            Some(addr) => (None, addr),
            None => {
                let (spawned, addr) = BenchRegistry::start().await?;
                (Some(spawned), addr)
            }
        };
        let pid = self
            .pid
            .or_else(|| spawned.as_ref().and_then(BenchRegistry::pid));
        // The first check also waits for a registry started here.
        let started = Instant::now();
        while !check(addr).await {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(20),
                "the registry at {addr} does not answer health checks"
            );
        }
        println!("shop-mesh idle-connection bench against {addr}");
        println!(
            "  health checks: {} a phase, each on a new connection, {PATIENCE:?} each at most",
            self.checks
        );
        let mut rows = vec![(
            "health checks, no silent connections".to_string(),
            checks(addr, self.checks).await.to_string(),
        )];

        let opening = Instant::now();
        let opened = open_silent(addr, self.idle).await;
        rows.push((
            "silent connections opened".into(),
            format!(
                "{} of {} (in {:.1} s)",
                opened.len(),
                self.idle,
                opening.elapsed().as_secs_f64()
            ),
        ));
        let cpu_before = pid.and_then(cpu_time);
        tokio::time::sleep(CPU_WINDOW).await;
        if let (Some(before), Some(after)) = (cpu_before, pid.and_then(cpu_time)) {
            let share = after.saturating_sub(before).as_secs_f64() / CPU_WINDOW.as_secs_f64();
            rows.push((
                format!("registry CPU with them open, over {CPU_WINDOW:?}"),
                format!("{:.0} % of a core", share * 100.0),
            ));
        }
        rows.push((
            format!("health checks, {} silent connections open", opened.len()),
            checks(addr, self.checks).await.to_string(),
        ));

        let closed = watch_closing(opened, self.watch).await;
        rows.push((
            format!(
                "silent connections the registry closed within {:?}",
                self.watch
            ),
            closed.to_string(),
        ));
        rows.push((
            "health checks, after".into(),
            checks(addr, self.checks).await.to_string(),
        ));

        println!();
        println!("| measure | result |");
        println!("|---|---|");
        for (measure, result) in rows {
            println!("| {measure} | {result} |");
        }
        Ok(())
    }
}

/// One health check on a new connection: answered SERVING within
/// [`PATIENCE`].
async fn check(addr: SocketAddr) -> bool {
    let answered = async {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .ok()
    };
    tokio::time::timeout(PATIENCE, answered)
        .await
        .ok()
        .flatten()
        .is_some_and(|answer| answer.into_inner().status == 1)
}

struct Checks {
    tried: usize,
    answered: Histogram<u64>,
}

async fn checks(addr: SocketAddr, count: usize) -> Checks {
    let mut answered = histogram();
    let (mut tried, mut failed_in_a_row) = (0, 0);
    while tried < count && failed_in_a_row < GIVE_UP_AFTER {
        tried += 1;
        let start = Instant::now();
        if check(addr).await {
            answered.saturating_record(start.elapsed().as_micros() as u64);
            failed_in_a_row = 0;
        } else {
            failed_in_a_row += 1;
        }
    }
    Checks { tried, answered }
}

impl std::fmt::Display for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let answered = self.answered.len();
        write!(f, "{answered} of {} answered", self.tried)?;
        if answered > 0 {
            write!(
                f,
                " (p50 {}, p99 {})",
                us(self.answered.value_at_quantile(0.5)),
                us(self.answered.value_at_quantile(0.99))
            )?;
        }
        if answered < self.tried as u64 {
            write!(f, "; the rest not within {PATIENCE:?}")?;
        }
        Ok(())
    }
}

/// Connections to `addr` that send nothing, with when each opened; those
/// whose connect did not complete within [`OPEN_PATIENCE`] are left out.
async fn open_silent(addr: SocketAddr, count: usize) -> Vec<(TcpStream, Instant)> {
    futures::stream::iter(0..count)
        .map(|_| async move {
            let stream = tokio::time::timeout(OPEN_PATIENCE, TcpStream::connect(addr))
                .await
                .ok()?
                .ok()?;
            Some((stream, Instant::now()))
        })
        .buffer_unordered(OPENING_AT_ONCE)
        .filter_map(|opened| async move { opened })
        .collect()
        .await
}

struct Closed {
    /// Ended with EOF: the registry closed them.
    closed: Histogram<u64>,
    /// Ended with an error (a reset, or the kernel giving up on a
    /// connection the registry never accepted).
    failed: usize,
    open: usize,
}

/// Waits up to `watch` for the registry to close each connection (its
/// read ends), timing each from its opening; then closes the rest.
async fn watch_closing(opened: Vec<(TcpStream, Instant)>, watch: Duration) -> Closed {
    let until = tokio::time::Instant::now() + watch;
    let closings = opened.into_iter().map(|(mut stream, at)| async move {
        let mut byte = [0u8; 1];
        match tokio::time::timeout_at(until, stream.read(&mut byte)).await {
            Ok(Ok(_)) => Some(Ok(at.elapsed())),
            Ok(Err(err)) => Some(Err(err)),
            Err(_) => None,
        }
    });
    let ended: Vec<Option<std::io::Result<Duration>>> = futures::future::join_all(closings).await;
    let mut closed = Closed {
        // Up to an hour: a registry that closes them late is told apart
        // from one that closes them at its timeout.
        closed: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
        failed: 0,
        open: 0,
    };
    for end in ended {
        match end {
            Some(Ok(after)) => closed.closed.saturating_record(after.as_micros() as u64),
            Some(Err(_)) => closed.failed += 1,
            None => closed.open += 1,
        }
    }
    closed
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.closed.len())?;
        if !self.closed.is_empty() {
            write!(
                f,
                " (after p50 {}, max {} from opening)",
                us(self.closed.value_at_quantile(0.5)),
                us(self.closed.max())
            )?;
        }
        if self.failed > 0 {
            write!(f, "; {} ended in an error", self.failed)?;
        }
        write!(f, "; {} still open", self.open)
    }
}
