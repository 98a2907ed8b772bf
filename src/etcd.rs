//! A small typed client of etcd's v3 API, the foundation of the
//! registry's etcd store: reads, writes, transactions, leases and watches
//! against every member given, with etcd's types kept inside (callers see
//! [`Kv`], [`Event`], [`Txn`], [`Error`]).
//!
//! Every call carries `hasleader: true`, so a member cut off from its
//! quorum refuses at once instead of holding the call until an election
//! that may never come; the client then tries the next member.
//! Revisions are cluster-wide: any member's header revision orders
//! against any other's.

mod txn;
mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::pb::etcd as pb;
use crate::pb::etcd::cluster_client::ClusterClient;
use crate::pb::etcd::kv_client::KvClient;
use crate::pb::etcd::lease_client::LeaseClient;
use crate::pb::etcd::maintenance_client::MaintenanceClient;
use crate::pb::etcd::watch_client::WatchClient;
use crate::server::Connections;

pub use txn::{Cmp, Compare, Op, OpResult, Txn, TxnResult};
pub use watch::{Watch, WatchBatch};

/// The most operations etcd takes in one transaction (its
/// `--max-txn-ops` default); a larger one is refused whole, so a writer
/// must split its batches at this size.
pub const MAX_TXN_OPS: usize = 128;

/// How long a unary call may take unless [`Etcd::with_request_timeout`]
/// says otherwise: long enough for an election (1 s by etcd's default)
/// and etcd's own wait for it. A store whose leases are shorter than a
/// few of these should set a shorter one, or a call to a silent member
/// outlasts the lease it was meant to keep.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Keys a range read asks for at once: pages keep every answer under
/// gRPC's message limit however large the prefix grows.
const PAGE: i64 = 1000;

type Chan = InterceptedService<Channel, HasLeader>;

/// What [`Error`] says went wrong, for the caller's retry decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No member answered, or none with a leader, or the call timed out:
    /// the cluster may come back, so the call may be retried. A write
    /// that timed out may still have been applied: a retry must be a
    /// compare-and-swap, or the write one that may be repeated.
    Unavailable,
    /// The lease named is gone (expired or revoked): retrying will not
    /// help, a new lease must be granted.
    LeaseNotFound,
    /// The revision asked for has been compacted away: read again at the
    /// current revision.
    Compacted,
    /// Anything else: etcd refused the request, or answered what this
    /// client does not understand.
    Failed,
}

/// A failed etcd call: which cluster, which operation, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("etcd at {endpoints}: {op}: {message}")]
pub struct Error {
    /// The endpoints of the cluster, comma-separated.
    pub endpoints: Arc<str>,
    /// The operation that failed (`put`, `watch`, ...).
    pub op: &'static str,
    /// Whether it is worth retrying.
    pub kind: ErrorKind,
    /// What etcd or the transport said.
    pub message: String,
}

impl Error {
    /// Whether the cluster could not be reached or had no quorum, so the
    /// same call may succeed later.
    pub fn is_unavailable(&self) -> bool {
        self.kind == ErrorKind::Unavailable
    }

    fn from_status(endpoints: &Arc<str>, op: &'static str, status: &tonic::Status) -> Error {
        let message = status.message();
        let kind = match status.code() {
            // Cancelled is how tonic reports its own deadline expiring.
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ErrorKind::Unavailable,
            Code::NotFound if message.contains("lease not found") => ErrorKind::LeaseNotFound,
            Code::OutOfRange if message.contains("compacted") => ErrorKind::Compacted,
            _ => ErrorKind::Failed,
        };
        Error {
            endpoints: endpoints.clone(),
            op,
            kind,
            message: format!("{:?}: {message}", status.code()),
        }
    }

    fn new(endpoints: &Arc<str>, op: &'static str, kind: ErrorKind, message: String) -> Error {
        Error {
            endpoints: endpoints.clone(),
            op,
            kind,
            message,
        }
    }
}

/// What every etcd call returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A lease's id as etcd numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

/// A lease just granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its id, for puts and keepalives.
    pub id: LeaseId,
    /// The time to live etcd chose (at least the asked, at least its
    /// minimum), in whole seconds.
    pub ttl: Duration,
}

/// A key and its value as etcd stores them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty in a delete event).
    pub value: Vec<u8>,
    /// The revision that created the key (since it last did not exist).
    pub create_revision: i64,
    /// The revision of its last change; a delete event's is the delete's.
    pub mod_revision: i64,
    /// Changes since it was created (1 on creation, 0 once deleted).
    pub version: i64,
    /// The lease it is attached to, if any: the key goes when the lease
    /// does.
    pub lease: Option<LeaseId>,
}

impl Kv {
    /// The key as text, when it is UTF-8 (the store's keys all are).
    pub fn key_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.key).ok()
    }

    fn from_pb(kv: pb::KeyValue) -> Kv {
        Kv {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: (kv.lease != 0).then_some(LeaseId(kv.lease)),
        }
    }
}

/// What an event did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or changed.
    Put,
    /// The key was deleted, by a delete or by its lease ending.
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change (for a delete, only the key and the
    /// delete's revision).
    pub kv: Kv,
    /// The key before the change, when the watch asked for it and it had
    /// not been compacted.
    pub prev: Option<Kv>,
}

impl Event {
    /// The revision of the change.
    pub fn revision(&self) -> i64 {
        self.kv.mod_revision
    }
}

/// A member of the cluster as it lists itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: u64,
    /// Its name (empty until it has started).
    pub name: String,
    /// Where its peers reach it.
    pub peer_urls: Vec<String>,
    /// Where clients reach it (empty until it has started).
    pub client_urls: Vec<String>,
    /// A learner does not vote.
    pub is_learner: bool,
}

/// What the member that answered says of itself and the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// The answering member's id.
    pub member_id: u64,
    /// The leader it follows, 0 when it knows none.
    pub leader_id: u64,
    /// The store's revision as it has applied it.
    pub revision: i64,
    /// Its raft term.
    pub raft_term: u64,
    /// Its etcd version.
    pub version: String,
}

/// Adds `hasleader: true` to every call.
#[derive(Clone)]
struct HasLeader;

impl Interceptor for HasLeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("hasleader", MetadataValue::from_static("true"));
        Ok(request)
    }
}

/// The clients of one member.
#[derive(Clone)]
struct Clients {
    kv: KvClient<Chan>,
    watch: WatchClient<Chan>,
    lease: LeaseClient<Chan>,
    cluster: ClusterClient<Chan>,
    maintenance: MaintenanceClient<Chan>,
}

/// A client of one etcd cluster; clones share its connections.
///
/// Calls go to one member at a time and move on to the next when it is
/// unreachable or has no leader. A channel balanced over every member
/// would not do: its balancer keeps picking a dead member (the failed
/// connect shows only on the call), so a share of every call would fail
/// for as long as a member is down.
#[derive(Clone)]
pub struct Etcd {
    members: Arc<[Clients]>,
    /// The member calls go to first: the last that answered.
    current: Arc<AtomicUsize>,
    endpoints: Arc<str>,
    request_timeout: Duration,
}

impl Etcd {
    /// A client of the cluster at `endpoints` (`host:port` or URLs), with
    /// the default `[connections]` settings. It connects lazily: an
    /// unreachable cluster shows on the first call, as
    /// [`ErrorKind::Unavailable`], so a store can start before etcd does.
    pub fn connect(endpoints: &[String], connect_timeout: Duration) -> Result<Etcd> {
        Self::connect_with(endpoints, &Connections::default(), connect_timeout)
    }

    /// [`Etcd::connect`] with the caller's `[connections]` settings (its
    /// keepalives notice a member that vanished without a FIN).
    pub fn connect_with(
        endpoints: &[String],
        connections: &Connections,
        connect_timeout: Duration,
    ) -> Result<Etcd> {
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let named: Arc<str> = urls.join(",").into();
        if urls.is_empty() {
            return Err(Error::new(
                &named,
                "connect",
                ErrorKind::Failed,
                "no endpoints given".into(),
            ));
        }
        let members = urls
            .iter()
            .map(|url| {
                let channel = connections
                    .endpoint(url.clone(), connect_timeout)
                    .map_err(|err| {
                        Error::new(
                            &named,
                            "connect",
                            ErrorKind::Failed,
                            format!("bad endpoint {url:?}: {err}"),
                        )
                    })?
                    .connect_lazy();
                Ok(Clients {
                    // etcd bounds what it answers (its request limit
                    // bounds each value); a page of large values, or a
                    // watch answer of many changes, may pass tonic's
                    // default 4 MiB.
                    kv: KvClient::with_interceptor(channel.clone(), HasLeader)
                        .max_decoding_message_size(usize::MAX),
                    watch: WatchClient::with_interceptor(channel.clone(), HasLeader)
                        .max_decoding_message_size(usize::MAX),
                    lease: LeaseClient::with_interceptor(channel.clone(), HasLeader),
                    cluster: ClusterClient::with_interceptor(channel.clone(), HasLeader),
                    maintenance: MaintenanceClient::with_interceptor(channel, HasLeader),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Spread clients over the members from the start.
        let first = rand::random_range(0..members.len());
        Ok(Etcd {
            members: members.into(),
            current: Arc::new(AtomicUsize::new(first)),
            endpoints: named,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// The same client with another deadline for unary calls (watches
    /// and keepalive streams have none: they are meant to last).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Etcd {
        self.request_timeout = timeout;
        self
    }

    /// The endpoints, comma-separated, as errors name them.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.request_timeout);
        request
    }

    /// Runs `call` on the current member, then on each other in turn
    /// while the member failed to answer and another try is safe: always
    /// for a `read` (it changes nothing), for a write only when the
    /// member surely did not apply it (it could not be reached, or had no
    /// leader); a write that timed out may have been applied, so it is
    /// the caller's to check. Any such failure moves later calls to the
    /// next member. A read may so take up to one request timeout per
    /// member.
    async fn call<T, F, Fut>(&self, op: &'static str, read: bool, call: F) -> Result<T>
    where
        F: Fn(Clients) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let count = self.members.len();
        let first = self.current.load(Ordering::Relaxed) % count;
        let mut tried = 0;
        loop {
            let at = (first + tried) % count;
            // grpc-timeout bounds the call only where the member enforces
            // it; a member that stopped answering must be bounded here.
            let answered =
                tokio::time::timeout(self.request_timeout, call(self.members[at].clone()));
            let status = match answered.await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::deadline_exceeded(format!(
                    "no answer within {:?}",
                    self.request_timeout
                )),
            };
            // Cancelled is how tonic reports its own deadline expiring.
            if !matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
            ) {
                return Err(Error::from_status(&self.endpoints, op, &status));
            }
            let _ = self.current.compare_exchange(
                at,
                (at + 1) % count,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            tried += 1;
            if tried == count || !(read || not_applied(&status)) {
                return Err(Error::from_status(&self.endpoints, op, &status));
            }
        }
    }

    /// The key's current value, if it exists.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Kv>> {
        let request = pb::RangeRequest {
            key: key.as_ref().to_vec(),
            ..Default::default()
        };
        let response = self
            .call("get", true, |mut c| {
                let request = self.request(request.clone());
                async move { c.kv.range(request).await }
            })
            .await?
            .into_inner();
        Ok(response.kvs.into_iter().next().map(Kv::from_pb))
    }

    /// Every key under `prefix`, in key order, and the revision they were
    /// read at: one consistent snapshot however many pages it took, so a
    /// watch from `revision + 1` misses nothing and repeats nothing.
    pub async fn get_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<(Vec<Kv>, i64)> {
        let prefix = prefix.as_ref();
        let range_end = prefix_end(prefix);
        let mut kvs = Vec::new();
        let mut key = prefix.to_vec();
        let mut revision = 0;
        loop {
            let request = pb::RangeRequest {
                key,
                range_end: range_end.clone(),
                limit: PAGE,
                revision,
                ..Default::default()
            };
            let response = self
                .call("get prefix", true, |mut c| {
                    let request = self.request(request.clone());
                    async move { c.kv.range(request).await }
                })
                .await?
                .into_inner();
            if revision == 0 {
                revision = header_revision(response.header.as_ref());
            }
            let Some(last) = response.kvs.last() else {
                break;
            };
            // The next page starts just after the last key read.
            key = last.key.iter().copied().chain([0]).collect();
            kvs.extend(response.kvs.into_iter().map(Kv::from_pb));
            if !response.more {
                break;
            }
        }
        Ok((kvs, revision))
    }

    /// Sets `key` to `value`, attached to `lease` if given; the revision
    /// of the write. A lease that is gone fails with
    /// [`ErrorKind::LeaseNotFound`].
    pub async fn put(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        lease: Option<LeaseId>,
    ) -> Result<i64> {
        let request = pb::PutRequest {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            lease: lease.map_or(0, |l| l.0),
            prev_kv: false,
        };
        let response = self
            .call("put", false, |mut c| {
                let request = self.request(request.clone());
                async move { c.kv.put(request).await }
            })
            .await?
            .into_inner();
        Ok(header_revision(response.header.as_ref()))
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.delete_range("delete", key.as_ref().to_vec(), Vec::new())
            .await
            .map(|deleted| deleted > 0)
    }

    /// Deletes every key under `prefix`; how many there were.
    pub async fn delete_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<i64> {
        let prefix = prefix.as_ref();
        self.delete_range("delete prefix", prefix.to_vec(), prefix_end(prefix))
            .await
    }

    async fn delete_range(
        &self,
        op: &'static str,
        key: Vec<u8>,
        range_end: Vec<u8>,
    ) -> Result<i64> {
        let request = pb::DeleteRangeRequest {
            key,
            range_end,
            prev_kv: false,
        };
        let response = self
            .call(op, false, |mut c| {
                let request = self.request(request.clone());
                async move { c.kv.delete_range(request).await }
            })
            .await?
            .into_inner();
        Ok(response.deleted)
    }

    /// Runs `txn` atomically: its success operations when every compare
    /// holds, its failure operations otherwise.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let request = txn.into_pb();
        let response = self
            .call("txn", false, |mut c| {
                let request = self.request(request.clone());
                async move { c.kv.txn(request).await }
            })
            .await?
            .into_inner();
        Ok(TxnResult::from_pb(response))
    }

    /// Forgets every revision before `revision` (on every member, once
    /// applied): watches and reads from before it then report
    /// [`ErrorKind::Compacted`] / [`WatchBatch::Compacted`].
    pub async fn compact(&self, revision: i64) -> Result<()> {
        let request = pb::CompactionRequest {
            revision,
            physical: true,
        };
        // Compacting twice to the same revision changes nothing more.
        self.call("compact", true, |mut c| {
            let request = self.request(request);
            async move { c.kv.compact(request).await }
        })
        .await?;
        Ok(())
    }

    /// A lease of at least `ttl` (etcd rounds up to whole seconds and to
    /// its minimum, 2 s in 3.4).
    pub async fn lease_grant(&self, ttl: Duration) -> Result<Lease> {
        self.grant(LeaseId(0), ttl).await
    }

    /// A lease of at least `ttl` under the id `id` (positive), for a
    /// caller that derives lease ids from its own; an id etcd already has
    /// fails with [`ErrorKind::Failed`].
    pub async fn lease_grant_id(&self, id: LeaseId, ttl: Duration) -> Result<Lease> {
        self.grant(id, ttl).await
    }

    async fn grant(&self, id: LeaseId, ttl: Duration) -> Result<Lease> {
        let request = pb::LeaseGrantRequest {
            ttl: ttl.as_secs_f64().ceil() as i64,
            id: id.0,
        };
        // A lease granted twice costs only a lease that expires unused.
        let response = self
            .call("lease grant", true, |mut c| {
                let request = self.request(request);
                async move { c.lease.lease_grant(request).await }
            })
            .await?
            .into_inner();
        if !response.error.is_empty() {
            return Err(Error::new(
                &self.endpoints,
                "lease grant",
                ErrorKind::Failed,
                response.error,
            ));
        }
        Ok(Lease {
            id: LeaseId(response.id),
            ttl: Duration::from_secs(response.ttl.max(0) as u64),
        })
    }

    /// Ends `lease` now, deleting its keys (one revision, one delete
    /// event each). A lease already gone fails with
    /// [`ErrorKind::LeaseNotFound`].
    pub async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        self.call("lease revoke", false, |mut c| {
            let request = self.request(pb::LeaseRevokeRequest { id: lease.0 });
            async move { c.lease.lease_revoke(request).await }
        })
        .await?;
        Ok(())
    }

    /// The lease's remaining time to live, or None when it is gone.
    pub async fn lease_ttl(&self, lease: LeaseId) -> Result<Option<Duration>> {
        let request = pb::LeaseTimeToLiveRequest {
            id: lease.0,
            keys: false,
        };
        let response = self
            .call("lease ttl", true, |mut c| {
                let request = self.request(request);
                async move { c.lease.lease_time_to_live(request).await }
            })
            .await?
            .into_inner();
        // etcd answers -1 for a lease it does not know.
        Ok((response.ttl >= 0).then(|| Duration::from_secs(response.ttl as u64)))
    }

    /// A keepalive for `lease`: each [`KeepAlive::beat`] renews it once.
    /// Nothing is sent until the first beat.
    pub fn lease_keepalive(&self, lease: LeaseId) -> KeepAlive {
        KeepAlive {
            id: lease,
            etcd: self.clone(),
            stream: None,
        }
    }

    /// Watches every key under `prefix` from `start_revision` (inclusive;
    /// 0 for "from now"), each event with the key's previous value when
    /// `prev_kv`. Returns once etcd has created the watch, so whatever
    /// happens after the call is seen.
    pub async fn watch_prefix(
        &self,
        prefix: impl AsRef<[u8]>,
        start_revision: i64,
        prev_kv: bool,
    ) -> Result<Watch> {
        let prefix = prefix.as_ref();
        let create = pb::WatchCreateRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            start_revision,
            progress_notify: true,
            prev_kv,
            watch_id: 0,
        };
        let count = self.members.len();
        let first = self.current.load(Ordering::Relaxed) % count;
        let mut tried = 0;
        loop {
            let at = (first + tried) % count;
            let started = Watch::start(
                self.members[at].watch.clone(),
                create.clone(),
                self.endpoints.clone(),
                self.request_timeout,
            )
            .await;
            match started {
                Err(err) if err.is_unavailable() => {
                    let _ = self.current.compare_exchange(
                        at,
                        (at + 1) % count,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    tried += 1;
                    if tried == count {
                        return Err(err);
                    }
                }
                started => return started,
            }
        }
    }

    /// The cluster's members.
    pub async fn member_list(&self) -> Result<Vec<Member>> {
        let response = self
            .call("member list", true, |mut c| {
                let request = self.request(pb::MemberListRequest {});
                async move { c.cluster.member_list(request).await }
            })
            .await?
            .into_inner();
        Ok(response
            .members
            .into_iter()
            .map(|m| Member {
                id: m.id,
                name: m.name,
                peer_urls: m.peer_ur_ls,
                client_urls: m.client_ur_ls,
                is_learner: m.is_learner,
            })
            .collect())
    }

    /// The status of whichever member answers (with one endpoint, that
    /// member's): its id, the leader it knows, the revision it applied.
    pub async fn status(&self) -> Result<MemberStatus> {
        let response = self
            .call("status", true, |mut c| {
                let request = self.request(pb::StatusRequest {});
                async move { c.maintenance.status(request).await }
            })
            .await?
            .into_inner();
        let header = response.header.unwrap_or_default();
        Ok(MemberStatus {
            member_id: header.member_id,
            leader_id: response.leader,
            revision: header.revision,
            raft_term: response.raft_term,
            version: response.version,
        })
    }
}

/// Whether a member surely did not apply the request it refused: it was
/// never reached, or it refused for want of a leader before proposing.
fn not_applied(status: &tonic::Status) -> bool {
    if status.code() != Code::Unavailable {
        return false;
    }
    if status.message().contains("no leader") {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// One lease's keepalive: one stream serves every beat, as etcd expects,
/// and a broken one is replaced on the next beat.
pub struct KeepAlive {
    id: LeaseId,
    etcd: Etcd,
    stream: Option<KeepAliveStream>,
}

struct KeepAliveStream {
    requests: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    responses: tonic::Streaming<pb::LeaseKeepAliveResponse>,
}

impl KeepAlive {
    /// The lease it renews.
    pub fn lease(&self) -> LeaseId {
        self.id
    }

    /// Renews the lease: its new time to live, or None when the lease is
    /// gone (etcd answers TTL 0 rather than an error), after which its
    /// keys are gone too and a new lease must be granted. An error means
    /// the stream broke or etcd did not answer in time; the next beat
    /// opens another.
    pub async fn beat(&mut self) -> Result<Option<Duration>> {
        let answer = tokio::time::timeout(self.etcd.request_timeout, self.exchange()).await;
        let answer = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(err)) => {
                self.stream = None;
                return Err(err);
            }
            Err(_) => {
                self.stream = None;
                return Err(lost(&self.etcd.endpoints, "no answer in time"));
            }
        };
        Ok((answer.ttl > 0).then(|| Duration::from_secs(answer.ttl as u64)))
    }

    async fn exchange(&mut self) -> Result<pb::LeaseKeepAliveResponse> {
        let beat = pb::LeaseKeepAliveRequest { id: self.id.0 };
        let stream = match &mut self.stream {
            Some(stream) => {
                stream
                    .requests
                    .send(beat)
                    .await
                    .map_err(|_| lost(&self.etcd.endpoints, "the stream is closed"))?;
                stream
            }
            None => {
                // The beat goes first: etcd answers the stream's headers
                // only with its first answer. A beat is safe to repeat,
                // so another member may take the stream.
                let id = self.id.0;
                let (requests, responses) = self
                    .etcd
                    .call("lease keepalive", true, |mut c| async move {
                        let (requests, rx) = mpsc::channel(1);
                        requests
                            .send(pb::LeaseKeepAliveRequest { id })
                            .await
                            .expect("the receiver is held");
                        let responses = c
                            .lease
                            .lease_keep_alive(ReceiverStream::new(rx))
                            .await?
                            .into_inner();
                        Ok((requests, responses))
                    })
                    .await?;
                self.stream.insert(KeepAliveStream {
                    requests,
                    responses,
                })
            }
        };
        match stream.responses.next().await {
            Some(Ok(response)) => Ok(response),
            Some(Err(status)) => Err(Error::from_status(
                &self.etcd.endpoints,
                "lease keepalive",
                &status,
            )),
            None => Err(lost(&self.etcd.endpoints, "etcd ended the stream")),
        }
    }
}

/// A keepalive stream that broke: worth another.
fn lost(endpoints: &Arc<str>, message: &str) -> Error {
    Error::new(
        endpoints,
        "lease keepalive",
        ErrorKind::Unavailable,
        message.to_owned(),
    )
}

/// The revision in a header etcd always sends.
fn header_revision(header: Option<&pb::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision)
}

/// The end of the range of keys starting with `prefix`: etcd's ranges
/// are half-open, and the prefix with its last byte below 0xff raised is
/// the first key past them. No such byte means no end: `\0`, all keys.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_past_its_last_key() {
        assert_eq!(prefix_end(b"/svc/"), b"/svc0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }
}
