//! The product service's tables: `t_product` with the seed's columns, and
//! `t_stock_deduction`, one row per request id that took stock, so a
//! deduction happens once and is restored once.

use sea_orm::entity::prelude::*;
use sea_orm::sea_query::ExprTrait;
use sea_orm::{ActiveValue::Set, DatabaseConnection, DatabaseTransaction, QueryOrder, QuerySelect};
use sea_orm_migration::prelude::{ColumnDef, DynIden, Table};
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, SchemaManager};

use crate::shop::db::{begin_write, is_unique_violation};
use crate::shop::keys::{ExactKeys, Key};
use crate::shop::money::{ExactMoney, MoneyColumn};
use crate::shop::{Error, Money};

pub mod product {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_product")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i64,
        #[sea_orm(column_name = "t_pro_name")]
        pub name: String,
        #[sea_orm(column_name = "t_pro_price")]
        pub price: crate::shop::Money,
        #[sea_orm(column_name = "t_pro_stock")]
        pub stock: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod deduction {
    use sea_orm::entity::prelude::*;

    /// What became of a deduction. Kept as the words the column has
    /// always held, so a database written before reads the same.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
    #[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
    pub enum State {
        /// The stock is taken.
        #[sea_orm(string_value = "deducted")]
        Deducted,
        /// The stock was put back, or the request id was closed before it
        /// took any (then `count` is 0).
        #[sea_orm(string_value = "restored")]
        Restored,
    }

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_stock_deduction")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        pub product_id: i64,
        pub count: i32,
        pub state: State,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The longest request id a deduction takes.
pub const MAX_REQUEST_ID: usize = 160;

/// The product service's schema, with its own migration table.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateProducts),
            Box::new(ExactKeys {
                name: "m20261201_000001_exact_deduction_keys",
                keys: &[Key {
                    table: "t_stock_deduction",
                    column: "request_id",
                    chars: MAX_REQUEST_ID as u32,
                }],
            }),
            Box::new(ExactMoney {
                name: "m20261201_000002_exact_product_money",
                columns: &[MoneyColumn {
                    table: "t_product",
                    column: "t_pro_price",
                }],
            }),
        ]
    }

    fn migration_table_name() -> DynIden {
        "seaql_migrations_product".into()
    }
}

struct CreateProducts;

impl MigrationName for CreateProducts {
    fn name(&self) -> &str {
        "m20261124_000001_create_t_product"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateProducts {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use deduction::Column as D;
        use product::Column as P;
        manager
            .create_table(
                Table::create()
                    .table(product::Entity)
                    .if_not_exists()
                    .col(ColumnDef::new(P::Id).big_integer().not_null().primary_key())
                    .col(ColumnDef::new(P::Name).string_len(255).not_null())
                    .col(ColumnDef::new(P::Price).decimal_len(10, 2).not_null())
                    // The database itself refuses a negative stock.
                    .col(
                        ColumnDef::new(P::Stock)
                            .integer()
                            .not_null()
                            .check(Expr::col(P::Stock).gte(0)),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(deduction::Entity)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(D::RequestId)
                            .string_len(MAX_REQUEST_ID as u32)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(D::ProductId).big_integer().not_null())
                    .col(ColumnDef::new(D::Count).integer().not_null())
                    .col(ColumnDef::new(D::State).string_len(16).not_null())
                    .col(crate::shop::db::timestamp_column(
                        manager.get_database_backend(),
                        D::CreatedAt,
                    ))
                    .col(crate::shop::db::timestamp_column(
                        manager.get_database_backend(),
                        D::UpdatedAt,
                    ))
                    .to_owned(),
            )
            .await
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub price: Money,
    pub stock: i32,
}

impl From<product::Model> for Product {
    fn from(row: product::Model) -> Self {
        Product {
            id: row.id,
            name: row.name,
            price: row.price,
            stock: row.stock,
        }
    }
}

/// What a DeductStock did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deducted {
    /// Taken (now or before, for this request id); the product after it.
    Taken(Product),
    /// The request id was restored or closed; nothing taken.
    Cancelled,
}

/// What a RestoreStock did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// What the deduction had taken (0 and 0 when it took nothing).
    pub product_id: i64,
    pub count: i32,
    /// An earlier call had restored or closed it already.
    pub already: bool,
}

#[derive(Clone)]
pub struct Products {
    db: DatabaseConnection,
}

impl Products {
    pub fn new(db: DatabaseConnection) -> Self {
        Products { db }
    }

    pub async fn get(&self, id: i64) -> Result<Product, Error> {
        self.find(id).await?.ok_or_else(|| not_found(id))
    }

    async fn find(&self, id: i64) -> Result<Option<Product>, Error> {
        Ok(product::Entity::find_by_id(id)
            .one(&self.db)
            .await
            .map_err(|err| Error::storage("reading a product", err))?
            .map(Product::from))
    }

    /// Up to `limit` products with ids above `after`, in id order.
    pub async fn list(&self, after: Option<i64>, limit: u64) -> Result<Vec<Product>, Error> {
        let mut query = product::Entity::find().order_by_asc(product::Column::Id);
        if let Some(after) = after {
            query = query.filter(product::Column::Id.gt(after));
        }
        Ok(query
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(|err| Error::storage("listing products", err))?
            .into_iter()
            .map(Product::from)
            .collect())
    }

    /// Takes `count` of `product_id` for `request_id`, once: the record of
    /// the request and one conditional update of the stock commit
    /// together, and the update only matches while enough is left.
    pub async fn deduct(
        &self,
        request_id: &str,
        product_id: i64,
        count: i32,
    ) -> Result<Deducted, Error> {
        let storage = |err| Error::storage("deducting stock", err);
        let txn = begin_write(&self.db).await.map_err(storage)?;
        let recorded = record(
            &txn,
            request_id,
            product_id,
            count,
            deduction::State::Deducted,
        )
        .await;
        match recorded {
            Ok(_) => {}
            Err(err) if is_unique_violation(&err) => {
                txn.rollback().await.map_err(storage)?;
                return self.deducted_before(request_id, product_id, count).await;
            }
            Err(err) => return Err(storage(err)),
        }
        let taken = product::Entity::update_many()
            .col_expr(
                product::Column::Stock,
                Expr::col(product::Column::Stock).sub(count),
            )
            .filter(product::Column::Id.eq(product_id))
            .filter(product::Column::Stock.gte(count))
            .exec(&txn)
            .await
            .map_err(storage)?;
        let after = product::Entity::find_by_id(product_id)
            .one(&txn)
            .await
            .map_err(storage)?;
        match after {
            Some(after) if taken.rows_affected == 1 => {
                txn.commit().await.map_err(storage)?;
                Ok(Deducted::Taken(after.into()))
            }
            Some(after) => Err(Error::FailedPrecondition(format!(
                "product {product_id} has {} in stock, {count} requested",
                after.stock
            ))),
            None => Err(not_found(product_id)),
        }
    }

    /// A DeductStock whose request id is on record already.
    async fn deducted_before(
        &self,
        request_id: &str,
        product_id: i64,
        count: i32,
    ) -> Result<Deducted, Error> {
        let storage = |err| Error::storage("reading a stock deduction", err);
        let Some(before) = deduction::Entity::find_by_id(request_id)
            .one(&self.db)
            .await
            .map_err(storage)?
        else {
            return Err(in_flight(request_id));
        };
        if before.state == deduction::State::Restored {
            return Ok(Deducted::Cancelled);
        }
        if (before.product_id, before.count) != (product_id, count) {
            return Err(Error::FailedPrecondition(format!(
                "request_id {request_id} already deducted {} of product {}; a different deduction needs a new request_id",
                before.count, before.product_id
            )));
        }
        Ok(Deducted::Taken(self.get(product_id).await?))
    }

    /// Puts back what `request_id` took, once. An unknown request id is
    /// closed (recorded as restored, nothing taken), so a DeductStock that
    /// arrives after its own compensation takes nothing.
    pub async fn restore(&self, request_id: &str) -> Result<Restored, Error> {
        let storage = |err| Error::storage("restoring stock", err);
        let txn = begin_write(&self.db).await.map_err(storage)?;
        let closed = record(&txn, request_id, 0, 0, deduction::State::Restored).await;
        match closed {
            Ok(_) => {
                txn.commit().await.map_err(storage)?;
                return Ok(Restored {
                    product_id: 0,
                    count: 0,
                    already: false,
                });
            }
            Err(err) if is_unique_violation(&err) => txn.rollback().await.map_err(storage)?,
            Err(err) => return Err(storage(err)),
        }
        let txn = begin_write(&self.db).await.map_err(storage)?;
        let flipped = deduction::Entity::update_many()
            .col_expr(
                deduction::Column::State,
                Expr::value(deduction::State::Restored),
            )
            .col_expr(
                deduction::Column::UpdatedAt,
                Expr::value(crate::shop::db::now()),
            )
            .filter(deduction::Column::RequestId.eq(request_id))
            .filter(deduction::Column::State.eq(deduction::State::Deducted))
            .exec(&txn)
            .await
            .map_err(storage)?;
        let record = deduction::Entity::find_by_id(request_id)
            .one(&txn)
            .await
            .map_err(storage)?
            .ok_or_else(|| in_flight(request_id))?;
        if flipped.rows_affected == 1 {
            product::Entity::update_many()
                .col_expr(
                    product::Column::Stock,
                    Expr::col(product::Column::Stock).add(record.count),
                )
                .filter(product::Column::Id.eq(record.product_id))
                .exec(&txn)
                .await
                .map_err(storage)?;
        }
        txn.commit().await.map_err(storage)?;
        Ok(Restored {
            product_id: record.product_id,
            count: record.count,
            already: flipped.rows_affected == 0,
        })
    }

    /// The seed's products, when the table is empty.
    pub async fn seed(&self) -> Result<(), DbErr> {
        if product::Entity::find().count(&self.db).await? > 0 {
            return Ok(());
        }
        for (id, name, price) in [
            (1001, "华为", "2399.00"),
            (1002, "小米", "1999.00"),
            (1003, "iphone", "4999.00"),
        ] {
            let row = product::ActiveModel {
                id: Set(id),
                name: Set(name.into()),
                price: Set(Money::parse(price).expect("a seed price is an amount")),
                stock: Set(100),
            };
            // Another instance seeding at the same moment wins; fine.
            match product::Entity::insert(row)
                .exec_without_returning(&self.db)
                .await
            {
                Ok(_) => {}
                Err(err) if is_unique_violation(&err) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

/// Records what `request_id` did, in `txn`; a unique violation when it is
/// on record already.
async fn record(
    txn: &DatabaseTransaction,
    request_id: &str,
    product_id: i64,
    count: i32,
    state: deduction::State,
) -> Result<u64, DbErr> {
    let now = crate::shop::db::now();
    deduction::Entity::insert(deduction::ActiveModel {
        request_id: Set(request_id.to_owned()),
        product_id: Set(product_id),
        count: Set(count),
        state: Set(state),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(txn)
    .await
}

/// The record of `request_id` is in another call's open transaction.
fn in_flight(request_id: &str) -> Error {
    Error::Unavailable(format!(
        "the deduction {request_id} is being written by another call; retry"
    ))
}

fn not_found(id: i64) -> Error {
    Error::NotFound(format!("product {id} not found"))
}
