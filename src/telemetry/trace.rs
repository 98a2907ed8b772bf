//! Traces of calls across the mesh, exported over OTLP when an endpoint is
//! configured (`telemetry.otlp_endpoint`): a span for each RPC served and
//! made (its attempts and retries as children), and for each database
//! transaction, carried from service to service as W3C trace context
//! (`traceparent`) in the gRPC metadata.
//!
//! Off (no endpoint), no span of these is made: each place checks
//! [`enabled`], one atomic load, and the subscriber's OpenTelemetry layer
//! sees nothing. The layer is installed by [`super::init`] either way,
//! over a span processor that an exporter can be put into later
//! ([`export`]), so a process (a bench, a test) can start exporting
//! without a second subscriber.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanProcessor};
use parking_lot::RwLock;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Whether spans are being exported: read before making any.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Where [`export`] puts an exporter: the processor inside the provider
/// that the subscriber's layer traces with.
static SWITCH: OnceLock<Arc<Switch>> = OnceLock::new();

/// Whether calls are traced now.
#[inline]
pub fn enabled() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The subscriber's OpenTelemetry layer, tracing into a provider whose
/// exporter [`export`] sets. Made once per process.
pub(super) fn layer<S>()
-> Option<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let switch = Arc::new(Switch {
        inner: RwLock::new(None),
        resource: Resource::builder().with_service_name("shop-mesh").build(),
    });
    SWITCH.set(switch.clone()).ok()?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Shared(switch))
        .build();
    Some(tracing_opentelemetry::layer().with_tracer(provider.tracer("shop-mesh")))
}

/// Exports every span from now on to the OTLP/gRPC collector at
/// `endpoint` (`http://collector:4317`), until the answer is dropped or
/// [`Exporting::finish`]ed. Must be called within the tokio runtime, after
/// [`super::init`].
pub fn export(endpoint: &str) -> anyhow::Result<Exporting> {
    let switch = SWITCH.get().ok_or_else(|| {
        anyhow::anyhow!(
            "tracing is not set up: the process's subscriber was not installed by telemetry::init"
        )
    })?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|err| anyhow::anyhow!("cannot export traces to {endpoint}: {err}"))?;
    let mut processor = BatchSpanProcessor::builder(exporter).build();
    processor.set_resource(&switch.resource);
    if let Some(previous) = switch.inner.write().replace(processor) {
        let _ = previous.shutdown();
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    EXPORTING.store(true, Ordering::Relaxed);
    tracing::info!(endpoint, "exporting traces over OTLP");
    Ok(Exporting {
        switch: switch.clone(),
    })
}

/// Spans being exported; dropped, the export stops (what is queued is
/// sent on a thread of its own).
pub struct Exporting {
    switch: Arc<Switch>,
}

impl Exporting {
    /// Sends every span ended so far, waiting for the collector's answer.
    pub async fn flush(&self) {
        let switch = self.switch.clone();
        // The batch processor blocks; its exporter needs the runtime.
        let _ = tokio::task::spawn_blocking(move || switch.force_flush()).await;
    }

    /// Flushes and stops exporting.
    pub async fn finish(self) {
        self.flush().await;
    }
}

impl Drop for Exporting {
    fn drop(&mut self) {
        EXPORTING.store(false, Ordering::Relaxed);
        if let Some(processor) = self.switch.inner.write().take() {
            std::thread::spawn(move || processor.shutdown());
        }
    }
}

/// The provider's one span processor: whichever exporter is set, or none.
#[derive(Debug)]
struct Switch {
    inner: RwLock<Option<BatchSpanProcessor>>,
    resource: Resource,
}

#[derive(Debug)]
struct Shared(Arc<Switch>);

impl SpanProcessor for Shared {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        if let Some(inner) = &*self.0.inner.read() {
            inner.on_start(span, cx);
        }
    }

    fn on_end(&self, span: SpanData) {
        if let Some(inner) = &*self.0.inner.read() {
            inner.on_end(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        match self.0.inner.write().take() {
            Some(inner) => inner.shutdown_with_timeout(timeout),
            None => Ok(()),
        }
    }
}

impl Switch {
    fn force_flush(&self) -> OTelSdkResult {
        match &*self.inner.read() {
            Some(inner) => inner.force_flush(),
            None => Ok(()),
        }
    }
}

/// The span of a call this process serves, continuing the caller's trace
/// when its metadata carries one; `Span::none()` while tracing is off.
pub fn server_span<B>(request: &http::Request<B>) -> Span {
    if !enabled() {
        return Span::none();
    }
    let method = &super::rpc::method(request.uri().path());
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&Headers(request.headers()))
    });
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %Name(method),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = method.service,
        rpc.method = method.method,
        trace_id = tracing::field::Empty,
    );
    let _ = span.set_parent(parent);
    record_trace_id(&span);
    span
}

/// The span of a call this process makes, a child of the current one,
/// whose context `request` now carries; `Span::none()` while tracing is
/// off.
pub fn client_span<B>(request: &mut http::Request<B>, target: &str) -> Span {
    if !enabled() {
        return Span::none();
    }
    let method = super::rpc::method(request.uri().path());
    let span = tracing::info_span!(
        "grpc.client",
        otel.name = %Name(&method),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = method.service,
        rpc.method = method.method,
        peer.service = target,
        trace_id = tracing::field::Empty,
    );
    record_trace_id(&span);
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeadersMut(request.headers_mut()))
    });
    span
}

/// The span of one attempt of a call on one endpoint (the second is a
/// retry); `Span::none()` while tracing is off.
pub fn attempt_span(endpoint: std::net::SocketAddr, attempt: u32) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        "attempt",
        otel.name = "attempt",
        server.address = %endpoint,
        attempt,
    )
}

/// The span of a database transaction (`operation`: `orders.place`);
/// `Span::none()` while tracing is off.
pub fn transaction_span(operation: &'static str) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        "db.transaction",
        otel.name = operation,
        otel.kind = "client",
        db.operation = operation,
    )
}

/// Puts the span's trace id among its fields, so every log line inside it
/// carries it.
fn record_trace_id(span: &Span) {
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// `service/method`, as OpenTelemetry names an RPC span.
struct Name<'a>(&'a super::rpc::Method);

impl std::fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0.service, self.0.method)
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
