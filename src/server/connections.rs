//! The `[connections]` section: how every connection of the mesh is held,
//! at both ends. Servers and clients read their keepalives and Nagle from
//! here, so the two sides cannot drift apart.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tonic::transport::Endpoint;

/// The `[connections]` settings, held by servers and clients alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Connections {
    /// A connection that sends nothing for this long after it opened is
    /// closed: gRPC clients send their preface at once, so silence means
    /// a scanner, a half-open peer or a file-descriptor exhaustion attack.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Connections one port holds at once, silent ones included; further
    /// clients wait in the kernel's backlog until one closes.
    pub max_per_port: usize,
    /// How often an idle HTTP/2 connection is pinged, so a peer that
    /// vanished without a FIN is noticed by either end.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection
    /// is dropped.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
    /// How long an idle socket waits before its first TCP keepalive probe,
    /// so the kernel too drops a connection whose peer is gone.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// Nagle off: a small answer must not wait for the peer's ACK.
    pub tcp_nodelay: bool,
    /// The `[connections.tls]` section: TLS on every port, and on every
    /// call to one.
    pub tls: super::Tls,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            first_byte_timeout: Duration::from_secs(10),
            max_per_port: 10_000,
            http2_keepalive_interval: Duration::from_secs(10),
            http2_keepalive_timeout: Duration::from_secs(5),
            tcp_keepalive: Duration::from_secs(10),
            tcp_nodelay: true,
            tls: super::Tls::default(),
        }
    }
}

impl Connections {
    /// A client endpoint to `uri` with these settings, giving up a connect
    /// after `connect_timeout` (the caller's, from `[discovery]`).
    pub fn endpoint(
        &self,
        uri: String,
        connect_timeout: Duration,
    ) -> Result<Endpoint, tonic::transport::Error> {
        Ok(Endpoint::from_shared(uri)?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(self.tcp_nodelay)
            .tcp_keepalive(Some(self.tcp_keepalive))
            .http2_keep_alive_interval(self.http2_keepalive_interval)
            .keep_alive_timeout(self.http2_keepalive_timeout)
            .keep_alive_while_idle(true))
    }

    /// The server side of [`Connections::endpoint`]: tonic sets these
    /// itself only on sockets it accepts, and ours are accepted by
    /// [`super::accept`].
    pub(super) fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(self.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(self.http2_keepalive_timeout))
    }

    /// Nagle and TCP keepalive on an accepted socket. Either failing only
    /// costs latency or a later notice, so it is logged, not fatal.
    pub(super) fn configure(&self, stream: &TcpStream) {
        let keepalive = socket2::TcpKeepalive::new().with_time(self.tcp_keepalive);
        let set = stream
            .set_nodelay(self.tcp_nodelay)
            .and_then(|()| socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive));
        if let Err(err) = set {
            tracing::debug!(%err, "cannot set TCP_NODELAY or keepalive on a connection");
        }
    }
}
