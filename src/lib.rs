//! shop-mesh: a Nacos-class service registry and the seed's shop services
//! (user, product, order) that find each other through it, in one binary
//! that speaks gRPC.
//!
//! # Layout
//!
//! - [`cli`]: the command line; its subcommands are the roles.
//! - [`config`]: layered configuration (defaults < file < environment < flags).
//! - [`telemetry`]: logging through `tracing`.
//! - [`shutdown`]: the one shutdown signal every role watches.
//! - [`server`]: what every gRPC server carries (health, reflection, limits,
//!   malformed requests refused as the caller's), and the `[connections]`
//!   settings its clients share.
//! - [`pb`]: the generated protobuf and gRPC code, and nothing else.
//! - [`codec`]: how the generated servers decode a request (a message
//!   that does not decode is the caller's fault).
//! - [`error`]: the one error a caller is answered with, and its one
//!   mapping to gRPC codes.
//! - [`registry`]: the registry role: its domain ([`registry::Registry`]),
//!   its gRPC face, persistence and health probes.
//! - [`etcd`]: a typed client of etcd's v3 API (reads, transactions,
//!   leases, watches), the foundation of the registry's etcd store.
//! - [`discovery`]: the client side: self-registration, the resolver that
//!   watches a service, and the balanced channel callers use.
//! - [`shop`]: what the shop services share: their configuration, storage
//!   (sea-orm), exact money, unique ids and errors.
//! - [`user`], [`product`], [`order`]: the shop's three roles, the seed's
//!   services; the order service reaches the other two only through
//!   discovery.
//! - [`roles`]: the three shop roles as one type, and the one way each is
//!   started (by the command line, `up` and the tests).
//! - [`up`]: `shop-mesh up`, the registry and every service in one process.
//! - [`client`]: `shop-mesh user get`, `product get|list`, `order
//!   place|get|list`: clients that find their service through the registry.
//! - [`soak`]: the reliability suite: the shop as processes, under load and
//!   faults, checked against its databases.
//! - [`quote`]: how an error quotes a value the caller sent.
//! - [`inspect`]: `services`, `instances`, `watch`: a look into the registry.
//! - [`bench`]: benchmarks a deployment (`shop-mesh bench registry`).
//!
//! Domain code never sees tonic or prost types: the gRPC modules convert at
//! the edge.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod bench;
pub mod cert;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod configs;
pub mod discovery;
pub mod error;
pub mod etcd;
pub mod harness;
pub mod inspect;
pub mod live;
pub mod order;
pub mod pb;
pub mod product;
pub mod quote;
pub mod registry;
pub mod roles;
pub mod server;
pub mod shop;
pub mod shutdown;
pub mod soak;
pub mod telemetry;
pub mod token;
pub mod up;
pub mod user;
