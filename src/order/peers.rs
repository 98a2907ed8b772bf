//! What placing an order needs from the user and product services, in the
//! order service's own terms: the placer is written against these traits,
//! so it runs the same against the gRPC clients (`remote`) and against
//! in-memory fakes in its tests.
//!
//! Errors are the shop's [`Error`]: a dependency's refusal arrives as
//! `NotFound` or `FailedPrecondition` with its words, anything else as
//! `Aborted` or `Unavailable`.

use std::future::Future;

use crate::shop::{Error, Money};

/// A user, as an order records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user service's id for them.
    pub id: i64,
    /// Copied into the order as the buyer's name.
    pub name: String,
    /// Copied into the order as the contact number.
    pub phone: String,
    /// Copied into the order as where it is delivered.
    pub address: String,
}

/// A product, as an order prices it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// The product service's id for it.
    pub id: i64,
    /// Copied into the order item.
    pub name: String,
    /// Unit price; an order item is charged this times its count.
    pub price: Money,
    /// Units left when the service answered. Checked before deducting to
    /// refuse early; the deduction itself is what decides.
    pub stock: i32,
}

/// How a stock deduction ended, when the product service answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deduction {
    /// The stock is taken, by this call or an earlier one under the same
    /// key; the product as it is after.
    Taken(Product),
    /// The key was closed by an earlier restore: nothing taken, and
    /// nothing ever will be under this key.
    Cancelled,
}

/// The user service, as the placer uses it.
pub trait Users: Send + Sync {
    /// The user `id`; `NotFound` when there is none.
    fn user(&self, id: i64) -> impl Future<Output = Result<User, Error>> + Send;
}

/// The product service, as the placer uses it. Every call is safe to send
/// twice: a deduction and its restore are keyed, so a repeat does nothing
/// more.
pub trait Products: Send + Sync {
    /// The product `id`; `NotFound` when there is none.
    fn product(&self, id: i64) -> impl Future<Output = Result<Product, Error>> + Send;

    /// Takes `count` of `product_id` from the stock under `key`, once
    /// however often it is asked. `NotFound` or `FailedPrecondition`: the
    /// service refused and took nothing. Any other error: the answer was
    /// lost, so the stock may or may not have been taken.
    fn deduct(
        &self,
        product_id: i64,
        count: i32,
        key: &str,
    ) -> impl Future<Output = Result<Deduction, Error>> + Send;

    /// Puts back what the deduction under `key` took, once; a key that
    /// took nothing yet is closed, so a late deduction under it is
    /// [`Deduction::Cancelled`].
    fn restore(&self, key: &str) -> impl Future<Output = Result<(), Error>> + Send;
}
