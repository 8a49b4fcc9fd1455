//! Data-parallel plumbing: which rank this process is ([`launch`]), the collective operations
//! the trainer needs ([`Collective`]) and their backends, and the built-in launcher ([`spawn`]).
//!
//! Backends, all with the same interface:
//! - [`Single`]: one process, every operation a no-op (the ordinary run);
//! - [`local`]: ranks as threads of one process sharing a hub (tests);
//! - [`tcp`]: processes on one or several machines, star-shaped through rank 0 (CPU runs,
//!   `prs finetune --nproc-per-node N --device cpu`);
//! - `nccl` (feature `nccl`): GPUs, through candle's cudarc NCCL bindings.
//!
//! Every backend sums in a fixed order (rank 0 + rank 1 + ...), except NCCL, whose ring order
//! is its own; so CPU results are deterministic run to run.

pub mod launch;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod spawn;
pub mod tcp;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// How small control values are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Sum,
    Min,
    Max,
}

impl Op {
    fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            Op::Sum => a + b,
            Op::Min => a.min(b),
            Op::Max => a.max(b),
        }
    }

    /// Combines per-rank vectors in rank order (so sums are deterministic).
    pub fn reduce(self, per_rank: &[Vec<f64>]) -> Result<Vec<f64>> {
        let first = per_rank.first().cloned().unwrap_or_default();
        for (r, v) in per_rank.iter().enumerate() {
            ensure!(
                v.len() == first.len(),
                "rank {r} sent {} control values, rank 0 {}: the ranks are at different points of the run",
                v.len(),
                first.len()
            );
        }
        Ok((0..first.len()).map(|i| per_rank[1..].iter().fold(first[i], |acc, v| self.apply(acc, v[i]))).collect())
    }
}

/// The operations data-parallel training needs. Every rank calls the same operations in the
/// same order; a rank that does not arrive within the timeout ([`timeout`]) ends the job with
/// an error naming it, never a silent hang.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The element-wise sum over the ranks of a flat f32 tensor, on every rank.
    fn all_reduce_sum(&self, bucket: &Tensor) -> Result<Tensor>;
    /// Rank 0's `t` on every rank (the others pass a tensor of the same shape).
    fn broadcast(&self, t: &Tensor) -> Result<Tensor>;
    /// Small control values (flags, counts, losses) combined with `op`, on the host, in f64.
    fn all_reduce_values(&self, values: &[f64], op: Op) -> Result<Vec<f64>>;

    fn barrier(&self) -> Result<()> {
        self.all_reduce_values(&[], Op::Sum).map(|_| ())
    }
    /// The rank that writes checkpoints, logs and the progress bar.
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
}

/// One process: nothing to exchange.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, bucket: &Tensor) -> Result<Tensor> {
        Ok(bucket.clone())
    }
    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_reduce_values(&self, values: &[f64], _op: Op) -> Result<Vec<f64>> {
        Ok(values.to_vec())
    }
}

/// The ordinary single-process run's collective.
pub fn single() -> Arc<dyn Collective> {
    Arc::new(Single)
}

/// How long a collective may wait for the slowest rank before the job is ended:
/// `PRS_DIST_TIMEOUT` seconds, 1800 by default (PyTorch's NCCL default). It covers the time
/// other ranks spend computing, evaluating or saving, so it is generous.
pub fn timeout() -> Duration {
    let secs = std::env::var("PRS_DIST_TIMEOUT").ok().and_then(|v| v.parse::<f64>().ok()).filter(|s| *s > 0.0);
    Duration::from_secs_f64(secs.unwrap_or(1800.0))
}

/// Every tensor flattened to f32 and concatenated: one bucket, one collective.
fn pack(tensors: &[Tensor]) -> Result<Tensor> {
    let flat =
        tensors.iter().map(|t| t.to_dtype(DType::F32)?.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&flat, 0)?)
}

/// The inverse of [`pack`]: `like[i]`'s shape and dtype, in order.
fn unpack(bucket: &Tensor, like: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            let out = bucket.narrow(0, at, n)?.reshape(t.shape())?.to_dtype(t.dtype())?;
            at += n;
            Ok(out)
        })
        .collect()
}

/// Gives every rank rank 0's values of `vars` (one broadcast).
pub fn broadcast_vars(c: &dyn Collective, vars: &[Var]) -> Result<()> {
    if c.world() == 1 || vars.is_empty() {
        return Ok(());
    }
    let now: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let got = unpack(&c.broadcast(&pack(&now)?)?, &now)?;
    for (v, t) in vars.iter().zip(got) {
        v.set(&t)?;
    }
    Ok(())
}

/// The one all-reduce of an optimizer step: the gradients of `weights` summed over the ranks
/// (a rank without micro-batches in this group, or without a gradient for a tensor,
/// contributes zeros), and the BatchNorm running statistics in `buffers` replaced by their
/// mean over the ranks (each rank updated its own from its own micro-batches), in the same
/// bucket.
pub fn all_reduce_step(
    c: &dyn Collective,
    grads: Option<GradStore>,
    weights: &[Var],
    buffers: &[Var],
) -> Result<GradStore> {
    let mut grads = grads.unwrap_or_default();
    if c.world() == 1 {
        return Ok(grads);
    }
    let mut parts = weights
        .iter()
        .map(|w| match grads.get(w.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => Ok(w.as_tensor().zeros_like()?),
        })
        .collect::<Result<Vec<_>>>()?;
    parts.extend(buffers.iter().map(|b| b.as_tensor().clone()));
    let summed = unpack(&c.all_reduce_sum(&pack(&parts)?)?, &parts)?;
    let (g, b) = summed.split_at(weights.len());
    for (w, g) in weights.iter().zip(g) {
        grads.insert(w.as_tensor(), g.clone());
    }
    let inv = 1.0 / c.world() as f64;
    for (v, s) in buffers.iter().zip(b) {
        v.set(&s.affine(inv, 0.0)?)?;
    }
    Ok(grads)
}

/// Whether any rank says yes.
pub fn any(c: &dyn Collective, yes: bool) -> Result<bool> {
    Ok(c.all_reduce_values(&[yes as u8 as f64], Op::Max)?[0] > 0.0)
}

/// The collective for a launch on `device`: none for one process, NCCL between GPUs (feature
/// `nccl`), TCP between CPU processes. Connecting waits for every rank (up to [`timeout`]).
///
/// Rank 0 listens on MASTER_PORT, except under torchrun, whose agent may serve its own
/// rendezvous store there: then on MASTER_PORT + 1. `PRS_DIST_FORCE=1` uses the backend even
/// for one process, on a free local port: a 1-rank run must equal the plain run bit for bit
/// (the GPU check of the NCCL path).
pub fn connect(r: &launch::Rank, device: &candle_core::Device) -> Result<Arc<dyn Collective>> {
    let forced = r.world == 1 && std::env::var("PRS_DIST_FORCE").is_ok_and(|v| v == "1");
    let (addr, port) = match &r.master {
        Some((a, p)) if r.world > 1 => (a.as_str(), if r.launcher == launch::Launcher::Torchrun { p + 1 } else { *p }),
        _ if forced => ("127.0.0.1", std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port()),
        _ => return Ok(single()),
    };
    if device.is_cuda() {
        #[cfg(feature = "nccl")]
        return Ok(Arc::new(nccl::Nccl::connect(r.rank, r.world, addr, port, device, timeout())?));
        #[cfg(not(feature = "nccl"))]
        anyhow::bail!(
            "{} ranks on GPUs need NCCL: this prs was built without the `nccl` feature (make build-cuda builds it)",
            r.world
        );
    }
    ensure!(device.is_cpu(), "distributed training runs on CUDA (NCCL) or on the CPU (TCP), not on {device:?}");
    Ok(Arc::new(tcp::Tcp::connect(r.rank, r.world, addr, port, timeout())?))
}
