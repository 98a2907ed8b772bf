//! Keeps what must survive a restart: persistent instances and services'
//! own settings, in one JSON file under the data dir, replaced atomically
//! (write a temporary file, fsync, rename, fsync the directory) so a crash
//! leaves the old file or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::model::{Instance, ServiceKey, ServiceSettings};

const FILE: &str = "registry.json";
const FORMAT: u32 = 1;

/// What is on disk.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub services: Vec<(ServiceKey, ServiceSettings)>,
    pub instances: Vec<Instance>,
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) the data dir.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.into() })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The stored snapshot; an empty one when there is no file yet.
    pub fn load(&self) -> std::io::Result<Snapshot> {
        let bytes = match std::fs::read(self.path()) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Snapshot::default());
            }
            Err(err) => return Err(err),
        };
        let snapshot: Snapshot = serde_json::from_slice(&bytes).map_err(|err| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is not a registry snapshot: {err}",
                    self.path().display()
                ),
            )
        })?;
        if snapshot.format != FORMAT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} has format {}; this registry reads format {FORMAT}",
                    self.path().display(),
                    snapshot.format
                ),
            ));
        }
        Ok(snapshot)
    }

    /// Replaces the stored snapshot. Blocking: call it off the runtime.
    pub fn save(&self, snapshot: &Snapshot) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut file, snapshot).map_err(std::io::Error::other)?;
        file.flush()?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.path())?;
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

pub fn snapshot(
    services: Vec<(ServiceKey, ServiceSettings)>,
    instances: Vec<Instance>,
) -> Snapshot {
    Snapshot {
        format: FORMAT,
        services,
        instances,
    }
}
