//! The registry as a cluster: three registry nodes over a real 3-member
//! etcd cluster, each a role in this process on port 0, sharing a prefix
//! of their own.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use shop_mesh::discovery::{self, Announce};
use shop_mesh::etcd::{Etcd, LeaseId};
use shop_mesh::harness::{EtcdCluster, Isolated};
use shop_mesh::pb::config as cfg;
use shop_mesh::pb::config::configs_client::ConfigsClient;
use shop_mesh::pb::registry as pb;
use shop_mesh::pb::registry::registry_client::RegistryClient;
use shop_mesh::registry::{self, StoreKind};
use tonic::transport::Channel;

use crate::configs::{configs, get, publish};
use crate::{
    TestRegistry, admin_token, deregister, instance, instances, keep_alive, keep_beating, register,
    register_refused, showing, wait_until,
};

const PATIENCE: Duration = Duration::from_secs(20);

/// Registry nodes over one etcd cluster.
struct Nodes {
    etcd: EtcdCluster,
    nodes: Vec<TestRegistry>,
    /// Where the nodes keep their keys in etcd.
    prefix: String,
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
        nodes.push(node(&etcd, &prefix, timeouts).await);
    }
    Some(Nodes {
        etcd,
        nodes,
        prefix,
    })
}

/// One registry node over `etcd`, under `prefix`, with `timeouts` as
/// [`nodes`] takes them.
async fn node(etcd: &EtcdCluster, prefix: &str, timeouts: (u64, u64)) -> TestRegistry {
    let (endpoints, prefix) = (etcd.endpoints(), prefix.to_string());
    TestRegistry::start_with(move |config: &mut registry::Config| {
        config.store = StoreKind::Etcd;
        config.etcd.endpoints = endpoints;
        config.etcd.prefix = prefix;
        config.unhealthy_timeout = Duration::from_secs(timeouts.0);
        config.delete_timeout = Duration::from_secs(timeouts.1);
        config.heartbeat_interval = Duration::from_secs(1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_through_one_node_watched_through_another_found_through_a_third() {
    let Some(cluster) = nodes(3, SHORT).await else {
        return;
    };
    let [a, b, c] = [0, 1, 2].map(|i| &cluster.nodes[i]);
    let mut events = watch_svc(&mut b.client().await).await;
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
    let seen = record(watch_svc(&mut on_a).await);
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
    let beating = keep_beating(beats, answers, kept);

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
    // A held both leases first, and its timer of :80's silence came due
    // long before :81 was removed: B took :80 over, so A could not touch it.
    let flaps: Vec<_> = changes(&seen)
        .into_iter()
        .filter(|c| {
            let deleted = c.kind == pb::change::Kind::Delete as i32;
            c.instance
                .as_ref()
                .is_some_and(|i| i.port == 80 && (deleted || !i.healthy))
        })
        .collect();
    assert_eq!(flaps, [], "the instance beaten through B flapped");
    beating.abort();
}

/// The changes a recorded watch has delivered so far.
fn changes(seen: &Mutex<Vec<pb::WatchResponse>>) -> Vec<pb::Change> {
    seen.lock()
        .iter()
        .filter_map(|answer| match &answer.body {
            Some(pb::watch_response::Body::Change(change)) => Some(change.clone()),
            _ => None,
        })
        .collect()
}

/// The etcd leases the keys under `prefix/kind/` hang on, one per key.
async fn leases_under(etcd: &Etcd, prefix: &str, kind: &str) -> Vec<Option<LeaseId>> {
    let (kvs, _) = etcd
        .get_prefix(format!("{prefix}/{kind}/"))
        .await
        .expect("read etcd");
    kvs.into_iter().map(|kv| kv.lease).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_registered_on_a_lease_through_another_node_is_taken_over_with_it() {
    let Some(mut cluster) = nodes(2, SHORT).await else {
        return;
    };
    let mut on_a = cluster.nodes[0].client().await;
    let mut on_b = cluster.nodes[1].client().await;
    let lease = register(&mut on_a, instance("svc", 80)).await.lease_id;
    let (beats, mut answers) = keep_alive(&mut on_a, lease).await;
    answers.next().await.expect("an answer").expect("renewed");
    // A second instance joins the lease through B, whose etcd lease it
    // then hangs on; A takes it over on the client's next beat.
    on_b.register(pb::RegisterRequest {
        instance: Some(instance("svc", 81)),
        lease_id: lease,
    })
    .await
    .expect("register on the same lease through B");
    // The instance hangs on B's etcd lease until A takes it over.
    let etcd = Etcd::connect(&cluster.etcd.endpoints(), PATIENCE).expect("etcd client");
    let (kvs, _) = etcd
        .get_prefix(format!("{}/i/", cluster.prefix))
        .await
        .expect("read etcd");
    let of_b = kvs
        .iter()
        .find(|kv| kv.key.ends_with(b"/81"))
        .and_then(|kv| kv.lease)
        .expect("the instance registered through B hangs on a lease");
    let beating = keep_beating(beats, answers, lease);
    // B goes, and its etcd leases expire.
    cluster.nodes.remove(1).stop().await;
    wait_until("B's etcd lease to expire", PATIENCE, || {
        let etcd = etcd.clone();
        async move { matches!(etcd.lease_ttl(of_b).await, Ok(None)) }
    })
    .await;
    let mut ports: Vec<(u32, bool)> = instances(&mut on_a, "svc", false)
        .await
        .iter()
        .map(|i| (i.port, i.healthy))
        .collect();
    ports.sort();
    assert_eq!(ports, [(80, true), (81, true)]);
    beating.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_made_through_one_node_is_accepted_by_every_node_until_revoked_through_another() {
    // The etcd cluster only: these nodes check credentials.
    let Some(cluster) = nodes(0, SHORT).await else {
        return;
    };
    let endpoints = cluster.etcd.endpoints();
    let prefix = cluster.prefix.clone();
    let guarded = [0, 1].map(|_| (endpoints.clone(), prefix.clone()));
    let mut nodes = Vec::new();
    for (endpoints, prefix) in guarded {
        nodes.push(
            TestRegistry::start_with(move |config: &mut registry::Config| {
                config.store = StoreKind::Etcd;
                config.etcd.endpoints = endpoints;
                config.etcd.prefix = prefix;
                config.auth.enabled = true;
            })
            .await,
        );
    }
    // The first node to find no admin token made one; its data dir has it.
    let dirs: Vec<&std::path::Path> = nodes.iter().map(|n| n.config.data_dir.as_path()).collect();
    let admin = admin_token(&dirs).await;
    let mut on_a = nodes[0].client().await;
    let mut on_b = nodes[1].client().await;
    let create = showing(
        pb::CreateTokenRequest {
            name: "product".into(),
            scope: Some(pb::TokenScope {
                namespace: "public".into(),
                services: vec!["svc".into()],
                ..Default::default()
            }),
        },
        Some(&admin),
    );
    let made = on_a
        .create_token(create)
        .await
        .expect("create through A")
        .into_inner();
    let register = |token: &str| {
        let request = pb::RegisterRequest {
            instance: Some(instance("svc", 80)),
            lease_id: 0,
        };
        showing(request, Some(token))
    };
    // B knows it as soon as its view has the change.
    wait_until("B to accept the token made through A", PATIENCE, || {
        let (mut on_b, request) = (on_b.clone(), register(&made.token));
        async move { on_b.register(request).await.is_ok() }
    })
    .await;
    let revoke = showing(
        pb::RevokeTokenRequest {
            id: made.id.clone(),
        },
        Some(&admin),
    );
    on_b.revoke_token(revoke).await.expect("revoke through B");
    wait_until("A to refuse the token revoked through B", PATIENCE, || {
        let (mut on_a, request) = (on_a.clone(), register(&made.token));
        async move {
            matches!(on_a.register(request).await, Err(s) if s.code() == tonic::Code::Unauthenticated)
        }
    })
    .await;
    let refused = on_b
        .register(register(&made.token))
        .await
        .expect_err("revoked");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_start_together_on_one_data_dir_make_one_admin_token_that_works() {
    let Some(cluster) = nodes(0, SHORT).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = registry::Config {
        store: StoreKind::Etcd,
        etcd: registry::EtcdConfig {
            endpoints: cluster.etcd.endpoints(),
            prefix: cluster.prefix.clone(),
            ..Default::default()
        },
        data_dir: dir.path().into(),
        auth: registry::AuthConfig {
            enabled: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let (a, b) = tokio::join!(
        TestRegistry::start_on(config.clone()),
        TestRegistry::start_on(config)
    );
    let admin = admin_token(&[dir.path()]).await;
    for node in [&a, &b] {
        let request = showing(pb::ListTokensRequest {}, Some(&admin));
        let listed = node
            .client()
            .await
            .list_tokens(request)
            .await
            .expect("the file's token is an admin token on every node")
            .into_inner();
        assert_eq!(listed.tokens.len(), 1, "one admin token: {listed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_hang_on_the_etcd_leases_of_their_node_and_grant_none() {
    let Some(cluster) = nodes(2, SHORT).await else {
        return;
    };
    let etcd = Etcd::connect(&cluster.etcd.endpoints(), PATIENCE).expect("etcd client");
    let mut by_node = Vec::new();
    for (n, node) in cluster.nodes.iter().enumerate() {
        let mut client = node.client().await;
        let mut leases = HashSet::new();
        for port in 0..20 {
            let service = format!("svc-{n}");
            leases.insert(
                register(&mut client, instance(&service, 80 + port))
                    .await
                    .lease_id,
            );
        }
        assert_eq!(leases.len(), 20, "a registry lease each");
        let instances = leases_under(
            &etcd,
            &cluster.prefix,
            &format!("i/public/DEFAULT_GROUP/svc-{n}"),
        )
        .await;
        by_node.push(instances);
    }
    let alive = leases_under(&etcd, &cluster.prefix, "a").await;
    assert_eq!(alive.len(), 40, "an alive key a registry lease");
    for (n, instances) in by_node.iter().enumerate() {
        assert_eq!(instances.len(), 20);
        let distinct: HashSet<_> = instances.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "node {n}'s instances hang on one etcd lease: {distinct:?}"
        );
        assert!(instances[0].is_some());
    }
    assert_ne!(by_node[0][0], by_node[1][0], "each node its own");
    let distinct: HashSet<_> = alive.iter().collect();
    assert_eq!(
        distinct.len(),
        2,
        "the alive keys on one etcd lease a node: {distinct:?}"
    );
    assert!(!distinct.contains(&by_node[0][0]) && !distinct.contains(&by_node[1][0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_etcd_leases_are_revoked_grants_new_ones_and_its_clients_register_again() {
    let Some(cluster) = nodes(1, SHORT).await else {
        return;
    };
    let node = &cluster.nodes[0];
    let service = Isolated::start(
        discovery::Config {
            registry: node.addr.to_string(),
            reconnect_max_backoff: Duration::from_millis(500),
            ..Default::default()
        },
        Announce::new("svc"),
        |_, routes| routes,
    )
    .expect("a registered service");
    let mut client = node.client().await;
    wait_until("the service to be healthy", PATIENCE, || {
        let mut client = client.clone();
        async move { instances(&mut client, "svc", true).await.len() == 1 }
    })
    .await;
    let etcd = Etcd::connect(&cluster.etcd.endpoints(), PATIENCE).expect("etcd client");
    let held = [
        leases_under(&etcd, &cluster.prefix, "a").await,
        leases_under(&etcd, &cluster.prefix, "i").await,
    ];
    let revoked: HashSet<LeaseId> = held.iter().flatten().flatten().copied().collect();
    assert_eq!(revoked.len(), 2, "the node's two etcd leases: {revoked:?}");
    for lease in &revoked {
        etcd.lease_revoke(*lease).await.expect("revoke");
    }
    // Its keys went with them; the node grants new leases, and the
    // service, told its lease is gone, registers again on them.
    wait_until(
        "the service registered again on new leases",
        PATIENCE,
        || {
            let (mut client, etcd, prefix, revoked) = (
                client.clone(),
                etcd.clone(),
                cluster.prefix.clone(),
                revoked.clone(),
            );
            async move {
                let healthy = instances(&mut client, "svc", true).await.len() == 1;
                let now = leases_under(&etcd, &prefix, "i").await;
                healthy && now.len() == 1 && now[0].is_some_and(|l| !revoked.contains(&l))
            }
        },
    )
    .await;
    assert_eq!(instances(&mut client, "svc", false).await.len(), 1);
    drop(service);
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

/// A watch of the service "svc" through `client`.
async fn watch_svc(client: &mut RegistryClient<Channel>) -> tonic::Streaming<pb::WatchResponse> {
    client
        .watch(pb::WatchRequest {
            service: "svc".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
}

/// Every event a Watch stream delivers, recorded as it arrives.
fn record(mut events: tonic::Streaming<pb::WatchResponse>) -> Arc<Mutex<Vec<pb::WatchResponse>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(Ok(answer)) = events.next().await {
                seen.lock().push(answer);
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_for_10s_past_the_delete_timeout_loses_nothing() {
    let Some(mut cluster) = nodes(2, SHORT).await else {
        return;
    };
    let registries = cluster
        .nodes
        .iter()
        .map(|node| node.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let service = Isolated::start(
        discovery::Config {
            registry: registries,
            reconnect_max_backoff: Duration::from_millis(500),
            ..Default::default()
        },
        Announce::new("svc"),
        |_, routes| routes,
    )
    .expect("a registered service");
    let mut on_b = cluster.nodes[1].client().await;
    wait_until("the service to be healthy", PATIENCE, || {
        let mut on_b = on_b.clone();
        async move { instances(&mut on_b, "svc", true).await.len() == 1 }
    })
    .await;
    let seen = record(watch_svc(&mut on_b).await);
    let mut on_a = cluster.nodes[0].client().await;
    let held_by_a = register(&mut on_a, instance("held", 90)).await.lease_id;

    for member in 0..3 {
        cluster
            .etcd
            .stop(member)
            .await
            .expect("stop an etcd member");
    }
    // Reads go on from each node's view.
    assert_eq!(instances(&mut on_b, "svc", false).await.len(), 1);
    assert_eq!(instances(&mut on_a, "svc", false).await.len(), 1);
    // A node that cannot renew its own etcd lease stops answering beats
    // from its view (its clients' keys may expire with that lease): they
    // go to etcd, and fail, so a client can move to a node that reaches it.
    wait_until("A to refuse beats once its etcd lease is stale", PATIENCE, || {
        let mut on_a = on_a.clone();
        async move {
            let (_beats, mut answers) = keep_alive(&mut on_a, held_by_a).await;
            matches!(answers.next().await, Some(Err(status)) if status.code() == tonic::Code::Unavailable)
        }
    })
    .await;
    // Writes are refused, naming etcd.
    let refused = register_refused(&mut on_a, instance("other", 81)).await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("etcd"), "{refused:?}");

    // The fault: etcd down for 10 s, past the 6 s delete timeout.
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.etcd.restart_all().await.expect("restart etcd");
    wait_until("writes to succeed again", PATIENCE, || {
        let mut on_a = on_a.clone();
        async move {
            on_a.register(pb::RegisterRequest {
                instance: Some(instance("other", 81)),
                lease_id: 0,
            })
            .await
            .is_ok()
        }
    })
    .await;
    wait_until("the service to be healthy on both nodes", PATIENCE, || {
        let (mut on_a, mut on_b) = (on_a.clone(), on_b.clone());
        async move {
            instances(&mut on_a, "svc", true).await.len() == 1
                && instances(&mut on_b, "svc", true).await.len() == 1
        }
    })
    .await;
    let deleted: Vec<_> = changes(&seen)
        .into_iter()
        .filter(|change| change.kind == pb::change::Kind::Delete as i32)
        .collect();
    assert!(deleted.is_empty(), "the service was removed: {deleted:?}");
    // Both nodes are listed again, whether their keys outlived the outage
    // or went with their leases and were put again.
    let up: Vec<&TestRegistry> = cluster.nodes.iter().collect();
    for node in &cluster.nodes {
        wait_until("both nodes listed after the outage", PATIENCE, || async {
            listed(node).await == as_listed_by(node, &up)
        })
        .await;
    }
    drop(service);
}

/// Identities are signed with one key for the whole cluster, put in etcd
/// by the first node: one made by any node is checked with the key any
/// other node hands out, and a node that joins later hands out the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_signs_and_hands_out_the_same_identity_key() {
    let Some(mut cluster) = nodes(2, SHORT).await else {
        return;
    };
    async fn keys(node: &TestRegistry) -> Vec<pb::IdentityKey> {
        node.client()
            .await
            .get_identity_keys(pb::GetIdentityKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .keys
    }
    let first = keys(&cluster.nodes[0]).await;
    assert_eq!(first.len(), 1);
    assert_eq!(keys(&cluster.nodes[1]).await, first);
    let endpoints = cluster.etcd.endpoints();
    let prefix = cluster.prefix.clone();
    cluster.nodes.push(
        TestRegistry::start_with(move |config: &mut registry::Config| {
            config.store = StoreKind::Etcd;
            config.etcd.endpoints = endpoints;
            config.etcd.prefix = prefix;
        })
        .await,
    );
    assert_eq!(keys(&cluster.nodes[2]).await, first);

    let mut client = cluster.nodes[1].client().await;
    let identity = client
        .issue_identity(pb::IssueIdentityRequest {
            namespace: String::new(),
            service: "server-order".into(),
            audience: "server-product".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .identity;
    let verifier = shop_mesh::auth::identity::Verifier::new(first.into_iter().map(|k| {
        shop_mesh::auth::identity::PublicKey {
            id: k.id,
            key: k.ed25519,
        }
    }));
    verifier
        .verify(&identity, "public", "server-order", "server-product")
        .expect("node 1's identity checks with node 0's key");
}

/// An instance updated in place through another node than the one it
/// registered through: every node sees the change, and the instance still
/// hangs on the etcd lease it hung on (so its lease keeps it, as before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_updated_through_another_node_keeps_its_etcd_lease() {
    let Some(cluster) = nodes(2, SHORT).await else {
        return;
    };
    let mut on_a = cluster.nodes[0].client().await;
    let mut on_b = cluster.nodes[1].client().await;
    let lease = register(&mut on_a, instance("svc", 80)).await.lease_id;
    let (beats, mut answers) = keep_alive(&mut on_a, lease).await;
    answers.next().await.expect("an answer").expect("renewed");
    let beating = keep_beating(beats, answers, lease);
    let etcd = Etcd::connect(&cluster.etcd.endpoints(), PATIENCE).expect("etcd client");
    let before = leases_under(&etcd, &cluster.prefix, "i").await;
    assert!(
        before[0].is_some(),
        "an ephemeral instance hangs on a lease"
    );

    let revision = on_b
        .update_instance(pb::UpdateInstanceRequest {
            service: "svc".into(),
            ip: "127.0.0.1".into(),
            port: 80,
            weight: Some(0.5),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .expect("updated through B")
        .into_inner()
        .revision;
    for client in [&mut on_a, &mut on_b] {
        wait_until("the change on every node", PATIENCE, || {
            let mut client = client.clone();
            async move {
                let found = instances(&mut client, "svc", false).await;
                found.len() == 1
                    && found[0].weight == Some(0.5)
                    && found[0].enabled == Some(false)
                    && found[0].healthy
            }
        })
        .await;
    }
    assert!(revision > 0);
    assert_eq!(leases_under(&etcd, &cluster.prefix, "i").await, before);
    let status = on_b
        .update_instance(pb::UpdateInstanceRequest {
            service: "svc".into(),
            ip: "127.0.0.1".into(),
            port: 81,
            enabled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    beating.abort();
}

/// The registry nodes `node` says are up: (address, answering), in its
/// order.
async fn listed(node: &TestRegistry) -> Vec<(String, bool)> {
    let answer = node
        .client()
        .await
        .get_cluster(pb::GetClusterRequest {})
        .await
        .expect("GetCluster")
        .into_inner();
    assert_eq!(answer.nodes_error, "", "{answer:?}");
    answer
        .nodes
        .into_iter()
        .map(|n| (n.address, n.answering))
        .collect()
}

/// What `node` should list: every address of `up`, in address order,
/// itself answering.
fn as_listed_by(node: &TestRegistry, up: &[&TestRegistry]) -> Vec<(String, bool)> {
    let mut all: Vec<(String, bool)> = up
        .iter()
        .map(|other| (other.addr.to_string(), other.addr == node.addr))
        .collect();
    all.sort();
    all
}

/// Every node lists the nodes that are up, each saying which answered;
/// one that stops cleanly takes its key with it. The nodes' etcd leases
/// for their keys outlive the test, so only that can make it vanish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_lists_the_nodes_that_are_up_and_one_that_stops_vanishes_at_once() {
    let Some(cluster) = nodes(0, SHORT).await else {
        return;
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let (endpoints, prefix) = (cluster.etcd.endpoints(), cluster.prefix.clone());
        nodes.push(
            TestRegistry::start_with(move |config: &mut registry::Config| {
                config.store = StoreKind::Etcd;
                config.etcd.endpoints = endpoints;
                config.etcd.prefix = prefix;
                config.etcd.prober_ttl = Duration::from_secs(120);
            })
            .await,
        );
    }
    let up: Vec<&TestRegistry> = nodes.iter().collect();
    for node in &nodes {
        wait_until("every node listed by each", PATIENCE, || async {
            listed(node).await == as_listed_by(node, &up)
        })
        .await;
    }
    let answer = nodes[0]
        .client()
        .await
        .get_cluster(pb::GetClusterRequest {})
        .await
        .unwrap()
        .into_inner();
    for node in &answer.nodes {
        assert_eq!(node.version, env!("CARGO_PKG_VERSION"), "{answer:?}");
        assert!(node.started_ms > 1_600_000_000_000, "{answer:?}");
    }

    let stopped = nodes.remove(2);
    let gone = stopped.addr;
    stopped.stop().await;
    let up: Vec<&TestRegistry> = nodes.iter().collect();
    for node in &nodes {
        wait_until(&format!("{gone} to vanish"), PATIENCE, || async {
            listed(node).await == as_listed_by(node, &up)
        })
        .await;
    }
}

/// A node whose etcd lease for its key is revoked behind its back (as
/// when etcd let it expire) grants another and puts its key again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_key_went_with_its_lease_announces_itself_again() {
    let Some(cluster) = nodes(1, SHORT).await else {
        return;
    };
    let node = &cluster.nodes[0];
    let etcd = Etcd::connect(&cluster.etcd.endpoints(), PATIENCE).expect("etcd client");
    wait_until("the node listed", PATIENCE, || async {
        listed(node).await == as_listed_by(node, &[node])
    })
    .await;
    let [Some(first)] = leases_under(&etcd, &cluster.prefix, "n").await[..] else {
        panic!("one key, on a lease");
    };
    etcd.lease_revoke(first).await.expect("revoke");
    wait_until("the node listed again, on a new lease", PATIENCE, || {
        let (etcd, prefix) = (etcd.clone(), cluster.prefix.clone());
        async move {
            let now = leases_under(&etcd, &prefix, "n").await;
            now.len() == 1 && now[0].is_some_and(|lease| lease != first)
        }
    })
    .await;
    assert_eq!(listed(node).await, as_listed_by(node, &[node]));
}

/// A config watch's next answer.
async fn next_config_answer(
    stream: &mut tonic::Streaming<cfg::WatchResponse>,
) -> cfg::WatchResponse {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("a config watch answer in time")
        .expect("the watch goes on")
        .expect("an answer")
}

/// A config watch's next answer as (revision, data id, version,
/// content): whether it is a snapshot, and its items at its revision, or
/// its one change.
async fn config_answer(
    stream: &mut tonic::Streaming<cfg::WatchResponse>,
) -> (bool, Vec<(u64, String, u64, String)>) {
    seen_in(next_config_answer(stream).await)
}

fn seen_in(answer: cfg::WatchResponse) -> (bool, Vec<(u64, String, u64, String)>) {
    let at = answer.revision;
    let seen = |item: cfg::Item| (at, item.data_id, item.version, item.content);
    match answer.body.expect("a body") {
        cfg::watch_response::Body::Snapshot(snapshot) => {
            (true, snapshot.items.into_iter().map(seen).collect())
        }
        cfg::watch_response::Body::Change(change) => {
            (false, vec![seen(change.item.expect("an item"))])
        }
    }
}

/// Publishes `request`; the version it made.
async fn published(configs: &mut ConfigsClient<Channel>, request: cfg::PublishRequest) -> u64 {
    let answer = configs.publish(request).await.expect("published");
    answer.into_inner().item.expect("an item").version
}

/// `content` for `data_id`, on the condition that it is at `expected`.
fn publish_on(data_id: &str, content: &str, expected: u64) -> cfg::PublishRequest {
    cfg::PublishRequest {
        expected_version: Some(expected),
        ..publish(data_id, content)
    }
}

/// How many versions of `data_id` (in the default namespace and group)
/// etcd holds under `prefix`.
async fn versions_in_etcd(etcd: &Etcd, prefix: &str, data_id: &str) -> usize {
    let under = format!("{prefix}/cv/public/DEFAULT_GROUP/{data_id}/");
    etcd.get_prefix(under).await.expect("read etcd").0.len()
}

/// The config centre on etcd: a change made through one node reaches the
/// watchers of every node, once, in order and at the same version; a
/// compare-and-set is refused on a node whose view had not yet seen the
/// change that made it stale; a watcher resumes on another node with
/// exactly what it missed; and etcd keeps no more versions than the
/// history allows, nor any of a deleted item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_through_one_node_reach_every_node_in_order_at_one_version() {
    let Some(cluster) = nodes(2, SHORT).await else {
        return;
    };
    let [a, b] = [0, 1].map(|i| &cluster.nodes[i]);
    let (mut on_a, mut on_b) = (configs(a).await, configs(b).await);
    let watch = cfg::WatchRequest {
        data_id: "app".into(),
        ..Default::default()
    };
    let mut watcher = on_b.watch(watch.clone()).await.unwrap().into_inner();
    let snapshot = next_config_answer(&mut watcher).await;
    let incarnation = snapshot.incarnation;
    assert_eq!(seen_in(snapshot), (true, vec![]));

    let first = on_a
        .publish(publish_on("app", "v1", 0))
        .await
        .unwrap()
        .into_inner();
    let v1 = first.item.unwrap().version;
    assert_eq!(first.revision, v1);
    assert_eq!(
        config_answer(&mut watcher).await,
        (false, vec![(v1, "app".into(), v1, "v1".into())])
    );
    // Written through b against what it has seen: a, whose view may not
    // have caught up, must still refuse the stale version it holds.
    let v2 = published(&mut on_b, publish_on("app", "v2", v1)).await;
    assert!(v2 > v1);
    let stale = on_a
        .publish(publish_on("app", "lost", v1))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    assert!(
        stale.message().contains(&format!("at version {v2}")),
        "{}",
        stale.message()
    );
    let read = on_a
        .get(get("app"))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!((read.version, read.content.as_str()), (v2, "v2"));
    assert_eq!(
        config_answer(&mut watcher).await,
        (false, vec![(v2, "app".into(), v2, "v2".into())])
    );

    // The watcher goes; three changes later it resumes on a.
    drop(watcher);
    let mut made = Vec::new();
    for n in 3..=5 {
        let version = published(&mut on_b, publish("app", &format!("v{n}"))).await;
        made.push((version, "app".to_string(), version, format!("v{n}")));
    }
    let mut resumed = on_a
        .watch(cfg::WatchRequest {
            start_revision: v2 + 1,
            incarnation,
            ..watch
        })
        .await
        .unwrap()
        .into_inner();
    let mut replayed = Vec::new();
    while replayed.len() < made.len() {
        let (snapshot, changes) = config_answer(&mut resumed).await;
        assert!(!snapshot, "resumed with a reset: {changes:?}");
        replayed.extend(changes);
    }
    assert_eq!(replayed, made);

    // Rollback through a restores v1's content under a new version.
    let rolled = on_a
        .rollback(cfg::RollbackRequest {
            data_id: "app".into(),
            version: v1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!(
        (rolled.content.as_str(), rolled.rolled_back_from),
        ("v1", v1)
    );
    let (_, seen) = config_answer(&mut resumed).await;
    assert_eq!(
        seen,
        vec![(rolled.version, "app".into(), rolled.version, "v1".into())]
    );

    // etcd keeps what the history allows (20 by default), no more.
    for n in 0..25 {
        published(&mut on_b, publish("app", &format!("more {n}"))).await;
    }
    let etcd = Etcd::connect(&cluster.etcd.endpoints(), PATIENCE).expect("etcd client");
    assert_eq!(versions_in_etcd(&etcd, &cluster.prefix, "app").await, 20);
    let history = on_a
        .history(cfg::HistoryRequest {
            data_id: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(history.len(), 20);
    assert_eq!(history[0].content, "more 24");

    // A delete through a takes every key of the item along.
    on_a.delete(cfg::DeleteRequest {
        data_id: "app".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(versions_in_etcd(&etcd, &cluster.prefix, "app").await, 0);
    wait_until("b to forget the item", PATIENCE, || {
        let mut on_b = on_b.clone();
        async move {
            on_b.get(get("app"))
                .await
                .is_err_and(|status| status.code() == tonic::Code::NotFound)
        }
    })
    .await;
}

/// A node that joins later reads every item from etcd, however large:
/// twenty versions of content near the limit pass one gRPC message's
/// default size in one page of etcd's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_later_loads_config_history_larger_than_a_message() {
    let Some(cluster) = nodes(1, SHORT).await else {
        return;
    };
    let mut writer = configs(&cluster.nodes[0]).await;
    let content = |n: usize| format!("{n:04}").repeat(60 * 1024);
    for n in 0..20 {
        published(&mut writer, publish("big", &content(n))).await;
    }
    let later = node(&cluster.etcd, &cluster.prefix, SHORT).await;
    // Twenty such versions pass a client's default message size too.
    let history = configs(&later)
        .await
        .max_decoding_message_size(16 * 1024 * 1024)
        .history(cfg::HistoryRequest {
            data_id: "big".into(),
            ..Default::default()
        })
        .await
        .expect("the later node holds the item")
        .into_inner()
        .versions;
    let contents: Vec<String> = history.into_iter().map(|v| v.content).collect();
    let expected: Vec<String> = (0..20).rev().map(content).collect();
    assert!(contents == expected, "the later node's history differs");
}
