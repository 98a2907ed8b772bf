//! The generated protobuf and gRPC code: the only `include_proto!` of the
//! crate, and beside each the servers, generated apart because they decode
//! requests with [`crate::codec::RequestCodec`].

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `shopmesh.registry.v1`: the registry's API.
pub mod registry {
    tonic::include_proto!("shopmesh.registry.v1");
    include!(concat!(env!("OUT_DIR"), "/server/shopmesh.registry.v1.rs"));
}

/// `shopmesh.config.v1`: the config centre's API.
pub mod config {
    tonic::include_proto!("shopmesh.config.v1");
    include!(concat!(env!("OUT_DIR"), "/server/shopmesh.config.v1.rs"));
}

/// `shopmesh.shop.v1`: the user, product and order services.
pub mod shop {
    tonic::include_proto!("shopmesh.shop.v1");
    include!(concat!(env!("OUT_DIR"), "/server/shopmesh.shop.v1.rs"));
}

/// `grpc.health.v1`: the health server, over tonic-health's messages and
/// answered by its service.
pub mod health {
    include!(concat!(env!("OUT_DIR"), "/server/grpc.health.v1.rs"));
}

/// `etcdserverpb`: the clients of the part of etcd's v3 API the etcd
/// store uses; only [`crate::etcd`] speaks it.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Nacos 2.x's gRPC interface (no package): `Payload`, and the `Request`
/// and `BiRequestStream` services Nacos clients call (whose method names
/// are camelCase, as Nacos spells them).
#[allow(non_camel_case_types)]
pub mod nacos {
    include!(concat!(env!("OUT_DIR"), "/nacos/_.rs"));
}

/// The encoded descriptor set of every proto in `proto/` but health's
/// (tonic-health has its own), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shopmesh_descriptor.bin"));
