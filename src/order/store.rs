//! The order service's tables: `t_order` and `t_order_item` with the
//! seed's columns, `t_order_request` (one row per request id: which
//! attempt is under way and how it ended), and the id worker leases.
//!
//! `t_order_request` is what makes placing an order safe to retry and to
//! crash in: an order and its item are written only in the transaction
//! that moves the request from `pending` to `done`, and a deduction is
//! restored only after the request moved from `pending` to
//! `compensating`. The two moves exclude each other, so a deduction is
//! never both kept by an order and restored.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue::Set, DatabaseConnection, QueryOrder, QuerySelect};
use sea_orm_migration::prelude::{ColumnDef, DynIden, Index, Table};
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, SchemaManager};

use crate::shop::db::{begin_write, is_unique_violation};
use crate::shop::keys::{ExactKeys, Key};
use crate::shop::money::{ExactMoney, MoneyColumn};
use crate::shop::{Error, Money};

pub mod order {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_order")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i64,
        #[sea_orm(column_name = "t_user_id")]
        pub user_id: i64,
        #[sea_orm(column_name = "t_user_name")]
        pub user_name: String,
        #[sea_orm(column_name = "t_phone")]
        pub phone: String,
        #[sea_orm(column_name = "t_address")]
        pub address: String,
        #[sea_orm(column_name = "t_total_price")]
        pub total_price: crate::shop::Money,
        pub request_id: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod item {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_order_item")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i64,
        #[sea_orm(column_name = "t_order_id")]
        pub order_id: i64,
        #[sea_orm(column_name = "t_pro_id")]
        pub product_id: i64,
        #[sea_orm(column_name = "t_pro_name")]
        pub product_name: String,
        #[sea_orm(column_name = "t_pro_price")]
        pub price: crate::shop::Money,
        #[sea_orm(column_name = "t_number")]
        pub count: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod request {
    use sea_orm::entity::prelude::*;

    /// Being placed by the call that claimed it.
    pub const PENDING: &str = "pending";
    /// Its deduction is being restored; it will be `failed`.
    pub const COMPENSATING: &str = "compensating";
    /// Ended without an order; its deduction restored. A retry starts the
    /// next attempt.
    pub const FAILED: &str = "failed";
    /// Its order is written.
    pub const DONE: &str = "done";

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_order_request")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        /// Each attempt deducts under its own key (`<request_id>#<attempt>`),
        /// so a restored attempt can never be taken again by a late copy.
        pub attempt: i32,
        pub state: String,
        pub user_id: i64,
        pub product_id: i64,
        pub count: i32,
        pub order_id: Option<i64>,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The longest request id an order takes.
pub const MAX_REQUEST_ID: usize = 128;

/// The order service's schema, with its own migration table.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateOrders),
            Box::new(crate::shop::ids::CreateLeaseTable),
            Box::new(ExactKeys {
                name: "m20261201_000001_exact_order_keys",
                keys: &[
                    Key {
                        table: "t_order",
                        column: "request_id",
                        chars: MAX_REQUEST_ID as u32,
                    },
                    Key {
                        table: "t_order_request",
                        column: "request_id",
                        chars: MAX_REQUEST_ID as u32,
                    },
                    crate::shop::ids::HOLDER_KEY,
                ],
            }),
            Box::new(ExactMoney {
                name: "m20261201_000002_exact_order_money",
                columns: &[
                    MoneyColumn {
                        table: "t_order",
                        column: "t_total_price",
                    },
                    MoneyColumn {
                        table: "t_order_item",
                        column: "t_pro_price",
                    },
                ],
            }),
        ]
    }

    fn migration_table_name() -> DynIden {
        "seaql_migrations_order".into()
    }
}

struct CreateOrders;

impl MigrationName for CreateOrders {
    fn name(&self) -> &str {
        "m20261124_000001_create_t_order"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateOrders {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use item::Column as I;
        use order::Column as O;
        use request::Column as R;
        manager
            .create_table(
                Table::create()
                    .table(order::Entity)
                    .if_not_exists()
                    .col(ColumnDef::new(O::Id).big_integer().not_null().primary_key())
                    .col(ColumnDef::new(O::UserId).big_integer().not_null())
                    .col(ColumnDef::new(O::UserName).string_len(64).not_null())
                    .col(ColumnDef::new(O::Phone).string_len(32).not_null())
                    .col(ColumnDef::new(O::Address).string_len(255).not_null())
                    .col(ColumnDef::new(O::TotalPrice).decimal_len(15, 2).not_null())
                    .col(
                        ColumnDef::new(O::RequestId)
                            .string_len(MAX_REQUEST_ID as u32)
                            .not_null()
                            .unique_key(),
                    )
                    .col(crate::shop::db::timestamp_column(
                        manager.get_database_backend(),
                        O::CreatedAt,
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_t_order_user")
                    .table(order::Entity)
                    .col(O::UserId)
                    .col(O::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(item::Entity)
                    .if_not_exists()
                    .col(ColumnDef::new(I::Id).big_integer().not_null().primary_key())
                    .col(ColumnDef::new(I::OrderId).big_integer().not_null())
                    .col(ColumnDef::new(I::ProductId).big_integer().not_null())
                    .col(ColumnDef::new(I::ProductName).string_len(255).not_null())
                    .col(ColumnDef::new(I::Price).decimal_len(10, 2).not_null())
                    .col(ColumnDef::new(I::Count).integer().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_t_order_item_order")
                    .table(item::Entity)
                    .col(I::OrderId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(request::Entity)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(R::RequestId)
                            .string_len(MAX_REQUEST_ID as u32)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(R::Attempt).integer().not_null())
                    .col(ColumnDef::new(R::State).string_len(16).not_null())
                    .col(ColumnDef::new(R::UserId).big_integer().not_null())
                    .col(ColumnDef::new(R::ProductId).big_integer().not_null())
                    .col(ColumnDef::new(R::Count).integer().not_null())
                    .col(ColumnDef::new(R::OrderId).big_integer().null())
                    .col(crate::shop::db::timestamp_column(
                        manager.get_database_backend(),
                        R::UpdatedAt,
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_t_order_request_state")
                    .table(request::Entity)
                    .col(R::State)
                    .col(R::UpdatedAt)
                    .to_owned(),
            )
            .await
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    pub user_name: String,
    pub phone: String,
    pub address: String,
    pub total_price: Money,
    pub request_id: String,
    pub created_at: DateTime<Utc>,
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: i64,
    pub product_id: i64,
    pub product_name: String,
    pub price: Money,
    pub count: i32,
}

/// What an order request asks for; a retry must ask for the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    pub user_id: i64,
    pub product_id: i64,
    pub count: i32,
}

/// What claiming a request id found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This call places it, as this attempt.
    Placing { attempt: i32 },
    /// It placed this order already.
    Done { order_id: i64 },
    /// Another call is placing it, or undoing it, now.
    InProgress,
    /// The request id asked for something else.
    Mismatch(Asked),
}

/// A request whose deduction may need restoring: found by the sweeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsettled {
    pub request_id: String,
    pub attempt: i32,
}

#[derive(Clone)]
pub struct Orders {
    db: DatabaseConnection,
}

impl Orders {
    pub fn new(db: DatabaseConnection) -> Self {
        Orders { db }
    }

    /// Takes `request_id` for this call: new, or a retry after a failed
    /// attempt.
    pub async fn claim(&self, request_id: &str, asked: Asked) -> Result<Claim, Error> {
        let storage = |err| Error::storage("recording the order request", err);
        let inserted = request::Entity::insert(request::ActiveModel {
            request_id: Set(request_id.to_owned()),
            attempt: Set(0),
            state: Set(request::PENDING.into()),
            user_id: Set(asked.user_id),
            product_id: Set(asked.product_id),
            count: Set(asked.count),
            order_id: Set(None),
            updated_at: Set(crate::shop::db::now()),
        })
        .exec_without_returning(&self.db)
        .await;
        match inserted {
            Ok(_) => return Ok(Claim::Placing { attempt: 0 }),
            Err(err) if is_unique_violation(&err) => {}
            Err(err) => return Err(storage(err)),
        }
        let Some(found) = request::Entity::find_by_id(request_id)
            .one(&self.db)
            .await
            .map_err(storage)?
        else {
            // Forgotten between our insert and read: another call's
            // refusal. Its caller was told; this one may try again.
            return Ok(Claim::InProgress);
        };
        let before = Asked {
            user_id: found.user_id,
            product_id: found.product_id,
            count: found.count,
        };
        if before != asked {
            return Ok(Claim::Mismatch(before));
        }
        match found.state.as_str() {
            request::DONE => Ok(found
                .order_id
                .map(|order_id| Claim::Done { order_id })
                .unwrap_or(Claim::InProgress)),
            request::FAILED => {
                let next = found.attempt + 1;
                let moved = self
                    .shift(
                        request_id,
                        found.attempt,
                        request::FAILED,
                        request::PENDING,
                        next,
                    )
                    .await?;
                Ok(if moved {
                    Claim::Placing { attempt: next }
                } else {
                    Claim::InProgress
                })
            }
            _ => Ok(Claim::InProgress),
        }
    }

    /// Moves `request_id` from (`attempt`, `from`) to (`to_attempt`, `to`);
    /// false when it was not there.
    async fn shift(
        &self,
        request_id: &str,
        attempt: i32,
        from: &str,
        to: &str,
        to_attempt: i32,
    ) -> Result<bool, Error> {
        let moved = request::Entity::update_many()
            .col_expr(request::Column::State, Expr::value(to))
            .col_expr(request::Column::Attempt, Expr::value(to_attempt))
            .col_expr(
                request::Column::UpdatedAt,
                Expr::value(crate::shop::db::now()),
            )
            .filter(request::Column::RequestId.eq(request_id))
            .filter(request::Column::Attempt.eq(attempt))
            .filter(request::Column::State.eq(from))
            .exec(&self.db)
            .await
            .map_err(|err| Error::storage("updating the order request", err))?;
        Ok(moved.rows_affected == 1)
    }

    /// The product service answered that this attempt's key was closed:
    /// go on with the next attempt.
    pub async fn next_attempt(&self, request_id: &str, attempt: i32) -> Result<bool, Error> {
        self.shift(
            request_id,
            attempt,
            request::PENDING,
            request::PENDING,
            attempt + 1,
        )
        .await
    }

    /// Drops a request refused before anything was deducted: a refused
    /// order leaves no row behind.
    pub async fn forget(&self, request_id: &str, attempt: i32) -> Result<(), Error> {
        request::Entity::delete_many()
            .filter(request::Column::RequestId.eq(request_id))
            .filter(request::Column::Attempt.eq(attempt))
            .filter(request::Column::State.eq(request::PENDING))
            .exec(&self.db)
            .await
            .map_err(|err| Error::storage("dropping a refused order request", err))?;
        Ok(())
    }

    /// Writes the order and its items, and marks the request done, in one
    /// transaction; Ok(false) when the request is no longer this call's
    /// (the sweeper took it for dead), and nothing is written.
    pub async fn place(&self, attempt: i32, order: &Order) -> Result<bool, DbErr> {
        let txn = begin_write(&self.db).await?;
        let done = request::Entity::update_many()
            .col_expr(request::Column::State, Expr::value(request::DONE))
            .col_expr(request::Column::OrderId, Expr::value(order.id))
            .col_expr(
                request::Column::UpdatedAt,
                Expr::value(crate::shop::db::now()),
            )
            .filter(request::Column::RequestId.eq(order.request_id.as_str()))
            .filter(request::Column::Attempt.eq(attempt))
            .filter(request::Column::State.eq(request::PENDING))
            .exec(&txn)
            .await?;
        if done.rows_affected != 1 {
            txn.rollback().await?;
            return Ok(false);
        }
        order::Entity::insert(order::ActiveModel {
            id: Set(order.id),
            user_id: Set(order.user_id),
            user_name: Set(order.user_name.clone()),
            phone: Set(order.phone.clone()),
            address: Set(order.address.clone()),
            total_price: Set(order.total_price),
            request_id: Set(order.request_id.clone()),
            created_at: Set(order.created_at),
        })
        .exec_without_returning(&txn)
        .await?;
        let items = order.items.iter().map(|item| item::ActiveModel {
            id: Set(item.id),
            order_id: Set(order.id),
            product_id: Set(item.product_id),
            product_name: Set(item.product_name.clone()),
            price: Set(item.price),
            count: Set(item.count),
        });
        item::Entity::insert_many(items)
            .exec_without_returning(&txn)
            .await?;
        txn.commit().await?;
        Ok(true)
    }

    /// Takes the request from `pending` (or finds it `compensating`) so its
    /// deduction may be restored; false when its order was written, and
    /// the deduction must stay.
    pub async fn begin_compensation(&self, request_id: &str, attempt: i32) -> Result<bool, Error> {
        if self
            .shift(
                request_id,
                attempt,
                request::PENDING,
                request::COMPENSATING,
                attempt,
            )
            .await?
        {
            return Ok(true);
        }
        let found = request::Entity::find_by_id(request_id)
            .one(&self.db)
            .await
            .map_err(|err| Error::storage("reading the order request", err))?;
        Ok(matches!(found, Some(found)
            if found.attempt == attempt && found.state == request::COMPENSATING))
    }

    /// The deduction is restored: the request failed, and a retry may
    /// start the next attempt.
    pub async fn finish_compensation(&self, request_id: &str, attempt: i32) -> Result<(), Error> {
        self.shift(
            request_id,
            attempt,
            request::COMPENSATING,
            request::FAILED,
            attempt,
        )
        .await
        .map(drop)
    }

    /// Requests left compensating, or pending since before `stale`: their
    /// callers died or gave up.
    pub async fn unsettled(
        &self,
        stale: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<Unsettled>, Error> {
        use sea_orm::Condition;
        let rows = request::Entity::find()
            .filter(
                Condition::any()
                    .add(request::Column::State.eq(request::COMPENSATING))
                    .add(
                        Condition::all()
                            .add(request::Column::State.eq(request::PENDING))
                            .add(request::Column::UpdatedAt.lt(stale)),
                    ),
            )
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(|err| Error::storage("looking for unsettled orders", err))?;
        Ok(rows
            .into_iter()
            .map(|row| Unsettled {
                request_id: row.request_id,
                attempt: row.attempt,
            })
            .collect())
    }

    pub async fn get(&self, id: i64) -> Result<Order, Error> {
        let storage = |err| Error::storage("reading an order", err);
        let row = order::Entity::find_by_id(id)
            .one(&self.db)
            .await
            .map_err(storage)?
            .ok_or_else(|| Error::NotFound(format!("order {id} not found")))?;
        let mut orders = self.with_items(vec![row]).await?;
        Ok(orders.remove(0))
    }

    /// A user's orders with ids below `before`, newest first.
    pub async fn list(
        &self,
        user_id: i64,
        before: Option<i64>,
        limit: u64,
    ) -> Result<Vec<Order>, Error> {
        let mut query = order::Entity::find()
            .filter(order::Column::UserId.eq(user_id))
            .order_by_desc(order::Column::Id);
        if let Some(before) = before {
            query = query.filter(order::Column::Id.lt(before));
        }
        let rows = query
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(|err| Error::storage("listing orders", err))?;
        self.with_items(rows).await
    }

    async fn with_items(&self, rows: Vec<order::Model>) -> Result<Vec<Order>, Error> {
        let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
        let mut items: HashMap<i64, Vec<Item>> = HashMap::new();
        if !ids.is_empty() {
            let found = item::Entity::find()
                .filter(item::Column::OrderId.is_in(ids))
                .order_by_asc(item::Column::Id)
                .all(&self.db)
                .await
                .map_err(|err| Error::storage("reading order items", err))?;
            for row in found {
                items.entry(row.order_id).or_default().push(Item {
                    id: row.id,
                    product_id: row.product_id,
                    product_name: row.product_name,
                    price: row.price,
                    count: row.count,
                });
            }
        }
        Ok(rows
            .into_iter()
            .map(|row| Order {
                items: items.remove(&row.id).unwrap_or_default(),
                id: row.id,
                user_id: row.user_id,
                user_name: row.user_name,
                phone: row.phone,
                address: row.address,
                total_price: row.total_price,
                request_id: row.request_id,
                created_at: row.created_at,
            })
            .collect())
    }
}
