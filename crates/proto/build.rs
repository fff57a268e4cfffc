//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building needs
//! no system protoc, and keeps the descriptor set for server reflection.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let public = root.join("sirocco/v1/sirocco.proto");
    let shard = root.join("sirocco/shard/v1/shard.proto");
    let etcd = root.join("etcd/etcd.proto");
    for f in [&public, &shard, &etcd] {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    // etcd's API is compiled separately: it is a client only and not reflected.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(protox::compile([&etcd], [&root])?)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("sirocco_descriptor.bin"),
        protox::compile([&public, &shard], [&root])?.encode_to_vec(),
    )?;
    // Clients send the public API malformed messages; those are their error
    // (INVALID_ARGUMENT), which prost's own codec reports as INTERNAL.
    tonic_prost_build::configure()
        .codec_path("crate::codec::ClientErrorCodec")
        .compile_fds(protox::compile([&public], [&root])?)?;
    tonic_prost_build::configure().compile_fds(protox::compile([&shard], [&root])?)?;
    Ok(())
}
