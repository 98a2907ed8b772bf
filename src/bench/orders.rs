//! `shop-mesh bench orders`: the shop under load, the whole path a real
//! order takes (client → order service → user and product services, each
//! found through the registry → the databases), on SQLite or on a server
//! database given by URL.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use parking_lot::Mutex;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};

use super::{CallFigures, TelemetryArgs, TelemetryMode, histogram, print_rounds, us};
use crate::config::Config;
use crate::discovery::{Mesh, retry_safe};
use crate::order::store::order;
use crate::pb::shop as pb;
use crate::pb::shop::order_service_client::OrderServiceClient;
use crate::pb::shop::product_service_client::ProductServiceClient;
use crate::product::store::product;
use crate::shop::{ORDER_SERVICE, PRODUCT_SERVICE, db};
use crate::shutdown::Shutdown;
use crate::telemetry;
use crate::up::Stack;

/// The product the bench buys, and the stock it gives it first.
const PRODUCT: i64 = 1001;
const STOCK: i32 = 100_000_000;

/// `shop-mesh bench orders`: orders placed per second through the whole
/// stack, on the database chosen.
#[derive(Debug, Clone, clap::Args)]
pub struct OrdersBench {
    /// One database for all three services: an empty scratch database,
    /// since the bench raises a product's stock. By default SQLite files
    /// in a temporary directory.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Clients placing orders at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// How long each phase runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// User and product instances (one order instance).
    #[arg(long, default_value_t = 1)]
    pub replicas: u16,
    /// The shop's telemetry, and rounds.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// What one run of the shop measured.
struct Orders {
    backend: String,
    placed: Phase,
    read: Phase,
    /// Stock the product lost, and orders in the order table.
    sold: i64,
    stored: u64,
}

impl Orders {
    /// What was sold is what the stock lost: nothing oversold, nothing
    /// lost, under load.
    fn check(&self) -> anyhow::Result<()> {
        if self.sold as u64 != self.stored {
            bail!("the stock sold and the orders stored differ");
        }
        Ok(())
    }

    fn print(&self) {
        let backend = &self.backend;
        println!();
        println!("| {backend} | result |");
        println!("|---|---|");
        println!("| PlaceOrder/s | {} |", self.placed.line());
        println!("| GetProduct/s through discovery | {} |", self.read.line());
        println!(
            "| stock sold / orders stored / orders answered | {} / {} / {} |",
            self.sold, self.stored, self.placed.ok
        );
    }
}

impl OrdersBench {
    /// Measures, then prints a Markdown table; with several `--telemetry`
    /// modes, each mode's medians over rounds, a fresh shop each time.
    pub async fn run(self) -> anyhow::Result<()> {
        if self.concurrency == 0 || self.replicas == 0 {
            bail!("--concurrency and --replicas must be at least 1");
        }
        self.telemetry.check()?;
        println!(
            "shop-mesh orders bench on {}: {} clients, {} user and product instances, {:?} a phase",
            self.backend(),
            self.concurrency,
            self.replicas,
            self.duration
        );
        if !self.telemetry.several() {
            let orders = self.once(self.telemetry.single()).await?;
            orders.print();
            return orders.check();
        }
        if self.database_url.is_some() {
            bail!(
                "several --telemetry modes need a fresh database each round: leave out --database-url (SQLite in a temporary directory)"
            );
        }
        let calls = ["PlaceOrder", "GetProduct through discovery"];
        let this = &self;
        let rounds = self
            .telemetry
            .in_rounds(&calls, move |mode| async move {
                let orders = this.once(Some(mode)).await?;
                orders.check()?;
                let failed = orders.placed.failed.len() + orders.read.failed.len();
                if failed > 0 {
                    println!("    {failed} calls failed");
                }
                Ok(vec![orders.placed.figures(), orders.read.figures()])
            })
            .await?;
        print_rounds(&self.telemetry, &calls, &rounds);
        Ok(())
    }

    /// "sqlite", or the scheme of `--database-url`.
    fn backend(&self) -> &str {
        self.database_url
            .as_deref()
            .and_then(|url| url.split_once("://"))
            .map_or("sqlite", |(scheme, _)| scheme)
    }

    /// One run on a shop started for it, in a fresh temporary directory,
    /// with the telemetry of `telemetry` (none: the configuration's).
    async fn once(&self, telemetry: Option<TelemetryMode>) -> anyhow::Result<Orders> {
        let dir = std::env::temp_dir().join(format!(
            "shop-mesh-bench-orders-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let mut config = Config::default();
        let telemetry = super::Telemetry::start(telemetry).await?;
        if let Some(telemetry) = &telemetry {
            telemetry.apply(&mut config.telemetry);
        }
        // The roles run in this process: its exporter is theirs.
        let exporting = telemetry::start_tracing(&config.telemetry)?;
        config.on_loopback(&dir);
        for service in [&mut config.user, &mut config.product, &mut config.order] {
            service.database_url = self.database_url.clone();
        }
        let stack = Stack::start(&config, self.replicas, Shutdown::new()).await?;
        let result = self.measure(&config, &stack).await;
        let stopped = stack.stop(Ok(())).await;
        if let Some(exporting) = exporting {
            exporting.finish().await;
        }
        if let Some(telemetry) = &telemetry {
            telemetry.report();
        }
        let _ = std::fs::remove_dir_all(&dir);
        result.and_then(|orders| stopped.map(|()| orders))
    }

    async fn measure(&self, config: &Config, stack: &Stack) -> anyhow::Result<Orders> {
        let orders_db = db::connect(&db::url(&config.order, "order"), 2).await?;
        if order::Entity::find().count(&orders_db).await? > 0 {
            bail!("the order table is not empty: bench orders needs a scratch database");
        }
        let products_db = db::connect(&db::url(&config.product, "product"), 2).await?;
        product::Entity::update_many()
            .col_expr(product::Column::Stock, Expr::value(STOCK))
            .filter(product::Column::Id.eq(PRODUCT))
            .exec(&products_db)
            .await?;

        let mesh = Mesh::new(stack.discovery(), &config.connections)?;
        let orders = OrderServiceClient::new(mesh.channel(ORDER_SERVICE));
        let products = ProductServiceClient::new(mesh.channel(PRODUCT_SERVICE));

        let placed = self
            .phase(move |task, n| {
                let mut orders = orders.clone();
                async move {
                    let request = pb::PlaceOrderRequest {
                        user_id: 1001,
                        product_id: PRODUCT,
                        count: 1,
                        request_id: format!("bench-{task}-{n}"),
                    };
                    orders
                        .place_order(retry_safe(tonic::Request::new(request)))
                        .await
                        .map(drop)
                }
            })
            .await;
        let read = self
            .phase(move |_, _| {
                let mut products = products.clone();
                async move {
                    products
                        .get_product(retry_safe(tonic::Request::new(pb::GetProductRequest {
                            id: PRODUCT,
                        })))
                        .await
                        .map(drop)
                }
            })
            .await;

        let stock = product::Entity::find_by_id(PRODUCT)
            .one(&products_db)
            .await?
            .map_or(0, |p| p.stock);
        let stored = order::Entity::find().count(&orders_db).await?;
        Ok(Orders {
            backend: self.backend().to_string(),
            placed,
            read,
            sold: i64::from(STOCK - stock),
            stored,
        })
    }

    /// Runs `call(task, n)` from `concurrency` tasks for `duration`.
    async fn phase<F, Fut>(&self, call: F) -> Phase
    where
        F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<(), tonic::Status>> + Send,
    {
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let cpu = || crate::harness::cpu_time(std::process::id());
        let cpu_before = cpu();
        let started = Instant::now();
        let until = started + self.duration;
        let tasks: Vec<_> = (0..self.concurrency)
            .map(|task| {
                let (call, ok, failed) = (call.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut latency = histogram();
                    let mut n = 0;
                    while Instant::now() < until {
                        let one = Instant::now();
                        match call(task, n).await {
                            Ok(()) => {
                                latency.saturating_record(one.elapsed().as_micros() as u64);
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(status) => failed.lock().push(status.code()),
                        }
                        n += 1;
                    }
                    latency
                })
            })
            .collect();
        let mut latency = histogram();
        for task in tasks {
            if let Ok(one) = task.await {
                let _ = latency.add(one);
            }
        }
        let failed = std::mem::take(&mut *failed.lock());
        let ok = ok.load(Ordering::Relaxed);
        Phase {
            ok,
            failed,
            elapsed: started.elapsed(),
            cpu: super::cpu_per_call(cpu_before, cpu(), ok),
            latency,
        }
    }
}

struct Phase {
    ok: usize,
    failed: Vec<tonic::Code>,
    elapsed: Duration,
    /// CPU time a call, µs: of this process, where every role and the
    /// clients run.
    cpu: Option<f64>,
    latency: hdrhistogram::Histogram<u64>,
}

impl Phase {
    fn figures(&self) -> CallFigures {
        CallFigures::of(
            &self.latency,
            Some(self.ok as f64 / self.elapsed.as_secs_f64()),
        )
        .cpu(self.cpu)
    }

    fn line(&self) -> String {
        format!(
            "{:.0} (p50 {}, p99 {}; {} failed{})",
            self.ok as f64 / self.elapsed.as_secs_f64(),
            us(self.latency.value_at_quantile(0.5)),
            us(self.latency.value_at_quantile(0.99)),
            self.failed.len(),
            self.failed
                .first()
                .map_or(String::new(), |code| format!(", first {code:?}"))
        )
    }
}
