//! The registry as a cluster: any number of registry nodes over one etcd
//! cluster (`registry.store = "etcd"`). etcd holds the state and orders
//! every change; each node keeps a view of it, fed by one etcd watch, that
//! serves reads and watches as the memory store does.
//!
//! A write goes to etcd first and is answered once this node's view has
//! applied it, so a caller reads its own writes on the node it wrote
//! through, and every node sees every change in etcd's order.
//!
//! Ephemeral instances are held by the node their client beats through
//! (see [`holds`]): their keys hang on that node's etcd leases, and the
//! node times its clients' silence as the memory store does. A client
//! whose node dies resumes on another, which takes its keys over; what
//! nobody takes over goes when the dead node's etcd leases expire. Every
//! node derives "healthy" from a lease's alive key being there.
//!
//! Persistent instances have no lease: the registry probes them. One
//! node at a time does, elected through etcd (see [`election`]), and
//! writes the verdicts that change an instance's health to etcd, whence
//! every node's view learns them.
//!
//! Every node that serves says so with a key of its own (see
//! [`announce`]), which GetCluster lists.
//!
//! - [`keys`]: where each part of the state lives in etcd.
//! - [`holds`]: the leases a node holds for its clients, and their
//!   silences.
//! - [`election`]: which node probes.
//! - [`announce`]: which nodes are up.
//! - [`own_lease`]: the short lease a node keeps for a key of its own
//!   (the prober's, its announcement).

pub mod announce;
pub mod election;
pub mod holds;
pub mod keys;
pub mod own_lease;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{Error, EtcdConfig};
use crate::etcd::{self, Etcd, MAX_TXN_OPS, Op, Txn, TxnResult, WatchBatch};
use crate::server::Connections;
use holds::{Holding, NodeLeases, Silences};
use keys::Key;

/// A registry node's link to the cluster: the etcd client, the prefix
/// its keys live under, and how far its view has caught up.
pub(in crate::registry) struct Node {
    pub(in crate::registry) etcd: Etcd,
    pub(in crate::registry) prefix: String,
    /// The etcd revision the view has applied, for writers waiting to
    /// read their own write.
    applied: watch::Sender<i64>,
    /// The etcd cluster's, shared by every node: what a watcher's
    /// revisions belong to.
    pub(in crate::registry) incarnation: u64,
    /// The etcd leases this node's clients' keys hang on, when they were
    /// last renewed, and the silences of the clients it holds: one lock,
    /// so a new grant and the end of everything held on the old one are
    /// one step.
    held: Mutex<Holding>,
    /// The node's etcd leases' times to live: the registry's unhealthy and
    /// delete timeouts.
    lease_ttls: (Duration, Duration),
    /// Wakes the silence timer when an earlier deadline is set.
    pub(in crate::registry) timer: Notify,
    /// Wakes the keeper of the node's etcd leases when a write found one
    /// gone.
    lost: Notify,
    /// Callers' puts waiting to be written in one transaction.
    batches: mpsc::Sender<Batched>,
}

/// One caller's puts, and where its transaction's revision goes.
type Batched = (Vec<Op>, oneshot::Sender<Result<i64, ()>>);

/// Writes queued puts, as many callers' at once as fit in one
/// transaction; one transaction at a time, so a batch gathers while the
/// previous one is in etcd. Ends when the node is dropped.
async fn write_batches(etcd: Etcd, mut queued: mpsc::Receiver<Batched>) {
    let mut next: Option<Batched> = None;
    loop {
        let first = match next.take() {
            Some(first) => first,
            None => match queued.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut keys: HashSet<Vec<u8>> = first.0.iter().map(|op| op.key().to_vec()).collect();
        let mut batch = vec![first];
        while let Ok(more) = queued.try_recv() {
            let fits = keys.len() + more.0.len() <= MAX_TXN_OPS
                && more.0.iter().all(|op| !keys.contains(op.key()));
            if !fits {
                next = Some(more);
                break;
            }
            keys.extend(more.0.iter().map(|op| op.key().to_vec()));
            batch.push(more);
        }
        let ops: Vec<Op> = batch
            .iter()
            .flat_map(|(puts, _)| puts.iter().cloned())
            .collect();
        let result = etcd.txn(Txn::new().and_then(ops)).await;
        for (_, answer) in batch {
            // A failed batch: each caller writes alone, to learn its own
            // answer.
            let _ = answer.send(result.as_ref().map(|r| r.revision).map_err(|_| ()));
        }
    }
}

/// What a view applies: etcd's state at a revision, or the changes of one
/// revision.
pub(in crate::registry) enum Feed {
    /// Everything under the prefix at `revision`.
    Load { revision: i64, kvs: Vec<etcd::Kv> },
    /// The changes etcd made at `revision`, in its order.
    Changes {
        revision: i64,
        events: Vec<etcd::Event>,
    },
}

impl Node {
    /// Connects to the etcd cluster, reads (or, first of all nodes, sets)
    /// the cluster's incarnation, and grants the node's etcd leases, which
    /// live `lease_ttls`: the registry's unhealthy and delete timeouts.
    pub(in crate::registry) async fn connect(
        config: &EtcdConfig,
        lease_ttls: (Duration, Duration),
        connections: &Connections,
    ) -> Result<Node, etcd::Error> {
        let etcd = Etcd::connect_with(&config.endpoints, connections, config.connect_timeout)?
            .with_request_timeout(config.request_timeout);
        let prefix = config.prefix.trim_end_matches('/').to_string();
        let incarnation_key = format!("{prefix}/incarnation");
        let proposed = (rand::random::<u64>() | 1).to_string();
        // The first node to start sets it; every later one reads it.
        let set = etcd
            .txn(
                Txn::new()
                    .when([etcd::Compare::absent(&incarnation_key)])
                    .and_then([etcd::Op::put(&incarnation_key, &proposed, None)])
                    .or_else([etcd::Op::get(&incarnation_key)]),
            )
            .await?;
        let incarnation = match set.results.first() {
            Some(etcd::OpResult::Get(kvs)) => kvs
                .first()
                .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok())
                .unwrap_or(1),
            _ => proposed.parse().unwrap_or(1),
        };
        let asked = tokio::time::Instant::now();
        let leases = NodeLeases::grant(&etcd, lease_ttls).await?;
        let (batches, queued) = mpsc::channel(MAX_TXN_OPS);
        tokio::spawn(write_batches(etcd.clone(), queued));
        Ok(Node {
            etcd,
            prefix,
            applied: watch::channel(0).0,
            incarnation,
            held: Mutex::new(Holding {
                leases,
                renewed: asked,
                silences: Silences::default(),
            }),
            lease_ttls,
            timer: Notify::new(),
            lost: Notify::new(),
            batches,
        })
    }

    /// The key of `key` under this node's prefix.
    pub(in crate::registry) fn key(&self, key: &Key) -> String {
        key.encode(&self.prefix)
    }

    /// Runs `txn` and waits until this node's view has applied it: what
    /// a caller is answered after is what it wrote, or newer.
    pub(in crate::registry) async fn commit(&self, txn: Txn) -> Result<TxnResult, Error> {
        let result = self.etcd.txn(txn).await.map_err(|err| self.failed(err))?;
        self.caught_up(result.revision).await;
        Ok(result)
    }

    /// The etcd revision the view has applied, and its changes: what
    /// tells the prober to look for instances to start or stop probing.
    pub(in crate::registry) fn applied(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// Writes `puts` (one caller's, written together) batched with other
    /// callers' into one etcd transaction, and waits until the view has
    /// applied it. Registrations come many at a time and write distinct
    /// keys: a batch costs etcd one revision where each alone costs one.
    /// A batch that fails is retried one caller at a time, so one caller's
    /// expired lease refuses only that caller.
    pub(in crate::registry) async fn put_batched(&self, puts: Vec<Op>) -> Result<i64, Error> {
        let (answer, answered) = oneshot::channel();
        if self.batches.send((puts.clone(), answer)).await.is_err() {
            // The batcher stopped with the registry: write alone.
            return self
                .commit(Txn::new().and_then(puts))
                .await
                .map(|r| r.revision);
        }
        let revision = match answered.await {
            Ok(Ok(revision)) => revision,
            Ok(Err(_)) | Err(_) => {
                let result = self.etcd.txn(Txn::new().and_then(puts)).await;
                result.map_err(|err| self.failed(err))?.revision
            }
        };
        self.caught_up(revision).await;
        Ok(revision)
    }

    /// Waits until the view has applied etcd's `revision`.
    pub(in crate::registry) async fn caught_up(&self, revision: i64) {
        let mut applied = self.applied.subscribe();
        // The sender lives as long as the node, which the caller holds.
        let _ = applied.wait_for(|at| *at >= revision).await;
    }

    /// Feeds the view from etcd until `closed`: a read of the whole
    /// prefix, then its changes as etcd orders them; a watch that breaks
    /// resumes where it stopped, and one whose history etcd compacted
    /// away starts over from a new read (the view takes the difference,
    /// so watchers see it as changes).
    pub(in crate::registry) async fn feed(
        self: Arc<Self>,
        apply: impl Fn(Feed) + Send + 'static,
        closed: CancellationToken,
    ) {
        let mut next = None;
        // Pauses between attempts to open the watch while etcd refuses it.
        let mut pauses = backoff().build();
        loop {
            let from = match next {
                Some(from) => from,
                None => {
                    let read = (|| self.etcd.get_prefix(format!("{}/", self.prefix)))
                        .retry(backoff())
                        .sleep(tokio::time::sleep)
                        .notify(|err, _| tracing::warn!(%err, "cannot read the registry's state from etcd"));
                    let (kvs, revision) = tokio::select! {
                        _ = closed.cancelled() => return,
                        read = read => match read {
                            Ok(read) => read,
                            Err(_) => continue,
                        },
                    };
                    apply(Feed::Load { revision, kvs });
                    self.applied.send_replace(revision);
                    revision + 1
                }
            };
            let followed = tokio::select! {
                _ = closed.cancelled() => return,
                followed = self.follow(from, &apply) => followed,
            };
            next = match followed {
                Ok(resume) => {
                    pauses = backoff().build();
                    resume
                }
                Err(from) => {
                    let pause = pauses.next().unwrap_or(Duration::from_secs(2));
                    tokio::select! {
                        _ = closed.cancelled() => return,
                        _ = tokio::time::sleep(pause) => Some(from),
                    }
                }
            };
        }
    }

    /// Applies the changes from etcd revision `from` on, until the watch
    /// ends; answers where to resume (None: read everything anew), or
    /// Err(from) when the watch could not be opened.
    async fn follow(&self, from: i64, apply: &impl Fn(Feed)) -> Result<Option<i64>, i64> {
        let watch = self
            .etcd
            .watch_prefix(format!("{}/", self.prefix), from, false)
            .await;
        let mut watch = match watch {
            Ok(watch) => watch,
            Err(err) if err.kind == etcd::ErrorKind::Compacted => return Ok(None),
            Err(err) => {
                tracing::warn!(%err, "cannot watch the registry's state in etcd; retrying");
                return Err(from);
            }
        };
        let mut resume = from;
        while let Some(batch) = watch.next().await {
            match batch {
                Ok(WatchBatch::Events { revision, events }) => {
                    for (at, changes) in by_revision(events) {
                        apply(Feed::Changes {
                            revision: at,
                            events: changes,
                        });
                        resume = at + 1;
                    }
                    self.advance(revision);
                }
                Ok(WatchBatch::Progress { revision }) => self.advance(revision),
                Ok(WatchBatch::Compacted { compact_revision }) => {
                    tracing::warn!(
                        compact_revision,
                        "etcd compacted changes this node had not seen; reading the state anew"
                    );
                    return Ok(None);
                }
                Err(err) => {
                    tracing::warn!(%err, "the etcd watch broke; resuming");
                    return Ok(Some(resume));
                }
            }
        }
        Ok(Some(resume))
    }

    /// Marks the view as caught up to `revision`.
    fn advance(&self, revision: i64) {
        self.applied.send_if_modified(|at| {
            let moved = revision > *at;
            if moved {
                *at = revision;
            }
            moved
        });
    }
}

/// Splits a batch of events into runs of one revision each.
fn by_revision(events: Vec<etcd::Event>) -> Vec<(i64, Vec<etcd::Event>)> {
    let mut runs: Vec<(i64, Vec<etcd::Event>)> = Vec::new();
    for event in events {
        let at = event.revision();
        match runs.last_mut() {
            Some((revision, run)) if *revision == at => run.push(event),
            _ => runs.push((at, vec![event])),
        }
    }
    runs
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
}

impl Node {
    /// A failed etcd write as the caller is answered ([`unavailable`]);
    /// one that found this node's etcd lease gone also has the node grant
    /// new ones at once.
    pub(in crate::registry) fn failed(&self, err: etcd::Error) -> Error {
        if err.kind == etcd::ErrorKind::LeaseNotFound {
            self.lost.notify_one();
        }
        unavailable(err)
    }
}

/// A failed etcd write as the caller is answered: etcd unreachable or
/// without quorum is worth retrying; anything else is not the caller's
/// fault either, and says what etcd said.
pub(in crate::registry) fn unavailable(err: etcd::Error) -> Error {
    tracing::warn!(%err, "an etcd write failed");
    match err.kind {
        etcd::ErrorKind::LeaseNotFound => Error::Unavailable(
            "this registry node's etcd lease expired while it was written to; it is granting another, try again"
                .into(),
        ),
        etcd::ErrorKind::Unavailable => Error::Unavailable(format!(
            "the registry's store, etcd, is not answering or has no quorum ({}); try again",
            err.endpoints
        )),
        _ => Error::Unavailable(format!(
            "the registry's store, etcd, refused a write: {err}"
        )),
    }
}

/// What a registry node answers about itself and the cluster it belongs
/// to ([`crate::registry::Registry::cluster_info`]).
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    /// Where the state lives.
    pub store: super::StoreKind,
    /// The revision this node's view has reached.
    pub revision: u64,
    /// The incarnation its revisions belong to.
    pub incarnation: u64,
    /// The registry nodes that are up, in address order (on the memory
    /// store, this one), or why etcd could not be asked.
    pub nodes: Result<Vec<RegistryNode>, String>,
    /// On the etcd store: the etcd cluster as this node sees it.
    pub etcd: Option<EtcdInfo>,
}

/// A registry node that is up, as it announced itself (see [`announce`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryNode {
    /// Where it listens.
    pub address: SocketAddr,
    /// When it started serving, in Unix ms.
    pub started_ms: u64,
    /// The shop-mesh version it runs.
    pub version: String,
    /// Whether it is the node that answered.
    pub answering: bool,
}

/// The etcd cluster under a registry node.
#[derive(Debug, Clone)]
pub struct EtcdInfo {
    /// The endpoints the node was given.
    pub endpoints: Vec<String>,
    /// The prefix its keys live under.
    pub prefix: String,
    /// The members etcd lists, or why it could not be asked.
    pub members: Result<Vec<EtcdMember>, String>,
}

/// One etcd member, as etcd lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdMember {
    /// Its id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Where clients reach it.
    pub client_urls: Vec<String>,
    /// Whether it is the leader the answering member follows.
    pub leader: bool,
    /// A learner does not vote.
    pub learner: bool,
}

impl Node {
    /// The etcd members and which one leads, as the member that answers
    /// sees it.
    pub(in crate::registry) async fn members(&self) -> Result<Vec<EtcdMember>, etcd::Error> {
        let members = self.etcd.member_list().await?;
        let leader = self.etcd.status().await?.leader_id;
        Ok(members
            .into_iter()
            .map(|m| EtcdMember {
                id: m.id,
                leader: m.id == leader,
                name: m.name,
                client_urls: m.client_urls,
                learner: m.is_learner,
            })
            .collect())
    }
}
