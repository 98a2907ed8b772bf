//! The registry as a cluster: any number of registry nodes over one etcd
//! cluster (`registry.store = "etcd"`). etcd holds the state and orders
//! every change; each node keeps a view of it, fed by one etcd watch, that
//! serves reads and watches as the memory store does.
//!
//! - [`keys`]: where each part of the state lives in etcd.

pub mod keys;
