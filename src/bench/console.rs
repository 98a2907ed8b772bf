//! `shop-mesh bench console`: the console with many services and many
//! consoles open. A console here is what the page does over HTTP, request
//! for request: a page load is the page, its two assets, the session,
//! then the namespaces and the first page of services at once; an open
//! console holds the live event stream of its group and, on each event,
//! reads its page of services again, never two at once.
//!
//! It measures the load time of a page with `--services` registered,
//! then the registry's CPU and memory while changes are made at
//! `--churn` a second, with no console open, then with `--consoles`
//! open, then with none again, in one run, so the cost of the consoles
//! is their difference.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{BenchRegistry, Security, bench_instance, clients, connect_with, histogram, mib, us};
use crate::pb::registry as pb;

/// `shop-mesh bench console`: what the console costs with many services.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleBench {
    /// Services registered, one instance each.
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    /// Consoles open at once in the second phase.
    #[arg(long, default_value_t = 10)]
    pub consoles: usize,
    /// Page loads timed.
    #[arg(long, default_value_t = 50)]
    pub loads: usize,
    /// Changes made a second (weights of random instances) while the
    /// registry's cost is sampled.
    #[arg(long, default_value_t = 100)]
    pub churn: u32,
    /// How long each phase samples the registry's cost.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub window: Duration,
}

/// A browser's HTTP client: one pool of kept-alive connections.
type Http = Client<HttpConnector, Full<Bytes>>;

/// A logged-in console's cookie (it only reads, so needs no CSRF token).
#[derive(Clone)]
struct Session {
    cookie: String,
}

impl ConsoleBench {
    /// Measures, then prints a Markdown table.
    pub async fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.services > 0 && self.loads > 0 && self.churn > 0,
            "--services, --loads and --churn must be at least 1"
        );
        let (registry, addr) = BenchRegistry::start_guarded(&[], Security::Tokens).await?;
        let channels = connect_with(addr, 4, None).await?;
        let grpc = clients(&channels, &registry.access.credential);
        println!(
            "shop-mesh console bench: {} services, {} consoles, {} changes/s, against {addr}",
            self.services, self.consoles, self.churn
        );
        let started = Instant::now();
        super::timed_calls(self.services, 64, |t| {
            let client = grpc[t % grpc.len()].clone();
            move |i| {
                let mut client = client.clone();
                async move {
                    client
                        .register(pb::RegisterRequest {
                            instance: Some(bench_instance(i, 1)),
                            lease_id: 0,
                        })
                        .await
                        .map(|_| ())
                }
            }
        })
        .await?;
        println!(
            "  registered {} services in {:.1} s",
            self.services,
            started.elapsed().as_secs_f64()
        );
        let password = std::fs::read_to_string(
            registry
                .data_dir
                .join("registry")
                .join(crate::registry::console::INITIAL_PASSWORD_FILE),
        )
        .context("the console's password, from the registry's data dir")?;
        let session = login(addr, password.trim()).await?;

        let mut rows: Vec<(String, String)> = Vec::new();
        let loads = self.page_loads(addr, &session).await?;
        rows.push((
            format!("services page load, {} services (p50 / p99)", self.services),
            p50_p99(&loads.total),
        ));
        rows.push((
            "  of which the first page of services (p50 / p99)".into(),
            p50_p99(&loads.list),
        ));
        rows.push((
            "  bytes a load fetches (page, assets, answers)".into(),
            format!("{:.1} KiB", loads.bytes as f64 / 1024.0),
        ));

        // Quiet, busy, quiet again: the memory beside the consoles' is the
        // second quiet phase's, once the allocator has returned what the
        // registrations left behind.
        let quiet = self.phase(&registry, &grpc, addr, None).await?;
        let busy = self.phase(&registry, &grpc, addr, Some(&session)).await?;
        let after = self.phase(&registry, &grpc, addr, None).await?;
        let cpu = |p: &Phase| {
            p.cpu
                .map_or("n/a".into(), |c| format!("{:.1} % of a core", c * 100.0))
        };
        rows.push((
            format!("registry CPU, {} changes/s, no console", self.churn),
            cpu(&quiet),
        ));
        rows.push((
            format!(
                "registry CPU, {} changes/s, {} consoles open",
                self.churn, self.consoles
            ),
            cpu(&busy),
        ));
        if let (Some(a), Some(b)) = (quiet.cpu, busy.cpu) {
            rows.push((
                "  the consoles' share".into(),
                format!("{:+.1} % of a core", (b - a) * 100.0),
            ));
        }
        rows.push((
            format!(
                "registry CPU, {} changes/s, the consoles closed again",
                self.churn
            ),
            cpu(&after),
        ));
        rows.push((
            "registry memory, consoles open / closed again".into(),
            format!("{} / {}", mib(busy.rss), mib(after.rss)),
        ));
        if let Some(consoles) = &busy.consoles {
            rows.push((
                "events a console received a second".into(),
                format!("{:.1}", consoles.events_per_second),
            ));
            rows.push((
                "page re-reads a console made a second".into(),
                format!("{:.1}", consoles.reads_per_second),
            ));
            rows.push((
                "a re-read of the page, under churn (p50 / p99)".into(),
                p50_p99(&consoles.read),
            ));
        }
        println!();
        println!("| measure | value |");
        println!("|---|---|");
        for (label, value) in rows {
            println!("| {label} | {value} |");
        }
        Ok(())
    }

    /// Times `loads` loads of the services page, each on new connections
    /// (as a browser's first visit).
    async fn page_loads(&self, addr: SocketAddr, session: &Session) -> anyhow::Result<Loads> {
        let mut total = histogram();
        let mut list = histogram();
        let mut bytes = 0;
        for _ in 0..self.loads {
            let http = http();
            let started = Instant::now();
            let page = get(&http, addr, "/services", Some(session)).await?;
            let (css, js) = tokio::try_join!(
                get(&http, addr, "/assets/app.css", None),
                get(&http, addr, "/assets/app.js", None)
            )?;
            let about = get(&http, addr, "/api/v1/console/session", Some(session)).await?;
            let listing = Instant::now();
            let (namespaces, services) = tokio::try_join!(
                get(&http, addr, "/api/v1/namespaces", Some(session)),
                async {
                    let answer = get(
                        &http,
                        addr,
                        "/api/v1/services?namespace=public&group=DEFAULT_GROUP&page=1&page_size=100",
                        Some(session),
                    )
                    .await?;
                    list.saturating_record(listing.elapsed().as_micros() as u64);
                    anyhow::Ok(answer)
                }
            )?;
            total.saturating_record(started.elapsed().as_micros() as u64);
            bytes = [page, css, js, about, namespaces, services]
                .iter()
                .map(Bytes::len)
                .sum();
        }
        Ok(Loads { total, list, bytes })
    }

    /// Changes at `churn` a second for the window, with the consoles open
    /// when `session` is given; the registry's cost meanwhile.
    async fn phase(
        &self,
        registry: &BenchRegistry,
        grpc: &[super::RegistryClient],
        addr: SocketAddr,
        session: Option<&Session>,
    ) -> anyhow::Result<Phase> {
        let stop = Arc::new(AtomicBool::new(false));
        let consoles: Vec<_> = match session {
            None => Vec::new(),
            Some(session) => (0..self.consoles)
                .map(|_| tokio::spawn(console(addr, session.clone(), stop.clone())))
                .collect(),
        };
        // Let the consoles open their streams before the clock starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu_before = registry.cpu_time();
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1) / self.churn);
        let mut changed = 0usize;
        while started.elapsed() < self.window {
            tick.tick().await;
            let i = rand::random_range(0..self.services);
            let mut client = grpc[changed % grpc.len()].clone();
            let instance = bench_instance(i, 1);
            client
                .update_instance(pb::UpdateInstanceRequest {
                    service: instance.service,
                    ip: instance.ip,
                    port: instance.port,
                    weight: Some(1.0 + (changed % 2) as f64),
                    ..Default::default()
                })
                .await
                .context("a change")?;
            changed += 1;
        }
        let elapsed = started.elapsed();
        let cpu = match (cpu_before, registry.cpu_time()) {
            (Some(before), Some(after)) => {
                Some(after.saturating_sub(before).as_secs_f64() / elapsed.as_secs_f64())
            }
            _ => None,
        };
        let rss = registry.rss_bytes();
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for console in consoles {
            all.push(console.await??);
        }
        let consoles = (!all.is_empty()).then(|| {
            let mut read = histogram();
            let (mut events, mut reads) = (0, 0);
            for c in &all {
                read.add(&c.read).expect("same bounds");
                events += c.events;
                reads += c.reads;
            }
            let per_console = |n: u64| n as f64 / all.len() as f64 / elapsed.as_secs_f64();
            Consoles {
                events_per_second: per_console(events),
                reads_per_second: per_console(reads),
                read,
            }
        });
        Ok(Phase { cpu, rss, consoles })
    }
}

struct Loads {
    total: Histogram<u64>,
    list: Histogram<u64>,
    bytes: usize,
}

struct Phase {
    cpu: Option<f64>,
    rss: Option<u64>,
    consoles: Option<Consoles>,
}

struct Consoles {
    events_per_second: f64,
    reads_per_second: f64,
    read: Histogram<u64>,
}

/// What one open console saw.
struct Seen {
    events: u64,
    reads: u64,
    read: Histogram<u64>,
}

/// An open console on the services page: its event stream, and a re-read
/// of its page after each event (one at a time: events that come during
/// a read are answered by one more read after it), until `stop`.
async fn console(
    addr: SocketAddr,
    session: Session,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Seen> {
    let http = http();
    let request = hyper::Request::get(format!(
        "http://{addr}/api/v1/events?namespace=public&group=DEFAULT_GROUP"
    ))
    .header(hyper::header::COOKIE, &session.cookie)
    .body(Full::new(Bytes::new()))?;
    let answer = http.request(request).await?;
    anyhow::ensure!(
        answer.status() == 200,
        "the event stream answered {}",
        answer.status()
    );
    let mut body = answer.into_body();
    let mut seen = Seen {
        events: 0,
        reads: 0,
        read: histogram(),
    };
    let mut pending = false;
    let mut reading: Option<tokio::task::JoinHandle<anyhow::Result<Duration>>> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::select! {
            frame = tokio::time::timeout(Duration::from_millis(200), body.frame()) => {
                let Ok(frame) = frame else { continue };
                let Some(frame) = frame else { break };
                let frame = frame?;
                let Some(data) = frame.data_ref() else { continue };
                let events = data.windows(6).filter(|w| w == b"event:").count() as u64;
                if events > 0 {
                    seen.events += events;
                    pending = true;
                }
            }
            done = async { reading.as_mut().expect("reading").await }, if reading.is_some() => {
                reading = None;
                seen.read.saturating_record(done??.as_micros() as u64);
                seen.reads += 1;
            }
        }
        if pending && reading.is_none() {
            pending = false;
            let (http, session) = (http.clone(), session.clone());
            reading = Some(tokio::spawn(async move {
                let started = Instant::now();
                get(
                    &http,
                    addr,
                    "/api/v1/services?namespace=public&group=DEFAULT_GROUP&page=1&page_size=100",
                    Some(&session),
                )
                .await?;
                Ok(started.elapsed())
            }));
        }
    }
    Ok(seen)
}

/// A latency's median and 99th percentile, `p50 / p99`.
fn p50_p99(latency: &Histogram<u64>) -> String {
    format!(
        "{} / {}",
        us(latency.value_at_quantile(0.5)),
        us(latency.value_at_quantile(0.99))
    )
}

fn http() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GETs `path` (with the session's cookie when given): the body of a 200.
async fn get(
    http: &Http,
    addr: SocketAddr,
    path: &str,
    session: Option<&Session>,
) -> anyhow::Result<Bytes> {
    let mut request = hyper::Request::get(format!("http://{addr}{path}"));
    if let Some(session) = session {
        request = request.header(hyper::header::COOKIE, &session.cookie);
    }
    let answer = http.request(request.body(Full::new(Bytes::new()))?).await?;
    let status = answer.status();
    let body = answer.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status == 200, "GET {path} answered {status}: {body:?}");
    Ok(body)
}

/// Logs into the console at `addr`.
async fn login(addr: SocketAddr, password: &str) -> anyhow::Result<Session> {
    let body =
        serde_json::json!({"username": crate::registry::console::USER, "password": password});
    let request = hyper::Request::post(format!("http://{addr}/api/v1/console/login"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let answer = http().request(request).await?;
    anyhow::ensure!(
        answer.status() == 200,
        "the console refused the login: {}",
        answer.status()
    );
    let cookie = answer
        .headers()
        .get(hyper::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("the login set no cookie")?
        .to_string();
    Ok(Session { cookie })
}
