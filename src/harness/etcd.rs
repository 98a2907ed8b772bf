//! Real etcd clusters for the etcd store's tests: `etcd` processes on
//! loopback, each cluster in a temporary directory, members killed and
//! restarted for real.
//!
//! etcd cannot be handed a bound listener, and a port found free and let
//! go can be taken before etcd binds it. So each cluster gets an address
//! of its own instead: 127.X.Y.i for member i, X and Y random (all of
//! 127/8 is loopback on Linux), on etcd's usual ports. Parallel tests
//! then collide only if they draw the same X.Y, and a cluster that finds
//! its address taken draws again.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::etcd::Etcd;

/// How long a member may take to be ready, or to exit on a signal.
const PATIENCE: Duration = Duration::from_secs(30);

/// The client port of every member (each has an address of its own).
const CLIENT_PORT: u16 = 2379;

/// The peer port of every member.
const PEER_PORT: u16 = 2380;

/// Addresses drawn before giving up when each is taken.
const DRAWS: usize = 5;

/// A running etcd cluster; dropping it kills every member.
pub struct EtcdCluster {
    // Before `dir`, so members die before their data is removed.
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

struct Member {
    name: String,
    client_url: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Its id, as its status tells it once it is ready.
    id: u64,
    /// A client of this member alone.
    client: Etcd,
}

impl EtcdCluster {
    /// Starts a cluster of `members` members and waits until each follows
    /// a leader. Ok(None), after a `SKIPPED:` line on stderr, when etcd is
    /// not installed, unless `CI` is set: under CI that is an error.
    pub async fn start(members: usize) -> anyhow::Result<Option<EtcdCluster>> {
        anyhow::ensure!(
            (1..=250).contains(&members),
            "a cluster of {members} members"
        );
        let Some(bin) = etcd_binary() else {
            if std::env::var_os("CI").is_some() {
                bail!("etcd is not installed (apt-get install etcd-server), and CI is set");
            }
            // Written to the terminal itself: a test harness captures
            // only the print macros, and a skip must be seen.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED: etcd is not installed (apt-get install etcd-server)"
            );
            return Ok(None);
        };
        let mut last = None;
        for _ in 0..DRAWS {
            let (x, y) = {
                let mut rng = rand::rng();
                (rng.random_range(1..=255u8), rng.random_range(0..=255u8))
            };
            match Self::start_at(&bin, members, x, y).await {
                Ok(cluster) => return Ok(Some(cluster)),
                Err(err) if format!("{err:#}").contains("address already in use") => {
                    last = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last
            .expect("drawn at least once")
            .context(format!("{DRAWS} addresses drawn, each taken")))
    }

    async fn start_at(bin: &Path, count: usize, x: u8, y: u8) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("shop-mesh-etcd-")
            .tempdir()?;
        let host = |i: usize| format!("127.{x}.{y}.{}", i + 1);
        let initial_cluster = (0..count)
            .map(|i| format!("m{i}=http://{}:{PEER_PORT}", host(i)))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("shop-mesh-{x}-{y}-{}", std::process::id());
        let mut members = Vec::with_capacity(count);
        for i in 0..count {
            let name = format!("m{i}");
            let client_url = format!("http://{}:{CLIENT_PORT}", host(i));
            let peer_url = format!("http://{}:{PEER_PORT}", host(i));
            let args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", dir.path().join(&name).display()),
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster={initial_cluster}"),
                // Ignored once the data dir exists, so a restart rejoins.
                "--initial-cluster-state=new".to_owned(),
                format!("--initial-cluster-token={token}"),
                "--logger=zap".to_owned(),
                "--log-outputs=stderr".to_owned(),
                "--log-level=warn".to_owned(),
            ];
            let client = Etcd::connect(std::slice::from_ref(&client_url), Duration::from_secs(1))?
                .with_request_timeout(Duration::from_secs(2));
            members.push(Member {
                log: dir.path().join(format!("{name}.log")),
                name,
                client_url,
                args,
                child: None,
                id: 0,
                client,
            });
        }
        let mut cluster = EtcdCluster { members, dir };
        // All at once: none is ready before a quorum has started.
        for i in 0..count {
            cluster.spawn(bin, i)?;
        }
        for i in 0..count {
            cluster.ready(i).await?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, bin: &Path, i: usize) -> anyhow::Result<()> {
        let member = &mut self.members[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(&member.log)
            .with_context(|| format!("cannot open {}", member.log.display()))?;
        let child = Command::new(bin)
            .args(&member.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        member.child = Some(child);
        Ok(())
    }

    /// Polls member `i`'s status until it follows a leader.
    async fn ready(&mut self, i: usize) -> anyhow::Result<()> {
        let give_up = Instant::now() + PATIENCE;
        loop {
            let member = &mut self.members[i];
            let child = member.child.as_mut().context("the member is not running")?;
            if let Some(status) = child.try_wait()? {
                bail!(
                    "etcd member {} exited ({status}) before it was ready: {}",
                    member.name,
                    tail(&member.log)
                );
            }
            match member.client.status().await {
                Ok(status) if status.leader_id != 0 => {
                    member.id = status.member_id;
                    return Ok(());
                }
                Ok(_) | Err(_) if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(_) => bail!(
                    "etcd member {} found no leader within {PATIENCE:?}: {}",
                    member.name,
                    tail(&member.log)
                ),
                Err(err) => bail!(
                    "etcd member {} was not ready within {PATIENCE:?} ({err}): {}",
                    member.name,
                    tail(&member.log)
                ),
            }
        }
    }

    /// The members' client URLs, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The temporary directory holding the members' data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether member `i` is running (not killed or stopped).
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// kill -9 member `i`, waiting for it to die.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let member = &mut self.members[i];
        let mut child = member.child.take().context("the member is not running")?;
        child
            .kill()
            .await
            .with_context(|| format!("cannot kill etcd member {}", member.name))
    }

    /// SIGTERM member `i` and wait for it to exit.
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        let member = &mut self.members[i];
        let mut child = member.child.take().context("the member is not running")?;
        let pid = child.id().context("the member has exited")?;
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM)
            .with_context(|| format!("cannot stop etcd member {}", member.name))?;
        tokio::time::timeout(PATIENCE, child.wait())
            .await
            .with_context(|| format!("etcd member {} ignored SIGTERM", member.name))??;
        Ok(())
    }

    /// Starts member `i` again on its address and data dir, and waits
    /// until it has rejoined and follows a leader.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(!self.is_running(i), "etcd member {i} is running");
        let bin = etcd_binary().context("etcd is no longer installed")?;
        self.spawn(&bin, i)?;
        self.ready(i).await
    }

    /// Starts every stopped or killed member again at once, and waits
    /// until each follows a leader: after a whole-cluster outage no member
    /// alone has a quorum to be ready with.
    pub async fn restart_all(&mut self) -> anyhow::Result<()> {
        let bin = etcd_binary().context("etcd is no longer installed")?;
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|i| !self.is_running(*i))
            .collect();
        for i in &stopped {
            self.spawn(&bin, *i)?;
        }
        for i in stopped {
            self.ready(i).await?;
        }
        Ok(())
    }

    /// The index of the member the running members agree leads, waiting
    /// (under a deadline) through an election.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let give_up = Instant::now() + PATIENCE;
        loop {
            for member in self.members.iter().filter(|m| m.child.is_some()) {
                let Ok(status) = member.client.status().await else {
                    continue;
                };
                if let Some(leader) = self
                    .members
                    .iter()
                    .position(|m| m.child.is_some() && m.id == status.leader_id)
                {
                    return Ok(leader);
                }
            }
            if Instant::now() > give_up {
                bail!("no running etcd member followed a running leader within {PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `etcd` on PATH, or Debian's: where the harness finds the binary it
/// starts, and how a test tells whether etcd is installed here.
pub fn etcd_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|bin| bin.is_file())
    });
    on_path.or_else(|| {
        let debian = PathBuf::from("/usr/bin/etcd");
        debian.is_file().then_some(debian)
    })
}

/// The last lines of a member's log, for an error.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
