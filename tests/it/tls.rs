//! TLS on every port: a TLS port takes no plaintext, mutual TLS takes no
//! client whose certificate another CA signed (nor one with none), a
//! client takes no server another CA vouches for, and the whole shop runs
//! over mutual TLS with credentials on.

use std::time::Duration;

use shop_mesh::cert::{self, Made};
use shop_mesh::config::Config;
use shop_mesh::discovery::Mesh;
use shop_mesh::pb::shop as pb;
use shop_mesh::pb::shop::order_service_client::OrderServiceClient;
use shop_mesh::roles::Spawned;
use shop_mesh::server::{Connections, Tls};
use shop_mesh::shop::ORDER_SERVICE;
use shop_mesh::shutdown::Shutdown;
use shop_mesh::up::Stack;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::grpcurl::grpcurl_output;

/// A registry serving mutual TLS with `made`, credentials off (they are
/// not what this is about).
async fn tls_registry(made: &Made) -> (Spawned, tempfile::TempDir) {
    tls_registry_on(made, "127.0.0.1:0")
        .await
        .expect("loopback")
}

/// [`tls_registry`] on `bind`; None when it cannot be bound there.
async fn tls_registry_on(made: &Made, bind: &str) -> Option<(Spawned, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let config = shop_mesh::registry::Config {
        data_dir: dir.path().into(),
        ..crate::without_credentials()
    };
    let connections = Connections {
        tls: made.settings(),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(bind).await.ok()?;
    let role = Spawned::registry(&config, (&connections, &Default::default()), listener).unwrap();
    Some((role, dir))
}

/// Whether a health check over `endpoint` is answered SERVING, or why not.
async fn health(endpoint: Endpoint) -> Result<(), String> {
    let channel = tokio::time::timeout(Duration::from_secs(10), endpoint.connect())
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|err| format!("connect: {err:?}"))?;
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        HealthClient::new(channel).check(HealthCheckRequest::default()),
    )
    .await
    .map_err(|_| "no answer in time".to_string())?
    .map_err(|status| format!("{status:?}"))?;
    assert_eq!(answer.into_inner().status, 1, "SERVING");
    Ok(())
}

fn client_tls(ca: &Made, identity: Option<&Made>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&ca.ca).unwrap()));
    if let Some(me) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&me.cert).unwrap(),
            std::fs::read(&me.key).unwrap(),
        ));
    }
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_takes_only_peers_its_ca_signed_and_no_plaintext() {
    let certs = tempfile::tempdir().unwrap();
    let ours = cert::make(&certs.path().join("ours"), &[]).unwrap();
    let theirs = cert::make(&certs.path().join("theirs"), &[]).unwrap();
    let (registry, _data) = tls_registry(&ours).await;
    let https = format!("https://{}", registry.addr);
    let http = format!("http://{}", registry.addr);
    let endpoint = |uri: &str| Endpoint::from_shared(uri.to_string()).unwrap();

    health(
        endpoint(&https)
            .tls_config(client_tls(&ours, Some(&ours)))
            .unwrap(),
    )
    .await
    .expect("a client with a certificate our CA signed is served");

    let refused = [
        ("plaintext", endpoint(&http)),
        (
            "no client certificate",
            endpoint(&https)
                .tls_config(client_tls(&ours, None))
                .unwrap(),
        ),
        (
            "a client certificate of another CA",
            endpoint(&https)
                .tls_config(client_tls(&ours, Some(&theirs)))
                .unwrap(),
        ),
        (
            "a client that trusts another CA",
            endpoint(&https)
                .tls_config(client_tls(&theirs, Some(&theirs)))
                .unwrap(),
        ),
    ];
    for (who, endpoint) in refused {
        let answer = health(endpoint).await;
        assert!(answer.is_err(), "{who} was served");
    }

    // grpcurl, as the README shows it, with the CA and the certificate.
    let addr = registry.addr.to_string();
    let files = [&ours.ca, &ours.cert, &ours.key].map(|p| p.display().to_string());
    let out = tokio::task::spawn_blocking(move || {
        grpcurl_output(&[
            "-cacert", &files[0], "-cert", &files[1], "-key", &files[2], &addr, "list",
        ])
    })
    .await
    .unwrap();
    if let Some(out) = out {
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && listed.contains("shopmesh.registry.v1.Registry"),
            "{listed} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    registry.stop().await.unwrap();
}

#[tokio::test]
async fn unusable_tls_settings_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let made = cert::make(&dir.path().join("certs"), &[]).unwrap();
    let missing = dir.path().join("missing.pem");
    let cases = [
        (
            Tls {
                cert: missing.clone(),
                key: made.key.clone(),
                ..Default::default()
            },
            "missing.pem",
        ),
        (
            Tls {
                cert: made.cert.clone(),
                ..Default::default()
            },
            "cert is set but key is not",
        ),
        (
            Tls {
                cert: made.key.clone(),
                key: made.key.clone(),
                ..Default::default()
            },
            "holds no PEM certificate",
        ),
        (
            Tls {
                cert: made.cert.clone(),
                key: made.key.clone(),
                mutual: true,
                ..Default::default()
            },
            "set ca",
        ),
    ];
    for (tls, says) in cases {
        let connections = Connections {
            tls: tls.clone(),
            ..Default::default()
        };
        let Err(err) = shop_mesh::server::Server::new(Shutdown::new(), &connections).await else {
            panic!("{tls:?} was taken");
        };
        assert!(err.to_string().contains(says), "{tls:?}: {err}");
    }
    // A CA that is not one, on the calling side.
    let tls = Tls {
        ca: made.key.clone(),
        ..Default::default()
    };
    let err = tls.client().unwrap_err();
    assert!(
        err.to_string().contains("holds no PEM certificate"),
        "{err}"
    );
    assert!(
        cert::make(&dir.path().join("certs"), &[]).is_err(),
        "a CA is never made over another"
    );
}

/// `up`'s whole stack over mutual TLS, with its credentials: an order is
/// placed through the balanced channels, and the order service proves
/// itself to the product service over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_places_orders_over_mutual_tls_with_credentials_on() {
    let dir = tempfile::tempdir().unwrap();
    let made = cert::make(&dir.path().join("tls"), &[]).unwrap();
    let mut config = Config::default();
    config.on_loopback(dir.path());
    config.connections.tls = made.settings();
    assert!(
        config.registry.auth.enabled,
        "credentials are on by default"
    );
    let stack = Stack::start(&config, 1, Shutdown::new()).await.unwrap();

    let mesh = Mesh::new(stack.discovery(), &config.connections).unwrap();
    let mut orders = OrderServiceClient::new(mesh.channel(ORDER_SERVICE));
    let placed = orders
        .place_order(pb::PlaceOrderRequest {
            user_id: 1001,
            product_id: 1001,
            count: 3,
            request_id: "tls-1".into(),
        })
        .await
        .expect("an order over mutual TLS")
        .into_inner();
    assert_eq!(placed.total_price, "7197.00");

    // The same stack's order service, reached without TLS, serves nothing.
    let plaintext = Connections::default();
    let mesh = Mesh::new(stack.discovery(), &plaintext).unwrap();
    let mut orders = OrderServiceClient::new(mesh.channel(ORDER_SERVICE));
    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        orders.list_orders(pb::ListOrdersRequest {
            user_id: 1001,
            ..Default::default()
        }),
    )
    .await
    .expect("a plaintext caller is answered, not left hanging");
    assert!(refused.is_err(), "a plaintext caller was served");
    stack.stop(Ok(())).await.unwrap();
}

/// Over IPv6 the certificate is checked for the address itself (a URI's
/// host keeps its brackets, which no certificate names): the registry is
/// reached at [::1], and a balanced channel calls an instance registered
/// at ::1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_peers_are_reached_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    let made = cert::make(certs.path(), &[]).unwrap();
    let Some((registry, _data)) = tls_registry_on(&made, "[::1]:0").await else {
        crate::skipped("ipv6_peers_are_reached_over_tls: this host has no IPv6 loopback");
        return;
    };
    let connections = Connections {
        tls: made.settings(),
        ..Default::default()
    };
    let discovery = shop_mesh::discovery::Config {
        registry: format!("[::1]:{}", registry.addr.port()),
        ..Default::default()
    };
    let connector = discovery.connector(&connections).unwrap();
    let mut client =
        tokio::time::timeout(Duration::from_secs(10), connector.connect(&Shutdown::new()))
            .await
            .expect("the registry at [::1] is reached")
            .unwrap();
    // The registry itself, registered as an instance at ::1.
    client
        .register(shop_mesh::pb::registry::RegisterRequest {
            instance: Some(shop_mesh::pb::registry::Instance {
                service: "itself".into(),
                ip: "::1".into(),
                port: registry.addr.port().into(),
                ..Default::default()
            }),
            lease_id: 0,
        })
        .await
        .expect("registered over TLS");
    let mesh = Mesh::new(&discovery, &connections).unwrap();
    let mut health = HealthClient::new(mesh.channel("itself"));
    let answer = health
        .check(HealthCheckRequest::default())
        .await
        .expect("a balanced channel calls [::1] over TLS");
    assert_eq!(answer.into_inner().status, 1, "SERVING");
    registry.stop().await.unwrap();
}

/// On a mesh on mutual TLS, the registry probes persistent instances over
/// it too: one served over TLS is found healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_instances_are_probed_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    let made = cert::make(certs.path(), &[]).unwrap();
    let (registry, _data) = tls_registry(&made).await;
    let connections = Connections {
        tls: made.settings(),
        ..Default::default()
    };
    let discovery = shop_mesh::discovery::Config {
        registry: registry.addr.to_string(),
        ..Default::default()
    };
    let connector = discovery.connector(&connections).unwrap();
    let mut client = connector.connect(&Shutdown::new()).await.unwrap();
    // The registry itself serves gRPC health over mutual TLS.
    client
        .register(shop_mesh::pb::registry::RegisterRequest {
            instance: Some(shop_mesh::pb::registry::Instance {
                service: "probed".into(),
                ip: "127.0.0.1".into(),
                port: registry.addr.port().into(),
                ephemeral: Some(false),
                ..Default::default()
            }),
            lease_id: 0,
        })
        .await
        .expect("registered");
    crate::wait_until(
        "the probe over TLS to find it healthy",
        Duration::from_secs(20),
        || {
            let mut client = client.clone();
            async move {
                client
                    .get_service(shop_mesh::pb::registry::GetServiceRequest {
                        service: "probed".into(),
                        healthy_only: true,
                        ..Default::default()
                    })
                    .await
                    .is_ok_and(|answer| answer.into_inner().instances.len() == 1)
            }
        },
    )
    .await;
    registry.stop().await.unwrap();
}
