//! NCCL on CUDA devices (feature `nccl`), through candle's cudarc bindings: a communicator
//! from (rank, world size, unique id), all-reduce with sum and broadcast on the device's own
//! stream, so they are ordered with candle's kernels.
//!
//! The unique id: rank 0 creates it and sends it to the others over the small TCP exchange of
//! [`super::tcp`] (on MASTER_PORT, or MASTER_PORT + 1 under torchrun, whose agent may already
//! serve its rendezvous store on MASTER_PORT: see [`super::connect`]). NCCL_COMM_ID would be
//! another way; it needs a free port agreed by every rank just the same, so nothing is gained.
//!
//! A watchdog thread ends the process, with a message naming the operation, when a collective
//! has not finished within the timeout ([`super::timeout`]): NCCL itself waits forever for a
//! rank that died or hung. The launcher (ours, torchrun or srun) then stops the other ranks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::{Collective, Op};

/// The communicator holds a raw NCCL handle (not `Send`); it is only used under the mutex,
/// one call at a time, which NCCL allows from any thread.
struct SharedComm(Comm);
unsafe impl Send for SharedComm {}
unsafe impl Sync for SharedComm {}

pub struct Nccl {
    comm: Mutex<SharedComm>,
    device: Device,
    rank: usize,
    world: usize,
    /// The collective in flight and since when, watched by the watchdog thread.
    busy: Arc<Mutex<Option<(Instant, &'static str)>>>,
}

impl Nccl {
    /// Joins the job on `device` (this rank's GPU); rank 0 exchanges the id at `addr:port`.
    pub fn connect(
        rank: usize,
        world: usize,
        addr: &str,
        port: u16,
        device: &Device,
        timeout: Duration,
    ) -> Result<Self> {
        let Device::Cuda(dev) = device else { bail!("NCCL needs a CUDA device, got {device:?}") };
        let exchange = super::tcp::Tcp::connect(rank, world, addr, port, timeout)?;
        let id = if rank == 0 { Some(Id::new().map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))?) } else { None };
        let bytes: Vec<u8> = id.map(|i| i.internal().iter().map(|&c| c as u8).collect()).unwrap_or(vec![0; 128]);
        let got = exchange.broadcast_bytes(bytes)?;
        let internal: [std::ffi::c_char; 128] = std::array::from_fn(|i| got[i] as std::ffi::c_char);
        let comm = Comm::from_rank(dev.cuda_stream(), rank, world, Id::uninit(internal))
            .map_err(|e| anyhow!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))?;
        let busy: Arc<Mutex<Option<(Instant, &'static str)>>> = Arc::default();
        let watched = busy.clone();
        std::thread::Builder::new().name("prs-nccl-watchdog".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let late = watched.lock().ok().and_then(|b| b.filter(|(t, _)| t.elapsed() > timeout));
            if let Some((_, what)) = late {
                eprintln!(
                    "rank {rank}: NCCL {what} did not finish within {:.0} s (PRS_DIST_TIMEOUT): another rank died \
                     or hung; ending the job",
                    timeout.as_secs_f64()
                );
                std::process::exit(1);
            }
        })?;
        Ok(Self { comm: Mutex::new(SharedComm(comm)), device: device.clone(), rank, world, busy })
    }

    /// Runs one collective on `t` and waits for it, under the watchdog's eye.
    fn run(&self, what: &'static str, t: &Tensor, kind: Kind) -> Result<Tensor> {
        let comm = self.comm.lock().map_err(|_| anyhow!("an NCCL call panicked earlier"))?;
        *self.busy.lock().map_err(|_| anyhow!("watchdog poisoned"))? = Some((Instant::now(), what));
        let out = t.to_device(&self.device)?.contiguous()?.apply_op1_no_bwd(&Call { comm: &comm.0, kind });
        let synced = self.device.synchronize();
        *self.busy.lock().map_err(|_| anyhow!("watchdog poisoned"))? = None;
        synced?;
        Ok(out?)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Reduce(Op),
    Broadcast,
}

struct Call<'a> {
    comm: &'a Comm,
    kind: Kind,
}

impl Call<'_> {
    fn on<T: CudaDType + DeviceRepr + NcclType>(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let src = s.as_cuda_slice::<T>()?;
        let src = match l.contiguous_offsets() {
            Some((0, n)) if n == src.len() => src,
            _ => candle_core::bail!("NCCL collectives take a whole contiguous tensor"),
        };
        let dev = s.device().clone();
        let mut dst = unsafe { dev.alloc::<T>(src.len())? };
        let res = match self.kind {
            Kind::Reduce(op) => {
                let op = match op {
                    Op::Sum => ReduceOp::Sum,
                    Op::Min => ReduceOp::Min,
                    Op::Max => ReduceOp::Max,
                };
                self.comm.all_reduce(src, &mut dst, &op)
            }
            Kind::Broadcast => self.comm.broadcast(Some(src), &mut dst, 0),
        };
        res.map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    }
}

impl CustomOp1 for Call<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => self.on::<f32>(s, l)?,
            DType::F64 => self.on::<f64>(s, l)?,
            other => candle_core::bail!("NCCL collectives here take f32 or f64, not {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, bucket: &Tensor) -> Result<Tensor> {
        self.run("all-reduce", &bucket.to_dtype(DType::F32)?, Kind::Reduce(Op::Sum))
    }

    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        self.run("broadcast", &t.to_dtype(DType::F32)?, Kind::Broadcast)
    }

    fn all_reduce_values(&self, values: &[f64], op: Op) -> Result<Vec<f64>> {
        // NCCL refuses nothing of size 0, but a barrier needs one element to wait on.
        let mut v = values.to_vec();
        v.push(0.0);
        let t = Tensor::new(v.as_slice(), &self.device)?;
        let mut out = self.run("control values", &t, Kind::Reduce(op))?.to_vec1::<f64>()?;
        out.pop();
        Ok(out)
    }
}
