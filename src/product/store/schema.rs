//! The product service's tables and their migrations: `t_product` with
//! the seed's columns, and `t_stock_deduction`, one row per request id
//! that took stock.

use sea_orm::entity::prelude::*;
use sea_orm::sea_query::ExprTrait;
use sea_orm_migration::prelude::{ColumnDef, DynIden, Table};
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, SchemaManager};

use crate::shop::keys::{ExactKeys, Key};
use crate::shop::money::{ExactMoney, MoneyColumn};

/// `t_product`: the catalogue and its stock, in the seed's column names.
pub mod product {
    use sea_orm::entity::prelude::*;

    /// One product row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_product")]
    pub struct Model {
        /// The id callers ask for; assigned by whoever adds the row, never
        /// by the database.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i64,
        /// Display name.
        #[sea_orm(column_name = "t_pro_name")]
        pub name: String,
        /// Unit price an order is charged.
        #[sea_orm(column_name = "t_pro_price")]
        pub price: crate::shop::Money,
        /// Units left to sell; deductions take from it, restores put back.
        #[sea_orm(column_name = "t_pro_stock")]
        pub stock: i32,
    }

    /// Empty: the product table refers to no other.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `t_stock_deduction`: one row per request id that took stock, so a
/// retried deduction or restore does its work once.
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

    /// One request id's deduction.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_stock_deduction")]
    pub struct Model {
        /// The caller's idempotency key, at most
        /// [`MAX_REQUEST_ID`](super::MAX_REQUEST_ID) characters,
        /// compared byte for byte.
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        /// Product the stock was taken from.
        pub product_id: i64,
        /// Units taken; 0 when the request id was closed before it took any.
        pub count: i32,
        /// Whether the stock is still taken.
        pub state: State,
        /// When the request id was first seen.
        pub created_at: DateTimeUtc,
        /// When `state` last changed.
        pub updated_at: DateTimeUtc,
    }

    /// Empty: deductions name their product by id, with no declared relation.
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
