//! Keys compared for identity (request ids, lease holders) compare byte for
//! byte on every backend.
//!
//! SQLite's BINARY collation and PostgreSQL's deterministic ones already
//! do. MySQL and MariaDB compare by the column's collation, and their
//! defaults (`utf8mb4_general_ci`, `utf8mb4_0900_ai_ci`) fold case and
//! accents, take many emoji as one, and on MariaDB ignore trailing spaces:
//! `Ab`, `ab` and `AB ` were one request, and its second and third callers
//! were answered with an order they never placed. [`ExactKeys`] moves such
//! columns to a binary NO PAD collation. `utf8mb4_bin` will not do (it is
//! PAD SPACE on MariaDB, `ab` = `ab `), and VARBINARY, which compares
//! bytes, is refused by sqlx when read back as text.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use sea_orm_migration::{MigrationName, MigrationTrait, SchemaManager};

/// The binary NO PAD collations, in the order tried: MariaDB's (10.2 on),
/// then MySQL's (8.0 on).
pub const EXACT_COLLATIONS: [&str; 2] = ["utf8mb4_nopad_bin", "utf8mb4_0900_bin"];

/// A `VARCHAR(chars) NOT NULL` column compared for identity.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Table that holds the column.
    pub table: &'static str,
    /// Column to move to a byte-for-byte collation.
    pub column: &'static str,
    /// The column's length, restated because MySQL's `MODIFY` rewrites the
    /// whole column type.
    pub chars: u32,
}

/// A migration that makes `keys` compare byte for byte; nothing to do
/// outside MySQL and MariaDB. Running it again changes nothing, so an
/// instance that lost a migration race may repeat it.
pub struct ExactKeys {
    /// The migration's name, as recorded in the migrations table.
    pub name: &'static str,
    /// The columns it makes exact.
    pub keys: &'static [Key],
}

impl MigrationName for ExactKeys {
    fn name(&self) -> &str {
        self.name
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for ExactKeys {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::MySql {
            return Ok(());
        }
        let db = manager.get_connection();
        let collation = exact_collation(db).await?;
        for key in self.keys {
            db.execute_unprepared(&format!(
                "ALTER TABLE `{}` MODIFY `{}` VARCHAR({}) CHARACTER SET utf8mb4 COLLATE {collation} NOT NULL",
                key.table, key.column, key.chars
            ))
            .await?;
        }
        Ok(())
    }
}

/// The first of [`EXACT_COLLATIONS`] the MySQL or MariaDB server has.
pub async fn exact_collation(db: &impl ConnectionTrait) -> Result<&'static str, DbErr> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::MySql,
            format!(
                "SELECT COLLATION_NAME FROM information_schema.COLLATIONS WHERE COLLATION_NAME IN ('{}')",
                EXACT_COLLATIONS.join("', '")
            ),
        ))
        .await?;
    let found: Vec<String> = rows
        .iter()
        .map(|row| row.try_get_by_index::<String>(0))
        .collect::<Result<_, _>>()?;
    EXACT_COLLATIONS
        .into_iter()
        .find(|name| found.iter().any(|found| found == name))
        .ok_or_else(|| {
            DbErr::Migration(format!(
                "the server has none of the collations {} that compare request ids byte for byte; use MariaDB 10.2 or later, or MySQL 8.0 or later",
                EXACT_COLLATIONS.join(", ")
            ))
        })
}
