//! Generated gRPC messages, clients and servers for sirocco's APIs, compiled from the
//! repository's `proto/` folder at build time.

#![allow(clippy::all, missing_docs)]

pub mod codec;

/// The public API a router serves (`sirocco.v1`).
pub mod v1 {
    tonic::include_proto!("sirocco.v1");
}

/// The internal router ↔ shard API (`sirocco.shard.v1`).
pub mod shard {
    pub mod v1 {
        tonic::include_proto!("sirocco.shard.v1");
    }
}

/// The subset of etcd's v3 API that membership uses (client side).
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Encoded descriptors of every sirocco proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sirocco_descriptor.bin"));
