//! Connections that never speak: closed after the first-byte timeout, never
//! more of them held than a port's cap, and a process out of file
//! descriptors that pauses its accepts, says so, stays off the CPU and
//! serves again once the descriptors are freed. Each runs the real binary:
//! its settings come from its environment, its file limit from the shell
//! that starts it.

use std::path::Path;
use std::time::Duration;

use shop_mesh::harness::Process;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::{BIN, serving, wait_until};

/// How long anything here may take before it counts as never: far beyond
/// the timeouts the tests set, so a loaded machine does not fail them.
const PATIENCE: Duration = Duration::from_secs(60);

/// A registry process on 127.0.0.1:0 under `dir`, with `env`; with
/// `file_limit`, it may open no more files than that (the shell sets the
/// hard limit too, so start-up cannot raise it).
async fn registry(dir: &Path, env: &[(&str, &str)], file_limit: Option<u32>) -> Process {
    let mut args: Vec<String> = ["registry", "--listen", "127.0.0.1:0", "--data-dir"]
        .map(String::from)
        .into();
    args.push(dir.display().to_string());
    let started = match file_limit {
        None => Process::start(Path::new(BIN), "registry", args, env).await,
        Some(limit) => {
            let script = format!("ulimit -n {limit} && exec \"$0\" \"$@\"");
            let mut shell = vec!["-c".to_string(), script, BIN.to_string()];
            shell.extend(args);
            Process::start(Path::new("sh"), "registry", shell, env).await
        }
    };
    started.expect("the registry starts")
}

/// `count` connections to `addr` that send nothing.
async fn silent(addr: &str, count: usize) -> Vec<TcpStream> {
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        connections.push(TcpStream::connect(addr).await.expect("connect"));
    }
    connections
}

/// Whether the server closed `stream` (the read ends, with EOF or a reset)
/// within [`PATIENCE`].
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(PATIENCE, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_the_first_byte_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("SHOP_MESH__CONNECTIONS__FIRST_BYTE_TIMEOUT", "300ms")];
    let mut registry = registry(dir.path(), &env, None).await;

    let mut quiet = TcpStream::connect(&registry.addr).await.unwrap();
    assert!(
        closed_by_server(&mut quiet).await,
        "the registry kept open a connection that sent nothing"
    );
    assert!(
        serving(registry.addr.parse().unwrap()).await,
        "a client that speaks is served"
    );
    assert_eq!(registry.terminate().await.unwrap(), Some(0));
}

const CROWD: usize = 100;

/// At the cap, further connections wait in the kernel's backlog rather
/// than being refused; silent ones make way as they time out, so a gRPC
/// client that came after a crowd of them is served, late, not starved.
/// The file limit is above cap plus the process's own files and below
/// cap plus the crowd, so without the cap the crowd would take every
/// descriptor and keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_beyond_the_cap_wait_and_time_out_without_starving_a_client() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SHOP_MESH__CONNECTIONS__FIRST_BYTE_TIMEOUT", "500ms"),
        ("SHOP_MESH__CONNECTIONS__MAX_PER_PORT", "16"),
    ];
    let mut registry = registry(dir.path(), &env, Some(64)).await;
    let addr = registry.addr.parse().unwrap();

    let mut crowd = silent(&registry.addr, CROWD).await;
    wait_until("a health check answered after the crowd", PATIENCE, || {
        serving(addr)
    })
    .await;
    for (i, quiet) in crowd.iter_mut().enumerate() {
        assert!(
            closed_by_server(quiet).await,
            "silent connection {i} of {CROWD} was kept open"
        );
    }
    assert!(
        registry.count_logged(CAP_REACHED) > 0,
        "the full port was not reported"
    );
    assert_eq!(registry.terminate().await.unwrap(), Some(0));
}

const CAP_REACHED: &str = "this port holds as many connections as connections.max_per_port allows; new ones wait until one closes";

const ACCEPT_FAILING: &str = "cannot accept connections; pausing accepts (if the error is \"too many open files\", raise the file limit, ulimit -n, or lower connections.max_per_port)";

/// More than the registry can hold under its file limit, and fewer than
/// that and its listen backlog together, so every connect completes.
const FLOOD: usize = 150;

/// A flood that takes every file descriptor: accepts fail with EMFILE
/// for as long as it stays. The registry must pause between attempts (its
/// CPU time stays a small share of the wall time, where a loop of failing
/// accepts takes a whole core), say so without a line per failure, and
/// serve again once the flood is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_accept_loop_pauses_warns_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // The flood stays open for the whole test: only its closing frees
    // descriptors, not the first-byte timeout.
    let env = [("SHOP_MESH__CONNECTIONS__FIRST_BYTE_TIMEOUT", "10m")];
    let mut registry = registry(dir.path(), &env, Some(64)).await;
    let addr = registry.addr.parse().unwrap();
    let pid = registry.pid().unwrap().as_raw() as u32;

    let flood = silent(&registry.addr, FLOOD).await;
    let window = Duration::from_secs(3);
    let cpu_before = shop_mesh::harness::cpu_time(pid).unwrap();
    let wall_before = std::time::Instant::now();
    tokio::time::sleep(window).await;
    let cpu = shop_mesh::harness::cpu_time(pid).unwrap() - cpu_before;
    let share = cpu.as_secs_f64() / wall_before.elapsed().as_secs_f64();
    assert!(
        share < 0.1,
        "the registry used {cpu:?} of CPU in {window:?} with its descriptors exhausted ({:.0} % of a core)",
        share * 100.0
    );
    let warned = registry.logged(ACCEPT_FAILING).await.unwrap();
    assert!(
        warned["err"]
            .as_str()
            .unwrap()
            .contains("Too many open files"),
        "{warned}"
    );
    assert!(
        registry.count_logged(ACCEPT_FAILING) <= 2,
        "one warning per failure: {} in {window:?}",
        registry.count_logged(ACCEPT_FAILING)
    );

    drop(flood);
    wait_until("a health check answered after the flood", PATIENCE, || {
        serving(addr)
    })
    .await;
    registry
        .logged("accepting connections again")
        .await
        .unwrap();
    assert_eq!(registry.terminate().await.unwrap(), Some(0));
}
