//! The product service's store: products as callers read them, and stock
//! taken and given back once per request id.
//!
//! Its parts: `schema` (the tables and their migrations) and `stock`
//! (DeductStock and RestoreStock, the only writes besides the seed rows).

mod schema;
mod stock;

use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue::Set, DatabaseConnection, QueryOrder, QuerySelect};

use crate::shop::db::is_unique_violation;
use crate::shop::{Error, Money};
pub use schema::{MAX_REQUEST_ID, Migrator, deduction, product};

/// A product as the service answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// The id callers ask for.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// Unit price an order is charged.
    pub price: Money,
    /// Units left to sell.
    pub stock: i32,
}

impl From<product::Model> for Product {
    fn from(row: product::Model) -> Self {
        Product {
            id: row.id,
            name: row.name,
            price: row.price,
            stock: row.stock,
        }
    }
}

/// What a DeductStock did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deducted {
    /// Taken (now or before, for this request id); the product after it.
    Taken(Product),
    /// The request id was restored or closed; nothing taken.
    Cancelled,
}

/// What a RestoreStock did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Product the deduction had taken from; 0 when it took nothing.
    pub product_id: i64,
    /// Units the deduction had taken; 0 when it took nothing.
    pub count: i32,
    /// An earlier call had restored or closed it already.
    pub already: bool,
}

/// The product service's storage: reads, stock deductions and restores,
/// each keyed by request id so a retry does its work once.
#[derive(Clone)]
pub struct Products {
    db: DatabaseConnection,
}

impl Products {
    /// Over a database already migrated by [`Migrator`].
    pub fn new(db: DatabaseConnection) -> Self {
        Products { db }
    }

    /// The product `id`; NOT_FOUND when there is none.
    pub async fn get(&self, id: i64) -> Result<Product, Error> {
        self.find(id).await?.ok_or_else(|| not_found(id))
    }

    async fn find(&self, id: i64) -> Result<Option<Product>, Error> {
        Ok(product::Entity::find_by_id(id)
            .one(&self.db)
            .await
            .map_err(|err| Error::storage("reading a product", err))?
            .map(Product::from))
    }

    /// Up to `limit` products with ids above `after`, in id order.
    pub async fn list(&self, after: Option<i64>, limit: u64) -> Result<Vec<Product>, Error> {
        let mut query = product::Entity::find().order_by_asc(product::Column::Id);
        if let Some(after) = after {
            query = query.filter(product::Column::Id.gt(after));
        }
        Ok(query
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(|err| Error::storage("listing products", err))?
            .into_iter()
            .map(Product::from)
            .collect())
    }

    /// The seed's products, when the table is empty.
    pub async fn seed(&self) -> Result<(), DbErr> {
        if product::Entity::find().count(&self.db).await? > 0 {
            return Ok(());
        }
        for (id, name, price) in [
            (1001, "华为", "2399.00"),
            (1002, "小米", "1999.00"),
            (1003, "iphone", "4999.00"),
        ] {
            let row = product::ActiveModel {
                id: Set(id),
                name: Set(name.into()),
                price: Set(Money::parse(price).expect("a seed price is an amount")),
                stock: Set(100),
            };
            // Another instance seeding at the same moment wins; fine.
            match product::Entity::insert(row)
                .exec_without_returning(&self.db)
                .await
            {
                Ok(_) => {}
                Err(err) if is_unique_violation(&err) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

fn not_found(id: i64) -> Error {
    Error::NotFound(format!("product {id} not found"))
}
