//! Exact money: a decimal with two places, never a float. It travels as a
//! string ("2399.00") and is stored as DECIMAL, or on SQLite as TEXT.
//!
//! SQLite has no decimal type: a DECIMAL column there has REAL affinity
//! and keeps a binary float, which is what the first schema did. So on
//! SQLite an amount is the text "2399.00", written and read as text, and
//! [`ExactMoney`] moves the columns of a database made before to it.

use std::fmt;

use rust_decimal::Decimal;
use sea_orm::sea_query::{ArrayType, ColumnType, Nullable, ValueType, ValueTypeErr};
use sea_orm::{
    ColIdx, ConnectionTrait, DbBackend, DbErr, QueryResult, Statement, TryGetError, TryGetable,
    Value,
};
use sea_orm_migration::{MigrationName, MigrationTrait, SchemaManager};

/// The most a stored amount may hold: 13 digits before the point
/// (DECIMAL(15,2)).
const MAX_TOTAL: Decimal = Decimal::from_parts(2_764_472_319, 232_830, 0, false, 2);

/// An amount of money, exact to the cent: never a float, so prices and
/// totals add up the same on every backend; at most what DECIMAL(15,2)
/// holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Money(Decimal);

impl Money {
    /// From a decimal with at most two places; one that went through a
    /// float is rounded to its two places, which is exact for the 15
    /// digits a DECIMAL(15,2) holds.
    pub fn from_db(value: Decimal) -> Self {
        let mut value = value.round_dp(2);
        value.rescale(2);
        Money(value)
    }

    /// Parses "2399.00" (or "2399", "2399.5"); at most two places, not
    /// negative.
    pub fn parse(text: &str) -> Result<Self, String> {
        let shown = crate::quote::quoted(text);
        let value: Decimal = text
            .trim()
            .parse()
            .map_err(|_| format!("{shown} is not a decimal amount"))?;
        if value.is_sign_negative() {
            return Err(format!("{shown} is negative"));
        }
        if value.scale() > 2 {
            return Err(format!("{shown} has more than two decimal places"));
        }
        if value > MAX_TOTAL {
            return Err(format!("{shown} is too large"));
        }
        Ok(Money::from_db(value))
    }

    /// `self × count`, or None when the result would not fit a stored
    /// amount.
    pub fn times(self, count: u32) -> Option<Money> {
        let total = self.0.checked_mul(Decimal::from(count))?;
        (total <= MAX_TOTAL).then(|| Money::from_db(total))
    }

    /// The amount as a decimal at two places, for arithmetic and checks
    /// this type does not offer.
    pub fn decimal(self) -> Decimal {
        self.0
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2}", self.0)
    }
}

/// Bound as a decimal; sea-query binds a decimal to SQLite as its text.
impl From<Money> for Value {
    fn from(money: Money) -> Self {
        Value::Decimal(Some(money.0))
    }
}

impl TryGetable for Money {
    fn try_get_by<I: ColIdx>(res: &QueryResult, idx: I) -> Result<Self, TryGetError> {
        // Only SQLite answers text, and only a String reads it; MySQL and
        // PostgreSQL answer DECIMAL, which a String refuses.
        match String::try_get_by(res, idx) {
            Ok(text) => text.parse::<Decimal>().map(Money::from_db).map_err(|err| {
                TryGetError::DbErr(DbErr::Type(format!(
                    "the stored amount {text:?} is not a decimal: {err}"
                )))
            }),
            Err(TryGetError::Null(column)) => Err(TryGetError::Null(column)),
            Err(TryGetError::DbErr(_)) => Decimal::try_get_by(res, idx).map(Money::from_db),
        }
    }
}

impl ValueType for Money {
    fn try_from(value: Value) -> Result<Self, ValueTypeErr> {
        <Decimal as ValueType>::try_from(value).map(Money::from_db)
    }

    fn type_name() -> String {
        "Money".into()
    }

    fn array_type() -> ArrayType {
        ArrayType::Decimal
    }

    fn column_type() -> ColumnType {
        ColumnType::Decimal(Some((15, 2)))
    }
}

impl Nullable for Money {
    fn null() -> Value {
        Value::Decimal(None)
    }
}

/// A column holding an amount.
#[derive(Debug, Clone, Copy)]
pub struct MoneyColumn {
    /// Table that holds the column.
    pub table: &'static str,
    /// Column to store as exact text on SQLite.
    pub column: &'static str,
}

/// A migration that stores `columns` as TEXT on SQLite, each value its
/// exact two-place text; nothing to do elsewhere, where DECIMAL is exact.
/// SQLite cannot change a column's type, so each table is rebuilt from
/// its own schema with those columns TEXT, its rows copied and its
/// indexes made again, in one transaction.
pub struct ExactMoney {
    /// The migration's name, as recorded in the migrations table.
    pub name: &'static str,
    /// The columns it makes exact.
    pub columns: &'static [MoneyColumn],
}

impl MigrationName for ExactMoney {
    fn name(&self) -> &str {
        self.name
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for ExactMoney {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Sqlite {
            return Ok(());
        }
        let mut tables: Vec<&str> = self.columns.iter().map(|column| column.table).collect();
        tables.sort_unstable();
        tables.dedup();
        for table in tables {
            let columns: Vec<&str> = self
                .columns
                .iter()
                .filter(|column| column.table == table)
                .map(|column| column.column)
                .collect();
            rebuild_with_text(manager.get_connection(), table, &columns).await?;
        }
        Ok(())
    }

    /// A half-rebuilt table is never left behind.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// Rebuilds the SQLite table `table` with `money` declared TEXT, each
/// value written as `printf('%.2f')` of what was stored; a table whose
/// columns are TEXT already is left alone.
async fn rebuild_with_text(
    db: &impl ConnectionTrait,
    table: &str,
    money: &[&str],
) -> Result<(), DbErr> {
    let query = |sql: String| db.query_all_raw(Statement::from_string(DbBackend::Sqlite, sql));
    let mut columns = Vec::new();
    for row in query(format!("PRAGMA table_info(\"{table}\")")).await? {
        let name: String = row.try_get("", "name")?;
        let declared: String = row.try_get("", "type")?;
        columns.push((name, declared));
    }
    let declared = |name: &str| columns.iter().find(|(column, _)| column == name);
    let mut create = match query(format!(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = '{table}'"
    ))
    .await?
    .first()
    {
        Some(row) => row.try_get::<String>("", "sql")?,
        None => return Err(DbErr::Migration(format!("no table {table} to migrate"))),
    };
    let mut changed = false;
    for column in money {
        let Some((_, was)) = declared(column) else {
            return Err(DbErr::Migration(format!("{table} has no column {column}")));
        };
        if was.eq_ignore_ascii_case("text") {
            continue;
        }
        create = replace_once(
            &create,
            &format!("\"{column}\" {was}"),
            &format!("\"{column}\" text"),
        )
        .ok_or_else(|| {
            DbErr::Migration(format!(
                "cannot find {table}.{column} in its schema: {create}"
            ))
        })?;
        changed = true;
    }
    if !changed {
        return Ok(());
    }
    let rebuilt = format!("{table}_exact_money");
    let create = replace_once(&create, &format!("\"{table}\""), &format!("\"{rebuilt}\""))
        .ok_or_else(|| DbErr::Migration(format!("cannot find {table}'s name in its schema")))?;
    let indexes = query(format!(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = '{table}' AND sql IS NOT NULL"
    ))
    .await?
    .iter()
    .map(|row| row.try_get::<String>("", "sql"))
    .collect::<Result<Vec<_>, _>>()?;
    let names: Vec<String> = columns
        .iter()
        .map(|(name, _)| format!("\"{name}\""))
        .collect();
    let values: Vec<String> = columns
        .iter()
        .map(|(name, _)| match money.contains(&name.as_str()) {
            true => format!("printf('%.2f', \"{name}\")"),
            false => format!("\"{name}\""),
        })
        .collect();
    db.execute_unprepared(&create).await?;
    db.execute_unprepared(&format!(
        "INSERT INTO \"{rebuilt}\" ({}) SELECT {} FROM \"{table}\"",
        names.join(", "),
        values.join(", ")
    ))
    .await?;
    db.execute_unprepared(&format!("DROP TABLE \"{table}\""))
        .await?;
    db.execute_unprepared(&format!("ALTER TABLE \"{rebuilt}\" RENAME TO \"{table}\""))
        .await?;
    for index in indexes {
        db.execute_unprepared(&index).await?;
    }
    Ok(())
}

/// `text` with its one `from` replaced; None unless `from` occurs once.
fn replace_once(text: &str, from: &str, to: &str) -> Option<String> {
    (text.matches(from).count() == 1).then(|| text.replacen(from, to, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_keep_two_places_and_multiply_exactly() {
        let price = Money::parse("2399").unwrap();
        assert_eq!(price.to_string(), "2399.00");
        assert_eq!(price.times(10).unwrap().to_string(), "23990.00");
        assert_eq!(
            Money::parse("0.10").unwrap().times(3).unwrap().to_string(),
            "0.30"
        );
        // What SQLite gives back for 19.99 stored as REAL.
        let from_float = <Decimal as TryFrom<f64>>::try_from(19.99_f64).unwrap();
        assert_eq!(Money::from_db(from_float).to_string(), "19.99");
        assert!(Money::parse("1.001").is_err());
        assert!(Money::parse("-1").is_err());
        assert!(Money::parse("abc").is_err());
        let large = Money::parse("99999999.99").unwrap();
        assert_eq!(large.times(1000).unwrap().to_string(), "99999999990.00");
        assert!(large.times(1_000_000).is_none());
    }

    #[test]
    fn the_largest_amount_is_thirteen_digits() {
        assert_eq!(MAX_TOTAL.to_string(), "9999999999999.99");
    }
}
