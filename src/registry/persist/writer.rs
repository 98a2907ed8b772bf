//! The one thread that writes an open data dir. It takes changes in the
//! order they are submitted, appends all that are waiting as one write
//! with one fsync (concurrent registrations share the cost), answers each
//! once it is durable, and folds the log into a new snapshot when the log
//! outgrows the last one.

use std::sync::{Arc, mpsc};

use tokio::sync::oneshot;

use super::log::{self, Log};
use super::{Change, Paths, WriteError, read_state, snapshot};

/// The log is folded into a snapshot once it is larger than both this and
/// the last snapshot, so folding costs at most about as much again as the
/// appends did.
pub(super) const COMPACT_FLOOR: u64 = 1 << 20;
/// Changes written with one fsync, at most.
const MAX_BATCH: usize = 4096;

type Done = oneshot::Sender<Result<(), WriteError>>;

#[derive(Debug)]
pub struct Writer {
    changes: mpsc::Sender<(Change, Done)>,
}

impl Writer {
    pub fn start(paths: Paths, log: Log, snapshot_len: u64) -> std::io::Result<Writer> {
        let (changes, queue) = mpsc::channel();
        let mut thread = Thread {
            paths,
            log,
            compact_at: COMPACT_FLOOR.max(snapshot_len),
            broken: None,
        };
        std::thread::Builder::new()
            .name("registry-store".into())
            .spawn(move || thread.run(queue))?;
        Ok(Writer { changes })
    }

    /// Queues `change`; the receiver answers once it is durable, or why
    /// not. It closes without an answer if the writer has stopped.
    pub fn submit(&self, change: Change) -> oneshot::Receiver<Result<(), WriteError>> {
        let (done, answer) = oneshot::channel();
        // A closed queue drops `done`, which the caller sees.
        let _ = self.changes.send((change, done));
        answer
    }
}

struct Thread {
    paths: Paths,
    log: Log,
    compact_at: u64,
    /// Set when the log could not be restored after a failed write: every
    /// later change is refused, so memory never claims what disk lacks.
    broken: Option<WriteError>,
}

impl Thread {
    /// Until every [`Writer`] is dropped.
    fn run(&mut self, queue: mpsc::Receiver<(Change, Done)>) {
        let mut records = Vec::new();
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            batch.extend(queue.try_iter().take(MAX_BATCH - 1));
            let result = self.write(&batch, &mut records);
            for (_, done) in batch {
                let _ = done.send(result.clone());
            }
            if result.is_ok() && self.log.len() > self.compact_at {
                self.compact();
            }
        }
    }

    fn write(&mut self, batch: &[(Change, Done)], records: &mut Vec<u8>) -> Result<(), WriteError> {
        if let Some(err) = &self.broken {
            return Err(err.clone());
        }
        records.clear();
        for (change, _) in batch {
            log::encode(change, records);
        }
        self.log.append(records).map_err(|(err, sound)| {
            let err = Arc::new(err);
            tracing::error!(
                path = %self.paths.log.display(),
                %err,
                changes = batch.len(),
                "cannot store changes to persistent instances"
            );
            if !sound {
                tracing::error!(
                    path = %self.paths.log.display(),
                    "the change log cannot be restored; refusing persistent changes until a restart"
                );
                self.broken = Some(err.clone());
            }
            err
        })
    }

    /// Writes what the snapshot and the log hold together as a new
    /// snapshot, and empties the log. The state is read back from disk
    /// rather than kept in memory: folding is rare, and a copy would double
    /// what persistent instances cost. A crash between the two steps leaves
    /// the new snapshot with the old log, whose changes it already holds:
    /// replaying them again changes nothing.
    fn compact(&mut self) {
        let folded = std::fs::File::open(&self.paths.log)
            .map_err(|err| err.to_string())
            .and_then(|log| read_state(&self.paths, &log).map_err(|err| err.to_string()))
            .and_then(|(state, _)| {
                snapshot::write(&self.paths.dir, &self.paths.snapshot, &state.snapshot())
                    .map_err(|err| err.to_string())
            });
        match folded {
            Ok(len) => {
                self.compact_at = COMPACT_FLOOR.max(len);
                if let Err(err) = self.log.clear() {
                    // Still sound: the log's changes are all in the snapshot.
                    tracing::warn!(
                        path = %self.paths.log.display(),
                        %err,
                        "cannot empty the change log after a snapshot; will try again"
                    );
                    self.compact_at = self.compact_at.max(self.log.len().saturating_mul(2));
                }
            }
            Err(err) => {
                tracing::warn!(
                    path = %self.paths.snapshot.display(),
                    %err,
                    "cannot write a snapshot; the change log keeps growing until one can be"
                );
                self.compact_at = self.log.len().saturating_mul(2);
            }
        }
    }
}
