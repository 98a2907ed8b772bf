//! Counting gRPC calls, served ([`RpcLayer`] on every role's server) and
//! made (the balanced channel, through [`RpcMetrics::begin`]): calls by
//! method and status code, calls in flight, and latency.
//!
//! A call's code is where gRPC puts it: in the response headers for an
//! answer that is only an error (trailers-only), else in the trailers at
//! the end of the body; so the body is watched, and a body dropped before
//! its end counts as CANCELLED. Latency is the time to the response's
//! headers: the whole call for a unary RPC, the time to open the stream
//! for a streaming one (whose lifetime is its client's business).
//!
//! Labels stay few whatever callers send: the method is one the mesh's
//! protos declare, else `unknown`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, OnceLock};
use std::task::{Context, Poll};

use futures::FutureExt;
use futures::future::{BoxFuture, Either, Map};
use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use prost::Message;
use tokio::time::Instant;
use tracing::Instrument;

use super::metrics::{Metrics, latency_buckets};

/// A method as labelled: its service and name, from the mesh's protos.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Method {
    /// `shopmesh.shop.v1.OrderService`.
    pub service: &'static str,
    /// `PlaceOrder`.
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Handled {
    service: &'static str,
    method: &'static str,
    code: &'static str,
}

/// Every method of the protos the mesh serves or calls: by path, the
/// index of its labels in `list`, whose first entry is `unknown`.
struct Methods {
    by_path: HashMap<String, usize>,
    list: Vec<Method>,
}

static METHODS: LazyLock<Methods> = LazyLock::new(|| {
    let sets = [
        crate::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = Methods {
        by_path: HashMap::new(),
        list: vec![Method {
            service: "unknown",
            method: "unknown",
        }],
    };
    let mut add = |service: &str, method: &str| {
        // Leaked once: a fixed, small set, labelled without a copy per call.
        let labels = Method {
            service: Box::leak(service.to_owned().into_boxed_str()),
            method: Box::leak(method.to_owned().into_boxed_str()),
        };
        methods
            .by_path
            .insert(format!("/{service}/{method}"), methods.list.len());
        methods.list.push(labels);
    };
    for set in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                let full = match file.package() {
                    "" => service.name().to_owned(),
                    package => format!("{package}.{}", service.name()),
                };
                for method in &service.method {
                    add(&full, method.name());
                }
            }
        }
    }
    // Nacos's interface, which has no package, served on its own port.
    add("Request", "request");
    add("BiRequestStream", "requestBiStream");
    methods
});

/// The index in `METHODS.list` of the method at `path`; 0, `unknown`, for
/// any other path.
fn index(path: &str) -> usize {
    METHODS.by_path.get(path).copied().unwrap_or(0)
}

/// The labels of the method at `path`.
pub fn method(path: &str) -> Method {
    METHODS.list[index(path)].clone()
}

/// Which end of the call is counted.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    /// Calls this role served: `grpc_server_*`.
    Server = 0,
    /// Calls this role made: `grpc_client_*`.
    Client = 1,
}

/// Counters of calls on one side.
#[derive(Clone, Debug)]
pub struct RpcMetrics {
    families: Families,
    /// Each method's series, by its index in `METHODS.list`, taken from
    /// the families on its first call: after that a call touches its
    /// own counters and looks nothing up.
    handles: Arc<[OnceLock<Arc<Handles>>]>,
}

#[derive(Clone, Debug)]
struct Families {
    started: Family<Method, Counter>,
    handled: Family<Handled, Counter>,
    in_flight: Family<Method, Gauge>,
    seconds: Family<Method, Histogram>,
}

/// One method's series.
#[derive(Debug)]
struct Handles {
    method: Method,
    started: Counter,
    in_flight: Gauge,
    seconds: Histogram,
    handled: Family<Handled, Counter>,
    /// By code, as gRPC numbers them (0 to 16).
    by_code: [OnceLock<Counter>; 17],
}

impl Handles {
    fn of(families: &Families, method: Method) -> Handles {
        Handles {
            started: families.started.get_or_create(&method).clone(),
            in_flight: families.in_flight.get_or_create(&method).clone(),
            seconds: families.seconds.get_or_create(&method).clone(),
            handled: families.handled.clone(),
            by_code: Default::default(),
            method,
        }
    }

    fn handled(&self, code: tonic::Code) -> &Counter {
        self.by_code[(code as usize).min(16)].get_or_init(|| {
            self.handled
                .get_or_create(&Handled {
                    service: self.method.service,
                    method: self.method.method,
                    code: code_name(code),
                })
                .clone()
        })
    }
}

impl RpcMetrics {
    /// Registered with `metrics` under `grpc_server_` or `grpc_client_`;
    /// once per side ([`Metrics::calls`]).
    pub(super) fn new(metrics: &Metrics, side: Side) -> Self {
        let families = Families {
            started: Family::default(),
            handled: Family::default(),
            in_flight: Family::default(),
            seconds: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
        };
        let (prefix, who) = match side {
            Side::Server => ("grpc_server", "served"),
            Side::Client => ("grpc_client", "made"),
        };
        metrics.register(|registry: &mut Registry| {
            let registry = registry.sub_registry_with_prefix(prefix);
            registry.register(
                "started",
                format!("gRPC calls {who}, counted as they start"),
                families.started.clone(),
            );
            registry.register(
                "handled",
                format!("gRPC calls {who} that ended, by status code"),
                families.handled.clone(),
            );
            registry.register(
                "in_flight",
                format!("gRPC calls {who} that have not ended"),
                families.in_flight.clone(),
            );
            registry.register_with_unit(
                "handling",
                format!(
                    "Time from a call {who} to its response headers: the whole call when unary, the opening of a stream"
                ),
                Unit::Seconds,
                families.seconds.clone(),
            );
        });
        Self {
            families,
            handles: (0..METHODS.list.len()).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Counts a call to `path` starting now; the returned guard ends it:
    /// give it the response when one comes ([`Call::answered`]); dropped
    /// without one, the call counts as UNAVAILABLE.
    pub fn begin(&self, path: &str) -> Call {
        let index = index(path);
        let handles = self.handles[index]
            .get_or_init(|| Arc::new(Handles::of(&self.families, METHODS.list[index].clone())))
            .clone();
        handles.started.inc();
        handles.in_flight.inc();
        Call {
            handles,
            started: Instant::now(),
            code: None,
            timed: false,
        }
    }
}

/// One call being counted: ends once, when dropped.
pub struct Call {
    handles: Arc<Handles>,
    started: Instant,
    code: Option<tonic::Code>,
    timed: bool,
}

impl Call {
    /// The response headers are here: the latency is known, and for a
    /// trailers-only answer, the code.
    pub fn answered<B>(mut self, response: http::Response<B>) -> http::Response<Observed<B>> {
        self.timed = true;
        self.handles
            .seconds
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(code) = response.headers().get("grpc-status") {
            self.code = Some(tonic::Code::from_bytes(code.as_bytes()));
        }
        response.map(|body| Observed { body, call: self })
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(if self.timed {
            // The body ended without trailers, or was dropped before.
            tonic::Code::Cancelled
        } else {
            // No response at all: the transport failed.
            tonic::Code::Unavailable
        });
        self.handles.in_flight.dec();
        self.handles.handled(code).inc();
    }
}

/// A response body that reads its trailers' status as they pass.
pub struct Observed<B> {
    body: B,
    call: Call,
}

impl<B: Body + Unpin> Body for Observed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(code) = frame
                .trailers_ref()
                .and_then(|trailers| trailers.get("grpc-status"))
        {
            self.call.code = Some(tonic::Code::from_bytes(code.as_bytes()));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The code's name as gRPC's docs spell it (`OK`, `UNAVAILABLE`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Counts the gRPC calls a server serves; requests that are not gRPC
/// (the JSON API, the console, `/metrics`) pass uncounted, as does every
/// request when metrics are off.
#[derive(Clone, Debug)]
pub struct RpcLayer {
    metrics: Option<RpcMetrics>,
}

impl RpcLayer {
    /// Counting into `metrics`' `grpc_server_*`, when they are on.
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            metrics: metrics.enabled().then(|| metrics.calls(Side::Server)),
        }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// [`RpcLayer`]'s service.
#[derive(Clone, Debug)]
pub struct RpcService<S> {
    inner: S,
    metrics: Option<RpcMetrics>,
}

/// Either a counted gRPC body or another request's body, as it was.
pub enum MaybeObserved<B> {
    /// A gRPC call's, watched for its status.
    Counted(Observed<B>),
    /// Not a gRPC call.
    Plain(B),
}

impl<B: Body + Unpin> Body for MaybeObserved<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            MaybeObserved::Counted(body) => Pin::new(body).poll_frame(cx),
            MaybeObserved::Plain(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MaybeObserved::Counted(body) => body.is_end_stream(),
            MaybeObserved::Plain(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MaybeObserved::Counted(body) => body.size_hint(),
            MaybeObserved::Plain(body) => body.size_hint(),
        }
    }
}

fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

type Answer<ResBody, E> = Result<http::Response<ResBody>, E>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin + Send + 'static,
{
    type Response = http::Response<MaybeObserved<ResBody>>;
    type Error = S::Error;
    /// Uncounted calls take no allocation of their own.
    type Future = Either<
        Map<S::Future, fn(Answer<ResBody, S::Error>) -> Answer<MaybeObserved<ResBody>, S::Error>>,
        BoxFuture<'static, Answer<MaybeObserved<ResBody>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if !is_grpc(&request) || (self.metrics.is_none() && !super::trace::enabled()) {
            let plain: fn(_) -> _ =
                |answer: Answer<ResBody, S::Error>| Ok(answer?.map(MaybeObserved::Plain));
            return Either::Left(self.inner.call(request).map(plain));
        }
        let counted = self
            .metrics
            .as_ref()
            .map(|metrics| metrics.begin(request.uri().path()));
        let span = super::trace::server_span(&request);
        let answer = span.in_scope(|| self.inner.call(request));
        Either::Right(Box::pin(async move {
            let response = answer.instrument(span).await?;
            Ok(match counted {
                Some(call) => call.answered(response).map(MaybeObserved::Counted),
                None => response.map(MaybeObserved::Plain),
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_come_from_the_protos_and_anything_else_is_unknown() {
        let place = method("/shopmesh.shop.v1.OrderService/PlaceOrder");
        assert_eq!(
            (place.service, place.method),
            ("shopmesh.shop.v1.OrderService", "PlaceOrder")
        );
        let health = method("/grpc.health.v1.Health/Check");
        assert_eq!(health.method, "Check");
        assert_eq!(method("/Request/request").service, "Request");
        let unknown = Method {
            service: "unknown",
            method: "unknown",
        };
        assert_eq!(method("/x.Evil/AnyName"), unknown);
        assert_eq!(method("/shopmesh.shop.v1.OrderService/Nope"), unknown);
    }

    #[test]
    fn a_call_counts_once_by_its_code_however_it_ends() {
        let metrics = Metrics::new(true);
        let calls = metrics.calls(Side::Server);
        let place = "/shopmesh.shop.v1.OrderService/PlaceOrder";
        let refused = http::Response::builder()
            .header("grpc-status", "5")
            .body(())
            .unwrap();
        drop(calls.begin(place).answered(refused));
        drop(calls.begin(place).answered(http::Response::new(())));
        drop(calls.begin(place));
        drop(calls.begin("/x.Evil/AnyName"));
        let held = calls.begin(place);
        let text = metrics.encode();
        let labels = r#"service="shopmesh.shop.v1.OrderService",method="PlaceOrder""#;
        for line in [
            format!("shop_mesh_grpc_server_started_total{{{labels}}} 4"),
            format!("shop_mesh_grpc_server_handled_total{{{labels},code=\"NOT_FOUND\"}} 1"),
            // Headers without a status, then the body dropped unread.
            format!("shop_mesh_grpc_server_handled_total{{{labels},code=\"CANCELLED\"}} 1"),
            // No response at all.
            format!("shop_mesh_grpc_server_handled_total{{{labels},code=\"UNAVAILABLE\"}} 1"),
            format!("shop_mesh_grpc_server_in_flight{{{labels}}} 1"),
            format!("shop_mesh_grpc_server_handling_seconds_count{{{labels}}} 2"),
            r#"shop_mesh_grpc_server_started_total{service="unknown",method="unknown"} 1"#.into(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
        drop(held);
        assert!(
            metrics
                .encode()
                .contains(&format!("shop_mesh_grpc_server_in_flight{{{labels}}} 0"))
        );
    }
}
