//! The etcd client against real 3-member clusters: what the etcd store
//! will rely on (compare-and-swap, leases that delete their keys, watches
//! that replay exactly and report compaction, failover past a dead
//! leader, members without a leader refusing at once).

use std::time::Duration;

use futures::StreamExt;
use shop_mesh::etcd::{
    Cmp, Compare, ErrorKind, Etcd, Event, EventKind, MAX_TXN_OPS, Op, OpResult, Txn, Watch,
    WatchBatch,
};
use shop_mesh::harness::EtcdCluster;
use tokio::time::Instant;

/// How long anything the cluster does may take here.
const PATIENCE: Duration = Duration::from_secs(20);

async fn cluster() -> Option<EtcdCluster> {
    EtcdCluster::start(3).await.expect("etcd cluster")
}

fn client(cluster: &EtcdCluster) -> Etcd {
    Etcd::connect(&cluster.endpoints(), Duration::from_secs(1)).expect("client")
}

async fn next(watch: &mut Watch) -> WatchBatch {
    tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("a watch batch in time")
        .expect("the watch goes on")
        .expect("a batch, not an error")
}

/// Events until one at `revision` or later has been seen, skipping
/// progress notifications.
async fn events_through(watch: &mut Watch, revision: i64) -> Vec<(Event, i64)> {
    let mut seen = Vec::new();
    while seen
        .last()
        .is_none_or(|(e, _): &(Event, i64)| e.revision() < revision)
    {
        match next(watch).await {
            WatchBatch::Events { revision, events } => {
                seen.extend(events.into_iter().map(|e| (e, revision)));
            }
            WatchBatch::Progress { .. } => {}
            other => panic!("expected events, got {other:?}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_gets_prefixes_and_compare_and_swap() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let etcd = client(&cluster);
    let r1 = etcd.put("/svc/a", "1", None).await.unwrap();
    let r2 = etcd.put("/svc/b", "2", None).await.unwrap();
    etcd.put("/svd", "outside", None).await.unwrap();
    assert!(r2 > r1, "revisions grow: {r1}, {r2}");

    let a = etcd.get("/svc/a").await.unwrap().expect("/svc/a");
    assert_eq!((a.value.as_slice(), a.mod_revision), (&b"1"[..], r1));
    assert_eq!(a.create_revision, r1);
    assert_eq!(a.key_str(), Some("/svc/a"));
    assert_eq!(etcd.get("/svc/none").await.unwrap(), None);

    let (kvs, revision) = etcd.get_prefix("/svc/").await.unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(keys, ["/svc/a", "/svc/b"]);
    assert!(revision > r2, "read after the third put: {revision}");

    // Swap against the revision read: succeeds once, then is stale.
    let swap = |expected| {
        Txn::new()
            .when([Compare::mod_revision("/svc/a", Cmp::Equal, expected)])
            .and_then([Op::put("/svc/a", "swapped", None)])
            .or_else([Op::get("/svc/a")])
    };
    let won = etcd.txn(swap(r1)).await.unwrap();
    assert!(won.succeeded);
    assert_eq!(won.results, [OpResult::Put]);
    let lost = etcd.txn(swap(r1)).await.unwrap();
    assert!(!lost.succeeded, "a stale swap must fail");
    let [OpResult::Get(current)] = lost.results.as_slice() else {
        panic!("the failure branch's read: {:?}", lost.results);
    };
    assert_eq!(current[0].value, b"swapped");
    assert_eq!(current[0].mod_revision, won.revision);

    // Create-if-absent, once.
    let create = || {
        Txn::new()
            .when([Compare::absent("/svc/c")])
            .and_then([Op::put("/svc/c", "3", None)])
    };
    assert!(etcd.txn(create()).await.unwrap().succeeded);
    assert!(!etcd.txn(create()).await.unwrap().succeeded);

    assert!(etcd.delete("/svc/c").await.unwrap());
    assert!(!etcd.delete("/svc/c").await.unwrap());
    assert_eq!(etcd.delete_prefix("/svc/").await.unwrap(), 2);
    assert_eq!(etcd.get_prefix("/svc/").await.unwrap().0, []);
    assert!(etcd.get("/svd").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_prefix_reads_whole_across_pages_and_large_txns_are_refused() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let etcd = client(&cluster);
    let keys: Vec<String> = (0..2500).map(|i| format!("/many/{i:05}")).collect();
    let mut last = 0;
    for batch in keys.chunks(MAX_TXN_OPS) {
        let ops = batch.iter().map(|k| Op::put(k, k, None));
        last = etcd.txn(Txn::new().and_then(ops)).await.unwrap().revision;
    }
    etcd.put("/many0", "past the prefix", None).await.unwrap();
    let (kvs, revision) = etcd.get_prefix("/many/").await.unwrap();
    let read: Vec<_> = kvs.iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(read, keys, "every key once, in order");
    assert!(revision > last);

    let too_many = (0..=MAX_TXN_OPS).map(|i| Op::put(format!("/big/{i}"), "x", None));
    let err = etcd.txn(Txn::new().and_then(too_many)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Failed, "{err}");
    assert_eq!(etcd.get_prefix("/big/").await.unwrap().0, []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_deletes_its_keys_and_the_watch_sees_it() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let etcd = client(&cluster);
    let lease = etcd.lease_grant(Duration::from_secs(2)).await.unwrap();
    assert_eq!(lease.ttl, Duration::from_secs(2));
    etcd.put("/inst/x", "up", Some(lease.id)).await.unwrap();
    let mut watch = etcd.watch_prefix("/inst/", 0, true).await.unwrap();
    let mut keepalive = etcd.lease_keepalive(lease.id);
    assert_eq!(
        keepalive.beat().await.unwrap(),
        Some(Duration::from_secs(2))
    );
    let kept = etcd.lease_ttl(lease.id).await.unwrap().expect("alive");
    assert!(kept <= Duration::from_secs(2));

    // No more beats: the lease expires and takes its key with it.
    let beaten = Instant::now();
    let events = events_through(&mut watch, 0).await;
    let [(event, _)] = events.as_slice() else {
        panic!("one event: {events:?}");
    };
    assert_eq!(event.kind, EventKind::Delete);
    assert_eq!(event.kv.key, b"/inst/x");
    assert_eq!(event.prev.as_ref().unwrap().value, b"up");
    assert!(
        beaten.elapsed() >= Duration::from_secs(1),
        "deleted {:?} after the last beat, before its TTL",
        beaten.elapsed()
    );
    assert_eq!(etcd.get("/inst/x").await.unwrap(), None);

    // A beat for a lease that is gone answers "gone", not an error.
    assert_eq!(keepalive.beat().await.unwrap(), None);
    assert_eq!(etcd.lease_ttl(lease.id).await.unwrap(), None);
    let err = etcd
        .put("/inst/y", "late", Some(lease.id))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::LeaseNotFound, "{err}");

    // Revoking deletes at once.
    let lease = etcd.lease_grant(Duration::from_secs(60)).await.unwrap();
    let r = etcd.put("/inst/z", "up", Some(lease.id)).await.unwrap();
    etcd.lease_revoke(lease.id).await.unwrap();
    let events = events_through(&mut watch, r + 1).await;
    assert_eq!(
        events
            .iter()
            .map(|(e, _)| (e.kind, e.kv.key_str().unwrap()))
            .collect::<Vec<_>>(),
        [(EventKind::Put, "/inst/z"), (EventKind::Delete, "/inst/z")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_an_old_revision_replays_exactly_what_followed() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let etcd = client(&cluster);
    let from = etcd.put("/w/1", "a", None).await.unwrap();
    etcd.put("/w/2", "b", None).await.unwrap();
    etcd.put("/other", "not watched", None).await.unwrap();
    etcd.delete("/w/1").await.unwrap();
    let last = etcd
        .txn(Txn::new().and_then([Op::put("/w/3", "c", None), Op::put("/w/4", "d", None)]))
        .await
        .unwrap()
        .revision;

    let mut watch = etcd.watch_prefix("/w/", from + 1, true).await.unwrap();
    let events = events_through(&mut watch, last).await;
    let seen: Vec<_> = events
        .iter()
        .map(|(e, _)| {
            (
                e.kind,
                e.kv.key_str().unwrap().to_owned(),
                e.prev.as_ref().map(|p| p.value.clone()),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (EventKind::Put, "/w/2".into(), None),
            (EventKind::Delete, "/w/1".into(), Some(b"a".to_vec())),
            (EventKind::Put, "/w/3".into(), None),
            (EventKind::Put, "/w/4".into(), None),
        ]
    );
    // The transaction is one revision, delivered in one batch.
    assert_eq!(events[2].0.revision(), last);
    assert_eq!(events[3].0.revision(), last);
    assert!(events.iter().all(|(e, batch)| e.revision() <= *batch));

    // Then nothing more until something happens.
    watch.request_progress().await.unwrap();
    assert_eq!(
        next(&mut watch).await,
        WatchBatch::Progress { revision: last }
    );
    let after = etcd.put("/w/5", "e", None).await.unwrap();
    let events = events_through(&mut watch, after).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0.kv.value, b"e");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_reports_the_compaction() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let etcd = client(&cluster);
    let old = etcd.put("/c/k", "1", None).await.unwrap();
    etcd.put("/c/k", "2", None).await.unwrap();
    let compacted = etcd.put("/c/k", "3", None).await.unwrap();
    etcd.compact(compacted).await.unwrap();

    let mut watch = etcd.watch_prefix("/c/", old, false).await.unwrap();
    assert_eq!(
        next(&mut watch).await,
        WatchBatch::Compacted {
            compact_revision: compacted
        }
    );
    assert!(watch.next().await.is_none(), "etcd ended the watch");

    // From the compaction on, the history is there.
    let mut watch = etcd.watch_prefix("/c/", compacted, false).await.unwrap();
    let events = events_through(&mut watch, compacted).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0.kv.value, b"3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_goes_on_through_another_member_when_the_leader_dies() {
    let Some(mut cluster) = cluster().await else {
        return;
    };
    let etcd = client(&cluster);
    etcd.put("/f/k", "before", None).await.unwrap();
    let leader = cluster.leader().await.unwrap();
    cluster.kill(leader).await.unwrap();

    let give_up = Instant::now() + PATIENCE;
    let mut refused = 0;
    loop {
        match etcd.put("/f/k", "after", None).await {
            Ok(_) => break,
            Err(err) => {
                assert!(err.is_unavailable(), "a retryable error: {err}");
                assert!(err.to_string().starts_with("etcd at http://"), "{err}");
                refused += 1;
                assert!(Instant::now() < give_up, "no put succeeded: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let elected = cluster.leader().await.unwrap();
    assert_ne!(elected, leader);
    for _ in 0..10 {
        // Every call succeeds now, whichever live member it reaches.
        assert_eq!(etcd.get("/f/k").await.unwrap().unwrap().value, b"after");
    }
    eprintln!("{refused} puts refused while the leader was dead");

    // The killed member rejoins and catches up.
    cluster.restart(leader).await.unwrap();
    let alone = Etcd::connect(
        &cluster.endpoints()[leader..=leader],
        Duration::from_secs(1),
    )
    .unwrap();
    let give_up = Instant::now() + PATIENCE;
    while alone.get("/f/k").await.ok().flatten().map(|kv| kv.value) != Some(b"after".to_vec()) {
        assert!(
            Instant::now() < give_up,
            "the restarted member did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_a_leader_refuses_at_once() {
    let Some(mut cluster) = cluster().await else {
        return;
    };
    cluster.kill(1).await.unwrap();
    cluster.kill(2).await.unwrap();
    let alone = Etcd::connect(&cluster.endpoints()[..1], Duration::from_secs(1))
        .unwrap()
        .with_request_timeout(PATIENCE);

    // Once it has noticed the leader gone, it says so: without
    // `hasleader`, a watch would be created and a put would hang.
    let give_up = Instant::now() + PATIENCE;
    let err = loop {
        match alone.watch_prefix("/", 0, false).await {
            Err(err) if err.message.contains("no leader") => break err,
            Ok(_) | Err(_) => {
                assert!(Instant::now() < give_up, "the watch never refused");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(err.is_unavailable(), "{err}");
    let asked = Instant::now();
    let err = alone.put("/k", "v", None).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(err.message.contains("no leader"), "{err}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_shows_every_member() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let etcd = client(&cluster);
    let members = etcd.member_list().await.unwrap();
    let mut names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["m0", "m1", "m2"]);
    let mut urls: Vec<_> = members.iter().flat_map(|m| m.client_urls.clone()).collect();
    urls.sort();
    assert_eq!(urls, cluster.endpoints());
    assert!(members.iter().all(|m| m.id != 0 && !m.is_learner));

    let status = etcd.status().await.unwrap();
    assert!(members.iter().any(|m| m.id == status.leader_id));
    assert!(members.iter().any(|m| m.id == status.member_id));
    assert!(status.version.starts_with("3."), "{}", status.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_member_misses_writes_and_catches_up_on_restart() {
    let Some(mut cluster) = cluster().await else {
        return;
    };
    let etcd = client(&cluster);
    let leader = cluster.leader().await.unwrap();
    let follower = (leader + 1) % 3;
    cluster.stop(follower).await.unwrap();
    assert!(!cluster.is_running(follower));

    // Two of three are a quorum: writes go on, through whichever answers.
    let give_up = Instant::now() + PATIENCE;
    let written = loop {
        match etcd.put("/s/k", "while stopped", None).await {
            Ok(revision) => break revision,
            Err(err) if err.is_unavailable() && Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("{err}"),
        }
    };

    cluster.restart(follower).await.unwrap();
    let alone = Etcd::connect(
        &cluster.endpoints()[follower..=follower],
        Duration::from_secs(1),
    )
    .unwrap();
    let give_up = Instant::now() + PATIENCE;
    loop {
        let status = alone.status().await.unwrap();
        if status.revision >= written {
            break;
        }
        assert!(Instant::now() < give_up, "stuck at {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kv = alone.get("/s/k").await.unwrap().expect("replicated");
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"while stopped"[..], written)
    );
}
