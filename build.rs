//! Compiles `proto/` with protox (pure Rust, so no protoc is needed) and
//! writes the descriptor set that server reflection serves.
//!
//! Messages and clients are generated with prost's codec; servers, in a
//! second pass into `server/`, with the crate's request codec, which
//! answers a request that does not decode as the caller's fault. The
//! health server is generated here for that reason too, over
//! tonic-health's own messages.
//!
//! etcd's API, the etcd store's client, is compiled on its own: clients
//! only, and kept out of the descriptor set, since the registry does not
//! serve it. So is Nacos's, which the registry serves on a port of its
//! own for Nacos clients.

use prost::Message;

const PROTOS: &[&str] = &[
    "shopmesh/registry/v1/registry.proto",
    "shopmesh/config/v1/config.proto",
    "shopmesh/shop/v1/user.proto",
    "shopmesh/shop/v1/product.proto",
    "shopmesh/shop/v1/order.proto",
];

const HEALTH: &str = "grpc/health/v1/health.proto";

const ETCD: &str = "etcd/etcdserverpb.proto";

const NACOS: &str = "nacos/nacos_grpc_service.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("shopmesh_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    let servers = out_dir.join("server");
    std::fs::create_dir_all(&servers)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .codec_path("crate::codec::RequestCodec")
        .extern_path(".shopmesh.registry.v1", "crate::pb::registry")
        .extern_path(".shopmesh.config.v1", "crate::pb::config")
        .extern_path(".shopmesh.shop.v1", "crate::pb::shop")
        .extern_path(".grpc.health.v1", "::tonic_health::pb")
        .out_dir(servers)
        .compile_fds(protox::compile(PROTOS.iter().chain([&HEALTH]), ["proto"])?)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(protox::compile([ETCD], ["proto"])?)?;
    // Nacos's interface has no package (prost names its file `_.rs`), so
    // it is written apart; it is served on its own port, without
    // reflection.
    let nacos = out_dir.join("nacos");
    std::fs::create_dir_all(&nacos)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::RequestCodec")
        .out_dir(nacos)
        .compile_fds(protox::compile([NACOS], ["proto"])?)?;
    Ok(())
}
