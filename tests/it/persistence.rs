//! The registry's data dir: persistent instances and service settings
//! survive restarts in the snapshot-and-log format, a crash in the middle
//! of a write costs only the change being written, a `registry.json` from
//! earlier versions is taken over, one registry at a time holds a dir,
//! and a change writes in proportion to itself rather than to the state.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use shop_mesh::harness::Process;
use shop_mesh::pb::registry as pb;
use shop_mesh::pb::registry::registry_client::RegistryClient;
use tonic::transport::Channel;

use crate::{BIN, TestRegistry, deregister, instance, instances, register, run_bin, skipped};

/// A persistent instance of `service` on 127.0.0.1:`port`.
fn persistent(service: &str, port: u32) -> pb::Instance {
    pb::Instance {
        ephemeral: Some(false),
        ..instance(service, port)
    }
}

/// The ports of `service`'s instances, sorted.
async fn ports(client: &mut RegistryClient<Channel>, service: &str) -> Vec<u32> {
    let mut ports: Vec<u32> = instances(client, service, false)
        .await
        .iter()
        .map(|i| i.port)
        .collect();
    ports.sort_unstable();
    ports
}

fn config(dir: &Path) -> shop_mesh::registry::Config {
    shop_mesh::registry::Config {
        data_dir: dir.into(),
        // Nothing listens on the instances' ports; probes need not run.
        probe_interval: Duration::from_secs(3600),
        ..crate::without_credentials()
    }
}

#[tokio::test]
async fn persistent_instances_and_settings_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start_on(config(dir.path())).await;
    let mut client = registry.client().await;
    for port in 1..=3 {
        register(&mut client, persistent("db", port)).await;
    }
    register(&mut client, instance("cache", 9)).await;
    deregister(&mut client, "db", 2).await.unwrap();
    let mut replaced = persistent("db", 3);
    replaced.weight = Some(5.0);
    register(&mut client, replaced).await;
    // Settings outlive the service's last instance.
    register(&mut client, instance("settings-only", 1)).await;
    client
        .update_service(pb::UpdateServiceRequest {
            service: "settings-only".into(),
            protect_threshold: 0.25,
            ..Default::default()
        })
        .await
        .unwrap();
    deregister(&mut client, "settings-only", 1).await.unwrap();
    registry.stop().await;

    for restart in 1..=2 {
        let registry = TestRegistry::start_on(config(dir.path())).await;
        let mut client = registry.client().await;
        assert_eq!(ports(&mut client, "db").await, [1, 3], "restart {restart}");
        let weight = instances(&mut client, "db", false).await[1].weight;
        assert_eq!(weight, Some(5.0), "the last write of an instance wins");
        assert!(
            instances(&mut client, "cache", false).await.is_empty(),
            "ephemeral instances are not kept"
        );
        let settings = client
            .get_service(pb::GetServiceRequest {
                service: "settings-only".into(),
                ..Default::default()
            })
            .await
            .expect("a service with settings outlives a restart")
            .into_inner();
        assert_eq!(settings.protect_threshold, 0.25);
        registry.stop().await;
    }
}

#[tokio::test]
async fn a_torn_last_record_is_dropped_and_the_rest_loads() {
    let dir = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start_on(config(dir.path())).await;
    let mut client = registry.client().await;
    for port in 1..=3 {
        register(&mut client, persistent("db", port)).await;
    }
    registry.stop().await;

    // A crash in the middle of writing the last record.
    let log = dir.path().join("changes.log");
    let len = std::fs::metadata(&log).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(len - 10)
        .unwrap();

    let registry = TestRegistry::start_on(config(dir.path())).await;
    let mut client = registry.client().await;
    assert_eq!(ports(&mut client, "db").await, [1, 2]);
    // What is written after the torn record is not lost behind it.
    register(&mut client, persistent("db", 4)).await;
    registry.stop().await;

    let registry = TestRegistry::start_on(config(dir.path())).await;
    let mut client = registry.client().await;
    assert_eq!(ports(&mut client, "db").await, [1, 2, 4]);
    registry.stop().await;
}

#[tokio::test]
async fn a_registry_json_of_the_previous_format_is_taken_over_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("registry.json"),
        include_str!("fixtures/registry-v1.json"),
    )
    .unwrap();
    let registry = TestRegistry::start_on(config(dir.path())).await;
    let mut client = registry.client().await;
    let db = instances(&mut client, "db", false).await;
    assert!(db.is_empty());
    let mysql = instances(&mut client, "mysql", false).await;
    assert_eq!(mysql.len(), 2);
    assert_eq!(mysql[0].port, 1);
    assert_eq!(mysql[0].weight, Some(2.0));
    assert_eq!(
        mysql[0].metadata.get("role").map(String::as_str),
        Some("primary")
    );
    assert_eq!(mysql[1].enabled, Some(false));
    assert!(!dir.path().join("registry.json").exists());
    assert!(dir.path().join("registry.json.migrated").exists());
    register(&mut client, persistent("mysql", 3)).await;
    deregister(&mut client, "mysql", 1).await.unwrap();
    registry.stop().await;

    let registry = TestRegistry::start_on(config(dir.path())).await;
    let mut client = registry.client().await;
    assert_eq!(ports(&mut client, "mysql").await, [2, 3]);
    let service = client
        .get_service(pb::GetServiceRequest {
            service: "mysql".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(service.protect_threshold, 0.5, "settings came across too");
    registry.stop().await;
}

/// `shop-mesh registry --data-dir dir` on a free loopback port.
async fn registry_process(dir: &Path) -> anyhow::Result<Process> {
    let args = ["registry", "--listen", "127.0.0.1:0", "--data-dir"];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.push(dir.display().to_string());
    let no_probes = [
        ("SHOP_MESH__REGISTRY__PROBE_INTERVAL", "1h"),
        crate::CREDENTIALS_OFF,
    ];
    Process::start(Path::new(BIN), "registry", args, &no_probes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_registry_on_a_data_dir_is_refused_naming_the_holder_until_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("registry");
    let mut first = registry_process(&data).await.unwrap();
    let pid = first.pid().unwrap();
    let mut client = RegistryClient::connect(format!("http://{}", first.addr))
        .await
        .unwrap();
    register(&mut client, persistent("db", 1)).await;

    let data_arg = data.display().to_string();
    let (ok, _, stderr) = run_bin(&[
        "registry",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_arg,
    ])
    .await;
    assert!(!ok, "a second registry on the dir started: {stderr}");
    assert!(
        stderr.contains(&format!(
            "data dir {data_arg} is in use by another registry"
        )) && stderr.contains(&format!("pid {pid}, listening on {}", first.addr)),
        "the refusal names the dir and its holder: {stderr}"
    );

    // `up` runs a registry on <data-dir>/registry: refused the same way.
    let config = dir.path().join("port-0.toml");
    let port_0 = ["registry", "user", "product", "order"]
        .map(|role| format!("[{role}]\nlisten = \"127.0.0.1:0\"\n"))
        .concat();
    std::fs::write(&config, port_0).unwrap();
    let (ok, _, stderr) = run_bin(&[
        "--config",
        &config.display().to_string(),
        "up",
        "--data-dir",
        &dir.path().display().to_string(),
    ])
    .await;
    assert!(!ok, "up started beside the registry: {stderr}");
    assert!(
        stderr.contains("error: the registry at ")
            && stderr.contains(&format!(
                ": data dir {data_arg} is in use by another registry (pid {pid}, listening on {})",
                first.addr
            )),
        "up names the holder: {stderr}"
    );

    // A crash releases the dir; the next registry has the instance.
    first.stop_with(Signal::SIGKILL).await.unwrap();
    let second = registry_process(&data).await.unwrap();
    let mut client = RegistryClient::connect(format!("http://{}", second.addr))
        .await
        .unwrap();
    assert_eq!(ports(&mut client, "db").await, [1]);
}

#[tokio::test]
async fn a_data_dir_that_is_a_file_is_named_in_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let file = file.display().to_string();
    let (ok, _, stderr) =
        run_bin(&["registry", "--listen", "127.0.0.1:0", "--data-dir", &file]).await;
    assert!(!ok);
    assert!(
        stderr.contains(&format!("data dir {file} is a file; expected a directory")),
        "{stderr}"
    );
}

/// Bytes and write calls a process has made so far, where /proc tells.
fn written(pid: nix::unistd::Pid) -> Option<(u64, u64)> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    Some((field("wchar:")?, field("syscw:")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_persistent_change_writes_in_proportion_to_itself_not_to_the_state() {
    // A state of a few thousand persistent instances, as an earlier
    // version left it.
    let dir = tempfile::tempdir().unwrap();
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/registry-v1.json")).unwrap();
    let template = fixture["instances"][0].clone();
    let seeded: Vec<serde_json::Value> = (1..=3000)
        .map(|port| {
            let mut instance = template.clone();
            instance["addr"]["port"] = port.into();
            instance
        })
        .collect();
    let state = serde_json::json!({ "format": 1, "services": [], "instances": seeded });
    let state = serde_json::to_vec(&state).unwrap();
    std::fs::write(dir.path().join("registry.json"), &state).unwrap();

    let registry = registry_process(dir.path()).await.unwrap();
    let mut client = RegistryClient::connect(format!("http://{}", registry.addr))
        .await
        .unwrap();
    assert_eq!(instances(&mut client, "mysql", false).await.len(), 3000);
    let pid = registry.pid().unwrap();
    let Some(before) = written(pid) else {
        skipped("/proc/<pid>/io is not readable here");
        return;
    };
    register(&mut client, persistent("mysql", 4000)).await;
    let after = written(pid).unwrap();
    let (bytes, calls) = (after.0 - before.0, after.1 - before.1);
    let state = state.len() as u64;
    assert!(
        bytes < state / 20,
        "one registration wrote {bytes} bytes; the state is {state} bytes"
    );
    assert!(calls < 100, "one registration took {calls} write calls");
}
