//! An order request's way through `t_order_request`: claimed `pending`,
//! then `done` with its order, or `compensating` and then `failed`, from
//! which a retry claims it again as the next attempt.
//!
//! This is what makes placing an order safe to retry and to crash in: an
//! order and its item are written only in the transaction that moves the
//! request from `pending` to `done`, and a deduction is restored only
//! after the request moved from `pending` to `compensating`. The two moves
//! exclude each other, so a deduction is never both kept by an order and
//! restored.

use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue::Set, QuerySelect};

use super::request::State;
use super::{Order, Orders, item, order, request};
use crate::shop::Error;
use crate::shop::db::{begin_write, is_unique_violation};
use crate::telemetry::trace;
use tracing::Instrument;

/// What an order request asks for; a retry must ask for the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    /// The buyer.
    pub user_id: i64,
    /// The product to buy.
    pub product_id: i64,
    /// Units to buy; the gRPC face takes 1 up to the configured maximum.
    pub count: i32,
}

/// What claiming a request id found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This call places it, as this attempt.
    Placing {
        /// The attempt now pending; its deduction key carries it.
        attempt: i32,
    },
    /// It placed this order already.
    Done {
        /// The order it placed; a retry gets this order back.
        order_id: i64,
    },
    /// Another call is placing it, or undoing it, now.
    InProgress,
    /// The request id asked for something else.
    Mismatch(Asked),
}

/// A request whose deduction may need restoring: found by the sweeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsettled {
    /// The request to settle.
    pub request_id: String,
    /// The attempt whose deduction key is to be restored.
    pub attempt: i32,
}

impl Orders {
    /// Takes `request_id` for this call: new, or a retry after a failed
    /// attempt.
    pub async fn claim(&self, request_id: &str, asked: Asked) -> Result<Claim, Error> {
        self.claim_request(request_id, asked)
            .instrument(trace::transaction_span("orders.claim"))
            .await
    }

    async fn claim_request(&self, request_id: &str, asked: Asked) -> Result<Claim, Error> {
        let storage = |err| Error::storage("recording the order request", err);
        let inserted = request::Entity::insert(request::ActiveModel {
            request_id: Set(request_id.to_owned()),
            attempt: Set(0),
            state: Set(State::Pending),
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
        match found.state {
            State::Done => Ok(found
                .order_id
                .map(|order_id| Claim::Done { order_id })
                .unwrap_or(Claim::InProgress)),
            State::Failed => {
                let next = found.attempt + 1;
                let moved = self
                    .shift(
                        request_id,
                        found.attempt,
                        State::Failed,
                        State::Pending,
                        next,
                    )
                    .await?;
                Ok(if moved {
                    Claim::Placing { attempt: next }
                } else {
                    Claim::InProgress
                })
            }
            State::Pending | State::Compensating => Ok(Claim::InProgress),
        }
    }

    /// Moves `request_id` from (`attempt`, `from`) to (`to_attempt`, `to`);
    /// false when it was not there.
    async fn shift(
        &self,
        request_id: &str,
        attempt: i32,
        from: State,
        to: State,
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
            State::Pending,
            State::Pending,
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
            .filter(request::Column::State.eq(State::Pending))
            .exec(&self.db)
            .await
            .map_err(|err| Error::storage("dropping a refused order request", err))?;
        Ok(())
    }

    /// Writes the order and its items, and marks the request done, in one
    /// transaction; Ok(false) when the request is no longer this call's
    /// (the sweeper took it for dead), and nothing is written.
    pub async fn place(&self, attempt: i32, order: &Order) -> Result<bool, DbErr> {
        self.write_order(attempt, order)
            .instrument(trace::transaction_span("orders.place"))
            .await
    }

    async fn write_order(&self, attempt: i32, order: &Order) -> Result<bool, DbErr> {
        let txn = begin_write(&self.db).await?;
        let done = request::Entity::update_many()
            .col_expr(request::Column::State, Expr::value(State::Done))
            .col_expr(request::Column::OrderId, Expr::value(order.id))
            .col_expr(
                request::Column::UpdatedAt,
                Expr::value(crate::shop::db::now()),
            )
            .filter(request::Column::RequestId.eq(order.request_id.as_str()))
            .filter(request::Column::Attempt.eq(attempt))
            .filter(request::Column::State.eq(State::Pending))
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
                State::Pending,
                State::Compensating,
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
            if found.attempt == attempt && found.state == State::Compensating))
    }

    /// The deduction is restored: the request failed, and a retry may
    /// start the next attempt.
    pub async fn finish_compensation(&self, request_id: &str, attempt: i32) -> Result<(), Error> {
        self.shift(
            request_id,
            attempt,
            State::Compensating,
            State::Failed,
            attempt,
        )
        .await
        .map(drop)
    }

    /// How many requests are neither placed nor undone: being placed, or
    /// having their deduction restored.
    pub async fn count_unsettled(&self) -> Result<u64, Error> {
        request::Entity::find()
            .filter(request::Column::State.is_in([State::Pending, State::Compensating]))
            .count(&self.db)
            .await
            .map_err(|err| Error::storage("counting unsettled orders", err))
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
                    .add(request::Column::State.eq(State::Compensating))
                    .add(
                        Condition::all()
                            .add(request::Column::State.eq(State::Pending))
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
}
