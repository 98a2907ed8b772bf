//! Bad input never takes a server down or gets INTERNAL: malformed gRPC
//! requests to every RPC of every role, and raw garbage to every port.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use shop_mesh::shop::{ORDER_SERVICE, PRODUCT_SERVICE, USER_SERVICE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

use shop_mesh::harness::Process;

use crate::serving;
use crate::shop::{Backend, TestShop};

/// Every RPC, by the role that serves it.
const RPCS: &[(&str, &[&str])] = &[
    (
        "registry",
        &[
            "/shopmesh.registry.v1.Registry/Register",
            "/shopmesh.registry.v1.Registry/Deregister",
            "/shopmesh.registry.v1.Registry/ListServices",
            "/shopmesh.registry.v1.Registry/GetService",
            "/shopmesh.registry.v1.Registry/UpdateService",
            "/shopmesh.registry.v1.Registry/DeleteService",
            "/shopmesh.registry.v1.Registry/KeepAlive",
            "/shopmesh.registry.v1.Registry/Watch",
            "/shopmesh.registry.v1.Registry/GetCluster",
            "/grpc.health.v1.Health/Check",
        ],
    ),
    (
        USER_SERVICE,
        &[
            "/shopmesh.shop.v1.UserService/GetUser",
            "/grpc.health.v1.Health/Check",
        ],
    ),
    (
        PRODUCT_SERVICE,
        &[
            "/shopmesh.shop.v1.ProductService/GetProduct",
            "/shopmesh.shop.v1.ProductService/ListProducts",
            "/shopmesh.shop.v1.ProductService/DeductStock",
            "/shopmesh.shop.v1.ProductService/RestoreStock",
        ],
    ),
    (
        ORDER_SERVICE,
        &[
            "/shopmesh.shop.v1.OrderService/PlaceOrder",
            "/shopmesh.shop.v1.OrderService/GetOrder",
            "/shopmesh.shop.v1.OrderService/ListOrders",
        ],
    ),
];

/// gRPC bodies that are not a request: (what, bytes).
const MALFORMED: &[(&str, &[u8])] = &[
    // A frame whose message is a string field that claims 5 bytes and has 1.
    ("truncated protobuf", &[0, 0, 0, 0, 3, 0x0a, 0x05, 0x41]),
    // A field number 0 and a wire type that does not exist.
    ("invalid protobuf", &[0, 0, 0, 0, 2, 0x07, 0xff]),
    // A frame header that promises 100 bytes, then the stream ends.
    ("truncated frame", &[0, 0, 0, 0, 100, 1, 2, 3]),
    // Compression flags that are not 0 or 1, or 1 with no encoding.
    ("bad compression flag", &[7, 0, 0, 0, 1, 0]),
    ("compressed, no encoding", &[1, 0, 0, 0, 1, 0]),
    // Half a frame header.
    ("half a header", &[0, 0, 0]),
];

async fn addresses(shop: &TestShop) -> Vec<(&'static str, SocketAddr)> {
    let mut all = vec![("registry", shop.registry.addr)];
    for (service, _) in &RPCS[1..] {
        let endpoints = shop.mesh.channel(service).endpoints();
        all.push((service, endpoints[0].0));
    }
    all
}

async fn connect(addr: impl std::fmt::Display) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The grpc-status of a raw request, from the headers or the trailers.
async fn raw_call(
    channel: &mut Channel,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
) -> (u32, String) {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(
            Full::new(Bytes::copy_from_slice(body)).map_err(|never| match never {}),
        ))
        .unwrap();
    let response = channel.ready().await.unwrap().call(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let collected = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("an answer within 10 s")
        .expect("a body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let field = |name: &str| {
        parts
            .headers
            .get(name)
            .or_else(|| trailers.get(name))
            .map(|value| value.to_str().unwrap().to_string())
    };
    let code = field("grpc-status")
        .expect("a grpc-status")
        .parse()
        .unwrap();
    (code, field("grpc-message").unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_argument_everywhere() {
    let shop = TestShop::start(Backend::Sqlite, "malformed", 1, 1)
        .await
        .unwrap();
    for (role, addr) in addresses(&shop).await {
        let mut channel = connect(addr).await;
        let paths = RPCS.iter().find(|(name, _)| *name == role).unwrap().1;
        for path in paths {
            for (what, body) in MALFORMED {
                let (code, message) = raw_call(&mut channel, addr, path, body).await;
                assert!(
                    code == 3,
                    "{role} {path} with {what}: grpc-status {code} {message:?}"
                );
            }
        }
        // A method no service of the port has is UNIMPLEMENTED, as gRPC
        // says it, on the registry (whose port also serves a console) as
        // on the others.
        let (code, _) = raw_call(&mut channel, addr, "/shopmesh.None/Nothing", &[]).await;
        assert_eq!(code, 12, "{role}");
        assert!(
            serving(addr).await,
            "{role} serves after malformed requests"
        );
    }
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_leaves_every_server_serving() {
    let shop = TestShop::start(Backend::Sqlite, "garbage", 1, 1)
        .await
        .unwrap();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut noise = vec![0u8; 4096];
    for byte in noise.iter_mut() {
        *byte = rand::random();
    }
    let openings: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", noise.clone()),
        (
            "an HTTP/1 request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "the preface, then noise",
            [preface.as_slice(), &noise].concat(),
        ),
        // A SETTINGS frame header that promises 64 KiB, then nothing.
        (
            "the preface, then half a frame",
            [preface.as_slice(), &[0, 1, 0, 4, 0, 0, 0, 0, 0]].concat(),
        ),
        ("half the preface", preface[..10].to_vec()),
    ];
    for (role, addr) in addresses(&shop).await {
        for (what, bytes) in &openings {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            // The peer may close before all is written; that is fine.
            let _ = stream.write_all(bytes).await;
            let _ = stream.shutdown().await;
            let mut sink = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut sink)).await;
            assert!(
                read.is_ok(),
                "{role} kept a connection after {what} open for 15 s"
            );
        }
        assert!(serving(addr).await, "{role} serves after garbage");
    }
    shop.stop().await;
}

/// A request over the 4 MiB limit is refused with RESOURCE_EXHAUSTED on
/// every port, and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_requests_are_resource_exhausted_everywhere() {
    let shop = TestShop::start(Backend::Sqlite, "oversize", 1, 1)
        .await
        .unwrap();
    // One frame of 5 MiB: a string field of 5 MiB less its tag and length.
    let size = 5 * 1024 * 1024;
    let mut body = vec![0u8];
    body.extend_from_slice(&(size as u32).to_be_bytes());
    body.extend_from_slice(&[0x0a, 0xfb, 0xff, 0xbf, 0x02]);
    body.resize(5 + size, b'x');
    for (role, addr) in addresses(&shop).await {
        let mut channel = connect(addr).await;
        let path = RPCS.iter().find(|(name, _)| *name == role).unwrap().1[0];
        let (code, message) = raw_call(&mut channel, addr, path, &body).await;
        assert_eq!(code, 8, "{role} {path}: {message:?}");
        assert!(message.contains("too%20large"), "{message}");
        assert!(
            serving(addr).await,
            "{role} serves after an oversize request"
        );
    }
    shop.stop().await;
}

fn rss_kib(pid: nix::unistd::Pid) -> u64 {
    shop_mesh::harness::rss_bytes(pid.as_raw() as u32).expect("the registry's VmRSS") / 1024
}

/// Opens `count` watch streams and `count` KeepAlive streams (each beating
/// a lease of its own instance) over a few connections, then drops them
/// all, connections too, as clients that vanish would.
async fn open_and_abandon(addr: &str, count: usize, round: usize) {
    use shop_mesh::pb::registry as reg;
    use shop_mesh::pb::registry::registry_client::RegistryClient;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let channel = connect(addr).await;
        clients.push(RegistryClient::new(channel));
    }
    let mut streams = Vec::new();
    let mut senders = Vec::new();
    for i in 0..count {
        let mut client = clients[i % clients.len()].clone();
        let watch = client
            .watch(reg::WatchRequest {
                service: format!("w{}", i % 50),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(watch);
        let registered = client
            .register(reg::RegisterRequest {
                instance: Some(crate::instance(
                    &format!("k{round}-{}", i % 100),
                    10_000 + i as u32,
                )),
                lease_id: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(reg::KeepAliveRequest {
            lease_id: registered.lease_id,
        })
        .await
        .unwrap();
        let mut answers = client
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        answers.message().await.unwrap().expect("a first answer");
        senders.push((tx, answers));
    }
    drop((streams, senders, clients));
}

/// Thousands of watch and KeepAlive streams opened and abandoned leave the
/// registry's memory near where it was: nothing is kept for them, and the
/// allocator (jemalloc, purging in the background) gives the pages back (their instances are removed after
/// the delete timeout, 2 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_streams_give_their_memory_back() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["registry", "--listen", "127.0.0.1:0", "--data-dir"];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.push(dir.path().display().to_string());
    let timings = [
        ("SHOP_MESH__REGISTRY__HEARTBEAT_INTERVAL", "500ms"),
        ("SHOP_MESH__REGISTRY__UNHEALTHY_TIMEOUT", "1s"),
        ("SHOP_MESH__REGISTRY__DELETE_TIMEOUT", "2s"),
        crate::CREDENTIALS_OFF,
    ];
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_shop-mesh"));
    let registry = Process::start(bin, "registry", args, &timings)
        .await
        .unwrap();
    let addr = registry.addr.clone();
    let pid = registry.pid().unwrap();
    // Warm up (allocator arenas, connection buffers), then the baseline.
    open_and_abandon(&addr, 500, 0).await;
    let baseline = rss_kib(pid);
    open_and_abandon(&addr, 4000, 1).await;
    let peak = rss_kib(pid);
    let limit = baseline + baseline / 4 + 4096;
    let mut settled = peak;
    let give_up = tokio::time::Instant::now() + Duration::from_secs(90);
    while settled > limit && tokio::time::Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(250)).await;
        settled = rss_kib(pid);
    }
    assert!(
        settled <= limit,
        "registry RSS: baseline {baseline} KiB, with 4000 + 4000 streams {peak} KiB, 90 s after {settled} KiB"
    );
    eprintln!(
        "registry RSS: baseline {baseline} KiB, with 4000 + 4000 streams {peak} KiB, then {settled} KiB"
    );
}

/// A body with no message is refused as malformed by every method that
/// takes one, and is a stream that ends at once for one that takes many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_its_message_is_invalid_argument() {
    let shop = TestShop::start(Backend::Sqlite, "empty", 1, 1)
        .await
        .unwrap();
    for (role, addr) in addresses(&shop).await {
        let mut channel = connect(addr).await;
        let paths = RPCS.iter().find(|(name, _)| *name == role).unwrap().1;
        for path in paths.iter().filter(|path| !path.ends_with("/KeepAlive")) {
            let (code, message) = raw_call(&mut channel, addr, path, &[]).await;
            assert_eq!(code, 3, "{role} {path}: {message:?}");
        }
    }
    let mut channel = connect(shop.registry.addr).await;
    let keep_alive = "/shopmesh.registry.v1.Registry/KeepAlive";
    let (code, message) = raw_call(&mut channel, shop.registry.addr, keep_alive, &[]).await;
    assert_eq!(code, 0, "{keep_alive}: {message:?}");
    shop.stop().await;
}
