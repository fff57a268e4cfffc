//! NCCL implementation of [`Collective`] over candle CUDA tensors (feature `cuda`).
//!
//! One [`NcclCollective`] per rank, usually one process per GPU. The ranks meet through an
//! NCCL unique id that rank 0 creates ([`new_id_bytes`]) and hands to the others out of
//! band (etcd, a static rendezvous, a file): the id is 128 opaque bytes, see
//! [`id_to_bytes`] / [`id_from_bytes`] and the hex forms [`id_to_hex`] / [`id_from_hex`].
//!
//! Streams: candle's `Device::new_cuda` puts every op on the calling thread's per-thread
//! default stream. The communicator is created with that stream handle, so NCCL calls
//! are ordered with the candle kernels issued by the same thread without extra syncs.
//!
//! Unlike [`crate::tcp`], the NCCL calls here have no timeout: a rank that never
//! arrives makes its peers block in the next synchronisation. NCCL errors come back as
//! [`CollectiveError::Tensor`] (their text starts with `nccl`).
//!
//! Not verified on a GPU yet; see scripts/gpu-check.sh.

use crate::{Collective, CollectiveError, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{CustomOp1, Device, Layout, Shape, Tensor};
use cudarc::driver::{CudaSlice, CudaView};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use std::ffi::c_char;
use std::sync::Mutex;

/// Length of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const ID_BYTES: usize = 128;

/// A fresh NCCL unique id, to be created once (by rank 0) and shared with every rank.
pub fn new_id() -> Result<Id> {
    Id::new().map_err(|e| CollectiveError::Broken(format!("ncclGetUniqueId: {e:?}")))
}

/// [`new_id`] as bytes, ready to be sent to the other ranks.
pub fn new_id_bytes() -> Result<[u8; ID_BYTES]> {
    Ok(id_to_bytes(&new_id()?))
}

pub fn id_to_bytes(id: &Id) -> [u8; ID_BYTES] {
    id.internal().map(|c| c as u8)
}

pub fn id_from_bytes(bytes: &[u8; ID_BYTES]) -> Id {
    Id::uninit(bytes.map(|b| b as c_char))
}

/// 256 lowercase hex digits, for text channels (etcd values, environment variables).
pub fn id_to_hex(bytes: &[u8; ID_BYTES]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn id_from_hex(s: &str) -> Result<[u8; ID_BYTES]> {
    let s = s.trim();
    let bad = || CollectiveError::Broken(format!("bad NCCL id: expected {} hex digits", 2 * ID_BYTES));
    if s.len() != 2 * ID_BYTES || !s.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; ID_BYTES];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// The communicator. `ncclComm_t` is a raw pointer, so cudarc's `Comm` is neither `Send`
/// nor `Sync`; NCCL allows a communicator to be used from any thread as long as calls on
/// it are not concurrent, which the mutex around it guarantees.
struct CommCell(Comm);
// SAFETY: see above; every use goes through `NcclCollective::comm`'s mutex.
unsafe impl Send for CommCell {}

/// One rank of an NCCL group.
pub struct NcclCollective {
    comm: Mutex<CommCell>,
    device: Device,
    rank: usize,
    world: usize,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device.location())
            .finish()
    }
}

impl NcclCollective {
    /// Joins the group as `rank` of `world` on CUDA device `ordinal`. Blocks until every
    /// rank has called it with the same id (`ncclCommInitRank`).
    pub fn new(rank: usize, world: usize, id: &[u8; ID_BYTES], ordinal: usize) -> Result<Self> {
        let device = Device::new_cuda(ordinal)?;
        Self::with_device(rank, world, id, &device)
    }

    /// As [`NcclCollective::new`], on a CUDA device the caller already has (the model's),
    /// so that collectives run on the same stream as the model's kernels.
    pub fn with_device(rank: usize, world: usize, id: &[u8; ID_BYTES], device: &Device) -> Result<Self> {
        if rank >= world {
            return Err(CollectiveError::Broken(format!(
                "rank {rank} out of range for world {world}"
            )));
        }
        let cuda = device.as_cuda_device()?;
        let stream = cuda.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| CollectiveError::Broken(format!("binding the CUDA context: {e:?}")))?;
        let comm = Comm::from_rank(stream, rank, world, id_from_bytes(id))
            .map_err(|e| CollectiveError::Broken(format!("ncclCommInitRank (rank {rank} of {world}): {e:?}")))?;
        Ok(Self {
            comm: Mutex::new(CommCell(comm)),
            device: device.clone(),
            rank,
            world,
        })
    }

    /// The device this rank's communicator lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn run(&self, t: &Tensor, op: NcclOp) -> Result<Tensor> {
        if !t.device().same_device(&self.device) {
            return Err(CollectiveError::Mismatch {
                op: op.name(),
                msg: format!(
                    "tensor on {:?}, communicator on {:?}",
                    t.device().location(),
                    self.device.location()
                ),
            });
        }
        let t = t.contiguous()?;
        let guard = self
            .comm
            .lock()
            .map_err(|_| CollectiveError::Broken("NCCL communicator mutex poisoned".into()))?;
        let out = t.apply_op1_no_bwd(&NcclCall {
            comm: &guard.0,
            op,
            world: self.world,
        })?;
        Ok(out)
    }
}

#[derive(Clone, Copy)]
enum NcclOp {
    AllReduceSum,
    AllGather,
    Broadcast(usize),
}

impl NcclOp {
    fn name(self) -> &'static str {
        match self {
            NcclOp::AllReduceSum => "nccl-all-reduce",
            NcclOp::AllGather => "nccl-all-gather",
            NcclOp::Broadcast(_) => "nccl-broadcast",
        }
    }
}

/// One NCCL call as a candle custom op: candle hands over the input's CUDA storage and
/// layout, we allocate the output on the same device and let NCCL fill it.
struct NcclCall<'a> {
    comm: &'a Comm,
    op: NcclOp,
    world: usize,
}

fn nccl_err(op: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("nccl {op}: {e:?}"))
}

impl NcclCall<'_> {
    fn typed<T>(&self, src: CudaView<'_, T>, dev: &CudaDevice) -> candle_core::Result<CudaSlice<T>>
    where
        T: NcclType + cudarc::driver::DeviceRepr,
    {
        let n = src.len();
        let out_len = match self.op {
            NcclOp::AllGather => n * self.world,
            _ => n,
        };
        // SAFETY: every element of the output is written by the NCCL call below.
        let mut dst = unsafe { dev.alloc::<T>(out_len)? };
        let name = self.op.name();
        match self.op {
            NcclOp::AllReduceSum => {
                self.comm
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(|e| nccl_err(name, e))?;
            }
            NcclOp::AllGather => {
                self.comm.all_gather(&src, &mut dst).map_err(|e| nccl_err(name, e))?;
            }
            NcclOp::Broadcast(root) => {
                self.comm
                    .broadcast(Some(&src), &mut dst, root as i32)
                    .map_err(|e| nccl_err(name, e))?;
            }
        }
        Ok(dst)
    }
}

impl CustomOp1 for NcclCall<'_> {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    fn cpu_fwd(
        &self,
        _s: &candle_core::CpuStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{}: NCCL collectives need CUDA tensors", self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: input is not contiguous", self.name())))?;
        let dev = s.device.clone();
        let storage = match &s.slice {
            CudaStorageSlice::F32(x) => CudaStorage::wrap_cuda_slice(self.typed(x.slice(start..end), &dev)?, dev),
            CudaStorageSlice::BF16(x) => CudaStorage::wrap_cuda_slice(self.typed(x.slice(start..end), &dev)?, dev),
            CudaStorageSlice::F16(x) => CudaStorage::wrap_cuda_slice(self.typed(x.slice(start..end), &dev)?, dev),
            CudaStorageSlice::F64(x) => CudaStorage::wrap_cuda_slice(self.typed(x.slice(start..end), &dev)?, dev),
            CudaStorageSlice::U32(x) => CudaStorage::wrap_cuda_slice(self.typed(x.slice(start..end), &dev)?, dev),
            CudaStorageSlice::I64(x) => CudaStorage::wrap_cuda_slice(self.typed(x.slice(start..end), &dev)?, dev),
            CudaStorageSlice::U8(x) => CudaStorage::wrap_cuda_slice(self.typed(x.slice(start..end), &dev)?, dev),
            _ => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), s.dtype()),
        };
        let shape = match self.op {
            NcclOp::AllGather => {
                let mut dims = l.shape().dims().to_vec();
                if dims.is_empty() {
                    dims.push(self.world);
                } else {
                    dims[0] *= self.world;
                }
                Shape::from(dims)
            }
            _ => l.shape().clone(),
        };
        Ok((storage, shape))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        self.run(t, NcclOp::AllReduceSum)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        self.run(t, NcclOp::AllGather)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            return Err(CollectiveError::Mismatch {
                op: "broadcast",
                msg: format!("root {root} >= world {}", self.world),
            });
        }
        if self.world == 1 {
            return Ok(t.clone());
        }
        self.run(t, NcclOp::Broadcast(root))
    }

    /// A one-element all-reduce, then a wait for this thread's stream: every rank has
    /// reached the barrier once it returns.
    fn barrier(&self) -> Result<()> {
        let one = Tensor::ones(1, candle_core::DType::F32, &self.device)?;
        let _ = self.run(&one, NcclOp::AllReduceSum)?;
        self.device.synchronize()?;
        Ok(())
    }
}

impl NcclCollective {
    /// Runs the NCCL all-reduce even at world size 1 (where [`Collective::all_reduce_sum`]
    /// skips it): used by the GPU check to prove the communicator works.
    pub fn all_reduce_sum_forced(&self, t: &Tensor) -> Result<Tensor> {
        self.run(t, NcclOp::AllReduceSum)
    }
}
