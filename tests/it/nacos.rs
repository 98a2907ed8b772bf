//! Nacos's protocols on the registry: the 2.x gRPC API spoken as a Nacos
//! client speaks it (Payloads of JSON over `/Request/request` and
//! `/BiRequestStream/requestBiStream`), and what the registry's own API
//! then shows; and the HTTP paths it does not serve, refused by name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use shop_mesh::pb::nacos::bi_request_stream_client::BiRequestStreamClient;
use shop_mesh::pb::nacos::request_client::RequestClient;
use shop_mesh::pb::nacos::{Metadata, Payload};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{TestRegistry, instance, instances, register, wait_for, wait_until};

mod clients;

/// A registry with Nacos's gRPC API on a port of the test's choosing,
/// configured by `adjust` too; answers it and that port's address once
/// the port takes connections (it is bound as the registry starts
/// serving).
async fn nacos_registry_with(
    adjust: impl FnOnce(&mut shop_mesh::registry::Config),
) -> (TestRegistry, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let registry = TestRegistry::start_with(|c| {
        c.nacos.grpc_listen = Some(port);
        adjust(c);
    })
    .await;
    wait_for(|| async {
        Channel::from_shared(format!("http://{port}"))
            .unwrap()
            .connect()
            .await
            .ok()
    })
    .await;
    (registry, port)
}

async fn nacos_registry() -> (TestRegistry, SocketAddr) {
    nacos_registry_with(|_| {}).await
}

fn payload(kind: &str, body: Value) -> Payload {
    payload_showing(kind, body, None)
}

/// A payload showing `token` as Nacos clients show one.
fn payload_showing(kind: &str, body: Value, token: Option<&str>) -> Payload {
    let headers = token
        .map(|t| HashMap::from([("accessToken".to_string(), t.to_string())]))
        .unwrap_or_default();
    Payload {
        metadata: Some(Metadata {
            r#type: kind.into(),
            client_ip: "127.0.0.1".into(),
            headers,
        }),
        body: Some(prost_types::Any {
            type_url: String::new(),
            value: serde_json::to_vec(&body).unwrap(),
        }),
    }
}

/// A payload's type and its JSON body.
fn read(payload: Payload) -> (String, Value) {
    let kind = payload.metadata.unwrap().r#type;
    let body = serde_json::from_slice(&payload.body.unwrap().value).unwrap();
    (kind, body)
}

/// A Nacos 2.x connection as the SDKs make it: one HTTP/2 connection for
/// its requests and its stream.
struct Client {
    requests: RequestClient<Channel>,
    to_stream: Option<mpsc::Sender<Payload>>,
    pushes: tonic::Streaming<Payload>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut requests = RequestClient::new(channel.clone());
        let (kind, check) = read(
            requests
                .request(payload("ServerCheckRequest", json!({"headers": {}})))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(kind, "ServerCheckResponse", "{check}");
        assert_eq!(check["resultCode"], 200);
        let id = check["connectionId"].as_str().unwrap().to_string();
        assert!(!id.is_empty());
        let (tx, rx) = mpsc::channel(8);
        tx.send(payload(
            "ConnectionSetupRequest",
            json!({"clientVersion": "test", "tenant": "", "labels": {"module": "naming"}}),
        ))
        .await
        .unwrap();
        let pushes = BiRequestStreamClient::new(channel)
            .request_bi_stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let client = Client {
            requests,
            to_stream: Some(tx),
            pushes,
        };
        // The setup is read by the server's stream task: until then, 301.
        wait_until(
            "the connection to be set up",
            Duration::from_secs(10),
            || {
                let mut requests = client.requests.clone();
                async move {
                    let (kind, _) = read(
                        requests
                            .request(payload("HealthCheckRequest", json!({})))
                            .await
                            .unwrap()
                            .into_inner(),
                    );
                    kind == "HealthCheckResponse"
                }
            },
        )
        .await;
        client
    }

    async fn call(&mut self, kind: &str, body: Value) -> (String, Value) {
        self.call_showing(kind, body, None).await
    }

    async fn call_showing(
        &mut self,
        kind: &str,
        body: Value,
        token: Option<&str>,
    ) -> (String, Value) {
        read(
            self.requests
                .request(payload_showing(kind, body, token))
                .await
                .unwrap()
                .into_inner(),
        )
    }
}

fn nacos_instance(port: u16) -> Value {
    json!({"ip": "127.0.0.1", "port": port, "weight": 2.0, "enabled": true, "ephemeral": true,
           "clusterName": "", "metadata": {"version": "1"}})
}

#[tokio::test]
async fn a_nacos_2x_client_registers_subscribes_and_its_broken_connection_orphans_its_instances() {
    let (registry, nacos) = nacos_registry().await;
    let mut shop_mesh = registry.client().await;

    // A request before the connection is set up: Nacos's 301, on which
    // its clients reconnect.
    let channel = Channel::from_shared(format!("http://{nacos}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (kind, refused) = read(
        RequestClient::new(channel)
            .request(payload("InstanceRequest", json!({})))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(kind, "ErrorResponse");
    assert_eq!(refused["errorCode"], 301, "{refused}");

    let mut client = Client::connect(nacos).await;
    let (kind, answer) = client
        .call(
            "InstanceRequest",
            json!({"requestId": "1", "namespace": "public", "serviceName": "server-product",
                   "groupName": "DEFAULT_GROUP", "type": "registerInstance",
                   "instance": nacos_instance(9001)}),
        )
        .await;
    assert_eq!(kind, "InstanceResponse", "{answer}");
    assert_eq!(answer["errorCode"], 0);

    // shop-mesh's own API sees it, as registered.
    let service = instances(&mut shop_mesh, "server-product", false).await;
    assert_eq!(service.len(), 1);
    let seen = &service[0];
    assert_eq!(
        (seen.port, seen.weight, seen.healthy),
        (9001, Some(2.0), true)
    );
    assert_eq!(seen.metadata["version"], "1");

    // Subscribing answers the instances now, and pushes what follows.
    let (kind, answer) = client
        .call(
            "SubscribeServiceRequest",
            json!({"namespace": "public", "serviceName": "server-product",
                   "groupName": "DEFAULT_GROUP", "subscribe": true, "clusters": ""}),
        )
        .await;
    assert_eq!(kind, "SubscribeServiceResponse", "{answer}");
    let info = &answer["serviceInfo"];
    assert_eq!(info["name"], "server-product");
    assert_eq!(info["groupName"], "DEFAULT_GROUP");
    assert_eq!(info["hosts"].as_array().unwrap().len(), 1);
    assert_eq!(
        info["hosts"][0]["serviceName"],
        "DEFAULT_GROUP@@server-product"
    );
    let first_ref = info["lastRefTime"].as_u64().unwrap();

    register(&mut shop_mesh, instance("server-product", 9002)).await;
    let (kind, push) = read(
        tokio::time::timeout(Duration::from_secs(10), client.pushes.message())
            .await
            .expect("a push within 10 s")
            .unwrap()
            .unwrap(),
    );
    assert_eq!(kind, "NotifySubscriberRequest", "{push}");
    let hosts = push["serviceInfo"]["hosts"].as_array().unwrap();
    let mut ports: Vec<u64> = hosts.iter().map(|h| h["port"].as_u64().unwrap()).collect();
    ports.sort();
    assert_eq!(ports, [9001, 9002]);
    assert!(push["serviceInfo"]["lastRefTime"].as_u64().unwrap() > first_ref);

    // Listing and querying.
    let (kind, list) = client
        .call(
            "ServiceListRequest",
            json!({"namespace": "public", "groupName": "DEFAULT_GROUP",
                                           "pageNo": 1, "pageSize": 10}),
        )
        .await;
    assert_eq!(kind, "ServiceListResponse", "{list}");
    assert_eq!(list["count"], 1);
    assert_eq!(list["serviceNames"], json!(["server-product"]));
    let (kind, query) = client
        .call(
            "ServiceQueryRequest",
            json!({"serviceName": "DEFAULT_GROUP@@server-product",
                                            "cluster": "", "healthyOnly": true}),
        )
        .await;
    assert_eq!(kind, "QueryServiceResponse", "{query}");
    assert_eq!(query["serviceInfo"]["hosts"].as_array().unwrap().len(), 2);

    // What is not served is refused by name; bad input is refused, saying why.
    let (kind, refused) = client.call("ClientConfigMetricRequest", json!({})).await;
    assert_eq!(kind, "ErrorResponse");
    assert_eq!(refused["errorCode"], 302);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("ClientConfigMetricRequest"),
        "{refused}"
    );
    let (_, refused) = client
        .call(
            "InstanceRequest",
            json!({"serviceName": "server-product", "type": "registerInstance",
                                        "instance": {"ip": "127.0.0.1", "port": 70000}}),
        )
        .await;
    assert_eq!(refused["errorCode"], 400, "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("70000"),
        "{refused}"
    );
    let (_, refused) = client
        .call(
            "InstanceRequest",
            json!({"serviceName": "server-product", "type": "renameInstance",
                                        "instance": nacos_instance(9003)}),
        )
        .await;
    assert_eq!(refused["errorCode"], 400, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("renameInstance"),
        "{refused}"
    );

    // The connection breaks: its instance is unhealthy at once, the
    // other untouched.
    client.to_stream.take();
    drop(client);
    wait_until(
        "the broken connection's instance to be unhealthy",
        Duration::from_secs(10),
        || {
            let mut shop_mesh = shop_mesh.clone();
            async move {
                instances(&mut shop_mesh, "server-product", false)
                    .await
                    .iter()
                    .map(|i| (i.port, i.healthy))
                    .collect::<Vec<_>>()
                    == [(9001, false), (9002, true)]
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_nacos_client_shows_a_shop_mesh_token_as_its_access_token() {
    let (registry, port) = nacos_registry_with(|c| c.auth.enabled = true).await;
    let admin = crate::admin_token(&[registry.config.data_dir.as_path()]).await;
    let mut client = Client::connect(port).await;
    let register = json!({"serviceName": "server-product", "type": "registerInstance",
                          "instance": nacos_instance(9201)});

    // No token, or an unknown one: refused, saying what to show; nothing
    // registered.
    let (kind, refused) = client.call("InstanceRequest", register.clone()).await;
    assert_eq!(kind, "ErrorResponse");
    assert_eq!(refused["errorCode"], 403, "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("accessToken"),
        "{refused}"
    );
    let (_, refused) = client
        .call_showing("InstanceRequest", register.clone(), Some("smt_not-a-token"))
        .await;
    assert_eq!(refused["errorCode"], 403, "{refused}");
    let (_, refused) = client
        .call_showing(
            "ServiceQueryRequest",
            json!({"serviceName": "server-product"}),
            None,
        )
        .await;
    assert_eq!(refused["errorCode"], 403, "{refused}");

    // The registry's token: registered.
    let (kind, answer) = client
        .call_showing("InstanceRequest", register, Some(&admin))
        .await;
    assert_eq!(kind, "InstanceResponse", "{answer}");
    let (_, query) = client
        .call_showing(
            "ServiceQueryRequest",
            json!({"serviceName": "server-product"}),
            Some(&admin),
        )
        .await;
    assert_eq!(query["serviceInfo"]["hosts"][0]["port"], 9201, "{query}");
}

#[tokio::test]
async fn nacos_http_calls_not_served_are_refused_by_name() {
    let registry = TestRegistry::start().await;
    let answer = crate::http::send(
        registry.addr,
        "GET",
        "/nacos/v1/cs/configs?dataId=a&group=b",
        &[],
        None,
    )
    .await;
    assert_eq!(answer.status, 501, "{}", answer.body);
    assert!(answer.body.contains("configuration API"), "{}", answer.body);
    assert!(
        answer.body.contains("/nacos/v1/cs/configs"),
        "{}",
        answer.body
    );
}

/// A Nacos 1.x HTTP call: parameters in the query string of `path`, and
/// in `form` as a form body when given.
async fn nacos_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    form: Option<&str>,
) -> crate::http::Answer {
    let headers: &[(&str, &str)] = match form {
        Some(_) => &[("Content-Type", "application/x-www-form-urlencoded")],
        None => &[],
    };
    crate::http::send(addr, method, path, headers, form).await
}

#[tokio::test]
async fn a_nacos_1x_http_client_registers_beats_updates_lists_and_deregisters() {
    let registry = TestRegistry::start().await;
    let addr = registry.addr;
    let mut client = registry.client().await;
    const LIST: &str = "/nacos/v1/ns/instance/list?serviceName=DEFAULT_GROUP%40%40server-product&groupName=DEFAULT_GROUP&namespaceId=public&clusters=&healthyOnly=false";

    // Registered with a form body, as the Java client sends it, spelling
    // enabled as the npm client does.
    let answer = nacos_http(
        addr,
        "POST",
        "/nacos/v1/ns/instance",
        Some("serviceName=server-product&ip=127.0.0.1&port=9301&weight=2&enable=true&ephemeral=true&metadata=%7B%22version%22%3A%222%22%7D"),
    )
    .await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "ok"));
    // Parameters in the query string, as the npm client sends them.
    let answer = nacos_http(
        addr,
        "POST",
        "/nacos/v1/ns/instance?serviceName=server-product&ip=127.0.0.1&port=9302&clusterName=BJ",
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    // shop-mesh sees them, as a Nacos client described them.
    let seen = instances(&mut client, "server-product", false).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].port, 9301, "{seen:?}");
    assert_eq!(seen[1].weight, Some(2.0));
    assert_eq!(seen[1].metadata["version"], "2");
    assert_eq!(seen[0].cluster, "BJ");

    // Listed as Nacos answers: the grouped name, the clusters echoed.
    let list = nacos_http(addr, "GET", LIST, None).await.json();
    assert_eq!(list["name"], "DEFAULT_GROUP@@server-product", "{list}");
    assert_eq!(list["dom"], "DEFAULT_GROUP@@server-product", "{list}");
    assert_eq!(list["clusters"], "", "{list}");
    assert_eq!(list["hosts"].as_array().unwrap().len(), 2, "{list}");
    let only_bj = nacos_http(
        addr,
        "GET",
        "/nacos/v1/ns/instance/list?serviceName=server-product&clusters=BJ",
        None,
    )
    .await
    .json();
    assert_eq!(only_bj["hosts"][0]["port"], 9302, "{only_bj}");
    assert_eq!(only_bj["hosts"].as_array().unwrap().len(), 1, "{only_bj}");

    // A beat of a known instance is Nacos's 10200, with the interval.
    let beat = nacos_http(
        addr,
        "PUT",
        "/nacos/v1/ns/instance/beat?serviceName=DEFAULT_GROUP%40%40server-product&ip=127.0.0.1&port=9301",
        None,
    )
    .await;
    assert_eq!(beat.status, 200, "{}", beat.body);
    assert_eq!(beat.json()["code"], 10200, "{}", beat.body);
    assert_eq!(beat.json()["clientBeatInterval"], 5000, "{}", beat.body);

    // An update changes what it gives and keeps the rest; a disabled
    // instance is no longer listed to Nacos clients.
    let answer = nacos_http(
        addr,
        "PUT",
        "/nacos/v1/ns/instance",
        Some("serviceName=server-product&ip=127.0.0.1&port=9301&enabled=false"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let detail = nacos_http(
        addr,
        "GET",
        "/nacos/v1/ns/instance?serviceName=server-product&ip=127.0.0.1&port=9301",
        None,
    )
    .await
    .json();
    assert_eq!(detail["enabled"], false, "{detail}");
    assert_eq!(detail["weight"], 2.0, "{detail}");
    assert_eq!(detail["metadata"]["version"], "2", "{detail}");
    let list = nacos_http(addr, "GET", LIST, None).await.json();
    assert_eq!(list["hosts"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["hosts"][0]["port"], 9302, "{list}");

    // An instance that is not there: an update and a detail say so, and
    // the update makes none.
    let missing = nacos_http(
        addr,
        "PUT",
        "/nacos/v1/ns/instance",
        Some("serviceName=server-product&ip=127.0.0.1&port=9999&weight=3"),
    )
    .await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert!(missing.body.contains("127.0.0.1:9999"), "{}", missing.body);
    let missing = nacos_http(
        addr,
        "GET",
        "/nacos/v1/ns/instance?serviceName=server-product&ip=127.0.0.1&port=9999",
        None,
    )
    .await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert!(missing.body.contains("127.0.0.1:9999"), "{}", missing.body);
    assert_eq!(
        instances(&mut client, "server-product", false).await.len(),
        2
    );

    // Deregistered, by the plain name as the npm client sends it; again
    // is still ok, as Nacos answers.
    for _ in 0..2 {
        let answer = nacos_http(
            addr,
            "DELETE",
            "/nacos/v1/ns/instance?serviceName=server-product&ip=127.0.0.1&port=9301",
            None,
        )
        .await;
        assert_eq!((answer.status, answer.body.as_str()), (200, "ok"));
    }
    let seen = instances(&mut client, "server-product", false).await;
    assert_eq!(seen.len(), 1, "{seen:?}");

    // A beat of an instance the registry no longer has: 20404 without the
    // beat's JSON (the client registers again), and registered again from
    // the beat's JSON.
    let unknown = nacos_http(
        addr,
        "PUT",
        "/nacos/v1/ns/instance/beat?serviceName=server-product&ip=127.0.0.1&port=9301",
        None,
    )
    .await;
    assert_eq!(unknown.json()["code"], 20404, "{}", unknown.body);
    // (The npm client copies its caller's values as given: a port from
    // the environment is a string, a version a number.)
    let beat_json = r#"{"serviceName":"DEFAULT_GROUP@@server-product","ip":"127.0.0.1","port":"9301","cluster":"DEFAULT","weight":1,"metadata":{"from":"beat","version":2},"scheduled":false}"#;
    let form = format!(
        "serviceName=DEFAULT_GROUP%40%40server-product&beat={}",
        form_encode(beat_json)
    );
    let beat = nacos_http(addr, "PUT", "/nacos/v1/ns/instance/beat", Some(&form)).await;
    assert_eq!(beat.json()["code"], 10200, "{}", beat.body);
    let seen = instances(&mut client, "server-product", false).await;
    let back = seen
        .iter()
        .find(|i| i.port == 9301)
        .expect("registered again");
    assert_eq!(back.metadata["from"], "beat");
    assert_eq!(back.metadata["version"], "2");

    // The service: listed, described, its threshold set; not deleted
    // while it has instances.
    let services = nacos_http(
        addr,
        "GET",
        "/nacos/v1/ns/service/list?pageNo=1&pageSize=2147483647",
        None,
    )
    .await
    .json();
    assert_eq!(services["count"], 1, "{services}");
    assert_eq!(services["doms"], json!(["server-product"]), "{services}");
    let answer = nacos_http(
        addr,
        "PUT",
        "/nacos/v1/ns/service",
        Some("serviceName=server-product&protectThreshold=0.5&metadata=team%3Dshop"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let service = nacos_http(
        addr,
        "GET",
        "/nacos/v1/ns/service?serviceName=server-product",
        None,
    )
    .await
    .json();
    assert_eq!(service["protectThreshold"], 0.5, "{service}");
    assert_eq!(service["metadata"]["team"], "shop", "{service}");
    assert_eq!(service["groupName"], "DEFAULT_GROUP", "{service}");
    let clusters: Vec<&str> = service["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(clusters, ["BJ", "DEFAULT"], "{service}");
    let refused = nacos_http(
        addr,
        "DELETE",
        "/nacos/v1/ns/service?serviceName=server-product",
        None,
    )
    .await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(refused.body.contains("deregister"), "{}", refused.body);
    assert_eq!(
        nacos_http(addr, "GET", "/nacos/v1/ns/operator/metrics", None)
            .await
            .json()["status"],
        "UP"
    );
}

/// `text` as a form value.
fn form_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn nacos_1x_http_refusals_name_the_parameter() {
    let registry = TestRegistry::start().await;
    let addr = registry.addr;
    let cases = [
        (
            "POST",
            "/nacos/v1/ns/instance?ip=127.0.0.1&port=80",
            400,
            "Param 'serviceName' is required.",
        ),
        (
            "POST",
            "/nacos/v1/ns/instance?serviceName=s&port=80",
            400,
            "Param 'ip' is required.",
        ),
        (
            "POST",
            "/nacos/v1/ns/instance?serviceName=s&ip=127.0.0.1&port=abc",
            400,
            "Param 'port'",
        ),
        (
            "POST",
            "/nacos/v1/ns/instance?serviceName=s&ip=127.0.0.1&port=80&weight=heavy",
            400,
            "Param 'weight'",
        ),
        (
            "POST",
            "/nacos/v1/ns/instance?serviceName=s&ip=127.0.0.1&port=80&enabled=maybe",
            400,
            "Param 'enabled'",
        ),
        (
            "POST",
            "/nacos/v1/ns/instance?serviceName=s&ip=127.0.0.1&port=80&metadata=%7Bbroken",
            400,
            "Param 'metadata'",
        ),
        (
            "POST",
            "/nacos/v1/ns/instance?serviceName=s&ip=not-an-ip&port=80",
            400,
            "not-an-ip",
        ),
        (
            "POST",
            "/nacos/v1/ns/instance?serviceName=A%40%40s&groupName=B&ip=127.0.0.1&port=80",
            400,
            "names group",
        ),
        (
            "PUT",
            "/nacos/v1/ns/instance/beat?serviceName=s&ip=127.0.0.1&port=80&beat=%7Bno",
            400,
            "Param 'beat'",
        ),
        (
            "GET",
            "/nacos/v1/ns/service/list?pageSize=10",
            400,
            "Param 'pageNo' is required.",
        ),
        (
            "GET",
            "/nacos/v1/ns/service?serviceName=nothing",
            404,
            "nothing",
        ),
        (
            "PUT",
            "/nacos/v1/ns/service?serviceName=s",
            400,
            "Param 'protectThreshold' is required.",
        ),
        (
            "GET",
            "/nacos/v1/ns/instance/beat?serviceName=s",
            501,
            "GET /nacos/v1/ns/instance/beat",
        ),
        (
            "POST",
            "/nacos/v1/ns/service?serviceName=s",
            501,
            "POST /nacos/v1/ns/service",
        ),
        (
            "GET",
            "/nacos/v1/ns/catalog/services",
            501,
            "/nacos/v1/ns/catalog/services",
        ),
    ];
    for (method, path, status, says) in cases {
        let answer = nacos_http(addr, method, path, None).await;
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
        assert!(
            answer.body.contains(says),
            "{method} {path}: {}",
            answer.body
        );
    }
    // Nothing was registered by any of them.
    let mut client = registry.client().await;
    let listed = client
        .list_services(shop_mesh::pb::registry::ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total, 0, "{listed:?}");
}

#[tokio::test]
async fn a_nacos_update_changes_what_it_gives_and_is_no_sign_of_life() {
    let registry = TestRegistry::start().await;
    let addr = registry.addr;
    let mut client = registry.client().await;
    // A shop-mesh instance whose KeepAlive stream broke: unhealthy.
    let registered = register(&mut client, instance("server-product", 9601)).await;
    let (beats, answers) = crate::keep_alive_as(&mut client, registered.lease_id, None).await;
    crate::keep_beating(beats, answers, registered.lease_id).abort();
    wait_until(
        "unhealthy once its stream broke",
        Duration::from_secs(10),
        || async {
            let seen = instances(&mut registry.client().await, "server-product", false).await;
            seen.first().is_some_and(|i| !i.healthy)
        },
    )
    .await;

    // Updated over Nacos's HTTP API: changed as asked, still unhealthy
    // (an update keeps no dead instance alive).
    let answer = nacos_http(
        addr,
        "PATCH",
        "/nacos/v1/ns/instance",
        Some("serviceName=server-product&ip=127.0.0.1&port=9601&weight=3&metadata=zone%3Deast"),
    )
    .await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "ok"));
    let seen = &instances(&mut client, "server-product", false).await[0];
    assert_eq!(seen.weight, Some(3.0), "{seen:?}");
    assert_eq!(seen.metadata.get("zone").map(String::as_str), Some("east"));
    assert!(!seen.healthy, "{seen:?}");
    assert_eq!(seen.enabled, Some(true));

    // Nothing to change is refused, naming what may be.
    let nothing = nacos_http(
        addr,
        "PUT",
        "/nacos/v1/ns/instance?serviceName=server-product&ip=127.0.0.1&port=9601",
        None,
    )
    .await;
    assert_eq!(nothing.status, 400, "{}", nothing.body);
    assert!(nothing.body.contains("metadata"), "{}", nothing.body);
}

#[tokio::test]
async fn an_instance_registered_over_http_lives_on_its_beats() {
    let registry = TestRegistry::start().await;
    let addr = registry.addr;
    let mut client = registry.client().await;
    // Nacos's timing metadata: beats every 500 ms, unhealthy after 1.5 s
    // without one, gone after 6 s (room for a slow machine between the
    // two).
    let timings = form_encode(
        r#"{"preserved.heart.beat.interval":"500","preserved.heart.beat.timeout":"1500","preserved.ip.delete.timeout":"6000"}"#,
    );
    let form = format!("serviceName=server-user&ip=127.0.0.1&port=9401&metadata={timings}");
    let answer = nacos_http(addr, "POST", "/nacos/v1/ns/instance", Some(&form)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let beat = "/nacos/v1/ns/instance/beat?serviceName=server-user&ip=127.0.0.1&port=9401";
    assert_eq!(
        nacos_http(addr, "PUT", beat, None).await.json()["clientBeatInterval"],
        500
    );

    // Unbeaten: unhealthy, and a beat makes it healthy again.
    wait_until(
        "unhealthy without beats",
        Duration::from_secs(10),
        || async {
            let seen = instances(&mut registry.client().await, "server-user", false).await;
            seen.first().is_some_and(|i| !i.healthy)
        },
    )
    .await;
    assert_eq!(
        nacos_http(addr, "PUT", beat, None).await.json()["code"],
        10200
    );
    assert!(instances(&mut client, "server-user", false).await[0].healthy);

    // Then gone, and its beat answered 20404.
    wait_until("gone without beats", Duration::from_secs(10), || async {
        instances(&mut registry.client().await, "server-user", false)
            .await
            .is_empty()
    })
    .await;
    assert_eq!(
        nacos_http(addr, "PUT", beat, None).await.json()["code"],
        20404
    );
}

#[tokio::test]
async fn a_nacos_http_client_logs_in_with_a_shop_mesh_token() {
    let registry = TestRegistry::start_with(|c| c.auth.enabled = true).await;
    let addr = registry.addr;
    let admin = crate::admin_token(&[registry.config.data_dir.as_path()]).await;
    let register = "/nacos/v1/ns/instance?serviceName=server-order&ip=127.0.0.1&port=9501";

    // No token, or a wrong one: refused, and nothing registered.
    let refused = nacos_http(addr, "POST", register, None).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let refused = nacos_http(
        addr,
        "POST",
        "/nacos/v1/auth/login",
        Some("username=nacos&password=nacos"),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("shop-mesh token"), "{}", refused.body);

    // Logged in with the token as the password: its accessToken works.
    let login = nacos_http(
        addr,
        "POST",
        "/nacos/v1/auth/login",
        Some(&format!("username=ops&password={admin}")),
    )
    .await;
    assert_eq!(login.status, 200, "{}", login.body);
    let login = login.json();
    assert_eq!(login["globalAdmin"], true, "{login}");
    assert_eq!(login["username"], "ops", "{login}");
    let token = login["accessToken"].as_str().unwrap();
    let answer = nacos_http(
        addr,
        "POST",
        &format!("{register}&accessToken={token}"),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    // The npm client shows its password on every call instead.
    let list = nacos_http(
        addr,
        "GET",
        &format!(
            "/nacos/v1/ns/instance/list?serviceName=server-order&username=ops&password={admin}"
        ),
        None,
    )
    .await;
    assert_eq!(list.json()["hosts"][0]["port"], 9501, "{}", list.body);

    // Beats and updates are writes: refused alike without a token, or
    // with one that may only read, whether the instance is there or not
    // (a refusal tells nothing of what is registered).
    let mut client = registry.client().await;
    let reader = crate::reader_token(&mut client, &admin, "public").await;
    let beat = "/nacos/v1/ns/instance/beat?serviceName=server-order&ip=127.0.0.1";
    let update = "/nacos/v1/ns/instance?serviceName=server-order&ip=127.0.0.1&weight=5";
    for (method, call) in [("PUT", beat), ("PUT", update)] {
        for port in [9501, 9999] {
            for shown in ["", &format!("&accessToken={reader}")] {
                let refused =
                    nacos_http(addr, method, &format!("{call}&port={port}{shown}"), None).await;
                assert_eq!(refused.status, 403, "{call} {port}: {}", refused.body);
            }
        }
    }
    let seen = client
        .get_service(crate::showing(
            shop_mesh::pb::registry::GetServiceRequest {
                service: "server-order".into(),
                ..Default::default()
            },
            Some(&admin),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.instances[0].weight, Some(1.0), "{seen:?}");
    // The admin's beat is one.
    let beaten = nacos_http(
        addr,
        "PUT",
        &format!("{beat}&port=9501&accessToken={admin}"),
        None,
    )
    .await;
    assert_eq!(beaten.json()["code"], 10200, "{}", beaten.body);
}
