//! Compiles `trine/v1/*.proto` with protox (pure Rust, no system `protoc`),
//! writes the encoded descriptor set for gRPC server reflection, and generates
//! the prost messages and tonic clients/servers.

use std::path::PathBuf;

use prost::Message as _;

const PROTOS: &[&str] = &[
    "trine/v1/common.proto",
    "trine/v1/inference.proto",
    "trine/v1/admin.proto",
    "trine/v1/raft.proto",
    "trine/v1/mesh.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("trine_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
