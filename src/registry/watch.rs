//! Watch streams: a snapshot, then every change in order. A watcher that
//! stops reading is not buffered for without bound: once its queue is
//! full it is dropped from the fan-out and, when it reads again, gets a
//! fresh snapshot marked as a reset.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

use super::model::{Event, GroupKey, Instance, ServiceKey};
use super::store::Registry;

/// Instances per snapshot message, so a large group stays under the
/// message size limit.
pub const SNAPSHOT_CHUNK: usize = 500;

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Service(ServiceKey),
    Group(GroupKey),
}

impl Selector {
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
    /// The full state at `revision` (in chunks: all but the last have
    /// `more`). `reset`: whatever the watcher held before is void.
    Snapshot {
        revision: u64,
        reset: bool,
        instances: Vec<Arc<Instance>>,
        more: bool,
    },
    Change(Event),
}

/// The registry's side of one watcher: where its events go.
#[derive(Debug)]
pub(super) struct Subscription {
    pub id: u64,
    pub tx: mpsc::Sender<Event>,
    /// Set when the queue overflowed and the subscription was dropped.
    pub lagged: Arc<AtomicBool>,
}

impl Subscription {
    /// Queues an event; false when this subscription must go (full or gone).
    pub fn offer(&self, event: &Event) -> bool {
        match self.tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lagged.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Holds one of the registry's watch slots; frees it when dropped.
#[derive(Debug)]
pub(super) struct Permit(pub Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A watch in progress: a [`Stream`] of [`WatchItem`]s that ends only when
/// the registry closes.
pub struct WatchStream {
    pub(super) registry: Registry,
    pub(super) selector: Selector,
    pub(super) subscription: u64,
    pub(super) rx: mpsc::Receiver<Event>,
    pub(super) lagged: Arc<AtomicBool>,
    pub(super) pending: VecDeque<WatchItem>,
    pub(super) _permit: Permit,
}

impl WatchStream {
    /// Replaces the lost subscription with a new one and queues a reset
    /// snapshot taken at the same moment, so nothing falls between them.
    fn resync(&mut self) {
        let (subscription, rx, lagged, items) = self.registry.resubscribe(&self.selector);
        self.registry.unsubscribe(&self.selector, self.subscription);
        self.subscription = subscription;
        self.rx = rx;
        self.lagged = lagged;
        self.pending = items.into();
    }
}

impl Stream for WatchStream {
    type Item = WatchItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchItem>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.pending.pop_front() {
                return Poll::Ready(Some(item));
            }
            if this.lagged.load(Ordering::Acquire) {
                tracing::debug!(selector = ?this.selector, "watcher fell behind; sending a reset");
                this.resync();
                continue;
            }
            return match this.rx.poll_recv(cx) {
                Poll::Ready(Some(event)) => Poll::Ready(Some(WatchItem::Change(event))),
                // Dropped without lag: the registry is closing.
                Poll::Ready(None) if !this.lagged.load(Ordering::Acquire) => Poll::Ready(None),
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

/// Splits a snapshot into messages of at most [`SNAPSHOT_CHUNK`] instances.
pub(super) fn snapshot_items(
    revision: u64,
    reset: bool,
    instances: Vec<Arc<Instance>>,
) -> Vec<WatchItem> {
    if instances.is_empty() {
        return vec![WatchItem::Snapshot {
            revision,
            reset,
            instances,
            more: false,
        }];
    }
    let chunks = instances.len().div_ceil(SNAPSHOT_CHUNK);
    let mut items = Vec::with_capacity(chunks);
    let mut rest = instances;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(SNAPSHOT_CHUNK));
        let more = !tail.is_empty();
        items.push(WatchItem::Snapshot {
            revision,
            reset,
            instances: rest,
            more,
        });
        rest = tail;
    }
    items
}
