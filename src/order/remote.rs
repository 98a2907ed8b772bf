//! The user and product services over gRPC, found through discovery: the
//! only part of the order flow that sees their protobuf messages and
//! `tonic::Status`. Each call is converted here once, into the types of
//! [`super::peers`].

use std::sync::Arc;

use tonic::{Code, Status};

use super::peers::{Deduction, Product, Products, User, Users};
use crate::discovery::{BalancedChannel, Identities, retry_safe};
use crate::pb::shop as pb;
use crate::pb::shop::product_service_client::ProductServiceClient;
use crate::pb::shop::user_service_client::UserServiceClient;
use crate::shop::{Error, Money, PRODUCT_SERVICE, USER_SERVICE};

/// The user service, every instance of it, balanced.
#[derive(Clone)]
pub struct RemoteUsers {
    client: UserServiceClient<BalancedChannel>,
}

impl RemoteUsers {
    /// Calls the user service over `channel`.
    pub fn new(channel: BalancedChannel) -> Self {
        RemoteUsers {
            client: UserServiceClient::new(channel),
        }
    }
}

impl Users for RemoteUsers {
    async fn user(&self, id: i64) -> Result<User, Error> {
        let user = self
            .client
            .clone()
            .get_user(retry_safe(tonic::Request::new(pb::GetUserRequest { id })))
            .await
            .map_err(|status| dependency(USER_SERVICE, status))?
            .into_inner();
        Ok(User {
            id: user.id,
            name: user.username,
            phone: user.phone,
            address: user.address,
        })
    }
}

/// The product service, every instance of it, balanced.
#[derive(Clone)]
pub struct RemoteProducts {
    client: ProductServiceClient<BalancedChannel>,
    /// Stock calls are the product service's ledger: it takes them only
    /// from the order service, which shows it this.
    identities: Arc<Identities>,
}

impl RemoteProducts {
    /// Calls the product service over `channel`, showing `identities` on
    /// the stock calls.
    pub fn new(channel: BalancedChannel, identities: Identities) -> Self {
        RemoteProducts {
            client: ProductServiceClient::new(channel),
            identities: Arc::new(identities),
        }
    }

    /// A stock call's failure; when the product service did not take the
    /// identity (a new signing key, an expiry the clocks disagree on), the
    /// next call fetches another.
    fn refused(&self, status: Status) -> Error {
        if status.code() == Code::Unauthenticated {
            self.identities.forget(PRODUCT_SERVICE);
        }
        dependency(PRODUCT_SERVICE, status)
    }

    /// `message` as a stock call, showing the order service's identity.
    async fn stock_call<T>(&self, message: T) -> Result<tonic::Request<T>, Error> {
        let mut request = tonic::Request::new(message);
        self.identities.show(PRODUCT_SERVICE, &mut request).await?;
        Ok(retry_safe(request))
    }
}

impl Products for RemoteProducts {
    async fn product(&self, id: i64) -> Result<Product, Error> {
        let product = self
            .client
            .clone()
            .get_product(retry_safe(tonic::Request::new(pb::GetProductRequest {
                id,
            })))
            .await
            .map_err(|status| dependency(PRODUCT_SERVICE, status))?
            .into_inner();
        product_of(product)
    }

    async fn deduct(&self, product_id: i64, count: i32, key: &str) -> Result<Deduction, Error> {
        let deduct = pb::DeductStockRequest {
            product_id,
            count,
            request_id: key.to_owned(),
        };
        let deducted = self
            .client
            .clone()
            .deduct_stock(self.stock_call(deduct).await?)
            .await
            .map_err(|status| self.refused(status))?
            .into_inner();
        if deducted.outcome() != pb::DeductOutcome::Deducted {
            return Ok(Deduction::Cancelled);
        }
        match deducted.product {
            Some(product) => product_of(product).map(Deduction::Taken),
            // Taken, but not said what: as good as a lost answer.
            None => Err(Error::Unavailable(format!(
                "{PRODUCT_SERVICE} answered a deduction without the product"
            ))),
        }
    }

    async fn restore(&self, key: &str) -> Result<(), Error> {
        let restore = pb::RestoreStockRequest {
            request_id: key.to_owned(),
        };
        self.client
            .clone()
            .restore_stock(self.stock_call(restore).await?)
            .await
            .map_err(|status| self.refused(status))?;
        Ok(())
    }
}

fn product_of(product: pb::Product) -> Result<Product, Error> {
    let price = Money::parse(&product.price).map_err(|reason| {
        Error::Unavailable(format!(
            "{PRODUCT_SERVICE} sent an unreadable price for product {}: {reason}",
            product.id
        ))
    })?;
    Ok(Product {
        id: product.id,
        name: product.name,
        price,
        stock: product.stock,
    })
}

/// A dependency's answer, as this service's: refusals (the call did
/// nothing) pass through with their words as `NotFound` or
/// `FailedPrecondition`; anything else is UNAVAILABLE, naming the service,
/// or ABORTED.
fn dependency(service: &str, status: Status) -> Error {
    match status.code() {
        Code::NotFound => Error::NotFound(status.message().to_owned()),
        Code::FailedPrecondition => Error::FailedPrecondition(status.message().to_owned()),
        Code::InvalidArgument => {
            Error::FailedPrecondition(format!("{service} refused: {}", status.message()))
        }
        Code::Aborted => Error::Aborted(format!("{service}: {}", status.message())),
        // Refused before anything was touched: did nothing.
        Code::Unauthenticated | Code::PermissionDenied => Error::FailedPrecondition(format!(
            "{service} refused this caller: {}",
            status.message()
        )),
        _ => Error::Unavailable(if status.message().contains(service) {
            status.message().to_owned()
        } else {
            format!("{service}: {}", status.message())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The placer reads "did nothing" from exactly these two kinds, so
    /// every code that means the call did nothing must land on one of them
    /// and no other code may.
    #[test]
    fn refusals_and_failures_keep_their_kinds() {
        let cases = [
            (Code::NotFound, Error::NotFound("no product 7".into())),
            (
                Code::FailedPrecondition,
                Error::FailedPrecondition("no product 7".into()),
            ),
            (
                Code::InvalidArgument,
                Error::FailedPrecondition("server-product refused: no product 7".into()),
            ),
            (
                Code::Aborted,
                Error::Aborted("server-product: no product 7".into()),
            ),
            (
                Code::Unavailable,
                Error::Unavailable("server-product: no product 7".into()),
            ),
            (
                Code::DeadlineExceeded,
                Error::Unavailable("server-product: no product 7".into()),
            ),
            (
                Code::Internal,
                Error::Unavailable("server-product: no product 7".into()),
            ),
            (
                Code::PermissionDenied,
                Error::FailedPrecondition(
                    "server-product refused this caller: no product 7".into(),
                ),
            ),
            (
                Code::Unauthenticated,
                Error::FailedPrecondition(
                    "server-product refused this caller: no product 7".into(),
                ),
            ),
        ];
        for (code, expected) in cases {
            assert_eq!(
                dependency(PRODUCT_SERVICE, Status::new(code, "no product 7")),
                expected,
                "{code:?}"
            );
        }
        assert_eq!(
            dependency(
                PRODUCT_SERVICE,
                Status::unavailable("no instance of server-product")
            ),
            Error::Unavailable("no instance of server-product".into()),
            "the service is named once"
        );
    }

    #[test]
    fn an_unreadable_price_is_the_product_services_fault() {
        let refused = product_of(pb::Product {
            id: 3,
            name: "lamp".into(),
            price: "cheap".into(),
            stock: 1,
        })
        .unwrap_err();
        assert!(matches!(refused, Error::Unavailable(_)), "{refused:?}");
    }
}
