//! The registry as a real process, killed and restarted for real while its
//! clients go on.

use std::path::Path;
use std::time::Duration;

use shop_mesh::harness::Process;
use shop_mesh::pb::registry as pb;
use shop_mesh::pb::registry::registry_client::RegistryClient;
use tonic::Code;

use crate::{BIN, instance, instances, keep_alive, register, wait_until};

/// `shop-mesh registry` on `listen` with its data under `dir`.
async fn registry(listen: &str, dir: &Path) -> Process {
    let args = ["registry", "--listen", listen, "--data-dir"]
        .iter()
        .map(|a| a.to_string())
        .chain([dir.display().to_string()])
        .collect();
    Process::start(Path::new(BIN), "registry", args, &[crate::CREDENTIALS_OFF])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_from_before_a_restart_is_unknown_after_it_and_keeps_nobody_alive() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = registry("127.0.0.1:0", dir.path()).await;
    let addr = process.addr.clone();
    let url = format!("http://{addr}");
    let short_lived = |port| pb::Instance {
        heartbeat_interval_ms: Some(500),
        unhealthy_timeout_ms: Some(1_500),
        delete_timeout_ms: Some(60_000),
        ..instance("server-product", port)
    };

    // The owner of `a` registers, then the registry dies and comes back on
    // the same port.
    let mut client = RegistryClient::connect(url.clone()).await.unwrap();
    let old_lease = register(&mut client, short_lived(1)).await.lease_id;
    process.kill().await.unwrap();
    let _process = registry(&addr, dir.path()).await;
    let mut client = RegistryClient::connect(url).await.unwrap();

    // `b` registers on the new run and keeps its lease alive (one
    // heartbeat on an open stream lasts the default 15 s).
    let b_lease = register(&mut client, instance("server-product", 2))
        .await
        .lease_id;
    let (beats, mut answers) = keep_alive(&mut client, b_lease).await;
    answers
        .message()
        .await
        .unwrap()
        .expect("a heartbeat answer");

    // `a`'s owner comes back with the lease it held before the restart, as
    // a registrar does on reconnecting: no lease of the new run is it.
    let err = client
        .register(pb::RegisterRequest {
            instance: Some(short_lived(1)),
            lease_id: old_lease,
        })
        .await
        .expect_err("a lease of the previous run is not a lease of this one");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Registered anew and then silent, `a` turns unhealthy on its own
    // timeout while `b`'s heartbeats go on.
    register(&mut client, short_lived(1)).await;
    wait_until("a unhealthy", Duration::from_secs(20), || {
        let mut client = client.clone();
        async move {
            let listed = instances(&mut client, "server-product", false).await;
            listed.iter().any(|i| i.port == 1 && !i.healthy)
        }
    })
    .await;
    let listed = instances(&mut client, "server-product", false).await;
    assert!(
        listed.iter().any(|i| i.port == 2 && i.healthy),
        "{listed:?}"
    );
    assert!(
        listed.iter().all(|i| i.lease_id == 0),
        "lease ids are their owners' secret: {listed:?}"
    );
    drop(beats);
}
