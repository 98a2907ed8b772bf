//! Integration tests: roles started in-process on port 0, each with a
//! private data dir; waits poll a condition under a deadline.

mod auth;
mod bad_input;
mod browser;
mod cluster;
mod cluster_probes;
mod cluster_process;
mod config;
mod configs;
mod connections;
mod console;
mod discovery;
mod e2e;
mod etcd;
mod grpcurl;
mod http;
mod http_api;
mod inspect;
mod metrics;
mod nacos;
mod persistence;
mod properties;
mod registry_api;
mod registry_core;
mod registry_process;
mod shop;
mod soak;
mod tls;
mod traces;

use std::net::SocketAddr;
use std::time::Duration;

use shop_mesh::harness::Process;
use shop_mesh::pb::registry as pb;
use shop_mesh::pb::registry::registry_client::RegistryClient;
use shop_mesh::registry;
use shop_mesh::roles::Spawned;
use shop_mesh::server::Connections;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

/// The environment a registry process that is not about credentials runs
/// with: them off.
pub const CREDENTIALS_OFF: (&str, &str) = ("SHOP_MESH__REGISTRY__AUTH__ENABLED", "false");

/// The registry's default configuration with credentials off, for the
/// tests that are about something else.
pub fn without_credentials() -> registry::Config {
    let mut config = registry::Config::default();
    config.auth.enabled = false;
    // Registries in tests run side by side: Nacos's port is any free one.
    config.nacos.grpc_listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

/// A registry role serving on 127.0.0.1:0.
pub struct TestRegistry {
    pub addr: SocketAddr,
    pub config: registry::Config,
    role: Spawned,
    _dir: Option<tempfile::TempDir>,
}

impl TestRegistry {
    /// A registry with a fresh data dir.
    pub async fn start() -> TestRegistry {
        Self::start_with(|_| {}).await
    }

    /// Credentials are off unless `adjust` turns them on: they are what
    /// the credential tests and the shop's test on (`auth.rs`,
    /// `shop.rs`) are about; the others are about something else.
    pub async fn start_with(adjust: impl FnOnce(&mut registry::Config)) -> TestRegistry {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = registry::Config {
            data_dir: dir.path().to_path_buf(),
            ..without_credentials()
        };
        adjust(&mut config);
        let mut started = Self::start_on(config).await;
        started._dir = Some(dir);
        started
    }

    /// A registry on an existing configuration (its data dir kept by the
    /// caller), so a test can restart it.
    pub async fn start_on(config: registry::Config) -> TestRegistry {
        Self::start_at(config, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A registry on a given address: a restart on the same port.
    pub async fn start_at(config: registry::Config, addr: SocketAddr) -> TestRegistry {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let role = Spawned::registry(
            &config,
            (&Connections::default(), &Default::default()),
            listener,
        )
        .unwrap();
        TestRegistry {
            addr: role.addr,
            config,
            role,
            _dir: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::connect(self.url())
            .await
            .expect("connect to the registry")
    }

    /// Stops it the way SIGTERM would, and waits for it to exit.
    pub async fn stop(self) {
        self.role.stop().await.expect("the registry exits cleanly");
    }
}

/// An instance of `service` on 127.0.0.1:`port`, everything else default.
pub fn instance(service: &str, port: u32) -> pb::Instance {
    pb::Instance {
        service: service.into(),
        ip: "127.0.0.1".into(),
        port,
        ..Default::default()
    }
}

/// Registers on a new lease, or panics.
pub async fn register(
    client: &mut RegistryClient<Channel>,
    i: pb::Instance,
) -> pb::RegisterResponse {
    client
        .register(pb::RegisterRequest {
            instance: Some(i),
            lease_id: 0,
        })
        .await
        .expect("register")
        .into_inner()
}

/// Registers on a new lease, expecting a refusal; answers it.
pub async fn register_refused(
    client: &mut RegistryClient<Channel>,
    i: pb::Instance,
) -> tonic::Status {
    client
        .register(pb::RegisterRequest {
            instance: Some(i),
            lease_id: 0,
        })
        .await
        .expect_err("a refusal")
}

/// Deregisters `service` on 127.0.0.1:`port`, in the default namespace,
/// group and cluster.
pub async fn deregister(
    client: &mut RegistryClient<Channel>,
    service: &str,
    port: u32,
) -> Result<pb::DeregisterResponse, tonic::Status> {
    let request = pb::DeregisterRequest {
        service: service.into(),
        ip: "127.0.0.1".into(),
        port,
        ..Default::default()
    };
    client
        .deregister(request)
        .await
        .map(tonic::Response::into_inner)
}

/// Whether a server at `addr` answers a health check with SERVING on a
/// new connection; one that has not answered within 5 s is not.
pub async fn serving(addr: SocketAddr) -> bool {
    let check = async {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .ok()?;
        HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(5), check)
        .await
        .ok()
        .flatten()
        .is_some_and(|answer| answer.into_inner().status == 1)
}

/// Opens a KeepAlive stream whose first heartbeat is for `lease`: the
/// sender for more, and the stream of answers.
pub async fn keep_alive(
    client: &mut RegistryClient<Channel>,
    lease: u64,
) -> (
    tokio::sync::mpsc::Sender<pb::KeepAliveRequest>,
    tonic::Streaming<pb::KeepAliveResponse>,
) {
    keep_alive_as(client, lease, None).await
}

/// [`keep_alive`] showing `token`.
pub async fn keep_alive_as(
    client: &mut RegistryClient<Channel>,
    lease: u64,
    token: Option<&str>,
) -> (
    tokio::sync::mpsc::Sender<pb::KeepAliveRequest>,
    tonic::Streaming<pb::KeepAliveResponse>,
) {
    let (beats, rx) = tokio::sync::mpsc::channel(4);
    beats
        .send(pb::KeepAliveRequest { lease_id: lease })
        .await
        .expect("the channel is open");
    let answers = client
        .keep_alive(showing(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            token,
        ))
        .await
        .expect("KeepAlive")
        .into_inner();
    (beats, answers)
}

/// `message` showing `token` as its credential (none: no authorization
/// metadata).
pub fn showing<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("ASCII");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Registers `instance` on `lease` (0: a new one) showing `token`.
pub async fn register_as(
    client: &mut RegistryClient<Channel>,
    instance: pb::Instance,
    lease: u64,
    token: Option<&str>,
) -> Result<pb::RegisterResponse, tonic::Status> {
    let request = pb::RegisterRequest {
        instance: Some(instance),
        lease_id: lease,
    };
    client
        .register(showing(request, token))
        .await
        .map(tonic::Response::into_inner)
}

/// A token, made with `admin`, that may read `namespace` alone.
pub async fn reader_token(
    client: &mut RegistryClient<Channel>,
    admin: &str,
    namespace: &str,
) -> String {
    client
        .create_token(showing(
            pb::CreateTokenRequest {
                name: format!("{namespace} reader"),
                scope: Some(pb::TokenScope {
                    read_namespace: namespace.into(),
                    ..Default::default()
                }),
            },
            Some(admin),
        ))
        .await
        .expect("create a read token")
        .into_inner()
        .token
}

/// The first admin token, once a registry with auth on has written it to
/// one of `data_dirs` (on a cluster, the node that made it).
pub async fn admin_token(data_dirs: &[&std::path::Path]) -> String {
    let files: Vec<_> = data_dirs.iter().map(|d| d.join("admin.token")).collect();
    wait_until(
        "a registry to write the first admin token",
        std::time::Duration::from_secs(20),
        || {
            let written = files.iter().any(|f| f.exists());
            async move { written }
        },
    )
    .await;
    let file = files.iter().find(|f| f.exists()).expect("written");
    std::fs::read_to_string(file)
        .expect("the admin token")
        .trim()
        .to_string()
}

/// Beats `lease` on an open KeepAlive stream every half second, each beat
/// after the answer to the last, until the stream ends or the task is
/// aborted.
pub fn keep_beating(
    beats: tokio::sync::mpsc::Sender<pb::KeepAliveRequest>,
    mut answers: tonic::Streaming<pb::KeepAliveResponse>,
    lease: u64,
) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if beats
                .send(pb::KeepAliveRequest { lease_id: lease })
                .await
                .is_err()
                || answers.next().await.is_none()
            {
                return;
            }
        }
    })
}

/// The binary, for tests that run it as a process.
pub const BIN: &str = env!("CARGO_BIN_EXE_shop-mesh");

/// A command of the binary run to its end: success, stdout, stderr. One
/// that has not ended within a minute is killed and fails the test.
pub async fn run_bin(args: &[&str]) -> (bool, String, String) {
    run_bin_with(args, &[]).await
}

/// Every role of a `shop-mesh up` a test starts on port 0.
pub const UP_ON_PORT_0: [(&str, &str); 4] = [
    ("SHOP_MESH__REGISTRY__LISTEN", "127.0.0.1:0"),
    ("SHOP_MESH__USER__LISTEN", "127.0.0.1:0"),
    ("SHOP_MESH__PRODUCT__LISTEN", "127.0.0.1:0"),
    ("SHOP_MESH__ORDER__LISTEN", "127.0.0.1:0"),
];

/// `shop-mesh up` with `args` and `env` (every role on port 0), and the
/// summary it prints once everything is up.
pub async fn start_up(args: Vec<String>, env: &[(&str, &str)]) -> (Process, String) {
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.extend(UP_ON_PORT_0);
    let mut up = Process::start(std::path::Path::new(BIN), "up", args, &env)
        .await
        .unwrap();
    let summary = up
        .printed(|line| line.starts_with("Ctrl-C"))
        .await
        .expect("up prints its summary")
        .join("\n");
    (up, summary)
}

/// The token file `up`'s summary tells the shell to read.
pub fn shell_token(summary: &str) -> &str {
    summary
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("export SHOP_MESH__DISCOVERY__TOKEN_FILE=")
        })
        .expect("up says where the shell's token is")
}

/// `shop-mesh order place` of `count` of product 1001 for user 1001,
/// through `registry`.
pub fn place_order<'a>(count: &'a str, registry: &'a str) -> [&'a str; 10] {
    [
        "order",
        "place",
        "--user",
        "1001",
        "--product",
        "1001",
        "--count",
        count,
        "--registry",
        registry,
    ]
}

/// [`run_bin`] with `env` set.
pub async fn run_bin_with(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let run = tokio::process::Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("shop-mesh {args:?} was still running after a minute"))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The instances of `service` in the default namespace and group (none
/// when it is not registered).
pub async fn instances(
    client: &mut RegistryClient<Channel>,
    service: &str,
    healthy_only: bool,
) -> Vec<pb::Instance> {
    let request = pb::GetServiceRequest {
        service: service.into(),
        healthy_only,
        ..Default::default()
    };
    match client.get_service(request).await {
        Ok(answer) => answer.into_inner().instances,
        Err(status) if status.code() == tonic::Code::NotFound => Vec::new(),
        Err(status) => panic!("GetService {service}: {status:?}"),
    }
}

/// Polls `check` until it is true, or panics after `deadline`.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it answers something, within 10 s, and answers
/// that; panics after.
pub async fn wait_for<T, F, Fut>(mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out waiting for a condition"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Says that a test did not run and why, on the terminal even when the
/// test harness captures output (it captures only the print macros).
pub fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}
