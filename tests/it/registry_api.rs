//! The registry over gRPC: what a client sees, status codes included.

use std::collections::HashMap;
use std::time::Duration;

use shop_mesh::pb::registry as pb;
use shop_mesh::pb::registry::registry_client::RegistryClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::{
    TestRegistry, deregister, instance, keep_alive, register, register_refused, wait_until,
};

async fn get(
    client: &mut RegistryClient<Channel>,
    service: &str,
    healthy_only: bool,
) -> pb::GetServiceResponse {
    client
        .get_service(pb::GetServiceRequest {
            service: service.into(),
            healthy_only,
            ..Default::default()
        })
        .await
        .expect("get service")
        .into_inner()
}

async fn next_change(watch: &mut tonic::Streaming<pb::WatchResponse>) -> (u64, pb::Change) {
    let answer = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("a change within 5 s")
        .expect("stream ok")
        .expect("stream open");
    match answer.body {
        Some(pb::watch_response::Body::Change(change)) => (answer.revision, change),
        other => panic!("expected a change, got {other:?}"),
    }
}

#[tokio::test]
async fn register_get_deregister_move_the_revision_by_one_each() {
    let registry = TestRegistry::start().await;
    let mut client = registry.client().await;

    let first = register(&mut client, instance("server-user", 8060)).await;
    assert_eq!(first.revision, 1);
    assert_eq!(
        first.instance_id,
        "127.0.0.1#8060#DEFAULT#DEFAULT_GROUP@@server-user"
    );
    assert_ne!(first.lease_id, 0);
    assert_eq!(first.heartbeat_interval_ms, 5_000);

    let service = get(&mut client, "server-user", false).await;
    assert_eq!(service.instances.len(), 1);
    let got = &service.instances[0];
    assert!(got.healthy);
    assert_eq!(
        (
            got.namespace.as_str(),
            got.group.as_str(),
            got.cluster.as_str()
        ),
        ("public", "DEFAULT_GROUP", "DEFAULT")
    );
    assert_eq!(
        (got.weight, got.enabled, got.ephemeral),
        (Some(1.0), Some(true), Some(true))
    );

    let again = register(&mut client, instance("server-user", 8060)).await;
    assert_eq!(again.revision, 1, "the same registration changes nothing");
    let mut heavier = instance("server-user", 8060);
    heavier.weight = Some(2.0);
    let changed = register(&mut client, heavier).await;
    assert_eq!(changed.revision, 2, "an update is one change");
    assert_eq!(changed.instance_id, first.instance_id);
    let service = get(&mut client, "server-user", false).await;
    assert_eq!(service.instances.len(), 1, "still one instance");
    assert_eq!(service.instances[0].weight, Some(2.0));

    let gone = deregister(&mut client, "server-user", 8060).await.unwrap();
    assert_eq!(gone.revision, 3);
    let err = client
        .get_service(pb::GetServiceRequest {
            service: "server-user".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    registry.stop().await;
}

#[tokio::test]
async fn list_services_counts_and_pages() {
    let registry = TestRegistry::start().await;
    let mut client = registry.client().await;
    for name in ["a", "b", "c"] {
        register(&mut client, instance(name, 1)).await;
        register(&mut client, instance(name, 2)).await;
    }
    let mut elsewhere = instance("d", 1);
    elsewhere.group = "OTHER".into();
    register(&mut client, elsewhere).await;

    let page = |page, page_size| pb::ListServicesRequest {
        page,
        page_size,
        ..Default::default()
    };
    let first = client.list_services(page(1, 2)).await.unwrap().into_inner();
    assert_eq!(first.total, 3);
    let names: Vec<_> = first.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        (
            first.services[0].instance_count,
            first.services[0].healthy_count
        ),
        (2, 2)
    );
    let second = client.list_services(page(2, 2)).await.unwrap().into_inner();
    assert_eq!(
        second
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["c"]
    );

    let err = client.list_services(page(1, 5_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("page_size"), "{}", err.message());
    registry.stop().await;
}

#[tokio::test]
async fn each_bad_input_gets_its_code_and_names_its_field() {
    let registry = TestRegistry::start().await;
    let mut client = registry.client().await;
    let with = |f: fn(&mut pb::Instance)| {
        let mut i = instance("svc", 80);
        f(&mut i);
        i
    };
    let big_metadata: HashMap<_, _> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    let cases: Vec<(pb::Instance, &str)> = vec![
        (with(|i| i.service.clear()), "service"),
        (with(|i| i.service = "x".repeat(129)), "service"),
        (with(|i| i.service = "bad name".into()), "service"),
        (with(|i| i.service = "a/b".into()), "service"),
        (with(|i| i.namespace = "ns!".into()), "namespace"),
        (with(|i| i.group = "g roup".into()), "group"),
        (with(|i| i.cluster = "c#1".into()), "cluster"),
        (with(|i| i.port = 0), "port"),
        (with(|i| i.port = 65_536), "port"),
        (with(|i| i.ip = "localhost".into()), "ip"),
        (with(|i| i.ip = "300.1.1.1".into()), "ip"),
        (with(|i| i.ip.clear()), "ip"),
        (with(|i| i.weight = Some(-1.0)), "weight"),
        (with(|i| i.weight = Some(f64::NAN)), "weight"),
        (with(|i| i.weight = Some(10_001.0)), "weight"),
        (
            with(|i| i.metadata = [("k".into(), "v".repeat(1025))].into()),
            "metadata",
        ),
        (
            with(|i| i.heartbeat_interval_ms = Some(1)),
            "heartbeat_interval_ms",
        ),
        (
            pb::Instance {
                metadata: big_metadata,
                ..instance("svc", 80)
            },
            "metadata",
        ),
    ];
    for (bad, field) in cases {
        let err = register_refused(&mut client, bad.clone()).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "message {:?} should name {field}",
            err.message()
        );
    }
    let err = client
        .register(pb::RegisterRequest {
            instance: None,
            lease_id: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = client
        .register(pb::RegisterRequest {
            instance: Some(instance("svc", 80)),
            lease_id: 424_242,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("lease 424242"), "{}", err.message());

    let err = deregister(&mut client, "svc", 80).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let err = client
        .update_service(pb::UpdateServiceRequest {
            service: "svc".into(),
            protect_threshold: 1.5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("protect_threshold:"));

    let (_beats, mut answers) = keep_alive(&mut client, 99).await;
    let err = answers.message().await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("lease 99"));
    registry.stop().await;
}

#[tokio::test]
async fn limits_answer_resource_exhausted_and_oversize_messages_are_refused() {
    let registry = TestRegistry::start_with(|c| {
        c.limits.max_instances_per_service = 2;
        c.limits.max_services_per_namespace = 2;
        c.limits.max_watches = 1;
        c.limits.max_message_size = 16 * 1024;
    })
    .await;
    let mut client = registry.client().await;
    register(&mut client, instance("a", 1)).await;
    register(&mut client, instance("a", 2)).await;
    let err = register_refused(&mut client, instance("a", 3)).await;
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    register(&mut client, instance("a", 2)).await;

    register(&mut client, instance("b", 1)).await;
    let err = register_refused(&mut client, instance("c", 1)).await;
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let _held = client
        .watch(pb::WatchRequest {
            service: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = client
        .watch(pb::WatchRequest {
            service: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    let mut huge = instance("a", 1);
    huge.metadata = (0..40)
        .map(|i| (format!("k{i}"), "v".repeat(1000)))
        .collect();
    let err = register_refused(&mut client, huge).await;
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());

    register(&mut client, instance("a", 1)).await;
    registry.stop().await;
}

#[tokio::test]
async fn a_broken_keepalive_stream_shows_unhealthy_at_once_and_a_new_one_heals_without_a_remove() {
    let registry = TestRegistry::start().await;
    let mut client = registry.client().await;
    let lease = register(&mut client, instance("svc", 1)).await.lease_id;

    let (tx, mut answers) = keep_alive(&mut client, lease).await;
    let answer = answers.message().await.unwrap().unwrap();
    assert_eq!(
        (answer.lease_id, answer.heartbeat_interval_ms),
        (lease, 5_000)
    );

    let mut watch = client
        .watch(pb::WatchRequest {
            service: "svc".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let snapshot = watch.message().await.unwrap().unwrap();
    let mut revision = snapshot.revision;

    // The keep-alive connection goes away: a fresh channel, dropped.
    drop(tx);
    drop(answers);
    let (_, change) = next_change(&mut watch).await;
    assert_eq!(change.kind(), pb::change::Kind::Put);
    assert!(
        !change.instance.as_ref().unwrap().healthy,
        "unhealthy long before the 15 s timeout"
    );
    revision += 1;

    let (tx, mut answers) = keep_alive(&mut client, lease).await;
    answers.message().await.unwrap().unwrap();
    let (rev, change) = next_change(&mut watch).await;
    assert_eq!(rev, revision + 1);
    assert_eq!(change.kind(), pb::change::Kind::Put);
    assert!(change.instance.unwrap().healthy);
    drop(tx);
    registry.stop().await;
}

#[tokio::test]
async fn a_watch_resumes_over_grpc_with_its_incarnation() {
    let registry = TestRegistry::start().await;
    let mut client = registry.client().await;
    register(&mut client, instance("svc", 1)).await;
    let mut watch = client
        .watch(pb::WatchRequest {
            service: "svc".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    drop(watch);

    register(&mut client, instance("svc", 2)).await;
    register(&mut client, instance("svc", 3)).await;
    let mut watch = client
        .watch(pb::WatchRequest {
            service: "svc".into(),
            start_revision: first.revision + 1,
            incarnation: first.incarnation,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_change(&mut watch).await.1.instance.unwrap().port, 2);
    assert_eq!(next_change(&mut watch).await.1.instance.unwrap().port, 3);
    registry.stop().await;
}

#[tokio::test]
async fn a_persistent_instance_follows_its_health_server_and_survives_a_restart() {
    // A real grpc.health.v1 server whose status the test flips.
    let (reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let config = shop_mesh::registry::Config {
        data_dir: dir.path().into(),
        probe_interval: Duration::from_millis(50),
        ..crate::without_credentials()
    };
    let registry = TestRegistry::start_on(config.clone()).await;
    let mut client = registry.client().await;
    let mut db = instance("mysql", port.into());
    db.ephemeral = Some(false);
    let registered = register(&mut client, db).await;
    assert_eq!(registered.lease_id, 0, "persistent instances hold no lease");

    let healthy = |client: &RegistryClient<Channel>| {
        let mut client = client.clone();
        async move { get(&mut client, "mysql", true).await.instances.len() == 1 }
    };
    wait_until(
        "the probe to find it healthy",
        Duration::from_secs(10),
        || healthy(&client),
    )
    .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    wait_until(
        "the probe to find it not serving",
        Duration::from_secs(10),
        || {
            let check = healthy(&client);
            async move { !check.await }
        },
    )
    .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    wait_until(
        "the probe to find it serving again",
        Duration::from_secs(10),
        || healthy(&client),
    )
    .await;

    registry.stop().await;
    let registry = TestRegistry::start_on(config).await;
    let mut client = registry.client().await;
    let service = get(&mut client, "mysql", false).await;
    assert_eq!(service.instances.len(), 1, "it survived the restart");
    assert_eq!(service.instances[0].ephemeral, Some(false));
    wait_until(
        "the new registry's probe to find it healthy",
        Duration::from_secs(10),
        || healthy(&client),
    )
    .await;

    // Deregistered, it stays gone after another restart.
    deregister(&mut client, "mysql", port.into()).await.unwrap();
    let config = registry.config.clone();
    registry.stop().await;
    let registry = TestRegistry::start_on(config).await;
    let mut client = registry.client().await;
    let err = client
        .get_service(pb::GetServiceRequest {
            service: "mysql".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    registry.stop().await;
}

#[tokio::test]
async fn a_registration_cannot_flip_ephemeral_to_persistent() {
    let registry = TestRegistry::start().await;
    let mut client = registry.client().await;
    register(&mut client, instance("svc", 1)).await;
    let mut persistent = instance("svc", 1);
    persistent.ephemeral = Some(false);
    let err = register_refused(&mut client, persistent).await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    registry.stop().await;
}

fn update(service: &str, protect_threshold: f64) -> pb::UpdateServiceRequest {
    pb::UpdateServiceRequest {
        service: service.into(),
        protect_threshold,
        ..Default::default()
    }
}

fn delete(service: &str) -> pb::DeleteServiceRequest {
    pb::DeleteServiceRequest {
        service: service.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn update_service_never_makes_a_service_and_delete_service_frees_its_room() {
    let dir = tempfile::tempdir().unwrap();
    let config = shop_mesh::registry::Config {
        data_dir: dir.path().to_path_buf(),
        limits: shop_mesh::registry::Limits {
            max_services_per_namespace: 2,
            ..Default::default()
        },
        ..crate::without_credentials()
    };
    let registry = TestRegistry::start_on(config.clone()).await;
    let mut client = registry.client().await;

    // Settings for names nothing registered are refused, and so cannot
    // fill the namespace.
    for name in ["ghost-1", "ghost-2", "ghost-3"] {
        let err = client.update_service(update(name, 0.5)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(err.message().contains("is not registered"), "{err:?}");
    }
    register(&mut client, instance("a", 1)).await;
    register(&mut client, instance("b", 1)).await;

    // A service with settings outlives its instances, and keeps its room
    // until it is deleted; deletion waits for its instances to go.
    client.update_service(update("a", 0.5)).await.unwrap();
    let err = client.delete_service(delete("a")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("1 instance"), "{err:?}");
    deregister(&mut client, "a", 1).await.unwrap();
    deregister(&mut client, "b", 1).await.unwrap();
    assert_eq!(get(&mut client, "a", false).await.protect_threshold, 0.5);
    register(&mut client, instance("c", 1)).await;
    let full = register_refused(&mut client, instance("d", 1)).await;
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");

    client.delete_service(delete("a")).await.unwrap();
    let err = client.delete_service(delete("a")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    register(&mut client, instance("d", 1)).await;

    // The deletion is stored: the service does not come back.
    registry.stop().await;
    let registry = TestRegistry::start_on(config).await;
    let mut client = registry.client().await;
    let err = client
        .get_service(pb::GetServiceRequest {
            service: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    registry.stop().await;
}

#[tokio::test]
async fn errors_quote_a_short_prefix_of_a_bad_value_not_all_of_it() {
    let registry = TestRegistry::start().await;
    let mut client = registry.client().await;
    let megabyte = "9".repeat(1 << 20);

    let mut bad_ip = instance("svc", 1);
    bad_ip.ip = megabyte.clone();
    let mut bad_key = instance("svc", 1);
    bad_key.metadata = HashMap::from([(megabyte.clone(), "v".into())]);
    let mut bad_value = instance("svc", 1);
    bad_value.metadata = HashMap::from([(megabyte.clone(), "v".repeat(2000))]);
    for (field, bad) in [
        ("ip", bad_ip),
        ("metadata", bad_key),
        ("metadata", bad_value),
    ] {
        let err = register_refused(&mut client, bad).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().starts_with(field), "{}", err.message());
        assert!(
            err.message().len() < 200,
            "{field}: a {} byte message",
            err.message().len()
        );
        assert!(err.message().contains("1048576 bytes"), "{}", err.message());
    }
    registry.stop().await;
}

#[tokio::test]
async fn addresses_no_service_can_listen_on_are_refused() {
    let registry = TestRegistry::start().await;
    let mut client = registry.client().await;
    for (ip, what) in [
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("239.1.2.3", "multicast"),
        ("ff02::1", "multicast"),
        ("169.254.10.20", "link-local"),
        ("fe80::1", "link-local"),
    ] {
        let mut i = instance("svc", 1);
        i.ip = ip.into();
        i.ephemeral = Some(false);
        let err = register_refused(&mut client, i).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{ip}");
        assert!(err.message().contains(what), "{ip}: {}", err.message());
    }
    registry.stop().await;

    let registry = TestRegistry::start_with(|c| c.allow_link_local = true).await;
    let mut client = registry.client().await;
    let mut i = instance("svc", 1);
    i.ip = "169.254.10.20".into();
    register(&mut client, i).await;
    registry.stop().await;
}
