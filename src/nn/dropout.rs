//! Inverted dropout as one op whose mask is a pure function of (seed, element index).
//!
//! Element `i` of the (contiguous) input is kept when the top 32 bits of
//! `splitmix64(seed + (i + 1) * golden)` fall below `keep * 2^32`, and kept values are scaled by
//! `1 / keep`. So:
//! - the CPU (here, with rayon) and CUDA (`kernels/dropout.cu`) draw the same mask, bit for bit;
//! - no mask tensor is stored for backward: the gradient goes through the same op;
//! - a recomputation (gradient checkpointing) with the same seed drops the same elements;
//! - nothing is drawn on the host: drawing masks there cost seconds per 7B training step (a
//!   host RNG over every LoRA input and the decoder's 4096x4096 attention maps, plus the
//!   transfer), measured on an H100 before this op existed.

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Whether element `i` survives (the kernel's `keep`).
#[inline]
fn keep(seed: u64, i: u64, threshold: u64) -> bool {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(GOLDEN));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) < threshold
}

/// The op: keep probability as a 32-bit threshold, and the seed of this call site and step.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub seed: u64,
    pub keep: f64,
}

impl Dropout {
    fn threshold(&self) -> u64 {
        (self.keep * 4_294_967_296.0).round().clamp(0.0, 4_294_967_296.0) as u64
    }

    fn scale(&self) -> f64 {
        1.0 / self.keep
    }

    /// The mask applied to a contiguous slice; `f` scales one kept element.
    fn apply<T: Copy + Send + Sync>(&self, x: &[T], zero: T, f: impl Fn(T) -> T + Sync) -> Vec<T> {
        let (seed, thr) = (self.seed, self.threshold());
        x.par_iter().enumerate().map(|(i, &v)| if keep(seed, i as u64, thr) { f(v) } else { zero }).collect()
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((o0, o1)) = l.contiguous_offsets() else { candle_core::bail!("dropout: input must be contiguous") };
        let sc = self.scale() as f32;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.apply(&v[o0..o1], 0.0, |x| x * sc)),
            CpuStorage::F64(v) => {
                let sc = self.scale();
                CpuStorage::F64(self.apply(&v[o0..o1], 0.0, |x| x * sc))
            }
            CpuStorage::BF16(v) => {
                CpuStorage::BF16(self.apply(&v[o0..o1], bf16::ZERO, |x| bf16::from_f32(x.to_f32() * sc)))
            }
            CpuStorage::F16(v) => {
                CpuStorage::F16(self.apply(&v[o0..o1], f16::ZERO, |x| f16::from_f32(x.to_f32() * sc)))
            }
            other => candle_core::bail!("dropout: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::kernels::dropout(s, l, self.seed, self.threshold(), self.scale())?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d(x * m / keep) / dx = m / keep: the same op on the gradient (same shape, same indices).
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// Inverted dropout of `x` with drop probability `p` and mask seed `seed`.
pub fn dropout_seeded(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    anyhow::ensure!(p < 1.0, "dropout probability {p} must be below 1");
    Ok(x.contiguous()?.apply_op1(Dropout { seed, keep: 1.0 - p as f64 })?)
}
