//! The balanced channel: a tower `Service` that the generated gRPC clients
//! use like a plain `Channel`, spreading calls over a service's endpoints
//! as the resolver reports them.
//!
//! Choice is power of two choices: two endpoints drawn at random in
//! proportion to their weights; the first stands unless it has clearly
//! more calls in flight per unit of weight than the second. That keeps
//! traffic in proportion to the weights when the endpoints are alike, and
//! away from one that is slow (its calls pile up). A failing endpoint fails fast and so looks
//! idle: ejection (see [`super::endpoint`]) takes it out. A call marked
//! [`RetrySafe`] that fails is tried once more on another endpoint, under a
//! retry budget. An empty set fails at once with UNAVAILABLE.

use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::BodyExt;
use smallvec::SmallVec;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::body::Body;
use tonic::transport::Channel;
use tower::Service;
use tower::retry::budget::{Budget, TpsBudget};
use tracing::Instrument;

use prometheus_client::metrics::counter::Counter;

use super::endpoint::{EjectionPolicy, Endpoint};
use super::metrics::{ChannelMetrics, DiscoveryMetrics};
use super::resolver::{Change, EndpointInfo};
use crate::server::Connections;
use crate::telemetry::trace;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Marks a call as safe to send twice (idempotent): if it fails on one
/// endpoint it is retried once on another. Insert it with
/// [`retry_safe`].
#[derive(Debug, Clone, Copy)]
pub struct RetrySafe;

/// Marks a request [`RetrySafe`].
pub fn retry_safe<T>(mut request: tonic::Request<T>) -> tonic::Request<T> {
    request.extensions_mut().insert(RetrySafe);
    request
}

/// How a balanced channel calls.
#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// The deadline of a call that sets none.
    pub call_timeout: Duration,
    /// How long connecting to an instance may take before the attempt counts as
    /// a failure.
    pub connect_timeout: Duration,
    /// Keepalives and Nagle, as the servers hold them.
    pub connections: Connections,
    /// How long a call waits for the first answer from the registry.
    pub resolve_timeout: Duration,
    /// When failing endpoints are ejected and for how long.
    pub ejection: EjectionPolicy,
    /// Retries allowed, as a share of calls (0.2: at most 20 % extra load).
    pub retry_percent: f32,
    /// How instances are called over TLS, read from `connections.tls`
    /// once; None: plaintext.
    pub tls: Option<crate::server::Dialer>,
    /// Where calls are counted, when the caller's metrics are on.
    pub metrics: Option<DiscoveryMetrics>,
}

type Endpoints = Option<Arc<Vec<Arc<Endpoint>>>>;

/// A channel to every healthy instance of one service.
#[derive(Clone)]
pub struct BalancedChannel {
    shared: Arc<Shared>,
}

struct Shared {
    service: String,
    /// `None` until the resolver's first answer.
    endpoints: watch::Receiver<Endpoints>,
    /// Why the registry refused to answer, while it does.
    refused: watch::Receiver<Option<String>>,
    budget: TpsBudget,
    config: BalanceConfig,
    metrics: Option<ChannelMetrics>,
    _stop: DropGuard,
}

impl BalancedChannel {
    /// A channel fed by `changes` (a resolver's output).
    pub fn new(service: &str, mut changes: mpsc::Receiver<Change>, config: BalanceConfig) -> Self {
        let (tx, rx) = watch::channel(None);
        let (refusals, refused) = watch::channel(None);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let endpoint_config = config.clone();
        tokio::spawn(async move {
            let mut table: HashMap<SocketAddr, Arc<Endpoint>> = HashMap::new();
            loop {
                let change = tokio::select! {
                    _ = stopped.cancelled() => return,
                    change = changes.recv() => change,
                };
                let Some(change) = change else { return };
                if let Change::Refused(why) = change {
                    refusals.send_replace(Some(why));
                    continue;
                }
                refusals.send_replace(None);
                apply(&mut table, change, &endpoint_config);
                // Take whatever else is queued before publishing once.
                while let Ok(change) = changes.try_recv() {
                    apply(&mut table, change, &endpoint_config);
                }
                tx.send_replace(Some(Arc::new(table.values().cloned().collect())));
            }
        });
        Self {
            shared: Arc::new(Shared {
                service: service.into(),
                endpoints: rx,
                refused,
                budget: retry_budget(config.retry_percent),
                metrics: config.metrics.as_ref().map(|m| m.channel(service)),
                config,
                _stop: stop.drop_guard(),
            }),
        }
    }

    /// Resolves once the endpoint set (its addresses) satisfies `ready`.
    pub async fn wait_for(&self, ready: impl Fn(&[SocketAddr]) -> bool) {
        let mut endpoints = self.shared.endpoints.clone();
        let _ = endpoints
            .wait_for(|list| {
                let addrs: Vec<SocketAddr> =
                    list.iter().flat_map(|l| l.iter()).map(|e| e.addr).collect();
                ready(&addrs)
            })
            .await;
    }

    /// Endpoints known at `now`: how many take calls, how many are
    /// ejected.
    pub fn census(&self, now: Instant) -> (usize, usize) {
        let current = self.shared.endpoints.borrow().clone();
        let list = current.iter().flat_map(|list| list.iter());
        list.fold((0, 0), |(active, ejected), e| {
            if e.is_available(now) {
                (active + 1, ejected)
            } else {
                (active, ejected + 1)
            }
        })
    }

    /// The endpoints calls may go to now, with their weights.
    pub fn endpoints(&self) -> Vec<(SocketAddr, f64)> {
        let current = self.shared.endpoints.borrow().clone();
        let mut all: Vec<_> = current
            .iter()
            .flat_map(|list| list.iter())
            .map(|e| (e.addr, e.weight()))
            .collect();
        all.sort_by_key(|(addr, _)| *addr);
        all
    }
}

fn apply(table: &mut HashMap<SocketAddr, Arc<Endpoint>>, change: Change, config: &BalanceConfig) {
    let add = |table: &mut HashMap<SocketAddr, Arc<Endpoint>>, info: EndpointInfo| match table
        .get(&info.addr)
    {
        Some(existing) => existing.set_weight(info.weight),
        None => {
            if let Some(channel) = connect(info.addr, config) {
                let endpoint = Arc::new(Endpoint::new(info.addr, info.weight, channel));
                table.insert(info.addr, endpoint);
            }
        }
    };
    match change {
        Change::Reset(list) => {
            let mut next = HashMap::with_capacity(list.len());
            for info in list {
                if let Some(existing) = table.remove(&info.addr) {
                    next.insert(info.addr, existing);
                }
                add(&mut next, info);
            }
            *table = next;
        }
        Change::Add(info) => add(table, info),
        Change::Remove(addr) => {
            table.remove(&addr);
        }
        // Taken before: the table stays as it was.
        Change::Refused(_) => {}
    }
}

/// A channel to `addr`; None (logged) when the endpoint cannot be made,
/// so one odd instance never stops the others being followed.
fn connect(addr: SocketAddr, config: &BalanceConfig) -> Option<Channel> {
    let endpoint = config
        .connections
        .endpoint(
            format!("{}://{addr}", config.connections.tls.scheme()),
            config.connect_timeout,
        )
        .and_then(|endpoint| match &config.tls {
            Some(tls) => endpoint.tls_config(tls.for_host(&addr.ip().to_string())),
            None => Ok(endpoint),
        });
    match endpoint {
        Ok(endpoint) => Some(endpoint.timeout(config.call_timeout).connect_lazy()),
        Err(err) => {
            tracing::error!(%addr, %err, "cannot call this instance; leaving it out");
            None
        }
    }
}

impl Service<http::Request<Body>> for BalancedChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Endpoint channels queue calls themselves; choosing happens in call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        let span = trace::client_span(&mut request, &shared.service);
        Box::pin(async move { shared.dispatch(request).await }.instrument(span))
    }
}

impl Shared {
    /// Routes one call, counting it when metrics are on.
    async fn dispatch(
        &self,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, BoxError> {
        let Some(metrics) = &self.metrics else {
            return self.route(request, None).await;
        };
        metrics.calls.inc();
        let call = metrics.rpc.begin(request.uri().path());
        let response = self.route(request, Some(metrics)).await?;
        Ok(call.answered(response).map(Body::new))
    }

    async fn route(
        &self,
        request: http::Request<Body>,
        metrics: Option<&ChannelMetrics>,
    ) -> Result<http::Response<Body>, BoxError> {
        let started = Instant::now();
        let count = |counter: fn(&ChannelMetrics) -> &Counter| {
            if let Some(metrics) = metrics {
                counter(metrics).inc();
            }
        };
        let picked = |list: &[Arc<Endpoint>]| {
            let first = pick(list, None, &mut rand::rng());
            if let Some(metrics) = metrics {
                metrics.picked(started);
            }
            first
        };
        let Some(list) = self.resolved().await else {
            count(|m| &m.no_endpoint);
            let message = match self.refused.borrow().as_deref() {
                Some(why) => format!(
                    "no instance of {} is known: the registry refused to say: {why}",
                    self.service
                ),
                None => format!(
                    "no instance of {} is known yet: the registry has not answered",
                    self.service
                ),
            };
            return Ok(tonic::Status::unavailable(message).into_http());
        };
        let Some(first) = picked(&list) else {
            count(|m| &m.no_endpoint);
            return Ok(tonic::Status::unavailable(format!(
                "no healthy instance of {}",
                self.service
            ))
            .into_http());
        };
        self.budget.deposit();
        let (request, spare) = if request.extensions().get::<RetrySafe>().is_some() {
            let (one, two) = duplicate(request).await?;
            (one, Some(two))
        } else {
            (request, None)
        };
        let failure = match self.call_endpoint(&first, request, (1, metrics)).await {
            Ok(answer) => return Ok(answer),
            Err(failure) => failure,
        };
        let Some(spare) = spare else {
            return Ok(failure);
        };
        if !self.budget.withdraw() {
            count(|m| &m.retries_refused);
            return Ok(failure);
        }
        let second = pick(&list, Some(first.addr), &mut rand::rng());
        match second {
            Some(endpoint) => {
                count(|m| &m.retries);
                tracing::debug!(service = %self.service, from = %first.addr, to = %endpoint.addr, "retrying on another endpoint");
                self.call_endpoint(&endpoint, spare, (2, metrics))
                    .await
                    .or_else(Ok)
            }
            None => Ok(failure),
        }
    }

    /// The endpoint list, waiting (up to `resolve_timeout`) for the
    /// resolver's first answer.
    async fn resolved(&self) -> Option<Arc<Vec<Arc<Endpoint>>>> {
        if let Some(list) = self.endpoints.borrow().as_ref() {
            return Some(list.clone());
        }
        let mut endpoints = self.endpoints.clone();
        let ready = tokio::time::timeout(
            self.config.resolve_timeout,
            endpoints.wait_for(Option::is_some),
        )
        .await;
        match ready {
            Ok(Ok(list)) => list.clone(),
            _ => None,
        }
    }

    /// One attempt: `Ok` for an answer to pass on, `Err` for a failure
    /// that may be retried (carrying the answer to give if it is not).
    async fn call_endpoint(
        &self,
        endpoint: &Endpoint,
        request: http::Request<Body>,
        (attempt, metrics): (u32, Option<&ChannelMetrics>),
    ) -> Result<http::Response<Body>, http::Response<Body>> {
        let mut channel = endpoint.channel.clone();
        let call = async {
            let _counted = endpoint.start_call();
            match tower::ServiceExt::ready(&mut channel).await {
                Ok(channel) => channel.call(request).await,
                Err(err) => Err(err),
            }
        };
        let result = call
            .instrument(trace::attempt_span(endpoint.addr, attempt))
            .await;
        let failure = match result {
            Ok(response) if grpc_code(&response) != Some(tonic::Code::Unavailable) => {
                endpoint.record(true, &self.config.ejection);
                return Ok(response);
            }
            Ok(unavailable) => unavailable,
            Err(err) => self.transport_status(endpoint, &err).into_http(),
        };
        let ejected = endpoint.record(false, &self.config.ejection);
        if let Some(metrics) = metrics {
            metrics.failed_attempts.inc();
            if ejected {
                metrics.ejections.inc();
            }
        }
        Err(failure)
    }

    fn transport_status(
        &self,
        endpoint: &Endpoint,
        err: &tonic::transport::Error,
    ) -> tonic::Status {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(cause) = source {
            if cause.is::<tonic::TimeoutExpired>() {
                return tonic::Status::deadline_exceeded(format!(
                    "{} instance {} did not answer in time",
                    self.service, endpoint.addr
                ));
            }
            if cause.is::<tonic::ConnectError>() {
                return tonic::Status::unavailable(format!(
                    "cannot connect to {} instance {}: {}",
                    self.service,
                    endpoint.addr,
                    error_chain(err)
                ));
            }
            source = cause.source();
        }
        tonic::Status::unavailable(format!(
            "{} instance {} failed: {}",
            self.service,
            endpoint.addr,
            error_chain(err)
        ))
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The gRPC status a response carries in its headers (a trailers-only
/// answer, as errors are); `None` for a normal answer.
fn grpc_code(response: &http::Response<Body>) -> Option<tonic::Code> {
    let value = response.headers().get("grpc-status")?.to_str().ok()?;
    Some(tonic::Code::from_i32(value.parse().ok()?))
}

/// Retries allowed: `percent` of the calls of the last 10 s, and at least
/// 10 a second, so that a quiet channel can still retry while a failing
/// one cannot multiply its load.
fn retry_budget(percent: f32) -> TpsBudget {
    TpsBudget::new(Duration::from_secs(10), 10, percent)
}

/// Two draws by weight among the endpoints not ejected (all of them if
/// every one is ejected, rather than fail), the one with fewer calls in
/// flight wins. `exclude` (the endpoint a retry leaves) is never picked:
/// with no other endpoint there is nothing to retry on.
fn pick(
    list: &[Arc<Endpoint>],
    exclude: Option<SocketAddr>,
    rng: &mut impl Rng,
) -> Option<Arc<Endpoint>> {
    let now = Instant::now();
    // Each endpoint's outlier state is read once per call, here.
    let eligible = || list.iter().filter(|e| Some(e.addr) != exclude);
    let mut candidates: SmallVec<[&Arc<Endpoint>; 8]> =
        eligible().filter(|e| e.is_available(now)).collect();
    if candidates.is_empty() {
        candidates = eligible().collect();
    }
    pick_among(&candidates, rng)
}

fn pick_among(candidates: &[&Arc<Endpoint>], rng: &mut impl Rng) -> Option<Arc<Endpoint>> {
    if let [only] = candidates {
        return (only.weight() > 0.0).then(|| Arc::clone(only));
    }
    let total: f64 = candidates.iter().map(|e| e.weight()).sum();
    if total <= 0.0 {
        return None;
    }
    let mut draw = || {
        let mut point = rng.random_range(0.0..total);
        let mut last = None;
        for &endpoint in candidates {
            point -= endpoint.weight();
            last = Some(endpoint);
            if point < 0.0 {
                break;
            }
        }
        last
    };
    let a = draw()?;
    // Two distinct endpoints when there are two (a few redraws suffice).
    let mut b = draw()?;
    for _ in 0..3 {
        if b.addr != a.addr {
            break;
        }
        b = draw()?;
    }
    // Calls in flight per unit of weight. The first draw (by weight) stands
    // unless it is busier than the second even with one more call on the
    // second: the ordinary jitter of a call or two in flight then leaves
    // the weighted draw to decide, so traffic follows the weights, while a
    // slow endpoint, whose calls pile up, loses.
    let load = |e: &Endpoint, extra: usize| (e.in_flight() + extra) as f64 / e.weight();
    Some(if load(a, 0) > load(b, 1) { b } else { a }.clone())
}

/// A request twice over, its body read into memory, for a retry.
async fn duplicate(
    request: http::Request<Body>,
) -> Result<(http::Request<Body>, http::Request<Body>), BoxError> {
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await?.to_bytes();
    let make = |bytes| {
        let mut copy = http::Request::new(Body::new(http_body_util::Full::new(bytes)));
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.version_mut() = parts.version;
        *copy.headers_mut() = parts.headers.clone();
        *copy.extensions_mut() = parts.extensions.clone();
        copy
    };
    Ok((make(bytes.clone()), make(bytes)))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn endpoints(weights: &[f64]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16));
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .expect("a valid uri")
                    .connect_lazy();
                Arc::new(Endpoint::new(addr, weight, channel))
            })
            .collect()
    }

    /// How many of `picks` picks went to each endpoint, from a fixed seed.
    fn shares(list: &[Arc<Endpoint>], exclude: Option<SocketAddr>, picks: usize) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = vec![0; list.len()];
        for _ in 0..picks {
            let picked = pick(list, exclude, &mut rng).expect("an endpoint");
            counts[list.iter().position(|e| e.addr == picked.addr).unwrap()] += 1;
        }
        counts
    }

    #[tokio::test]
    async fn picks_follow_the_weights_and_weight_zero_gets_nothing() {
        let list = endpoints(&[1.0, 2.0, 0.0]);
        let counts = shares(&list, None, 30_000);
        assert_eq!(counts[2], 0, "weight 0 takes no traffic: {counts:?}");
        let ratio = counts[1] as f64 / counts[0] as f64;
        assert!((1.9..=2.1).contains(&ratio), "1:2 came out {counts:?}");
    }

    #[tokio::test]
    async fn an_endpoint_with_calls_piling_up_loses_to_idle_ones() {
        let list = endpoints(&[1.0, 1.0, 1.0]);
        let _busy: Vec<_> = (0..5).map(|_| list[0].start_call()).collect();
        let counts = shares(&list, None, 3_000);
        // Only when every draw lands on it (four tries at a second,
        // distinct draw) does the busy one go unchallenged.
        assert!(counts[0] < 30, "the busy one got {counts:?}");
        assert!(counts[1] > 1_400 && counts[2] > 1_400, "{counts:?}");
    }

    #[tokio::test]
    async fn a_retry_never_goes_back_to_the_endpoint_that_failed() {
        let mut rng = StdRng::seed_from_u64(7);
        let list = endpoints(&[1.0, 1.0]);
        let counts = shares(&list, Some(list[0].addr), 1_000);
        assert_eq!(counts, [0, 1_000]);
        let only = endpoints(&[1.0]);
        assert!(pick(&only, Some(only[0].addr), &mut rng).is_none());
        assert!(pick(&endpoints(&[0.0]), None, &mut rng).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_budget_allows_about_a_fifth_extra() {
        let budget = retry_budget(crate::discovery::Config::default().retry_percent);
        let mut retried = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                retried += 1;
            }
        }
        // 1000 calls in an instant: 20 % of them plus the floor's reserve.
        assert!((200..=310).contains(&retried), "{retried} retries");

        // Ten seconds later the deposits have expired: only the floor.
        tokio::time::advance(Duration::from_secs(11)).await;
        let mut later = 0;
        while budget.withdraw() {
            later += 1;
            assert!(later < 1000, "the budget must run out");
        }
        assert!(later <= 100, "{later} retries from the floor alone");
    }
}
