//! The product and user services on their own: idempotent stock changes,
//! paging, and the answers to bad input, on each database.

use std::time::Duration;

use sea_orm::EntityTrait;
use shop_mesh::pb::shop as pb;
use shop_mesh::pb::shop::user_service_client::UserServiceClient;
use shop_mesh::product::store::product;
use tonic::Code;

use super::{Backend, TestShop, backend_tests, shown};

backend_tests!(
    stock_changes_happen_once,
    deduction_keys_that_differ_in_any_byte_are_different,
    catalogue_and_users
);

fn deduct(product_id: i64, count: i32, request_id: &str) -> pb::DeductStockRequest {
    pb::DeductStockRequest {
        product_id,
        count,
        request_id: request_id.into(),
    }
}

fn restore(request_id: &str) -> pb::RestoreStockRequest {
    pb::RestoreStockRequest {
        request_id: request_id.into(),
    }
}

async fn stock_changes_happen_once(backend: Backend, test: &str) {
    let Some(shop) = TestShop::start(backend, test, 1, 0).await else {
        return;
    };
    let mut products = shop.products();
    let id = shop.order_identity().await;
    let db = shop.db.connect("product").await;
    let stock = || async {
        product::Entity::find_by_id(1001)
            .one(&db)
            .await
            .unwrap()
            .unwrap()
            .stock
    };

    for _ in 0..2 {
        let taken = products
            .deduct_stock(shown(&id, deduct(1001, 5, "d-1")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(taken.outcome(), pb::DeductOutcome::Deducted);
        assert_eq!(taken.product.unwrap().stock, 95);
    }
    assert_eq!(stock().await, 95);
    let other = products
        .deduct_stock(shown(&id, deduct(1001, 6, "d-1")))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition);
    assert_eq!(
        other.message(),
        "request_id d-1 already deducted 5 of product 1001; a different deduction needs a new request_id"
    );

    let undone = products
        .restore_stock(shown(&id, restore("d-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (undone.product_id, undone.count, undone.already_restored),
        (1001, 5, false)
    );
    let again = products
        .restore_stock(shown(&id, restore("d-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.product_id, again.count, again.already_restored),
        (1001, 5, true)
    );
    assert_eq!(stock().await, 100);
    let late = products
        .deduct_stock(shown(&id, deduct(1001, 5, "d-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.outcome(), pb::DeductOutcome::Cancelled);
    assert_eq!(stock().await, 100);

    // A restore that arrives before its deduction closes the key.
    let closed = products
        .restore_stock(shown(&id, restore("d-2")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (closed.product_id, closed.count, closed.already_restored),
        (0, 0, false)
    );
    let late = products
        .deduct_stock(shown(&id, deduct(1001, 5, "d-2")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.outcome(), pb::DeductOutcome::Cancelled);
    assert_eq!(stock().await, 100);

    let cases = [
        (
            deduct(1001, 101, "d-3"),
            Code::FailedPrecondition,
            "product 1001 has 100 in stock, 101 requested",
        ),
        (
            deduct(4242, 1, "d-4"),
            Code::NotFound,
            "product 4242 not found",
        ),
        (
            deduct(1001, 0, "d-5"),
            Code::InvalidArgument,
            "count: must be at least 1, got 0",
        ),
        (
            deduct(1001, 1, ""),
            Code::InvalidArgument,
            "request_id: is required",
        ),
        (
            deduct(0, 1, "d-6"),
            Code::InvalidArgument,
            "product_id: must be a positive id, got 0",
        ),
    ];
    for (request, code, message) in cases {
        let status = products
            .deduct_stock(shown(&id, request.clone()))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (code, message),
            "{request:?}"
        );
    }
    assert_eq!(stock().await, 100);
    let status = products
        .restore_stock(shown(&id, restore("")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    shop.stop().await;
}

/// Each of these request ids takes stock of its own: none is a repeat of
/// another, though a case- or pad-insensitive collation takes them as one.
async fn deduction_keys_that_differ_in_any_byte_are_different(backend: Backend, test: &str) {
    let Some(shop) = TestShop::start(backend, test, 1, 0).await else {
        return;
    };
    let mut products = shop.products();
    let id = shop.order_identity().await;
    let request_ids = ["Ab", "ab", "AB ", "k🚀", "K😀 "];
    for (taken, request_id) in request_ids.into_iter().enumerate() {
        let answer = products
            .deduct_stock(shown(&id, deduct(1001, 1, request_id)))
            .await
            .unwrap_or_else(|status| panic!("request_id {request_id:?}: {status:?}"))
            .into_inner();
        assert_eq!(answer.outcome(), pb::DeductOutcome::Deducted);
        assert_eq!(
            answer.product.unwrap().stock,
            99 - taken as i32,
            "request_id {request_id:?} took its own stock"
        );
    }
    for request_id in request_ids {
        let undone = products
            .restore_stock(shown(&id, restore(request_id)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (undone.count, undone.already_restored),
            (1, false),
            "request_id {request_id:?} restores only its own"
        );
    }
    shop.stop().await;
}

async fn catalogue_and_users(backend: Backend, test: &str) {
    let Some(shop) = TestShop::start(backend, test, 1, 0).await else {
        return;
    };
    let mut products = shop.products();
    let first = products
        .list_products(pb::ListProductsRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = first
        .products
        .iter()
        .map(|p| (p.id, p.name.as_str(), p.price.as_str(), p.stock))
        .collect();
    assert_eq!(
        names,
        [
            (1001, "华为", "2399.00", 100),
            (1002, "小米", "1999.00", 100)
        ]
    );
    let rest = products
        .list_products(pb::ListProductsRequest {
            page_size: 2,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = rest
        .products
        .iter()
        .map(|p| (p.id, p.name.as_str(), p.price.as_str()))
        .collect();
    assert_eq!(names, [(1003, "iphone", "4999.00")]);
    assert_eq!(rest.next_page_token, "");
    for (page_size, page_token, message) in [
        (-1, "", "page_size: must be between 0 and 1000, got -1"),
        (1001, "", "page_size: must be between 0 and 1000, got 1001"),
        (
            0,
            "zz",
            "page_token: is not a token this service gave; start again without one",
        ),
    ] {
        let status = products
            .list_products(pb::ListProductsRequest {
                page_size,
                page_token: page_token.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, message)
        );
    }
    let missing = products
        .get_product(pb::GetProductRequest { id: 7 })
        .await
        .unwrap_err();
    assert_eq!(
        (missing.code(), missing.message()),
        (Code::NotFound, "product 7 not found")
    );

    let mut users = UserServiceClient::new(shop.mesh.channel(shop_mesh::shop::USER_SERVICE));
    let user = users
        .get_user(pb::GetUserRequest { id: 1001 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        user,
        pb::User {
            id: 1001,
            username: "binghe".into(),
            phone: "13212345678".into(),
            address: "北京".into()
        }
    );
    let missing = users
        .get_user(pb::GetUserRequest { id: 1002 })
        .await
        .unwrap_err();
    assert_eq!(
        (missing.code(), missing.message()),
        (Code::NotFound, "user 1002 not found")
    );
    let bad = users
        .get_user(pb::GetUserRequest { id: 0 })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    shop.stop().await;
}

/// `message` showing `identity`, or nothing.
fn maybe_shown<T>(identity: Option<&str>, message: T) -> tonic::Request<T> {
    match identity {
        Some(identity) => shown(identity, message),
        None => tonic::Request::new(message),
    }
}

/// Stock calls are the product service's ledger: taken from the order
/// service alone, as its identity from the registry proves it. Anything
/// else is refused, and no stock moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_calls_are_taken_from_the_order_service_alone() {
    let shop = TestShop::start(Backend::Sqlite, "stock_calls_identity", 1, 0)
        .await
        .expect("SQLite needs no server");
    let mut products = shop.products();
    let db = shop.db.connect("product").await;
    let stock = || async {
        product::Entity::find_by_id(1001)
            .one(&db)
            .await
            .unwrap()
            .unwrap()
            .stock
    };
    let order = shop.order_identity().await;
    products
        .deduct_stock(shown(&order, deduct(1001, 5, "real-1")))
        .await
        .unwrap();
    assert_eq!(stock().await, 95);

    let registry = shop.registry.client().await;
    let identity = |service: &str, audience: &str| {
        let request = shop_mesh::pb::registry::IssueIdentityRequest {
            namespace: String::new(),
            service: service.into(),
            audience: audience.into(),
        };
        let mut registry = registry.clone();
        async move {
            registry
                .issue_identity(request)
                .await
                .unwrap()
                .into_inner()
                .identity
        }
    };
    let user = identity("server-user", "server-product").await;
    let elsewhere = identity("server-order", "server-user").await;
    // Signed by a key this shop's registry never had.
    let stranger = shop_mesh::auth::identity::Signer::generate()
        .issue(
            "public",
            "server-order",
            "server-product",
            Duration::from_secs(60),
        )
        .0;
    // The real one with its claims changed to another audience.
    let (_, signature) = order.split_once('.').unwrap();
    let (claims, _) = elsewhere.split_once('.').unwrap();
    let spliced = format!("{claims}.{signature}");

    let refused = [
        (
            None,
            Code::Unauthenticated,
            "only server-order may call this",
        ),
        (
            Some(user.as_str()),
            Code::PermissionDenied,
            "the caller is server-user",
        ),
        (
            Some(elsewhere.as_str()),
            Code::PermissionDenied,
            "for server-user, not for server-product",
        ),
        (
            Some(stranger.as_str()),
            Code::Unauthenticated,
            "which the registry does not have",
        ),
        (
            Some(spliced.as_str()),
            Code::Unauthenticated,
            "signature is not the registry's",
        ),
        (
            Some("smt_0123456789abcdef_00"),
            Code::Unauthenticated,
            "malformed",
        ),
    ];
    for (shown_identity, code, says) in refused {
        let status = products
            .deduct_stock(maybe_shown(shown_identity, deduct(1001, 50, "forged-1")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{shown_identity:?}: {status:?}");
        assert!(
            status.message().contains(says),
            "{shown_identity:?}: {status:?}"
        );
        // Putting back what a real order took is refused just the same.
        let status = products
            .restore_stock(maybe_shown(shown_identity, restore("real-1")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{shown_identity:?}: {status:?}");
        assert_eq!(stock().await, 95, "{shown_identity:?} moved stock");
    }
    shop.stop().await;
}
