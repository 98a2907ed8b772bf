//! Databases made by an earlier schema, brought up to date by the
//! migrations at start: their rows kept, their money exact (TEXT on
//! SQLite, not REAL), their request ids compared byte for byte, their
//! states read from the words they always held.

use sea_orm::ActiveValue::Set;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, Statement};
use sea_orm_migration::prelude::DynIden;
use sea_orm_migration::{MigrationTrait, MigratorTrait};
use shop_mesh::order::store::{self as orders, item, order, request};
use shop_mesh::product::store::{self as products, deduction, product};
use shop_mesh::shop::ids::lease;
use shop_mesh::shop::keys::EXACT_COLLATIONS;
use shop_mesh::shop::{Money, db};

use super::{Backend, TestDb, backend_tests};

backend_tests!(
    a_database_made_before_is_brought_up_to_date,
    amounts_are_stored_exactly,
    states_are_the_words_stored_before
);

/// The order schema as the first release made it: the migrations it had.
struct FirstOrderSchema;

impl MigratorTrait for FirstOrderSchema {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        orders::Migrator::migrations().into_iter().take(2).collect()
    }

    fn migration_table_name() -> DynIden {
        orders::Migrator::migration_table_name()
    }
}

/// The product schema as the first release made it.
struct FirstProductSchema;

impl MigratorTrait for FirstProductSchema {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        products::Migrator::migrations()
            .into_iter()
            .take(1)
            .collect()
    }

    fn migration_table_name() -> DynIden {
        products::Migrator::migration_table_name()
    }
}

fn amount(text: &str) -> Money {
    Money::parse(text).unwrap()
}

/// A connection to what `role` stores in, its SQLite dir made first.
async fn connect(test_db: &TestDb, role: &str) -> DatabaseConnection {
    let service = test_db.service(role);
    std::fs::create_dir_all(&service.data_dir).unwrap();
    db::connect(&db::url(&service, role), 1).await.unwrap()
}

async fn a_database_made_before_is_brought_up_to_date(backend: Backend, test: &str) {
    let Some(test_db) = TestDb::create(backend, test).await else {
        return;
    };
    let (order_db, product_db) = (
        connect(&test_db, "order").await,
        connect(&test_db, "product").await,
    );
    db::migrate::<FirstOrderSchema>(&order_db).await.unwrap();
    db::migrate::<FirstProductSchema>(&product_db)
        .await
        .unwrap();
    for (id, price) in [(2001, "19.99"), (2002, "99999999.99"), (2003, "0.10")] {
        product::Entity::insert(product::ActiveModel {
            id: Set(id),
            name: Set(format!("product {id}")),
            price: Set(amount(price)),
            stock: Set(5),
        })
        .exec_without_returning(&product_db)
        .await
        .unwrap();
    }
    insert_deduction(&product_db, "Ab#0").await.unwrap();
    insert_order(&order_db, 1, "Ab", "9999999999999.99")
        .await
        .unwrap();
    item::Entity::insert(item::ActiveModel {
        id: Set(2),
        order_id: Set(1),
        product_id: Set(2001),
        product_name: Set("product 2001".into()),
        price: Set(amount("0.30")),
        count: Set(1),
    })
    .exec_without_returning(&order_db)
    .await
    .unwrap();
    insert_request(&order_db, "Ab").await.unwrap();
    lease::Entity::insert(lease::ActiveModel {
        worker_id: Set(7),
        holder: Set("Holder".into()),
        expires_at: Set(0),
    })
    .exec_without_returning(&order_db)
    .await
    .unwrap();
    if backend == Backend::Sqlite {
        assert_eq!(
            stored(&product_db, "t_product", "t_pro_price").await[0].0,
            "real",
            "the first schema kept money as a float on SQLite"
        );
    }

    db::migrate::<products::Migrator>(&product_db)
        .await
        .unwrap();
    db::migrate::<orders::Migrator>(&order_db).await.unwrap();

    let kept: Vec<String> = product::Entity::find()
        .all(&product_db)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.price.to_string())
        .collect();
    assert_eq!(kept, ["19.99", "99999999.99", "0.10"]);
    let placed = order::Entity::find_by_id(1)
        .one(&order_db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (placed.request_id.as_str(), placed.total_price),
        ("Ab", amount("9999999999999.99"))
    );
    for (table, column, db) in [
        ("t_product", "t_pro_price", &product_db),
        ("t_order", "t_total_price", &order_db),
        ("t_order_item", "t_pro_price", &order_db),
    ] {
        for (class, _) in stored(db, table, column).await {
            assert_ne!(class, "real", "{table}.{column} is still a float");
        }
    }
    let texts: Vec<String> = stored(&product_db, "t_product", "t_pro_price")
        .await
        .into_iter()
        .map(|(_, text)| text)
        .collect();
    assert_eq!(texts, ["19.99", "99999999.99", "0.10"]);

    // Each key now tells apart what the old collation took as one.
    insert_deduction(&product_db, "ab#0")
        .await
        .expect("ab#0 is not Ab#0");
    insert_order(&order_db, 3, "ab", "1.00")
        .await
        .expect("ab is not Ab");
    insert_request(&order_db, "ab").await.expect("ab is not Ab");
    insert_request(&order_db, "AB ")
        .await
        .expect("AB  is not AB");
    let schema = sea_orm_migration::SchemaManager::new(&order_db);
    for (table, index) in [
        ("t_order", "idx_t_order_user"),
        ("t_order_item", "idx_t_order_item_order"),
    ] {
        assert!(
            schema.has_index(table, index).await.unwrap(),
            "{table} lost {index}"
        );
    }
    let duplicate = insert_order(&order_db, 4, "Ab", "1.00")
        .await
        .expect_err("a request id still places one order");
    assert!(db::is_unique_violation(&duplicate), "{duplicate}");
    if backend == Backend::MySql {
        for (table, column, db) in [
            ("t_order", "request_id", &order_db),
            ("t_order_request", "request_id", &order_db),
            ("t_id_worker", "holder", &order_db),
            ("t_stock_deduction", "request_id", &product_db),
        ] {
            let collation = mysql_collation(db, table, column).await;
            assert!(
                EXACT_COLLATIONS.contains(&collation.as_str()),
                "{table}.{column} compares by {collation}"
            );
        }
    }
}

/// A new database keeps amounts exactly, at the largest a column holds.
async fn amounts_are_stored_exactly(backend: Backend, test: &str) {
    let Some(test_db) = TestDb::create(backend, test).await else {
        return;
    };
    let order_db = connect(&test_db, "order").await;
    db::migrate::<orders::Migrator>(&order_db).await.unwrap();
    let totals = ["9999999999999.99", "0.30", "1234567890123.45"];
    for (id, total) in (1..).zip(totals) {
        insert_order(&order_db, id, &format!("r{id}"), total)
            .await
            .unwrap();
    }
    let stored = stored(&order_db, "t_order", "t_total_price").await;
    let texts: Vec<&str> = stored.iter().map(|(_, text)| text.as_str()).collect();
    assert_eq!(texts, totals);
    for (class, _) in &stored {
        assert_ne!(class, "real");
    }
    let read: Vec<String> = order::Entity::find()
        .all(&order_db)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.total_price.to_string())
        .collect();
    assert_eq!(read, totals);
}

/// Each state is stored as the word an earlier release wrote, and that
/// word reads back as the state: no data needs migrating.
async fn states_are_the_words_stored_before(backend: Backend, test: &str) {
    let Some(test_db) = TestDb::create(backend, test).await else {
        return;
    };
    let (order_db, product_db) = (
        connect(&test_db, "order").await,
        connect(&test_db, "product").await,
    );
    db::migrate::<orders::Migrator>(&order_db).await.unwrap();
    db::migrate::<products::Migrator>(&product_db)
        .await
        .unwrap();
    insert_request(&order_db, "r").await.unwrap();
    insert_deduction(&product_db, "r#0").await.unwrap();

    use request::State as R;
    for (state, word) in [
        (R::Pending, "pending"),
        (R::Compensating, "compensating"),
        (R::Failed, "failed"),
        (R::Done, "done"),
    ] {
        request::Entity::update(request::ActiveModel {
            request_id: Set("r".into()),
            state: Set(state),
            ..Default::default()
        })
        .exec(&order_db)
        .await
        .unwrap();
        assert_eq!(state_word(&order_db, "t_order_request").await, word);
        set_state_word(&order_db, "t_order_request", word).await;
        let read = request::Entity::find_by_id("r")
            .one(&order_db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read.state, state, "{word}");
    }

    use deduction::State as D;
    for (state, word) in [(D::Deducted, "deducted"), (D::Restored, "restored")] {
        deduction::Entity::update(deduction::ActiveModel {
            request_id: Set("r#0".into()),
            state: Set(state),
            ..Default::default()
        })
        .exec(&product_db)
        .await
        .unwrap();
        assert_eq!(state_word(&product_db, "t_stock_deduction").await, word);
        set_state_word(&product_db, "t_stock_deduction", word).await;
        let read = deduction::Entity::find_by_id("r#0")
            .one(&product_db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read.state, state, "{word}");
    }
}

/// The `state` column of `table`'s one row, as the database holds it.
async fn state_word(db: &DatabaseConnection, table: &str) -> String {
    let sql = format!("SELECT state FROM {table}");
    db.query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .expect("one row")
        .try_get_by_index::<String>(0)
        .unwrap()
}

/// Writes `word` into `table`'s one row as plain text, as an earlier
/// release did.
async fn set_state_word(db: &DatabaseConnection, table: &str, word: &str) {
    db.execute_unprepared(&format!("UPDATE {table} SET state = '{word}'"))
        .await
        .unwrap();
}

async fn insert_deduction(db: &DatabaseConnection, request_id: &str) -> Result<(), sea_orm::DbErr> {
    let now = db::now();
    deduction::Entity::insert(deduction::ActiveModel {
        request_id: Set(request_id.into()),
        product_id: Set(2001),
        count: Set(1),
        state: Set(deduction::State::Deducted),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(db)
    .await
    .map(drop)
}

async fn insert_order(
    db: &DatabaseConnection,
    id: i64,
    request_id: &str,
    total: &str,
) -> Result<(), sea_orm::DbErr> {
    order::Entity::insert(order::ActiveModel {
        id: Set(id),
        user_id: Set(1001),
        user_name: Set("binghe".into()),
        phone: Set("13212345678".into()),
        address: Set("北京".into()),
        total_price: Set(amount(total)),
        request_id: Set(request_id.into()),
        created_at: Set(db::now()),
    })
    .exec_without_returning(db)
    .await
    .map(drop)
}

async fn insert_request(db: &DatabaseConnection, request_id: &str) -> Result<(), sea_orm::DbErr> {
    request::Entity::insert(request::ActiveModel {
        request_id: Set(request_id.into()),
        attempt: Set(0),
        state: Set(request::State::Done),
        user_id: Set(1001),
        product_id: Set(2001),
        count: Set(1),
        order_id: Set(Some(1)),
        updated_at: Set(db::now()),
    })
    .exec_without_returning(db)
    .await
    .map(drop)
}

/// Each row's `column` as the database keeps it, in id order: its storage
/// class (SQLite's typeof, PostgreSQL's pg_typeof, MySQL's column type)
/// and its text.
async fn stored(db: &DatabaseConnection, table: &str, column: &str) -> Vec<(String, String)> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Sqlite => {
            format!("SELECT typeof({column}), CAST({column} AS TEXT) FROM {table} ORDER BY id")
        }
        DbBackend::Postgres => {
            format!("SELECT pg_typeof({column})::text, {column}::text FROM {table} ORDER BY id")
        }
        _ => format!(
            "SELECT (SELECT DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
             AND TABLE_NAME = '{table}' AND COLUMN_NAME = '{column}'), CAST({column} AS CHAR) \
             FROM {table} ORDER BY id"
        ),
    };
    db.query_all_raw(Statement::from_string(backend, sql))
        .await
        .unwrap()
        .iter()
        .map(|row| {
            (
                row.try_get_by_index::<String>(0).unwrap(),
                row.try_get_by_index::<String>(1).unwrap(),
            )
        })
        .collect()
}

async fn mysql_collation(db: &DatabaseConnection, table: &str, column: &str) -> String {
    let sql = format!(
        "SELECT COLLATION_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
         AND TABLE_NAME = '{table}' AND COLUMN_NAME = '{column}'"
    );
    db.query_one_raw(Statement::from_string(DbBackend::MySql, sql))
        .await
        .unwrap()
        .expect("the column exists")
        .try_get_by_index::<String>(0)
        .unwrap()
}
