//! Opening a shop service's database: a URL (SQLite, MySQL, PostgreSQL) or
//! by default a SQLite file under the data dir; migrations at start.

use std::str::FromStr;
use std::time::Duration;

use backon::Retryable;
use sea_orm::sqlx::mysql::MySqlConnectOptions;
use sea_orm::sqlx::postgres::PgConnectOptions;
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbErr,
    RuntimeErr, SqlErr, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

use super::{Error, ServiceConfig};

/// How long connecting to a database server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a SQLite writer waits for another to finish before it gives up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The URL a service stores in: the configured one, or
/// `sqlite://<data_dir>/<file>.db?mode=rwc`.
pub fn url(config: &ServiceConfig, file: &str) -> String {
    match &config.database_url {
        Some(url) => url.clone(),
        None => format!(
            "sqlite://{}?mode=rwc",
            config.data_dir.join(format!("{file}.db")).display()
        ),
    }
}

/// `url` with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Connects to the service's database and brings its schema up to date
/// with `M`. A SQLite file's directory is made if missing; SQLite runs in
/// WAL mode with full fsync, so a committed order survives a crash.
pub async fn open<M: MigratorTrait>(
    config: &ServiceConfig,
    file: &str,
) -> anyhow::Result<DatabaseConnection> {
    let url = url(config, file);
    if config.database_url.is_none() {
        std::fs::create_dir_all(&config.data_dir).map_err(|err| {
            anyhow::anyhow!(
                "cannot create the data dir {}: {err}",
                config.data_dir.display()
            )
        })?;
    }
    // Instances sharing a new SQLite file that start together race to
    // turn it to WAL, which SQLite answers "database is locked" without
    // waiting: the loser tries again, as the migrations' loser does.
    let pauses = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_millis(500))
        .with_jitter()
        .with_max_times(10);
    let db = (|| connect(&url, config.max_connections))
        .retry(pauses)
        .sleep(tokio::time::sleep)
        .when(|err| err.to_string().contains("database is locked"))
        .await
        .map_err(|err| anyhow::anyhow!("cannot open the database {}: {err}", redact(&url)))?;
    migrate::<M>(&db)
        .await
        .map_err(|err| anyhow::anyhow!("cannot migrate the database {}: {err}", redact(&url)))?;
    Ok(db)
}

/// A pool on `url`, nothing more.
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    probe(url).await?;
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(max_connections.max(1))
        .min_connections(1)
        .connect_timeout(CONNECT_TIMEOUT)
        .acquire_timeout(CONNECT_TIMEOUT)
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(|options| {
            options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true)
        });
    Database::connect(options).await
}

/// One connection to a database server, outside any pool: a pool retries
/// a refused connection until its timeout and then says only "pool timed
/// out", so the cause (refused, unknown host, bad password, no such
/// database) is found here and said at once.
async fn probe(url: &str) -> Result<(), DbErr> {
    use sea_orm::sqlx::{ConnectOptions as _, Connection as _};
    let attempt = async {
        if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            MySqlConnectOptions::from_str(url)?
                .connect()
                .await?
                .close()
                .await
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            PgConnectOptions::from_str(url)?
                .connect()
                .await?
                .close()
                .await
        } else {
            Ok(())
        }
    };
    let cause = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(err)) => err.to_string(),
        Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
    };
    Err(DbErr::Conn(RuntimeErr::Internal(format!(
        "{cause}; check that the database server is running and reachable at the URL's host and port, and that its user, password and database are right"
    ))))
}

/// Runs `M`'s pending migrations. Instances of one service sharing a
/// database may start together; the loser of that race finds the work
/// done on its next try.
pub async fn migrate<M: MigratorTrait>(db: &DatabaseConnection) -> Result<(), DbErr> {
    // Another instance's migrations may take a while (a table rebuilt, a
    // column's collation changed on a server database): wait for them
    // with pauses that grow, rather than give up after a few quick tries.
    let pauses = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_jitter()
        .with_max_times(10);
    (|| M::up(db, None))
        .retry(pauses)
        .sleep(tokio::time::sleep)
        .notify(|err, _| {
            tracing::debug!(error = %err, "migration raced another instance; trying again")
        })
        .await
}

/// Creates the database `name` on the server `server` points at (a URL
/// whose user may create databases); answers the new database's URL.
pub async fn create_database(server: &str, name: &str) -> Result<String, DbErr> {
    let Some((base, _)) = server.rsplit_once('/') else {
        return Err(DbErr::Custom(format!(
            "{} names no database",
            redact(server)
        )));
    };
    let admin = connect(server, 1).await?;
    let created = admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await;
    admin.close().await?;
    created.map(|_| format!("{base}/{name}"))
}

/// Drops the database `name` on the server `server` points at, closing
/// any connection still open to it (PostgreSQL refuses otherwise).
pub async fn drop_database(server: &str, name: &str) -> Result<(), DbErr> {
    let admin = connect(server, 1).await?;
    let force = if server.starts_with("postgres") {
        " WITH (FORCE)"
    } else {
        ""
    };
    let dropped = admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name}{force}"))
        .await;
    admin.close().await?;
    dropped.map(drop)
}

/// A transaction that will write: on SQLite it takes the write lock at
/// BEGIN (IMMEDIATE), so it waits for another writer instead of failing
/// when it first writes after reading.
pub async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..Default::default()
    })
    .await
}

/// A timestamp column: DATETIME(6) on MySQL (its TIMESTAMP keeps whole
/// seconds and ends in 2038), TIMESTAMP WITH TIME ZONE elsewhere. Values
/// are written in UTC at microseconds ([`now`]), so what is read back
/// equals what was written on every backend.
pub fn timestamp_column(
    backend: sea_orm::DbBackend,
    column: impl sea_orm_migration::prelude::IntoIden,
) -> sea_orm_migration::prelude::ColumnDef {
    let mut def = sea_orm_migration::prelude::ColumnDef::new(column);
    match backend {
        sea_orm::DbBackend::MySql => {
            def.custom(sea_orm_migration::prelude::Alias::new("DATETIME(6)"))
        }
        _ => def.timestamp_with_time_zone(),
    };
    def.not_null().to_owned()
}

/// The time now, at the microseconds every backend keeps.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    let now = chrono::Utc::now();
    chrono::DurationRound::duration_trunc(now, chrono::TimeDelta::microseconds(1)).unwrap_or(now)
}

/// Whether `err` is a unique-key clash: how an insert learns that another
/// instance (or an earlier call) got there first, on every backend alike.
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

impl Error {
    /// A storage failure: logged with its cause, answered as UNAVAILABLE
    /// with what could not be done.
    pub fn storage(doing: &str, err: sea_orm::DbErr) -> Self {
        tracing::warn!(error = %err, "database error while {doing}");
        Error::Unavailable(format!(
            "the database is unavailable ({doing}); retry later"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_log() {
        assert_eq!(
            redact("mysql://root:secret@db:3306/shop"),
            "mysql://root:***@db:3306/shop"
        );
        assert_eq!(redact("postgres://app@db/shop"), "postgres://app@db/shop");
        assert_eq!(redact("sqlite://a.db?mode=rwc"), "sqlite://a.db?mode=rwc");
    }
}
