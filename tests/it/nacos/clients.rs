//! Nacos clients that no one here wrote, each from its own package
//! registry, against shop-mesh's registry: nacos-sdk-python (PyPI, 2.x
//! gRPC), the npm `nacos` package (1.x HTTP) and the `nacos-sdk` crate
//! (crates.io, 2.x gRPC), the last registering a stand-in product server
//! that a shop-mesh order buys through.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nacos_sdk::api::naming::{
    NamingChangeEvent, NamingEventListener, NamingServiceBuilder, ServiceInstance,
};
use nacos_sdk::api::props::ClientProps;
use shop_mesh::pb::config as config_pb;
use shop_mesh::pb::config::configs_client::ConfigsClient;
use shop_mesh::pb::shop as shop_pb;
use shop_mesh::pb::shop::product_service_server::{ProductService, ProductServiceServer};
use shop_mesh::shop::{PRODUCT_SERVICE, USER_SERVICE};
use tokio::sync::mpsc;

use super::nacos_registry;
use crate::shop::{Backend, TestShop};
use crate::{TestRegistry, instance, instances, register};

/// A client process a test drives by lines: it is told on stdin, and says
/// on stdout.
struct Driven {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    who: &'static str,
}

impl Driven {
    fn spawn(mut command: tokio::process::Command, who: &'static str) -> Self {
        use tokio::io::AsyncBufReadExt;

        let mut child = command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {who}: {err}"));
        let stdin = child.stdin.take().unwrap();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Driven {
            child,
            stdin,
            lines,
            who,
        }
    }

    /// The next line it says, within 30 s.
    async fn next(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{} says something within 30 s", self.who))
            .unwrap()
            .unwrap_or_else(|| panic!("{} exited early", self.who))
    }

    async fn tell(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;

        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
    }

    /// Waits for it to exit, which it must within 30 s and with success.
    async fn exits_cleanly(mut self) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} exits within 30 s", self.who))
            .unwrap();
        assert!(status.success(), "{} exited with {status}", self.who);
    }
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
    let Some(python) = nacos_sdk_python() else {
        return;
    };
    let (registry, nacos) = nacos_registry().await;
    let mut shop_mesh = registry.client().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nacos/python_client.py");
    let scratch = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(python);
    command.args([
        script,
        &registry.addr.port().to_string(),
        &nacos.port().to_string(),
        scratch.path().to_str().unwrap(),
    ]);
    let mut client = Driven::spawn(command, "the Python client");

    // Its registration is shop-mesh's instance.
    assert_eq!(client.next().await, "REGISTERED");
    let service = instances(&mut shop_mesh, "python-svc", false).await;
    let seen = &service[0];
    assert_eq!(
        (seen.port, seen.weight, seen.healthy),
        (7001, Some(3.0), true)
    );
    assert_eq!(seen.metadata["lang"], "python");
    assert_eq!(client.next().await, "SUBSCRIBED ");

    // A shop-mesh service starts: pushed to the Python client.
    let one = register(&mut shop_mesh, instance("server-product", 9100)).await;
    let (beats, answers) = crate::keep_alive_as(&mut shop_mesh, one.lease_id, None).await;
    let beating = crate::keep_beating(beats, answers, one.lease_id);
    let other = register(&mut shop_mesh, instance("server-product", 9101)).await;
    let (beats, answers) = crate::keep_alive_as(&mut shop_mesh, other.lease_id, None).await;
    let _kept = crate::keep_beating(beats, answers, other.lease_id);
    client.tell("EXPECT 9100").await;
    let pushed = loop {
        let line = client.next().await;
        if line.contains("9100") {
            break line;
        }
    };
    assert!(pushed.starts_with("PUSHED "), "{pushed}");

    // It is killed (its KeepAlive stream breaks): pushed as unhealthy.
    beating.abort();
    client.tell("GONE 9100").await;
    let pushed = loop {
        let line = client.next().await;
        if !line.contains("9100") {
            break line;
        }
    };
    assert_eq!(pushed, "PUSHED 9101");
    client.exits_cleanly().await;
}

#[tokio::test]
async fn nacos_sdk_python_publishes_reads_and_listens_to_config() {
    let Some(python) = nacos_sdk_python() else {
        return;
    };
    let (registry, nacos) = nacos_registry().await;
    let mut configs = ConfigsClient::connect(registry.url()).await.unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/nacos/python_config_client.py"
    );
    let scratch = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(python);
    command.args([
        script,
        &registry.addr.port().to_string(),
        &nacos.port().to_string(),
        scratch.path().to_str().unwrap(),
    ]);
    let mut client = Driven::spawn(command, "the Python config client");

    // What it published is shop-mesh's item, typed as it said.
    assert_eq!(client.next().await, "PUBLISHED");
    let item = configs
        .get(config_pb::GetRequest {
            data_id: "py-app".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!(
        (item.content.as_str(), item.content_type()),
        ("a=1", config_pb::ContentType::Properties)
    );
    assert_eq!(client.next().await, "GOT a=1");
    // A publish whose casMd5 is not the content's is refused, and an item
    // that is not there reads as empty, as Nacos has it.
    assert_eq!(client.next().await, "STALE-CAS refused");
    assert_eq!(client.next().await, "MISSING ");
    assert_eq!(client.next().await, "LISTENING");

    // Published through shop-mesh: its listener is called with it.
    configs
        .publish(config_pb::PublishRequest {
            data_id: "py-app".into(),
            content: "a=2".into(),
            content_type: config_pb::ContentType::Properties as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    client.tell("EXPECT a=2").await;
    loop {
        let line = client.next().await;
        assert!(line.starts_with("CHANGED "), "{line}");
        if line == "CHANGED a=2" {
            break;
        }
    }
    client.exits_cleanly().await;
}

/// Whether node can run the npm `nacos` client (installed into
/// tests/nacos by `npm ci --prefix tests/nacos`); outside CI a missing one
/// is skipped, and in CI it fails the test.
fn nacos_npm() -> bool {
    let installed = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/nacos/node_modules/nacos"
    ))
    .is_dir();
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    match installed && node {
        true => true,
        false if std::env::var_os("CI").is_none() => {
            crate::skipped(
                "the npm nacos client test: node or the package is missing; npm ci --prefix tests/nacos",
            );
            false
        }
        false => panic!("node and the npm nacos package must be installed in CI"),
    }
}

#[tokio::test]
async fn the_npm_nacos_client_registers_beats_lists_and_deregisters() {
    if !nacos_npm() {
        return;
    }
    let registry = TestRegistry::start().await;
    let mut shop_mesh = registry.client().await;
    let product = register(&mut shop_mesh, instance("server-product", 9110)).await;
    let (beats, answers) = crate::keep_alive_as(&mut shop_mesh, product.lease_id, None).await;
    let _kept = crate::keep_beating(beats, answers, product.lease_id);
    let mut command = tokio::process::Command::new("node");
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/nacos/node_client.js"
        ))
        .arg(registry.addr.port().to_string());
    let mut client = Driven::spawn(command, "the npm client");

    // Its registration is shop-mesh's instance.
    assert_eq!(client.next().await, "REGISTERED");
    let seen = instances(&mut shop_mesh, "node-svc", false).await;
    assert_eq!((seen[0].port, seen[0].healthy), (7101, true), "{seen:?}");
    assert_eq!(seen[0].metadata["lang"], "node");
    assert_eq!(seen[0].unhealthy_timeout_ms, Some(20_000));

    // It lists the shop-mesh service.
    client.tell("LIST").await;
    assert_eq!(client.next().await, "LISTED 9110");

    // Its beats reach the registry: its first within the client's first
    // 10 s, then one a second, the interval the registry answered it;
    // healthy all along.
    let path = "/api/v1/services/node-svc";
    let last_beat = async || {
        let answer = crate::http::send(registry.addr, "GET", path, &[], None).await;
        let instance = answer.json()["instances"][0].clone();
        assert_eq!(instance["healthy"], true, "{instance}");
        instance["last_heartbeat_ms"].as_u64().unwrap_or_default()
    };
    // (The time read is the registration's, give or take a millisecond,
    // until a beat moves it on.)
    let mut last = last_beat().await;
    let mut beats = 0;
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while beats < 3 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "three beats of the npm client within 30 s"
        );
        let at = last_beat().await;
        if at > last + 500 {
            (beats, last) = (beats + 1, at);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        instances(&mut shop_mesh, "node-svc", true).await.len() == 1,
        "healthy on its beats"
    );

    // Deregistered: gone, and its beats stop.
    client.tell("DEREGISTER").await;
    assert_eq!(client.next().await, "DEREGISTERED 0");
    assert!(
        instances(&mut shop_mesh, "node-svc", false)
            .await
            .is_empty()
    );
    client.exits_cleanly().await;
}

/// A stand-in for shop-mesh's product service, as a team might write one
/// in another stack and register with a Nacos SDK: one product, 4242, its
/// stock in memory.
struct StandIn {
    stock: AtomicUsize,
    deducted: Arc<AtomicUsize>,
}

impl StandIn {
    fn product(&self) -> shop_pb::Product {
        shop_pb::Product {
            id: 4242,
            name: "nacos-widget".into(),
            price: "9.90".into(),
            stock: self.stock.load(Ordering::SeqCst) as i32,
        }
    }
}

#[tonic::async_trait]
impl ProductService for StandIn {
    async fn get_product(
        &self,
        request: tonic::Request<shop_pb::GetProductRequest>,
    ) -> Result<tonic::Response<shop_pb::Product>, tonic::Status> {
        match request.into_inner().id {
            4242 => Ok(tonic::Response::new(self.product())),
            id => Err(tonic::Status::not_found(format!("no product {id}"))),
        }
    }

    async fn list_products(
        &self,
        _: tonic::Request<shop_pb::ListProductsRequest>,
    ) -> Result<tonic::Response<shop_pb::ListProductsResponse>, tonic::Status> {
        Ok(tonic::Response::new(shop_pb::ListProductsResponse {
            products: vec![self.product()],
            next_page_token: String::new(),
        }))
    }

    async fn deduct_stock(
        &self,
        request: tonic::Request<shop_pb::DeductStockRequest>,
    ) -> Result<tonic::Response<shop_pb::DeductStockResponse>, tonic::Status> {
        let r = request.into_inner();
        if r.product_id != 4242 {
            return Err(tonic::Status::not_found(format!(
                "no product {}",
                r.product_id
            )));
        }
        let count = usize::try_from(r.count).unwrap_or(0);
        self.stock
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| s.checked_sub(count))
            .map_err(|left| {
                tonic::Status::failed_precondition(format!("{left} in stock, {count} requested"))
            })?;
        self.deducted.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(shop_pb::DeductStockResponse {
            outcome: shop_pb::DeductOutcome::Deducted.into(),
            product: Some(self.product()),
        }))
    }

    async fn restore_stock(
        &self,
        _: tonic::Request<shop_pb::RestoreStockRequest>,
    ) -> Result<tonic::Response<shop_pb::RestoreStockResponse>, tonic::Status> {
        Ok(tonic::Response::new(
            shop_pb::RestoreStockResponse::default(),
        ))
    }
}

/// Sends the healthy ports of each change a Nacos SDK hands it.
struct Pushed(mpsc::UnboundedSender<Vec<i32>>);

impl NamingEventListener for Pushed {
    fn event(&self, event: Arc<NamingChangeEvent>) {
        let mut ports: Vec<i32> = event
            .instances
            .iter()
            .flatten()
            .filter(|i| i.healthy)
            .map(|i| i.port)
            .collect();
        ports.sort_unstable();
        let _ = self.0.send(ports);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_buys_through_a_product_server_the_nacos_sdk_crate_registered() {
    let (registry, nacos) = nacos_registry().await;
    let registry_port = registry.addr.port();
    let shop = TestShop::start_beside(registry, Backend::Sqlite, "nacos_stand_in", 0, 1, |_| {})
        .await
        .expect("SQLite is always there");

    // The stand-in product server, on a port of its own.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let deducted = Arc::new(AtomicUsize::new(0));
    let stand_in = StandIn {
        stock: AtomicUsize::new(5),
        deducted: deducted.clone(),
    };
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ProductServiceServer::new(stand_in))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // The Nacos SDK, over the registry's Nacos gRPC port.
    let scratch = tempfile::tempdir().unwrap();
    let naming = NamingServiceBuilder::new(
        ClientProps::new()
            .server_addr(format!("127.0.0.1:{registry_port}"))
            .remote_grpc_port(nacos.port())
            .namespace("")
            .app_name("stand-in")
            .naming_load_cache_at_start(false)
            .cache_dir(scratch.path()),
    )
    .build()
    .await
    .expect("the Nacos SDK connects");

    // It subscribes to shop-mesh's user service: pushed its instance.
    let (tx, mut pushes) = mpsc::unbounded_channel();
    naming
        .subscribe(USER_SERVICE.into(), None, Vec::new(), Arc::new(Pushed(tx)))
        .await
        .expect("subscribed");
    let user_port = shop.mesh.channel(USER_SERVICE).endpoints()[0].0.port();
    loop {
        let ports = tokio::time::timeout(Duration::from_secs(30), pushes.recv())
            .await
            .expect("a push within 30 s")
            .unwrap();
        if ports == [i32::from(user_port)] {
            break;
        }
    }

    // It registers the stand-in as server-product: shop-mesh discovers it.
    let stand_in = ServiceInstance {
        instance_id: None,
        ip: "127.0.0.1".into(),
        port: i32::from(port),
        weight: 1.0,
        healthy: true,
        enabled: true,
        ephemeral: true,
        cluster_name: None,
        service_name: None,
        metadata: HashMap::from([("impl".to_string(), "stand-in".to_string())]),
    };
    naming
        .register_instance(PRODUCT_SERVICE.into(), None, stand_in.clone())
        .await
        .expect("registered");
    let products = shop.mesh.channel(PRODUCT_SERVICE);
    tokio::time::timeout(
        Duration::from_secs(30),
        products.wait_for(|endpoints| endpoints.len() == 1),
    )
    .await
    .expect("shop-mesh discovers the stand-in");

    // An order placed through shop-mesh's order service buys from it.
    let placed = shop
        .orders()
        .place_order(shop_pb::PlaceOrderRequest {
            user_id: 1001,
            product_id: 4242,
            count: 2,
            request_id: String::new(),
        })
        .await
        .expect("an order through the stand-in")
        .into_inner();
    assert_eq!(placed.user_name, "binghe");
    assert_eq!(placed.total_price, "19.80");
    assert_eq!(placed.items[0].product_name, "nacos-widget");
    assert_eq!(deducted.load(Ordering::SeqCst), 1);

    // Deregistered through the SDK: gone from shop-mesh's callers.
    naming
        .deregister_instance(PRODUCT_SERVICE.into(), None, stand_in)
        .await
        .expect("deregistered");
    tokio::time::timeout(
        Duration::from_secs(30),
        products.wait_for(|endpoints| endpoints.is_empty()),
    )
    .await
    .expect("the stand-in leaves shop-mesh's view");
    serving.abort();
    shop.stop().await;
}
