//! Orders as callers read them: one by id, or a user's, newest first,
//! each with its items.

use std::collections::HashMap;

use sea_orm::entity::prelude::*;
use sea_orm::{QueryOrder, QuerySelect};

use super::{Item, Order, Orders, item, order};
use crate::shop::Error;

impl Orders {
    /// The order `id` with its items; `NotFound` when there is none.
    pub async fn get(&self, id: i64) -> Result<Order, Error> {
        let storage = |err| Error::storage("reading an order", err);
        let row = order::Entity::find_by_id(id)
            .one(&self.db)
            .await
            .map_err(storage)?
            .ok_or_else(|| Error::NotFound(format!("order {id} not found")))?;
        let mut orders = self.with_items(vec![row]).await?;
        Ok(orders.remove(0))
    }

    /// A user's orders with ids below `before`, newest first.
    pub async fn list(
        &self,
        user_id: i64,
        before: Option<i64>,
        limit: u64,
    ) -> Result<Vec<Order>, Error> {
        let mut query = order::Entity::find()
            .filter(order::Column::UserId.eq(user_id))
            .order_by_desc(order::Column::Id);
        if let Some(before) = before {
            query = query.filter(order::Column::Id.lt(before));
        }
        let rows = query
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(|err| Error::storage("listing orders", err))?;
        self.with_items(rows).await
    }

    async fn with_items(&self, rows: Vec<order::Model>) -> Result<Vec<Order>, Error> {
        let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
        let mut items: HashMap<i64, Vec<Item>> = HashMap::new();
        if !ids.is_empty() {
            let found = item::Entity::find()
                .filter(item::Column::OrderId.is_in(ids))
                .order_by_asc(item::Column::Id)
                .all(&self.db)
                .await
                .map_err(|err| Error::storage("reading order items", err))?;
            for row in found {
                items.entry(row.order_id).or_default().push(Item {
                    id: row.id,
                    product_id: row.product_id,
                    product_name: row.product_name,
                    price: row.price,
                    count: row.count,
                });
            }
        }
        Ok(rows
            .into_iter()
            .map(|row| Order {
                items: items.remove(&row.id).unwrap_or_default(),
                id: row.id,
                user_id: row.user_id,
                user_name: row.user_name,
                phone: row.phone,
                address: row.address,
                total_price: row.total_price,
                request_id: row.request_id,
                created_at: row.created_at,
            })
            .collect())
    }
}
