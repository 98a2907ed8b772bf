//! Discovery end to end, in-process: test services that register
//! themselves, callers that reach them by name over a balanced channel.
//! Each test service runs on a runtime of its own, so that dropping the
//! runtime kills it the way a crashed process dies: sockets closed, no
//! goodbye.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use shop_mesh::discovery::{self, Announce, BalancedChannel, Mesh, retry_safe};
use shop_mesh::harness::Isolated;
use shop_mesh::pb::registry as pb;
use shop_mesh::server::Connections;
use shop_mesh::shutdown::Shutdown;
use tokio::time::Instant;
use tonic::body::Body;

use crate::{TestRegistry, wait_until};

/// A test gRPC service, `/test.Probe/Call`, that answers with its own port
/// (in a KeepAliveResponse's lease_id, to reuse a generated message).
#[derive(Clone)]
struct Probe {
    port: u16,
    delay: Duration,
    in_flight: Arc<AtomicUsize>,
    /// Calls received, answered or not.
    calls: Arc<AtomicUsize>,
    /// Answer every call with UNAVAILABLE.
    failing: bool,
}

impl tonic::server::NamedService for Probe {
    const NAME: &'static str = "test.Probe";
}

struct ProbeCall(Probe);

impl tonic::server::UnaryService<pb::KeepAliveRequest> for ProbeCall {
    type Response = pb::KeepAliveResponse;
    type Future = BoxFuture<'static, Result<tonic::Response<pb::KeepAliveResponse>, tonic::Status>>;

    fn call(&mut self, _: tonic::Request<pb::KeepAliveRequest>) -> Self::Future {
        let probe = self.0.clone();
        Box::pin(async move {
            probe.calls.fetch_add(1, Ordering::SeqCst);
            if probe.failing {
                return Err(tonic::Status::unavailable("failing on purpose"));
            }
            probe.in_flight.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(probe.delay).await;
            probe.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(tonic::Response::new(pb::KeepAliveResponse {
                lease_id: probe.port.into(),
                heartbeat_interval_ms: 0,
            }))
        })
    }
}

impl tower::Service<http::Request<Body>> for Probe {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let probe = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(ProbeCall(probe), request).await)
        })
    }
}

/// Calls `/test.Probe/Call`; answers the port of the instance that answered.
async fn call(channel: &BalancedChannel, retry: bool) -> Result<u16, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let mut request = tonic::Request::new(pb::KeepAliveRequest { lease_id: 0 });
    if retry {
        request = retry_safe(request);
    }
    let path = http::uri::PathAndQuery::from_static("/test.Probe/Call");
    let answer: tonic::Response<pb::KeepAliveResponse> = grpc
        .unary(request, path, tonic_prost::ProstCodec::default())
        .await?;
    Ok(answer.into_inner().lease_id as u16)
}

fn discovery_config(registry: SocketAddr) -> discovery::Config {
    discovery::Config {
        registry: registry.to_string(),
        call_timeout: Duration::from_secs(2),
        reconnect_max_backoff: Duration::from_millis(500),
        drain_delay: Duration::from_millis(100),
        ..Default::default()
    }
}

/// A test service registered as "probe", on a runtime of its own.
struct Instance {
    port: u16,
    in_flight: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    isolated: Isolated,
}

impl Instance {
    fn start(registry: SocketAddr, weight: f64, delay: Duration) -> Instance {
        Self::start_with(registry, weight, delay, false)
    }

    fn start_with(registry: SocketAddr, weight: f64, delay: Duration, failing: bool) -> Instance {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut announce = Announce::new("probe");
        announce.weight = weight;
        let isolated = Isolated::start(discovery_config(registry), announce, {
            let (in_flight, calls) = (in_flight.clone(), calls.clone());
            move |addr, routes| {
                routes.add_service(Probe {
                    port: addr.port(),
                    delay,
                    in_flight,
                    calls,
                    failing,
                })
            }
        })
        .unwrap();
        Instance {
            port: isolated.addr.port(),
            in_flight,
            calls,
            isolated,
        }
    }
}

async fn registered_ports(registry: &TestRegistry, healthy_only: bool) -> Vec<u16> {
    let mut client = registry.client().await;
    crate::instances(&mut client, "probe", healthy_only)
        .await
        .iter()
        .map(|i| i.port as u16)
        .collect()
}

async fn wait_for_endpoints(channel: &BalancedChannel, count: usize) {
    wait_until(
        &format!("{count} endpoints"),
        Duration::from_secs(10),
        || {
            let n = channel.endpoints().len();
            async move { n == count }
        },
    )
    .await;
}

/// `total` calls, `concurrency` at a time; answers the count per port and
/// the failures.
async fn load(
    channel: &BalancedChannel,
    total: usize,
    concurrency: usize,
) -> (HashMap<u16, usize>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (channel, next) = (channel.clone(), next.clone());
            tokio::spawn(async move {
                let mut seen = HashMap::new();
                let mut failed = 0;
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    match call(&channel, false).await {
                        Ok(port) => *seen.entry(port).or_insert(0) += 1,
                        Err(_) => failed += 1,
                    }
                }
                (seen, failed)
            })
        })
        .collect();
    let mut seen = HashMap::new();
    let mut failed = 0;
    for task in tasks {
        let (part, f) = task.await.unwrap();
        for (port, n) in part {
            *seen.entry(port).or_insert(0) += n;
        }
        failed += f;
    }
    (seen, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_evenly_over_three_instances() {
    let registry = TestRegistry::start().await;
    let instances: Vec<_> = (0..3)
        .map(|_| Instance::start(registry.addr, 1.0, Duration::ZERO))
        .collect();
    let mesh = Mesh::new(&discovery_config(registry.addr), &Connections::default()).unwrap();
    let channel = mesh.channel("probe");
    wait_for_endpoints(&channel, 3).await;

    let (seen, failed) = load(&channel, 3000, 8).await;
    assert_eq!(failed, 0);
    for instance in &instances {
        let n = seen.get(&instance.port).copied().unwrap_or(0);
        assert!(
            (850..=1150).contains(&n),
            "{} got {n} of 3000: {seen:?}",
            instance.port
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_one_two_zero_are_honoured() {
    let registry = TestRegistry::start().await;
    let one = Instance::start(registry.addr, 1.0, Duration::ZERO);
    let two = Instance::start(registry.addr, 2.0, Duration::ZERO);
    let zero = Instance::start(registry.addr, 0.0, Duration::ZERO);
    wait_until("three registered", Duration::from_secs(10), || async {
        registered_ports(&registry, false).await.len() == 3
    })
    .await;
    let mesh = Mesh::new(&discovery_config(registry.addr), &Connections::default()).unwrap();
    let channel = mesh.channel("probe");
    wait_for_endpoints(&channel, 2).await;

    let (seen, failed) = load(&channel, 3000, 8).await;
    assert_eq!(failed, 0);
    let share = |i: &Instance| seen.get(&i.port).copied().unwrap_or(0);
    eprintln!(
        "weights 1:2:0 got {} : {} : {}",
        share(&one),
        share(&two),
        share(&zero)
    );
    // The shares themselves are the pick's, checked exactly on a seeded
    // generator in the balancer's unit tests; end to end, what holds on
    // any machine is their order.
    assert!(share(&one) > 0, "{seen:?}");
    assert!(share(&two) > share(&one), "{seen:?}");
    assert_eq!(share(&zero), 0, "weight 0 takes no traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_load_costs_no_call_once_the_registry_marks_it() {
    let registry = TestRegistry::start().await;
    let mut instances: Vec<_> = (0..3)
        .map(|_| Instance::start(registry.addr, 1.0, Duration::ZERO))
        .collect();
    let mesh = Mesh::new(&discovery_config(registry.addr), &Connections::default()).unwrap();
    let channel = mesh.channel("probe");
    wait_for_endpoints(&channel, 3).await;

    let stop = Shutdown::new();
    let done = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (channel, stop, done) = (channel.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                loop {
                    let started = Instant::now();
                    tokio::select! {
                        _ = stop.cancelled() => return outcomes,
                        result = call(&channel, true) => outcomes.push((started, result)),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let victim = instances[1].calls.clone();
    wait_until(
        "the doomed instance to be serving calls",
        Duration::from_secs(5),
        || {
            let served = victim.load(Ordering::Relaxed);
            async move { served >= 50 }
        },
    )
    .await;
    let killed = instances[1].port;
    instances[1].isolated.kill();
    wait_until(
        "the registry to mark it unhealthy",
        Duration::from_secs(5),
        || async { !registered_ports(&registry, true).await.contains(&killed) },
    )
    .await;
    let marked = Instant::now();
    let done_at_mark = done.load(Ordering::Relaxed);
    wait_until(
        "300 more calls after the mark",
        Duration::from_secs(10),
        || {
            let n = done.load(Ordering::Relaxed);
            async move { n >= done_at_mark + 300 }
        },
    )
    .await;
    stop.cancel();

    let mut after = 0;
    let mut failed_after = Vec::new();
    let mut failed_before = 0;
    for task in calls {
        for (started, result) in task.await.unwrap() {
            match (started >= marked, result) {
                (true, Ok(port)) => {
                    after += 1;
                    assert_ne!(port, killed, "a call went to the dead instance");
                }
                (true, Err(status)) => failed_after.push(status),
                (false, Err(_)) => failed_before += 1,
                (false, Ok(_)) => {}
            }
        }
    }
    assert!(after > 100, "the load kept flowing: {after} calls");
    assert!(failed_after.is_empty(), "{failed_after:?}");
    eprintln!("calls that failed before the registry marked it: {failed_before}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_instance_costs_only_the_first_few_calls() {
    let registry = TestRegistry::start().await;
    let _healthy: Vec<_> = (0..2)
        .map(|_| Instance::start(registry.addr, 1.0, Duration::ZERO))
        .collect();

    // Accepts connections and never answers; its lease is kept alive, so
    // the registry has nothing to say about it.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket);
        }
    });
    let shutdown = Shutdown::new();
    let _registration = discovery::Registration::start(
        discovery_config(registry.addr)
            .connector(&Connections::default())
            .unwrap(),
        pb::Instance {
            service: "probe".into(),
            ip: "127.0.0.1".into(),
            port: hung_port.into(),
            ..Default::default()
        },
        shutdown.clone(),
        Duration::ZERO,
    );

    let config = discovery::Config {
        call_timeout: Duration::from_millis(300),
        ejection_base: Duration::from_secs(30),
        ..discovery_config(registry.addr)
    };
    let mesh = Mesh::new(&config, &Connections::default()).unwrap();
    let channel = mesh.channel("probe");
    wait_for_endpoints(&channel, 3).await;

    let (seen, failed) = load(&channel, 300, 1).await;
    assert!(
        failed <= 3,
        "{failed} calls failed; ejection should stop it after 3: {seen:?}"
    );
    assert_eq!(seen.values().sum::<usize>() + failed, 300);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_instance_gets_clearly_less_traffic() {
    let registry = TestRegistry::start().await;
    let fast: Vec<_> = (0..2)
        .map(|_| Instance::start(registry.addr, 1.0, Duration::from_millis(1)))
        .collect();
    let slow = Instance::start(registry.addr, 1.0, Duration::from_millis(51));
    let mesh = Mesh::new(&discovery_config(registry.addr), &Connections::default()).unwrap();
    let channel = mesh.channel("probe");
    wait_for_endpoints(&channel, 3).await;

    let (seen, failed) = load(&channel, 1500, 16).await;
    assert_eq!(failed, 0);
    let slow_share = seen.get(&slow.port).copied().unwrap_or(0);
    eprintln!("the slow instance got {slow_share} of 1500");
    for f in &fast {
        assert!(
            seen.get(&f.port).copied().unwrap_or(0) > slow_share,
            "the slow one got {slow_share} of 1500, more than a fast one: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_then_back_empty_never_empties_a_caller() {
    let dir = tempfile::tempdir().unwrap();
    let config = shop_mesh::registry::Config {
        data_dir: dir.path().join("first"),
        ..crate::without_credentials()
    };
    let registry = TestRegistry::start_on(config).await;
    let addr = registry.addr;
    let _instances: Vec<_> = (0..2)
        .map(|_| Instance::start(addr, 1.0, Duration::ZERO))
        .collect();
    let mesh = Mesh::new(&discovery_config(addr), &Connections::default()).unwrap();
    let channel = mesh.channel("probe");
    wait_for_endpoints(&channel, 2).await;

    let smallest = Arc::new(AtomicUsize::new(usize::MAX));
    let sampler = tokio::spawn({
        let (channel, smallest) = (channel.clone(), smallest.clone());
        async move {
            loop {
                smallest.fetch_min(channel.endpoints().len(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });

    registry.stop().await;
    let (_, failed) = load(&channel, 300, 4).await;
    assert_eq!(failed, 0, "calls flow to the last known instances");

    let restarted_at = Instant::now();
    let registry = TestRegistry::start_at(
        shop_mesh::registry::Config {
            data_dir: dir.path().join("second"),
            ..crate::without_credentials()
        },
        addr,
    )
    .await;
    // Within one heartbeat interval (5 s) of the registry's return.
    wait_until("both to register again", Duration::from_secs(5), || async {
        registered_ports(&registry, true).await.len() == 2
    })
    .await;
    eprintln!(
        "re-registered {:?} after the registry came back",
        restarted_at.elapsed()
    );
    let (_, failed) = load(&channel, 300, 4).await;
    assert_eq!(failed, 0);
    sampler.abort();
    assert_eq!(
        smallest.load(Ordering::Relaxed),
        2,
        "the caller's set never shrank"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_service_leaves_the_registry_first_and_cuts_no_call() {
    let registry = TestRegistry::start().await;
    let mut instance = Instance::start(registry.addr, 1.0, Duration::from_millis(600));
    let mesh = Mesh::new(&discovery_config(registry.addr), &Connections::default()).unwrap();
    let channel = mesh.channel("probe");
    wait_for_endpoints(&channel, 1).await;

    let mut client = registry.client().await;
    let mut watch = client
        .watch(pb::WatchRequest {
            service: "probe".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap();

    let calls: Vec<_> = (0..5)
        .map(|_| {
            let channel = channel.clone();
            tokio::spawn(async move { call(&channel, false).await })
        })
        .collect();
    wait_until("five calls in flight", Duration::from_secs(5), || {
        let n = instance.in_flight.load(Ordering::SeqCst);
        async move { n == 5 }
    })
    .await;

    instance.isolated.shutdown.cancel();
    let removed = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("a change in time")
        .unwrap()
        .unwrap();
    let Some(pb::watch_response::Body::Change(change)) = removed.body else {
        panic!("a change");
    };
    assert_eq!(
        change.kind(),
        pb::change::Kind::Delete,
        "deregistered, not timed out"
    );
    let target: SocketAddr = ([127, 0, 0, 1], instance.port).into();
    assert!(
        tokio::net::TcpStream::connect(target).await.is_ok(),
        "still listening when it left the registry"
    );
    wait_until("the listener to close", Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(target).await.is_err()
    })
    .await;

    for call in calls {
        assert_eq!(
            call.await.unwrap().unwrap(),
            instance.port,
            "no in-flight call was cut"
        );
    }
    let exited = instance.isolated.exited().await;
    assert!(exited.is_ok(), "{exited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_service_fails_fast_with_unavailable() {
    let registry = TestRegistry::start().await;
    let mesh = Mesh::new(&discovery_config(registry.addr), &Connections::default()).unwrap();
    let channel = mesh.channel("nobody");
    let started = Instant::now();
    let err = call(&channel, true).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(err.message(), "no healthy instance of nobody");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "it did not hang"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_retry_safe_calls_stay_within_the_budget() {
    let registry = TestRegistry::start().await;
    let instances: Vec<_> = (0..2)
        .map(|_| Instance::start_with(registry.addr, 1.0, Duration::ZERO, true))
        .collect();
    let config = discovery::Config {
        // Keep both in rotation, so every failure could be retried.
        eject_after: 1_000_000,
        ..discovery_config(registry.addr)
    };
    let mesh = Mesh::new(&config, &Connections::default()).unwrap();
    let channel = mesh.channel("probe");
    wait_for_endpoints(&channel, 2).await;

    let calls = 2_000;
    let started = Instant::now();
    for _ in 0..calls {
        let err = call(&channel, true).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }
    let seconds = started.elapsed().as_secs() as usize + 1;
    let attempts: usize = instances
        .iter()
        .map(|i| i.calls.load(Ordering::SeqCst))
        .sum();
    let retries = attempts - calls;
    // 20 % of the calls, plus the budget's floor of 10 a second, for
    // every second the calls took (a slow machine gets more of the floor)
    // and one 10 s window of it at the start.
    assert!(retries > 0, "retry-safe calls were retried");
    assert!(
        retries <= calls / 5 + 10 * seconds + 100,
        "{retries} retries for {calls} calls in {seconds} s"
    );

    // Calls not marked retry-safe are never sent twice.
    let before: usize = instances
        .iter()
        .map(|i| i.calls.load(Ordering::SeqCst))
        .sum();
    for _ in 0..100 {
        call(&channel, false).await.unwrap_err();
    }
    let after: usize = instances
        .iter()
        .map(|i| i.calls.load(Ordering::SeqCst))
        .sum();
    assert_eq!(after - before, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_addresses_are_tried_in_turn() {
    let registry = TestRegistry::start().await;
    // Nothing listens on the first address.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let list = format!("{dead_addr},{}", registry.addr);
    let mut config = discovery_config(registry.addr);
    config.registry = list;
    let instance = Instance::start(registry.addr, 1.0, Duration::ZERO);
    let mesh = Mesh::new(&config, &Connections::default()).unwrap();
    let channel = mesh.channel("probe");
    wait_for_endpoints(&channel, 1).await;
    assert_eq!(call(&channel, false).await.unwrap(), instance.port);

    let config = discovery::Config {
        registry: " , ".into(),
        ..Default::default()
    };
    let err = Mesh::new(&config, &Connections::default())
        .err()
        .expect("an empty list is refused");
    assert_eq!(err.to_string(), "no registry address given");
}

/// An instance an operator takes out of traffic (UpdateInstance, what the
/// console's "offline" does) leaves every caller's balanced channel and
/// gets no new calls, keeps its lease, and comes back when enabled again;
/// a weight change moves its share in the callers' tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_taken_offline_gets_no_calls_and_keeps_its_lease() {
    let registry = TestRegistry::start().await;
    let a = Instance::start(registry.addr, 1.0, Duration::ZERO);
    let b = Instance::start(registry.addr, 1.0, Duration::ZERO);
    let mesh = Mesh::new(&discovery_config(registry.addr), &Connections::default()).unwrap();
    let channel = mesh.channel("probe");
    wait_for_endpoints(&channel, 2).await;
    let mut client = registry.client().await;
    let update =
        |port: u16, weight: Option<f64>, enabled: Option<bool>| pb::UpdateInstanceRequest {
            service: "probe".into(),
            ip: "127.0.0.1".into(),
            port: port.into(),
            weight,
            enabled,
            ..Default::default()
        };

    client
        .update_instance(update(b.port, None, Some(false)))
        .await
        .expect("taken offline");
    wait_for_endpoints(&channel, 1).await;
    let calls_before = b.calls.load(Ordering::SeqCst);
    let (per_port, failed) = load(&channel, 200, 8).await;
    assert_eq!(failed, 0);
    assert_eq!(per_port.get(&b.port), None, "{per_port:?}");
    assert_eq!(b.calls.load(Ordering::SeqCst), calls_before);
    // Still registered, listed as disabled, its lease alive.
    let listed = crate::instances(&mut client, "probe", false).await;
    let offline = listed.iter().find(|i| i.port == u32::from(b.port)).unwrap();
    assert_eq!((offline.enabled, offline.healthy), (Some(false), true));

    client
        .update_instance(update(b.port, Some(3.0), Some(true)))
        .await
        .expect("back online, with weight 3");
    wait_for_endpoints(&channel, 2).await;
    wait_until(
        "the weight to reach the caller",
        Duration::from_secs(10),
        || {
            let weights = channel.endpoints();
            let port = b.port;
            async move {
                weights
                    .iter()
                    .any(|(addr, w)| addr.port() == port && *w == 3.0)
            }
        },
    )
    .await;

    for (request, code) in [
        (update(1, Some(1.0), None), tonic::Code::NotFound),
        (
            update(b.port, Some(-1.0), None),
            tonic::Code::InvalidArgument,
        ),
        (update(b.port, None, None), tonic::Code::InvalidArgument),
    ] {
        let status = client.update_instance(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
    }
    drop(a);
    registry.stop().await;
}
