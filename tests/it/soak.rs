//! The reliability suite's short form: each fault against the real
//! processes under 64 retrying clients, then the invariants against the
//! databases. `shop-mesh soak` runs the long form.

use std::path::Path;
use std::time::Duration;

use shop_mesh::registry::StoreKind;
use shop_mesh::soak::{Plan, Report, Scenario, run_scenario};

use crate::shop::{Backend, TestDb};

use crate::BIN;
/// Long enough for a 4 s fault past the 3 s unhealthy timeout the suite's
/// processes run with.
const DURATION: Duration = Duration::from_secs(12);
const CLIENTS: usize = 64;

fn holds(report: &Report) {
    let row = report.row();
    let o = &report.outcome;
    assert!(o.placed.len() > 100, "the load ran: {row}");
    assert!(report.violations.is_empty(), "{row}");
    assert!(o.wrong.is_empty(), "answers no client should get: {row}");
    if report.fault_is_redundant() {
        assert!(
            o.failed.is_empty(),
            "no order may fail for good: {row} {:?}",
            o.failed
        );
    } else {
        assert_eq!(
            report.failed_after_repair(),
            0,
            "orders failed after the repair: {row}"
        );
    }
    for (role, code) in &report.exits {
        assert_eq!(
            *code,
            Some(0),
            "the {role} process's exit on SIGTERM: {row}"
        );
    }
}

async fn scenario(scenario: Scenario, database_url: Option<&str>) {
    run(scenario, database_url, StoreKind::Memory, false).await;
}

/// Credentials are on in every scenario (as by default); `tls`: mutual
/// TLS on every port too.
async fn run(scenario: Scenario, database_url: Option<&str>, store: StoreKind, tls: bool) {
    let plan = Plan {
        clients: CLIENTS,
        duration: DURATION,
        database_url,
        store,
        tls,
    };
    let report = run_scenario(Path::new(BIN), scenario, plan)
        .await
        .unwrap_or_else(|err| panic!("{}: {err:#}", scenario.name()));
    holds(&report);
}

/// The cluster's scenarios run where etcd is installed; without it they
/// say SKIPPED (under CI its absence fails them).
fn etcd_here() -> bool {
    let installed = shop_mesh::harness::etcd_binary().is_some();
    if !installed {
        assert!(
            std::env::var_os("CI").is_none(),
            "etcd must be installed in CI"
        );
        crate::skipped(
            "the soak's etcd scenarios: etcd is not installed (apt-get install etcd-server)",
        );
    }
    installed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_registry_node_of_a_cluster() {
    if etcd_here() {
        run(Scenario::KillRegistry, None, StoreKind::Etcd, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_etcd_leader_under_a_cluster() {
    if etcd_here() {
        run(Scenario::KillEtcdLeader, None, StoreKind::Etcd, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline() {
    scenario(Scenario::Baseline, None).await;
}

/// Over mutual TLS: every process, and the load's clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_product_over_mutual_tls() {
    run(Scenario::KillProduct, None, StoreKind::Memory, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_an_order_instance() {
    scenario(Scenario::KillOrder, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_registry() {
    scenario(Scenario::KillRegistry, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_a_product_past_the_unhealthy_timeout() {
    scenario(Scenario::StopProduct, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_the_sqlite_product_database() {
    scenario(Scenario::SqliteLocked, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_mariadb_connections() {
    let Some(db) = TestDb::create(Backend::MySql, "soak_mysql_kill").await else {
        return;
    };
    let url = db.service("shop").database_url.expect("a server database");
    scenario(Scenario::MysqlKill, Some(&url)).await;
}
