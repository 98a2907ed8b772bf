//! What must hold after any run, checked against the databases themselves.

use std::collections::HashMap;
use std::time::Duration;

use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};

use crate::order::store::{item, order, request};
use crate::product::store::{deduction, product};

/// Waits (up to `settle`) for every order request to end, then checks:
/// for every product, initial stock − stock = the items of existing
/// orders = what its live deductions took; no stock below zero; every
/// order has its item and every item its order; no request id has two
/// orders. Answers every invariant that does not hold.
pub async fn check(
    products: &DatabaseConnection,
    orders: &DatabaseConnection,
    initial: &HashMap<i64, i32>,
    settle: Duration,
) -> anyhow::Result<Vec<String>> {
    let give_up = tokio::time::Instant::now() + settle;
    let unsettled = loop {
        let open = request::Entity::find()
            .filter(
                request::Column::State
                    .is_in([request::State::Pending, request::State::Compensating]),
            )
            .all(orders)
            .await?
            .len();
        if open == 0 || tokio::time::Instant::now() > give_up {
            break open;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stored = order::Entity::find().all(orders).await?;
    let items = item::Entity::find().all(orders).await?;
    let mut violations = Vec::new();
    if unsettled > 0 {
        violations.push(format!("{unsettled} order requests never settled"));
    }

    let order_ids: HashMap<i64, &order::Model> = stored.iter().map(|o| (o.id, o)).collect();
    let mut items_per_order: HashMap<i64, usize> = HashMap::new();
    let mut sold: HashMap<i64, i64> = HashMap::new();
    for line in &items {
        if !order_ids.contains_key(&line.order_id) {
            violations.push(format!("item {} has no order {}", line.id, line.order_id));
        }
        *items_per_order.entry(line.order_id).or_default() += 1;
        *sold.entry(line.product_id).or_default() += i64::from(line.count);
    }
    for o in &stored {
        if items_per_order.get(&o.id).copied().unwrap_or(0) == 0 {
            violations.push(format!("order {} has no item", o.id));
        }
    }
    let mut per_request: HashMap<&str, usize> = HashMap::new();
    for o in &stored {
        *per_request.entry(o.request_id.as_str()).or_default() += 1;
    }
    for (request_id, count) in per_request.iter().filter(|(_, count)| **count > 1) {
        violations.push(format!("request {request_id} has {count} orders"));
    }

    let mut taken: HashMap<i64, i64> = HashMap::new();
    for d in deduction::Entity::find()
        .filter(deduction::Column::State.eq(deduction::State::Deducted))
        .all(products)
        .await?
    {
        *taken.entry(d.product_id).or_default() += i64::from(d.count);
    }
    for p in product::Entity::find().all(products).await? {
        let Some(start) = initial.get(&p.id) else {
            continue;
        };
        let lost = i64::from(*start) - i64::from(p.stock);
        let sold = sold.get(&p.id).copied().unwrap_or(0);
        let taken = taken.get(&p.id).copied().unwrap_or(0);
        if p.stock < 0 {
            violations.push(format!("product {} has stock {}", p.id, p.stock));
        }
        if lost != sold {
            violations.push(format!(
                "product {}: the stock went down by {lost}, the orders hold {sold}",
                p.id
            ));
        }
        if taken != sold {
            violations.push(format!(
                "product {}: live deductions took {taken}, the orders hold {sold}",
                p.id
            ));
        }
    }
    Ok(violations)
}
