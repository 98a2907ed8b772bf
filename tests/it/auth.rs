//! Credentials: with `registry.auth.enabled`, every registry call needs a
//! token whose scope covers it; one that does not changes nothing.

use std::time::Duration;

use futures::StreamExt;
use shop_mesh::discovery::{self, Announce, Mesh};
use shop_mesh::harness::Isolated;
use shop_mesh::pb::registry as pb;
use shop_mesh::pb::registry::registry_client::RegistryClient;
use shop_mesh::server::Connections;
use tonic::Code;
use tonic::transport::Channel;

use crate::{TestRegistry, admin_token, instance, register_as, run_bin, showing, wait_until};

/// A registry that checks credentials, and the admin token its first
/// start wrote to its data dir.
async fn guarded() -> (TestRegistry, String) {
    let registry = TestRegistry::start_with(|config| config.auth.enabled = true).await;
    let admin = admin_token(&[&registry.config.data_dir]).await;
    (registry, admin)
}

/// Makes a token writing `services` of the default namespace.
async fn token_for(
    client: &mut RegistryClient<Channel>,
    admin: &str,
    services: &[&str],
) -> pb::CreateTokenResponse {
    client
        .create_token(showing(
            pb::CreateTokenRequest {
                name: services.join(","),
                scope: Some(pb::TokenScope {
                    namespace: "public".into(),
                    services: services.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }),
            },
            Some(admin),
        ))
        .await
        .expect("create a token")
        .into_inner()
}

/// server-product as the admin reads it: (port, weight, healthy), and the
/// protection threshold.
async fn product_state(
    client: &mut RegistryClient<Channel>,
    admin: &str,
) -> (Vec<(u32, f64, bool)>, f64) {
    let answer = client
        .get_service(showing(
            pb::GetServiceRequest {
                service: "server-product".into(),
                ..Default::default()
            },
            Some(admin),
        ))
        .await
        .expect("the admin reads")
        .into_inner();
    let instances = answer
        .instances
        .iter()
        .map(|i| (i.port, i.weight.unwrap_or(1.0), i.healthy))
        .collect();
    (instances, answer.protect_threshold)
}

#[tokio::test]
async fn every_write_needs_a_token_that_covers_it_and_one_that_does_not_changes_nothing() {
    let (registry, admin) = guarded().await;
    let mut client = registry.client().await;
    let product = token_for(&mut client, &admin, &["server-product"])
        .await
        .token;
    let order = token_for(&mut client, &admin, &["server-order"])
        .await
        .token;
    let revoked = token_for(&mut client, &admin, &["server-product"]).await;
    client
        .revoke_token(showing(
            pb::RevokeTokenRequest {
                id: revoked.id.clone(),
            },
            Some(&admin),
        ))
        .await
        .expect("revoke");

    let lease = register_as(
        &mut client,
        instance("server-product", 8070),
        0,
        Some(&product),
    )
    .await
    .expect("the product's own token registers it")
    .lease_id;
    let before = product_state(&mut client, &admin).await;
    assert_eq!(before, (vec![(8070, 1.0, true)], 0.0));

    let refusals = [
        (None, Code::Unauthenticated),
        (Some(order.as_str()), Code::PermissionDenied),
        (Some(revoked.token.as_str()), Code::Unauthenticated),
    ];
    for (token, code) in refusals {
        let hijack = pb::Instance {
            weight: Some(0.0),
            enabled: Some(false),
            ..instance("server-product", 8070)
        };
        let answers = [
            (
                "Register",
                register_as(&mut client, hijack, 0, token).await.map(drop),
            ),
            (
                "Deregister",
                client
                    .deregister(showing(
                        pb::DeregisterRequest {
                            service: "server-product".into(),
                            ip: "127.0.0.1".into(),
                            port: 8070,
                            ..Default::default()
                        },
                        token,
                    ))
                    .await
                    .map(drop),
            ),
            (
                "UpdateService",
                client
                    .update_service(showing(
                        pb::UpdateServiceRequest {
                            service: "server-product".into(),
                            protect_threshold: 0.9,
                            ..Default::default()
                        },
                        token,
                    ))
                    .await
                    .map(drop),
            ),
            (
                "DeleteService",
                client
                    .delete_service(showing(
                        pb::DeleteServiceRequest {
                            service: "server-product".into(),
                            ..Default::default()
                        },
                        token,
                    ))
                    .await
                    .map(drop),
            ),
            (
                "KeepAlive",
                keep_alive_once(&mut client, lease, token).await,
            ),
            (
                "CreateToken",
                client
                    .create_token(showing(
                        pb::CreateTokenRequest {
                            name: "mine".into(),
                            scope: Some(pb::TokenScope {
                                admin: true,
                                ..Default::default()
                            }),
                        },
                        token,
                    ))
                    .await
                    .map(drop),
            ),
        ];
        for (rpc, answer) in answers {
            let status = answer.expect_err(rpc);
            assert_eq!(status.code(), code, "{rpc} with {token:?}: {status:?}");
            for secret in [&admin, &product, &order, &revoked.token] {
                assert!(
                    !status.message().contains(secret.as_str()),
                    "{rpc}: {status:?}"
                );
            }
        }
        assert_eq!(
            product_state(&mut client, &admin).await,
            before,
            "nothing changed"
        );
    }

    // Reads need a token too, of the namespace.
    let read = client
        .get_service(showing(
            pb::GetServiceRequest {
                service: "server-product".into(),
                ..Default::default()
            },
            None,
        ))
        .await
        .expect_err("no token");
    assert_eq!(read.code(), Code::Unauthenticated);
    client
        .get_service(showing(
            pb::GetServiceRequest {
                service: "server-product".into(),
                ..Default::default()
            },
            Some(&order),
        ))
        .await
        .expect("a token of the namespace reads it");
}

/// One beat for `lease` on a new KeepAlive stream showing `token`.
async fn keep_alive_once(
    client: &mut RegistryClient<Channel>,
    lease: u64,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    let beats = tokio_stream::iter([pb::KeepAliveRequest { lease_id: lease }]);
    let mut answers = client.keep_alive(showing(beats, token)).await?.into_inner();
    match answers.next().await {
        Some(answer) => answer.map(drop),
        None => Err(tonic::Status::aborted("the stream ended without an answer")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_product_without_the_products_token_is_never_found() {
    let (registry, admin) = guarded().await;
    let mut client = registry.client().await;
    let product = token_for(&mut client, &admin, &["server-product"])
        .await
        .token;
    let order = token_for(&mut client, &admin, &["server-order"])
        .await
        .token;
    let config = |token: &str| discovery::Config {
        registry: registry.addr.to_string(),
        token: token.to_string().into(),
        reconnect_max_backoff: Duration::from_millis(200),
        ..Default::default()
    };
    let real = Isolated::start(config(&product), Announce::new("server-product"), |_, r| r)
        .expect("the real product");
    let fake = Isolated::start(config(&order), Announce::new("server-product"), |_, r| r)
        .expect("a fake product with the order's token");
    // The order service looks server-product up with its own token.
    let mesh = Mesh::new(&config(&order), &Connections::default()).unwrap();
    let channel = mesh.channel("server-product");
    tokio::time::timeout(Duration::from_secs(20), channel.wait_for(|e| !e.is_empty()))
        .await
        .expect("the real product is found");
    // Both have had time to try: only the real one is there.
    wait_until(
        "the fake's registrations to be refused",
        Duration::from_secs(20),
        || {
            let mut client = client.clone();
            let admin = admin.clone();
            async move { product_state(&mut client, &admin).await.0.len() == 1 }
        },
    )
    .await;
    let endpoints = channel.endpoints();
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    assert_eq!(endpoints[0].0, real.addr);
    drop((real, fake));
}

#[tokio::test]
async fn the_token_commands_make_list_and_revoke_with_the_admin_token() {
    let (registry, _) = guarded().await;
    let addr = registry.addr.to_string();
    let admin_file = registry.config.data_dir.join("admin.token");
    let admin_file = admin_file.to_str().unwrap();
    let (ok, out, err) = run_bin(&[
        "token",
        "create",
        "--name",
        "product",
        "--service",
        "server-product",
        "--registry",
        &addr,
        "--token-file",
        admin_file,
    ])
    .await;
    assert!(ok, "{err}");
    let made = out.trim();
    assert!(made.starts_with("smt_"), "{out}");
    let id = made.split('_').nth(1).unwrap();
    assert!(err.contains("cannot be shown again"), "{err}");

    let (ok, out, err) = run_bin(&[
        "token",
        "list",
        "--registry",
        &addr,
        "--token-file",
        admin_file,
    ])
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains(id) && out.contains("services public/server-product"),
        "{out}"
    );
    assert!(!out.contains(made), "list shows no secret: {out}");

    // Without the admin token: refused, naming what to do.
    let (ok, _, err) = run_bin(&["token", "list", "--registry", &addr]).await;
    assert!(!ok);
    assert!(err.contains("needs a token"), "{err}");

    let (ok, out, err) = run_bin(&[
        "token",
        "revoke",
        id,
        "--registry",
        &addr,
        "--token-file",
        admin_file,
    ])
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let mut client = registry.client().await;
    let refused = register_as(&mut client, instance("server-product", 8070), 0, Some(made))
        .await
        .expect_err("revoked");
    assert_eq!(refused.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_token_joins_no_lease_of_another_service_and_a_revoked_watch_ends() {
    let (registry, admin) = guarded().await;
    let mut client = registry.client().await;
    let product = token_for(&mut client, &admin, &["server-product"])
        .await
        .token;
    let order = token_for(&mut client, &admin, &["server-order"]).await;
    let lease = register_as(
        &mut client,
        instance("server-product", 8070),
        0,
        Some(&product),
    )
    .await
    .expect("register")
    .lease_id;

    // The order's token may write server-order, but not onto the
    // product's lease: that would let it break the product's beats.
    let joined = register_as(
        &mut client,
        instance("server-order", 8080),
        lease,
        Some(&order.token),
    )
    .await
    .expect_err("joining another service's lease");
    assert_eq!(joined.code(), Code::PermissionDenied, "{joined:?}");
    keep_alive_once(&mut client, lease, Some(&product))
        .await
        .expect("the product's beats go on");

    // A lease with no instance left keeps nothing alive for anyone.
    client
        .deregister(showing(
            pb::DeregisterRequest {
                service: "server-product".into(),
                ip: "127.0.0.1".into(),
                port: 8070,
                ..Default::default()
            },
            Some(&product),
        ))
        .await
        .expect("deregister");
    let empty = keep_alive_once(&mut client, lease, Some(&order.token))
        .await
        .expect_err("an empty lease");
    assert_eq!(empty.code(), Code::PermissionDenied, "{empty:?}");

    // A watch whose token is revoked gets no further change.
    let mut watch = client
        .watch(showing(
            pb::WatchRequest {
                service: "server-order".into(),
                ..Default::default()
            },
            Some(&order.token),
        ))
        .await
        .expect("watch")
        .into_inner();
    watch.next().await.expect("a snapshot").expect("allowed");
    client
        .revoke_token(showing(
            pb::RevokeTokenRequest {
                id: order.id.clone(),
            },
            Some(&admin),
        ))
        .await
        .expect("revoke");
    register_as(&mut client, instance("server-order", 8080), 0, Some(&admin))
        .await
        .expect("a change to watch");
    let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an answer");
    let refused = next
        .expect("the refusal")
        .expect_err("no change for a revoked token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let ended = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the stream ends");
    assert!(ended.is_none(), "{ended:?}");
}

/// A service identity is made only for a token that may register the
/// service it names: a product's token cannot get the order service's,
/// so it cannot change stock through the product service's ledger calls.
#[tokio::test]
async fn an_identity_is_issued_only_to_a_token_that_may_register_its_service() {
    let (registry, admin) = guarded().await;
    let mut client = registry.client().await;
    let order = token_for(&mut client, &admin, &["server-order"])
        .await
        .token;
    let product = token_for(&mut client, &admin, &["server-product"])
        .await
        .token;
    let asked = || pb::IssueIdentityRequest {
        namespace: String::new(),
        service: "server-order".into(),
        audience: "server-product".into(),
    };

    let issued = client
        .issue_identity(showing(asked(), Some(&order)))
        .await
        .expect("the order service's own token")
        .into_inner();
    assert!(issued.identity.starts_with("smi_"), "{issued:?}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // registry.auth.identity_ttl, by default ten minutes.
    assert!(issued.expires_ms > now_ms && issued.expires_ms <= now_ms + 600_000);

    let status = client
        .issue_identity(showing(asked(), Some(&product)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("changing service server-order"),
        "{status:?}"
    );
    let status = client
        .issue_identity(showing(asked(), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = client
        .issue_identity(showing(
            pb::IssueIdentityRequest {
                audience: String::new(),
                ..asked()
            },
            Some(&order),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The keys are for any caller the registry knows, and nobody else.
    let keys = client
        .get_identity_keys(showing(pb::GetIdentityKeysRequest {}, Some(&product)))
        .await
        .expect("any token reads the keys")
        .into_inner();
    assert_eq!(keys.keys.len(), 1);
    assert_eq!(keys.keys[0].ed25519.len(), 32);
    let status = client
        .get_identity_keys(showing(pb::GetIdentityKeysRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    registry.stop().await;
}

/// An identity lifetime too short to outlive its renewal is refused at
/// start-up, naming the setting.
#[tokio::test]
async fn a_too_short_identity_lifetime_stops_the_registry_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let (ok, _, err) = crate::run_bin_with(
        &["registry", "--listen", "127.0.0.1:0", "--data-dir", &data],
        &[("SHOP_MESH__REGISTRY__AUTH__IDENTITY_TTL", "1s")],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("registry.auth.identity_ttl is 1s; it must be at least 10s"),
        "{err}"
    );
}
