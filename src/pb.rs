//! The generated protobuf and gRPC code: the only `include_proto!` of the
//! crate.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `shopmesh.registry.v1`: the registry's API.
pub mod registry {
    tonic::include_proto!("shopmesh.registry.v1");
}

/// `shopmesh.shop.v1`: the user, product and order services.
pub mod shop {
    tonic::include_proto!("shopmesh.shop.v1");
}

/// The encoded descriptor set of every proto in `proto/`, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shopmesh_descriptor.bin"));
