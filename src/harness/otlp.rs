//! An OTLP/gRPC trace collector in this process: it keeps every span sent
//! to it, for the tests to read a trace back; or counts them alone, for
//! the benchmarks to measure tracing against a collector that answers at
//! once and does not grow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use parking_lot::Mutex;
use tokio_util::sync::{CancellationToken, DropGuard};

/// A span as the collector received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedSpan {
    /// The trace's id, in hex.
    pub trace_id: String,
    /// This span's id, in hex.
    pub span_id: String,
    /// Its parent's id, in hex; empty for a trace's root.
    pub parent_span_id: String,
    /// `shopmesh.shop.v1.OrderService/PlaceOrder`, `attempt`, ...
    pub name: String,
    /// Server, client, internal, as OTLP numbers them.
    pub kind: i32,
}

/// A collector serving on a loopback port until dropped.
pub struct Collector {
    addr: SocketAddr,
    received: Arc<Received>,
    _stop: DropGuard,
}

/// What the collector was sent.
#[derive(Default)]
struct Received {
    /// Whether spans are kept, or only counted.
    keep: bool,
    spans: Mutex<Vec<CollectedSpan>>,
    count: AtomicU64,
}

impl Collector {
    /// Serves on a free loopback port, keeping every span.
    pub async fn start() -> anyhow::Result<Collector> {
        Self::serve(true).await
    }

    /// Serves on a free loopback port, counting spans and keeping none.
    pub async fn counting() -> anyhow::Result<Collector> {
        Self::serve(false).await
    }

    async fn serve(keep: bool) -> anyhow::Result<Collector> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Received {
            keep,
            ..Received::default()
        });
        let stop = CancellationToken::new();
        let service =
            TraceServiceServer::new(Keep(received.clone())).max_decoding_message_size(64 << 20);
        let stopped = stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stopped.cancelled_owned(),
                ),
        );
        Ok(Collector {
            addr,
            received,
            _stop: stop.drop_guard(),
        })
    }

    /// Where exporters send: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far (none when it only counts).
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.received.spans.lock().clone()
    }

    /// How many spans it has received.
    pub fn received(&self) -> u64 {
        self.received.count.load(Ordering::Relaxed)
    }
}

struct Keep(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Keep {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans);
        if !self.0.keep {
            self.0
                .count
                .fetch_add(spans.count() as u64, Ordering::Relaxed);
            return Ok(tonic::Response::new(ExportTraceServiceResponse::default()));
        }
        let spans: Vec<CollectedSpan> = spans
            .map(|span| CollectedSpan {
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                name: span.name,
                kind: span.kind,
            })
            .collect();
        self.0
            .count
            .fetch_add(spans.len() as u64, Ordering::Relaxed);
        self.0.spans.lock().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
