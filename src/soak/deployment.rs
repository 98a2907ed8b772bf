//! The shop as separate processes of the real binary: a registry on a
//! fixed loopback port (so it can be restarted where its clients look),
//! user, two products and two orders on port 0, addresses read from their
//! JSON logs. Processes can be killed, stopped, continued and restarted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Timings short enough that a fault and its recovery fit in seconds.
const ENV: &[(&str, &str)] = &[
    ("SHOP_MESH__REGISTRY__HEARTBEAT_INTERVAL", "1s"),
    ("SHOP_MESH__REGISTRY__MIN_HEARTBEAT_INTERVAL", "500ms"),
    ("SHOP_MESH__REGISTRY__UNHEALTHY_TIMEOUT", "3s"),
    ("SHOP_MESH__REGISTRY__DELETE_TIMEOUT", "6s"),
    ("SHOP_MESH__DISCOVERY__CALL_TIMEOUT", "2s"),
    ("SHOP_MESH__SHOP__PENDING_TIMEOUT", "4s"),
    ("SHOP_MESH__SHOP__SWEEP_INTERVAL", "500ms"),
];

/// One process of the deployment.
pub struct Process {
    pub role: &'static str,
    args: Vec<String>,
    child: Child,
    log: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Where it listens, once it said so.
    pub addr: String,
}

impl Process {
    async fn start(bin: &Path, role: &'static str, args: Vec<String>) -> anyhow::Result<Process> {
        let mut child = Command::new(bin)
            .args(&args)
            .arg("--log-json")
            .env("RUST_LOG", "info")
            .envs(ENV.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        tokio::spawn({
            let log = log.clone();
            async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(line) = serde_json::from_str::<serde_json::Value>(&line) {
                        log.lock().push(line);
                    }
                }
            }
        });
        let mut process = Process {
            role,
            args,
            child,
            log,
            addr: String::new(),
        };
        let (message, field) = if role == "registry" {
            ("registry serving", "addr")
        } else {
            ("serving", "bound")
        };
        process.addr = process.logged(message, field).await?;
        Ok(process)
    }

    /// The field `field` of the first log line saying `message`.
    async fn logged(&mut self, message: &str, field: &str) -> anyhow::Result<String> {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let found = self
                .log
                .lock()
                .iter()
                .find(|line| line["fields"]["message"] == message)
                .and_then(|line| line["fields"][field].as_str().map(str::to_owned));
            if let Some(found) = found {
                return Ok(found);
            }
            if let Some(status) = self.child.try_wait()? {
                let errors: Vec<String> = self.log.lock().iter().map(|l| l.to_string()).collect();
                bail!(
                    "the {} process exited ({status}): {}",
                    self.role,
                    errors.join("\n")
                );
            }
            if tokio::time::Instant::now() > give_up {
                bail!(
                    "the {} process did not log {message:?} within 30 s",
                    self.role
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> Option<Pid> {
        self.child.id().map(|id| Pid::from_raw(id as i32))
    }

    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("the process has exited")?;
        kill(pid, signal).with_context(|| format!("cannot send {signal} to the {}", self.role))
    }

    /// kill -9, and wait until it is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM, and its exit code.
    pub async fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        if self.child.try_wait()?.is_some() {
            return Ok(None);
        }
        self.signal(Signal::SIGCONT)?;
        self.signal(Signal::SIGTERM)?;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .with_context(|| format!("the {} did not stop within 30 s of SIGTERM", self.role))??;
        Ok(status.code())
    }

    /// The same process again, with the same arguments (a registry comes
    /// back on its port, with its data dir).
    pub async fn restart(&mut self, bin: &Path) -> anyhow::Result<()> {
        let again = Process::start(bin, self.role, self.args.clone()).await?;
        *self = again;
        Ok(())
    }
}

/// Registry, user, two products, two orders.
pub struct Deployment {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub database_url: Option<String>,
    pub registry: Process,
    pub user: Process,
    pub products: Vec<Process>,
    pub orders: Vec<Process>,
}

impl Deployment {
    pub async fn start(
        bin: &Path,
        dir: &Path,
        database_url: Option<&str>,
    ) -> anyhow::Result<Deployment> {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.port()
        };
        let registry_addr = format!("127.0.0.1:{port}");
        let registry = Process::start(
            bin,
            "registry",
            vec![
                "registry".into(),
                "--listen".into(),
                registry_addr.clone(),
                "--data-dir".into(),
                dir.join("registry").display().to_string(),
            ],
        )
        .await?;
        let service = |role: &'static str| {
            let mut args = vec![
                role.to_string(),
                "--registry".into(),
                registry_addr.clone(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                dir.join(role).display().to_string(),
            ];
            if let Some(url) = database_url {
                args.extend(["--database-url".into(), url.to_string()]);
            }
            args
        };
        // One at a time: instances of one service sharing a database
        // migrate it once.
        let user = Process::start(bin, "user", service("user")).await?;
        let mut products = Vec::new();
        for _ in 0..2 {
            products.push(Process::start(bin, "product", service("product")).await?);
        }
        let mut orders = Vec::new();
        for _ in 0..2 {
            orders.push(Process::start(bin, "order", service("order")).await?);
        }
        Ok(Deployment {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            database_url: database_url.map(str::to_owned),
            registry,
            user,
            products,
            orders,
        })
    }

    pub fn registry_addr(&self) -> String {
        self.registry.addr.clone()
    }

    /// The database URL a role stores in.
    pub fn url(&self, role: &str) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.dir.join(role).join(format!("{role}.db")).display()
            ),
        }
    }

    /// SIGTERM to everything, services first; their exit codes.
    pub async fn stop(mut self) -> anyhow::Result<Vec<(&'static str, Option<i32>)>> {
        let mut codes = Vec::new();
        for process in self.orders.iter_mut().chain(self.products.iter_mut()) {
            codes.push((process.role, process.terminate().await?));
        }
        codes.push(("user", self.user.terminate().await?));
        codes.push(("registry", self.registry.terminate().await?));
        Ok(codes)
    }
}
