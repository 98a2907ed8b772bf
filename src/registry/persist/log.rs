//! The change log: one record per change, appended. A record is its
//! payload's length and CRC-32 (little-endian, four bytes each) and then
//! the payload, a [`Change`] in JSON. A crash can cut the last write
//! short; on replay a record that is short or fails its checksum ends the
//! log, and the file is cut back to the records before it.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use super::Change;

const HEADER: usize = 8;

/// The log file, open for appending.
#[derive(Debug)]
pub struct Log {
    file: File,
    /// Bytes known to hold whole, durable records.
    len: u64,
}

impl Log {
    pub fn open(path: &Path) -> std::io::Result<Log> {
        let file = File::options()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(Log { file, len })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// The log cut to its first `len` bytes, durably.
    pub fn truncated(mut self, len: u64) -> std::io::Result<Log> {
        self.cut(len)?;
        Ok(self)
    }

    fn cut(&mut self, len: u64) -> std::io::Result<()> {
        if self.file.metadata()?.len() != len {
            self.file.set_len(len)?;
            self.file.sync_data()?;
        }
        self.len = len;
        Ok(())
    }

    /// Appends `records` (whole records, from [`encode`]) as one write and
    /// makes them durable. On failure the log is cut back to what it held
    /// before; `Err(_, false)` says even that failed, and nothing written
    /// from now on could be trusted.
    pub fn append(&mut self, records: &[u8]) -> Result<(), (std::io::Error, bool)> {
        let written = (&self.file)
            .write_all(records)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += records.len() as u64;
                Ok(())
            }
            Err(err) => {
                let sound = self.cut(self.len).is_ok();
                Err((err, sound))
            }
        }
    }

    /// Empties the log, once its changes are in a snapshot.
    pub fn clear(&mut self) -> std::io::Result<()> {
        self.cut(0)
    }
}

/// Adds the record of `change` to `out`.
pub fn encode(change: &Change, out: &mut Vec<u8>) {
    let payload = serde_json::to_vec(change).expect("a change serialises");
    let len = u32::try_from(payload.len()).expect("a change is far smaller than 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// The changes a log holds, and how many of its bytes hold them.
#[derive(Debug)]
pub struct Replayed {
    pub changes: Vec<Change>,
    pub valid_len: u64,
}

#[derive(Debug)]
pub enum ReplayError {
    Io(std::io::Error),
    /// A whole record with a good checksum that is not a change this
    /// version knows: written by a newer one, so not to be dropped.
    Unreadable(String),
}

/// Reads the log from its start.
pub fn replay(path: &Path, mut file: &File) -> Result<Replayed, ReplayError> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(ReplayError::Io)?;
    let mut changes = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("four bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("four bytes"));
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let change = serde_json::from_slice(payload).map_err(|err| {
            ReplayError::Unreadable(format!(
                "the record at byte {at} is not a change this version can read: {err}"
            ))
        })?;
        changes.push(change);
        at += HEADER + len;
    }
    if at < bytes.len() {
        tracing::warn!(
            path = %path.display(),
            kept = changes.len(),
            dropped_bytes = bytes.len() - at,
            "the change log ends in a torn record (a crash during a write, never acknowledged); dropping it"
        );
    }
    Ok(Replayed {
        changes,
        valid_len: at as u64,
    })
}
