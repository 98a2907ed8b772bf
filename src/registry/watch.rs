//! Watch streams: a snapshot, then every change in order.
//!
//! What the registry holds for a watcher is bounded whatever it watches
//! and however slowly it reads. The snapshot is not copied when the watch
//! starts: it is read from the live state one chunk at a time, as the
//! watcher takes it, so a watcher that stops reading holds one position,
//! not the instances of a whole namespace (which would pin every version
//! of them that the registry has since replaced). Changes queue per
//! watcher up to a budget of bytes; a watcher over it is dropped from the
//! fan-out and, when it reads again, gets a fresh snapshot marked as a
//! reset.
//!
//! A snapshot read over time is not one instant's state: a chunk read
//! later may already hold a change that the watcher's queue also holds.
//! Each chunk's range and the revision it was read at are kept until the
//! queue has passed them, and a queued change that a chunk already holds
//! is skipped. So a watcher sees every instance once, then exactly the
//! changes after what it was shown, in order.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

use super::model::{Event, GroupKey, Instance, InstanceAddr, ServiceKey};
use super::store::Registry;

/// Instances per snapshot message, so a large group stays under the
/// message size limit.
pub const SNAPSHOT_CHUNK: usize = 500;

/// Who watches, as a service's list of its watchers shows them.
#[derive(Debug, Clone, Default)]
pub struct Watcher {
    /// The address the watch came from, when known.
    pub peer: Option<std::net::SocketAddr>,
    /// The name of the credential it showed, when it showed one.
    pub by: Option<String>,
    /// When it began, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Follows one service.
    Service(ServiceKey),
    /// Follows every service of a group, including ones added later.
    Group(GroupKey),
}

impl Selector {
    /// Whether a change to `service` belongs on this watch.
    pub fn matches(&self, service: &ServiceKey) -> bool {
        match self {
            Selector::Service(key) => key == service,
            Selector::Group(group) => service.in_group(group),
        }
    }
}

/// One answer on a watch.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// The state as of at least `revision` (in chunks: all but the last
    /// have `more`). `reset`: whatever the watcher held before is void.
    Snapshot {
        /// Revision the snapshot is at least as new as; changes after it
        /// follow.
        revision: u64,
        /// `true` when what the watcher held before is void.
        reset: bool,
        /// This chunk's instances, at most [`SNAPSHOT_CHUNK`].
        instances: Vec<Arc<Instance>>,
        /// `true` on every chunk but the last.
        more: bool,
    },
    /// One change after the snapshot, in revision order.
    Change(Event),
}

/// An instance's place in snapshot order: by service, then address.
pub(super) type Position = (ServiceKey, InstanceAddr);

fn position(instance: &Instance) -> Position {
    ((*instance.service).clone(), instance.addr.clone())
}

/// The changes queued for one watcher and not yet taken, in bytes, shared
/// by the registry's side (which adds) and the stream (which takes).
#[derive(Debug)]
pub(super) struct Backlog {
    bytes: AtomicUsize,
    limit: usize,
    /// Set when the budget overflowed and the subscription was dropped.
    lagged: AtomicBool,
}

/// The registry's side of one watcher: where its changes go.
#[derive(Debug)]
pub(super) struct Subscription {
    pub id: u64,
    /// Who it is for.
    pub who: Arc<Watcher>,
    /// Each change with the bytes it counts for.
    tx: mpsc::UnboundedSender<(Event, usize)>,
    backlog: Arc<Backlog>,
}

/// The stream's side of a subscription.
pub(super) struct Inbox {
    rx: mpsc::UnboundedReceiver<(Event, usize)>,
    backlog: Arc<Backlog>,
}

impl Subscription {
    /// A subscription whose queue holds at most `limit` bytes of changes
    /// (and always at least one change).
    pub fn new(id: u64, limit: usize, who: Arc<Watcher>) -> (Subscription, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog {
            bytes: AtomicUsize::new(0),
            limit,
            lagged: AtomicBool::new(false),
        });
        let inbox = Inbox {
            rx,
            backlog: backlog.clone(),
        };
        (
            Subscription {
                id,
                who,
                tx,
                backlog,
            },
            inbox,
        )
    }

    /// Queues a change of `size` bytes; false when this subscription must
    /// go (over its budget, or its watcher is gone).
    pub fn offer(&self, event: &Event, size: usize) -> bool {
        let queued = self.backlog.bytes.load(Ordering::Acquire);
        if queued > 0 && queued + size > self.backlog.limit {
            self.backlog.lagged.store(true, Ordering::Release);
            return false;
        }
        self.backlog.bytes.fetch_add(size, Ordering::AcqRel);
        self.tx.send((event.clone(), size)).is_ok()
    }

    pub fn queued_bytes(&self) -> usize {
        self.backlog.bytes.load(Ordering::Acquire)
    }
}

impl Inbox {
    fn lagged(&self) -> bool {
        self.backlog.lagged.load(Ordering::Acquire)
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx).map(|received| {
            received.map(|(event, size)| {
                self.backlog.bytes.fetch_sub(size, Ordering::AcqRel);
                event
            })
        })
    }
}

/// Holds one of the registry's watch slots until dropped.
pub(super) type Permit = tokio::sync::OwnedSemaphorePermit;

/// How a watch begins.
pub(super) enum Start {
    /// A snapshot read chunk by chunk from the live state.
    Snapshot { reset: bool },
    /// The changes the watcher missed, from the history.
    Replay(Vec<Event>),
}

/// A snapshot being sent: the revision its chunks report (the one the
/// watcher subscribed at) and the last instance sent.
struct Snapshotting {
    revision: u64,
    reset: bool,
    after: Option<Position>,
}

/// The chunks a snapshot was sent in: each chunk's last position (`None`
/// for the last chunk, which reaches to the end) and the revision it was
/// read at.
#[derive(Default)]
struct Covered(Vec<(Option<Position>, u64)>);

impl Covered {
    /// Whether the snapshot already showed `event`: the chunk whose range
    /// holds the instance was read at or after the change.
    fn holds(&self, event: &Event) -> bool {
        let key = position(&event.instance);
        let chunk = self
            .0
            .partition_point(|(end, _)| end.as_ref().is_some_and(|end| *end < key));
        self.0
            .get(chunk)
            .is_some_and(|(_, read_at)| event.revision <= *read_at)
    }

    /// The revision the last chunk was read at: no later change is held.
    fn last_read(&self) -> u64 {
        self.0.last().map_or(0, |(_, read_at)| *read_at)
    }
}

/// A watch in progress: a [`Stream`] of [`WatchItem`]s that ends only when
/// the registry closes.
pub struct WatchStream {
    registry: Registry,
    selector: Selector,
    who: Arc<Watcher>,
    subscription: u64,
    inbox: Inbox,
    replay: VecDeque<Event>,
    snapshot: Option<Snapshotting>,
    covered: Covered,
    _permit: Permit,
}

impl WatchStream {
    pub(super) fn new(
        registry: Registry,
        (selector, who): (Selector, Arc<Watcher>),
        (subscription, inbox): (u64, Inbox),
        revision: u64,
        start: Start,
        permit: Permit,
    ) -> WatchStream {
        let (replay, snapshot) = match start {
            Start::Snapshot { reset } => {
                if reset {
                    registry.counters().reset_sent();
                }
                (
                    VecDeque::new(),
                    Some(Snapshotting {
                        revision,
                        reset,
                        after: None,
                    }),
                )
            }
            Start::Replay(events) => (events.into(), None),
        };
        WatchStream {
            registry,
            selector,
            who,
            subscription,
            inbox,
            replay,
            snapshot,
            covered: Covered::default(),
            _permit: permit,
        }
    }

    /// Replaces the lost subscription with a new one and starts a reset
    /// snapshot from the moment it began, so nothing falls between them.
    fn resync(&mut self) {
        let ((subscription, inbox), revision) =
            self.registry.resubscribe(&self.selector, &self.who);
        self.registry.counters().reset_sent();
        self.registry.unsubscribe(&self.selector, self.subscription);
        self.subscription = subscription;
        self.inbox = inbox;
        self.replay.clear();
        self.covered = Covered::default();
        self.snapshot = Some(Snapshotting {
            revision,
            reset: true,
            after: None,
        });
    }

    /// The snapshot's next chunk, read from the live state now.
    fn next_chunk(&mut self, snapshot: Snapshotting) -> WatchItem {
        let (instances, more, read_at) =
            self.registry
                .snapshot_chunk(&self.selector, snapshot.after.as_ref(), SNAPSHOT_CHUNK);
        let last = instances.last().map(|i| position(i));
        let end = if more { last.clone() } else { None };
        self.covered.0.push((end, read_at));
        if more {
            self.snapshot = Some(Snapshotting {
                after: last,
                ..snapshot
            });
        }
        WatchItem::Snapshot {
            revision: snapshot.revision,
            reset: snapshot.reset,
            instances,
            more,
        }
    }
}

impl Stream for WatchStream {
    type Item = WatchItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchItem>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.replay.pop_front() {
                return Poll::Ready(Some(WatchItem::Change(event)));
            }
            if this.inbox.lagged() {
                tracing::debug!(selector = ?this.selector, "watcher fell behind; sending a reset");
                this.resync();
                continue;
            }
            if let Some(snapshot) = this.snapshot.take() {
                return Poll::Ready(Some(this.next_chunk(snapshot)));
            }
            return match this.inbox.poll_recv(cx) {
                Poll::Ready(Some(event)) if this.covered.holds(&event) => continue,
                Poll::Ready(Some(event)) => {
                    if event.revision > this.covered.last_read() {
                        this.covered = Covered::default();
                    }
                    Poll::Ready(Some(WatchItem::Change(event)))
                }
                // Dropped without lag: the registry is closing.
                Poll::Ready(None) if !this.inbox.lagged() => Poll::Ready(None),
                Poll::Ready(None) => continue,
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.registry.unsubscribe(&self.selector, self.subscription);
    }
}
