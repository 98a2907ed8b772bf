//! Placing orders, the seed's tests and the ways they go wrong, on each
//! database.

use std::collections::HashSet;
use std::time::Duration;

use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter};
use shop_mesh::order::store::{item, order, request};
use shop_mesh::pb::shop as pb;
use shop_mesh::product::store::{deduction, product};
use tonic::Code;

use super::{Backend, TestShop, backend_tests, rows};

backend_tests!(
    the_seeds_two_orders,
    refused_orders_write_nothing,
    two_hundred_orders_for_a_hundred_in_stock,
    the_same_request_id_buys_once,
    request_ids_that_differ_in_any_byte_are_different_orders,
    a_refused_write_restores_the_stock,
    an_abandoned_order_is_undone_by_the_sweeper,
);

fn place(user_id: i64, product_id: i64, count: i32, request_id: &str) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        user_id,
        product_id,
        count,
        request_id: request_id.into(),
    }
}

async fn stock(db: &DatabaseConnection, id: i64) -> i32 {
    product::Entity::find_by_id(id)
        .one(db)
        .await
        .expect("read product")
        .expect("product exists")
        .stock
}

/// The seed's walkthrough: 1001 of product 1001 refused, 10 accepted.
async fn the_seeds_two_orders(backend: Backend, test: &str) {
    let Some(shop) = TestShop::start(backend, test, 1, 1).await else {
        return;
    };
    let mut orders = shop.orders();
    let (products_db, orders_db) = (
        shop.db.connect("product").await,
        shop.db.connect("order").await,
    );

    let refused = orders
        .place_order(place(1001, 1001, 1001, ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        refused.message(),
        "product 1001 has 100 in stock, 1001 requested"
    );
    assert_eq!(stock(&products_db, 1001).await, 100);
    assert_eq!(rows(&orders_db, order::Entity).await, 0);
    assert_eq!(rows(&orders_db, item::Entity).await, 0);

    let placed = orders
        .place_order(place(1001, 1001, 10, ""))
        .await
        .expect("10 of 1001")
        .into_inner();
    assert_eq!(
        (
            placed.user_id,
            placed.user_name.as_str(),
            placed.phone.as_str(),
            placed.address.as_str()
        ),
        (1001, "binghe", "13212345678", "北京")
    );
    assert_eq!(placed.total_price, "23990.00");
    assert_eq!(placed.items.len(), 1);
    let line = &placed.items[0];
    assert_eq!(
        (
            line.product_id,
            line.product_name.as_str(),
            line.price.as_str(),
            line.count
        ),
        (1001, "华为", "2399.00", 10)
    );
    assert!(
        placed.request_id.starts_with("auto-"),
        "{}",
        placed.request_id
    );
    assert_eq!(stock(&products_db, 1001).await, 90);

    let stored = order::Entity::find().all(&orders_db).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, placed.id);
    assert_eq!(stored[0].total_price.to_string(), "23990.00");
    let items = item::Entity::find().all(&orders_db).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(
        (
            items[0].order_id,
            items[0].product_id,
            items[0].product_name.as_str(),
            items[0].price.to_string(),
            items[0].count
        ),
        (placed.id, 1001, "华为", "2399.00".to_string(), 10)
    );

    let got = orders
        .get_order(pb::GetOrderRequest { id: placed.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, placed);
    let listed = orders
        .list_orders(pb::ListOrdersRequest {
            user_id: 1001,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.orders, vec![placed]);
    let missing = orders
        .get_order(pb::GetOrderRequest { id: 42 })
        .await
        .unwrap_err();
    assert_eq!(
        (missing.code(), missing.message()),
        (Code::NotFound, "order 42 not found")
    );
    shop.stop().await;
}

/// Each refusal has its code and writes nothing anywhere.
async fn refused_orders_write_nothing(backend: Backend, test: &str) {
    let Some(shop) = TestShop::start(backend, test, 1, 1).await else {
        return;
    };
    let mut orders = shop.orders();
    let cases = [
        (
            place(4242, 1001, 1, "r-1"),
            Code::NotFound,
            "user 4242 not found",
        ),
        (
            place(1001, 4242, 1, "r-2"),
            Code::NotFound,
            "product 4242 not found",
        ),
        (
            place(1001, 1001, 0, "r-3"),
            Code::InvalidArgument,
            "count: must be between 1 and 10000, got 0",
        ),
        (
            place(1001, 1001, -1, "r-4"),
            Code::InvalidArgument,
            "count: must be between 1 and 10000, got -1",
        ),
        (
            place(1001, 1001, 10_001, "r-5"),
            Code::InvalidArgument,
            "count: must be between 1 and 10000, got 10001",
        ),
        (
            place(0, 1001, 1, "r-6"),
            Code::InvalidArgument,
            "user_id: must be a positive id, got 0",
        ),
        (
            place(1001, -5, 1, "r-7"),
            Code::InvalidArgument,
            "product_id: must be a positive id, got -5",
        ),
        (
            place(1001, 1001, 1, &"x".repeat(129)),
            Code::InvalidArgument,
            "request_id: is longer than 128 characters",
        ),
        (
            place(1001, 1001, 1, "bad\nid"),
            Code::InvalidArgument,
            "request_id: holds a control character",
        ),
        (
            place(1001, 1002, 101, "r-8"),
            Code::FailedPrecondition,
            "product 1002 has 100 in stock, 101 requested",
        ),
    ];
    for (request, code, message) in cases {
        let status = orders.place_order(request.clone()).await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (code, message),
            "{request:?}"
        );
    }
    let (products_db, orders_db) = (
        shop.db.connect("product").await,
        shop.db.connect("order").await,
    );
    for id in [1001, 1002, 1003] {
        assert_eq!(stock(&products_db, id).await, 100);
    }
    assert_eq!(rows(&products_db, deduction::Entity).await, 0);
    assert_eq!(rows(&orders_db, order::Entity).await, 0);
    assert_eq!(rows(&orders_db, item::Entity).await, 0);
    assert_eq!(rows(&orders_db, request::Entity).await, 0);
    shop.stop().await;
}

/// The seed's race: two orders both pass the stock check. Here the
/// deduction is one conditional update, so 200 orders of 1 against a stock
/// of 100, through two product and two order instances, sell exactly 100.
async fn two_hundred_orders_for_a_hundred_in_stock(backend: Backend, test: &str) {
    let Some(shop) = TestShop::start(backend, test, 2, 2).await else {
        return;
    };
    let calls = (0..200).map(|i| {
        let mut orders = shop.orders();
        tokio::spawn(async move {
            orders
                .place_order(place(1001, 1001, 1, &format!("race-{i}")))
                .await
        })
    });
    let mut placed = Vec::new();
    let mut refused = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(order) => placed.push(order.into_inner()),
            Err(status) if status.code() == Code::FailedPrecondition => {
                assert!(
                    status.message().starts_with("product 1001 has "),
                    "{status:?}"
                );
                refused += 1;
            }
            Err(status) => panic!("an order neither placed nor refused for stock: {status:?}"),
        }
    }
    assert_eq!((placed.len(), refused), (100, 100));
    let ids: HashSet<i64> = placed.iter().map(|order| order.id).collect();
    assert_eq!(ids.len(), 100, "order ids are unique");
    let workers: HashSet<i64> = ids
        .iter()
        .map(|id| shop_mesh::shop::ids::worker_of(*id))
        .collect();
    assert_eq!(
        workers.len(),
        2,
        "both order instances placed orders, with different worker ids"
    );

    let (products_db, orders_db) = (
        shop.db.connect("product").await,
        shop.db.connect("order").await,
    );
    assert_eq!(stock(&products_db, 1001).await, 0);
    assert_eq!(rows(&orders_db, order::Entity).await, 100);
    let items = item::Entity::find().all(&orders_db).await.unwrap();
    assert_eq!(items.len(), 100);
    assert_eq!(items.iter().map(|item| item.count).sum::<i32>(), 100);
    let taken = deduction::Entity::find()
        .filter(deduction::Column::State.eq(deduction::State::Deducted))
        .all(&products_db)
        .await
        .unwrap();
    assert_eq!(taken.iter().map(|d| d.count).sum::<i32>(), 100);
    shop.stop().await;
}

/// A client that retries after a timeout must never buy twice.
async fn the_same_request_id_buys_once(backend: Backend, test: &str) {
    let Some(shop) = TestShop::start(backend, test, 1, 1).await else {
        return;
    };
    let mut orders = shop.orders();
    let first = orders
        .place_order(place(1001, 1002, 2, "same-1"))
        .await
        .unwrap()
        .into_inner();
    let again = orders
        .place_order(place(1001, 1002, 2, "same-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);

    // Ten copies at once: each gets the order, or is told to retry.
    let copies = (0..10).map(|_| {
        let mut orders = shop.orders();
        tokio::spawn(async move { orders.place_order(place(1001, 1002, 3, "same-2")).await })
    });
    let mut placed = HashSet::new();
    for copy in copies {
        match copy.await.unwrap() {
            Ok(order) => {
                placed.insert(order.into_inner().id);
            }
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    let settled = orders
        .place_order(place(1001, 1002, 3, "same-2"))
        .await
        .unwrap()
        .into_inner();
    placed.insert(settled.id);
    assert_eq!(placed.len(), 1, "one order for one request id");

    let reused = orders
        .place_order(place(1001, 1002, 4, "same-1"))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);
    assert_eq!(
        reused.message(),
        "request_id same-1 was used for user 1001, product 1002, count 2; a different order needs a new request_id"
    );

    let (products_db, orders_db) = (
        shop.db.connect("product").await,
        shop.db.connect("order").await,
    );
    assert_eq!(stock(&products_db, 1002).await, 95);
    assert_eq!(rows(&orders_db, order::Entity).await, 2);
    assert_eq!(rows(&products_db, deduction::Entity).await, 2);
    shop.stop().await;
}

/// Request ids equal under a case-, accent- or pad-insensitive collation
/// but not byte for byte are different orders, each with its own stock.
async fn request_ids_that_differ_in_any_byte_are_different_orders(backend: Backend, test: &str) {
    let Some(shop) = TestShop::start(backend, test, 1, 1).await else {
        return;
    };
    let mut orders = shop.orders();
    let request_ids = ["Ab", "ab", "AB ", "k🚀", "K😀 ", "é", "e"];
    let mut placed = HashSet::new();
    for request_id in request_ids {
        let order = orders
            .place_order(place(1001, 1003, 1, request_id))
            .await
            .unwrap_or_else(|status| panic!("request_id {request_id:?}: {status:?}"))
            .into_inner();
        assert_eq!(order.request_id, request_id, "the order placed for it");
        placed.insert(order.id);
    }
    assert_eq!(placed.len(), request_ids.len(), "one order per request id");
    let (products_db, orders_db) = (
        shop.db.connect("product").await,
        shop.db.connect("order").await,
    );
    assert_eq!(
        stock(&products_db, 1003).await,
        100 - request_ids.len() as i32
    );
    assert_eq!(
        rows(&orders_db, order::Entity).await,
        request_ids.len() as u64
    );
    shop.stop().await;
}

/// The order database refuses the write after the stock was deducted: the
/// deduction is restored, the caller is told so, nothing is half-written,
/// and a retry with the same request id then buys once.
async fn a_refused_write_restores_the_stock(backend: Backend, test: &str) {
    let Some(shop) = TestShop::start(backend, test, 1, 1).await else {
        return;
    };
    let mut orders = shop.orders();
    let (products_db, orders_db) = (
        shop.db.connect("product").await,
        shop.db.connect("order").await,
    );
    refuse_item_writes(&orders_db, backend, true).await;

    let failed = orders
        .place_order(place(1001, 1001, 10, "comp-1"))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    assert_eq!(
        failed.message(),
        "the order could not be stored (the order database refused the write); its stock deduction was restored; retry with the same request_id"
    );
    assert_eq!(stock(&products_db, 1001).await, 100);
    assert_eq!(
        rows(&orders_db, order::Entity).await,
        0,
        "no order without its item"
    );
    assert_eq!(rows(&orders_db, item::Entity).await, 0);
    let undone = deduction::Entity::find_by_id("comp-1#0")
        .one(&products_db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (undone.state, undone.count),
        (deduction::State::Restored, 10)
    );
    let request_row = request::Entity::find_by_id("comp-1")
        .one(&orders_db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request_row.state, request::State::Failed);

    refuse_item_writes(&orders_db, backend, false).await;
    let placed = orders
        .place_order(place(1001, 1001, 10, "comp-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(placed.total_price, "23990.00");
    assert_eq!(stock(&products_db, 1001).await, 90);
    assert_eq!(rows(&orders_db, order::Entity).await, 1);
    let kept = deduction::Entity::find_by_id("comp-1#1")
        .one(&products_db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((kept.state, kept.count), (deduction::State::Deducted, 10));
    shop.stop().await;
}

/// A trigger that makes the database itself refuse `t_order_item` rows.
async fn refuse_item_writes(db: &DatabaseConnection, backend: Backend, refuse: bool) {
    let statements: &[&str] = match (backend, refuse) {
        (Backend::Sqlite, true) => &["CREATE TRIGGER refuse_items BEFORE INSERT ON t_order_item \
             BEGIN SELECT RAISE(ABORT, 'injected: no order items'); END"],
        (Backend::MySql, true) => &["CREATE TRIGGER refuse_items BEFORE INSERT ON t_order_item \
             FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected: no order items'"],
        (Backend::Postgres, true) => &[
            "CREATE FUNCTION refuse_items() RETURNS trigger AS $$ \
             BEGIN RAISE EXCEPTION 'injected: no order items'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_items BEFORE INSERT ON t_order_item \
             FOR EACH ROW EXECUTE FUNCTION refuse_items()",
        ],
        (Backend::Postgres, false) => &["DROP TRIGGER refuse_items ON t_order_item"],
        (_, false) => &["DROP TRIGGER refuse_items"],
    };
    for statement in statements {
        db.execute_unprepared(statement)
            .await
            .unwrap_or_else(|err| panic!("{statement}: {err}"));
    }
}

/// With no product instance registered, an order fails at once with
/// UNAVAILABLE naming the missing service, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_without_a_product_service_is_unavailable() {
    let shop = TestShop::start(Backend::Sqlite, "no_product", 0, 1)
        .await
        .expect("SQLite is always there");
    let mut orders = shop.orders();
    let failed = orders
        .place_order(place(1001, 1001, 1, "lonely-1"))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    assert!(
        failed
            .message()
            .contains("no healthy instance of server-product"),
        "{failed:?}"
    );
    let orders_db = shop.db.connect("order").await;
    assert_eq!(rows(&orders_db, request::Entity).await, 0);
    assert_eq!(rows(&orders_db, order::Entity).await, 0);
    shop.stop().await;
}

/// An order instance died between the deduction and the write: its
/// request stays pending. Once it is older than the pending timeout, a
/// live order instance restores the deduction and marks it failed, and a
/// retry of the request then buys once.
async fn an_abandoned_order_is_undone_by_the_sweeper(backend: Backend, test: &str) {
    let Some(shop) = TestShop::start_with(backend, test, 1, 1, |config| {
        config.shop.sweep_interval = std::time::Duration::from_millis(50);
    })
    .await
    else {
        return;
    };
    let (products_db, orders_db) = (
        shop.db.connect("product").await,
        shop.db.connect("order").await,
    );
    // What the dead instance left: its deduction, and its claim. The claim
    // is written last: the sweeper (every 50 ms) takes it up at once, and
    // the deduction must be there, and seen, before it does.
    let identity = shop.order_identity().await;
    shop.products()
        .deduct_stock(super::shown(
            &identity,
            pb::DeductStockRequest {
                product_id: 1003,
                count: 7,
                request_id: "dead-1#0".into(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(stock(&products_db, 1003).await, 93);
    let long_ago = shop_mesh::shop::db::now() - chrono::TimeDelta::hours(1);
    request::Entity::insert(request::ActiveModel {
        request_id: Set("dead-1".into()),
        attempt: Set(0),
        state: Set(request::State::Pending),
        user_id: Set(1001),
        product_id: Set(1003),
        count: Set(7),
        order_id: Set(None),
        updated_at: Set(long_ago),
    })
    .exec_without_returning(&orders_db)
    .await
    .unwrap();

    crate::wait_until(
        "the sweeper settles dead-1",
        Duration::from_secs(10),
        || async {
            let found = request::Entity::find_by_id("dead-1")
                .one(&orders_db)
                .await
                .unwrap();
            found.is_some_and(|found| found.state == request::State::Failed)
        },
    )
    .await;
    assert_eq!(stock(&products_db, 1003).await, 100);
    assert_eq!(rows(&orders_db, order::Entity).await, 0);

    let placed = shop
        .orders()
        .place_order(place(1001, 1003, 7, "dead-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(placed.total_price, "34993.00");
    assert_eq!(stock(&products_db, 1003).await, 93);
    shop.stop().await;
}
