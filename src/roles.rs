//! The shop's three roles as one type: how each is named, which section of
//! the configuration it reads, and the one way it is started, whoever
//! starts it (the command line, `up`, the tests).

use tokio::net::TcpListener;

use crate::config::Config;
use crate::shop::{ORDER_SERVICE, PRODUCT_SERVICE, ServiceConfig, USER_SERVICE};
use crate::shutdown::Shutdown;

/// One of the seed's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShopRole {
    User,
    Product,
    Order,
}

impl ShopRole {
    /// Its name on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            ShopRole::User => "user",
            ShopRole::Product => "product",
            ShopRole::Order => "order",
        }
    }

    /// The service name it registers under.
    pub fn service(self) -> &'static str {
        match self {
            ShopRole::User => USER_SERVICE,
            ShopRole::Product => PRODUCT_SERVICE,
            ShopRole::Order => ORDER_SERVICE,
        }
    }

    /// Its section of the configuration.
    pub fn config(self, config: &Config) -> &ServiceConfig {
        match self {
            ShopRole::User => &config.user,
            ShopRole::Product => &config.product,
            ShopRole::Order => &config.order,
        }
    }

    /// Serves the role on `listener` until `shutdown`.
    pub async fn run(
        self,
        config: &Config,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        match self {
            ShopRole::User => crate::user::run(config, listener, shutdown).await,
            ShopRole::Product => crate::product::run(config, listener, shutdown).await,
            ShopRole::Order => crate::order::run(config, listener, shutdown).await,
        }
    }
}
