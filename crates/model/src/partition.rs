//! Which slice of the model one tensor-parallel rank holds.
//!
//! Query heads are split evenly; each rank keeps the KV heads its query heads use
//! (split when the degree divides the KV heads, replicated when the KV heads divide the
//! degree). The MLP width and the vocabulary are split as evenly as possible and need
//! not be divisible by the degree.

use crate::config::MistralConfig;
use anyhow::{bail, Result};
use std::ops::Range;

/// The slice of the model held by `rank` of `world`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub rank: usize,
    pub world: usize,
    /// Global indices of this rank's query heads.
    pub q_heads: Range<usize>,
    /// Global indices of this rank's KV heads.
    pub kv_heads: Range<usize>,
    /// Columns of the MLP's intermediate width.
    pub mlp: Range<usize>,
    /// Rows of the vocabulary (embedding and lm_head).
    pub vocab: Range<usize>,
    /// The largest vocab slice over ranks: lm_head outputs are padded to it so that
    /// every rank's all-gather contribution has the same shape.
    pub vocab_padded: usize,
}

/// Tensor-parallel degrees the heads of `cfg` allow, ascending.
pub fn allowed_degrees(cfg: &MistralConfig) -> Vec<usize> {
    (1..=cfg.num_attention_heads)
        .filter(|&n| degree_allowed(cfg, n))
        .collect()
}

fn degree_allowed(cfg: &MistralConfig, n: usize) -> bool {
    let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    n > 0 && h % n == 0 && (kv % n == 0 || n.is_multiple_of(kv))
}

/// Where the columns of a row-parallel weight are cut, over every rank of every TP
/// degree `cfg` allows: `start` gives a rank's first column. A quantization group
/// that no cut crosses holds the same weights at every degree.
pub fn column_splits(cfg: &MistralConfig, start: impl Fn(&Partition) -> usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = allowed_degrees(cfg)
        .into_iter()
        .flat_map(|w| (0..w).filter_map(move |r| Partition::new(cfg, r, w).ok()))
        .map(|p| start(&p))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// `rank`'s share of `total` items split over `world` ranks, the first `total % world`
/// ranks taking one more.
pub fn even_split(total: usize, rank: usize, world: usize) -> Range<usize> {
    let base = total / world;
    let rem = total % world;
    let start = rank * base + rank.min(rem);
    start..start + base + usize::from(rank < rem)
}

impl Partition {
    pub fn new(cfg: &MistralConfig, rank: usize, world: usize) -> Result<Self> {
        if !degree_allowed(cfg, world) {
            bail!(
                "tensor-parallel degree {world} does not fit this model's {} query / {} KV heads; allowed degrees: {}",
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                allowed_degrees(cfg)
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if rank >= world {
            bail!("rank {rank} is out of range for tensor-parallel degree {world}");
        }
        if cfg.intermediate_size < world || cfg.vocab_size < world {
            bail!("intermediate_size and vocab_size must be at least the tensor-parallel degree {world}");
        }
        let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let per_rank = h / world;
        let q_heads = rank * per_rank..(rank + 1) * per_rank;
        let kv_heads = if kv % world == 0 {
            let k = kv / world;
            rank * k..(rank + 1) * k
        } else {
            // Replicated: `world / kv` consecutive ranks share one KV head.
            let head = rank / (world / kv);
            head..head + 1
        };
        let vocab_padded = cfg.vocab_size.div_ceil(world);
        Ok(Partition {
            rank,
            world,
            q_heads,
            kv_heads,
            mlp: even_split(cfg.intermediate_size, rank, world),
            vocab: even_split(cfg.vocab_size, rank, world),
            vocab_padded,
        })
    }

    pub fn num_q_heads(&self) -> usize {
        self.q_heads.len()
    }

    pub fn num_kv_heads(&self) -> usize {
        self.kv_heads.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(h: usize, kv: usize) -> MistralConfig {
        MistralConfig {
            vocab_size: 1000,
            hidden_size: h * 8,
            intermediate_size: 257,
            num_hidden_layers: 1,
            num_attention_heads: h,
            num_key_value_heads: kv,
            head_dim: 8,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            sliding_window: Some(4),
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            torch_dtype: None,
        }
    }

    #[test]
    fn allowed_degrees_follow_heads() {
        assert_eq!(allowed_degrees(&cfg(8, 2)), vec![1, 2, 4, 8]);
        assert_eq!(allowed_degrees(&cfg(12, 4)), vec![1, 2, 4, 12]);
        assert_eq!(allowed_degrees(&cfg(32, 8)), vec![1, 2, 4, 8, 16, 32]);
    }

    #[test]
    fn refused_degree_names_the_allowed_ones() {
        let e = Partition::new(&cfg(12, 4), 0, 3).unwrap_err().to_string();
        assert!(e.contains("allowed degrees: 1, 2, 4, 12"), "{e}");
    }

    #[test]
    fn every_query_head_sees_its_own_kv_group() {
        for (h, kv) in [(8, 2), (12, 4), (32, 8)] {
            let c = cfg(h, kv);
            for world in allowed_degrees(&c) {
                let mut covered_mlp = 0;
                let mut covered_vocab = 0;
                for rank in 0..world {
                    let p = Partition::new(&c, rank, world).unwrap();
                    for q in p.q_heads.clone() {
                        assert!(p.kv_heads.contains(&(q / (h / kv))), "h{h} kv{kv} tp{world} r{rank}");
                    }
                    // Heads stay grouped: local q heads per local KV head is constant.
                    assert_eq!(p.num_q_heads() % p.num_kv_heads(), 0);
                    assert_eq!(p.mlp.start, covered_mlp);
                    assert_eq!(p.vocab.start, covered_vocab);
                    assert!(p.vocab.len() <= p.vocab_padded);
                    covered_mlp = p.mlp.end;
                    covered_vocab = p.vocab.end;
                }
                assert_eq!(covered_mlp, 257);
                assert_eq!(covered_vocab, 1000);
            }
        }
    }
}
