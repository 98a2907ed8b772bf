//! The user service's table, `t_user`, with the seed's columns.

use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue::Set, DatabaseConnection};
use sea_orm_migration::prelude::{ColumnDef, DynIden, Table};
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, SchemaManager};

use crate::shop::Error;

/// `t_user`: the shop's users, in the seed's column names.
pub mod user {
    use sea_orm::entity::prelude::*;

    /// One user row, password hash included.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_user")]
    pub struct Model {
        /// The id callers and orders name the user by; assigned by whoever
        /// adds the row, never by the database.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i64,
        /// Login name, up to 64 characters.
        #[sea_orm(column_name = "t_username")]
        pub username: String,
        /// A hash, never sent to anyone.
        #[sea_orm(column_name = "t_password")]
        pub password: String,
        /// Contact number, as entered; up to 32 characters.
        #[sea_orm(column_name = "t_phone")]
        pub phone: String,
        /// Delivery address, as entered; up to 255 characters.
        #[sea_orm(column_name = "t_address")]
        pub address: String,
    }

    /// Empty: the user table refers to no other.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The user service's schema; its own migration table, so the three
/// services can share one database as the seed's do.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateUsers)]
    }

    fn migration_table_name() -> DynIden {
        "seaql_migrations_user".into()
    }
}

struct CreateUsers;

impl MigrationName for CreateUsers {
    fn name(&self) -> &str {
        "m20261124_000001_create_t_user"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateUsers {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use user::Column;
        manager
            .create_table(
                Table::create()
                    .table(user::Entity)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Column::Id)
                            .big_integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Column::Username).string_len(64).not_null())
                    .col(ColumnDef::new(Column::Password).string_len(128).not_null())
                    .col(ColumnDef::new(Column::Phone).string_len(32).not_null())
                    .col(ColumnDef::new(Column::Address).string_len(255).not_null())
                    .to_owned(),
            )
            .await
    }
}

/// A user as the service answers: no password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The id callers and orders name the user by.
    pub id: i64,
    /// Login name.
    pub username: String,
    /// Contact number, as entered.
    pub phone: String,
    /// Delivery address, as entered.
    pub address: String,
}

impl From<user::Model> for User {
    fn from(row: user::Model) -> Self {
        User {
            id: row.id,
            username: row.username,
            phone: row.phone,
            address: row.address,
        }
    }
}

/// The user service's storage: reads of `t_user` that never let the
/// password hash out.
#[derive(Clone)]
pub struct Users {
    db: DatabaseConnection,
}

impl Users {
    /// Over a database already migrated by [`Migrator`].
    pub fn new(db: DatabaseConnection) -> Self {
        Users { db }
    }

    /// The user `id`, without the password; NOT_FOUND when there is none.
    pub async fn get(&self, id: i64) -> Result<User, Error> {
        user::Entity::find_by_id(id)
            .one(&self.db)
            .await
            .map_err(|err| Error::storage("reading a user", err))?
            .map(User::from)
            .ok_or_else(|| Error::NotFound(format!("user {id} not found")))
    }

    /// The seed's user, when the table is empty.
    pub async fn seed(&self) -> Result<(), DbErr> {
        if user::Entity::find().count(&self.db).await? > 0 {
            return Ok(());
        }
        let seed = user::ActiveModel {
            id: Set(1001),
            username: Set("binghe".into()),
            password: Set("c26be8aaf53b15054896983b43eb6a65".into()),
            phone: Set("13212345678".into()),
            address: Set("北京".into()),
        };
        // Another instance seeding at the same moment wins; that is fine.
        match user::Entity::insert(seed)
            .exec_without_returning(&self.db)
            .await
        {
            Err(err) if !crate::shop::db::is_unique_violation(&err) => Err(err),
            _ => Ok(()),
        }
    }
}
