//! Conversions between the internal API's messages and the engine's types.

use sirocco_engine::{SeqOutput, SeqStep};
use sirocco_model::KvStats;
use sirocco_proto::shard::v1 as pb;
use sirocco_sampling::SamplingParams;

pub fn step_from_pb(s: pb::SeqStep) -> SeqStep {
    SeqStep {
        seq: s.seq_id,
        tokens: s.tokens,
        sample: s.sample,
        params: s.params.as_ref().map(SamplingParams::from),
        replayed: s.replayed as usize,
        return_logits: s.return_logits,
        top_logprobs: s.top_logprobs as usize,
        allowed: (!s.allowed_tokens.is_empty()).then_some(s.allowed_tokens),
    }
}

pub fn output_to_pb(o: SeqOutput) -> pb::SeqResult {
    pb::SeqResult {
        seq_id: o.seq,
        token: o.token,
        logprob: o.logprob,
        top_logprobs: o
            .top_logprobs
            .into_iter()
            .map(|(id, logprob)| pb::TopLogprob { id, logprob })
            .collect(),
        logits: o.logits.unwrap_or_default(),
    }
}

pub fn kv_to_pb(k: &KvStats) -> pb::KvStats {
    pb::KvStats {
        sequences: k.sequences as u64,
        used_tokens: k.used_tokens as u64,
        allocated_tokens: k.allocated_tokens as u64,
        capacity_tokens: k.capacity_tokens as u64,
        allocated_bytes: k.allocated_bytes as u64,
        capacity_bytes: k.capacity_bytes as u64,
        wrapped_sequences: k.wrapped_sequences as u64,
        cached_blocks: k.cached_blocks as u64,
        evicted_blocks: k.evicted_blocks,
    }
}
