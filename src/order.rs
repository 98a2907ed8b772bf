//! The order role: `shop-mesh order`, registered as "server-order".
//! Places orders through "server-user" and "server-product", found by name
//! in the registry; never by address.
//!
//! Its parts: `place` (the order flow, free of protobuf), `peers` (what
//! the flow needs from the user and product services), `remote` (those
//! services over gRPC), `store` (the order database); this file is the
//! order service's gRPC face.

pub mod peers;
pub mod place;
pub mod remote;
pub mod store;

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::discovery::Mesh;
use crate::pb::shop as pb;
use crate::pb::shop::order_service_server::{OrderService, OrderServiceServer};
use crate::roles::ShopRole;
use crate::shop::ids::IdGenerator;
use crate::shop::metrics::OrderMetrics;
use crate::shop::{self, Error, ORDER_SERVICE, PRODUCT_SERVICE, USER_SERVICE};
use crate::shutdown::Shutdown;
pub use place::{PlaceOrder, Placer};
use remote::{RemoteProducts, RemoteUsers};
pub use store::{Order, Orders};

/// Serves the order service on `listener`, registered through the
/// registry, until `shutdown`.
pub async fn run(
    config: &crate::config::Config,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let metrics = config.telemetry.metrics();
    let mut db = shop::db::open::<store::Migrator>(&config.order, "order").await?;
    shop::metrics::measure_database(&mut db, &metrics);
    let ids = IdGenerator::start(db.clone(), config.shop.id_lease)
        .await
        .map_err(|err| anyhow::anyhow!("cannot lease an id worker: {err}"))?;
    tracing::info!(worker = ?ids.worker(), "id worker leased");
    let mesh = Mesh::measured(&config.discovery, &config.connections, &metrics)?;
    let placer = Placer {
        orders: Orders::new(db),
        ids: ids.clone(),
        users: RemoteUsers::new(mesh.channel(USER_SERVICE)),
        products: RemoteProducts::new(
            mesh.channel(PRODUCT_SERVICE),
            config
                .discovery
                .identities(&config.connections, ORDER_SERVICE)?,
        ),
        metrics: OrderMetrics::new(&metrics),
    };
    tokio::spawn(placer.clone().sweep(
        config.shop.sweep_interval,
        config.shop.pending_timeout,
        shutdown.clone(),
    ));
    let live = crate::live::Live::follow(
        config,
        (ShopRole::Order, listener.local_addr()?),
        &metrics,
        shutdown.clone(),
    )?;
    let service = OrderServiceServer::new(OrderGrpc { placer, live });
    let served = shop::serve(
        (config, ShopRole::Order),
        &metrics,
        <OrderServiceServer<OrderGrpc> as tonic::server::NamedService>::NAME,
        listener,
        |routes| routes.add_service(service),
        shutdown,
    )
    .await;
    // Only now: the server has drained, so no open call needs an id.
    ids.release().await;
    served
}

struct OrderGrpc {
    placer: Placer<RemoteUsers, RemoteProducts>,
    /// Where `shop.max_order_count` is read, live.
    live: crate::live::Live,
}

impl OrderGrpc {
    fn parse(&self, request: pb::PlaceOrderRequest) -> Result<PlaceOrder, Error> {
        let user_id = shop::parse_id("user_id", request.user_id)?;
        let product_id = shop::parse_id("product_id", request.product_id)?;
        let max_count = self.live.max_order_count();
        if request.count <= 0 || request.count as u32 > max_count {
            return Err(Error::invalid(
                "count",
                format!("must be between 1 and {max_count}, got {}", request.count),
            ));
        }
        let request_id = match request.request_id.as_str() {
            "" => None,
            given => Some(shop::parse_request_id(
                "request_id",
                given,
                store::MAX_REQUEST_ID,
            )?),
        };
        Ok(PlaceOrder {
            asked: store::Asked {
                user_id,
                product_id,
                count: request.count,
            },
            request_id,
        })
    }
}

fn order_pb(order: Order) -> pb::Order {
    pb::Order {
        id: order.id,
        user_id: order.user_id,
        user_name: order.user_name,
        phone: order.phone,
        address: order.address,
        total_price: order.total_price.to_string(),
        items: order
            .items
            .into_iter()
            .map(|item| pb::OrderItem {
                id: item.id,
                product_id: item.product_id,
                product_name: item.product_name,
                price: item.price.to_string(),
                count: item.count,
            })
            .collect(),
        request_id: order.request_id,
        created_at: Some(prost_types::Timestamp {
            seconds: order.created_at.timestamp(),
            nanos: order.created_at.timestamp_subsec_nanos() as i32,
        }),
    }
}

#[tonic::async_trait]
impl OrderService for OrderGrpc {
    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let metrics = &self.placer.metrics;
        let _placing = metrics.placing();
        let placed = match self.parse(request.into_inner()) {
            Ok(request) => self.placer.place(request).await,
            Err(refused) => Err(refused),
        };
        metrics.placed(&placed);
        Ok(Response::new(order_pb(placed?)))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let id = shop::parse_id("id", request.into_inner().id)?;
        Ok(Response::new(order_pb(self.placer.orders.get(id).await?)))
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let request = request.into_inner();
        let user_id = shop::parse_id("user_id", request.user_id)?;
        let limit = shop::page_size(request.page_size)?;
        let before = shop::page_token(&request.page_token)?;
        let orders = self.placer.orders.list(user_id, before, limit).await?;
        let next_page_token = match orders.last() {
            Some(last) if orders.len() as u64 == limit => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListOrdersResponse {
            orders: orders.into_iter().map(order_pb).collect(),
            next_page_token,
        }))
    }
}
