//! The registry as a cluster: three registry nodes over a real 3-member
//! etcd cluster, each a role in this process on port 0, sharing a prefix
//! of their own.

use std::time::Duration;

use futures::StreamExt;
use shop_mesh::harness::EtcdCluster;
use shop_mesh::pb::registry as pb;
use shop_mesh::registry::{self, StoreKind};

use crate::{TestRegistry, deregister, instance, instances, keep_alive, register, wait_until};

const PATIENCE: Duration = Duration::from_secs(20);

/// Registry nodes over one etcd cluster.
struct Nodes {
    etcd: EtcdCluster,
    nodes: Vec<TestRegistry>,
}

/// Timings short enough for an instance to go within seconds.
const SHORT: (u64, u64) = (3, 6);

/// `count` registry nodes whose instances turn unhealthy and are removed
/// after `timeouts` seconds of silence.
async fn nodes(count: usize, timeouts: (u64, u64)) -> Option<Nodes> {
    let etcd = EtcdCluster::start(3).await.expect("etcd cluster")?;
    let prefix = format!("/test-{:08x}", rand::random::<u32>());
    let mut nodes = Vec::new();
    for _ in 0..count {
        let endpoints = etcd.endpoints();
        let prefix = prefix.clone();
        nodes.push(
            TestRegistry::start_with(move |config: &mut registry::Config| {
                config.store = StoreKind::Etcd;
                config.etcd.endpoints = endpoints;
                config.etcd.prefix = prefix;
                config.unhealthy_timeout = Duration::from_secs(timeouts.0);
                config.delete_timeout = Duration::from_secs(timeouts.1);
                config.heartbeat_interval = Duration::from_secs(1);
            })
            .await,
        );
    }
    Some(Nodes { etcd, nodes })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_through_one_node_watched_through_another_found_through_a_third() {
    let Some(cluster) = nodes(3, SHORT).await else {
        return;
    };
    let [a, b, c] = [0, 1, 2].map(|i| &cluster.nodes[i]);
    let mut watcher = b.client().await;
    let mut events = watcher
        .watch(pb::WatchRequest {
            service: "svc".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first = events.next().await.expect("an answer").expect("a snapshot");
    assert!(matches!(
        first.body,
        Some(pb::watch_response::Body::Snapshot(_))
    ));

    let mut writer = a.client().await;
    let registered = register(&mut writer, instance("svc", 80)).await;
    assert_ne!(registered.lease_id, 0);

    let change = tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("the change reaches the other node's watcher")
        .expect("an answer")
        .expect("a change");
    let Some(pb::watch_response::Body::Change(change)) = change.body else {
        panic!("a change, got {change:?}");
    };
    assert_eq!(change.instance.expect("its instance").port, 80);

    let reader = c.client().await;
    wait_until("the third node to find it", PATIENCE, || {
        let mut reader = reader.clone();
        async move { instances(&mut reader, "svc", true).await.len() == 1 }
    })
    .await;

    deregister(&mut writer, "svc", 80)
        .await
        .expect("deregister");
    // Deregistered through A, read back through A: answered after A's view
    // applied it.
    assert!(instances(&mut writer, "svc", false).await.is_empty());
    wait_until("the third node to see it gone", PATIENCE, || {
        let mut reader = reader.clone();
        async move { instances(&mut reader, "svc", false).await.is_empty() }
    })
    .await;
    drop(cluster.etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_kept_alive_through_another_node_keeps_its_instance_and_a_silent_one_goes() {
    let Some(cluster) = nodes(2, SHORT).await else {
        return;
    };
    let [a, b] = [0, 1].map(|i| &cluster.nodes[i]);
    let mut on_a = a.client().await;
    let kept = register(&mut on_a, instance("svc", 80)).await.lease_id;
    let silent = register(&mut on_a, instance("svc", 81)).await.lease_id;
    assert_ne!(kept, silent);

    // The client of :80 beats through B only, as one would after A died.
    let mut on_b = b.client().await;
    let (beats, mut answers) = keep_alive(&mut on_b, kept).await;
    answers
        .next()
        .await
        .expect("an answer")
        .expect("B renews a lease A granted");
    let beating = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if beats
                .send(pb::KeepAliveRequest { lease_id: kept })
                .await
                .is_err()
            {
                return;
            }
            if answers.next().await.is_none() {
                return;
            }
        }
    });

    wait_until("the silent instance to be removed", PATIENCE, || {
        let mut on_a = on_a.clone();
        async move {
            let ports: Vec<u32> = instances(&mut on_a, "svc", false)
                .await
                .iter()
                .map(|i| i.port)
                .collect();
            ports == [80]
        }
    })
    .await;
    let kept_instance = instances(&mut on_a, "svc", false).await;
    assert!(kept_instance[0].healthy, "the beaten lease stayed healthy");
    beating.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_keepalive_stream_makes_its_instance_unhealthy_on_every_node_at_once() {
    // Timeouts far beyond the test's patience: only the broken stream can
    // make the instance unhealthy in time.
    let Some(cluster) = nodes(2, (600, 1200)).await else {
        return;
    };
    let [a, b] = [0, 1].map(|i| &cluster.nodes[i]);
    let mut on_a = a.client().await;
    let lease = register(&mut on_a, instance("svc", 80)).await.lease_id;
    let (beats, mut answers) = keep_alive(&mut on_a, lease).await;
    answers.next().await.expect("an answer").expect("renewed");
    drop((beats, answers));

    let on_b = b.client().await;
    wait_until("B to see it unhealthy", PATIENCE, || {
        let mut on_b = on_b.clone();
        async move {
            instances(&mut on_b, "svc", false)
                .await
                .first()
                .is_some_and(|i| !i.healthy)
        }
    })
    .await;
}
