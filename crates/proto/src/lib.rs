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

/// Sampling parameters travel to the shards as they are: one conversion each way.
impl From<&sirocco_sampling::SamplingParams> for shard::v1::SamplingParams {
    fn from(p: &sirocco_sampling::SamplingParams) -> Self {
        shard::v1::SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as u32,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            seed: p.seed,
        }
    }
}

impl From<&shard::v1::SamplingParams> for sirocco_sampling::SamplingParams {
    fn from(p: &shard::v1::SamplingParams) -> Self {
        sirocco_sampling::SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            seed: p.seed,
        }
    }
}

/// Encoded descriptors of every sirocco proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sirocco_descriptor.bin"));
