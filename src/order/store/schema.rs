//! The order service's tables and the migrations that make them.

use sea_orm::entity::prelude::*;
use sea_orm_migration::prelude::{ColumnDef, DynIden, Index, Table};
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, SchemaManager};

use crate::shop::keys::{ExactKeys, Key};
use crate::shop::money::{ExactMoney, MoneyColumn};

/// `t_order`: one row per placed order, in the seed's column names.
pub mod order {
    use sea_orm::entity::prelude::*;

    /// One order row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_order")]
    pub struct Model {
        /// From the id generator, never from the database.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i64,
        /// The buyer; orders are listed by it.
        #[sea_orm(column_name = "t_user_id")]
        pub user_id: i64,
        /// The buyer's name when the order was placed.
        #[sea_orm(column_name = "t_user_name")]
        pub user_name: String,
        /// The buyer's phone when the order was placed.
        #[sea_orm(column_name = "t_phone")]
        pub phone: String,
        /// The delivery address when the order was placed.
        #[sea_orm(column_name = "t_address")]
        pub address: String,
        /// What the order was charged.
        #[sea_orm(column_name = "t_total_price")]
        pub total_price: crate::shop::Money,
        /// The request id that placed it; unique, so one request id never
        /// makes two orders.
        pub request_id: String,
        /// When the order was written.
        pub created_at: DateTimeUtc,
    }

    /// Empty: no relation is declared; items are read by `t_order_id`.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `t_order_item`: an order's lines, in the seed's column names.
pub mod item {
    use sea_orm::entity::prelude::*;

    /// One order line.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_order_item")]
    pub struct Model {
        /// From the id generator, never from the database.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i64,
        /// The `t_order` row it belongs to; written in the same
        /// transaction.
        #[sea_orm(column_name = "t_order_id")]
        pub order_id: i64,
        /// The product bought.
        #[sea_orm(column_name = "t_pro_id")]
        pub product_id: i64,
        /// The product's name when the order was placed.
        #[sea_orm(column_name = "t_pro_name")]
        pub product_name: String,
        /// Unit price charged.
        #[sea_orm(column_name = "t_pro_price")]
        pub price: crate::shop::Money,
        /// Units bought.
        #[sea_orm(column_name = "t_number")]
        pub count: i32,
    }

    /// Empty: no relation is declared; the order is found by `order_id`.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `t_order_request`: one row per request id, the state machine that
/// makes placing an order safe to retry (see `requests`).
pub mod request {
    use sea_orm::entity::prelude::*;

    /// Where a request is. Kept as the words the column has always held,
    /// so a database written before reads the same.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
    #[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
    pub enum State {
        /// Being placed by the call that claimed it. Becomes `Done` when
        /// its order is written, or `Compensating` when the attempt is
        /// given up (by its caller or, once stale, by the sweeper);
        /// deleted instead when refused before anything was deducted.
        #[sea_orm(string_value = "pending")]
        Pending,
        /// Its deduction is being restored; becomes `Failed` once the
        /// product service confirms the restore.
        #[sea_orm(string_value = "compensating")]
        Compensating,
        /// Ended without an order; its deduction restored. A retry under
        /// the same request id claims it back to `Pending` as the next
        /// attempt.
        #[sea_orm(string_value = "failed")]
        Failed,
        /// Final: its order is written and `order_id` set; a retry gets
        /// that order back.
        #[sea_orm(string_value = "done")]
        Done,
    }

    /// One request id's progress.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_order_request")]
    pub struct Model {
        /// The caller's idempotency key, or `auto-<id>` when the caller
        /// sent none; at most [`MAX_REQUEST_ID`](super::MAX_REQUEST_ID)
        /// characters.
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        /// Each attempt deducts under its own key (`<request_id>#<attempt>`),
        /// so a restored attempt can never be taken again by a late copy.
        pub attempt: i32,
        /// Where the request is; every move is a conditional update from
        /// the state (and attempt) it is expected in.
        pub state: State,
        /// The buyer; a retry must ask for the same.
        pub user_id: i64,
        /// The product asked for; a retry must ask for the same.
        pub product_id: i64,
        /// The units asked for; a retry must ask for the same.
        pub count: i32,
        /// The order written; set when the request becomes `Done`.
        pub order_id: Option<i64>,
        /// When the request last moved; a `pending` request older than the
        /// pending timeout is taken for abandoned by the sweeper.
        pub updated_at: DateTimeUtc,
    }

    /// Empty: the request refers to its order only by `order_id`.
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
        index(
            manager,
            "idx_t_order_user",
            order::Entity,
            &[O::UserId, O::Id],
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
        index(
            manager,
            "idx_t_order_item_order",
            item::Entity,
            &[I::OrderId],
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
        index(
            manager,
            "idx_t_order_request_state",
            request::Entity,
            &[R::State, R::UpdatedAt],
        )
        .await
    }
}

/// Creates index `name` on `entity`'s `cols`, in that order, unless an
/// index of that name exists. Existing databases hold these indexes under
/// these names, so a name or column order changed here is not applied to
/// them.
async fn index<E: EntityTrait>(
    manager: &SchemaManager<'_>,
    name: &str,
    entity: E,
    cols: &[E::Column],
) -> Result<(), DbErr> {
    let mut index = Index::create();
    index.if_not_exists().name(name).table(entity);
    for &col in cols {
        index.col(col);
    }
    manager.create_index(index).await
}
