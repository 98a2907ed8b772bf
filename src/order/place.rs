//! Placing an order, the seed's flow done right: the user and the product
//! (from the services of [`super::peers`]), the stock check, the deduction (one conditional
//! update on the product side, keyed by the request), then the order and
//! its item in one local transaction; if that cannot be written, the
//! deduction is restored. Every step is safe to repeat under the same
//! request id.
//!
//! Nothing here knows gRPC: the services come in as traits, so the flow is
//! tested against in-memory fakes (`place/tests.rs`).

use std::time::Duration;

use chrono::Utc;

use super::peers::{Deduction, Products, User, Users};
use super::store::{Asked, Claim, Item, Order, Orders};
use crate::shop::Error;
use crate::shop::ids::IdGenerator;
use crate::shop::metrics::OrderMetrics;

/// Attempts one call may move through when the product service answers
/// that an attempt's key was closed by an earlier compensation.
const MAX_ATTEMPT_STEPS: usize = 8;

/// A PlaceOrder request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceOrder {
    /// Who orders what and how many; a retry must ask the same.
    pub asked: Asked,
    /// None: the server makes one.
    pub request_id: Option<String>,
}

/// Places orders: the order store, the ids, and the user and product
/// services (`U`, `P`) it calls.
#[derive(Clone)]
pub struct Placer<U, P> {
    /// Where requests are claimed and orders written.
    pub orders: Orders,
    /// Ids for orders and their items, and request ids for requests sent
    /// without one.
    pub ids: IdGenerator,
    /// Where the buyer's name, phone and address come from.
    pub users: U,
    /// Where the price comes from and the stock is deducted.
    pub products: P,
    /// What it counts.
    pub metrics: OrderMetrics,
}

impl<U: Users, P: Products> Placer<U, P> {
    /// Places `request` once however often it is sent under its request
    /// id: the order it placed, or why it was refused.
    pub async fn place(&self, request: PlaceOrder) -> Result<Order, Error> {
        let request_id = match request.request_id {
            Some(request_id) => request_id,
            None => format!("auto-{}", self.ids.next()?),
        };
        let asked = request.asked;
        let attempt = match self.orders.claim(&request_id, asked).await? {
            Claim::Placing { attempt } => attempt,
            Claim::Done { order_id } => return self.orders.get(order_id).await,
            Claim::InProgress => return Err(in_progress(&request_id)),
            Claim::Mismatch(before) => {
                return Err(Error::FailedPrecondition(format!(
                    "request_id {request_id} was used for user {}, product {}, count {}; a different order needs a new request_id",
                    before.user_id, before.product_id, before.count
                )));
            }
        };
        match self.checked(asked).await {
            Ok(user) => {
                self.deduct_and_write(&request_id, attempt, asked, user)
                    .await
            }
            Err(refused) => {
                self.forget(&request_id, attempt).await;
                Err(refused)
            }
        }
    }

    /// The user and the product, and whether there is stock: the checks
    /// that refuse an order before anything is taken.
    async fn checked(&self, asked: Asked) -> Result<User, Error> {
        let user = self.users.user(asked.user_id).await?;
        let product = self.products.product(asked.product_id).await?;
        if product.stock < asked.count {
            return Err(Error::FailedPrecondition(format!(
                "product {} has {} in stock, {} requested",
                product.id, product.stock, asked.count
            )));
        }
        if product.price.times(asked.count as u32).is_none() {
            return Err(Error::invalid(
                "count",
                format!(
                    "{} × {} is more than an order can total",
                    asked.count, product.price
                ),
            ));
        }
        Ok(user)
    }

    async fn deduct_and_write(
        &self,
        request_id: &str,
        mut attempt: i32,
        asked: Asked,
        user: User,
    ) -> Result<Order, Error> {
        let mut steps = 0;
        let product = loop {
            let key = deduction_key(request_id, attempt);
            match self
                .products
                .deduct(asked.product_id, asked.count, &key)
                .await
            {
                Ok(Deduction::Taken(product)) => break product,
                Ok(Deduction::Cancelled) => {
                    steps += 1;
                    if steps > MAX_ATTEMPT_STEPS
                        || !self.orders.next_attempt(request_id, attempt).await?
                    {
                        return Err(in_progress(request_id));
                    }
                    attempt += 1;
                }
                Err(err) if refused(&err) => {
                    self.forget(request_id, attempt).await;
                    return Err(err);
                }
                Err(err) => {
                    // It may or may not have been taken: close the key.
                    self.compensate(request_id, attempt).await;
                    return Err(Error::Unavailable(format!(
                        "the stock deduction was not confirmed ({err}); nothing was bought, retry with the same request_id"
                    )));
                }
            }
        };
        let price = product.price;
        let order = match (self.ids.next(), self.ids.next()) {
            (Ok(order_id), Ok(item_id)) => Order {
                id: order_id,
                user_id: user.id,
                user_name: user.name,
                phone: user.phone,
                address: user.address,
                total_price: price
                    .times(asked.count as u32)
                    .ok_or_else(|| Error::invalid("count", "the total is too large"))?,
                request_id: request_id.to_owned(),
                created_at: crate::shop::db::now(),
                items: vec![Item {
                    id: item_id,
                    product_id: product.id,
                    product_name: product.name,
                    price,
                    count: asked.count,
                }],
            },
            (Err(err), _) | (_, Err(err)) => {
                self.compensate(request_id, attempt).await;
                return Err(err);
            }
        };
        match self.orders.place(attempt, &order).await {
            Ok(true) => {
                // Inside the call's span: with tracing on, the line
                // carries the order's trace id.
                tracing::debug!(
                    order_id = order.id,
                    user_id = order.user_id,
                    product_id = asked.product_id,
                    count = asked.count,
                    total = %order.total_price,
                    request_id,
                    "order placed"
                );
                Ok(order)
            }
            Ok(false) => Err(Error::Aborted(format!(
                "request_id {request_id} took too long and was undone; retry with the same request_id"
            ))),
            Err(err) => {
                tracing::warn!(error = %err, request_id, "cannot write an order; restoring its stock");
                let restored = self.compensate(request_id, attempt).await;
                Err(Error::Unavailable(format!(
                    "the order could not be stored (the order database refused the write); {}; retry with the same request_id",
                    if restored {
                        "its stock deduction was restored"
                    } else {
                        "its stock deduction will be restored"
                    }
                )))
            }
        }
    }

    /// Nothing was deducted: the refused request leaves no row behind
    /// (or, if the database is away now, the sweeper settles it later).
    async fn forget(&self, request_id: &str, attempt: i32) {
        if let Err(err) = self.orders.forget(request_id, attempt).await {
            tracing::warn!(%err, request_id, "cannot drop a refused request; the sweeper will");
        }
    }

    /// Restores this attempt's deduction unless its order was written.
    /// True when it is settled; when not (a service or the database is
    /// away), the request stays unsettled and the sweeper finishes it.
    pub async fn compensate(&self, request_id: &str, attempt: i32) -> bool {
        let settled = match self.settle(request_id, attempt).await {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(%err, request_id, attempt, "cannot restore a deduction yet; it is retried");
                false
            }
        };
        self.metrics.compensated(settled);
        settled
    }

    async fn settle(&self, request_id: &str, attempt: i32) -> Result<(), Error> {
        if !self.orders.begin_compensation(request_id, attempt).await? {
            return Ok(());
        }
        self.products
            .restore(&deduction_key(request_id, attempt))
            .await?;
        self.orders.finish_compensation(request_id, attempt).await
    }

    /// Settles requests whose callers died or gave up; runs every
    /// `interval` until `shutdown`.
    pub async fn sweep(
        self,
        interval: Duration,
        pending_timeout: Duration,
        shutdown: crate::shutdown::Shutdown,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let stale = Utc::now()
                - chrono::Duration::from_std(pending_timeout).unwrap_or(chrono::Duration::MAX);
            match self.orders.unsettled(stale, 100).await {
                Ok(found) => {
                    for request in found {
                        tracing::info!(
                            request_id = request.request_id,
                            "settling an abandoned order request"
                        );
                        self.compensate(&request.request_id, request.attempt).await;
                    }
                }
                Err(err) => tracing::warn!(%err, "cannot look for unsettled order requests"),
            }
            match self.orders.count_unsettled().await {
                Ok(count) => self.metrics.unsettled(count),
                Err(err) => tracing::debug!(%err, "cannot count unsettled order requests"),
            }
        }
    }
}

fn in_progress(request_id: &str) -> Error {
    Error::Aborted(format!(
        "request_id {request_id} is being placed by another call; retry shortly"
    ))
}

/// The key one attempt deducts under.
pub fn deduction_key(request_id: &str, attempt: i32) -> String {
    format!("{request_id}#{attempt}")
}

/// A refusal of the deduction: the product service took nothing, so
/// there is nothing to restore.
fn refused(err: &Error) -> bool {
    matches!(
        err,
        Error::InvalidArgument { .. } | Error::NotFound(_) | Error::FailedPrecondition(_)
    )
}

#[cfg(test)]
mod tests;
