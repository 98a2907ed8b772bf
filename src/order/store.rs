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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    pub user_name: String,
    pub phone: String,
    pub address: String,
    pub total_price: Money,
    pub request_id: String,
    pub created_at: DateTime<Utc>,
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: i64,
    pub product_id: i64,
    pub product_name: String,
    pub price: Money,
    pub count: i32,
}

/// A handle on the order database; clones share its pool.
#[derive(Clone)]
pub struct Orders {
    db: DatabaseConnection,
}

impl Orders {
    pub fn new(db: DatabaseConnection) -> Self {
        Orders { db }
    }
}
