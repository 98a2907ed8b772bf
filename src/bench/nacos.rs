//! `shop-mesh bench nacos`: shop-mesh's registry beside r-nacos (a Nacos
//! server in Rust), driven by the same wrk scripts over Nacos's 1.x HTTP
//! API on the same machine, in one run: registrations a second (each a new
//! ephemeral instance), instance-list queries a second, and memory per
//! instance (the server's resident set after the registrations, less its
//! resident set idle, over the instances registered).
//!
//! Each phase starts each server afresh, so neither pays for the other
//! phase's instances (nor for their expiry: instances registered and never
//! beaten become unhealthy 15 s later). The servers take turns, phase by
//! phase, for `--rounds` rounds, the first to go alternating, and the
//! table gives each figure's median: a slower moment of the machine falls
//! on both, and one bad round moves no figure. r-nacos is
//! installed from crates.io into a scratch directory (`cargo install
//! rnacos`) unless `--rnacos` names a binary; it is never a dependency of
//! the project. wrk is Debian's package `wrk`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};

use super::{BenchRegistry, mib, us};

/// The r-nacos release measured against.
const RNACOS_VERSION: &str = "0.8.8";

/// The wrk scripts, the same for both servers.
const REGISTER_LUA: &str = include_str!("nacos/register.lua");
const LIST_LUA: &str = include_str!("nacos/list.lua");

/// `shop-mesh bench nacos`: shop-mesh and r-nacos under the same load.
#[derive(Debug, Clone, clap::Args)]
pub struct NacosBench {
    /// An r-nacos binary; by default `cargo install rnacos` puts one in a
    /// scratch directory (once: later runs reuse it).
    #[arg(long)]
    pub rnacos: Option<PathBuf>,
    /// wrk's threads.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// wrk's connections, over all its threads.
    #[arg(long, default_value_t = 64)]
    pub connections: u32,
    /// How long each wrk run lasts (keep it under 15 s: registered
    /// instances are not beaten, and turn unhealthy after that).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Instances of the service the list queries read.
    #[arg(long, default_value_t = 10)]
    pub listed: u16,
    /// Rounds of both phases; the table gives each figure's median.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

/// The servers measured, in the order they take their turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    ShopMesh,
    RNacos,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::ShopMesh => "shop-mesh",
            Server::RNacos => "r-nacos",
        }
    }
}

/// One server, started for a phase and stopped when dropped.
enum Running {
    ShopMesh(Box<BenchRegistry>),
    /// The process, and its data directory, removed after it.
    RNacos(Box<(Child, tempfile::TempDir)>),
}

impl Running {
    fn rss_bytes(&self) -> Option<u64> {
        match self {
            Running::ShopMesh(registry) => registry.rss_bytes(),
            Running::RNacos(held) => crate::harness::rss_bytes(held.0.id()?),
        }
    }
}

/// What wrk measured.
#[derive(Debug, Default, Clone, Copy)]
struct Wrk {
    requests: u64,
    failed: u64,
    per_second: f64,
    p50_us: u64,
    p99_us: u64,
}

/// What one server scored.
#[derive(Debug, Default)]
struct Scores {
    register: Wrk,
    list: Wrk,
    idle_rss: Option<u64>,
    loaded_rss: Option<u64>,
}

impl Scores {
    fn bytes_per_instance(&self) -> Option<u64> {
        let instances = self.register.requests.checked_sub(self.register.failed)?;
        let grown = self.loaded_rss?.checked_sub(self.idle_rss?)?;
        (instances > 0).then(|| grown / instances)
    }
}

impl NacosBench {
    /// Measures both servers, then prints a Markdown table.
    pub async fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.threads > 0
                && self.connections >= self.threads
                && self.listed > 0
                && self.rounds > 0,
            "--threads, --listed and --rounds must be at least 1, and --connections at least --threads"
        );
        let wrk = which("wrk").context(
            "wrk is not installed: install it (Debian and Ubuntu: apt-get install wrk), then run again",
        )?;
        let rnacos = match &self.rnacos {
            Some(path) => path.clone(),
            None => install_rnacos().await?,
        };
        let scripts = tempfile::tempdir()?;
        let register_lua = scripts.path().join("register.lua");
        let list_lua = scripts.path().join("list.lua");
        std::fs::write(&register_lua, REGISTER_LUA)?;
        std::fs::write(&list_lua, LIST_LUA)?;
        println!(
            "shop-mesh nacos bench: wrk -t{} -c{} -d{}s, shop-mesh beside r-nacos {RNACOS_VERSION}",
            self.threads,
            self.connections,
            self.duration.as_secs()
        );

        let servers = [Server::ShopMesh, Server::RNacos];
        // Each server's scores, round by round.
        let mut rounds: [Vec<Scores>; 2] = [Vec::new(), Vec::new()];
        for round in 0..self.rounds {
            // Who goes first alternates, so a drift of the machine's speed
            // over a run falls on both alike.
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut scores = [Scores::default(), Scores::default()];
            for i in order {
                let server = servers[i];
                let (running, addr) = start(server, &rnacos).await?;
                // Settled: the allocator's and runtime's start-up done.
                tokio::time::sleep(Duration::from_secs(1)).await;
                scores[i].idle_rss = running.rss_bytes();
                scores[i].register = self.wrk(&wrk, &register_lua, addr).await?;
                scores[i].loaded_rss = running.rss_bytes();
                println!(
                    "round {}: {}: {:.0} registrations/s",
                    round + 1,
                    server.name(),
                    scores[i].register.per_second
                );
            }
            for i in order {
                let server = servers[i];
                let (_running, addr) = start(server, &rnacos).await?;
                for port in 0..self.listed {
                    register(addr, "bench-list", 9000 + port).await?;
                }
                scores[i].list = self.wrk(&wrk, &list_lua, addr).await?;
                println!(
                    "round {}: {}: {:.0} list queries/s",
                    round + 1,
                    server.name(),
                    scores[i].list.per_second
                );
            }
            for (kept, score) in rounds.iter_mut().zip(scores) {
                kept.push(score);
            }
        }
        print_table(&rounds, self.listed);
        Ok(())
    }

    /// One wrk run of `script` against `addr`.
    async fn wrk(&self, wrk: &Path, script: &Path, addr: SocketAddr) -> anyhow::Result<Wrk> {
        let out = Command::new(wrk)
            .arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{}s", self.duration.as_secs().max(1)))
            .arg("--latency")
            .arg("-s")
            .arg(script)
            .arg(format!("http://{addr}"))
            .stdin(Stdio::null())
            .output()
            .await
            .context("cannot run wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "wrk failed ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse_wrk(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))
    }
}

/// Starts `server` on a free loopback port; answers it once it serves
/// Nacos's HTTP API.
async fn start(server: Server, rnacos: &Path) -> anyhow::Result<(Running, SocketAddr)> {
    let (running, addr) = match server {
        Server::ShopMesh => {
            let (registry, addr) = BenchRegistry::start().await?;
            (Running::ShopMesh(Box::new(registry)), addr)
        }
        Server::RNacos => {
            let http = free_port()?;
            let grpc = free_port()?;
            let data = tempfile::tempdir()?;
            let child = Command::new(rnacos)
                .env("RNACOS_HTTP_PORT", http.to_string())
                .env("RNACOS_GRPC_PORT", grpc.to_string())
                .env("RNACOS_HTTP_CONSOLE_PORT", "0")
                .env("RNACOS_SDK_HOST", "127.0.0.1")
                .env("RNACOS_RAFT_NODE_ADDR", format!("127.0.0.1:{grpc}"))
                .env("RNACOS_DATA_DIR", data.path())
                .env("RNACOS_ENABLE_METRICS", "false")
                .env("RUST_LOG", "error")
                .current_dir(data.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {}", rnacos.display()))?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, http));
            (Running::RNacos(Box::new((child, data))), addr)
        }
    };
    let started = std::time::Instant::now();
    while !serves(addr).await {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("{} did not serve on {addr} within 30 s", server.name());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((running, addr))
}

/// Whether `addr` answers Nacos's status call.
async fn serves(addr: SocketAddr) -> bool {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let Ok(uri) = format!("http://{addr}/nacos/v1/ns/operator/metrics").parse() else {
        return false;
    };
    match client.get(uri).await {
        Ok(answer) => answer.status().is_success(),
        Err(_) => false,
    }
}

/// Registers one instance of `service` at 127.0.0.1:`port`.
async fn register(addr: SocketAddr, service: &str, port: u16) -> anyhow::Result<()> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = http::Request::post(format!(
        "http://{addr}/nacos/v1/ns/instance?serviceName={service}&ip=127.0.0.1&port={port}"
    ))
    .body(Empty::new())?;
    let answer = client.request(request).await?;
    let status = answer.status();
    let body = answer.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "registering {service} at port {port}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

/// A port loopback has free now.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// `program` on the PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// r-nacos from crates.io, installed once into a scratch directory.
async fn install_rnacos() -> anyhow::Result<PathBuf> {
    let root = std::env::temp_dir().join(format!("shop-mesh-bench-rnacos-{RNACOS_VERSION}"));
    let binary = root.join("bin").join("rnacos");
    if binary.is_file() {
        return Ok(binary);
    }
    println!(
        "installing r-nacos {RNACOS_VERSION} into {} (cargo install; a release build, some minutes)",
        root.display()
    );
    let status = Command::new("cargo")
        .args(["install", "rnacos", "--version", RNACOS_VERSION, "--root"])
        .arg(&root)
        .status()
        .await
        .context("cannot run cargo install rnacos")?;
    anyhow::ensure!(status.success(), "cargo install rnacos failed ({status})");
    Ok(binary)
}

/// The figures of wrk's report (with `--latency`).
fn parse_wrk(report: &str) -> Option<Wrk> {
    let mut wrk = Wrk::default();
    for line in report.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next()? {
            "Requests/sec:" => wrk.per_second = words.next()?.parse().ok()?,
            "50%" => wrk.p50_us = micros(words.next()?)?,
            "99%" => wrk.p99_us = micros(words.next()?)?,
            "Non-2xx" => wrk.failed = words.last()?.parse().ok()?,
            count if line.contains(" requests in ") => wrk.requests = count.parse().ok()?,
            _ => {}
        }
    }
    (wrk.requests > 0).then_some(wrk)
}

/// wrk's `812.00us`, `1.25ms` or `2.00s`, in microseconds.
fn micros(text: &str) -> Option<u64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    Some((number.parse::<f64>().ok()? * scale) as u64)
}

/// The round whose `key` is the median of the rounds' (the upper one of
/// an even count).
fn median_by(rounds: &[Scores], key: impl Fn(&Scores) -> f64) -> &Scores {
    let mut sorted: Vec<&Scores> = rounds.iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted[sorted.len() / 2]
}

/// Prints each figure's median over the rounds, shop-mesh beside r-nacos.
fn print_table(rounds: &[Vec<Scores>; 2], listed: u16) {
    let [shop, rnacos] = rounds;
    if shop.is_empty() || rnacos.is_empty() {
        return;
    }
    let registering = |r: &[Scores]| median_by(r, |s| s.register.per_second).register;
    let listing = |r: &[Scores]| median_by(r, |s| s.list.per_second).list;
    let memory = |r: &[Scores]| {
        let median = median_by(r, |s| s.bytes_per_instance().map_or(f64::MAX, |b| b as f64));
        (
            median.bytes_per_instance(),
            median.idle_rss,
            median.loaded_rss,
            median.register,
        )
    };
    let ratio = |ours: f64, theirs: f64| {
        if theirs > 0.0 {
            format!("{:.2}×", ours / theirs)
        } else {
            "-".into()
        }
    };
    let rate = |w: &Wrk| {
        format!(
            "{:.0} (p50 {}, p99 {})",
            w.per_second,
            us(w.p50_us),
            us(w.p99_us)
        )
    };
    let (shop_register, rnacos_register) = (registering(shop), registering(rnacos));
    let (shop_list, rnacos_list) = (listing(shop), listing(rnacos));
    let (shop_bytes, shop_idle, shop_loaded, shop_made) = memory(shop);
    let (rnacos_bytes, rnacos_idle, rnacos_loaded, rnacos_made) = memory(rnacos);
    let per_instance = |b: Option<u64>| b.map_or("-".into(), |b| format!("{b} bytes"));
    println!();
    println!(
        "Medians of {} rounds (registrations, list queries, memory each the median round's):",
        shop.len()
    );
    println!();
    println!("| measure | shop-mesh | r-nacos | shop-mesh ÷ r-nacos |");
    println!("|---|---|---|---|");
    println!(
        "| registrations/s | {} | {} | {} |",
        rate(&shop_register),
        rate(&rnacos_register),
        ratio(shop_register.per_second, rnacos_register.per_second)
    );
    println!(
        "| instance-list queries/s ({listed} instances) | {} | {} | {} |",
        rate(&shop_list),
        rate(&rnacos_list),
        ratio(shop_list.per_second, rnacos_list.per_second)
    );
    println!(
        "| instances registered (failed), the memory round | {} ({}) | {} ({}) | |",
        shop_made.requests, shop_made.failed, rnacos_made.requests, rnacos_made.failed
    );
    println!(
        "| resident memory, idle / after the registrations | {} / {} | {} / {} | |",
        mib(shop_idle),
        mib(shop_loaded),
        mib(rnacos_idle),
        mib(rnacos_loaded)
    );
    let lower = match (shop_bytes, rnacos_bytes) {
        (Some(ours), Some(theirs)) if ours > 0 => {
            format!("{:.2}× less", theirs as f64 / ours as f64)
        }
        _ => "-".into(),
    };
    println!(
        "| memory per instance | {} | {} | {lower} |",
        per_instance(shop_bytes),
        per_instance(rnacos_bytes)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() {
        let report = "Running 10s test @ http://127.0.0.1:8848
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  500.00us  20.00ms   90.00%
    Req/Sec    25.00k     1.00k   30.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.25ms
     90%    2.00ms
     99%    4.50ms
  500000 requests in 10.00s, 60.00MB read
  Non-2xx or 3xx responses: 12
Requests/sec:  49999.50
Transfer/sec:      6.00MB
";
        let wrk = parse_wrk(report).unwrap();
        assert_eq!(wrk.requests, 500_000);
        assert_eq!(wrk.failed, 12);
        assert_eq!(wrk.p50_us, 812);
        assert_eq!(wrk.p99_us, 4500);
        assert!((wrk.per_second - 49999.5).abs() < 0.01);
        assert!(parse_wrk("wrk: connection refused").is_none());
    }
}
