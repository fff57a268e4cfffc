//! A tensor-parallel group whose ranks are threads of this process, joined by the
//! in-process collective. Every command goes to every rank; rank 0's logits are the
//! answer (all ranks compute the same ones).

use crate::step::{SeqOutput, SeqStep};
use crate::{Rank, StepExecutor};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::DType;
use sirocco_collective::{Collective, LocalGroup};
use sirocco_model::{DeviceSpec, KvStats, MistralConfig, ModelSource, Partition, SeqId};
use sirocco_scheduler::KvGeometry;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// How a group is built.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub tp: usize,
    pub dtype: DType,
    /// Where the ranks compute; in a thread group rank `r` of `cuda:N` uses `cuda:N+r`.
    pub device: DeviceSpec,
    /// KV cache budget per rank, in bytes (blocks are allocated on demand within it).
    pub kv_cache_bytes: usize,
    pub kv_block_size: usize,
    /// Quantize float weights as they load.
    pub quantize: Option<sirocco_model::Quantize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            tp: 1,
            dtype: DType::F32,
            device: DeviceSpec::Cpu,
            kv_cache_bytes: 2 << 30,
            kv_block_size: 64,
            quantize: None,
        }
    }
}

enum Cmd {
    Step(Vec<SeqStep>, Sender<Result<Vec<SeqOutput>>>),
    Attach(Vec<(SeqId, Vec<u32>)>, Sender<Result<Vec<usize>>>),
    Release(Vec<SeqId>, Sender<Result<()>>),
    Stats(Sender<KvStats>),
}

/// In-process tensor-parallel group.
pub struct TpGroup {
    config: MistralConfig,
    senders: Vec<Sender<Cmd>>,
    threads: Vec<JoinHandle<()>>,
    weight_bytes: usize,
    kv_block_size: usize,
}

impl TpGroup {
    /// Loads every rank's slice of `source` (in parallel) and starts the rank threads.
    pub fn load(source: &ModelSource, opts: &EngineOptions) -> Result<Self> {
        let loaded = Arc::new(source.open()?);
        let config = loaded.config.clone();
        // Check the degree before spawning anything, for one clear error.
        Partition::new(&config, 0, opts.tp)?;
        let collectives = LocalGroup::members(opts.tp);
        // Open every rank's device up front, so that a missing GPU is one clear error
        // before any rank waits for its peers.
        let devices = (0..opts.tp)
            .map(|rank| opts.device.offset(rank).open())
            .collect::<Result<Vec<_>>>()?;
        // On CUDA with several ranks, the ranks join by NCCL instead of through host memory.
        #[cfg(feature = "cuda")]
        let nccl_id = match opts.device {
            DeviceSpec::Cuda(_) if opts.tp > 1 => Some(sirocco_collective::nccl::new_id_bytes()?),
            _ => None,
        };
        let (ready_tx, ready_rx) = channel::<(usize, Result<usize>)>();
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for (rank, (coll, device)) in collectives.into_iter().zip(devices).enumerate() {
            let (tx, rx) = channel::<Cmd>();
            senders.push(tx);
            let loaded = loaded.clone();
            let opts = opts.clone();
            let ready = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("rank-{rank}"))
                .spawn(move || {
                    // NCCL when the group made an id for it, else the in-process collective.
                    #[cfg(feature = "cuda")]
                    let coll: Result<Arc<dyn Collective>> = match nccl_id {
                        Some(id) => sirocco_collective::NcclCollective::with_device(rank, opts.tp, &id, &device)
                            .map(|c| Arc::new(c) as Arc<dyn Collective>)
                            .map_err(Into::into),
                        None => Ok(Arc::new(coll)),
                    };
                    #[cfg(not(feature = "cuda"))]
                    let coll: Result<Arc<dyn Collective>> = Ok(Arc::new(coll));
                    let built = coll.and_then(|coll| Rank::load(&loaded, rank, opts.tp, &opts, &device, coll));
                    match built {
                        Ok(rank_state) => {
                            let _ = ready.send((rank, Ok(rank_state.model.weight_bytes())));
                            serve(rank_state, rx);
                        }
                        Err(e) => {
                            let _ = ready.send((rank, Err(e)));
                        }
                    }
                })
                .context("cannot spawn rank thread")?;
            threads.push(handle);
        }
        drop(ready_tx);
        let mut weight_bytes = 0;
        let mut first_err = None;
        for _ in 0..opts.tp {
            match ready_rx.recv() {
                Ok((_, Ok(b))) => weight_bytes += b,
                Ok((rank, Err(e))) => {
                    first_err.get_or_insert(e.context(format!("rank {rank} failed to load")));
                }
                Err(_) => {
                    first_err.get_or_insert(anyhow!("a rank thread died while loading"));
                }
            }
        }
        let group = TpGroup {
            config,
            senders,
            threads,
            weight_bytes,
            kv_block_size: opts.kv_block_size,
        };
        match first_err {
            Some(e) => Err(e),
            None => Ok(group),
        }
    }

    pub fn config(&self) -> &MistralConfig {
        &self.config
    }

    pub fn tp(&self) -> usize {
        self.senders.len()
    }

    /// Bytes of weights all ranks together read per decode step.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    fn broadcast<T>(&self, make: impl Fn(Sender<T>) -> Cmd) -> Result<Vec<T>> {
        let mut rxs = Vec::with_capacity(self.senders.len());
        for (rank, s) in self.senders.iter().enumerate() {
            let (tx, rx) = channel();
            s.send(make(tx)).map_err(|_| anyhow!("rank {rank} has stopped"))?;
            rxs.push(rx);
        }
        rxs.into_iter()
            .enumerate()
            .map(|(rank, rx)| rx.recv().map_err(|_| anyhow!("rank {rank} died during a step")))
            .collect()
    }
}

fn serve(mut rank: Rank, rx: Receiver<Cmd>) {
    for cmd in rx {
        match cmd {
            Cmd::Step(steps, reply) => {
                let _ = reply.send(rank.step(&steps));
            }
            Cmd::Attach(seqs, reply) => {
                let cached = seqs.iter().map(|(seq, tokens)| rank.attach(*seq, tokens)).collect();
                let _ = reply.send(cached);
            }
            Cmd::Release(seqs, reply) => {
                rank.release(&seqs);
                let _ = reply.send(Ok(()));
            }
            Cmd::Stats(reply) => {
                let _ = reply.send(rank.kv_stats());
            }
        }
    }
}

impl StepExecutor for TpGroup {
    fn step(&mut self, steps: &[SeqStep]) -> Result<Vec<SeqOutput>> {
        let outs = self.broadcast(|tx| Cmd::Step(steps.to_vec(), tx))?;
        let mut root = None;
        for (rank, out) in outs.into_iter().enumerate() {
            match out {
                Ok(o) if rank == 0 => root = Some(o),
                Ok(_) => {}
                Err(e) => return Err(e.context(format!("rank {rank} failed the step"))),
            }
        }
        root.ok_or_else(|| anyhow!("rank 0 returned nothing"))
    }

    fn attach(&mut self, seqs: &[(SeqId, Vec<u32>)]) -> Result<Vec<usize>> {
        let answers = self.broadcast(|tx| Cmd::Attach(seqs.to_vec(), tx))?;
        let mut agreed: Option<Vec<usize>> = None;
        for (rank, answer) in answers.into_iter().enumerate() {
            let cached = answer.with_context(|| format!("rank {rank} failed to attach"))?;
            match &agreed {
                Some(a) if *a != cached => {
                    bail!("ranks disagree on cached prefixes: rank 0 found {a:?}, rank {rank} {cached:?}")
                }
                Some(_) => {}
                None => agreed = Some(cached),
            }
        }
        agreed.ok_or_else(|| anyhow!("the group has no ranks"))
    }

    fn release(&mut self, seqs: &[SeqId]) -> Result<()> {
        self.broadcast(|tx| Cmd::Release(seqs.to_vec(), tx))?
            .into_iter()
            .collect()
    }

    fn kv_stats(&mut self) -> Result<Vec<KvStats>> {
        self.broadcast(Cmd::Stats)
    }

    /// The smallest rank's pool, less what sequences already hold there.
    fn kv_geometry(&mut self) -> Result<Option<KvGeometry>> {
        let free = self
            .kv_stats()?
            .iter()
            .map(|s| s.capacity_tokens.saturating_sub(s.allocated_tokens))
            .min()
            .unwrap_or(0);
        Ok(Some(KvGeometry {
            capacity_tokens: free,
            block_size: self.kv_block_size,
            positions_per_seq: self.config.kv_positions(),
        }))
    }
}

impl Drop for TpGroup {
    fn drop(&mut self) {
        self.senders.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
