//! `sirocco nccl-check` (hidden): proves that the NCCL collective initialises and moves
//! data on this machine's GPUs. `--ranks N` runs N ranks as threads on cuda:D..cuda:D+N-1.
//! Prints one JSON object; exits non-zero when a result is wrong.

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct NcclCheckArgs {
    /// Ranks (threads), one GPU each.
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// First device: cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Elements per all-reduce in the bandwidth loop.
    #[arg(long, default_value_t = 1 << 24)]
    pub elems: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
}

#[cfg(not(feature = "cuda"))]
pub fn run(a: NcclCheckArgs) -> Result<()> {
    sirocco_model::DeviceSpec::parse(&a.device)?;
    bail!("this sirocco was built without the cuda feature")
}

#[cfg(feature = "cuda")]
pub fn run(a: NcclCheckArgs) -> Result<()> {
    use candle_core::{DType, Tensor};
    use sirocco_collective::{nccl, Collective, NcclCollective};
    use sirocco_model::DeviceSpec;
    use std::time::Instant;

    let base = match DeviceSpec::parse(&a.device)? {
        DeviceSpec::Cuda(n) => n,
        DeviceSpec::Cpu => bail!("nccl-check needs --device cuda[:N]"),
    };
    if a.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    let id = nccl::new_id_bytes()?;
    // The id survives the text round trip that etcd or a rendezvous file would impose.
    let id = nccl::id_from_hex(&nccl::id_to_hex(&id))?;
    let world = a.ranks;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (elems, iters) = (a.elems, a.iters);
            std::thread::spawn(move || -> Result<serde_json::Value> {
                let t_init = Instant::now();
                let c = NcclCollective::new(rank, world, &id, base + rank)?;
                let init_s = t_init.elapsed().as_secs_f64();
                let dev = c.device().clone();
                // Correctness: sum over ranks of (rank + 1) * [1, 2, 3, 4], in f32 and bf16.
                let x = (Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev)? * (rank + 1) as f64)?;
                let want: f32 = (1..=world).map(|r| r as f32).sum();
                let mut ok = true;
                for dtype in [DType::F32, DType::BF16] {
                    let y = c.all_reduce_sum_forced(&x.to_dtype(dtype)?)?;
                    let y = y.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    ok &= y == vec![want, 2.0 * want, 3.0 * want, 4.0 * want];
                }
                let g = c.all_gather(&Tensor::full(rank as f32, (2, 3), &dev)?)?;
                ok &= g.dims() == [2 * world, 3];
                let b = c.broadcast(&Tensor::full(rank as f32 + 7.0, 5, &dev)?, 0)?;
                ok &= b.to_vec1::<f32>()? == vec![7.0; 5];
                c.barrier()?;
                // Bandwidth: bf16 all-reduces of `elems` elements.
                let big = Tensor::ones(elems, DType::BF16, &dev)?;
                let _ = c.all_reduce_sum_forced(&big)?;
                dev.synchronize()?;
                let t = Instant::now();
                for _ in 0..iters {
                    let _ = c.all_reduce_sum_forced(&big)?;
                }
                dev.synchronize()?;
                let per = t.elapsed().as_secs_f64() / iters.max(1) as f64;
                Ok(serde_json::json!({
                    "rank": c.rank(), "ok": ok, "init_s": init_s,
                    "allreduce_bf16_elems": elems, "allreduce_s": per,
                    "algbw_gb_s": (elems * 2) as f64 / per / 1e9,
                }))
            })
        })
        .collect();
    let mut ranks = Vec::new();
    for h in handles {
        ranks.push(h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??);
    }
    let ok = ranks.iter().all(|r| r["ok"] == true);
    println!(
        "{}",
        serde_json::json!({"ok": ok, "world": world, "secs": t0.elapsed().as_secs_f64(), "ranks": ranks})
    );
    if !ok {
        bail!("NCCL results were wrong");
    }
    Ok(())
}
