//! The connections a port accepts: a bounded number open at once, each
//! closed unless it speaks within a first-byte timeout, and, when accepting
//! fails (the process is out of file descriptors), a pause that grows and a
//! warning now and then instead of a tight loop of failing accepts. On a
//! TLS port the handshake happens here too, within the same timeout, so a
//! plaintext client is dropped before tonic sees it.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::Connections;

/// How often a failure that lasts is logged again.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Connections that have spoken, for tonic to serve. The accept loop runs
/// as its own task and stops, closing the listener, once tonic drops the
/// stream (which it does when it stops serving).
pub fn incoming(
    listener: TcpListener,
    settings: &Connections,
    tls: Option<TlsAcceptor>,
) -> ReceiverStream<Result<Connection, Infallible>> {
    let (ready, stream) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, settings.clone(), tls, ready));
    ReceiverStream::new(stream)
}

type Ready = mpsc::Sender<Result<Connection, Infallible>>;

async fn accept_loop(
    listener: TcpListener,
    settings: Connections,
    tls: Option<TlsAcceptor>,
    ready: Ready,
) {
    let open = Arc::new(Semaphore::new(settings.max_per_port));
    let mut full = Reporter::default();
    let mut failing = Failing::default();
    loop {
        let permit = match open.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if full.due() {
                    tracing::warn!(
                        max_per_port = settings.max_per_port,
                        "this port holds as many connections as connections.max_per_port allows; new ones wait until one closes"
                    );
                }
                tokio::select! {
                    permit = open.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    _ = ready.closed() => return,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = ready.closed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                failing.over();
                settings.configure(&stream);
                tokio::spawn(await_first_byte(
                    stream,
                    peer,
                    permit,
                    (settings.first_byte_timeout, tls.clone()),
                    ready.clone(),
                ));
            }
            // The peer gave up between its SYN and our accept; the next
            // one is unaffected.
            Err(err) if is_peer_error(&err) => {}
            Err(err) => {
                let pause = failing.failed(&err);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = ready.closed() => return,
                }
            }
        }
    }
}

fn is_peer_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Hands the connection to tonic once it has something to read (on a TLS
/// port: once its handshake is done), or drops it (closing it, and
/// freeing its place under the cap) when it stays silent, or has not
/// finished its handshake, past `timeout`. Until then tonic has spent
/// nothing on it.
async fn await_first_byte(
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    (timeout, tls): (Duration, Option<TlsAcceptor>),
    ready: Ready,
) {
    let opened = async {
        let mut byte = [0u8; 1];
        match stream.peek(&mut byte).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(err) => return Err(err),
        }
        let info = stream.connect_info();
        let stream = match tls {
            None => Stream::Plain(stream),
            Some(tls) => Stream::Tls(Box::new(tls.accept(stream).await?)),
        };
        Ok(Some(Connection {
            stream,
            info,
            _permit: permit,
        }))
    };
    let opened = tokio::select! {
        opened = tokio::time::timeout(timeout, opened) => opened,
        _ = ready.closed() => return,
    };
    match opened {
        Ok(Ok(Some(connection))) => {
            let _ = ready.send(Ok(connection)).await;
        }
        Ok(Ok(None)) => {}
        // A plaintext client on a TLS port ends here, its bytes not a
        // handshake.
        Ok(Err(err)) => tracing::debug!(%peer, %err, "a connection failed before it was served"),
        Err(_) => tracing::debug!(%peer, ?timeout, "closed a connection that did not open in time"),
    }
}

/// What an accepted connection carries.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection holding its place under the port's cap for as
/// long as it is open.
pub struct Connection {
    stream: Stream,
    info: TcpConnectInfo,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

/// Runs `$call` on whichever stream the connection carries.
macro_rules! on_stream {
    ($self:ident, $stream:ident => $call:expr) => {
        match &mut $self.stream {
            Stream::Plain($stream) => $call,
            Stream::Tls($stream) => $call,
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        on_stream!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Says whether a condition that may last (a full port, failing accepts)
/// is worth a log line now: the first time, then every [`REPORT_EVERY`].
#[derive(Default)]
struct Reporter {
    last: Option<Instant>,
}

impl Reporter {
    fn due(&mut self) -> bool {
        let now = Instant::now();
        let due = self.last.is_none_or(|last| now - last >= REPORT_EVERY);
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// A run of failed accepts: how long to pause before the next attempt
/// (growing, so a process out of file descriptors is not kept busy
/// failing) and what to log.
struct Failing {
    pauses: backon::ExponentialBackoff,
    failures: u64,
    report: Reporter,
}

impl Default for Failing {
    fn default() -> Self {
        Self {
            pauses: Self::pauses(),
            failures: 0,
            report: Reporter::default(),
        }
    }
}

impl Failing {
    /// Short at first (one descriptor freed is enough to go on), at most a
    /// second, so recovery is noticed soon after the load goes.
    fn pauses() -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(5))
            .with_max_delay(Duration::from_secs(1))
            .with_jitter()
            .without_max_times()
            .build()
    }

    fn failed(&mut self, err: &io::Error) -> Duration {
        self.failures += 1;
        let pause = self.pauses.next().unwrap_or(Duration::from_secs(1));
        if self.report.due() {
            tracing::warn!(
                %err,
                failures = self.failures,
                ?pause,
                "cannot accept connections; pausing accepts (if the error is \"too many open files\", raise the file limit, ulimit -n, or lower connections.max_per_port)"
            );
        }
        pause
    }

    /// An accept succeeded: the run, if there was one, is over.
    fn over(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "accepting connections again");
            *self = Self::default();
        }
    }
}
