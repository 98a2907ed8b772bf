//! Persistent instances on a registry cluster: one node probes them, the
//! verdicts reach every node, and another node takes the probing over
//! when that one stops cleanly or dies.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shop_mesh::harness::EtcdCluster;
use shop_mesh::pb::registry::registry_client::RegistryClient;
use shop_mesh::registry::{self, StoreKind};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::{TestRegistry, instance, instances, register, wait_until};

const PATIENCE: Duration = Duration::from_secs(20);

/// A grpc.health.v1 server on port 0 that remembers which connections
/// asked it, and when: one connection is one node's probe.
struct HealthServer {
    port: u16,
    reporter: tonic_health::server::HealthReporter,
    asked: Arc<Mutex<Vec<(Instant, SocketAddr)>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: tokio::task::JoinHandle<()>,
}

impl HealthServer {
    async fn start() -> HealthServer {
        let (reporter, health) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let counted = tonic::service::interceptor::InterceptedService::new(
            health,
            move |request: tonic::Request<()>| {
                let peer = request.remote_addr().expect("a TCP peer");
                log.lock().unwrap().push((Instant::now(), peer));
                Ok(request)
            },
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(counted)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        HealthServer {
            port,
            reporter,
            asked,
            stop: Some(stop),
            serving,
        }
    }

    /// The connections that asked since `since`.
    fn askers_since(&self, since: Instant) -> HashSet<SocketAddr> {
        let asked = self.asked.lock().unwrap();
        asked
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, peer)| *peer)
            .collect()
    }

    /// How many probes it has answered.
    fn asked(&self) -> usize {
        self.asked.lock().unwrap().len()
    }

    async fn set_serving(&self, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
    }

    /// Stops serving: probes find nobody there.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.serving).await;
        self.serving.abort();
    }
}

/// A node's configuration: probes every 100 ms, the prober's lease of
/// `prober_ttl`.
fn node_config(
    etcd: &EtcdCluster,
    prefix: &str,
    prober_ttl: Duration,
) -> impl FnOnce(&mut registry::Config) + Send + 'static {
    let endpoints = etcd.endpoints();
    let prefix = prefix.to_string();
    move |config: &mut registry::Config| {
        config.store = StoreKind::Etcd;
        config.etcd.endpoints = endpoints;
        config.etcd.prefix = prefix;
        config.etcd.prober_ttl = prober_ttl;
        config.probe_interval = Duration::from_millis(100);
        config.probe_timeout = Duration::from_millis(500);
    }
}

async fn etcd() -> Option<(EtcdCluster, String)> {
    let etcd = EtcdCluster::start(1).await.expect("etcd cluster")?;
    let prefix = format!("/test-{:08x}", rand::random::<u32>());
    Some((etcd, prefix))
}

/// Registers the persistent instance of "db" at the health server.
async fn register_db(client: &mut RegistryClient<Channel>, health: &HealthServer) {
    let mut db = instance("db", health.port.into());
    db.ephemeral = Some(false);
    let registered = register(client, db).await;
    assert_eq!(registered.lease_id, 0, "a persistent instance has no lease");
}

/// Waits until "db" reads `healthy` through every one of `clients`.
async fn db_reads(clients: &[RegistryClient<Channel>], healthy: bool, what: &str) {
    for (i, client) in clients.iter().enumerate() {
        wait_until(&format!("{what} on node {i}"), PATIENCE, || {
            let mut client = client.clone();
            async move {
                instances(&mut client, "db", false)
                    .await
                    .first()
                    .is_some_and(|db| db.healthy == healthy)
            }
        })
        .await;
    }
}

/// How many nodes probe: the connections that ask the health server over
/// a second and a half, at ten probes a second each.
async fn probers(health: &HealthServer) -> usize {
    let since = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    health.askers_since(since).len()
}

async fn clients(nodes: &[&TestRegistry]) -> Vec<RegistryClient<Channel>> {
    let mut clients = Vec::new();
    for node in nodes {
        clients.push(node.client().await);
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_probes_a_persistent_instance_and_every_node_sees_its_health() {
    let Some((etcd, prefix)) = etcd().await else {
        return;
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let config = node_config(&etcd, &prefix, Duration::from_secs(5));
        nodes.push(TestRegistry::start_with(config).await);
    }
    let clients = clients(&nodes.iter().collect::<Vec<_>>()).await;
    let health = HealthServer::start().await;
    // Registered through the last node: whichever leads must find it in
    // its view, not only in what it was asked itself.
    register_db(&mut clients[2].clone(), &health).await;
    db_reads(&clients, true, "the probe to find it healthy").await;
    assert_eq!(probers(&health).await, 1, "exactly one node probes");

    health.stop().await;
    db_reads(&clients, false, "the stopped server to show unhealthy").await;
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prober_that_stops_cleanly_hands_probing_over_at_once() {
    let Some((etcd, prefix)) = etcd().await else {
        return;
    };
    // A lease that would outlast the test: only the stopped node
    // resigning lets another take over in time.
    let ttl = Duration::from_secs(60);
    let first = TestRegistry::start_with(node_config(&etcd, &prefix, ttl)).await;
    let health = HealthServer::start().await;
    register_db(&mut first.client().await, &health).await;
    // Alone, the first node leads.
    db_reads(&[first.client().await], true, "the first node to probe it").await;
    let others = [
        TestRegistry::start_with(node_config(&etcd, &prefix, ttl)).await,
        TestRegistry::start_with(node_config(&etcd, &prefix, ttl)).await,
    ];
    let clients = clients(&others.iter().collect::<Vec<_>>()).await;
    db_reads(&clients, true, "the other nodes to see it healthy").await;
    assert_eq!(probers(&health).await, 1, "only the first node probes");

    first.stop().await;
    health.set_serving(false).await;
    db_reads(&clients, false, "another node to probe it not serving").await;
    health.set_serving(true).await;
    db_reads(&clients, true, "another node to probe it serving again").await;
    assert_eq!(probers(&health).await, 1, "exactly one node took over");
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prober_that_dies_without_a_word_is_replaced_once_its_lease_expires() {
    let Some((etcd, prefix)) = etcd().await else {
        return;
    };
    let ttl = Duration::from_secs(2);
    let health = HealthServer::start().await;
    // The first node runs on a runtime of its own, which the test drops
    // as a process dies: nothing of it runs again, so it cannot resign.
    let (started, addr) = tokio::sync::oneshot::channel();
    let (kill, killed) = tokio::sync::oneshot::channel::<()>();
    let config = node_config(&etcd, &prefix, ttl);
    let doomed = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let node = TestRegistry::start_with(config).await;
            let _ = started.send(node.addr);
            let _ = killed.await;
            std::mem::forget(node);
        });
        drop(runtime);
    });
    let first = RegistryClient::connect(format!("http://{}", addr.await.unwrap()))
        .await
        .unwrap();
    register_db(&mut first.clone(), &health).await;
    db_reads(&[first], true, "the first node to probe it").await;
    let second = TestRegistry::start_with(node_config(&etcd, &prefix, ttl)).await;
    let clients = clients(&[&second]).await;
    db_reads(&clients, true, "the second node to see it healthy").await;
    assert_eq!(probers(&health).await, 1, "only the first node probes");

    kill.send(()).unwrap();
    doomed.join().unwrap();
    let probes_at_death = health.asked();
    health.set_serving(false).await;
    db_reads(&clients, false, "the second node to probe it not serving").await;
    assert!(
        health.asked() > probes_at_death,
        "the verdict came from a probe after the first node died"
    );
    health.set_serving(true).await;
    db_reads(&clients, true, "the second node to probe it serving again").await;
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prober_whose_lease_is_revoked_stops_probing_and_another_takes_over() {
    let Some((etcd, prefix)) = etcd().await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    let first = TestRegistry::start_with(node_config(&etcd, &prefix, ttl)).await;
    let health = HealthServer::start().await;
    register_db(&mut first.client().await, &health).await;
    db_reads(&[first.client().await], true, "the first node to probe it").await;
    let second = TestRegistry::start_with(node_config(&etcd, &prefix, ttl)).await;
    let clients = clients(&[&first, &second]).await;
    db_reads(&clients, true, "both nodes to see it healthy").await;

    // The first node's lease ends while it runs (as when etcd lost sight
    // of it for longer than the TTL): it must stop probing, since the
    // second one wins the key as soon as it is gone.
    let client = shop_mesh::etcd::Etcd::connect(&etcd.endpoints(), Duration::from_secs(1))
        .expect("an etcd client");
    let held = client
        .get(format!("{prefix}/prober"))
        .await
        .expect("read the prober's key")
        .expect("a node holds it");
    client
        .lease_revoke(held.lease.expect("held under a lease"))
        .await
        .expect("revoke");
    wait_until("another lease to hold the key", PATIENCE, || {
        let client = client.clone();
        let key = format!("{prefix}/prober");
        async move {
            let now = client.get(key).await.expect("read the prober's key");
            now.is_some_and(|kv| kv.lease != held.lease)
        }
    })
    .await;
    // Probes already on their way when the key moved may still arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(probers(&health).await, 1, "exactly one node probes after");
    health.set_serving(false).await;
    db_reads(&clients, false, "the new prober to find it not serving").await;
    drop(etcd);
}
