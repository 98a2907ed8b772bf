//! The registry as a cluster of processes: three `shop-mesh registry
//! --store etcd` processes over a real 3-member etcd cluster, a user and a
//! product service given all three addresses, and a watcher on a node that
//! stays up recording every change. The node the services keep their
//! leases alive through is killed with SIGKILL: they resume their leases
//! on the next node, nobody sees them leave or turn unhealthy, and the
//! other nodes stop listing it as up within its key's TTL. Then a
//! node is killed together with a service that kept its lease through it:
//! that service is removed within the delete timeout, as a surviving node
//! sees it. And the etcd leader is killed under a load of registrations
//! through every node: nothing acknowledged is lost, and each node's
//! watcher saw exactly etcd's history. Last, the node config publishes go
//! through is killed while they are in flight: no acknowledged version
//! is lost, and the survivors' watchers saw each once, in order.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use shop_mesh::etcd::{Etcd, EventKind, WatchBatch};
use shop_mesh::harness::{EtcdCluster, Process};
use shop_mesh::pb::config as cfg;
use shop_mesh::pb::config::configs_client::ConfigsClient;
use shop_mesh::pb::registry as pb;
use shop_mesh::pb::registry::registry_client::RegistryClient;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::{BIN, run_bin, run_bin_with, wait_until};

/// The soak's short timings: a heartbeat a second, unhealthy after 3 s,
/// removed after 6 s.
const TIMINGS: [(&str, &str); 4] = [
    ("SHOP_MESH__REGISTRY__HEARTBEAT_INTERVAL", "1s"),
    ("SHOP_MESH__REGISTRY__MIN_HEARTBEAT_INTERVAL", "500ms"),
    ("SHOP_MESH__REGISTRY__UNHEALTHY_TIMEOUT", "3s"),
    ("SHOP_MESH__REGISTRY__DELETE_TIMEOUT", "6s"),
];
const UNHEALTHY_TIMEOUT: Duration = Duration::from_secs(3);
const DELETE_TIMEOUT: Duration = Duration::from_secs(6);
/// How long a node's key that lists it as up outlives the node:
/// `registry.etcd.prober_ttl`, at its default.
const NODE_TTL: Duration = Duration::from_secs(5);

const PATIENCE: Duration = Duration::from_secs(30);

/// A registry node on port 0 over `etcd`, under `prefix`.
async fn registry_node(etcd: &EtcdCluster, prefix: &str, dir: &Path) -> Process {
    registry_node_with(etcd, prefix, dir, &[]).await
}

/// [`registry_node`] with settings of its own in `env`.
async fn registry_node_with(
    etcd: &EtcdCluster,
    prefix: &str,
    dir: &Path,
    more: &[(&str, &str)],
) -> Process {
    let args = vec![
        "registry".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--store".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        etcd.endpoints().join(","),
    ];
    let mut env: Vec<(&str, &str)> = TIMINGS.to_vec();
    env.push(("SHOP_MESH__REGISTRY__ETCD__PREFIX", prefix));
    // These are about the cluster; credentials on a cluster are the
    // cluster credential tests' (and the etcd soak's).
    env.push(crate::CREDENTIALS_OFF);
    env.extend_from_slice(more);
    Process::start(Path::new(BIN), "registry", args, &env)
        .await
        .expect("a registry node starts")
}

/// Three registry nodes over `etcd`, each with a data dir of its own
/// under `dir`.
async fn registry_nodes(etcd: &EtcdCluster, prefix: &str, dir: &Path) -> Vec<Process> {
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(registry_node(etcd, prefix, &dir.join(format!("registry-{i}"))).await);
    }
    nodes
}

/// A shop service on port 0 given every registry address.
async fn service(role: &'static str, registries: &str, dir: &Path) -> Process {
    let args = vec![
        role.to_string(),
        "--registry".into(),
        registries.into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join(role).display().to_string(),
    ];
    Process::start(Path::new(BIN), role, args, &[])
        .await
        .expect("the service starts")
}

/// One change a watcher saw: (kind, service, port, healthy).
type Seen = (&'static str, String, u32, bool);

/// Watches the default group on `client` and records every answer, until
/// the stream ends ("ended" is recorded then).
async fn record(mut client: RegistryClient<Channel>) -> Arc<Mutex<Vec<Seen>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut stream = client
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let first = stream.next().await.expect("an answer").expect("a snapshot");
    assert!(matches!(
        first.body,
        Some(pb::watch_response::Body::Snapshot(_))
    ));
    tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(Ok(answer)) = stream.next().await {
                let mut seen = seen.lock();
                match answer.body {
                    Some(pb::watch_response::Body::Snapshot(s)) => {
                        for i in s.instances {
                            seen.push(("snapshot", i.service, i.port, i.healthy));
                        }
                    }
                    Some(pb::watch_response::Body::Change(change)) => {
                        let kind = match change.kind() {
                            pb::change::Kind::Delete => "delete",
                            _ => "put",
                        };
                        if let Some(i) = change.instance {
                            seen.push((kind, i.service, i.port, i.healthy));
                        }
                    }
                    None => {}
                }
            }
            seen.lock().push(("ended", String::new(), 0, false));
        }
    });
    seen
}

async fn client(addr: &str) -> RegistryClient<Channel> {
    RegistryClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to a registry node")
}

/// Every instance of `service` through `registry`: (port, healthy).
async fn found(registry: &RegistryClient<Channel>, service: &str) -> Vec<(u32, bool)> {
    let mut registry = registry.clone();
    let answer = registry
        .get_service(pb::GetServiceRequest {
            service: service.into(),
            ..Default::default()
        })
        .await;
    match answer {
        Ok(answer) => answer
            .into_inner()
            .instances
            .iter()
            .map(|i| (i.port, i.healthy))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The registry nodes `registry` lists as up, sorted.
async fn listed(registry: &RegistryClient<Channel>) -> Vec<String> {
    let answer = registry
        .clone()
        .get_cluster(pb::GetClusterRequest {})
        .await
        .expect("GetCluster")
        .into_inner();
    let mut nodes: Vec<String> = answer.nodes.into_iter().map(|n| n.address).collect();
    nodes.sort();
    nodes
}

fn port(addr: &str) -> u32 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// Polls `check` every 100 ms for `window`, failing the moment it fails:
/// a condition that must hold throughout, not just at the end.
async fn holds_throughout<F, Fut>(what: &str, window: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let end = Instant::now() + window;
    while Instant::now() < end {
        if let Err(why) = check().await {
            panic!("{what} stopped holding: {why}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the watcher saw of `services` that a flap would show: a removal
/// or an unhealthy mark, or the watch ending.
fn flaps(seen: &[Seen], services: &[&str]) -> Vec<Seen> {
    seen.iter()
        .filter(|(kind, service, _, healthy)| {
            *kind == "ended"
                || (services.contains(&service.as_str()) && (*kind == "delete" || !healthy))
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_resume_their_leases_on_another_node_when_theirs_is_killed() {
    let Some(etcd) = EtcdCluster::start(3).await.expect("etcd cluster") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("/test-{:08x}", rand::random::<u32>());
    let mut nodes = registry_nodes(&etcd, &prefix, dir.path()).await;
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let on_b = client(&addrs[1]).await;
    let on_c = client(&addrs[2]).await;
    // The watcher is on C, which stays up throughout.
    let seen = record(on_c.clone()).await;

    let all = addrs.join(",");
    let mut user = service("user", &all, dir.path()).await;
    let mut product = service("product", &all, dir.path()).await;
    let (user_port, product_port) = (port(&user.addr), port(&product.addr));
    for (name, port) in [("server-user", user_port), ("server-product", product_port)] {
        wait_until(
            &format!("{name} registered and healthy on every node"),
            PATIENCE,
            || {
                let (on_b, on_c) = (on_b.clone(), on_c.clone());
                async move {
                    found(&on_b, name).await == [(port, true)]
                        && found(&on_c, name).await == [(port, true)]
                }
            },
        )
        .await;
    }
    // Addresses are tried in turn: both keep their leases through A.
    for process in [&mut user, &mut product] {
        let registered = process.logged("registered").await.unwrap();
        assert_eq!(registered["registry"], addrs[0].as_str(), "{registered}");
    }

    // The inspect commands name the node that answered, and the cluster.
    let mut all_up = addrs.clone();
    all_up.sort();
    wait_until("every node listed as up", PATIENCE, || {
        let (on_b, all_up) = (on_b.clone(), all_up.clone());
        async move { listed(&on_b).await == all_up }
    })
    .await;
    let (ok, out, err) = run_bin(&["services", "--registry", &addrs[1]]).await;
    assert!(ok, "{err}");
    assert!(
        out.ends_with(&format!("\nanswered by {}\n", addrs[1])),
        "{out}"
    );
    let (ok, out, err) = run_bin(&["cluster", "--json", "--registry", &addrs[1]]).await;
    assert!(ok, "{err}");
    let cluster: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(cluster["store"], "etcd", "{cluster}");
    assert_eq!(cluster["node"], addrs[1].as_str(), "{cluster}");
    assert_eq!(cluster["answered_by"], addrs[1].as_str(), "{cluster}");
    assert_eq!(cluster["etcd_prefix"], prefix.as_str(), "{cluster}");
    let listed_nodes = cluster["nodes"].as_array().expect("nodes");
    let mut listed_by_b: Vec<(&str, bool)> = listed_nodes
        .iter()
        .map(|n| (n["address"].as_str().unwrap(), n["answering"] == true))
        .collect();
    listed_by_b.sort();
    let mut expected: Vec<(&str, bool)> =
        addrs.iter().map(|a| (a.as_str(), *a == addrs[1])).collect();
    expected.sort();
    assert_eq!(listed_by_b, expected, "{cluster}");
    let members = cluster["etcd_members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{cluster}");
    assert_eq!(
        members.iter().filter(|m| m["leader"] == true).count(),
        1,
        "one leader: {cluster}"
    );
    for url in etcd.endpoints() {
        assert!(
            members.iter().any(|m| m["client_urls"][0] == url.as_str()),
            "{url} listed: {cluster}"
        );
    }

    // kill -9 A, the node both keep their leases through.
    let killed = Instant::now();
    nodes[0].kill().await.unwrap();
    // Its key that listed it as up goes with its etcd lease for it.
    let survivors: Vec<String> = all_up.iter().filter(|a| **a != addrs[0]).cloned().collect();
    let vanished = tokio::spawn({
        let on_b = on_b.clone();
        async move {
            wait_until("A to vanish from B's list of nodes", PATIENCE, || {
                let (on_b, survivors) = (on_b.clone(), survivors.clone());
                async move { listed(&on_b).await == survivors }
            })
            .await;
            killed.elapsed()
        }
    });
    for process in [&mut user, &mut product] {
        process
            .logged("lost the registry; reconnecting")
            .await
            .unwrap();
        let resumed = process.logged("resumed the lease").await.unwrap();
        assert_eq!(resumed["registry"], addrs[1].as_str(), "{resumed}");
    }
    // Healthy on both survivors for twice the unhealthy timeout after the
    // kill: an alive key left to lapse, or a stream break taken for a
    // death, would show within that.
    holds_throughout(
        "both services registered and healthy on B and C",
        UNHEALTHY_TIMEOUT * 2,
        || {
            let (on_b, on_c) = (on_b.clone(), on_c.clone());
            async move {
                for (name, port) in [("server-user", user_port), ("server-product", product_port)] {
                    for (node, client) in [("B", &on_b), ("C", &on_c)] {
                        let now = found(client, name).await;
                        if now != [(port, true)] {
                            return Err(format!("{name} on {node}: {now:?}"));
                        }
                    }
                }
                Ok(())
            }
        },
    )
    .await;
    assert_eq!(
        flaps(&seen.lock(), &["server-user", "server-product"]),
        [],
        "the watcher on C saw a service leave or turn unhealthy"
    );
    let vanished_after = vanished.await.expect("A vanishes");
    eprintln!("the killed node vanished from the list {vanished_after:?} after the kill");
    // Its lease was last renewed up to a third of its TTL before the
    // kill; etcd checks for expired leases twice a second.
    assert!(
        vanished_after <= NODE_TTL + Duration::from_secs(2),
        "A was listed {vanished_after:?} after it died; its key's TTL is {NODE_TTL:?}"
    );
    for process in [&user, &product] {
        assert_eq!(
            process.count_logged("registered"),
            1,
            "the {} resumed its lease rather than registering again",
            process.role
        );
    }

    // kill -9 B together with the product, which keeps its lease through
    // B: C removes it within the delete timeout. The user resumes on C.
    let killed = Instant::now();
    nodes[1].kill().await.unwrap();
    product.kill().await.unwrap();
    wait_until(
        "the killed product removed, as C sees it",
        DELETE_TIMEOUT + Duration::from_secs(10),
        || {
            let on_c = on_c.clone();
            async move { found(&on_c, "server-product").await.is_empty() }
        },
    )
    .await;
    let gone_after = killed.elapsed();
    eprintln!("the killed product was removed {gone_after:?} after the kill");
    // Its lease was last renewed up to a heartbeat before the kill; etcd
    // checks for expired leases twice a second, and C applies the removal
    // once its watch delivers it.
    assert!(
        gone_after <= DELETE_TIMEOUT + Duration::from_secs(2),
        "the product was removed {gone_after:?} after it died; the delete timeout is {DELETE_TIMEOUT:?}"
    );
    wait_until("the user resumed on C", PATIENCE, || {
        let resumed = user.count_logged("resumed the lease");
        async move { resumed >= 2 }
    })
    .await;
    assert_eq!(found(&on_c, "server-user").await, [(user_port, true)]);
    let seen = seen.lock().clone();
    assert_eq!(
        flaps(&seen, &["server-user"]),
        [],
        "the watcher on C saw the user leave or turn unhealthy"
    );
    assert!(
        seen.iter().any(|(kind, service, port, _)| *kind == "delete"
            && service == "server-product"
            && *port == product_port),
        "the watcher on C saw the product removed: {seen:?}"
    );
    assert_eq!(user.count_logged("registered"), 1);

    assert_eq!(user.terminate().await.unwrap(), Some(0));
    assert_eq!(nodes[2].terminate().await.unwrap(), Some(0));
    drop(etcd);
}

/// `shop-mesh up --registries 3 --store etcd`: three registry nodes, each
/// in the summary, every service given all three, and Ctrl-C stops it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_three_registry_nodes_over_etcd() {
    let Some(etcd) = EtcdCluster::start(3).await.expect("etcd cluster") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("/test-{:08x}", rand::random::<u32>());
    let args = vec![
        "up".to_string(),
        "--registries".into(),
        "3".into(),
        "--store".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        etcd.endpoints().join(","),
        "--data-dir".into(),
        dir.path().join("data").display().to_string(),
    ];
    let env = [("SHOP_MESH__REGISTRY__ETCD__PREFIX", prefix.as_str())];
    let (mut up, summary) = crate::start_up(args, &env).await;
    assert!(
        summary.starts_with("shop-mesh is up: 3 registry nodes on etcd and 3 service instances"),
        "{summary}"
    );
    let registries: Vec<String> = summary
        .lines()
        .filter(|line| line.starts_with("registry "))
        .map(|line| line.split_whitespace().nth(2).unwrap().to_string())
        .collect();
    assert_eq!(registries.len(), 3, "{summary}");
    assert!(
        registries[0] != registries[1] && registries[1] != registries[2],
        "{summary}"
    );
    assert!(
        summary.contains(&format!("--registry {}", registries.join(","))),
        "{summary}"
    );
    // Credentials are on, as by default: the shell reads with the token
    // up made for it, on every node.
    let reader = [(
        "SHOP_MESH__DISCOVERY__TOKEN_FILE",
        crate::shell_token(&summary),
    )];
    // Every node answers for all of it.
    for node in &registries {
        let (ok, out, err) = run_bin_with(&["services", "--registry", node], &reader).await;
        assert!(ok, "{err}");
        assert_eq!(out.lines().count(), 1 + 3 + 2, "{out}");
        assert!(out.ends_with(&format!("\nanswered by {node}\n")), "{out}");
    }
    let all = registries.join(",");
    let (ok, out, err) = run_bin_with(&crate::place_order("10", &all), &reader).await;
    assert!(ok, "{err}");
    assert!(out.contains("23990.00"), "{out}");

    assert_eq!(
        up.stop_with(nix::sys::signal::Signal::SIGINT)
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(up.count_logged("deregistered"), 3);
    drop(etcd);
}

#[tokio::test]
async fn up_refuses_several_registries_on_the_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let (ok, _, err) = run_bin(&["up", "--registries", "2", "--data-dir", &data]).await;
    assert!(!ok);
    assert!(
        err.contains("2 registry nodes need a shared store: add --store etcd"),
        "{err}"
    );
}

/// A watcher's change, as the checker compares it: revision, kind, port,
/// health.
type Change = (u64, i32, u32, bool);

/// Watches `service` on `client` and records every change with its
/// revision.
async fn record_changes(
    mut client: RegistryClient<Channel>,
    service: &str,
) -> Arc<Mutex<Vec<Change>>> {
    let mut stream = client
        .watch(pb::WatchRequest {
            service: service.into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first = stream.next().await.expect("an answer").expect("a snapshot");
    assert!(matches!(
        first.body,
        Some(pb::watch_response::Body::Snapshot(_))
    ));
    let seen = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(Ok(answer)) = stream.next().await {
                match answer.body {
                    Some(pb::watch_response::Body::Change(change)) => {
                        let instance = change.instance.expect("a change names its instance");
                        seen.lock().push((
                            answer.revision,
                            change.kind,
                            instance.port,
                            instance.healthy,
                        ));
                    }
                    other => panic!("the watch was reset or ended: {other:?}"),
                }
            }
        }
    });
    seen
}

/// etcd's own history of the instance keys under `prefix`, from its first
/// revision to now: (etcd revision, kind, port). A put of the value its
/// key already held changed nothing, so no watcher is told of it: a
/// registration retried after its answer was lost to the leader's death
/// puts the same instance twice.
async fn etcd_history(etcd: &EtcdCluster, prefix: &str) -> Vec<(i64, i32, u32)> {
    let etcd = Etcd::connect(&etcd.endpoints(), Duration::from_secs(1)).expect("client");
    let (_, now) = etcd.get_prefix(prefix).await.expect("read");
    let mut history = etcd.watch_prefix(prefix, 1, false).await.expect("watch");
    let mut expected: Vec<(i64, i32, u32)> = Vec::new();
    let mut held: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut reached = 0;
    while reached < now {
        let batch = tokio::time::timeout(PATIENCE, history.next())
            .await
            .expect("etcd's history in time")
            .expect("the history goes on")
            .expect("a batch");
        if let WatchBatch::Events { events, .. } = batch {
            for event in events {
                reached = reached.max(event.revision());
                let port = String::from_utf8_lossy(&event.kv.key)
                    .rsplit('/')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("an instance key ends in its port");
                let kind = match event.kind {
                    EventKind::Put => {
                        let before = held.insert(event.kv.key.clone(), event.kv.value.clone());
                        if before.as_ref() == Some(&event.kv.value) {
                            continue;
                        }
                        pb::change::Kind::Put as i32
                    }
                    EventKind::Delete => {
                        held.remove(&event.kv.key);
                        pb::change::Kind::Delete as i32
                    }
                };
                expected.push((event.revision(), kind, port));
            }
        }
        assert!(reached > 0, "etcd holds no history of the service");
    }
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_under_load_loses_no_registration_and_no_watcher_event() {
    let Some(mut etcd) = EtcdCluster::start(3).await.expect("etcd cluster") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("/test-{:08x}", rand::random::<u32>());
    let mut nodes = registry_nodes(&etcd, &prefix, dir.path()).await;
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let mut watchers = Vec::new();
    for addr in &addrs {
        watchers.push(record_changes(client(addr).await, "svc").await);
    }

    // Registrations through every node in turn, retried while etcd elects.
    // Their timeouts outlast the test: every change is a registration's.
    const PORTS: u32 = 150;
    let writers = addrs.clone();
    let load = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        for port in 1..=PORTS {
            let mut registry = client(&writers[port as usize % writers.len()]).await;
            let give_up = Instant::now() + PATIENCE;
            loop {
                let answer = registry
                    .register(pb::RegisterRequest {
                        instance: Some(pb::Instance {
                            service: "svc".into(),
                            ip: "127.0.0.1".into(),
                            port,
                            unhealthy_timeout_ms: Some(600_000),
                            delete_timeout_ms: Some(1_200_000),
                            ..Default::default()
                        }),
                        lease_id: 0,
                    })
                    .await;
                match answer {
                    Ok(_) => {
                        acknowledged.push(port);
                        break;
                    }
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        assert!(Instant::now() < give_up, "{status:?}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(status) => panic!("port {port}: {status:?}"),
                }
            }
        }
        acknowledged
    });
    wait_until("the load to be under way", PATIENCE, || {
        let seen = watchers[0].clone();
        async move { seen.lock().len() > 30 }
    })
    .await;
    let leader = etcd.leader().await.expect("a leader");
    etcd.kill(leader).await.expect("kill -9 the leader");
    let acknowledged = load.await.expect("the load");
    assert_eq!(acknowledged.len(), PORTS as usize);

    // Every acknowledged registration is there, healthy, on every node.
    for addr in &addrs {
        let mut ports = found(&client(addr).await, "svc").await;
        ports.sort();
        let all: Vec<(u32, bool)> = acknowledged.iter().map(|p| (*p, true)).collect();
        assert_eq!(ports, all, "as {addr} has it");
    }

    // Each watcher saw etcd's history of the instance keys: no gap, no
    // duplicate, no reordering, nothing invented.
    let expected = etcd_history(&etcd, &format!("{prefix}/i/public/DEFAULT_GROUP/svc/")).await;
    let last = expected.last().map(|(at, _, _)| *at as u64);
    for (addr, seen) in addrs.iter().zip(&watchers) {
        wait_until(
            &format!("the watcher on {addr} to see the last change"),
            PATIENCE,
            || {
                let seen = seen.clone();
                async move { seen.lock().iter().any(|c| Some(c.0 >> 16) == last) }
            },
        )
        .await;
        let changes = seen.lock().clone();
        for pair in changes.windows(2) {
            assert!(
                pair[0].0 < pair[1].0,
                "{addr}: out of order or repeated: {pair:?}"
            );
        }
        let watched: Vec<(i64, i32, u32)> = changes
            .iter()
            .map(|(revision, kind, port, _)| ((revision >> 16) as i64, *kind, *port))
            .collect();
        assert_eq!(watched, expected, "the watcher on {addr}");
        assert!(
            changes.iter().all(|c| c.3),
            "{addr}: an instance turned unhealthy: {changes:?}"
        );
    }
    for node in &mut nodes {
        assert_eq!(node.terminate().await.unwrap(), Some(0));
    }
    drop(etcd);
}

/// What one config writer had acknowledged: (version, content) in order,
/// and the content of the publish in flight when its node died, if any.
type Published = (Vec<(u64, String)>, Option<String>);

/// Publishes `{item}:{n}` to `item` through `addr`, each on the version
/// before (compare-and-set, so a version lost or made twice would show),
/// until a publish fails.
async fn publish_until_refused(addr: String, item: String) -> Published {
    let mut configs = ConfigsClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to a registry node");
    let mut acknowledged: Vec<(u64, String)> = Vec::new();
    for n in 0.. {
        let content = format!("{item}:{n}");
        let answer = configs
            .publish(cfg::PublishRequest {
                data_id: item.clone(),
                content: content.clone(),
                expected_version: Some(acknowledged.last().map_or(0, |(v, _)| *v)),
                ..Default::default()
            })
            .await;
        match answer {
            Ok(answer) => {
                let version = answer.into_inner().item.expect("an item").version;
                acknowledged.push((version, content));
            }
            Err(_) => return (acknowledged, Some(content)),
        }
    }
    unreachable!("publishes go on until the node dies")
}

/// Watches every config item of the default group through `addr` and
/// records each change as (revision, data id, version, content).
async fn record_configs(addr: &str) -> Arc<Mutex<Vec<(u64, String, u64, String)>>> {
    let mut configs = ConfigsClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to a registry node");
    let mut stream = configs
        .watch(cfg::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let first = stream.next().await.expect("an answer").expect("a snapshot");
    assert!(matches!(
        first.body,
        Some(cfg::watch_response::Body::Snapshot(ref s)) if s.items.is_empty()
    ));
    let seen = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(Ok(answer)) = stream.next().await {
                match answer.body {
                    Some(cfg::watch_response::Body::Change(change)) => {
                        let item = change.item.expect("a change names its item");
                        seen.lock().push((
                            answer.revision,
                            item.data_id,
                            item.version,
                            item.content,
                        ));
                    }
                    // A reset would void what the test compares: record it
                    // so that the comparison fails.
                    other => {
                        seen.lock()
                            .push((answer.revision, format!("{other:?}"), 0, String::new()))
                    }
                }
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_publish_loses_no_acknowledged_config_change() {
    let Some(etcd) = EtcdCluster::start(3).await.expect("etcd cluster") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("/test-{:08x}", rand::random::<u32>());
    // Every version kept, so that each acknowledged one can be found.
    let keep_all = [("SHOP_MESH__REGISTRY__CONFIGS__HISTORY", "100000")];
    let mut nodes = Vec::new();
    for i in 0..3 {
        let dir = dir.path().join(format!("registry-{i}"));
        nodes.push(registry_node_with(&etcd, &prefix, &dir, &keep_all).await);
    }
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let watchers = [
        record_configs(&addrs[1]).await,
        record_configs(&addrs[2]).await,
    ];

    const ITEMS: usize = 4;
    let items: Vec<String> = (0..ITEMS).map(|k| format!("app-{k}")).collect();
    let writers: Vec<_> = items
        .iter()
        .map(|item| tokio::spawn(publish_until_refused(addrs[0].clone(), item.clone())))
        .collect();
    wait_until("publishes to be under way", PATIENCE, || {
        let seen = watchers[0].clone();
        async move { seen.lock().len() >= 200 }
    })
    .await;
    nodes[0]
        .kill()
        .await
        .expect("kill -9 the node written through");
    let mut published = Vec::new();
    for writer in writers {
        published.push(writer.await.expect("a writer"));
    }

    let mut survivor = ConfigsClient::connect(format!("http://{}", addrs[1]))
        .await
        .unwrap();
    let mut expected: Vec<(String, Vec<(u64, String)>)> = Vec::new();
    for (item, (acknowledged, in_flight)) in items.iter().zip(published) {
        assert!(!acknowledged.is_empty(), "{item}: nothing acknowledged");
        let mut history = survivor
            .history(cfg::HistoryRequest {
                data_id: item.clone(),
                ..Default::default()
            })
            .await
            .expect("the item is there")
            .into_inner()
            .versions
            .into_iter()
            .map(|v| (v.version, v.content))
            .collect::<Vec<_>>();
        history.reverse();
        // Every acknowledged version, in order, with its content; then at
        // most the one in flight, whole.
        assert_eq!(
            history[..acknowledged.len().min(history.len())],
            acknowledged[..],
            "{item}: etcd's history against what was acknowledged"
        );
        let beyond = &history[acknowledged.len()..];
        assert!(
            beyond.is_empty() || (beyond.len() == 1 && Some(&beyond[0].1) == in_flight.as_ref()),
            "{item}: more than the publish in flight: {beyond:?}"
        );
        expected.push((item.clone(), history));
    }

    // Each surviving node's watcher saw every version of every item once,
    // in order.
    for (addr, seen) in addrs[1..].iter().zip(&watchers) {
        wait_until(
            &format!("the watcher on {addr} to see every version"),
            PATIENCE,
            || {
                let (seen, expected) = (seen.clone(), expected.clone());
                async move {
                    let seen = seen.lock();
                    expected.iter().all(|(item, history)| {
                        let last = history.last().map(|(v, _)| *v);
                        seen.iter().any(|c| &c.1 == item && Some(c.2) == last)
                    })
                }
            },
        )
        .await;
        let changes = seen.lock().clone();
        for pair in changes.windows(2) {
            assert!(
                pair[0].0 < pair[1].0,
                "{addr}: out of order or repeated: {pair:?}"
            );
        }
        for (item, history) in &expected {
            let watched: Vec<(u64, String)> = changes
                .iter()
                .filter(|c| &c.1 == item)
                .map(|c| (c.2, c.3.clone()))
                .collect();
            assert_eq!(&watched, history, "{addr}: {item} as watched");
        }
    }

    // The items take the next version through a survivor.
    for (item, history) in &expected {
        let last = history.last().map(|(v, _)| *v);
        survivor
            .publish(cfg::PublishRequest {
                data_id: item.clone(),
                content: "after".into(),
                expected_version: last,
                ..Default::default()
            })
            .await
            .expect("a publish on the last version, through a survivor");
    }
    for node in &mut nodes[1..] {
        assert_eq!(node.terminate().await.unwrap(), Some(0));
    }
    drop(etcd);
}
