//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building needs
//! no system protoc, and keeps the descriptor set for server reflection.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        root.join("sirocco/v1/sirocco.proto"),
        root.join("sirocco/shard/v1/shard.proto"),
    ];
    let etcd = root.join("etcd/etcd.proto");
    println!("cargo:rerun-if-changed={}", etcd.display());
    // etcd's API is compiled separately: it is a client only and not reflected.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(protox::compile([&etcd], [&root])?)?;
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("sirocco_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
