//! `shop-mesh soak`: the reliability suite. The shop runs as separate
//! processes of this binary (a registry, a user, two products, two
//! orders); 64 clients place orders (retrying with the same request id,
//! with back-off) and read; a fault is injected a third of the way in and
//! repaired at two thirds; then the databases are checked: nothing
//! oversold, nothing lost, nothing doubled. Tests run every scenario in a
//! short form; a person runs the long form with one command.

mod deployment;
mod invariants;
mod load;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};

pub use deployment::Deployment;
pub use load::{Failed, Outcome};

use crate::discovery::Mesh;
use crate::product::store::product;
use crate::registry::StoreKind;
use crate::shop::{ORDER_SERVICE, PRODUCT_SERVICE, USER_SERVICE, db};

/// The stock each product starts a run with.
const STOCK: i32 = 1_000_000;

/// A fault, and what repairs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// No fault: the control.
    Baseline,
    /// kill -9 of one product instance; a new one started later.
    KillProduct,
    /// kill -9 of one order instance, possibly mid-order; restarted later.
    KillOrder,
    /// kill -9 of the registry (on the etcd store, of one of the three
    /// registry nodes); restarted on its port later.
    KillRegistry,
    /// kill -9 of the etcd leader (etcd store only); restarted later.
    KillEtcdLeader,
    /// SIGSTOP of one product instance (hung, connections open) for longer
    /// than the unhealthy timeout, then SIGCONT.
    StopProduct,
    /// The product database locked by another writer for the fault window
    /// (SQLite only).
    SqliteLocked,
    /// Every connection to the database killed from the server side,
    /// again and again through the fault window (MySQL/MariaDB only).
    MysqlKill,
}

impl Scenario {
    /// Its name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::KillProduct => "kill -9 a product",
            Scenario::KillOrder => "kill -9 an order instance",
            Scenario::KillRegistry => "kill -9 the registry",
            Scenario::KillEtcdLeader => "kill -9 the etcd leader",
            Scenario::StopProduct => "SIGSTOP a product past the unhealthy timeout",
            Scenario::SqliteLocked => "the SQLite product database locked",
            Scenario::MysqlKill => "MariaDB connections killed by the server",
        }
    }

    /// Whether the fault takes out one instance of a replicated service
    /// (then no order may fail), rather than something every order needs.
    pub fn replicated(self) -> bool {
        matches!(
            self,
            Scenario::Baseline
                | Scenario::KillProduct
                | Scenario::KillOrder
                | Scenario::StopProduct
        )
    }
}

/// `shop-mesh soak` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Scenarios to run [default: every one the database allows].
    #[arg(long, value_enum)]
    pub scenario: Vec<Scenario>,
    /// How long each scenario's load runs.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Clients at once.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// A MySQL/MariaDB or PostgreSQL server to run on, as a URL with a
    /// database the user may create databases from (a fresh database is
    /// made for each scenario and dropped after); SQLite files by default.
    #[arg(long)]
    pub database_url: Option<String>,
    /// The registry's store: one registry in memory, or three registry
    /// nodes over a 3-member etcd cluster the suite starts (needs etcd).
    #[arg(long, value_enum, default_value = "memory")]
    pub store: StoreKind,
    /// Every process, the load's clients included, on mutual TLS with a
    /// development CA made for the run (credentials are always on).
    #[arg(long)]
    pub tls: bool,
}

/// How a scenario runs: the load, the database and the registry's store.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    /// Clients placing orders at once.
    pub clients: usize,
    /// How long the load runs; the fault is its middle third.
    pub duration: Duration,
    /// A server database (fresh, the scenario's own), or None for SQLite.
    pub database_url: Option<&'a str>,
    /// Where the registry keeps its state.
    pub store: StoreKind,
    /// Mutual TLS on every port.
    pub tls: bool,
}

/// One scenario's run.
#[derive(Debug)]
pub struct Report {
    /// The scenario run.
    pub scenario: Scenario,
    /// What the load saw.
    pub outcome: Outcome,
    /// Every invariant that did not hold.
    pub violations: Vec<String>,
    /// When the fault was repaired, from the start of the load.
    pub repaired: Duration,
    /// Each process's exit code on SIGTERM at the end.
    pub exits: Vec<(&'static str, Option<i32>)>,
    /// The store the registry ran on.
    pub store: StoreKind,
}

impl Report {
    /// Whether the fault took out one of several of something (a service
    /// instance, a registry node, an etcd member): then no order may fail,
    /// not even during the fault.
    pub fn fault_is_redundant(&self) -> bool {
        self.scenario.replicated()
            || (self.store == StoreKind::Etcd
                && matches!(
                    self.scenario,
                    Scenario::KillRegistry | Scenario::KillEtcdLeader
                ))
    }

    /// PlaceOrder calls that still failed after their client's retries, as
    /// a share of all.
    pub fn failed_share(&self) -> f64 {
        self.outcome.failed.len() as f64 / self.outcome.orders.max(1) as f64
    }

    /// Orders that failed for good although they started after the fault
    /// was repaired.
    pub fn failed_after_repair(&self) -> usize {
        self.outcome
            .failed
            .iter()
            .filter(|failed| failed.started > self.repaired)
            .count()
    }

    /// The report as a row under [`TABLE_HEADER`].
    pub fn row(&self) -> String {
        let o = &self.outcome;
        format!(
            "| {}{} | {} | {} | {} | {} | {} ({:.2} %) | {} of {} | {} |",
            self.scenario.name(),
            match self.store {
                StoreKind::Memory => "",
                StoreKind::Etcd => " (registry on etcd, 3 nodes)",
            },
            o.orders,
            o.placed.len(),
            o.placed_after_retry,
            o.refused,
            o.failed.len(),
            self.failed_share() * 100.0,
            o.read_failures,
            o.reads,
            if self.violations.is_empty() && o.wrong.is_empty() {
                "hold".to_string()
            } else {
                let mut broken = self.violations.join("; ");
                for (request_id, code, message) in o.wrong.iter().take(3) {
                    let _ = write!(broken, "; {request_id}: {code:?} {message}");
                }
                broken
            }
        )
    }
}

/// The header of the README's reliability table.
pub const TABLE_HEADER: &str = "| scenario | orders | placed | placed after a retry | refused (stock) | failed after retries | reads failed | invariants |\n|---|---|---|---|---|---|---|---|";

/// Runs one scenario: deploy, load, fault, repair, check, stop.
pub async fn run_scenario(
    bin: &Path,
    scenario: Scenario,
    plan: Plan<'_>,
) -> anyhow::Result<Report> {
    let dir = tempdir(scenario)?;
    let result = run_in(bin, &dir, scenario, plan).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    bin: &Path,
    dir: &Path,
    scenario: Scenario,
    plan: Plan<'_>,
) -> anyhow::Result<Report> {
    let Plan {
        clients,
        duration,
        database_url,
        store,
        tls,
    } = plan;
    if scenario == Scenario::KillEtcdLeader && store != StoreKind::Etcd {
        bail!("the kill-etcd-leader scenario needs --store etcd");
    }
    let mut deployment = Deployment::start(bin, dir, database_url, store, tls).await?;
    let products_db = db::connect(&deployment.url("product"), 2).await?;
    let orders_db = db::connect(&deployment.url("order"), 2).await?;
    product::Entity::update_many()
        .col_expr(product::Column::Stock, Expr::value(STOCK))
        .filter(product::Column::Id.is_in(load::PRODUCTS))
        .exec(&products_db)
        .await?;
    let initial: HashMap<i64, i32> = load::PRODUCTS.iter().map(|id| (*id, STOCK)).collect();

    let mut discovery = deployment.discovery();
    discovery.call_timeout = Duration::from_secs(5);
    let mesh = Mesh::new(&discovery, &deployment.connections)?;
    for (service, count) in [(USER_SERVICE, 1), (PRODUCT_SERVICE, 2), (ORDER_SERVICE, 2)] {
        let channel = mesh.channel(service);
        let ready = channel.wait_for(|endpoints| endpoints.len() == count);
        tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .with_context(|| format!("{service} never had {count} instances"))?;
    }

    // On a cluster, a node no fault touches watches the whole group: a
    // fault that kills no service must remove no instance.
    let removals = match store {
        StoreKind::Etcd => Some(
            count_removals(
                crate::discovery::Config {
                    registry: deployment.registries[2].addr.clone(),
                    ..deployment.discovery()
                },
                &deployment.connections,
            )
            .await?,
        ),
        StoreKind::Memory => None,
    };
    let started = Instant::now();
    let load = tokio::spawn({
        let mesh = mesh.clone();
        async move { load::run(&mesh, clients, duration).await }
    });
    // The fault's schedule: a third of the way in, for a third.
    tokio::time::sleep(duration / 3).await;
    inject(&mut deployment, scenario, duration / 3).await?;
    repair(&mut deployment, scenario).await?;
    let repaired = started.elapsed();
    let outcome = load.await.context("the load")?;
    let mut violations =
        invariants::check(&products_db, &orders_db, &initial, Duration::from_secs(30)).await?;
    if let Some(removals) = removals {
        let removed = removals.load(std::sync::atomic::Ordering::Relaxed);
        // A product stopped past the delete timeout is removed, as a
        // dead one is: only the other faults must remove nothing.
        let silences_a_service = matches!(
            scenario,
            Scenario::KillProduct | Scenario::KillOrder | Scenario::StopProduct
        );
        if removed > 0 && !silences_a_service {
            violations.push(format!(
                "{removed} instance(s) removed though no service died"
            ));
        }
    }
    products_db.close().await.ok();
    orders_db.close().await.ok();
    let exits = deployment.stop().await?;
    Ok(Report {
        scenario,
        outcome,
        violations,
        repaired,
        exits,
        store,
    })
}

/// The process a fault takes out, for the scenarios that take one out.
fn victim(deployment: &mut Deployment, scenario: Scenario) -> Option<&mut crate::harness::Process> {
    match scenario {
        Scenario::KillProduct | Scenario::StopProduct => Some(&mut deployment.products[1]),
        Scenario::KillOrder => Some(&mut deployment.orders[1]),
        Scenario::KillRegistry => deployment.registries.first_mut(),
        _ => None,
    }
}

/// Starts the fault and lets it last `length`.
async fn inject(
    deployment: &mut Deployment,
    scenario: Scenario,
    length: Duration,
) -> anyhow::Result<()> {
    match scenario {
        Scenario::KillProduct | Scenario::KillOrder | Scenario::KillRegistry => {
            victim(deployment, scenario)
                .expect("a victim")
                .kill()
                .await?;
        }
        Scenario::StopProduct => {
            victim(deployment, scenario)
                .expect("a victim")
                .signal(Signal::SIGSTOP)?;
        }
        Scenario::SqliteLocked => {
            let url = deployment.url("product");
            if !url.starts_with("sqlite:") {
                bail!("the sqlite-locked scenario needs the SQLite backend");
            }
            // One connection, holding the write lock for the whole window.
            let locker = db::connect(&url, 1).await?;
            locker.execute_unprepared("BEGIN EXCLUSIVE").await?;
            tokio::time::sleep(length).await;
            locker.execute_unprepared("ROLLBACK").await?;
            locker.close().await.ok();
            return Ok(());
        }
        Scenario::MysqlKill => {
            let url = deployment.url("product");
            if !url.starts_with("mysql:") {
                bail!("the mysql-kill scenario needs a MySQL/MariaDB database");
            }
            let admin = db::connect(&url, 1).await?;
            let until = Instant::now() + length;
            while Instant::now() < until {
                let ids = admin
                    .query_all_raw(sea_orm::Statement::from_string(
                        sea_orm::DbBackend::MySql,
                        "SELECT id FROM information_schema.processlist \
                         WHERE db = DATABASE() AND id <> CONNECTION_ID()",
                    ))
                    .await?;
                for row in ids {
                    let id: i64 = row.try_get_by_index::<i64>(0)?;
                    // It may be gone already.
                    let _ = admin.execute_unprepared(&format!("KILL {id}")).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            admin.close().await.ok();
            return Ok(());
        }
        Scenario::KillEtcdLeader => {
            let etcd = deployment.etcd.as_mut().context("no etcd cluster")?;
            let leader = etcd.leader().await?;
            etcd.kill(leader).await?;
        }
        Scenario::Baseline => {}
    }
    tokio::time::sleep(length).await;
    Ok(())
}

/// Undoes the fault: a killed process starts again (the registry on its
/// port), a stopped one continues.
async fn repair(deployment: &mut Deployment, scenario: Scenario) -> anyhow::Result<()> {
    let bin = deployment.bin.clone();
    if scenario == Scenario::KillEtcdLeader {
        return deployment
            .etcd
            .as_mut()
            .context("no etcd cluster")?
            .restart_all()
            .await;
    }
    match (scenario, victim(deployment, scenario)) {
        (Scenario::StopProduct, Some(stopped)) => stopped.signal(Signal::SIGCONT),
        (_, Some(killed)) => killed.restart(&bin).await,
        (_, None) => Ok(()),
    }
}

fn tempdir(scenario: Scenario) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "shop-mesh-soak-{}-{:?}-{:08x}",
        std::process::id(),
        scenario,
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `shop-mesh soak`: every scenario asked for, one after another, and a
/// table of what happened.
pub async fn run(args: Args) -> anyhow::Result<bool> {
    let bin = std::env::current_exe()?;
    let server = args.database_url.as_deref();
    let scenarios = if args.scenario.is_empty() {
        let mut all = vec![
            Scenario::Baseline,
            Scenario::KillProduct,
            Scenario::KillOrder,
            Scenario::KillRegistry,
            Scenario::StopProduct,
        ];
        if args.store == StoreKind::Etcd {
            all.push(Scenario::KillEtcdLeader);
        }
        match server {
            None => all.push(Scenario::SqliteLocked),
            Some(url) if url.starts_with("mysql:") => all.push(Scenario::MysqlKill),
            Some(_) => {}
        }
        all
    } else {
        args.scenario.clone()
    };
    println!(
        "shop-mesh soak: {} clients, {:?} a scenario, on {}, the registry {}, credentials on{}",
        args.clients,
        args.duration,
        server.map_or("SQLite".to_string(), db::redact),
        match args.store {
            StoreKind::Memory => "in memory",
            StoreKind::Etcd => "as 3 nodes on a 3-member etcd cluster",
        },
        if args.tls {
            ", mutual TLS on every port"
        } else {
            ""
        }
    );
    println!();
    println!("{TABLE_HEADER}");
    let mut all_held = true;
    for scenario in scenarios {
        let database = match server {
            Some(url) => Some(fresh_database(url, scenario).await?),
            None => None,
        };
        let plan = Plan {
            clients: args.clients,
            duration: args.duration,
            database_url: database.as_ref().map(|(url, _)| url.as_str()),
            store: args.store,
            tls: args.tls,
        };
        let report = run_scenario(&bin, scenario, plan).await;
        if let (Some(url), Some((_, name))) = (server, &database)
            && let Err(err) = db::drop_database(url, name).await
        {
            tracing::warn!(%err, name, "cannot drop the scenario's database");
        }
        let report = report?;
        all_held &= report.violations.is_empty() && report.outcome.wrong.is_empty();
        println!("{}", report.row());
    }
    Ok(all_held)
}

/// Watches every service of the default group through the registry at
/// `addr` and counts the instances it sees removed.
async fn count_removals(
    node: crate::discovery::Config,
    connections: &crate::server::Connections,
) -> anyhow::Result<Arc<AtomicUsize>> {
    use crate::pb::registry as pb;
    let (mut client, _) = crate::inspect::client(&node, connections).await?;
    let mut events = client
        .watch(pb::WatchRequest::default())
        .await
        .context("watch the group")?
        .into_inner();
    let removed = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let removed = removed.clone();
        async move {
            while let Ok(Some(answer)) = events.message().await {
                if let Some(pb::watch_response::Body::Change(change)) = answer.body
                    && change.kind == pb::change::Kind::Delete as i32
                {
                    removed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    Ok(removed)
}

/// A new database beside the one `server` names; its URL and name.
async fn fresh_database(server: &str, scenario: Scenario) -> anyhow::Result<(String, String)> {
    let name = format!("shopmesh_soak_{:?}_{:08x}", scenario, rand::random::<u32>()).to_lowercase();
    Ok((db::create_database(server, &name).await?, name))
}
