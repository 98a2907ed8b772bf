//! 64-bit ids, time-ordered and unique across instances: snowflake-style,
//! 41 bits of milliseconds since 2026-01-01, 10 bits of worker id and 12
//! bits of sequence.
//!
//! The worker id is what keeps two instances apart, so it is leased from
//! the database the ids are stored in (`t_id_worker`): an instance claims a
//! free or expired worker id, renews it at a third of the lease, and stops
//! issuing ids before the lease could have run out. Two live instances can
//! therefore never hold the same worker id, as long as their clocks differ
//! by less than a quarter of the lease.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue::Set, DatabaseConnection, QueryFilter};
use sea_orm_migration::prelude::{ColumnDef, Table};
use sea_orm_migration::{MigrationName, MigrationTrait, SchemaManager};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Error;
use super::keys::Key;

/// Milliseconds from the Unix epoch to 2026-01-01T00:00:00Z, the ids' zero.
const EPOCH_MS: i64 = 1_767_225_600_000;
const WORKER_BITS: u32 = 10;
const SEQUENCE_BITS: u32 = 12;
/// Instances that can mint ids at once: each holds one worker id
/// (leased in `t_id_worker`), and the id has room for this many.
pub const MAX_WORKERS: i64 = 1 << WORKER_BITS;
const MAX_SEQUENCE: i64 = (1 << SEQUENCE_BITS) - 1;

/// The lease table.
pub mod lease {
    use sea_orm::entity::prelude::*;

    /// One worker id's lease: who may mint ids with it, and until when.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "t_id_worker")]
    pub struct Model {
        /// The worker id, 0 to `MAX_WORKERS - 1`, that goes into every id
        /// its holder mints.
        #[sea_orm(primary_key, auto_increment = false)]
        pub worker_id: i32,
        /// Which instance holds it: a random token per process.
        pub holder: String,
        /// Unix milliseconds after which another instance may take it.
        pub expires_at: i64,
    }

    /// Empty: the lease table refers to no other.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The holder column, compared for identity when a lease is renewed,
/// taken or released: one of the keys made exact by the migrations of a
/// service that makes ids.
pub const HOLDER_KEY: Key = Key {
    table: "t_id_worker",
    column: "holder",
    chars: 64,
};

/// Creates `t_id_worker`; part of the migrations of a service that makes
/// ids.
pub struct CreateLeaseTable;

impl MigrationName for CreateLeaseTable {
    fn name(&self) -> &str {
        "m20261124_000100_id_worker"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateLeaseTable {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(lease::Entity)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(lease::Column::WorkerId)
                            .integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(lease::Column::Holder)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(lease::Column::ExpiresAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }
}

/// Makes ids on a leased worker id; cheap to clone.
#[derive(Clone)]
pub struct IdGenerator {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    holder: String,
    lease: Duration,
    /// Cancelled by [`IdGenerator::release`]: no renewal or claim after it,
    /// so a renewal racing the release cannot take a worker id back.
    released: CancellationToken,
    state: Mutex<State>,
}

struct State {
    /// None while no lease is held.
    worker: Option<i64>,
    /// Ids stop here: a quarter of the lease before it could expire.
    valid_until: Instant,
    last_ms: i64,
    sequence: i64,
}

impl IdGenerator {
    /// Claims a worker id and keeps it renewed until [`IdGenerator::release`].
    /// Renewal goes on through a shutdown: calls still open while the
    /// server drains need ids, so the owner releases only once they ended.
    pub async fn start(db: DatabaseConnection, lease: Duration) -> Result<Self, Error> {
        let generator = Self::claim(db, lease).await?;
        tokio::spawn({
            let generator = generator.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = generator.inner.released.cancelled() => break,
                        _ = tokio::time::sleep(generator.inner.lease / 3) => {}
                    }
                    if let Err(err) = generator.renew().await {
                        tracing::warn!(%err, "cannot renew the id worker lease");
                    }
                }
            }
        });
        Ok(generator)
    }

    /// Claims a worker id, without a renewal task (tests renew by hand).
    pub async fn claim(db: DatabaseConnection, lease: Duration) -> Result<Self, Error> {
        let holder = format!("{:016x}-{}", rand::random::<u64>(), std::process::id());
        let generator = IdGenerator {
            inner: Arc::new(Inner {
                db,
                holder,
                lease,
                released: CancellationToken::new(),
                state: Mutex::new(State {
                    worker: None,
                    valid_until: Instant::now(),
                    last_ms: 0,
                    sequence: 0,
                }),
            }),
        };
        generator.renew().await?;
        Ok(generator)
    }

    /// The worker id held now.
    pub fn worker(&self) -> Option<i64> {
        self.inner.state.lock().worker
    }

    /// The next id: larger than every id this generator made before.
    pub fn next(&self) -> Result<i64, Error> {
        let mut state = self.inner.state.lock();
        let worker = match state.worker {
            Some(worker) if Instant::now() < state.valid_until => worker,
            _ => {
                return Err(Error::Unavailable(
                    "this order instance holds no id worker lease (its database is unreachable); retry"
                        .into(),
                ));
            }
        };
        // A clock that steps back, or 4096 ids in one millisecond, borrow
        // from the next millisecond instead of waiting.
        let now = (unix_ms() - EPOCH_MS).max(state.last_ms);
        if now == state.last_ms {
            state.sequence += 1;
            if state.sequence > MAX_SEQUENCE {
                state.last_ms += 1;
                state.sequence = 0;
            }
        } else {
            state.last_ms = now;
            state.sequence = 0;
        }
        Ok(state.last_ms << (WORKER_BITS + SEQUENCE_BITS)
            | worker << SEQUENCE_BITS
            | state.sequence)
    }

    /// Extends the lease held, or claims one when none is held or it was
    /// lost.
    pub async fn renew(&self) -> Result<(), Error> {
        let started = Instant::now();
        let inner = &self.inner;
        let expires_at = unix_ms() + inner.lease.as_millis() as i64;
        let held = self.worker();
        let worker = match held {
            Some(worker) => {
                let renewed = lease::Entity::update_many()
                    .col_expr(lease::Column::ExpiresAt, Expr::value(expires_at))
                    .filter(lease::Column::WorkerId.eq(worker as i32))
                    .filter(lease::Column::Holder.eq(inner.holder.as_str()))
                    .exec(&inner.db)
                    .await
                    .map_err(|err| Error::storage("renewing the id worker lease", err))?;
                if renewed.rows_affected == 1 {
                    Some(worker)
                } else {
                    tracing::warn!(worker, "the id worker lease was lost; claiming another");
                    self.inner.state.lock().worker = None;
                    None
                }
            }
            None => None,
        };
        let worker = match worker {
            Some(worker) => worker,
            None if inner.released.is_cancelled() => return Ok(()),
            None => self.take_free(expires_at).await?,
        };
        let mut state = inner.state.lock();
        if inner.released.is_cancelled() {
            // Released while this renewal was under way; the row is gone
            // or expires on its own.
            return Ok(());
        }
        state.worker = Some(worker);
        state.valid_until = started + inner.lease - inner.lease / 4;
        Ok(())
    }

    /// Claims the lowest unused worker id, else an expired one.
    async fn take_free(&self, expires_at: i64) -> Result<i64, Error> {
        let inner = &self.inner;
        let claiming = |err| Error::storage("claiming an id worker lease", err);
        let rows = lease::Entity::find()
            .all(&inner.db)
            .await
            .map_err(claiming)?;
        let used: HashSet<i32> = rows.iter().map(|row| row.worker_id).collect();
        for worker in (0..MAX_WORKERS as i32).filter(|id| !used.contains(id)) {
            let inserted = lease::Entity::insert(lease::ActiveModel {
                worker_id: Set(worker),
                holder: Set(inner.holder.clone()),
                expires_at: Set(expires_at),
            })
            .exec_without_returning(&inner.db)
            .await;
            match inserted {
                Ok(_) => return Ok(worker.into()),
                // Another instance took it first.
                Err(err) if super::db::is_unique_violation(&err) => {}
                Err(err) => return Err(claiming(err)),
            }
        }
        let now = unix_ms();
        for row in rows.iter().filter(|row| row.expires_at <= now) {
            let taken = lease::Entity::update_many()
                .col_expr(lease::Column::Holder, Expr::value(inner.holder.clone()))
                .col_expr(lease::Column::ExpiresAt, Expr::value(expires_at))
                .filter(lease::Column::WorkerId.eq(row.worker_id))
                .filter(lease::Column::Holder.eq(row.holder.as_str()))
                .filter(lease::Column::ExpiresAt.eq(row.expires_at))
                .exec(&inner.db)
                .await
                .map_err(claiming)?;
            if taken.rows_affected == 1 {
                return Ok(row.worker_id.into());
            }
        }
        Err(Error::ResourceExhausted(format!(
            "all {MAX_WORKERS} id worker leases are held by live instances"
        )))
    }

    /// Gives the worker id back at once and stops renewing it: the last
    /// step of a shutdown, after the last call that could need an id.
    pub async fn release(&self) {
        let worker = {
            let mut state = self.inner.state.lock();
            self.inner.released.cancel();
            state.worker.take()
        };
        let Some(worker) = worker else {
            return;
        };
        let released = lease::Entity::delete_many()
            .filter(lease::Column::WorkerId.eq(worker as i32))
            .filter(lease::Column::Holder.eq(self.inner.holder.as_str()))
            .exec(&self.inner.db)
            .await;
        if let Err(err) = released {
            tracing::warn!(%err, worker, "cannot release the id worker lease; it expires on its own");
        }
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_millis() as i64)
        .unwrap_or(0)
}

/// The worker id inside an id.
pub fn worker_of(id: i64) -> i64 {
    (id >> SEQUENCE_BITS) & (MAX_WORKERS - 1)
}
