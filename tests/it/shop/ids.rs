//! Order ids: unique across instances because each instance leases its
//! worker id from the database the orders are stored in, and hold it
//! until their last call ended.

use std::collections::HashSet;
use std::time::Duration;

use sea_orm::{ActiveValue::Set, ConnectionTrait, EntityTrait};
use shop_mesh::order::store::request;
use shop_mesh::pb::shop as pb;
use shop_mesh::shop::ids::{IdGenerator, lease, worker_of};
use shop_mesh::shop::{Error, ORDER_SERVICE, db};

use super::{Backend, TestDb, TestShop, backend_tests};
use crate::wait_until;

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

/// A call open when the order instance is told to stop still gets its ids:
/// the lease is given back only after the server drained. The call is held
/// open by the product database's write lock, which its DeductStock waits
/// on, until the instance has left the registry and is draining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_open_at_shutdown_still_gets_its_order() {
    let Some(shop) = TestShop::start(
        Backend::Sqlite,
        "a_call_open_at_shutdown_still_gets_its_order",
        1,
        1,
    )
    .await
    else {
        return;
    };
    let registry = shop.registry.client().await;
    let orders_db = shop.db.connect("order").await;
    // One connection, so the lock and its release are on the same one.
    let product_url = db::url(&shop.db.service("product"), "product");
    let locker = db::connect(&product_url, 1).await.unwrap();
    locker.execute_unprepared("BEGIN EXCLUSIVE").await.unwrap();

    let call = tokio::spawn({
        let mut orders = shop.orders();
        async move {
            orders
                .place_order(pb::PlaceOrderRequest {
                    user_id: 1001,
                    product_id: 1001,
                    count: 1,
                    request_id: "open-at-shutdown".into(),
                })
                .await
        }
    });
    wait_until("the order to be under way", Duration::from_secs(10), || {
        let orders_db = orders_db.clone();
        async move { super::rows(&orders_db, request::Entity).await == 1 }
    })
    .await;
    shop.signal(shop_mesh::roles::ShopRole::Order);
    wait_until(
        "the order instance to leave the registry",
        Duration::from_secs(10),
        || {
            let mut registry = registry.clone();
            async move {
                crate::instances(&mut registry, ORDER_SERVICE, false)
                    .await
                    .is_empty()
            }
        },
    )
    .await;
    locker.execute_unprepared("ROLLBACK").await.unwrap();

    let placed = call.await.unwrap();
    let placed = placed
        .expect("a call open at shutdown is served to its end")
        .into_inner();
    assert_eq!(placed.request_id, "open-at-shutdown");
    shop.stop().await;
    assert_eq!(
        super::rows(&orders_db, lease::Entity).await,
        0,
        "the lease is given back once the instance stopped"
    );
}
