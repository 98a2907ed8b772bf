//! Compiles `proto/` with protox (pure Rust, so no protoc is needed) and
//! writes the descriptor set that server reflection serves.

use prost::Message;

const PROTOS: &[&str] = &[
    "shopmesh/registry/v1/registry.proto",
    "shopmesh/shop/v1/user.proto",
    "shopmesh/shop/v1/product.proto",
    "shopmesh/shop/v1/order.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("shopmesh_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
