//! Traces from the real binary: `shop-mesh up` exporting over OTLP, as
//! `SHOP_MESH__TELEMETRY__OTLP_ENDPOINT` configures it, to a collector in
//! this test; its log lines carry the trace id of the call they are in,
//! and a stop flushes what is still batched.

use nix::sys::signal::Signal;
use shop_mesh::harness::Collector;

use crate::run_bin_with;

/// OTLP's span kind for a server's side of a call.
const SERVER: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_exports_an_order_as_one_trace_and_its_log_line_names_it() {
    let collector = Collector::start().await.unwrap();
    let endpoint = collector.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let args = vec![
        "up".to_string(),
        "--data-dir".to_string(),
        dir.path().join("data").display().to_string(),
    ];
    let env = [
        ("SHOP_MESH__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
        ("RUST_LOG", "info,shop_mesh::order=debug"),
    ];
    let (mut up, summary) = crate::start_up(args, &env).await;
    let registry = summary
        .lines()
        .find(|line| line.starts_with("registry "))
        .and_then(|line| line.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("up names its registry: {summary}"))
        .to_string();
    let reader = [(
        "SHOP_MESH__DISCOVERY__TOKEN_FILE",
        crate::shell_token(&summary),
    )];
    let (ok, _, err) = run_bin_with(&crate::place_order("2", &registry), &reader).await;
    assert!(ok, "{err}");

    // The order service's line, logged inside PlaceOrder's span.
    let line = up.log_line("order placed").await.unwrap();
    let trace_id = line["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|span| span["trace_id"].as_str())
        .unwrap_or_else(|| panic!("the line carries a trace id: {line}"))
        .to_string();
    assert_eq!(trace_id.len(), 32, "{line}");

    // A stop flushes the batch: everything is at the collector after it.
    assert_eq!(up.stop_with(Signal::SIGINT).await.unwrap(), Some(0));
    let spans = collector.spans();
    let served: Vec<&str> = spans
        .iter()
        .filter(|span| span.trace_id == trace_id && span.kind == SERVER)
        .map(|span| span.name.as_str())
        .collect();
    for method in [
        "shopmesh.shop.v1.OrderService/PlaceOrder",
        "shopmesh.shop.v1.UserService/GetUser",
        "shopmesh.shop.v1.ProductService/GetProduct",
        "shopmesh.shop.v1.ProductService/DeductStock",
    ] {
        assert!(
            served.contains(&method),
            "{method} is served in the order's trace: {served:?}"
        );
    }
    let root = spans
        .iter()
        .find(|span| span.name == "shopmesh.shop.v1.OrderService/PlaceOrder")
        .unwrap();
    assert!(root.parent_span_id.is_empty(), "{root:?}");
}
