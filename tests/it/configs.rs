//! The config centre over gRPC: publish, get, compare-and-set, history,
//! rollback, delete, limits, credentials, a restart, and the watch's
//! guarantees (snapshot, every change once and in order, resume, reset).

use std::time::Duration;

use futures::StreamExt;
use shop_mesh::pb::config as pb;
use shop_mesh::pb::config::configs_client::ConfigsClient;
use shop_mesh::pb::registry as registry_pb;
use shop_mesh::pb::registry::registry_client::RegistryClient;
use shop_mesh::registry::configs::model::{Client, ConfigKey, ContentType, md5_hex};
use shop_mesh::registry::configs::{Expect, Publish, Selector, WatchItem};
use shop_mesh::registry::model::GroupKey;
use shop_mesh::registry::{self, Registry};
use tonic::Code;
use tonic::transport::Channel;

use shop_mesh::live;
use shop_mesh::pb::shop::PlaceOrderRequest;
use shop_mesh::pb::shop::order_service_client::OrderServiceClient;
use shop_mesh::roles::ShopRole;
use shop_mesh::shop::ORDER_SERVICE;

use crate::shop::{Backend, TestShop};
use crate::{TestRegistry, admin_token, run_bin, showing, wait_until};

pub(crate) async fn configs(registry: &TestRegistry) -> ConfigsClient<Channel> {
    ConfigsClient::connect(registry.url())
        .await
        .expect("connect to the registry")
}

pub(crate) fn publish(data_id: &str, content: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        data_id: data_id.into(),
        content: content.into(),
        ..Default::default()
    }
}

pub(crate) fn get(data_id: &str) -> pb::GetRequest {
    pb::GetRequest {
        data_id: data_id.into(),
        ..Default::default()
    }
}

/// One answer of a watch, as a test compares them: a snapshot's
/// (data id, content) pairs, or a change's (revision, kind, data id,
/// content).
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Snapshot {
        reset: bool,
        items: Vec<(String, String)>,
    },
    Change(u64, i32, String, String),
}

async fn next(stream: &mut tonic::Streaming<pb::WatchResponse>) -> (u64, u64, Seen) {
    let answer = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watch answer in time")
        .expect("the watch goes on")
        .expect("an answer");
    let seen = match answer.body.expect("a body") {
        pb::watch_response::Body::Snapshot(snapshot) => Seen::Snapshot {
            reset: snapshot.reset,
            items: snapshot
                .items
                .into_iter()
                .map(|i| (i.data_id, i.content))
                .collect(),
        },
        pb::watch_response::Body::Change(change) => {
            let item = change.item.expect("a change names its item");
            // A put's version is its revision, or an earlier one when
            // what the watcher reads went back (a gray version abandoned).
            assert!(
                item.version <= answer.revision,
                "{item:?} at {}",
                answer.revision
            );
            Seen::Change(answer.revision, change.kind, item.data_id, item.content)
        }
    };
    (answer.revision, answer.incarnation, seen)
}

async fn watch(
    client: &mut ConfigsClient<Channel>,
    request: pb::WatchRequest,
) -> tonic::Streaming<pb::WatchResponse> {
    client.watch(request).await.expect("watch").into_inner()
}

const PUT: i32 = pb::change::Kind::Put as i32;
const DELETE: i32 = pb::change::Kind::Delete as i32;

#[tokio::test]
async fn publish_get_history_rollback_and_delete_with_compare_and_set() {
    let registry = TestRegistry::start().await;
    let mut client = configs(&registry).await;

    let mut first = publish("app.json", r#"{"limit": 1}"#);
    first.content_type = pb::ContentType::Json as i32;
    first.expected_version = Some(0);
    let v1 = client.publish(first.clone()).await.unwrap().into_inner();
    let item = v1.item.unwrap();
    assert_eq!(item.version, 1);
    assert_eq!(item.md5, md5_hex(r#"{"limit": 1}"#));
    assert_eq!(
        (item.namespace.as_str(), item.group.as_str()),
        ("public", "DEFAULT_GROUP")
    );

    // "Must not exist" refuses a second create.
    let again = client.publish(first.clone()).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    assert!(
        again.message().contains("at version 1"),
        "{}",
        again.message()
    );

    let mut second = publish("app.json", r#"{"limit": 2}"#);
    second.content_type = pb::ContentType::Json as i32;
    second.expected_version = Some(1);
    let v2 = client.publish(second.clone()).await.unwrap().into_inner();
    assert_eq!(v2.revision, 2);
    // The same compare-and-set again is stale now, and changes nothing.
    let stale = client.publish(second).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(
        stale.message().contains("at version 2, not at version 1"),
        "{}",
        stale.message()
    );
    let now = client
        .get(get("app.json"))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!((now.version, now.content.as_str()), (2, r#"{"limit": 2}"#));

    // History lists both, newest first; an old version can be read.
    let history = client
        .history(pb::HistoryRequest {
            data_id: "app.json".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    let versions: Vec<(u64, &str)> = history
        .iter()
        .map(|v| (v.version, v.content.as_str()))
        .collect();
    assert_eq!(versions, [(2, r#"{"limit": 2}"#), (1, r#"{"limit": 1}"#)]);
    let old = client
        .get(pb::GetRequest {
            version: Some(1),
            ..get("app.json")
        })
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!(old.md5, item.md5);

    // A rollback to version 1 is a new version with version 1's content
    // and digest, and says where it came from.
    let rolled = client
        .rollback(pb::RollbackRequest {
            data_id: "app.json".into(),
            version: 1,
            expected_version: Some(2),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!(
        (
            rolled.version,
            rolled.content.as_str(),
            rolled.md5.as_str(),
            rolled.rolled_back_from
        ),
        (3, r#"{"limit": 1}"#, item.md5.as_str(), 1)
    );
    let missing = client
        .rollback(pb::RollbackRequest {
            data_id: "app.json".into(),
            version: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(
        missing.message().contains("keeps 3, 2, 1"),
        "{}",
        missing.message()
    );

    // A stale delete is refused; a current one deletes; a publish after it
    // gets a version never used before.
    let stale = client
        .delete(pb::DeleteRequest {
            data_id: "app.json".into(),
            expected_version: Some(2),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    client
        .delete(pb::DeleteRequest {
            data_id: "app.json".into(),
            expected_version: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    let gone = client.get(get("app.json")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(
        gone.message().contains("public/DEFAULT_GROUP/app.json"),
        "{}",
        gone.message()
    );
    // The old version 1 cannot be compared-and-set against any more.
    let stale = client
        .publish(pb::PublishRequest {
            expected_version: Some(1),
            ..publish("app.json", "{}")
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let reborn = client
        .publish(publish("app.json", "x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reborn.revision, 5);
    registry.stop().await;
}

#[tokio::test]
async fn bad_content_and_limits_are_refused_by_name_and_change_nothing() {
    let registry = TestRegistry::start_with(|config| {
        config.configs.max_content_bytes = 1024;
        config.configs.max_items_per_namespace = 2;
    })
    .await;
    let mut client = configs(&registry).await;
    let typed = |data_id: &str, content: &str, kind: pb::ContentType| pb::PublishRequest {
        content_type: kind as i32,
        ..publish(data_id, content)
    };
    let cases = [
        (
            typed("a.json", "{ not json", pb::ContentType::Json),
            Code::InvalidArgument,
            "content: is not valid json",
        ),
        (
            typed("a.toml", "a = = 1", pb::ContentType::Toml),
            Code::InvalidArgument,
            "content: is not valid toml",
        ),
        (
            typed("a.yaml", "a: [1", pb::ContentType::Yaml),
            Code::InvalidArgument,
            "content: is not valid yaml",
        ),
        (
            typed("a.properties", "=1", pb::ContentType::Properties),
            Code::InvalidArgument,
            "no key",
        ),
        (
            publish("big", &"x".repeat(1025)),
            Code::InvalidArgument,
            "at most 1024",
        ),
        (
            publish("", "x"),
            Code::InvalidArgument,
            "data_id: must not be empty",
        ),
        (
            publish("a b", "x"),
            Code::InvalidArgument,
            "data_id: contains ' '",
        ),
        (
            pb::PublishRequest {
                content_type: 42,
                ..publish("a", "x")
            },
            Code::InvalidArgument,
            "content_type: 42",
        ),
    ];
    for (request, code, says) in cases {
        let err = client.publish(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{request:?}: {err:?}");
        assert!(
            err.message().contains(says),
            "{request:?}: {}",
            err.message()
        );
    }
    // Nothing of those was written.
    let listed = client
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((listed.total, listed.revision), (0, 0));

    client.publish(publish("one", "1")).await.unwrap();
    client.publish(publish("two", "2")).await.unwrap();
    let full = client.publish(publish("three", "3")).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(
        full.message().contains("max_items_per_namespace"),
        "{}",
        full.message()
    );
    // An item held may still change, and another namespace has room.
    client.publish(publish("two", "2b")).await.unwrap();
    client
        .publish(pb::PublishRequest {
            namespace: "staging".into(),
            ..publish("three", "3")
        })
        .await
        .unwrap();
    let listed = client
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<(&str, &str, u64)> = listed
        .items
        .iter()
        .map(|i| (i.data_id.as_str(), i.content.as_str(), i.size))
        .collect();
    assert_eq!(names, [("one", "", 1), ("two", "", 2)]);
    registry.stop().await;
}

#[tokio::test]
async fn every_watcher_gets_each_change_once_in_order_and_a_resumed_one_what_it_missed() {
    let registry = TestRegistry::start().await;
    let mut client = configs(&registry).await;
    client.publish(publish("before", "0")).await.unwrap();
    let group = pb::WatchRequest::default();
    let one = pb::WatchRequest {
        data_id: "a".into(),
        ..Default::default()
    };
    let mut watchers = Vec::new();
    for request in [group.clone(), group.clone(), one.clone()] {
        let mut stream = watch(&mut client, request.clone()).await;
        let (revision, _, first) = next(&mut stream).await;
        assert_eq!(revision, 1);
        let expected = if request.data_id.is_empty() {
            vec![("before".to_string(), "0".to_string())]
        } else {
            vec![]
        };
        assert_eq!(
            first,
            Seen::Snapshot {
                reset: false,
                items: expected
            }
        );
        watchers.push((request, stream));
    }

    // Changes to two items from two publishers at once.
    let (mut a, mut b) = (client.clone(), client.clone());
    let publish_a = async move {
        for n in 0..20 {
            a.publish(publish("a", &n.to_string())).await.unwrap();
        }
    };
    let publish_b = async move {
        for n in 0..20 {
            b.publish(publish("b", &n.to_string())).await.unwrap();
        }
        b.delete(pb::DeleteRequest {
            data_id: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    };
    tokio::join!(publish_a, publish_b);

    let history_of = |data_id: Option<&str>, seen: &[Seen]| -> Vec<(i32, String, String)> {
        seen.iter()
            .filter_map(|s| match s {
                Seen::Change(_, kind, id, content) if data_id.is_none_or(|d| d == id) => {
                    Some((*kind, id.clone(), content.clone()))
                }
                _ => None,
            })
            .collect()
    };
    let mut group_seen = None;
    for (request, stream) in &mut watchers {
        let wanted = if request.data_id.is_empty() { 41 } else { 20 };
        let mut seen = Vec::new();
        let mut last = 1;
        while seen.len() < wanted {
            let (revision, _, change) = next(stream).await;
            assert!(
                revision > last,
                "in order, none twice: {revision} after {last}"
            );
            last = revision;
            seen.push(change);
        }
        // Each item's own changes, in the order its publisher made them.
        let a: Vec<_> = (0..20)
            .map(|n| (PUT, "a".to_string(), n.to_string()))
            .collect();
        assert_eq!(history_of(Some("a"), &seen), a);
        if request.data_id.is_empty() {
            let mut b: Vec<_> = (0..20)
                .map(|n| (PUT, "b".to_string(), n.to_string()))
                .collect();
            b.push((DELETE, "b".into(), String::new()));
            assert_eq!(history_of(Some("b"), &seen), b);
            // Both group watchers saw one and the same order.
            match &group_seen {
                None => group_seen = Some(seen),
                Some(other) => assert_eq!(other, &seen),
            }
        }
    }
    // Nothing more was queued for anyone: the next thing each reads is
    // the next change.
    client.publish(publish("a", "marker")).await.unwrap();
    let marker = Seen::Change(43, PUT, "a".into(), "marker".into());
    for (_, stream) in &mut watchers {
        assert_eq!(next(stream).await.2, marker, "a watcher got a change twice");
    }

    // A watcher that left at revision 10 and comes back gets exactly the
    // changes after it, then new ones; another incarnation gets a reset.
    let mut seen = group_seen.unwrap();
    seen.push(marker);
    let incarnation = {
        let mut stream = watch(&mut client, group.clone()).await;
        next(&mut stream).await.1
    };
    let mut resumed = watch(
        &mut client,
        pb::WatchRequest {
            start_revision: 11,
            incarnation,
            ..Default::default()
        },
    )
    .await;
    let mut replayed = Vec::new();
    for _ in 11..=43 {
        replayed.push(next(&mut resumed).await.2);
    }
    assert_eq!(replayed, seen[9..], "exactly what it missed");
    client.publish(publish("after", "1")).await.unwrap();
    assert_eq!(
        next(&mut resumed).await.2,
        Seen::Change(44, PUT, "after".into(), "1".into())
    );
    let mut elsewhere = watch(
        &mut client,
        pb::WatchRequest {
            start_revision: 11,
            incarnation: incarnation ^ 2,
            ..Default::default()
        },
    )
    .await;
    match next(&mut elsewhere).await.2 {
        Seen::Snapshot { reset, items } => {
            assert!(reset);
            let ids: Vec<&str> = items.iter().map(|(id, _)| id.as_str()).collect();
            assert_eq!(ids, ["a", "after", "before"]);
        }
        other => panic!("a reset snapshot, not {other:?}"),
    }
    registry.stop().await;
}

#[tokio::test]
async fn a_watcher_too_far_behind_is_reset_and_misses_nothing_after() {
    let mut config = registry::Config::default();
    config.configs.watch_buffer = 4;
    config.configs.watch_history = 4;
    let registry = Registry::in_memory(&config);
    let configs = registry.configs();
    let mut watch = configs
        .watch(
            Selector::Group(GroupKey::parse("", "").unwrap()),
            Client::default(),
            0,
            0,
        )
        .unwrap();
    assert!(matches!(
        watch.next().await,
        Some(WatchItem::Snapshot { reset: false, .. })
    ));
    let put = |content: &str| Publish {
        key: ConfigKey::parse("", "", "k").unwrap(),
        content: content.into(),
        content_type: ContentType::Text,
        expect: Expect::Any,
        by: String::new(),
        gray: None,
    };
    // It reads nothing while 50 changes are made: it holds no more than
    // its buffer, and its next read is a reset showing the last value.
    for n in 0..50 {
        configs.publish(put(&n.to_string())).await.unwrap();
    }
    match watch.next().await {
        Some(WatchItem::Snapshot {
            reset: true,
            items,
            revision: 50,
        }) => {
            assert_eq!(items.len(), 1);
            assert_eq!(&*items[0].version.content, "49");
        }
        other => panic!("a reset snapshot, not {other:?}"),
    }
    configs.publish(put("50")).await.unwrap();
    match watch.next().await {
        Some(WatchItem::Changes(changes)) => {
            let seen: Vec<(u64, &str)> = changes
                .iter()
                .map(|c| (c.revision, &*c.seen.version.content))
                .collect();
            assert_eq!(seen, [(51, "50")]);
        }
        other => panic!("the next change, not {other:?}"),
    }
    // A resume from before what is kept is a reset too; from within it,
    // a replay of exactly what followed.
    let group = || Selector::Group(GroupKey::parse("", "").unwrap());
    let mut old = configs.watch(group(), Client::default(), 2, 0).unwrap();
    assert!(matches!(
        old.next().await,
        Some(WatchItem::Snapshot { reset: true, .. })
    ));
    let mut recent = configs.watch(group(), Client::default(), 50, 0).unwrap();
    match recent.next().await {
        Some(WatchItem::Changes(changes)) => {
            let revisions: Vec<u64> = changes.iter().map(|c| c.revision).collect();
            assert_eq!(revisions, [50, 51]);
        }
        other => panic!("a replay, not {other:?}"),
    }
    // Watches that end leave nothing behind.
    assert_eq!(configs.watchers(), 3);
    drop((watch, old, recent));
    assert_eq!(configs.watchers(), 0);
}

#[tokio::test]
async fn acknowledged_changes_survive_a_restart_and_versions_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = registry::Config {
        data_dir: dir.path().to_path_buf(),
        ..crate::without_credentials()
    };
    let registry = TestRegistry::start_on(config.clone()).await;
    let mut client = configs(&registry).await;
    for n in 0..3 {
        client
            .publish(publish("kept", &n.to_string()))
            .await
            .unwrap();
    }
    client.publish(publish("dropped", "x")).await.unwrap();
    client
        .delete(pb::DeleteRequest {
            data_id: "dropped".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .publish(pb::PublishRequest {
            gray: Some(pb::GrayRule {
                ips: vec!["10.0.0.7".into()],
                ..Default::default()
            }),
            ..publish("kept", "gray")
        })
        .await
        .unwrap();
    registry.stop().await;

    let registry = TestRegistry::start_on(config).await;
    let mut client = configs(&registry).await;
    let kept = client
        .get(get("kept"))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!((kept.version, kept.content.as_str()), (3, "2"));
    let history = client
        .history(pb::HistoryRequest {
            data_id: "kept".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    // The gray version first, as History lists it, then those kept.
    assert_eq!(
        history
            .iter()
            .map(|v| (v.version, v.gray.is_some()))
            .collect::<Vec<_>>(),
        [(6, true), (3, false), (2, false), (1, false)]
    );
    assert_eq!(
        client.get(get("dropped")).await.unwrap_err().code(),
        Code::NotFound
    );
    // Revisions go on from where they were: no version is used twice.
    let next = client
        .publish(publish("kept", "3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.revision, 7);
    registry.stop().await;
}

#[tokio::test]
async fn config_changes_need_a_token_that_may_write_the_data_id() {
    let registry = TestRegistry::start_with(|config| config.auth.enabled = true).await;
    let admin = admin_token(&[&registry.config.data_dir]).await;
    let mut tokens = RegistryClient::connect(registry.url()).await.unwrap();
    let order_token = tokens
        .create_token(showing(
            registry_pb::CreateTokenRequest {
                name: "order".into(),
                scope: Some(registry_pb::TokenScope {
                    namespace: "public".into(),
                    services: vec!["server-order".into()],
                    ..Default::default()
                }),
            },
            Some(&admin),
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut client = configs(&registry).await;
    let none = client
        .publish(publish("server-order", "a = 1"))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
    let other = client
        .publish(showing(publish("server-user", "a = 1"), Some(&order_token)))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied, "{other:?}");
    let mine = client
        .publish(showing(
            publish("server-order", "a = 1"),
            Some(&order_token),
        ))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!(mine.modified_by, "order");
    // Reads need a token too; the order token reads its namespace.
    assert_eq!(
        client.get(get("server-order")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    client
        .get(showing(get("server-order"), Some(&order_token)))
        .await
        .unwrap();
    assert_eq!(
        client
            .watch(showing(
                pb::WatchRequest {
                    namespace: "staging".into(),
                    ..Default::default()
                },
                Some(&order_token)
            ))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    registry.stop().await;
}

/// A publish of the order role's live settings.
fn settings(content: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        group: live::GROUP.into(),
        data_id: ORDER_SERVICE.into(),
        content: content.into(),
        content_type: pb::ContentType::Toml as i32,
        ..Default::default()
    }
}

/// An order of `count` of the seed's first product by its first user.
fn order(count: i32, id: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        user_id: 1001,
        product_id: 1001,
        count,
        request_id: id.into(),
    }
}

/// The version of its live settings `addr`'s role says it runs.
async fn live_version(addr: std::net::SocketAddr) -> Option<u64> {
    let answer = crate::http::send(addr, "GET", "/metrics", &[], None).await;
    answer
        .body
        .lines()
        .find_map(|line| line.strip_prefix("shop_mesh_live_config_version "))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_order_role_takes_max_order_count_live_and_refuses_a_bad_value() {
    let shop = TestShop::start(Backend::Sqlite, "live-settings", 1, 1)
        .await
        .unwrap();
    let order_role = shop.addr(ShopRole::Order);
    let mut client = configs(&shop.registry).await;
    let mut orders = shop.orders();
    orders.place_order(order(3, "live-1")).await.unwrap();
    assert_eq!(live_version(order_role).await, Some(0));

    let published = client
        .publish(settings("[shop]\nmax_order_count = 2\n"))
        .await
        .unwrap()
        .into_inner()
        .revision;
    wait_until(
        "the order role to apply its live settings",
        Duration::from_secs(10),
        || async { live_version(order_role).await == Some(published) },
    )
    .await;
    // No restart: the same instance refuses the next order over the new
    // limit, and takes one within it.
    assert_eq!(shop.addr(ShopRole::Order), order_role);
    let refused = orders.place_order(order(3, "live-2")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("between 1 and 2"),
        "{}",
        refused.message()
    );
    orders.place_order(order(2, "live-3")).await.unwrap();

    // Bad values are refused when published, naming what is wrong, and
    // the role keeps its last good value.
    for (request, says) in [
        (
            settings("[shop]\nmax_order_count = 0\n"),
            "shop.max_order_count is 0",
        ),
        (
            settings("[shop]\nmax_order_count = \"lots\"\n"),
            "invalid type",
        ),
        (
            settings("[shop]\nmax_orders = 5\n"),
            "unknown field `max_orders`",
        ),
        (settings("[log]\nlevel = \"shop_mesh=[\"\n"), "log.level"),
        (
            pb::PublishRequest {
                content_type: pb::ContentType::Text as i32,
                ..settings("[shop]\nmax_order_count = 9\n")
            },
            "are TOML",
        ),
    ] {
        let err = client.publish(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(says), "{says}: {}", err.message());
    }
    assert_eq!(live_version(order_role).await, Some(published));
    assert_eq!(
        orders
            .place_order(order(3, "live-4"))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Deleted, the role is back on its own configuration's limit.
    client
        .delete(pb::DeleteRequest {
            group: live::GROUP.into(),
            data_id: ORDER_SERVICE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_until(
        "the order role to drop its live settings",
        Duration::from_secs(10),
        || async { live_version(order_role).await == Some(0) },
    )
    .await;
    orders.place_order(order(3, "live-5")).await.unwrap();
    shop.stop().await;
}

#[tokio::test]
async fn the_config_commands_take_files_in_and_give_them_back_byte_for_byte() {
    let registry = TestRegistry::start().await;
    let addr = registry.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    let first = "# the app\n[limits]\nmax = 1 # ünïcode kept\n";
    std::fs::write(&file, first).unwrap();
    let file_arg = file.display().to_string();
    let at = ["--registry", addr.as_str()];
    let run = |args: Vec<&str>| {
        let args: Vec<String> = args.iter().chain(&at).map(|a| a.to_string()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_bin(&args).await
        }
    };

    // The type comes from the extension; the content is checked as it.
    let (ok, out, err) = run(vec!["config", "put", "app", "--file", &file_arg]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("published public/DEFAULT_GROUP/app version 1 (toml,"),
        "{out}"
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{ nope").unwrap();
    let bad_arg = bad.display().to_string();
    let (ok, _, err) = run(vec!["config", "put", "app", "--file", &bad_arg]).await;
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument: content: is not valid json"),
        "{err}"
    );

    // Out again, to standard output and to a file, byte for byte.
    let (ok, out, _) = run(vec!["config", "get", "app"]).await;
    assert!(ok);
    assert_eq!(out, first);
    let copy = dir.path().join("copy.toml");
    let copy_arg = copy.display().to_string();
    let (ok, _, err) = run(vec!["config", "get", "app", "--out", &copy_arg]).await;
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), first);

    // A compare-and-set that is stale is refused and says so.
    let (ok, _, err) = run(vec![
        "config",
        "put",
        "app",
        "--content",
        "[limits]\nmax = 2\n",
        "--type",
        "toml",
        "--expect-version",
        "5",
    ])
    .await;
    assert!(!ok);
    assert!(
        err.contains(
            "FailedPrecondition: config public/DEFAULT_GROUP/app is at version 1, not at version 5"
        ),
        "{err}"
    );
    let (ok, _, err) = run(vec![
        "config",
        "put",
        "app",
        "--content",
        "[limits]\nmax = 2\n",
        "--type",
        "toml",
        "--expect-version",
        "1",
    ])
    .await;
    assert!(ok, "{err}");

    let (ok, out, _) = run(vec!["config", "history", "app"]).await;
    assert!(ok);
    let rows: Vec<&str> = out.lines().skip(1).take_while(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].starts_with("toml  2 "), "{out}");
    let (ok, out, err) = run(vec!["config", "rollback", "app", "--to", "1"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("now version 3"), "{out}");
    let (ok, out, _) = run(vec!["config", "get", "app"]).await;
    assert!(ok);
    assert_eq!(out, first);

    let (ok, out, _) = run(vec!["config", "list", "--json"]).await;
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (
            listed["data_id"].as_str(),
            listed["version"].as_u64(),
            listed["rolled_back_from"].as_u64()
        ),
        (Some("app"), Some(3), Some(1))
    );
    assert_eq!(listed["md5"], md5_hex(first));

    let (ok, out, err) = run(vec!["config", "delete", "app"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "deleted public/DEFAULT_GROUP/app at revision 4");
    let (ok, _, err) = run(vec!["config", "get", "app"]).await;
    assert!(!ok);
    assert!(
        err.contains("NotFound: no config public/DEFAULT_GROUP/app"),
        "{err}"
    );
    registry.stop().await;
}

#[tokio::test]
async fn config_watch_prints_each_change_as_it_happens() {
    let registry = TestRegistry::start().await;
    let addr = registry.addr.to_string();
    let mut child = tokio::process::Command::new(crate::BIN)
        .args([
            "config",
            "watch",
            "--group",
            "shop-mesh",
            "--registry",
            &addr,
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let mut client = configs(&registry).await;
    let put = pb::PublishRequest {
        group: live::GROUP.into(),
        content_type: pb::ContentType::Toml as i32,
        ..publish(ORDER_SERVICE, "[shop]\nmax_order_count = 3\n")
    };
    client.publish(put).await.unwrap();
    // The watch may start after the publish (then it is in its snapshot)
    // or before.
    let first = crate::inspect::next_json(&mut lines).await;
    assert!(
        ["put", "snapshot"].contains(&first["event"].as_str().unwrap()),
        "{first}"
    );
    assert_eq!(first["content"], "[shop]\nmax_order_count = 3\n");
    assert_eq!(first["type"], "toml");
    client
        .delete(pb::DeleteRequest {
            group: live::GROUP.into(),
            data_id: ORDER_SERVICE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let next = crate::inspect::next_json(&mut lines).await;
    assert_eq!(
        (next["event"].as_str(), next["revision"].as_u64()),
        (Some("delete"), Some(2))
    );
    child.kill().await.unwrap();
    registry.stop().await;
}

#[tokio::test]
async fn a_gray_version_reaches_only_the_clients_its_rule_picks_until_promoted_or_abandoned() {
    let registry = TestRegistry::start().await;
    let mut client = configs(&registry).await;
    let current = client
        .publish(publish("app", "v1"))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let picked = pb::Client {
        ip: "10.0.0.7".into(),
        ..Default::default()
    };
    let labelled = pb::Client {
        ip: "10.0.0.9".into(),
        labels: [("zone".to_string(), "a".to_string())].into(),
    };
    let other = pb::Client {
        ip: "10.0.0.8".into(),
        labels: [("zone".to_string(), "b".to_string())].into(),
    };
    let watch_as = |who: &pb::Client| pb::WatchRequest {
        data_id: "app".into(),
        client: Some(who.clone()),
        ..Default::default()
    };
    let mut watches = Vec::new();
    for who in [&picked, &labelled, &other] {
        let mut stream = watch(&mut client, watch_as(who)).await;
        next(&mut stream).await;
        watches.push(stream);
    }

    // A gray version needs a current one beside it.
    let orphan = client
        .publish(pb::PublishRequest {
            gray: Some(pb::GrayRule {
                ips: vec!["10.0.0.7".into()],
                ..Default::default()
            }),
            ..publish("nothing-yet", "x")
        })
        .await
        .unwrap_err();
    assert_eq!(orphan.code(), Code::FailedPrecondition, "{orphan:?}");

    let gray = client
        .publish(pb::PublishRequest {
            gray: Some(pb::GrayRule {
                ips: vec!["10.0.0.7".into()],
                labels: [("zone".to_string(), "a".to_string())].into(),
            }),
            ..publish("app", "v2-gray")
        })
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert!(gray.gray.is_some());
    let get_as = |who: Option<&pb::Client>| pb::GetRequest {
        client: who.cloned(),
        ..get("app")
    };
    for (who, content) in [
        (Some(&picked), "v2-gray"),
        (Some(&labelled), "v2-gray"),
        (Some(&other), "v1"),
        (None, "v1"),
    ] {
        let item = client
            .get(get_as(who))
            .await
            .unwrap()
            .into_inner()
            .item
            .unwrap();
        assert_eq!(item.content, content, "{who:?}");
    }
    let current_item = client
        .get(get_as(None))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!(current_item.gray_version, gray.version);
    // The picked watchers are pushed the gray version; the other is not
    // told of a change that changes nothing it reads (below: the next
    // thing it reads is the promotion).
    for stream in &mut watches[..2] {
        assert_eq!(
            next(stream).await.2,
            Seen::Change(gray.version, PUT, "app".into(), "v2-gray".into())
        );
    }

    // Promoting another version than the gray one is refused; promoting
    // it makes it everyone's, as a new current version.
    let wrong = client
        .promote(pb::PromoteRequest {
            data_id: "app".into(),
            gray_version: current,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition, "{wrong:?}");
    let promoted = client
        .promote(pb::PromoteRequest {
            data_id: "app".into(),
            gray_version: gray.version,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!(
        (promoted.content.as_str(), promoted.md5.as_str()),
        ("v2-gray", gray.md5.as_str())
    );
    // Every client now reads the promoted version. The one the rule did
    // not pick was never sent the gray version: this is the next thing it
    // reads. The picked ones read the same content at its new version.
    for stream in &mut watches {
        assert_eq!(
            next(stream).await.2,
            Seen::Change(promoted.version, PUT, "app".into(), "v2-gray".into())
        );
    }

    // Abandoned, a gray version's clients go back to the current one.
    let second = client
        .publish(pb::PublishRequest {
            gray: Some(pb::GrayRule {
                ips: vec!["10.0.0.8".into()],
                ..Default::default()
            }),
            ..publish("app", "v3-gray")
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert_eq!(
        next(&mut watches[2]).await.2,
        Seen::Change(second, PUT, "app".into(), "v3-gray".into())
    );
    client
        .abandon(pb::AbandonRequest {
            data_id: "app".into(),
            gray_version: second,
            ..Default::default()
        })
        .await
        .unwrap();
    match next(&mut watches[2]).await.2 {
        Seen::Change(_, PUT, id, content) => {
            assert_eq!((id.as_str(), content.as_str()), ("app", "v2-gray"))
        }
        other => panic!("back to the current version, not {other:?}"),
    }
    let item = client
        .get(get_as(Some(&other)))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!((item.content.as_str(), item.gray_version), ("v2-gray", 0));
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gray_max_order_count_reaches_one_order_instance_until_promoted() {
    let shop = TestShop::start(Backend::Sqlite, "live-gray", 1, 2)
        .await
        .unwrap();
    let instances = shop.addrs(ShopRole::Order);
    assert_eq!(instances.len(), 2);
    let other = instances[1];
    let mut client = configs(&shop.registry).await;
    let current = client
        .publish(settings("[shop]\nmax_order_count = 100\n"))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let gray = client
        .publish(pb::PublishRequest {
            gray: Some(pb::GrayRule {
                labels: [("instance".to_string(), instances[0].to_string())].into(),
                ..Default::default()
            }),
            ..settings("[shop]\nmax_order_count = 2\n")
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    for (addr, version) in [(instances[0], gray), (instances[1], current)] {
        wait_until(
            &format!("{addr} to run version {version}"),
            Duration::from_secs(10),
            || async move { live_version(addr).await == Some(version) },
        )
        .await;
    }
    // Straight to each instance: the gray one refuses 3, the other not.
    let mut gray_one = OrderServiceClient::connect(format!("http://{}", instances[0]))
        .await
        .unwrap();
    let mut other_one = OrderServiceClient::connect(format!("http://{}", instances[1]))
        .await
        .unwrap();
    let refused = gray_one.place_order(order(3, "gray-1")).await.unwrap_err();
    assert!(
        refused.message().contains("between 1 and 2"),
        "{}",
        refused.message()
    );
    other_one.place_order(order(3, "gray-2")).await.unwrap();

    let promoted = client
        .promote(pb::PromoteRequest {
            group: live::GROUP.into(),
            data_id: ORDER_SERVICE.into(),
            gray_version: gray,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    wait_until(
        "the other instance to run the promoted version",
        Duration::from_secs(10),
        || async move { live_version(other).await == Some(promoted) },
    )
    .await;
    let refused = other_one.place_order(order(3, "gray-3")).await.unwrap_err();
    assert!(
        refused.message().contains("between 1 and 2"),
        "{}",
        refused.message()
    );
    shop.stop().await;
}

#[tokio::test]
async fn the_json_api_publishes_reads_and_refuses_as_the_grpc_api_does() {
    let registry = TestRegistry::start().await;
    let addr = registry.addr;
    let json = crate::http::Answer::json;
    let put = |body: &'static str| async move {
        crate::http::send(
            addr,
            "PUT",
            "/api/v1/configs/app?group=web",
            &[("content-type", "application/json")],
            Some(body),
        )
        .await
    };
    let first = put(r#"{"content": "[a]\nb = 1\n", "type": "toml", "expected_version": 0}"#).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let first = json(&first);
    assert_eq!(
        (
            first["item"]["version"].as_u64(),
            first["item"]["type"].as_str()
        ),
        (Some(1), Some("toml"))
    );
    // The same refusals, as HTTP statuses.
    let stale = put(r#"{"content": "x", "expected_version": 0}"#).await;
    assert_eq!(stale.status, 409, "{}", stale.body);
    assert_eq!(json(&stale)["code"], "FAILED_PRECONDITION");
    let bad = put(r#"{"content": "b = = 1", "type": "toml"}"#).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(
        json(&bad)["message"]
            .as_str()
            .unwrap()
            .starts_with("content: is not valid toml")
    );
    let unknown = put(r#"{"content": "x", "kind": "toml"}"#).await;
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    put(r#"{"content": "[a]\nb = 2\n", "type": "toml"}"#).await;

    let read = crate::http::send(addr, "GET", "/api/v1/configs/app?group=web", &[], None).await;
    assert_eq!(read.status, 200);
    assert_eq!(json(&read)["content"], "[a]\nb = 2\n");
    let history = crate::http::send(
        addr,
        "GET",
        "/api/v1/configs/app/history?group=web",
        &[],
        None,
    )
    .await;
    let versions: Vec<u64> = json(&history)["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [2, 1]);
    let rolled = crate::http::send(
        addr,
        "POST",
        "/api/v1/configs/app/rollback?group=web",
        &[("content-type", "application/json")],
        Some(r#"{"version": 1}"#),
    )
    .await;
    assert_eq!(rolled.status, 200, "{}", rolled.body);
    assert_eq!(json(&rolled)["item"]["content"], "[a]\nb = 1\n");
    let listed = crate::http::send(addr, "GET", "/api/v1/configs?group=web", &[], None).await;
    assert_eq!(json(&listed)["total"], 1);
    let removed =
        crate::http::send(addr, "DELETE", "/api/v1/configs/app?group=web", &[], None).await;
    assert_eq!(removed.status, 200, "{}", removed.body);
    let gone = crate::http::send(addr, "GET", "/api/v1/configs/app?group=web", &[], None).await;
    assert_eq!(
        (gone.status, json(&gone)["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    registry.stop().await;
}
