//! Whatever a request's fields hold, every RPC answers OK or a refusal a
//! person can act on (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
//! RESOURCE_EXHAUSTED): never INTERNAL, never UNKNOWN, never a panic, and
//! the servers keep serving.

use std::collections::HashMap;
use std::future::Future;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use shop_mesh::pb::config as cfg;
use shop_mesh::pb::config::configs_client::ConfigsClient;
use shop_mesh::pb::registry as reg;
use shop_mesh::pb::shop as pb;
use shop_mesh::pb::shop::order_service_client::OrderServiceClient;
use shop_mesh::pb::shop::product_service_client::ProductServiceClient;
use shop_mesh::pb::shop::user_service_client::UserServiceClient;
use shop_mesh::shop::{ORDER_SERVICE, PRODUCT_SERVICE, USER_SERVICE};
use tonic::Code;

use crate::shop::{Backend, TestShop};

const CASES: u32 = 128;

/// Ids across the whole range, and often near the seed's rows.
fn id() -> impl Strategy<Value = i64> {
    prop_oneof![any::<i64>(), -2i64..1006]
}

fn count() -> impl Strategy<Value = i32> {
    prop_oneof![any::<i32>(), -2i32..120]
}

/// Empty, short, long, printable anything, control characters.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9-]{1,12}",
        "\\PC{0,40}",
        ".{100,400}",
        "[\\x00-\\x1f\\x7f]{1,4}",
    ]
}

fn check<T>(rpc: &str, answer: Result<T, tonic::Status>) -> Result<(), TestCaseError> {
    match answer {
        Ok(_) => Ok(()),
        Err(status) => {
            prop_assert!(
                matches!(
                    status.code(),
                    Code::InvalidArgument
                        | Code::NotFound
                        | Code::FailedPrecondition
                        | Code::ResourceExhausted
                ),
                "{rpc}: {status:?}"
            );
            Ok(())
        }
    }
}

fn run<S: Strategy>(
    runtime: &tokio::runtime::Runtime,
    strategy: S,
    case: impl Fn(S::Value) -> Box<dyn Future<Output = Result<(), TestCaseError>> + Unpin + Send>,
) where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |value| runtime.block_on(case(value)))
        .unwrap();
}

#[test]
fn every_rpc_answers_any_field_with_a_code_a_person_can_act_on() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shop = runtime
        .block_on(TestShop::start(Backend::Sqlite, "properties", 1, 1))
        .unwrap();
    let (users, products, orders, registry) = runtime.block_on(async {
        (
            UserServiceClient::new(shop.mesh.channel(USER_SERVICE)),
            ProductServiceClient::new(shop.mesh.channel(PRODUCT_SERVICE)),
            OrderServiceClient::new(shop.mesh.channel(ORDER_SERVICE)),
            shop.registry.client().await,
        )
    });

    let client = users.clone();
    run(&runtime, id(), move |id| {
        let mut client = client.clone();
        Box::new(Box::pin(async move {
            check("GetUser", client.get_user(pb::GetUserRequest { id }).await)
        }))
    });
    let client = products.clone();
    run(
        &runtime,
        (id(), any::<i32>(), text()),
        move |(id, page_size, page_token)| {
            let mut client = client.clone();
            Box::new(Box::pin(async move {
                check(
                    "GetProduct",
                    client.get_product(pb::GetProductRequest { id }).await,
                )?;
                let list = pb::ListProductsRequest {
                    page_size,
                    page_token,
                };
                check("ListProducts", client.list_products(list).await)
            }))
        },
    );
    let client = products.clone();
    let identity = runtime.block_on(shop.order_identity());
    run(
        &runtime,
        (id(), count(), text()),
        move |(product_id, count, request_id)| {
            let mut client = client.clone();
            let identity = identity.clone();
            Box::new(Box::pin(async move {
                let deduct = pb::DeductStockRequest {
                    product_id,
                    count,
                    request_id: request_id.clone(),
                };
                let deduct = crate::shop::shown(&identity, deduct);
                check("DeductStock", client.deduct_stock(deduct).await)?;
                let restore = pb::RestoreStockRequest { request_id };
                let restore = crate::shop::shown(&identity, restore);
                check("RestoreStock", client.restore_stock(restore).await)
            }))
        },
    );
    let client = orders.clone();
    run(
        &runtime,
        (id(), id(), count(), text(), any::<i32>(), text()),
        move |(user_id, product_id, count, request_id, page_size, page_token)| {
            let mut client = client.clone();
            Box::new(Box::pin(async move {
                let place = pb::PlaceOrderRequest {
                    user_id,
                    product_id,
                    count,
                    request_id,
                };
                check("PlaceOrder", client.place_order(place).await)?;
                check(
                    "GetOrder",
                    client
                        .get_order(pb::GetOrderRequest { id: product_id })
                        .await,
                )?;
                let list = pb::ListOrdersRequest {
                    user_id,
                    page_size,
                    page_token,
                };
                check("ListOrders", client.list_orders(list).await)
            }))
        },
    );

    let instance = (
        (text(), text(), text(), text()),
        (
            text(),
            any::<u32>(),
            proptest::option::of(any::<f64>()),
            proptest::option::of(any::<bool>()),
        ),
        proptest::collection::hash_map(text(), text(), 0..4),
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
        ),
    )
        .prop_map(
            |(
                (namespace, group, service, cluster),
                (ip, port, weight, enabled),
                metadata,
                timings,
            )| {
                reg::Instance {
                    namespace,
                    group,
                    service,
                    cluster,
                    ip,
                    port,
                    weight,
                    enabled,
                    metadata,
                    heartbeat_interval_ms: timings.0,
                    unhealthy_timeout_ms: timings.1,
                    delete_timeout_ms: timings.2,
                    ..Default::default()
                }
            },
        );
    let client = registry.clone();
    run(
        &runtime,
        (instance, any::<u64>(), any::<u32>(), any::<f64>()),
        move |(instance, lease_id, page, threshold)| {
            let mut client = client.clone();
            Box::new(Box::pin(async move {
                let register = reg::RegisterRequest {
                    instance: Some(instance.clone()),
                    lease_id,
                };
                check("Register", client.register(register).await)?;
                let deregister = reg::DeregisterRequest {
                    namespace: instance.namespace.clone(),
                    group: instance.group.clone(),
                    service: instance.service.clone(),
                    cluster: instance.cluster.clone(),
                    ip: instance.ip.clone(),
                    port: instance.port,
                };
                check("Deregister", client.deregister(deregister).await)?;
                let list = reg::ListServicesRequest {
                    namespace: instance.namespace.clone(),
                    group: instance.group.clone(),
                    page,
                    page_size: page,
                    search: instance.service.clone(),
                };
                check("ListServices", client.list_services(list).await)?;
                let get = reg::GetServiceRequest {
                    namespace: instance.namespace.clone(),
                    group: instance.group.clone(),
                    service: instance.service.clone(),
                    healthy_only: page % 2 == 0,
                    clusters: vec![instance.cluster.clone()],
                };
                check("GetService", client.get_service(get).await)?;
                let update = reg::UpdateServiceRequest {
                    namespace: instance.namespace.clone(),
                    group: instance.group.clone(),
                    service: instance.service.clone(),
                    protect_threshold: threshold,
                    metadata: HashMap::from([(instance.ip.clone(), instance.cluster.clone())]),
                };
                check("UpdateService", client.update_service(update).await)?;
                let delete = reg::DeleteServiceRequest {
                    namespace: instance.namespace.clone(),
                    group: instance.group.clone(),
                    service: instance.service.clone(),
                };
                check("DeleteService", client.delete_service(delete).await)?;
                let watch = reg::WatchRequest {
                    namespace: instance.namespace,
                    group: instance.group,
                    service: instance.service,
                    start_revision: lease_id,
                    ..Default::default()
                };
                check("Watch", client.watch(watch).await.map(drop))
            }))
        },
    );
    let client = registry.clone();
    run(
        &runtime,
        proptest::collection::vec(any::<u64>(), 1..4),
        move |leases| {
            let mut client = client.clone();
            Box::new(Box::pin(async move {
                let beats = tokio_stream::iter(
                    leases
                        .into_iter()
                        .map(|lease_id| reg::KeepAliveRequest { lease_id }),
                );
                match client.keep_alive(beats).await {
                    Ok(answers) => {
                        let mut answers = answers.into_inner();
                        while let Some(answer) = answers.message().await.transpose() {
                            check("KeepAlive", answer)?;
                        }
                        Ok(())
                    }
                    Err(status) => check("KeepAlive", Err::<(), _>(status)),
                }
            }))
        },
    );

    let client = runtime.block_on(async {
        ConfigsClient::connect(shop.registry.url())
            .await
            .expect("connect to the config centre")
    });
    run(
        &runtime,
        (
            (text(), text(), text(), text()),
            (any::<i32>(), proptest::option::of(0u64..4), 0u64..4),
            (any::<u32>(), any::<u32>()),
            (text(), text(), any::<bool>()),
        ),
        move |(
            (namespace, group, data_id, content),
            (content_type, expected, version),
            (page, page_size),
            (ip, label, gray),
        )| {
            let mut client = client.clone();
            Box::new(Box::pin(async move {
                let publish = cfg::PublishRequest {
                    namespace: namespace.clone(),
                    group: group.clone(),
                    data_id: data_id.clone(),
                    content,
                    content_type,
                    expected_version: expected,
                    gray: gray.then(|| cfg::GrayRule {
                        ips: vec![ip.clone()],
                        labels: HashMap::from([(label.clone(), ip.clone())]),
                    }),
                };
                check("Configs.Publish", client.publish(publish).await)?;
                let asking = cfg::Client {
                    ip: ip.clone(),
                    labels: HashMap::from([(label.clone(), ip.clone())]),
                };
                let get = cfg::GetRequest {
                    namespace: namespace.clone(),
                    group: group.clone(),
                    data_id: data_id.clone(),
                    version: expected,
                    client: Some(asking.clone()),
                };
                check("Configs.Get", client.get(get).await)?;
                let history = cfg::HistoryRequest {
                    namespace: namespace.clone(),
                    group: group.clone(),
                    data_id: data_id.clone(),
                };
                check("Configs.History", client.history(history).await)?;
                let rollback = cfg::RollbackRequest {
                    namespace: namespace.clone(),
                    group: group.clone(),
                    data_id: data_id.clone(),
                    version,
                    expected_version: expected,
                };
                check("Configs.Rollback", client.rollback(rollback).await)?;
                let list = cfg::ListRequest {
                    namespace: namespace.clone(),
                    group: group.clone(),
                    search: data_id.clone(),
                    page,
                    page_size,
                };
                check("Configs.List", client.list(list).await)?;
                let watch = cfg::WatchRequest {
                    namespace: namespace.clone(),
                    group: group.clone(),
                    data_id: data_id.clone(),
                    start_revision: version,
                    incarnation: page.into(),
                    client: Some(asking),
                };
                check("Configs.Watch", client.watch(watch).await.map(drop))?;
                let promote = cfg::PromoteRequest {
                    namespace: namespace.clone(),
                    group: group.clone(),
                    data_id: data_id.clone(),
                    gray_version: version,
                };
                check("Configs.Promote", client.promote(promote).await)?;
                let abandon = cfg::AbandonRequest {
                    namespace: namespace.clone(),
                    group: group.clone(),
                    data_id: data_id.clone(),
                    gray_version: version,
                };
                check("Configs.Abandon", client.abandon(abandon).await)?;
                let delete = cfg::DeleteRequest {
                    namespace,
                    group,
                    data_id,
                    expected_version: expected,
                };
                check("Configs.Delete", client.delete(delete).await)
            }))
        },
    );

    // Still serving, all of them.
    runtime.block_on(async {
        let mut users = users.clone();
        users
            .get_user(pb::GetUserRequest { id: 1001 })
            .await
            .expect("the user service serves");
        let mut orders = orders.clone();
        orders
            .place_order(pb::PlaceOrderRequest {
                user_id: 1001,
                product_id: 1003,
                count: 1,
                request_id: "after-the-storm".into(),
            })
            .await
            .expect("the order service still places orders");
        shop.stop().await;
    });
}
