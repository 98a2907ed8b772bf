//! Order ids: unique across instances because each instance leases its
//! worker id from the database the orders are stored in.

use std::collections::HashSet;
use std::time::Duration;

use sea_orm::{ActiveValue::Set, EntityTrait};
use shop_mesh::shop::ids::{IdGenerator, lease, worker_of};
use shop_mesh::shop::{Error, db};

use super::{Backend, TestDb, backend_tests};

backend_tests!(two_instances_never_share_a_worker_id);

async fn two_instances_never_share_a_worker_id(backend: Backend, test: &str) {
    let Some(test_db) = TestDb::create(backend, test).await else {
        return;
    };
    let db = db::open::<shop_mesh::order::store::Migrator>(&test_db.service("order"), "order")
        .await
        .expect("open the order database");
    let lease_for = Duration::from_secs(30);
    let a = IdGenerator::claim(db.clone(), lease_for).await.unwrap();
    let b = IdGenerator::claim(db.clone(), lease_for).await.unwrap();
    let (worker_a, worker_b) = (a.worker().unwrap(), b.worker().unwrap());
    assert_ne!(worker_a, worker_b);

    let mut seen = HashSet::new();
    for generator in [&a, &b] {
        let mut last = 0;
        for _ in 0..20_000 {
            let id = generator.next().unwrap();
            assert!(id > last, "ids only grow");
            assert_eq!(worker_of(id), generator.worker().unwrap());
            assert!(seen.insert(id), "id {id} made twice");
            last = id;
        }
    }

    // Another instance took a's worker id (a's lease had lapsed while it
    // was cut off): a notices at its renewal and moves to a free one.
    lease::Entity::update(lease::ActiveModel {
        worker_id: Set(worker_a as i32),
        holder: Set("someone else".into()),
        expires_at: Set(i64::MAX),
    })
    .exec(&db)
    .await
    .unwrap();
    a.renew().await.unwrap();
    let moved = a.worker().unwrap();
    assert!(
        moved != worker_a && moved != worker_b,
        "a took worker {moved}"
    );

    // A released worker id is free for the next instance at once.
    b.release().await;
    assert!(
        matches!(b.next(), Err(Error::Unavailable(_))),
        "no lease, no ids"
    );
    let c = IdGenerator::claim(db.clone(), lease_for).await.unwrap();
    assert_eq!(c.worker(), Some(worker_b));
}
