//! Token sampling for sirocco: turns one step's full-vocabulary logits into the next token of a
//! sequence, with the usual OpenAI / Hugging Face knobs (penalties, temperature, top-k, top-p,
//! min-p) and a per-sequence seeded RNG so that seeded runs are reproducible.

mod logprobs;
mod params;
mod sampler;
#[cfg(feature = "proto")]
mod wire;

pub use logprobs::{log_softmax, top_logprobs};
pub use params::SamplingParams;
pub use sampler::{Sampled, Sampler};
