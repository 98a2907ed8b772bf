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
use std::sync::LazyLock;
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
use tracing::{Instrument, Span};

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

const UNKNOWN: Method = Method {
    service: "unknown",
    method: "unknown",
};

/// Every method of the protos the mesh serves or calls, by path.
static METHODS: LazyLock<HashMap<String, Method>> = LazyLock::new(|| {
    let sets = [
        crate::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = HashMap::new();
    let mut add = |service: &str, method: &str| {
        // Leaked once: a fixed, small set, labelled without a copy per call.
        let labels = Method {
            service: Box::leak(service.to_owned().into_boxed_str()),
            method: Box::leak(method.to_owned().into_boxed_str()),
        };
        methods.insert(format!("/{service}/{method}"), labels);
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

/// The labels of the method at `path`.
pub fn method(path: &str) -> Method {
    METHODS.get(path).cloned().unwrap_or(UNKNOWN)
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
    started: Family<Method, Counter>,
    handled: Family<Handled, Counter>,
    in_flight: Family<Method, Gauge>,
    seconds: Family<Method, Histogram>,
}

impl RpcMetrics {
    /// Registered with `metrics` under `grpc_server_` or `grpc_client_`;
    /// once per side ([`Metrics::calls`]).
    pub(super) fn new(metrics: &Metrics, side: Side) -> Self {
        let this = Self {
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
                this.started.clone(),
            );
            registry.register(
                "handled",
                format!("gRPC calls {who} that ended, by status code"),
                this.handled.clone(),
            );
            registry.register(
                "in_flight",
                format!("gRPC calls {who} that have not ended"),
                this.in_flight.clone(),
            );
            registry.register_with_unit(
                "handling",
                format!(
                    "Time from a call {who} to its response headers: the whole call when unary, the opening of a stream"
                ),
                Unit::Seconds,
                this.seconds.clone(),
            );
        });
        this
    }

    /// Counts a call to `path` starting now; the returned guard ends it:
    /// give it the response when one comes ([`Call::answered`]); dropped
    /// without one, the call counts as UNAVAILABLE.
    pub fn begin(&self, path: &str) -> Call {
        let method = method(path);
        self.started.get_or_create(&method).inc();
        self.in_flight.get_or_create(&method).inc();
        Call {
            metrics: self.clone(),
            method,
            started: Instant::now(),
            code: None,
            timed: false,
        }
    }
}

/// One call being counted: ends once, when dropped.
pub struct Call {
    metrics: RpcMetrics,
    method: Method,
    started: Instant,
    code: Option<tonic::Code>,
    timed: bool,
}

impl Call {
    /// The response headers are here: the latency is known, and for a
    /// trailers-only answer, the code.
    pub fn answered<B>(mut self, response: http::Response<B>) -> http::Response<Observed<B>> {
        self.timed = true;
        self.metrics
            .seconds
            .get_or_create(&self.method)
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
        self.metrics.in_flight.get_or_create(&self.method).dec();
        self.metrics
            .handled
            .get_or_create(&Handled {
                service: self.method.service,
                method: self.method.method,
                code: code_name(code),
            })
            .inc();
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
        let path = request.uri().path();
        let counted = self.metrics.as_ref().map(|metrics| metrics.begin(path));
        let span = super::trace::server_span(&request, &method(path)).unwrap_or_else(Span::none);
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
        assert_eq!(method("/x.Evil/AnyName"), UNKNOWN);
        assert_eq!(method("/shopmesh.shop.v1.OrderService/Nope"), UNKNOWN);
    }
}
