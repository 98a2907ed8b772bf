//! One registry per data dir: a second one would overwrite the first's
//! persistent instances with its own. The holder keeps an exclusive lock
//! on `registry.lock` and writes into it who it is, so a refused registry
//! can say which process holds the dir. The kernel drops the lock when
//! the holder's process ends, however it ends, so a crash leaves nothing
//! to clean up; the stale text is overwritten by the next holder.

use std::fs::{File, TryLockError};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::Error;

const FILE: &str = "registry.lock";
/// How long a held lock is retried before giving up. A process that is
/// starting a child holds a copy of every descriptor until the child's
/// exec closes it, the lock's too, so a dir just released can look held
/// for a moment.
const PATIENCE: Duration = Duration::from_secs(1);

/// Held while the registry runs; dropping it releases the dir.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `dir` (creating it) for this process, serving on `addr`.
    pub async fn acquire(dir: &Path, addr: SocketAddr) -> Result<DirLock, Error> {
        super::prepare(dir)?;
        let io = || Error::io(dir);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(FILE))
            .map_err(io())?;
        let give_up = tokio::time::Instant::now() + PATIENCE;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if tokio::time::Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(TryLockError::WouldBlock) => return Err(held(dir, &mut file)),
                Err(TryLockError::Error(err)) => return Err(io()(err)),
            }
        }
        file.set_len(0).map_err(io())?;
        let holder = format!("pid {}, listening on {addr}", std::process::id());
        file.write_all(holder.as_bytes()).map_err(io())?;
        Ok(DirLock { _file: file })
    }
}

/// The refusal, naming the holder as it wrote itself into the lock file.
fn held(dir: &Path, file: &mut File) -> Error {
    let mut holder = String::new();
    // The holder may not have written itself in yet.
    let _ = file.read_to_string(&mut holder);
    let holder = match holder.trim() {
        "" => "a process that has not yet said which".to_owned(),
        said => said.to_owned(),
    };
    Error::Locked {
        dir: dir.into(),
        holder,
    }
}
