//! Decode attention throughput: GB/s of keys and values read per call, on the
//! generated 229M model's heads (4 KV heads of 64, groups of 4) and Mistral 7B's
//! (8 KV heads of 128), with a pool per layer as in the engine so that a step's
//! KV cache is read from memory, not from the cache the call before left warm.
//!
//! `cargo bench -p sirocco-kernels --bench attention [-- filter]`.

use half::bf16;
use sirocco_kernels::attention::{decode_attention, DecodeAttention};
use sirocco_kernels::Input;
use std::time::Instant;

/// The engine's block size.
const BLOCK: usize = 64;

fn case(name: &str, seqs: usize, held: usize, nkv: usize, group: usize, hd: usize, half: bool) {
    let layers = 12;
    let width = nkv * hd;
    let blocks = held.div_ceil(BLOCK);
    let rows = seqs * blocks * BLOCK;
    // Each sequence's blocks interleaved with the others', as a busy pool has them.
    let tables: Vec<u32> = (0..seqs)
        .flat_map(|s| (0..blocks).map(move |b| (b * seqs + s) as u32))
        .collect();
    let meta: Vec<(u32, u32)> = (0..seqs).map(|s| ((s * blocks) as u32, held as u32)).collect();
    let q: Vec<f32> = (0..seqs * nkv * group * hd).map(|i| (i as f32 * 0.3).cos()).collect();
    let f32_pools: Vec<Vec<f32>> = (0..2 * layers)
        .map(|l| (0..rows * width).map(|i| ((i + l) as f32 * 0.618).sin()).collect())
        .collect();
    let bf16_pools: Vec<Vec<bf16>> = if half {
        f32_pools
            .iter()
            .map(|p| p.iter().map(|&x| bf16::from_f32(x)).collect())
            .collect()
    } else {
        Vec::new()
    };
    let input = |l: usize| {
        if half {
            Input::BF16(&bf16_pools[l])
        } else {
            Input::F32(&f32_pools[l])
        }
    };
    let mut out = vec![0f32; q.len()];
    // Between a layer's attention in one step and the next, the step streams every
    // weight matrix through the caches: 48 MB of other reads before each call stand
    // in for them, so the pool is read from memory as in the engine.
    let flush: Vec<u64> = (0..48 << 17).collect();
    let layer = |l: usize, out: &mut [f32]| {
        std::hint::black_box(flush.iter().fold(0u64, |a, &v| a.wrapping_add(v)));
        let a = DecodeAttention {
            q: &q,
            k: input(2 * l),
            v: input(2 * l + 1),
            q_heads: nkv * group,
            kv_heads: nkv,
            head_dim: hd,
            seqs: &meta,
            tables: &tables,
            block_size: BLOCK,
        };
        let t = Instant::now();
        decode_attention(&a, out);
        t.elapsed().as_secs_f64()
    };
    (0..layers).for_each(|l| _ = layer(l, &mut out));
    let mut times = Vec::new();
    for _ in 0..9 {
        times.push((0..layers).map(|l| layer(l, &mut out)).sum::<f64>() / layers as f64);
    }
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    let bytes = 2 * seqs * held * width * if half { 2 } else { 4 };
    println!(
        "{name:<44} {:>8.1} µs/layer {:>6.1} GB/s",
        secs * 1e6,
        bytes as f64 / secs / 1e9
    );
}

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    println!(
        "probe: {:.1} GB/s read bandwidth, {} threads",
        sirocco_kernels::probe::read_bandwidth_gbs(),
        rayon::current_num_threads()
    );
    let cases: &[(&str, usize, usize, usize, usize, usize, bool)] = &[
        ("229M f32: 1 seq x 256 slots", 1, 256, 4, 4, 64, false),
        ("229M f32: 16 seqs x 256 slots", 16, 256, 4, 4, 64, false),
        ("229M f32: 16 seqs x 144 slots", 16, 144, 4, 4, 64, false),
        ("229M bf16: 16 seqs x 256 slots", 16, 256, 4, 4, 64, true),
        ("7B bf16: 1 seq x 4096 slots", 1, 4096, 8, 4, 128, true),
        ("7B bf16: 16 seqs x 1024 slots", 16, 1024, 8, 4, 128, true),
    ];
    for &(name, seqs, held, nkv, group, hd, half) in cases {
        if filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())) {
            case(name, seqs, held, nkv, group, hd, half);
        }
    }
}
