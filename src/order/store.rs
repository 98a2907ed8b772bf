//! The order service's store: `t_order` and `t_order_item` with the
//! seed's columns, `t_order_request` (one row per request id: which
//! attempt is under way and how it ended), and the id worker leases.
//!
//! Its parts: `schema` (the tables and their migrations), `requests`
//! (an order request's way from claimed to done or failed, the only
//! writes), and `reads` (orders as callers see them).

mod reads;
mod requests;
mod schema;

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;

use crate::shop::Money;
pub use requests::{Asked, Claim, Unsettled};
pub use schema::{MAX_REQUEST_ID, Migrator, item, order, request};

/// A placed order with its items, as it is stored and read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// From the id generator, not the database.
    pub id: i64,
    /// The buyer.
    pub user_id: i64,
    /// The buyer's name when the order was placed; later changes to the
    /// user do not reach it.
    pub user_name: String,
    /// The buyer's phone when the order was placed.
    pub phone: String,
    /// The delivery address when the order was placed.
    pub address: String,
    /// What the order was charged: its item's unit price times its count.
    pub total_price: Money,
    /// The request id that placed it; at most one order per request id.
    pub request_id: String,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// Its lines, in id order.
    pub items: Vec<Item>,
}

/// One line of an order: a product, its price then, and how many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// From the id generator, not the database.
    pub id: i64,
    /// The product bought.
    pub product_id: i64,
    /// The product's name when the order was placed.
    pub product_name: String,
    /// Unit price charged, as the deduction reported it.
    pub price: Money,
    /// Units bought.
    pub count: i32,
}

/// A handle on the order database; clones share its pool.
#[derive(Clone)]
pub struct Orders {
    db: DatabaseConnection,
}

impl Orders {
    /// A handle on `db`, which must hold the order schema ([`Migrator`]).
    pub fn new(db: DatabaseConnection) -> Self {
        Orders { db }
    }
}
