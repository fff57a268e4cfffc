//! Sampling parameters on the internal router → shard API, both ways: the router
//! sends them with a sequence's first chunk and every rank reads them back.

use crate::SamplingParams;
use sirocco_proto::shard::v1 as pb;

impl From<&SamplingParams> for pb::SamplingParams {
    fn from(p: &SamplingParams) -> Self {
        pb::SamplingParams {
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

impl From<&pb::SamplingParams> for SamplingParams {
    fn from(p: &pb::SamplingParams) -> Self {
        SamplingParams {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_survive_the_round_trip() {
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.1,
            frequency_penalty: 0.2,
            presence_penalty: 0.3,
            seed: Some(7),
        };
        assert_eq!(SamplingParams::from(&pb::SamplingParams::from(&p)), p);
    }
}
