//! The load: concurrent clients that use the shop the way a careful real
//! client does. Each order has a request id of its own, and a failed
//! PlaceOrder is sent again with the same id after a back-off, until it is
//! placed, refused, or the client gives up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use parking_lot::Mutex;
use tonic::Code;

use crate::discovery::{BalancedChannel, Mesh};
use crate::pb::shop as pb;
use crate::pb::shop::order_service_client::OrderServiceClient;
use crate::pb::shop::product_service_client::ProductServiceClient;
use crate::pb::shop::user_service_client::UserServiceClient;
use crate::shop::{ORDER_SERVICE, PRODUCT_SERVICE, USER_SERVICE};

/// The products the load buys.
pub const PRODUCTS: [i64; 3] = [1001, 1002, 1003];

/// How a client retries a PlaceOrder: a back-off that doubles up to a cap,
/// giving up after this long.
const GIVE_UP_AFTER: Duration = Duration::from_secs(30);

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// PlaceOrder calls (one per request id).
    pub orders: usize,
    /// Placed, by request id: the order id the client was given.
    pub placed: HashMap<String, i64>,
    /// Of those, placed only after one or more retries.
    pub placed_after_retry: usize,
    /// Refused for stock (FAILED_PRECONDITION): a real answer, not a failure.
    pub refused: usize,
    /// Still failing when the client gave up.
    pub failed: Vec<Failed>,
    /// Answers no retry should get (INVALID_ARGUMENT, NOT_FOUND, INTERNAL...).
    pub wrong: Vec<(String, Code, String)>,
    /// Reads (GetProduct, GetUser, ListOrders): done, and failed.
    pub reads: usize,
    /// Reads that failed after the client's retries.
    pub read_failures: usize,
}

/// A PlaceOrder its client gave up on.
#[derive(Debug, Clone)]
pub struct Failed {
    /// The request id it was sent with, to look it up in the databases.
    pub request_id: String,
    /// The last answer.
    pub code: Code,
    /// The last answer's message.
    pub message: String,
    /// When the client first sent it, from the start of the load.
    pub started: Duration,
}

/// Runs `clients` clients for `duration` against the shop behind `mesh`.
pub async fn run(mesh: &Mesh, clients: usize, duration: Duration) -> Outcome {
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let clients = Clients {
                orders: OrderServiceClient::new(mesh.channel(ORDER_SERVICE)),
                products: ProductServiceClient::new(mesh.channel(PRODUCT_SERVICE)),
                users: UserServiceClient::new(mesh.channel(USER_SERVICE)),
            };
            let outcome = outcome.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < until {
                    let roll = rand::random_range(0..100);
                    if roll < 50 {
                        let request_id = format!("soak-{client}-{n}");
                        clients.place(request_id, started, &outcome).await;
                    } else {
                        let ok = clients.read(roll).await;
                        let mut outcome = outcome.lock();
                        outcome.reads += 1;
                        if !ok {
                            outcome.read_failures += 1;
                        }
                    }
                    n += 1;
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    Arc::try_unwrap(outcome)
        .map(Mutex::into_inner)
        .unwrap_or_else(|shared| shared.lock().clone())
}

struct Clients {
    orders: OrderServiceClient<BalancedChannel>,
    products: ProductServiceClient<BalancedChannel>,
    users: UserServiceClient<BalancedChannel>,
}

impl Clients {
    async fn place(&self, request_id: String, load_started: Instant, outcome: &Mutex<Outcome>) {
        let request = pb::PlaceOrderRequest {
            user_id: 1001,
            product_id: PRODUCTS[rand::random_range(0..PRODUCTS.len())],
            count: rand::random_range(1..=3),
            request_id: request_id.clone(),
        };
        let started = Instant::now();
        let mut pauses = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .with_jitter()
            .without_max_times()
            .build();
        let mut tries = 0;
        outcome.lock().orders += 1;
        loop {
            tries += 1;
            let answer = self.orders.clone().place_order(request.clone()).await;
            let status = match answer {
                Ok(order) => {
                    let mut outcome = outcome.lock();
                    outcome.placed.insert(request_id, order.into_inner().id);
                    if tries > 1 {
                        outcome.placed_after_retry += 1;
                    }
                    return;
                }
                Err(status) => status,
            };
            match status.code() {
                Code::FailedPrecondition => {
                    outcome.lock().refused += 1;
                    return;
                }
                Code::Unavailable
                | Code::Aborted
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::ResourceExhausted
                | Code::Unknown => {}
                code => {
                    let wrong = (request_id, code, status.message().to_owned());
                    outcome.lock().wrong.push(wrong);
                    return;
                }
            }
            if started.elapsed() > GIVE_UP_AFTER {
                outcome.lock().failed.push(Failed {
                    request_id,
                    code: status.code(),
                    message: status.message().to_owned(),
                    started: started - load_started,
                });
                return;
            }
            tokio::time::sleep(pauses.next().unwrap_or(Duration::from_secs(1))).await;
        }
    }

    /// One read, retried once; whether it succeeded.
    async fn read(&self, roll: u32) -> bool {
        for _ in 0..2 {
            let ok = match roll {
                50..70 => {
                    let id = PRODUCTS[rand::random_range(0..PRODUCTS.len())];
                    let request = pb::GetProductRequest { id };
                    self.products.clone().get_product(request).await.is_ok()
                }
                70..85 => {
                    let request = pb::GetUserRequest { id: 1001 };
                    self.users.clone().get_user(request).await.is_ok()
                }
                _ => {
                    let request = pb::ListOrdersRequest {
                        user_id: 1001,
                        page_size: 20,
                        page_token: String::new(),
                    };
                    self.orders.clone().list_orders(request).await.is_ok()
                }
            };
            if ok {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}
