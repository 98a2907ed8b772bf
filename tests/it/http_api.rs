//! The registry's JSON API, over plain HTTP/1.1 on the gRPC port, called
//! as curl would call it: the same checks, credentials and messages as the
//! gRPC API, each refusal with its HTTP status and nothing changed.

use std::net::SocketAddr;

use serde_json::{Value, json};
use shop_mesh::pb::registry as pb;
use tonic::Code;

use crate::{TestRegistry, admin_token, instance, register_as, showing};

/// One HTTP/1.1 request, the connection closed after it: the status and
/// the body, read as JSON.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let bearer = token.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|value| ("Authorization", value.as_str()))
        .collect();
    let answer = crate::http::send(addr, method, path, &headers, body).await;
    (answer.status, answer.json())
}

/// A persistent instance (nothing keeps a lease of it alive, nor need to).
fn persistent(service: &str, port: u32) -> pb::Instance {
    pb::Instance {
        ephemeral: Some(false),
        ..instance(service, port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_api_answers_and_refuses_as_the_grpc_api_does() {
    let registry = TestRegistry::start_with(|config| config.auth.enabled = true).await;
    let admin = admin_token(&[&registry.config.data_dir]).await;
    let addr = registry.addr;
    let mut grpc = registry.client().await;
    let reader = crate::reader_token(&mut grpc, &admin, "public").await;
    register_as(&mut grpc, persistent("db", 5432), 0, Some(&admin))
        .await
        .unwrap();
    let admin_token = admin.as_str();
    let admin = Some(admin_token);

    // Reads.
    let (status, body) = call(addr, "GET", "/api/v1/services", None, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "UNAUTHENTICATED", "{body}");
    let (status, body) = call(addr, "GET", "/api/v1/services", Some(&reader), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], 1);
    assert_eq!(body["services"][0]["name"], "db");
    assert_eq!(body["services"][0]["instance_count"], 1);
    let (status, body) = call(addr, "GET", "/api/v1/services/db", Some(&reader), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instances"][0]["port"], 5432);
    assert_eq!(body["instances"][0]["ephemeral"], false);

    // The same refusal, word for word, as the gRPC API gives.
    let grpc_says = grpc
        .get_service(showing(
            pb::GetServiceRequest {
                service: "nope".into(),
                ..Default::default()
            },
            Some(&reader),
        ))
        .await
        .unwrap_err();
    assert_eq!(grpc_says.code(), Code::NotFound);
    let (status, body) = call(addr, "GET", "/api/v1/services/nope", Some(&reader), None).await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"code": "NOT_FOUND", "message": grpc_says.message()})
    );

    // A write: refused without the scope, or with a bad value or body, and
    // nothing changes; then taken.
    let threshold = || async {
        call(addr, "GET", "/api/v1/services/db", Some(&reader), None)
            .await
            .1["protect_threshold"]
            .clone()
    };
    let refusals = [
        (
            reader.as_str(),
            r#"{"protect_threshold": 0.5}"#,
            403,
            "PERMISSION_DENIED",
            "token",
        ),
        (
            admin_token,
            r#"{"protect_threshold": 2}"#,
            400,
            "INVALID_ARGUMENT",
            "protect_threshold",
        ),
        (
            admin_token,
            r#"{"protect_threshold": "high"}"#,
            400,
            "INVALID_ARGUMENT",
            "body",
        ),
        (
            admin_token,
            r#"{"threshold": 0.5}"#,
            400,
            "INVALID_ARGUMENT",
            "body",
        ),
        (admin_token, "not json", 400, "INVALID_ARGUMENT", "body"),
    ];
    for (token, sent, want, code, says) in refusals {
        let (status, body) = call(
            addr,
            "PATCH",
            "/api/v1/services/db",
            Some(token),
            Some(sent),
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (want, Some(code)),
            "{sent}: {body}"
        );
        assert!(
            body["message"].as_str().unwrap().contains(says),
            "{sent}: {body}"
        );
        assert_eq!(threshold().await, 0.0, "{sent} changed the service");
    }
    let (status, body) = call(
        addr,
        "PATCH",
        "/api/v1/services/db",
        admin,
        Some(r#"{"protect_threshold": 0.5}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(threshold().await, 0.5);

    // An instance changed in place: out of traffic, then a weight.
    let path = "/api/v1/services/db/instances/127.0.0.1/5432";
    for (sent, want) in [
        (r#"{"weight": -1}"#, 400),
        (r#"{}"#, 400),
        (r#"{"enabled": "no"}"#, 400),
        (r#"{"metadata": {"": "empty key"}}"#, 400),
    ] {
        let (status, body) = call(addr, "PATCH", path, admin, Some(sent)).await;
        assert_eq!(status, want, "{sent}: {body}");
    }
    let (status, _) = call(
        addr,
        "PATCH",
        path,
        Some(&reader),
        Some(r#"{"enabled": false}"#),
    )
    .await;
    assert_eq!(status, 403);
    let (status, body) = call(
        addr,
        "PATCH",
        path,
        admin,
        Some(r#"{"enabled": false, "weight": 2}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = call(addr, "GET", "/api/v1/services/db", Some(&reader), None).await;
    assert_eq!(
        (
            body["instances"][0]["enabled"].clone(),
            body["instances"][0]["weight"].clone()
        ),
        (json!(false), json!(2.0)),
        "{body}"
    );
    // Its labels, replaced whole.
    let (status, body) = call(
        addr,
        "PATCH",
        path,
        admin,
        Some(r#"{"metadata": {"zone": "east"}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = call(addr, "GET", "/api/v1/services/db", Some(&reader), None).await;
    assert_eq!(
        body["instances"][0]["metadata"],
        json!({"zone": "east"}),
        "{body}"
    );
    assert_eq!(body["instances"][0]["weight"], json!(2.0), "{body}");

    // Deregistration, as the gRPC API's.
    let (status, body) = call(
        addr,
        "DELETE",
        "/api/v1/services/db/instances/127.0.0.1/http",
        admin,
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("INVALID_ARGUMENT"))
    );
    let (status, _) = call(
        addr,
        "DELETE",
        "/api/v1/services/db/instances/127.0.0.1/5432",
        Some(&reader),
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, body) = call(
        addr,
        "DELETE",
        "/api/v1/services/db/instances/127.0.0.1/5432",
        admin,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = call(
        addr,
        "DELETE",
        "/api/v1/services/db/instances/127.0.0.1/5432",
        admin,
        None,
    )
    .await;
    assert_eq!(status, 404);

    // A path that names no call, in JSON too; gRPC goes on beside it.
    let (status, body) = call(addr, "GET", "/api/v1/nothing", admin, None).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("NOT_FOUND")));
    grpc.list_services(showing(pb::ListServicesRequest::default(), admin))
        .await
        .expect("gRPC on the same port");
    registry.stop().await;
}

/// The change feed: the registry's recent changes with their revisions,
/// for one service or a whole group, read with a token that may read the
/// namespace; bad fields refused as the gRPC API refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_lists_recent_changes_with_their_revisions() {
    let registry = TestRegistry::start_with(|config| config.auth.enabled = true).await;
    let admin = admin_token(&[&registry.config.data_dir]).await;
    let addr = registry.addr;
    let mut grpc = registry.client().await;
    let mut revisions = Vec::new();
    for (service, port) in [("a", 1001), ("b", 1002), ("a", 1003)] {
        let answer = register_as(&mut grpc, persistent(service, port), 0, Some(&admin))
            .await
            .unwrap();
        revisions.push(answer.revision);
    }
    let gone = grpc
        .deregister(showing(
            pb::DeregisterRequest {
                service: "a".into(),
                ip: "127.0.0.1".into(),
                port: 1001,
                ..Default::default()
            },
            Some(&admin),
        ))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let admin = Some(admin.as_str());

    let (status, body) = call(addr, "GET", "/api/v1/changes?service=a", admin, None).await;
    assert_eq!(status, 200, "{body}");
    let seen: Vec<(u64, String, u64)> = body["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["revision"].as_u64().unwrap(),
                c["kind"].as_str().unwrap().to_string(),
                c["instance"]["port"].as_u64().unwrap(),
            )
        })
        .collect();
    // Probes may add changes of their own (health); the registrations and
    // the removal are there, in order.
    let mine: Vec<_> = seen
        .iter()
        .filter(|(r, _, _)| [revisions[0], revisions[2], gone].contains(r))
        .cloned()
        .collect();
    assert_eq!(
        mine,
        [
            (revisions[0], "PUT".to_string(), 1001),
            (revisions[2], "PUT".to_string(), 1003),
            (gone, "REMOVED".to_string(), 1001),
        ],
        "{body}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "oldest first: {body}"
    );
    assert!(body["revision"].as_u64().unwrap() >= gone);

    let (status, body) = call(addr, "GET", "/api/v1/changes?limit=2", admin, None).await;
    assert_eq!(status, 200, "{body}");
    let all = body["changes"].as_array().unwrap();
    assert_eq!(all.len(), 2, "{body}");
    assert_eq!(
        all[1]["revision"].as_u64().unwrap(),
        body["revision"].as_u64().unwrap()
    );

    for (path, status, code) in [
        ("/api/v1/changes", 401, "UNAUTHENTICATED"),
        ("/api/v1/changes?limit=0", 400, "INVALID_ARGUMENT"),
        ("/api/v1/changes?limit=100000", 400, "INVALID_ARGUMENT"),
        (
            "/api/v1/changes?service=bad%20name",
            400,
            "INVALID_ARGUMENT",
        ),
        ("/api/v1/changes?colour=red", 400, "INVALID_ARGUMENT"),
    ] {
        let token = if status == 401 { None } else { admin };
        let (got, body) = call(addr, "GET", path, token, None).await;
        assert_eq!(
            (got, body["code"].as_str()),
            (status, Some(code)),
            "{path}: {body}"
        );
    }
    registry.stop().await;
}
