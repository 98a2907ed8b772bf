//! The shop's client commands: `shop-mesh user get`, `product get|list`,
//! `order place|get|list`. Each finds its service through the registry,
//! like any caller; tables for people, `--json` (one object per line) for
//! scripts; a refused call prints its status and exits non-zero.

use std::io::Write;

use serde_json::json;

use crate::discovery::{Mesh, retry_safe};
use crate::inspect::{status, table};
use crate::pb::shop as pb;
use crate::pb::shop::order_service_client::OrderServiceClient;
use crate::pb::shop::product_service_client::ProductServiceClient;
use crate::pb::shop::user_service_client::UserServiceClient;
use crate::shop::{ORDER_SERVICE, PRODUCT_SERVICE, USER_SERVICE};

/// The flags every client command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// Registry addresses, tried in turn: a,b,c [config: discovery.registry].
    #[arg(long)]
    pub registry: Option<String>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `shop-mesh user get`: calls to the user service.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum UserCommand {
    /// Shows one user.
    Get {
        /// The user's id.
        id: i64,
        /// Where the registry is, and how to print.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `shop-mesh product get|list`: calls to the product service.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ProductCommand {
    /// Shows one product and its stock.
    Get {
        /// The product's id.
        id: i64,
        /// Where the registry is, and how to print.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lists every product.
    List {
        /// Where the registry is, and how to print.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `shop-mesh order place|get|list`: calls to the order service.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum OrderCommand {
    /// Places an order; safe to repeat with the same --request-id.
    Place {
        /// Id of the user who buys.
        #[arg(long)]
        user: i64,
        /// Id of the product bought.
        #[arg(long)]
        product: i64,
        /// Units to buy; no more than shop.max_order_count allows.
        #[arg(long)]
        count: i32,
        /// Names the order so a repeat never buys twice [default: a new one].
        #[arg(long)]
        request_id: Option<String>,
        /// Where the registry is, and how to print.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Shows one order.
    Get {
        /// The order's id.
        id: i64,
        /// Where the registry is, and how to print.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lists a user's orders, newest first.
    List {
        /// Id of the user whose orders to list.
        #[arg(long)]
        user: i64,
        /// Where the registry is, and how to print.
        #[command(flatten)]
        client: ClientArgs,
    },
}

impl UserCommand {
    /// The client flags, whichever command was given, to lay over the
    /// configuration before the mesh that `run` calls through is built.
    pub fn client(&self) -> &ClientArgs {
        match self {
            UserCommand::Get { client, .. } => client,
        }
    }

    /// Makes the call through `mesh` and prints the answer to stdout (a
    /// table, or JSON lines with `--json`); a refused call is an error
    /// naming its status.
    pub async fn run(self, mesh: &Mesh) -> anyhow::Result<()> {
        let mut users = UserServiceClient::new(mesh.channel(USER_SERVICE));
        match self {
            UserCommand::Get { id, client } => {
                let user = users
                    .get_user(retry_safe(tonic::Request::new(pb::GetUserRequest { id })))
                    .await
                    .map_err(status)?
                    .into_inner();
                if client.json {
                    return print_json([json!({"id": user.id, "username": user.username,
                        "phone": user.phone, "address": user.address})]);
                }
                let row = vec![user.id.to_string(), user.username, user.phone, user.address];
                print_table(&["ID", "USERNAME", "PHONE", "ADDRESS"], &[row])
            }
        }
    }
}

impl ProductCommand {
    /// The client flags, whichever command was given, to lay over the
    /// configuration before the mesh that `run` calls through is built.
    pub fn client(&self) -> &ClientArgs {
        match self {
            ProductCommand::Get { client, .. } | ProductCommand::List { client } => client,
        }
    }

    /// Makes the call through `mesh` and prints the answer to stdout (a
    /// table, or JSON lines with `--json`); a refused call is an error
    /// naming its status.
    pub async fn run(self, mesh: &Mesh) -> anyhow::Result<()> {
        let mut products = ProductServiceClient::new(mesh.channel(PRODUCT_SERVICE));
        let (found, json) = match self {
            ProductCommand::Get { id, client } => {
                let product = products
                    .get_product(retry_safe(tonic::Request::new(pb::GetProductRequest {
                        id,
                    })))
                    .await
                    .map_err(status)?
                    .into_inner();
                (vec![product], client.json)
            }
            ProductCommand::List { client } => {
                let all = all_pages(|page_token| {
                    let mut products = products.clone();
                    async move {
                        let request = pb::ListProductsRequest {
                            page_size: 1000,
                            page_token,
                        };
                        let page = products
                            .list_products(retry_safe(tonic::Request::new(request)))
                            .await?
                            .into_inner();
                        Ok((page.products, page.next_page_token))
                    }
                })
                .await?;
                (all, client.json)
            }
        };
        if json {
            return print_json(
                found.iter().map(
                    |p| json!({"id": p.id, "name": p.name, "price": p.price, "stock": p.stock}),
                ),
            );
        }
        let rows: Vec<Vec<String>> = found
            .into_iter()
            .map(|p| vec![p.id.to_string(), p.name, p.price, p.stock.to_string()])
            .collect();
        print_table(&["ID", "NAME", "PRICE", "STOCK"], &rows)
    }
}

impl OrderCommand {
    /// The client flags, whichever command was given, to lay over the
    /// configuration before the mesh that `run` calls through is built.
    pub fn client(&self) -> &ClientArgs {
        match self {
            OrderCommand::Place { client, .. }
            | OrderCommand::Get { client, .. }
            | OrderCommand::List { client, .. } => client,
        }
    }

    /// Makes the call through `mesh` and prints the answer to stdout (a
    /// table, or JSON lines with `--json`); a refused call is an error
    /// naming its status.
    pub async fn run(self, mesh: &Mesh) -> anyhow::Result<()> {
        let mut orders = OrderServiceClient::new(mesh.channel(ORDER_SERVICE));
        let (found, json) = match self {
            OrderCommand::Place {
                user,
                product,
                count,
                request_id,
                client,
            } => {
                // With a request id of our own, the call is safe to send
                // again: the balancer may retry it on another instance.
                let request_id =
                    request_id.unwrap_or_else(|| format!("cli-{:016x}", rand::random::<u64>()));
                let request = pb::PlaceOrderRequest {
                    user_id: user,
                    product_id: product,
                    count,
                    request_id,
                };
                let order = orders
                    .place_order(retry_safe(tonic::Request::new(request)))
                    .await
                    .map_err(status)?
                    .into_inner();
                (vec![order], client.json)
            }
            OrderCommand::Get { id, client } => {
                let order = orders
                    .get_order(retry_safe(tonic::Request::new(pb::GetOrderRequest { id })))
                    .await
                    .map_err(status)?
                    .into_inner();
                (vec![order], client.json)
            }
            OrderCommand::List { user, client } => {
                let all = all_pages(|page_token| {
                    let mut orders = orders.clone();
                    async move {
                        let request = pb::ListOrdersRequest {
                            user_id: user,
                            page_size: 1000,
                            page_token,
                        };
                        let page = orders
                            .list_orders(retry_safe(tonic::Request::new(request)))
                            .await?
                            .into_inner();
                        Ok((page.orders, page.next_page_token))
                    }
                })
                .await?;
                (all, client.json)
            }
        };
        if json {
            return print_json(found.iter().map(order_json));
        }
        // One line per item; an order's own columns on each of its lines.
        let rows: Vec<Vec<String>> = found
            .iter()
            .flat_map(|order| {
                order.items.iter().map(move |item| {
                    vec![
                        order.id.to_string(),
                        format!("{} {}", order.user_id, order.user_name),
                        format!("{} {}", item.product_id, item.product_name),
                        item.price.clone(),
                        item.count.to_string(),
                        order.total_price.clone(),
                        order.request_id.clone(),
                    ]
                })
            })
            .collect();
        print_table(
            &[
                "ORDER", "USER", "PRODUCT", "PRICE", "COUNT", "TOTAL", "REQUEST",
            ],
            &rows,
        )
    }
}

/// Every page of a paged list: `page(token)` answers a page's items and
/// the next token, empty after the last.
async fn all_pages<T, F, Fut>(mut page: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await.map_err(status)?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

fn order_json(order: &pb::Order) -> serde_json::Value {
    let created_at = order.created_at.as_ref().and_then(|at| {
        chrono::DateTime::from_timestamp(at.seconds, at.nanos.max(0) as u32)
            .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    });
    let items: Vec<_> = order
        .items
        .iter()
        .map(|item| {
            json!({"id": item.id.to_string(), "product_id": item.product_id, "product_name": item.product_name,
                "price": item.price, "count": item.count})
        })
        .collect();
    // Ids as strings: a 64-bit id does not survive a JSON number in
    // every language.
    json!({"id": order.id.to_string(), "user_id": order.user_id, "user_name": order.user_name,
        "phone": order.phone, "address": order.address, "total_price": order.total_price,
        "items": items, "request_id": order.request_id, "created_at": created_at})
}

fn print_json(lines: impl IntoIterator<Item = serde_json::Value>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    write!(std::io::stdout().lock(), "{}", table(headers, rows))?;
    Ok(())
}
