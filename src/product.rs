//! The product role: `shop-mesh product`, registered as
//! "server-product". The catalogue and its stock; every stock change is
//! keyed by a request id, so retries never take twice.

pub mod store;

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::discovery::Callers;
use crate::pb::shop as pb;
use crate::pb::shop::product_service_server::{ProductService, ProductServiceServer};
use crate::roles::ShopRole;
use crate::shop::metrics::StockMetrics;
use crate::shop::{self, Error, ORDER_SERVICE, PRODUCT_SERVICE};
use crate::shutdown::Shutdown;
pub use store::{Deducted, Product, Products, Restored};

/// Serves the product service on `listener`, registered through the
/// registry, until `shutdown`.
pub async fn run(
    config: &crate::config::Config,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let metrics = config.telemetry.metrics();
    let mut db = shop::db::open::<store::Migrator>(&config.product, "product").await?;
    shop::metrics::measure_database(&mut db, &metrics);
    let products = Products::new(db);
    if config.product.seed_data {
        products
            .seed()
            .await
            .map_err(|err| anyhow::anyhow!("cannot load the seed's products: {err}"))?;
    }
    let callers = config
        .discovery
        .callers(&config.connections, PRODUCT_SERVICE)?;
    let service = ProductServiceServer::new(ProductGrpc {
        products,
        callers,
        metrics: StockMetrics::new(&metrics),
    });
    // Its live settings: the log level.
    crate::live::Live::follow(
        config,
        (ShopRole::Product, listener.local_addr()?),
        &metrics,
        shutdown.clone(),
    )?;
    shop::serve(
        (config, ShopRole::Product),
        &metrics,
        <ProductServiceServer<ProductGrpc> as tonic::server::NamedService>::NAME,
        listener,
        |routes| routes.add_service(service),
        shutdown,
    )
    .await
}

struct ProductGrpc {
    products: Products,
    /// Who may change stock: the order service alone.
    callers: Callers,
    metrics: StockMetrics,
}

fn product_pb(product: Product) -> pb::Product {
    pb::Product {
        id: product.id,
        name: product.name,
        price: product.price.to_string(),
        stock: product.stock,
    }
}

/// A count to take or give: positive.
fn parse_count(count: i32) -> Result<i32, Error> {
    if count <= 0 {
        return Err(Error::invalid(
            "count",
            format!("must be at least 1, got {count}"),
        ));
    }
    Ok(count)
}

#[tonic::async_trait]
impl ProductService for ProductGrpc {
    async fn get_product(
        &self,
        request: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let id = shop::parse_id("id", request.into_inner().id)?;
        Ok(Response::new(product_pb(self.products.get(id).await?)))
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let request = request.into_inner();
        let limit = shop::page_size(request.page_size)?;
        let after = shop::page_token(&request.page_token)?;
        let products = self.products.list(after, limit).await?;
        let next_page_token = match products.last() {
            Some(last) if products.len() as u64 == limit => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListProductsResponse {
            products: products.into_iter().map(product_pb).collect(),
            next_page_token,
        }))
    }

    async fn deduct_stock(
        &self,
        request: Request<pb::DeductStockRequest>,
    ) -> Result<Response<pb::DeductStockResponse>, Status> {
        self.callers.check(&request, ORDER_SERVICE).await?;
        let request = request.into_inner();
        let product_id = shop::parse_id("product_id", request.product_id)?;
        let count = parse_count(request.count)?;
        let request_id =
            shop::parse_request_id("request_id", &request.request_id, store::MAX_REQUEST_ID)?;
        let deducted = self.products.deduct(&request_id, product_id, count).await;
        let response = match deducted {
            Ok(Deducted::Taken(product)) => {
                self.metrics.deducted("deducted");
                pb::DeductStockResponse {
                    outcome: pb::DeductOutcome::Deducted.into(),
                    product: Some(product_pb(product)),
                }
            }
            Ok(Deducted::Cancelled) => {
                self.metrics.deducted("cancelled");
                pb::DeductStockResponse {
                    outcome: pb::DeductOutcome::Cancelled.into(),
                    product: None,
                }
            }
            Err(err) => {
                self.metrics.deducted("refused");
                return Err(err.into());
            }
        };
        Ok(Response::new(response))
    }

    async fn restore_stock(
        &self,
        request: Request<pb::RestoreStockRequest>,
    ) -> Result<Response<pb::RestoreStockResponse>, Status> {
        self.callers.check(&request, ORDER_SERVICE).await?;
        let request_id = shop::parse_request_id(
            "request_id",
            &request.into_inner().request_id,
            store::MAX_REQUEST_ID,
        )?;
        let restored = self.products.restore(&request_id).await.inspect_err(|_| {
            self.metrics.restored("refused");
        })?;
        self.metrics.restored(if restored.already {
            "already_restored"
        } else {
            "restored"
        });
        Ok(Response::new(pb::RestoreStockResponse {
            product_id: restored.product_id,
            count: restored.count,
            already_restored: restored.already,
        }))
    }
}
