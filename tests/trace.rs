//! One PlaceOrder, one trace: the order service's span and, beneath it,
//! its calls to the user and product services (each attempt, each
//! service's own span of the call, and the database transactions),
//! exported over OTLP to a collector in this process.
//!
//! A test binary of its own: the subscriber and the trace exporter belong
//! to the whole process, and every span of another test would land here.

use std::collections::HashMap;
use std::time::Duration;

use shop_mesh::config::Config;
use shop_mesh::discovery::Mesh;
use shop_mesh::harness::{CollectedSpan, Collector};
use shop_mesh::pb::shop as pb;
use shop_mesh::pb::shop::order_service_client::OrderServiceClient;
use shop_mesh::shop::ORDER_SERVICE;
use shop_mesh::shutdown::Shutdown;
use shop_mesh::telemetry;
use shop_mesh::up::Stack;

/// OTLP's span kinds.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_place_order_is_one_trace_across_the_services() {
    telemetry::init(&Default::default());
    let collector = Collector::start().await.unwrap();
    let exporting = telemetry::trace::export(&collector.endpoint()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.on_loopback(dir.path());
    config.registry.nacos.enabled = false;
    config.registry.console.enabled = false;
    let stack = Stack::start(&config, 1, Shutdown::new()).await.unwrap();
    let mesh = Mesh::new(stack.discovery(), &config.connections).unwrap();
    let mut orders = OrderServiceClient::new(mesh.channel(ORDER_SERVICE));
    let placed = orders
        .place_order(pb::PlaceOrderRequest {
            user_id: 1001,
            product_id: 1001,
            count: 2,
            request_id: "traced".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(placed.total_price, "4798.00");

    // Spans are batched: flush until the order's server span is in.
    let spans = {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            exporting.flush().await;
            let spans = collector.spans();
            let done = spans
                .iter()
                .filter(|s| s.trace_id == trace_of(&spans))
                .count();
            if done >= 12 || tokio::time::Instant::now() > give_up {
                break spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let trace = trace_of(&spans);
    let in_trace: Vec<&CollectedSpan> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let by_id: HashMap<&str, &CollectedSpan> =
        in_trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let names: Vec<&str> = in_trace.iter().map(|s| s.name.as_str()).collect();
    let one = |name: &str, kind: i32| -> &CollectedSpan {
        let found: Vec<_> = in_trace
            .iter()
            .filter(|s| s.name == name && s.kind == kind)
            .collect();
        assert_eq!(found.len(), 1, "one {name} (kind {kind}) in {names:?}");
        found[0]
    };
    let parent = |span: &CollectedSpan| -> &CollectedSpan {
        by_id
            .get(span.parent_span_id.as_str())
            .unwrap_or_else(|| panic!("the parent of {} is in the trace: {names:?}", span.name))
    };

    // The root: PlaceOrder as the order service served it, under the
    // client's call.
    let root = one("shopmesh.shop.v1.OrderService/PlaceOrder", SERVER);
    // Each call the order service made: a client span under the root, an
    // attempt under that, and the callee's server span under the client
    // span (its parent carried in the metadata).
    for method in [
        "shopmesh.shop.v1.UserService/GetUser",
        "shopmesh.shop.v1.ProductService/GetProduct",
        "shopmesh.shop.v1.ProductService/DeductStock",
    ] {
        let client = one(method, CLIENT);
        assert_eq!(
            parent(client).span_id,
            root.span_id,
            "{method} made under PlaceOrder"
        );
        let server = one(method, SERVER);
        assert_eq!(
            parent(server).span_id,
            client.span_id,
            "{method} served under the call"
        );
        assert!(
            in_trace
                .iter()
                .any(|s| s.name == "attempt" && s.parent_span_id == client.span_id),
            "an attempt of {method}: {names:?}"
        );
    }
    // The database transactions, under the services that ran them.
    for (transaction, under) in [
        ("orders.claim", root),
        ("orders.place", root),
        (
            "products.deduct",
            one("shopmesh.shop.v1.ProductService/DeductStock", SERVER),
        ),
    ] {
        let span = one(transaction, CLIENT);
        assert_eq!(parent(span).span_id, under.span_id, "{transaction}");
    }
    // Nothing else joined it: the services' own registry calls are
    // traces of their own.
    assert!(
        in_trace
            .iter()
            .all(|s| !s.name.starts_with("shopmesh.registry")),
        "{names:?}"
    );

    drop(exporting);
    stack.stop(Ok(())).await.unwrap();
}

/// The trace of the order service's PlaceOrder span, once it is in.
fn trace_of(spans: &[CollectedSpan]) -> String {
    spans
        .iter()
        .find(|s| s.name == "shopmesh.shop.v1.OrderService/PlaceOrder" && s.kind == SERVER)
        .map(|s| s.trace_id.clone())
        .unwrap_or_default()
}
