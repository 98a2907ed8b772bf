//! One process of the real binary, watched from outside: its JSON log
//! lines and its standard output collected as they come, its address read
//! from its log, and signals sent to it for real. The soak's deployment and
//! the end-to-end tests both run the shop this way.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// How long a process may take to say something, or to exit on a signal.
const PATIENCE: Duration = Duration::from_secs(30);

/// A running process of the binary, and what it has said so far.
pub struct Process {
    /// The role it runs, as its first argument names it.
    pub role: &'static str,
    /// Where it listens, for a registry or a shop service once it said so.
    pub addr: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Child,
    log: Arc<Mutex<Vec<serde_json::Value>>>,
    stdout: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Process {
    /// Starts `bin args --log-json` (info level, `env` set) and, for a
    /// registry or a shop service, waits until it says where it listens.
    pub async fn start(
        bin: &Path,
        role: &'static str,
        args: Vec<String>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Process> {
        let mut process = Self::spawn(bin, role, args, env)?;
        let (message, field) = match role {
            "registry" => ("registry serving", "addr"),
            "user" | "product" | "order" => ("serving", "bound"),
            _ => return Ok(process),
        };
        process.addr = process.logged(message).await?[field]
            .as_str()
            .with_context(|| format!("the {role}'s {message:?} line has no {field}"))?
            .to_owned();
        Ok(process)
    }

    fn spawn(
        bin: &Path,
        role: &'static str,
        args: Vec<String>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Process> {
        let mut child = Command::new(bin)
            .args(&args)
            .arg("--log-json")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            // A line that is not JSON (a panic, a library's own print) is
            // kept as a string, so nothing the process says is lost.
            collect(child.stderr.take().expect("piped"), log.clone(), |line| {
                Some(serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line)))
            }),
            collect(child.stdout.take().expect("piped"), stdout.clone(), Some),
        ];
        Ok(Process {
            role,
            addr: String::new(),
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child,
            log,
            stdout,
            readers,
        })
    }

    /// The fields of the first log line whose message is `message`,
    /// waiting for it.
    pub async fn logged(&mut self, message: &str) -> anyhow::Result<serde_json::Value> {
        Ok(self.log_line(message).await?["fields"].take())
    }

    /// The whole first log line whose message is `message` (its fields,
    /// its target, the spans it was logged in), waiting for it.
    pub async fn log_line(&mut self, message: &str) -> anyhow::Result<serde_json::Value> {
        let found = |log: &[serde_json::Value]| {
            log.iter()
                .find(|line| line["fields"]["message"] == message)
                .cloned()
        };
        self.until(&format!("log {message:?}"), |p| found(&p.log.lock()))
            .await
    }

    /// Everything it has said so far, log and standard output, as text.
    pub fn said(&self) -> String {
        let mut all: Vec<String> = self
            .log
            .lock()
            .iter()
            .map(|line| line.to_string())
            .collect();
        all.extend(self.stdout.lock().iter().cloned());
        all.join("\n")
    }

    /// How many log lines so far say `message`.
    pub fn count_logged(&self, message: &str) -> usize {
        self.log
            .lock()
            .iter()
            .filter(|line| line["fields"]["message"] == message)
            .count()
    }

    /// Its standard output up to and with the first line `last` accepts,
    /// waiting for it.
    pub async fn printed(&mut self, last: impl Fn(&str) -> bool) -> anyhow::Result<Vec<String>> {
        self.until("print the line waited for", |p| {
            let out = p.stdout.lock();
            let end = out.iter().position(|line| last(line))?;
            Some(out[..=end].to_vec())
        })
        .await
    }

    /// Polls `found` until it answers, the process exits, or patience ends.
    async fn until<T>(
        &mut self,
        what: &str,
        found: impl Fn(&Process) -> Option<T>,
    ) -> anyhow::Result<T> {
        let give_up = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(found) = found(self) {
                return Ok(found);
            }
            if let Some(status) = self.child.try_wait()? {
                let log: Vec<String> = self.log.lock().iter().map(|l| l.to_string()).collect();
                bail!(
                    "the {} exited ({status}) before it would {what}: {}",
                    self.role,
                    log.join("\n")
                );
            }
            if tokio::time::Instant::now() > give_up {
                bail!("the {} did not {what} within {PATIENCE:?}", self.role);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// CPU time (user + system) the process has used, while it runs.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time(self.pid()?.as_raw().try_into().ok()?)
    }

    /// Its resident memory, while it runs.
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.pid()?.as_raw().try_into().ok()?)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<Pid> {
        self.child.id().map(|id| Pid::from_raw(id as i32))
    }

    /// Sends it `signal` (SIGSTOP to freeze it, SIGTERM to stop it).
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("the process has exited")?;
        kill(pid, signal).with_context(|| format!("cannot send {signal} to the {}", self.role))
    }

    /// Sends `signal` and waits for the exit, and for the last of its
    /// output to be read; its exit code (None when a signal ended it).
    pub async fn stop_with(&mut self, signal: Signal) -> anyhow::Result<Option<i32>> {
        if self.child.try_wait()?.is_some() {
            bail!("the {} had exited already", self.role);
        }
        self.signal(signal)?;
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .with_context(|| {
                format!(
                    "the {} did not exit within {PATIENCE:?} of {signal}",
                    self.role
                )
            })??;
        for reader in self.readers.drain(..) {
            let _ = reader.await;
        }
        Ok(status.code())
    }

    /// kill -9.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.stop_with(Signal::SIGKILL).await.map(drop)
    }

    /// SIGTERM (after SIGCONT, in case it is stopped); its exit code, or
    /// None when it had exited already.
    pub async fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        if self.child.try_wait()?.is_some() {
            return Ok(None);
        }
        self.signal(Signal::SIGCONT)?;
        self.stop_with(Signal::SIGTERM).await
    }

    /// The same process again, same arguments and environment, on the
    /// address it had (one started on port 0 comes back on the port it
    /// got), with its data dir.
    pub async fn restart(&mut self, bin: &Path) -> anyhow::Result<()> {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut args = self.args.clone();
        if let Some(listen) = args.iter().position(|arg| arg == "--listen")
            && !self.addr.is_empty()
            && let Some(value) = args.get_mut(listen + 1)
        {
            value.clone_from(&self.addr);
        }
        *self = Process::start(bin, self.role, args, &env).await?;
        Ok(())
    }
}

/// Reads `from` line by line into `into`, keeping what `keep` maps.
fn collect<T: Send + 'static>(
    from: impl AsyncRead + Unpin + Send + 'static,
    into: Arc<Mutex<Vec<T>>>,
    keep: impl Fn(String) -> Option<T> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(from).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(kept) = keep(line) {
                into.lock().push(kept);
            }
        }
    })
}

/// The CPU time (user + system) process `pid` has used, where /proc
/// tells it.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The resident memory (VmRSS) of process `pid`, where /proc tells it.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
