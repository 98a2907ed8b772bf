//! Stock taken and given back, each once per request id: the deduction's
//! record and the stock's conditional update commit together.

use sea_orm::entity::prelude::*;
use sea_orm::sea_query::ExprTrait;
use sea_orm::{ActiveValue::Set, DatabaseTransaction};

use super::{Deducted, Products, Restored, deduction, not_found, product};
use crate::shop::Error;
use crate::shop::db::{begin_write, is_unique_violation};
use crate::telemetry::trace;
use tracing::Instrument;

impl Products {
    /// Takes `count` of `product_id` for `request_id`, once: the record of
    /// the request and one conditional update of the stock commit
    /// together, and the update only matches while enough is left.
    pub async fn deduct(
        &self,
        request_id: &str,
        product_id: i64,
        count: i32,
    ) -> Result<Deducted, Error> {
        self.deduct_once(request_id, product_id, count)
            .instrument(trace::transaction_span("products.deduct"))
            .await
    }

    async fn deduct_once(
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
        self.restore_once(request_id)
            .instrument(trace::transaction_span("products.restore"))
            .await
    }

    async fn restore_once(&self, request_id: &str) -> Result<Restored, Error> {
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
