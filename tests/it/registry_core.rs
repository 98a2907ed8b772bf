//! The registry's domain type on tokio's paused clock: leases, timeouts,
//! KeepAlive sessions and watches, without a network in between.

use std::time::Duration;

use futures::StreamExt;
use shop_mesh::registry::model::{
    ChangeKind, InstanceAddr, InstanceSpec, Metadata, ServiceKey, TimingOverrides,
};
use shop_mesh::registry::{self, Registry, Selector, WatchItem, WatchStream};
use tokio::time::sleep;

fn service(name: &str) -> ServiceKey {
    ServiceKey::parse("", "", name).unwrap()
}

fn spec(name: &str, port: u32) -> InstanceSpec {
    InstanceSpec {
        service: service(name),
        addr: InstanceAddr::parse("", "10.0.0.1", port).unwrap(),
        weight: 1.0,
        enabled: true,
        ephemeral: true,
        metadata: Metadata::new(),
        timings: TimingOverrides::default(),
    }
}

fn registry() -> Registry {
    Registry::in_memory(&registry::Config::default())
}

fn healthy_ports(registry: &Registry, name: &str) -> Vec<u16> {
    match registry.get_service(&service(name), true, &[]) {
        Ok(view) => view.instances.iter().map(|i| i.addr.port).collect(),
        Err(_) => Vec::new(),
    }
}

fn all_ports(registry: &Registry, name: &str) -> Vec<u16> {
    match registry.get_service(&service(name), false, &[]) {
        Ok(view) => view.instances.iter().map(|i| i.addr.port).collect(),
        Err(_) => Vec::new(),
    }
}

/// The next item, which must already be there: nothing here waits on time.
async fn next_now(watch: &mut WatchStream) -> WatchItem {
    tokio::time::timeout(Duration::ZERO, watch.next())
        .await
        .ok()
        .flatten()
        .expect("an item ready now")
}

fn change(item: WatchItem) -> (u64, ChangeKind, u16, bool) {
    match item {
        WatchItem::Change(e) => (e.revision, e.kind, e.instance.addr.port, e.instance.healthy),
        other => panic!("expected a change, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn silence_makes_an_instance_unhealthy_at_15s_and_removes_it_at_30s() {
    let registry = registry();
    registry.register(spec("svc", 1), 0).await.unwrap();

    sleep(Duration::from_millis(14_900)).await;
    assert_eq!(healthy_ports(&registry, "svc"), [1]);
    sleep(Duration::from_millis(200)).await;
    assert!(
        healthy_ports(&registry, "svc").is_empty(),
        "unhealthy after 15 s"
    );
    assert_eq!(all_ports(&registry, "svc"), [1], "but still listed");

    sleep(Duration::from_millis(14_800)).await;
    assert_eq!(all_ports(&registry, "svc"), [1]);
    sleep(Duration::from_millis(200)).await;
    assert!(all_ports(&registry, "svc").is_empty(), "removed after 30 s");
    assert_eq!(registry.stats().leases, 0, "the lease went with it");
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_an_instance_alive_indefinitely() {
    let registry = registry();
    let lease = registry.register(spec("svc", 1), 0).await.unwrap().lease;
    let revision = registry.stats().revision;
    let mut session = registry.keep_alive();
    for _ in 0..200 {
        sleep(Duration::from_secs(5)).await;
        session.beat(lease).await.unwrap();
    }
    assert_eq!(healthy_ports(&registry, "svc"), [1]);
    assert_eq!(
        registry.stats().revision,
        revision,
        "no flapping on the way"
    );
}

#[tokio::test(start_paused = true)]
async fn per_instance_timeouts_are_honoured() {
    let registry = registry();
    let mut quick = spec("svc", 1);
    quick.timings = TimingOverrides {
        heartbeat_interval_ms: Some(1_000),
        unhealthy_timeout_ms: Some(3_000),
        delete_timeout_ms: Some(6_000),
    };
    registry.register(quick, 0).await.unwrap();
    registry.register(spec("svc", 2), 0).await.unwrap();

    sleep(Duration::from_millis(3_100)).await;
    assert_eq!(healthy_ports(&registry, "svc"), [2]);
    sleep(Duration::from_millis(3_000)).await;
    assert_eq!(
        all_ports(&registry, "svc"),
        [2],
        "the quick one is gone at 6 s"
    );
    sleep(Duration::from_secs(9)).await;
    assert!(
        healthy_ports(&registry, "svc").is_empty(),
        "the default one at 15 s"
    );
}

#[tokio::test(start_paused = true)]
async fn timings_outside_the_server_bounds_are_refused_by_name() {
    let registry = registry();
    let mut bad = spec("svc", 1);
    bad.timings.heartbeat_interval_ms = Some(10);
    let err = registry.register(bad, 0).await.unwrap_err();
    assert!(
        err.to_string().starts_with("heartbeat_interval_ms:"),
        "{err}"
    );

    let mut bad = spec("svc", 1);
    bad.timings.unhealthy_timeout_ms = Some(4_000);
    let err = registry.register(bad, 0).await.unwrap_err();
    assert!(
        err.to_string().starts_with("unhealthy_timeout_ms:"),
        "{err}"
    );

    let mut bad = spec("svc", 1);
    bad.timings.delete_timeout_ms = Some(10_000);
    let err = registry.register(bad, 0).await.unwrap_err();
    assert!(err.to_string().starts_with("delete_timeout_ms:"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_keepalive_session_is_seen_unhealthy_at_once_and_a_resumed_one_heals_it() {
    let registry = registry();
    let lease = registry.register(spec("svc", 1), 0).await.unwrap().lease;
    let mut session = registry.keep_alive();
    session.beat(lease).await.unwrap();
    let mut watch = registry
        .watch(Selector::Service(service("svc")), 0, 0)
        .unwrap();
    assert!(matches!(
        next_now(&mut watch).await,
        WatchItem::Snapshot { .. }
    ));

    drop(session);
    let (_, kind, port, healthy) = change(next_now(&mut watch).await);
    assert_eq!(
        (kind, port, healthy),
        (ChangeKind::Put, 1, false),
        "unhealthy without the clock moving"
    );
    assert!(healthy_ports(&registry, "svc").is_empty());

    sleep(Duration::from_secs(20)).await;
    let mut resumed = registry.keep_alive();
    resumed.beat(lease).await.unwrap();
    let (_, kind, _, healthy) = change(next_now(&mut watch).await);
    assert_eq!((kind, healthy), (ChangeKind::Put, true));

    for _ in 0..20 {
        sleep(Duration::from_secs(5)).await;
        resumed.beat(lease).await.unwrap();
    }
    assert_eq!(healthy_ports(&registry, "svc"), [1]);
    assert!(
        tokio::time::timeout(Duration::ZERO, watch.next())
            .await
            .is_err(),
        "no remove event was ever sent"
    );
}

#[tokio::test(start_paused = true)]
async fn an_orphaned_lease_is_removed_after_the_delete_timeout() {
    let registry = registry();
    let lease = registry.register(spec("svc", 1), 0).await.unwrap().lease;
    let mut session = registry.keep_alive();
    session.beat(lease).await.unwrap();
    drop(session);
    sleep(Duration::from_millis(29_900)).await;
    assert_eq!(all_ports(&registry, "svc"), [1]);
    sleep(Duration::from_millis(200)).await;
    assert!(all_ports(&registry, "svc").is_empty());
    assert!(
        registry.keep_alive().beat(lease).await.is_err(),
        "the lease is gone too"
    );
}

#[tokio::test(start_paused = true)]
async fn a_watch_sends_a_snapshot_then_every_change_in_order() {
    let registry = registry();
    registry.register(spec("svc", 1), 0).await.unwrap();
    registry.register(spec("other", 1), 0).await.unwrap();
    let mut watch = registry
        .watch(Selector::Service(service("svc")), 0, 0)
        .unwrap();
    let WatchItem::Snapshot {
        revision,
        reset,
        instances,
        more,
    } = next_now(&mut watch).await
    else {
        panic!("a snapshot first");
    };
    assert_eq!(
        (revision, reset, instances.len(), more),
        (2, false, 1, false)
    );

    for port in 2..=101 {
        registry.register(spec("svc", port), 0).await.unwrap();
    }
    let key = service("svc");
    let addr = InstanceAddr::parse("", "10.0.0.1", 1).unwrap();
    registry.deregister(&key, &addr).await.unwrap();
    for (i, expected_port) in (2..=101).enumerate() {
        let (rev, kind, port, _) = change(next_now(&mut watch).await);
        assert_eq!(
            (rev, kind, port),
            (3 + i as u64, ChangeKind::Put, expected_port)
        );
    }
    let (rev, kind, port, _) = change(next_now(&mut watch).await);
    assert_eq!((rev, kind, port), (103, ChangeKind::Removed, 1));
}

#[tokio::test(start_paused = true)]
async fn a_resumed_watch_gets_exactly_what_it_missed() {
    let registry = registry();
    registry.register(spec("svc", 1), 0).await.unwrap();
    let incarnation = registry.incarnation();
    let seen = registry.stats().revision;

    for port in 2..=6 {
        registry.register(spec("svc", port), 0).await.unwrap();
        registry.register(spec("other", port), 0).await.unwrap();
    }
    let mut watch = registry
        .watch(Selector::Service(service("svc")), seen + 1, incarnation)
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(change(next_now(&mut watch).await).2);
    }
    assert_eq!(got, [2, 3, 4, 5, 6]);
    assert!(
        tokio::time::timeout(Duration::ZERO, watch.next())
            .await
            .is_err(),
        "and nothing else"
    );

    // Nothing missed at all: nothing replayed, and live changes follow.
    let now = registry.stats().revision;
    let mut watch = registry
        .watch(Selector::Service(service("svc")), now + 1, incarnation)
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::ZERO, watch.next())
            .await
            .is_err()
    );
    registry.register(spec("svc", 7), 0).await.unwrap();
    assert_eq!(change(next_now(&mut watch).await).0, now + 1);
}

#[tokio::test(start_paused = true)]
async fn a_resume_from_forgotten_history_or_another_incarnation_gets_a_reset() {
    let mut config = registry::Config::default();
    config.limits.watch_history = 5;
    let registry = Registry::in_memory(&config);
    for port in 1..=20 {
        registry.register(spec("svc", port), 0).await.unwrap();
    }
    let mut watch = registry
        .watch(Selector::Service(service("svc")), 3, registry.incarnation())
        .unwrap();
    let WatchItem::Snapshot {
        revision,
        reset,
        instances,
        ..
    } = next_now(&mut watch).await
    else {
        panic!("a snapshot");
    };
    assert_eq!((revision, reset, instances.len()), (20, true, 20));

    // The oldest change kept is 16: a watcher that saw 15 is replayed to,
    // one that saw 14 missed a change no longer kept.
    let mut watch = registry
        .watch(
            Selector::Service(service("svc")),
            16,
            registry.incarnation(),
        )
        .unwrap();
    for revision in 16..=20 {
        assert_eq!(change(next_now(&mut watch).await).0, revision);
    }
    let mut watch = registry
        .watch(
            Selector::Service(service("svc")),
            15,
            registry.incarnation(),
        )
        .unwrap();
    assert!(matches!(
        next_now(&mut watch).await,
        WatchItem::Snapshot { reset: true, .. }
    ));

    let mut watch = registry
        .watch(Selector::Service(service("svc")), 20, 12345)
        .unwrap();
    assert!(matches!(
        next_now(&mut watch).await,
        WatchItem::Snapshot { reset: true, .. }
    ));

    let mut watch = registry
        .watch(Selector::Service(service("svc")), 500, 0)
        .unwrap();
    assert!(
        matches!(
            next_now(&mut watch).await,
            WatchItem::Snapshot { reset: true, .. }
        ),
        "a revision from the future is a reset too"
    );
}

#[tokio::test(start_paused = true)]
async fn a_watcher_that_stops_reading_is_bounded_and_then_reset() {
    let mut config = registry::Config::default();
    config.limits.watch_queue_bytes = 4096;
    let registry = Registry::in_memory(&config);
    let mut watch = registry
        .watch(Selector::Group(service("svc").group_key()), 0, 0)
        .unwrap();
    assert!(matches!(
        next_now(&mut watch).await,
        WatchItem::Snapshot { reset: false, .. }
    ));

    for port in 1..=2_000 {
        registry.register(spec("svc", port), 0).await.unwrap();
    }
    let stats = registry.stats();
    assert!(
        stats.queued_bytes <= 4096,
        "queued {} bytes",
        stats.queued_bytes
    );

    let mut snapshot = Vec::new();
    loop {
        let WatchItem::Snapshot {
            revision,
            reset,
            instances,
            more,
        } = next_now(&mut watch).await
        else {
            panic!("a reset snapshot after falling behind");
        };
        assert!(reset);
        assert_eq!(revision, 2_000);
        snapshot.extend(instances);
        if !more {
            break;
        }
    }
    assert_eq!(
        snapshot.len(),
        2_000,
        "in chunks of {}",
        registry::SNAPSHOT_CHUNK
    );
    registry.register(spec("svc", 2_001), 0).await.unwrap();
    assert_eq!(
        change(next_now(&mut watch).await).0,
        2_001,
        "and it follows again"
    );
}

#[tokio::test(start_paused = true)]
async fn abandoned_watches_leave_nothing_behind() {
    let registry = registry();
    let watches: Vec<_> = (0..1_000)
        .map(|i| {
            registry
                .watch(Selector::Service(service(&format!("svc-{i}"))), 0, 0)
                .unwrap()
        })
        .collect();
    assert_eq!(registry.stats().watchers, 1_000);
    drop(watches);
    assert_eq!(registry.stats().watchers, 0);
}

#[tokio::test(start_paused = true)]
async fn the_protection_threshold_keeps_a_service_from_emptying() {
    let registry = registry();
    let key = service("svc");
    let lease = registry.register(spec("svc", 1), 0).await.unwrap().lease;
    registry.register(spec("svc", 2), 0).await.unwrap();
    registry
        .update_service(
            &key,
            shop_mesh::registry::model::ServiceSettings::parse(0.6, []).unwrap(),
        )
        .await
        .unwrap();
    let mut session = registry.keep_alive();
    session.beat(lease).await.unwrap();
    drop(session);

    let view = registry.get_service(&key, true, &[]).unwrap();
    assert!(view.protection_triggered, "1 of 2 healthy is below 0.6");
    assert_eq!(view.instances.len(), 2);

    registry
        .update_service(
            &key,
            shop_mesh::registry::model::ServiceSettings::parse(0.4, []).unwrap(),
        )
        .await
        .unwrap();
    let view = registry.get_service(&key, true, &[]).unwrap();
    assert!(!view.protection_triggered);
    assert_eq!(
        view.instances
            .iter()
            .map(|i| i.addr.port)
            .collect::<Vec<_>>(),
        [2]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stalled_watcher_pins_no_instance_the_registry_has_let_go() {
    let registry = registry();
    for port in 1..=2_000 {
        registry.register(spec("svc", port), 0).await.unwrap();
    }
    let view = registry.get_service(&service("svc"), false, &[]).unwrap();
    let holders = |view: &shop_mesh::registry::model::ServiceView| -> usize {
        view.instances
            .iter()
            .map(std::sync::Arc::strong_count)
            .sum()
    };
    let before = holders(&view);
    let mut watch = registry
        .watch(Selector::Group(service("svc").group_key()), 0, 0)
        .unwrap();
    // The watcher takes the first chunk of its snapshot and stops reading.
    let WatchItem::Snapshot { more: true, .. } = next_now(&mut watch).await else {
        panic!("the first of several chunks");
    };

    // Nothing of the rest was copied for it.
    assert_eq!(
        holders(&view),
        before,
        "instances held for a watcher that is not reading"
    );
    drop(view);

    // Replacing every instance leaves the old versions to be freed; the
    // watcher's queue holds at most its budget of them.
    for port in 1..=2_000 {
        let mut changed = spec("svc", port);
        changed.weight = 2.0;
        registry.register(changed, 0).await.unwrap();
    }
    let budget = registry::Config::default().limits.watch_queue_bytes;
    let queued = registry.stats().queued_bytes;
    assert!(queued <= budget, "{queued} bytes queued");
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_read_over_time_then_its_changes_show_each_change_once() {
    let registry = registry();
    for name in ["a", "b", "c"] {
        for port in 1..=400 {
            registry.register(spec(name, port), 0).await.unwrap();
        }
    }
    let mut watch = registry
        .watch(Selector::Group(service("a").group_key()), 0, 0)
        .unwrap();
    let first = registry.stats().revision;

    // Chunk 1 holds a:1..400 and b:1..100; chunk 2 b:101..400 and
    // c:1..200; chunk 3 the rest.
    let WatchItem::Snapshot {
        instances,
        more: true,
        revision,
        ..
    } = next_now(&mut watch).await
    else {
        panic!("chunk 1");
    };
    assert_eq!(revision, first);
    assert_eq!(
        instances.last().map(|i| (&*i.service.name, i.addr.port)),
        Some(("b", 100))
    );

    let with_interval = |name, port, ms| {
        let mut changed = spec(name, port);
        changed.timings.heartbeat_interval_ms = Some(ms);
        changed
    };
    // Sent already: this change must follow the snapshot.
    registry
        .register(with_interval("a", 1, 1_000), 0)
        .await
        .unwrap();
    // Not sent yet: the snapshot shows it, no change does.
    registry
        .register(with_interval("c", 399, 2_000), 0)
        .await
        .unwrap();
    registry.register(spec("d", 1), 0).await.unwrap();
    // Sent already, then removed.
    registry
        .deregister(&service("b"), &spec("b", 50).addr)
        .await
        .unwrap();

    let WatchItem::Snapshot { more: true, .. } = next_now(&mut watch).await else {
        panic!("chunk 2");
    };
    // In chunk 2, sent now.
    registry
        .register(with_interval("b", 350, 3_000), 0)
        .await
        .unwrap();
    let WatchItem::Snapshot {
        more: false,
        instances,
        ..
    } = next_now(&mut watch).await
    else {
        panic!("chunk 3, the last");
    };
    let shown: std::collections::HashMap<_, _> = instances
        .iter()
        .map(|i| {
            (
                (i.service.name.to_string(), i.addr.port),
                i.timings.heartbeat_interval_ms,
            )
        })
        .collect();
    assert_eq!(shown.get(&("c".to_string(), 399)), Some(&2_000));
    assert!(shown.contains_key(&("d".to_string(), 1)));

    let mut changes = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout(Duration::ZERO, watch.next()).await {
        let WatchItem::Change(event) = item else {
            panic!("only changes after the snapshot");
        };
        changes.push((
            event.kind,
            event.instance.service.name.to_string(),
            event.instance.addr.port,
        ));
    }
    assert_eq!(
        changes,
        [
            (ChangeKind::Put, "a".to_string(), 1),
            (ChangeKind::Removed, "b".to_string(), 50),
            (ChangeKind::Put, "b".to_string(), 350),
        ]
    );
    registry.register(spec("e", 1), 0).await.unwrap();
    assert_eq!(change(next_now(&mut watch).await).2, 1, "and it follows");
}
