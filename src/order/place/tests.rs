//! The order flow against in-memory user and product services and a real
//! order store on a private SQLite file: what is deducted, what is
//! restored, and what the caller is told.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait};

use super::*;
use crate::order::peers::Product;
use crate::order::store::{Migrator, request};
use crate::shop::{Money, ServiceConfig};

const ALICE: i64 = 1;
const LAMP: i64 = 10;
const IN_STOCK: i32 = 5;

/// The user service: a fixed set of users.
#[derive(Clone, Default)]
struct FakeUsers {
    users: Arc<Mutex<HashMap<i64, User>>>,
}

impl FakeUsers {
    fn add(&self, id: i64, name: &str) {
        self.users.lock().insert(
            id,
            User {
                id,
                name: name.to_owned(),
                phone: "555-0100".to_owned(),
                address: "1 Main St".to_owned(),
            },
        );
    }
}

impl Users for FakeUsers {
    async fn user(&self, id: i64) -> Result<User, Error> {
        self.users
            .lock()
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no user {id}")))
    }
}

/// A call that changes stock, as the product service saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Deduct(String),
    Restore(String),
}

/// What happened under one deduction key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Deducted {
        product_id: i64,
        count: i32,
    },
    Restored,
    /// Restored before anything was taken under it.
    Closed,
}

#[derive(Default)]
struct Shelf {
    products: HashMap<i64, Product>,
    keys: HashMap<String, Key>,
    calls: Vec<Call>,
    /// Deductions are made but their answers never arrive.
    lose_deduct_answers: bool,
    /// Every deduction is refused as if the stock ran out meanwhile.
    refuse_deductions: bool,
    /// Restores fail as if the service were away.
    fail_restores: bool,
}

/// The product service, keyed the way the real one is: a key deducts at
/// most once, and a restored or closed key never deducts.
#[derive(Clone, Default)]
struct FakeProducts {
    shelf: Arc<Mutex<Shelf>>,
}

impl FakeProducts {
    fn stock(&self, id: i64) -> i32 {
        self.shelf.lock().products[&id].stock
    }

    fn calls(&self) -> Vec<Call> {
        self.shelf.lock().calls.clone()
    }

    fn key(&self, key: &str) -> Option<Key> {
        self.shelf.lock().keys.get(key).copied()
    }
}

impl Products for FakeProducts {
    async fn product(&self, id: i64) -> Result<Product, Error> {
        self.shelf
            .lock()
            .products
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no product {id}")))
    }

    async fn deduct(&self, product_id: i64, count: i32, key: &str) -> Result<Deduction, Error> {
        let mut shelf = self.shelf.lock();
        shelf.calls.push(Call::Deduct(key.to_owned()));
        match shelf.keys.get(key) {
            Some(Key::Deducted { .. }) => {}
            Some(Key::Restored | Key::Closed) => return Ok(Deduction::Cancelled),
            None => {
                if shelf.refuse_deductions {
                    return Err(Error::FailedPrecondition("sold out meanwhile".into()));
                }
                let product = shelf
                    .products
                    .get_mut(&product_id)
                    .ok_or_else(|| Error::NotFound(format!("no product {product_id}")))?;
                if product.stock < count {
                    return Err(Error::FailedPrecondition(format!("{} left", product.stock)));
                }
                product.stock -= count;
                shelf
                    .keys
                    .insert(key.to_owned(), Key::Deducted { product_id, count });
            }
        }
        if shelf.lose_deduct_answers {
            return Err(Error::Unavailable(
                "server-product: connection reset".into(),
            ));
        }
        Ok(Deduction::Taken(shelf.products[&product_id].clone()))
    }

    async fn restore(&self, key: &str) -> Result<(), Error> {
        let mut shelf = self.shelf.lock();
        shelf.calls.push(Call::Restore(key.to_owned()));
        if shelf.fail_restores {
            return Err(Error::Unavailable(
                "server-product: connection refused".into(),
            ));
        }
        match shelf.keys.get(key).copied() {
            Some(Key::Deducted { product_id, count }) => {
                shelf.products.get_mut(&product_id).unwrap().stock += count;
                shelf.keys.insert(key.to_owned(), Key::Restored);
            }
            Some(Key::Restored | Key::Closed) => {}
            None => {
                shelf.keys.insert(key.to_owned(), Key::Closed);
            }
        }
        Ok(())
    }
}

struct Shop {
    placer: Placer<FakeUsers, FakeProducts>,
    users: FakeUsers,
    products: FakeProducts,
    db: DatabaseConnection,
    _dir: tempfile::TempDir,
}

/// Alice, and a lamp at 12.50 with `IN_STOCK` left.
async fn shop() -> Shop {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServiceConfig::for_role("order", 0);
    config.data_dir = dir.path().to_owned();
    let db = crate::shop::db::open::<Migrator>(&config, "order")
        .await
        .unwrap();
    let ids = IdGenerator::claim(db.clone(), Duration::from_secs(600))
        .await
        .unwrap();
    let users = FakeUsers::default();
    users.add(ALICE, "alice");
    let products = FakeProducts::default();
    products.shelf.lock().products.insert(
        LAMP,
        Product {
            id: LAMP,
            name: "lamp".to_owned(),
            price: Money::parse("12.50").unwrap(),
            stock: IN_STOCK,
        },
    );
    Shop {
        placer: Placer {
            orders: Orders::new(db.clone()),
            ids,
            users: users.clone(),
            products: products.clone(),
            metrics: Default::default(),
        },
        users,
        products,
        db,
        _dir: dir,
    }
}

fn ask(user_id: i64, product_id: i64, count: i32, request_id: &str) -> PlaceOrder {
    PlaceOrder {
        asked: Asked {
            user_id,
            product_id,
            count,
        },
        request_id: Some(request_id.to_owned()),
    }
}

impl Shop {
    async fn orders_written(&self) -> usize {
        crate::order::store::order::Entity::find()
            .all(&self.db)
            .await
            .unwrap()
            .len()
    }

    async fn request_state(&self, request_id: &str) -> Option<(i32, request::State)> {
        request::Entity::find_by_id(request_id)
            .one(&self.db)
            .await
            .unwrap()
            .map(|row| (row.attempt, row.state))
    }

    /// The database itself refuses order items, so no order can be written.
    async fn refuse_item_writes(&self, refuse: bool) {
        let statement = if refuse {
            "CREATE TRIGGER refuse_items BEFORE INSERT ON t_order_item \
             BEGIN SELECT RAISE(ABORT, 'injected: no order items'); END"
        } else {
            "DROP TRIGGER refuse_items"
        };
        self.db.execute_unprepared(statement).await.unwrap();
    }
}

#[tokio::test]
async fn an_order_deducts_its_stock_once_and_records_who_and_what() {
    let shop = shop().await;

    let order = shop.placer.place(ask(ALICE, LAMP, 2, "r1")).await.unwrap();

    assert_eq!(shop.products.stock(LAMP), IN_STOCK - 2);
    assert_eq!(shop.products.calls(), [Call::Deduct("r1#0".into())]);
    assert_eq!(
        (
            order.user_id,
            order.user_name.as_str(),
            order.phone.as_str(),
            order.address.as_str(),
        ),
        (ALICE, "alice", "555-0100", "1 Main St")
    );
    assert_eq!(order.total_price.to_string(), "25.00");
    assert_eq!(order.request_id, "r1");
    assert_eq!(order.items.len(), 1);
    let item = &order.items[0];
    assert_eq!(
        (item.product_id, item.product_name.as_str(), item.count),
        (LAMP, "lamp", 2)
    );
    assert_eq!(item.price.to_string(), "12.50");
    assert_eq!(shop.placer.orders.get(order.id).await.unwrap(), order);
}

#[tokio::test]
async fn the_same_request_id_twice_is_one_order_and_one_deduction() {
    let shop = shop().await;

    let first = shop.placer.place(ask(ALICE, LAMP, 2, "r1")).await.unwrap();
    let again = shop.placer.place(ask(ALICE, LAMP, 2, "r1")).await.unwrap();

    assert_eq!(again, first);
    assert_eq!(shop.products.stock(LAMP), IN_STOCK - 2);
    assert_eq!(shop.products.calls(), [Call::Deduct("r1#0".into())]);
    assert_eq!(shop.orders_written().await, 1);
}

#[tokio::test]
async fn a_request_id_reused_for_another_order_is_refused() {
    let shop = shop().await;
    shop.placer.place(ask(ALICE, LAMP, 2, "r1")).await.unwrap();

    let refused = shop
        .placer
        .place(ask(ALICE, LAMP, 3, "r1"))
        .await
        .unwrap_err();

    assert!(
        matches!(refused, Error::FailedPrecondition(_)),
        "{refused:?}"
    );
    assert_eq!(shop.products.stock(LAMP), IN_STOCK - 2);
    assert_eq!(shop.orders_written().await, 1);
}

#[tokio::test]
async fn an_unknown_user_is_refused_and_nothing_is_taken() {
    let shop = shop().await;

    let refused = shop.placer.place(ask(7, LAMP, 1, "r1")).await.unwrap_err();

    assert_eq!(refused, Error::NotFound("no user 7".into()));
    assert_eq!(shop.products.calls(), []);
    assert_eq!(shop.products.stock(LAMP), IN_STOCK);
    assert_eq!(shop.orders_written().await, 0);
    assert_eq!(
        shop.request_state("r1").await,
        None,
        "no request left behind"
    );
    // So the same request id places the order once the user exists.
    shop.users.add(7, "bob");
    shop.placer.place(ask(7, LAMP, 1, "r1")).await.unwrap();
    assert_eq!(shop.products.stock(LAMP), IN_STOCK - 1);
}

#[tokio::test]
async fn an_unknown_product_is_refused_and_nothing_is_taken() {
    let shop = shop().await;

    let refused = shop
        .placer
        .place(ask(ALICE, 99, 1, "r1"))
        .await
        .unwrap_err();

    assert_eq!(refused, Error::NotFound("no product 99".into()));
    assert_eq!(shop.products.calls(), []);
    assert_eq!(shop.orders_written().await, 0);
    assert_eq!(shop.request_state("r1").await, None);
}

#[tokio::test]
async fn more_than_the_stock_is_refused_before_anything_is_taken() {
    let shop = shop().await;

    let refused = shop
        .placer
        .place(ask(ALICE, LAMP, IN_STOCK + 1, "r1"))
        .await
        .unwrap_err();

    assert_eq!(
        refused,
        Error::FailedPrecondition(format!(
            "product {LAMP} has {IN_STOCK} in stock, {} requested",
            IN_STOCK + 1
        ))
    );
    assert_eq!(shop.products.calls(), []);
    assert_eq!(shop.products.stock(LAMP), IN_STOCK);
    assert_eq!(shop.orders_written().await, 0);
    assert_eq!(shop.request_state("r1").await, None);
}

#[tokio::test]
async fn a_deduction_the_product_service_refuses_is_not_restored() {
    let shop = shop().await;
    shop.products.shelf.lock().refuse_deductions = true;

    let refused = shop
        .placer
        .place(ask(ALICE, LAMP, 1, "r1"))
        .await
        .unwrap_err();

    assert_eq!(
        refused,
        Error::FailedPrecondition("sold out meanwhile".into())
    );
    assert_eq!(
        shop.products.calls(),
        [Call::Deduct("r1#0".into())],
        "a refusal took nothing, so nothing is restored"
    );
    assert_eq!(shop.request_state("r1").await, None);
    assert_eq!(shop.orders_written().await, 0);
}

#[tokio::test]
async fn a_lost_deduction_answer_is_restored() {
    let shop = shop().await;
    shop.products.shelf.lock().lose_deduct_answers = true;

    let failed = shop
        .placer
        .place(ask(ALICE, LAMP, 2, "r1"))
        .await
        .unwrap_err();

    assert!(matches!(failed, Error::Unavailable(_)), "{failed:?}");
    assert_eq!(
        shop.products.calls(),
        [Call::Deduct("r1#0".into()), Call::Restore("r1#0".into())]
    );
    assert_eq!(shop.products.stock(LAMP), IN_STOCK);
    assert_eq!(shop.products.key("r1#0"), Some(Key::Restored));
    assert_eq!(shop.orders_written().await, 0);
    assert_eq!(
        shop.request_state("r1").await,
        Some((0, request::State::Failed))
    );
}

#[tokio::test]
async fn an_order_that_cannot_be_written_gives_its_stock_back_and_a_retry_buys_once() {
    let shop = shop().await;
    shop.refuse_item_writes(true).await;

    let failed = shop
        .placer
        .place(ask(ALICE, LAMP, 2, "r1"))
        .await
        .unwrap_err();

    assert_eq!(
        failed,
        Error::Unavailable(
            "the order could not be stored (the order database refused the write); \
             its stock deduction was restored; retry with the same request_id"
                .into()
        )
    );
    assert_eq!(
        shop.products.calls(),
        [Call::Deduct("r1#0".into()), Call::Restore("r1#0".into())]
    );
    assert_eq!(shop.products.stock(LAMP), IN_STOCK);
    assert_eq!(shop.orders_written().await, 0);

    shop.refuse_item_writes(false).await;
    let placed = shop.placer.place(ask(ALICE, LAMP, 2, "r1")).await.unwrap();

    assert_eq!(placed.request_id, "r1");
    assert_eq!(shop.products.stock(LAMP), IN_STOCK - 2);
    assert_eq!(
        shop.products.calls()[2..],
        [Call::Deduct("r1#1".into())],
        "the retry deducts under a new key"
    );
    assert_eq!(shop.orders_written().await, 1);
}

#[tokio::test]
async fn a_restore_that_fails_is_finished_later() {
    let shop = shop().await;
    shop.refuse_item_writes(true).await;
    shop.products.shelf.lock().fail_restores = true;

    let failed = shop
        .placer
        .place(ask(ALICE, LAMP, 2, "r1"))
        .await
        .unwrap_err();

    assert_eq!(
        failed,
        Error::Unavailable(
            "the order could not be stored (the order database refused the write); \
             its stock deduction will be restored; retry with the same request_id"
                .into()
        )
    );
    assert_eq!(shop.products.stock(LAMP), IN_STOCK - 2);
    assert_eq!(
        shop.request_state("r1").await,
        Some((0, request::State::Compensating)),
        "left for the sweeper"
    );
    let busy = shop
        .placer
        .place(ask(ALICE, LAMP, 2, "r1"))
        .await
        .unwrap_err();
    assert!(matches!(busy, Error::Aborted(_)), "{busy:?}");

    shop.products.shelf.lock().fail_restores = false;
    assert!(shop.placer.compensate("r1", 0).await);

    assert_eq!(shop.products.stock(LAMP), IN_STOCK);
    assert_eq!(
        shop.request_state("r1").await,
        Some((0, request::State::Failed))
    );
}

#[tokio::test]
async fn a_written_order_is_never_restored() {
    let shop = shop().await;
    shop.placer.place(ask(ALICE, LAMP, 2, "r1")).await.unwrap();

    assert!(shop.placer.compensate("r1", 0).await);

    assert_eq!(shop.products.calls(), [Call::Deduct("r1#0".into())]);
    assert_eq!(shop.products.stock(LAMP), IN_STOCK - 2);
}

#[tokio::test]
async fn a_key_closed_by_an_earlier_restore_moves_on_to_the_next_attempt() {
    let shop = shop().await;
    // A late restore of an attempt whose deduction never arrived.
    shop.products.restore("r1#0").await.unwrap();

    let order = shop.placer.place(ask(ALICE, LAMP, 2, "r1")).await.unwrap();

    assert_eq!(
        shop.products.calls()[1..],
        [Call::Deduct("r1#0".into()), Call::Deduct("r1#1".into())]
    );
    assert_eq!(shop.products.stock(LAMP), IN_STOCK - 2);
    assert_eq!(shop.placer.orders.get(order.id).await.unwrap(), order);
    assert_eq!(
        shop.request_state("r1").await,
        Some((1, request::State::Done))
    );
}
