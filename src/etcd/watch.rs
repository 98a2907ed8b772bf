//! A watch on a prefix as a stream of typed batches.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::{Chan, Error, ErrorKind, Event, EventKind, Kv, Result, pb};
use crate::pb::etcd::watch_client::WatchClient;

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchBatch {
    /// The changes of one or more revisions, in revision order; a
    /// transaction's changes always arrive in one batch.
    Events {
        /// The store's revision when etcd sent the batch (at least the
        /// last event's).
        revision: i64,
        /// The changes.
        events: Vec<Event>,
    },
    /// Nothing under the prefix changed up to `revision`: a watch
    /// resumed from `revision + 1` misses nothing.
    Progress {
        /// The revision the watch has caught up to.
        revision: i64,
    },
    /// The watch started before `compact_revision`, whose history is
    /// gone; etcd has ended the watch. The caller must read the prefix
    /// anew and watch from after that read. The stream ends after this.
    Compacted {
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
}

/// A live watch. Dropping it cancels the watch.
pub struct Watch {
    // Held so the request side stays open: etcd ends a watch stream
    // whose client half closes.
    requests: mpsc::Sender<pb::WatchRequest>,
    responses: tonic::Streaming<pb::WatchResponse>,
    endpoints: Arc<str>,
    // A compaction etcd reported in the very answer that created the
    // watch, delivered as the first batch.
    pending: Option<pb::WatchResponse>,
    done: bool,
}

impl Watch {
    pub(super) async fn start(
        mut client: WatchClient<Chan>,
        create: pb::WatchCreateRequest,
        endpoints: Arc<str>,
        timeout: Duration,
    ) -> Result<Watch> {
        let failed = |status: tonic::Status| Error::from_status(&endpoints, "watch", &status);
        let (requests, rx) = mpsc::channel(4);
        requests
            .send(pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
            })
            .await
            .expect("the receiver is held");
        let started = async {
            let mut responses = client
                .watch(ReceiverStream::new(rx))
                .await
                .map_err(failed)?
                .into_inner();
            // Until etcd says "created", a change could slip past.
            match responses.next().await {
                Some(Ok(response)) if response.created && !response.canceled => {
                    Ok((responses, None))
                }
                Some(Ok(response)) if response.compact_revision != 0 => {
                    Ok((responses, Some(response)))
                }
                Some(Ok(response)) => Err(Error::new(
                    &endpoints,
                    "watch",
                    ErrorKind::Failed,
                    format!(
                        "the watch was not created: {}",
                        cancel_reason(&response.cancel_reason)
                    ),
                )),
                Some(Err(status)) => Err(failed(status)),
                None => Err(Error::new(
                    &endpoints,
                    "watch",
                    ErrorKind::Unavailable,
                    "etcd ended the stream before creating the watch".into(),
                )),
            }
        };
        let (responses, pending) =
            tokio::time::timeout(timeout, started).await.map_err(|_| {
                Error::new(
                    &endpoints,
                    "watch",
                    ErrorKind::Unavailable,
                    format!("the watch was not created within {timeout:?}"),
                )
            })??;
        Ok(Watch {
            requests,
            responses,
            endpoints,
            pending,
            done: false,
        })
    }

    /// Asks etcd for a [`WatchBatch::Progress`] now, so a quiet prefix
    /// still tells the caller how far it has caught up.
    pub async fn request_progress(&self) -> Result<()> {
        self.requests
            .send(pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                    pb::WatchProgressRequest {},
                )),
            })
            .await
            .map_err(|_| {
                Error::new(
                    &self.endpoints,
                    "watch progress",
                    ErrorKind::Unavailable,
                    "the watch stream is closed".into(),
                )
            })
    }

    fn batch(&mut self, response: pb::WatchResponse) -> Option<Result<WatchBatch>> {
        let revision = response.header.as_ref().map_or(0, |h| h.revision);
        if response.canceled {
            self.done = true;
            if response.compact_revision != 0 {
                return Some(Ok(WatchBatch::Compacted {
                    compact_revision: response.compact_revision,
                }));
            }
            return Some(Err(Error::new(
                &self.endpoints,
                "watch",
                // Without a leader, a member cancels its watches.
                ErrorKind::Unavailable,
                format!(
                    "etcd canceled the watch: {}",
                    cancel_reason(&response.cancel_reason)
                ),
            )));
        }
        if response.created && response.compact_revision == 0 {
            return None;
        }
        if response.events.is_empty() {
            return Some(Ok(WatchBatch::Progress { revision }));
        }
        let events = response
            .events
            .into_iter()
            .map(|event| Event {
                kind: if event.r#type == pb::event::EventType::Delete as i32 {
                    EventKind::Delete
                } else {
                    EventKind::Put
                },
                kv: Kv::from_pb(event.kv.unwrap_or_default()),
                prev: event.prev_kv.map(Kv::from_pb),
            })
            .collect();
        Some(Ok(WatchBatch::Events { revision, events }))
    }
}

fn cancel_reason(reason: &str) -> &str {
    if reason.is_empty() {
        "no reason given"
    } else {
        reason
    }
}

impl Stream for Watch {
    type Item = Result<WatchBatch>;

    /// Batches until etcd cancels the watch (after
    /// [`WatchBatch::Compacted`] or an error) or the stream breaks (an
    /// [`ErrorKind::Unavailable`] error); then it ends. Resume with a new
    /// watch from the last revision seen + 1.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(response) = self.pending.take() {
                if let Some(batch) = self.batch(response) {
                    return Poll::Ready(Some(batch));
                }
                continue;
            }
            match std::task::ready!(Pin::new(&mut self.responses).poll_next(cx)) {
                Some(Ok(response)) => {
                    if let Some(batch) = self.batch(response) {
                        return Poll::Ready(Some(batch));
                    }
                }
                Some(Err(status)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::from_status(
                        &self.endpoints,
                        "watch",
                        &status,
                    ))));
                }
                None => {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::new(
                        &self.endpoints,
                        "watch",
                        ErrorKind::Unavailable,
                        "etcd ended the watch stream".into(),
                    ))));
                }
            }
        }
    }
}
