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
    let (kind, refused) = client.call("ConfigQueryRequest", json!({})).await;
    assert_eq!(kind, "ErrorResponse");
    assert_eq!(refused["errorCode"], 302);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("ConfigQueryRequest"),
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

/// `python3` with nacos-sdk-python, or `None` where it is missing outside
/// CI (CI installs it, so there a missing SDK fails the test).
fn nacos_sdk_python() -> Option<&'static str> {
    let found = std::process::Command::new("python3")
        .args(["-c", "import v2.nacos"])
        .output()
        .is_ok_and(|out| out.status.success());
    match found {
        true => Some("python3"),
        false if std::env::var_os("CI").is_none() => {
            crate::skipped(
                "the nacos-sdk-python test: python3 cannot import it; pip install nacos-sdk-python",
            );
            None
        }
        false => panic!("nacos-sdk-python must be installed in CI"),
    }
}

#[tokio::test]
async fn nacos_sdk_python_registers_discovers_and_is_pushed_changes() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let Some(python) = nacos_sdk_python() else {
        return;
    };
    let (registry, nacos) = nacos_registry().await;
    let mut shop_mesh = registry.client().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nacos/python_client.py");
    let scratch = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(python)
        .args([
            script,
            &registry.addr.port().to_string(),
            &nacos.port().to_string(),
            scratch.path().to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the Python client says something within 30 s")
            .unwrap()
            .expect("the Python client exited early")
    };

    // Its registration is shop-mesh's instance.
    assert_eq!(next().await, "REGISTERED");
    let service = instances(&mut shop_mesh, "python-svc", false).await;
    let seen = &service[0];
    assert_eq!(
        (seen.port, seen.weight, seen.healthy),
        (7001, Some(3.0), true)
    );
    assert_eq!(seen.metadata["lang"], "python");
    assert_eq!(next().await, "SUBSCRIBED ");

    // A shop-mesh service starts: pushed to the Python client.
    let one = register(&mut shop_mesh, instance("server-product", 9100)).await;
    let (beats, answers) = crate::keep_alive_as(&mut shop_mesh, one.lease_id, None).await;
    let beating = crate::keep_beating(beats, answers, one.lease_id);
    let other = register(&mut shop_mesh, instance("server-product", 9101)).await;
    let (beats, answers) = crate::keep_alive_as(&mut shop_mesh, other.lease_id, None).await;
    let _kept = crate::keep_beating(beats, answers, other.lease_id);
    stdin.write_all(b"EXPECT 9100\n").await.unwrap();
    let pushed = loop {
        let line = next().await;
        if line.contains("9100") {
            break line;
        }
    };
    assert!(pushed.starts_with("PUSHED "), "{pushed}");

    // It is killed (its KeepAlive stream breaks): pushed as unhealthy.
    beating.abort();
    stdin.write_all(b"GONE 9100\n").await.unwrap();
    let pushed = loop {
        let line = next().await;
        if !line.contains("9100") {
            break line;
        }
    };
    assert_eq!(pushed, "PUSHED 9101");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}
