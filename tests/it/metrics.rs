//! Every role's `/metrics`, read as a Prometheus reads it: checked by
//! `promtool check metrics` (Prometheus's own linter, required under CI)
//! and parsed by a second, independent parser; and the counters an
//! operator watches, moved by what happens to the shop.

use std::net::SocketAddr;
use std::time::Duration;

use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};
use shop_mesh::discovery::{self, Mesh};
use shop_mesh::harness::Isolated;
use shop_mesh::pb::shop as pb;
use shop_mesh::pb::shop::order_service_client::OrderServiceClient;
use shop_mesh::roles::ShopRole;

use crate::TestRegistry;
use crate::shop::{Backend, TestShop};

/// One scrape of a role, parsed.
struct Scrape {
    exposition: MetricsExposition<PrometheusType, PrometheusValue>,
    /// As served: a family with no series yet is only its HELP and TYPE.
    text: String,
}

impl Scrape {
    /// GETs `addr`'s `/metrics`; checks it as Prometheus would.
    async fn of(addr: SocketAddr) -> Scrape {
        let answer = crate::http::send(addr, "GET", "/metrics", &[], None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(
            answer.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        promtool_accepts(&answer.body);
        let exposition = openmetrics_parser::prometheus::parse_prometheus(&answer.body)
            .unwrap_or_else(|err| panic!("{err:?} in:\n{}", answer.body));
        Scrape {
            exposition,
            text: answer.body,
        }
    }

    /// The sum of the samples of `family` whose labels include `labels`
    /// (a histogram counts its observations); 0 when there are none.
    fn value(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        let Some(found) = self.exposition.families.get(family) else {
            return 0.0;
        };
        let names = std::sync::Arc::new(found.get_label_names().to_vec());
        found
            .iter_samples()
            .filter(|sample| {
                let set = openmetrics_parser::LabelSet::new(names.clone(), sample).unwrap();
                labels
                    .iter()
                    .all(|(name, value)| set.get_label_value(name) == Some(value))
            })
            .map(|sample| match &sample.value {
                PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
                PrometheusValue::Counter(c) => c.value.as_f64(),
                PrometheusValue::Histogram(h) => h.count.unwrap_or_default() as f64,
                PrometheusValue::Summary(s) => s.count.unwrap_or_default() as f64,
            })
            .sum()
    }

    /// Whether `family` is served, series or not (a family with none yet
    /// is its HELP and TYPE lines alone, which the parser drops).
    fn has(&self, family: &str) -> bool {
        self.text.lines().any(|line| {
            line.strip_prefix("# TYPE ")
                .and_then(|typed| typed.split(' ').next())
                == Some(family)
        })
    }

    /// Whether a series named `series` (a family's name, or a histogram's
    /// `_bucket`, `_sum` or `_count`) is here.
    fn has_series(&self, series: &str) -> bool {
        self.has(series)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                series
                    .strip_suffix(suffix)
                    .is_some_and(|family| self.has(family))
            })
    }
}

/// `promtool check metrics` finds nothing wrong: no parse error and no
/// lint (a counter without `_total`, a missing HELP, a unit spelt short).
fn promtool_accepts(text: &str) {
    let Some(out) = promtool(
        &["check", "metrics"],
        text,
        "the scrape is checked by the parser alone",
    ) else {
        return;
    };
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\nin:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `promtool args` with `input` on its standard input; `None`, saying
/// that `unchecked`, when promtool is not installed (required under CI).
fn promtool(args: &[&str], input: &str, unchecked: &str) -> Option<std::process::Output> {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) if std::env::var_os("CI").is_none() => {
            crate::skipped(&format!(
                "promtool ({err}): {unchecked}; install Debian's prometheus package"
            ));
            return None;
        }
        Err(err) => panic!("promtool is required under CI: {err}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    Some(child.wait_with_output().unwrap())
}

/// Every word of `text` that names one of shop-mesh's series (its own,
/// the process's, the runtime's).
fn series_named(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| {
            ["shop_mesh_", "process_", "tokio_"]
                .iter()
                .any(|prefix| word.starts_with(prefix))
        })
        .map(str::to_owned)
        .collect()
}

/// `promtool check rules` loads the alerting rules as Prometheus would.
#[test]
fn the_alerting_rules_load_in_prometheus() {
    let rules = format!(
        "{}/docs/observability/alerts.yml",
        env!("CARGO_MANIFEST_DIR")
    );
    let Some(out) = promtool(
        &["check", "rules", &rules],
        "",
        "the alerting rules are not checked",
    ) else {
        return;
    };
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("SUCCESS: 9 rules found"), "{said}");
}

fn order(product_id: i64, request_id: &str) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        user_id: 1001,
        product_id,
        count: 1,
        request_id: request_id.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_serves_metrics_and_an_order_moves_them() {
    let shop = TestShop::start(Backend::Sqlite, "metrics", 1, 1)
        .await
        .unwrap();
    let roles = [
        ("registry", shop.registry.addr),
        ("user", shop.addr(ShopRole::User)),
        ("product", shop.addr(ShopRole::Product)),
        ("order", shop.addr(ShopRole::Order)),
    ];
    let mut before = Vec::new();
    for (_, addr) in roles {
        before.push(Scrape::of(addr).await);
    }

    let mut orders = shop.orders();
    orders.place_order(order(1001, "metrics-1")).await.unwrap();
    let refused = orders
        .place_order(order(4040, "metrics-2"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);

    let mut after = Vec::new();
    for (_, addr) in roles {
        after.push(Scrape::of(addr).await);
    }
    let moved = |role: usize, family: &str, labels: &[(&str, &str)]| {
        after[role].value(family, labels) - before[role].value(family, labels)
    };
    let (registry, user, product, order_role) = (0, 1, 2, 3);

    // The order service: the orders, its calls served and made, its
    // discovery, its database.
    assert_eq!(
        moved(
            order_role,
            "shop_mesh_orders_total",
            &[("outcome", "placed"), ("reason", "OK")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            order_role,
            "shop_mesh_orders_total",
            &[("outcome", "refused"), ("reason", "NOT_FOUND")]
        ),
        1.0
    );
    let place_order = [
        ("service", "shopmesh.shop.v1.OrderService"),
        ("method", "PlaceOrder"),
    ];
    assert_eq!(
        moved(
            order_role,
            "shop_mesh_grpc_server_handled_total",
            &[place_order[0], place_order[1], ("code", "OK")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            order_role,
            "shop_mesh_grpc_server_handling_seconds",
            &place_order
        ),
        2.0
    );
    assert_eq!(
        moved(
            order_role,
            "shop_mesh_grpc_client_handled_total",
            &[("method", "DeductStock"), ("code", "OK")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            order_role,
            "shop_mesh_discovery_calls_total",
            &[("service", "server-user")]
        ),
        2.0
    );
    assert_eq!(
        moved(
            order_role,
            "shop_mesh_discovery_calls_total",
            &[("service", "server-product")]
        ),
        3.0,
        "GetProduct twice, DeductStock once"
    );
    assert_eq!(
        after[order_role].value(
            "shop_mesh_discovery_endpoints",
            &[("service", "server-product"), ("state", "active")]
        ),
        1.0
    );
    assert_eq!(
        after[order_role].value(
            "shop_mesh_discovery_registry_watching",
            &[("service", "server-product")]
        ),
        1.0
    );
    assert_eq!(
        after[order_role].value("shop_mesh_orders_in_flight", &[]),
        0.0
    );
    assert!(
        moved(
            order_role,
            "shop_mesh_db_statement_seconds",
            &[("result", "ok")]
        ) >= 2.0
    );
    assert_eq!(
        after[order_role].value("shop_mesh_db_pool_max_connections", &[]),
        f64::from(shop.config.order.max_connections)
    );

    // The product and user services.
    assert_eq!(
        moved(
            product,
            "shop_mesh_stock_deductions_total",
            &[("result", "deducted")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            product,
            "shop_mesh_grpc_server_handled_total",
            &[("method", "GetProduct"), ("code", "NOT_FOUND")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            user,
            "shop_mesh_grpc_server_handled_total",
            &[("method", "GetUser"), ("code", "OK")]
        ),
        2.0
    );

    // The registry holds the three, healthy, and counts its calls.
    let public = [("namespace", "public")];
    assert_eq!(
        after[registry].value("shop_mesh_registry_services", &public),
        3.0
    );
    assert_eq!(
        after[registry].value(
            "shop_mesh_registry_instances",
            &[public[0], ("health", "healthy")]
        ),
        3.0
    );
    assert_eq!(after[registry].value("shop_mesh_registry_leases", &[]), 3.0);
    assert!(after[registry].value("shop_mesh_registry_watchers", &[]) >= 2.0);
    assert!(after[registry].value("shop_mesh_registry_revision", &[]) >= 3.0);
    assert!(
        after[registry].value(
            "shop_mesh_grpc_server_started_total",
            &[
                ("service", "shopmesh.registry.v1.Registry"),
                ("method", "KeepAlive")
            ]
        ) >= 3.0
    );

    // Every role reports its process.
    for scrape in &after {
        assert!(scrape.value("process_resident_memory_bytes", &[]) > 1e6);
        assert!(scrape.value("process_open_fds", &[]) > 0.0);
        assert!(scrape.value("tokio_workers", &[]) >= 1.0);
    }

    // The dashboard and the alerts in the repository name only series
    // that these roles serve.
    for doc in ["grafana-dashboard.json", "alerts.yml"] {
        let path = format!("{}/docs/observability/{doc}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        let named = series_named(&text);
        assert!(named.len() > 5, "{doc} names {named:?}");
        for series in named {
            assert!(
                after.iter().any(|scrape| scrape.has_series(&series)),
                "{doc} names {series}, which no role serves"
            );
        }
    }
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_then_killed_product_is_ejected_then_expired() {
    let registry = TestRegistry::start_with(|config| {
        config.min_heartbeat_interval = Duration::from_millis(100);
        config.heartbeat_interval = Duration::from_millis(200);
        // Long enough for the order service to eject the hung instance
        // before the registry gives up on it.
        config.unhealthy_timeout = Duration::from_secs(4);
        config.delete_timeout = Duration::from_secs(6);
    })
    .await;
    let shop = TestShop::start_beside(
        registry,
        Backend::Sqlite,
        "metrics-ejection",
        1,
        1,
        |config| {
            config.discovery.call_timeout = Duration::from_millis(300);
            config.discovery.ejection_base = Duration::from_secs(30);
        },
    )
    .await
    .unwrap();
    let mut second = Isolated::role(ShopRole::Product, &shop.config).unwrap();
    let products = shop.mesh.channel(shop_mesh::shop::PRODUCT_SERVICE);
    tokio::time::timeout(Duration::from_secs(10), products.wait_for(|e| e.len() == 2))
        .await
        .expect("the second product instance registers");
    let (order_addr, registry_addr) = (shop.addr(ShopRole::Order), shop.registry.addr);
    let start = Scrape::of(registry_addr).await;

    // Hung: its connections stay open and nothing answers, so the order
    // service's calls to it time out until it is ejected.
    second.freeze();
    // A client more patient than the order service's 300 ms per call, so
    // that its calls to the hung instance time out, fail and are retried,
    // rather than being cancelled with the order.
    let patient = Mesh::new(
        &discovery::Config {
            call_timeout: Duration::from_secs(5),
            ..shop.config.discovery.clone()
        },
        &shop.config.connections,
    )
    .unwrap();
    let mut orders = OrderServiceClient::new(patient.channel(shop_mesh::shop::ORDER_SERVICE));
    let mut placed = 0;
    crate::wait_until(
        "the hung product instance to be ejected",
        Duration::from_secs(20),
        || {
            placed += 1;
            let request = order(1001, &format!("hung-{placed}"));
            let mut orders = orders.clone();
            async move {
                let _ = orders.place_order(request).await;
                let scrape = Scrape::of(order_addr).await;
                scrape.value(
                    "shop_mesh_discovery_ejections_total",
                    &[("service", "server-product")],
                ) >= 1.0
            }
        },
    )
    .await;
    let scrape = Scrape::of(order_addr).await;
    assert!(
        scrape.value(
            "shop_mesh_discovery_failed_attempts_total",
            &[("service", "server-product")]
        ) >= 3.0
    );
    assert_eq!(
        scrape.value(
            "shop_mesh_discovery_endpoints",
            &[("service", "server-product"), ("state", "ejected")]
        ),
        1.0
    );

    // Its heartbeats stopped too: past its unhealthy timeout the
    // registry marks it, then the kill breaks its lease's stream and it is
    // removed after the delete timeout.
    crate::wait_until(
        "the registry to mark the hung instance unhealthy",
        Duration::from_secs(10),
        || async {
            let scrape = Scrape::of(registry_addr).await;
            scrape.value(
                "shop_mesh_registry_lease_expiries_total",
                &[("outcome", "unhealthy")],
            ) > start.value(
                "shop_mesh_registry_lease_expiries_total",
                &[("outcome", "unhealthy")],
            ) && scrape.value("shop_mesh_registry_instances", &[("health", "unhealthy")]) == 1.0
        },
    )
    .await;
    second.kill();
    crate::wait_until(
        "the registry to remove the killed instance",
        Duration::from_secs(10),
        || async {
            let scrape = Scrape::of(registry_addr).await;
            scrape.value(
                "shop_mesh_registry_lease_expiries_total",
                &[("outcome", "removed")],
            ) >= 1.0
                && scrape.value("shop_mesh_registry_instances", &[("health", "unhealthy")]) == 0.0
        },
    )
    .await;
    crate::wait_until(
        "the order service to forget it",
        Duration::from_secs(10),
        || async {
            let scrape = Scrape::of(order_addr).await;
            scrape.value(
                "shop_mesh_discovery_endpoints",
                &[("service", "server-product")],
            ) == 1.0
        },
    )
    .await;
    orders
        .place_order(order(1001, "after-the-kill"))
        .await
        .unwrap();
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_to_their_own_port_or_go_when_off() {
    let registry = TestRegistry::start().await;
    let apart = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let apart_addr = apart.local_addr().unwrap();
    drop(apart);
    let shop = TestShop::start_beside(registry, Backend::Sqlite, "metrics-apart", 1, 0, |config| {
        config.user.metrics_listen = Some(apart_addr);
        config.telemetry.metrics = true;
    })
    .await
    .unwrap();
    let scrape = Scrape::of(apart_addr).await;
    assert!(scrape.has("process_resident_memory_bytes"));
    // Not on the gRPC port, which then speaks HTTP/2 alone.
    let own = crate::http::try_send(shop.addr(ShopRole::User), "GET", "/metrics").await;
    assert_eq!(own, None, "/metrics is still served on the gRPC port");
    shop.stop().await;

    let off = TestShop::start_with(Backend::Sqlite, "metrics-off", 1, 0, |config| {
        config.telemetry.metrics = false;
    })
    .await
    .unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        crate::http::try_send(off.addr(ShopRole::Product), "GET", "/metrics"),
    )
    .await
    .expect("an answer or a closed connection");
    assert!(
        !matches!(answer, Some(200)),
        "/metrics is served with metrics off"
    );
    off.stop().await;
}
