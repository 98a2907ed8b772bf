//! `shop-mesh services | instances | watch`, the real binary against an
//! in-process registry.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::Command;

use crate::{TestRegistry, deregister, instance, register};

use crate::{BIN, run_bin};

#[tokio::test]
async fn services_and_instances_print_tables_and_json() {
    let registry = TestRegistry::start().await;
    let mut client = registry.client().await;
    let mut product = instance("server-product", 8070);
    product.weight = Some(2.0);
    register(&mut client, product).await;
    let addr = registry.addr.to_string();

    let (ok, out, _) = run_bin(&["services", "--registry", &addr]).await;
    assert!(ok);
    assert_eq!(
        out,
        format!(
            "SERVICE         INSTANCES  HEALTHY\nserver-product  1          1\n\nanswered by {addr}\n"
        )
    );

    let (ok, out, _) = run_bin(&["instances", "server-product", "--registry", &addr]).await;
    assert!(ok);
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .starts_with("127.0.0.1:8070  DEFAULT  2  "),
        "{out}"
    );

    let (ok, out, _) =
        run_bin(&["instances", "server-product", "--registry", &addr, "--json"]).await;
    assert!(ok);
    let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(line["address"], "127.0.0.1:8070");
    assert_eq!(line["healthy"], true);
    assert_eq!(line["answered_by"], addr.as_str(), "{line}");

    // With several addresses, the first that answers does, and says so.
    let dead = "127.0.0.1:1";
    let (ok, out, _) = run_bin(&[
        "instances",
        "server-product",
        "--registry",
        &format!("{dead},{addr}"),
    ])
    .await;
    assert!(ok);
    assert!(out.ends_with(&format!("\nanswered by {addr}\n")), "{out}");

    // One registry on the memory store: itself the one node, no etcd to
    // list.
    let (ok, out, _) = run_bin(&["cluster", "--registry", &addr]).await;
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    let head = format!(
        "{:<width$}  VERSION  STARTED",
        "REGISTRY NODE",
        width = addr.len().max("REGISTRY NODE".len())
    );
    assert_eq!(
        lines[..5],
        [
            format!("NODE      {addr}").as_str(),
            "STORE     memory",
            "REVISION  1",
            "",
            head.as_str(),
        ],
        "{out}"
    );
    let node: Vec<&str> = lines[5].split_whitespace().collect();
    assert_eq!(node.len(), 4, "{out}");
    assert_eq!(
        [node[0], node[1], node[3]],
        [addr.as_str(), env!("CARGO_PKG_VERSION"), "answered"],
        "{out}"
    );
    assert!(node[2].ends_with('Z'), "started, in UTC: {out}");
    assert!(out.ends_with(&format!("\n\nanswered by {addr}\n")), "{out}");
    let (ok, out, _) = run_bin(&["cluster", "--registry", &addr, "--json"]).await;
    assert!(ok);
    let cluster: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(cluster["nodes"].as_array().unwrap().len(), 1, "{cluster}");
    assert_eq!(cluster["nodes"][0]["address"], addr.as_str(), "{cluster}");
    assert_eq!(cluster["nodes"][0]["answering"], true, "{cluster}");

    let (ok, _, err) = run_bin(&["instances", "nobody", "--registry", &addr]).await;
    assert!(!ok);
    assert!(
        err.contains("NotFound: service public/DEFAULT_GROUP/nobody is not registered"),
        "{err}"
    );
    registry.stop().await;
}

/// The next line the watch prints, as JSON; within 10 s.
pub async fn next_json<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut Lines<R>,
) -> serde_json::Value {
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("a line within 10 s")
        .expect("readable output")
        .expect("the watch still running");
    serde_json::from_str(&line).expect("a JSON line")
}

#[tokio::test]
async fn watch_prints_each_change_as_it_happens() {
    let registry = TestRegistry::start().await;
    let addr = registry.addr.to_string();
    let mut child = Command::new(BIN)
        .args(["watch", "server-user", "--registry", &addr, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    let mut client = registry.client().await;
    // Registered until the watch has seen it: the watch may start after
    // the first registration (then it is in its snapshot) or before.
    register(&mut client, instance("server-user", 8060)).await;
    let first = next_json(&mut lines).await;
    assert!(
        ["put", "snapshot"].contains(&first["event"].as_str().unwrap()),
        "{first}"
    );
    assert_eq!(first["instance"]["address"], "127.0.0.1:8060");
    assert_eq!(first["answered_by"], addr.as_str(), "{first}");

    deregister(&mut client, "server-user", 8060).await.unwrap();
    let next = next_json(&mut lines).await;
    assert_eq!(next["event"], "delete");
    child.kill().await.unwrap();
    registry.stop().await;
}
