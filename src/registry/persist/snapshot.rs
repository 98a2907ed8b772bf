//! The snapshot file: the whole persistent state as one JSON document,
//! replaced atomically (write a temporary file, fsync, rename, fsync the
//! directory) so a crash leaves the old file or the new one, never half of
//! one. Also reads the format-1 `registry.json` of earlier versions, which
//! has the same shape.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Change, Error};
use crate::auth::{Grant, TokenId};
use crate::registry::configs::Stored;
use crate::registry::configs::model::{ConfigKey, Item};
use crate::registry::model::{Instance, InstanceAddr, ServiceKey, ServiceSettings};

/// A snapshot with a change log beside it.
pub const FORMAT: u32 = 2;
/// `registry.json`: the whole state, rewritten on every change.
pub const LEGACY_FORMAT: u32 = 1;

/// What a snapshot file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub services: Vec<(ServiceKey, ServiceSettings)>,
    pub instances: Vec<Instance>,
    /// Absent in snapshots written before tokens were.
    #[serde(default)]
    pub tokens: Vec<Grant>,
    /// The config centre's items; absent in snapshots written before it.
    #[serde(default)]
    pub configs: Stored,
}

impl Snapshot {
    /// The same contents, labelled with the current format.
    pub fn into_current(self) -> Snapshot {
        Snapshot {
            format: FORMAT,
            ..self
        }
    }
}

/// The stored state with changes applied one at a time, as the writer
/// keeps it to fold into the next snapshot.
#[derive(Debug, Default)]
pub struct State {
    services: BTreeMap<ServiceKey, ServiceSettings>,
    instances: BTreeMap<(ServiceKey, InstanceAddr), Instance>,
    tokens: BTreeMap<TokenId, Grant>,
    config_revision: u64,
    configs: BTreeMap<ConfigKey, Item>,
}

impl From<Snapshot> for State {
    fn from(snapshot: Snapshot) -> State {
        let mut state = State {
            services: snapshot.services.into_iter().collect(),
            tokens: snapshot.tokens.into_iter().map(|g| (g.id, g)).collect(),
            config_revision: snapshot.configs.revision,
            configs: snapshot
                .configs
                .items
                .into_iter()
                .map(|item| (item.key.clone(), item))
                .collect(),
            ..State::default()
        };
        for instance in snapshot.instances {
            state.apply(Change::Put(instance));
        }
        state
    }
}

impl State {
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Put(instance) => {
                let key = (instance.service.as_ref().clone(), instance.addr.clone());
                self.instances.insert(key, instance);
            }
            Change::Remove { service, addr } => {
                self.instances.remove(&(service, addr));
            }
            Change::Settings {
                service,
                settings: Some(settings),
            } => {
                self.services.insert(service, settings);
            }
            Change::Settings {
                service,
                settings: None,
            } => {
                self.services.remove(&service);
            }
            Change::Token {
                id,
                grant: Some(grant),
            } => {
                self.tokens.insert(id, grant);
            }
            Change::Token { id, grant: None } => {
                self.tokens.remove(&id);
            }
            Change::ConfigVersion {
                key,
                version,
                keep,
                clear_gray,
            } => {
                self.config_revision = self.config_revision.max(version.version);
                let item = self.configs.entry(key.clone()).or_insert_with(|| Item {
                    key,
                    versions: Vec::new(),
                    gray: None,
                });
                if clear_gray {
                    item.gray = None;
                }
                // Replayed twice, a version replaces itself.
                item.versions.retain(|v| v.version != version.version);
                item.versions.push(std::sync::Arc::new(version));
                item.versions.sort_by_key(|v| std::cmp::Reverse(v.version));
                item.versions.truncate(keep.max(1));
            }
            Change::ConfigGray {
                key,
                gray,
                revision,
            } => {
                self.config_revision = self.config_revision.max(revision);
                if let Some(item) = self.configs.get_mut(&key) {
                    item.gray = gray.map(std::sync::Arc::new);
                }
            }
            Change::ConfigDeleted { key, revision } => {
                self.config_revision = self.config_revision.max(revision);
                self.configs.remove(&key);
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            format: FORMAT,
            services: self
                .services
                .iter()
                .map(|(key, settings)| (key.clone(), settings.clone()))
                .collect(),
            instances: self.instances.values().cloned().collect(),
            tokens: self.tokens.values().cloned().collect(),
            configs: Stored {
                revision: self.config_revision,
                items: self.configs.values().cloned().collect(),
            },
        }
    }
}

/// The snapshot at `path` if there is one; it must be of `format`.
pub fn read(path: &Path, format: u32) -> Result<Option<Snapshot>, Error> {
    let dir = path.parent().unwrap_or(path);
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(Error::io(dir)(err)),
    };
    let unreadable = |reason: String| Error::Unreadable {
        path: path.into(),
        reason,
    };
    let snapshot: Snapshot = serde_json::from_slice(&bytes)
        .map_err(|err| unreadable(format!("not a registry snapshot: {err}")))?;
    if snapshot.format != format {
        return Err(unreadable(format!(
            "has format {}; expected format {format} here",
            snapshot.format
        )));
    }
    Ok(Some(snapshot))
}

/// Replaces the snapshot at `path` in `dir`; its size in bytes.
pub fn write(dir: &Path, path: &Path, snapshot: &Snapshot) -> std::io::Result<u64> {
    let tmp = path.with_extension("json.tmp");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    serde_json::to_writer(&mut out, snapshot).map_err(std::io::Error::other)?;
    out.flush()?;
    let file = out.into_inner().map_err(|err| err.into_error())?;
    file.sync_all()?;
    let len = file.metadata()?.len();
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)?;
    Ok(len)
}

/// Makes a rename or a new file in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
