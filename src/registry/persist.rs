//! Keeps what must survive a restart: persistent instances, services'
//! own settings, the grants of tokens, and the config centre's items. A snapshot file holds the state as of its writing and a
//! log holds each change since, one checksummed record apiece, so storing
//! a change costs one append and one fsync however large the state is;
//! once the log outgrows the snapshot, the two are folded into a new one.
//!
//! Layout of the data dir: `snapshot.json`, `changes.log`, and
//! `registry.lock` (see [`DirLock`]). A `registry.json` written by earlier
//! versions (format 1, the whole state rewritten per change) is moved into
//! this layout once, on open, and kept as `registry.json.migrated`.

mod lock;
mod log;
mod snapshot;
mod writer;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::configs::model::{ConfigKey, Gray, Version};
use super::model::{Instance, InstanceAddr, ServiceKey, ServiceSettings};
use crate::auth::{Grant, TokenId};

pub use lock::DirLock;
pub use snapshot::Snapshot;

const SNAPSHOT: &str = "snapshot.json";
const LOG: &str = "changes.log";
const LEGACY: &str = "registry.json";
const MIGRATED: &str = "registry.json.migrated";

/// One change to what is stored, as a log record holds it. Each says what
/// its subject now is, so replaying a record twice changes nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Change {
    /// A persistent instance, as it now is.
    Put(Instance),
    /// A persistent instance that is gone.
    Remove {
        service: ServiceKey,
        addr: InstanceAddr,
    },
    /// A service's own settings; `None` once it keeps none.
    Settings {
        service: ServiceKey,
        settings: Option<ServiceSettings>,
    },
    /// A token's grant; `None` once it is revoked.
    Token { id: TokenId, grant: Option<Grant> },
    /// A config item's new current version; the item keeps `keep`
    /// versions at most.
    ConfigVersion {
        key: ConfigKey,
        version: Version,
        keep: usize,
        /// A promotion: the gray version goes.
        #[serde(default)]
        clear_gray: bool,
    },
    /// A config item's gray version set (or dropped), at `revision`.
    ConfigGray {
        key: ConfigKey,
        gray: Option<Gray>,
        revision: u64,
    },
    /// A config item deleted with its history, at `revision`.
    ConfigDeleted { key: ConfigKey, revision: u64 },
}

/// What a caller asks to have stored, as memory holds it when it asks.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    Instance(&'a ServiceKey, &'a InstanceAddr),
    Service(&'a ServiceKey),
    Token(TokenId),
}

/// Why a data dir cannot be opened, naming the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data dir path names a file.
    #[error("data dir {0} is a file; expected a directory")]
    NotADirectory(PathBuf),
    /// The registry's user may not read or write the data dir.
    #[error(
        "data dir {0}: permission denied; run the registry as a user who may write there, or give it another data dir"
    )]
    PermissionDenied(PathBuf),
    /// Another registry holds the data dir's lock.
    #[error(
        "data dir {dir} is in use by another registry ({holder}); stop that one, or give this one another data dir"
    )]
    Locked {
        /// The data dir asked for.
        dir: PathBuf,
        /// Who holds the lock, as the holder recorded it, so the operator
        /// can find and stop it.
        holder: String,
    },
    /// A file of the data dir that this version cannot read.
    #[error("{path}: {reason}")]
    Unreadable {
        /// The file at fault.
        path: PathBuf,
        /// What this version could not make of it.
        reason: String,
    },
    /// Any other I/O error met while opening the data dir.
    #[error("data dir {dir}: {error}")]
    Io {
        /// The data dir asked for.
        dir: PathBuf,
        /// The error as the OS reported it.
        error: std::io::Error,
    },
}

impl Error {
    /// Names `dir` in an I/O error met while opening it.
    fn io(dir: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |error| match error.kind() {
            ErrorKind::PermissionDenied => Error::PermissionDenied(dir.into()),
            ErrorKind::NotADirectory => Error::Io {
                dir: dir.into(),
                error: std::io::Error::new(
                    ErrorKind::NotADirectory,
                    "a part of its path is a file; expected directories",
                ),
            },
            _ => Error::Io {
                dir: dir.into(),
                error,
            },
        }
    }
}

/// Why a change was not stored; the writer has logged the cause.
pub type WriteError = Arc<std::io::Error>;

/// The persistent state on disk, with the thread that writes it.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    writer: writer::Writer,
}

impl Store {
    /// Opens (creating) the data dir and reads what it holds: the snapshot
    /// with the log's changes applied. A torn last record, left by a crash
    /// in the middle of a write, was never acknowledged: it is dropped.
    pub fn open(dir: &Path) -> Result<(Store, Snapshot), Error> {
        prepare(dir)?;
        let paths = Paths::new(dir);
        migrate(&paths)?;
        let snapshot_len = std::fs::metadata(&paths.snapshot).map_or(0, |m| m.len());
        let log = log::Log::open(&paths.log).map_err(Error::io(dir))?;
        let (state, valid_len) = read_state(&paths, log.file())?;
        let log = log.truncated(valid_len).map_err(Error::io(dir))?;
        let writer = writer::Writer::start(paths, log, snapshot_len).map_err(Error::io(dir))?;
        Ok((
            Store {
                dir: dir.into(),
                writer,
            },
            state.snapshot(),
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Hands `change` to the writer; the answer comes once it is durable.
    /// Changes are written in the order they are submitted.
    pub fn submit(&self, change: Change) -> impl Future<Output = Result<(), WriteError>> + use<> {
        let done = self.writer.submit(change);
        async move {
            done.await.unwrap_or_else(|_| {
                Err(Arc::new(std::io::Error::other(
                    "the registry's store has stopped",
                )))
            })
        }
    }
}

/// The files of a data dir.
#[derive(Debug, Clone)]
struct Paths {
    dir: PathBuf,
    snapshot: PathBuf,
    log: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Paths {
        Paths {
            dir: dir.into(),
            snapshot: dir.join(SNAPSHOT),
            log: dir.join(LOG),
        }
    }
}

/// What the data dir holds: the snapshot with the log's changes applied
/// (the log read from its start through `log`), and how many bytes of the
/// log are whole records.
fn read_state(paths: &Paths, log: &std::fs::File) -> Result<(snapshot::State, u64), Error> {
    let stored = snapshot::read(&paths.snapshot, snapshot::FORMAT)?.unwrap_or_default();
    let mut state = snapshot::State::from(stored);
    let replayed = log::replay(&paths.log, log).map_err(|err| match err {
        log::ReplayError::Io(err) => Error::io(&paths.dir)(err),
        log::ReplayError::Unreadable(reason) => Error::Unreadable {
            path: paths.log.clone(),
            reason,
        },
    })?;
    for change in replayed.changes {
        state.apply(change);
    }
    Ok((state, replayed.valid_len))
}

/// Makes sure `dir` is a directory, creating it if needed.
fn prepare(dir: &Path) -> Result<(), Error> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Error::NotADirectory(dir.into())),
        Err(err) if err.kind() == ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(Error::io(dir))
        }
        Err(err) => Err(Error::io(dir)(err)),
    }
}

/// Moves a format-1 `registry.json` into a snapshot with an empty log. A
/// crash part way leaves `registry.json` in place, so the next open does
/// it again from the start.
fn migrate(paths: &Paths) -> Result<(), Error> {
    let legacy = paths.dir.join(LEGACY);
    let Some(old) = snapshot::read(&legacy, snapshot::LEGACY_FORMAT)? else {
        return Ok(());
    };
    let io = Error::io(&paths.dir);
    let instances = old.instances.len();
    snapshot::write(&paths.dir, &paths.snapshot, &old.into_current()).map_err(io)?;
    log::Log::open(&paths.log)
        .and_then(|log| log.truncated(0))
        .map_err(Error::io(&paths.dir))?;
    std::fs::rename(&legacy, paths.dir.join(MIGRATED)).map_err(Error::io(&paths.dir))?;
    snapshot::sync_dir(&paths.dir).map_err(Error::io(&paths.dir))?;
    tracing::info!(
        dir = %paths.dir.display(),
        instances,
        "moved {LEGACY} into {SNAPSHOT} and {LOG}; the old file is kept as {MIGRATED}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Change, Store};
    use crate::registry::model::{Instance, InstanceAddr, ServiceKey, ServiceSettings, Timings};

    fn instance(port: u16) -> Instance {
        Instance {
            service: Arc::new(ServiceKey::parse("", "", "db").unwrap()),
            addr: InstanceAddr::parse("", "127.0.0.1", port.into()).unwrap(),
            weight: 1.0,
            enabled: true,
            healthy: false,
            ephemeral: false,
            metadata: [("padding".to_owned(), "x".repeat(200))].into(),
            timings: Timings {
                heartbeat_interval_ms: 5000,
                unhealthy_timeout_ms: 15000,
                delete_timeout_ms: 30000,
            },
            lease: 0,
        }
    }

    /// Submits every change at once (they share fsyncs) and waits for all.
    async fn store(store: &Store, changes: impl IntoIterator<Item = Change>) {
        let pending: Vec<_> = changes.into_iter().map(|c| store.submit(c)).collect();
        for durable in pending {
            durable.await.expect("stored");
        }
    }

    #[tokio::test]
    async fn a_log_that_outgrows_its_snapshot_is_folded_into_one_and_reopens_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (opened, empty) = Store::open(dir.path()).unwrap();
        assert!(empty.instances.is_empty() && empty.services.is_empty());
        let service = ServiceKey::parse("", "", "db").unwrap();
        // Enough records to pass the folding threshold more than once.
        store(
            &opened,
            (1..=12_000).map(|port| Change::Put(instance(port))),
        )
        .await;
        store(
            &opened,
            (1..=12_000)
                .filter(|port| port % 2 == 0)
                .map(|port| Change::Remove {
                    service: service.clone(),
                    addr: instance(port).addr,
                }),
        )
        .await;
        let settings = ServiceSettings::parse(0.5, []).unwrap();
        store(
            &opened,
            [Change::Settings {
                service: service.clone(),
                settings: Some(settings.clone()),
            }],
        )
        .await;
        drop(opened);

        let snapshot = std::fs::metadata(dir.path().join(super::SNAPSHOT)).unwrap();
        let log = std::fs::metadata(dir.path().join(super::LOG)).unwrap();
        assert!(
            log.len() <= snapshot.len().max(super::writer::COMPACT_FLOOR),
            "the log was folded: {} bytes beside a {}-byte snapshot",
            log.len(),
            snapshot.len()
        );

        let (_reopened, loaded) = Store::open(dir.path()).unwrap();
        let ports: Vec<u16> = loaded.instances.iter().map(|i| i.addr.port).collect();
        let odd: Vec<u16> = (1..=12_000).filter(|port| port % 2 == 1).collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, odd);
        assert_eq!(loaded.services, vec![(service, settings)]);
    }
}
