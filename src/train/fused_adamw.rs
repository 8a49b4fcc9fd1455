//! The AdamW update and the gradients' global sum of squares over all trained tensors at once.
//!
//! The composite (`composite_update`, kept as the reference) runs about 15 candle kernels per
//! tensor and the norm two more: some 9 000 launches per step for the 7B's ~550 trained tensors.
//! `fused_update` makes one pass per tensor on the CPU and ONE launch for all tensors on CUDA
//! (`kernels/adamw.cu`, in place), and `sum_of_squares` (the gradient norm, and the divergence
//! guard's weight norm) one launch on CUDA. Both compute each
//! element with the composite's f32 operations in its order (candle's `x * c` is `x * c + 0`),
//! so the three paths agree bit for bit.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

/// The hyper-parameters of one step (the learning rate already scheduled).
#[derive(Clone, Copy, Debug)]
pub struct StepHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// What every gradient is multiplied by first (clipping and loss-scale undoing); 1 = none.
    pub coef: f64,
}

/// One trained tensor's state for a step: the master copy (updated), its gradient, its moments
/// (replaced on the CPU, written in place on CUDA: they must not share storage with anything),
/// whether it decays, and its step count including this step.
pub struct SlotUpdate<'a> {
    pub param: &'a Var,
    pub grad: Tensor,
    pub exp_avg: &'a mut Tensor,
    pub exp_avg_sq: &'a mut Tensor,
    pub decays: bool,
    pub step: u64,
}

/// The f32 constants of one tensor, rounded from f64 as candle rounds an affine's scalars.
#[derive(Clone, Copy, Debug)]
struct TensorConsts {
    /// 1 - lr * wd, None when the tensor does not decay (or wd is 0).
    decay: Option<f32>,
    /// -lr / (1 - b1^t)
    step: f32,
    /// 1 / sqrt(1 - b2^t)
    inv_bias2: f32,
}

/// The f32 constants shared by every tensor.
#[derive(Clone, Copy, Debug)]
struct SharedConsts {
    coef: Option<f32>,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    eps: f32,
}

impl SharedConsts {
    fn new(h: &StepHyper) -> Self {
        Self {
            coef: (h.coef != 1.0).then_some(h.coef as f32),
            one_minus_b1: (1.0 - h.beta1) as f32,
            b2: h.beta2 as f32,
            one_minus_b2: (1.0 - h.beta2) as f32,
            eps: h.eps as f32,
        }
    }
}

impl TensorConsts {
    fn new(h: &StepHyper, decays: bool, step: u64) -> Self {
        let t = step as i32;
        let bias1 = 1.0 - h.beta1.powi(t);
        let bias2_sqrt = (1.0 - h.beta2.powi(t)).sqrt();
        Self {
            decay: (decays && h.weight_decay != 0.0).then_some((1.0 - h.lr * h.weight_decay) as f32),
            step: (-h.lr / bias1) as f32,
            inv_bias2: (1.0 / bias2_sqrt) as f32,
        }
    }
}

/// One element, exactly as the composite computes it (Rust does not contract into FMAs).
#[inline(always)]
fn update_element(p: f32, g: f32, m: f32, v: f32, s: &SharedConsts, t: &TensorConsts) -> (f32, f32, f32) {
    let g = match s.coef {
        Some(c) => g * c + 0.0,
        None => g,
    };
    let p = match t.decay {
        Some(d) => p * d + 0.0,
        None => p,
    };
    let m = m + ((g - m) * s.one_minus_b1 + 0.0);
    let v = (v * s.b2 + 0.0) + ((g * s.one_minus_b2 + 0.0) * g);
    let denom = v.sqrt() * t.inv_bias2 + s.eps;
    (p + ((m / denom) * t.step + 0.0), m, v)
}

/// The reference: PyTorch's AdamW as candle ops (m = lerp(m, g, 1 - b1) as torch computes it;
/// v = b2 v + (1 - b2) g^2; decoupled decay first).
pub fn composite_update(slots: &mut [SlotUpdate], h: &StepHyper) -> Result<()> {
    let (b1, b2) = (h.beta1, h.beta2);
    for s in slots {
        let g = if h.coef != 1.0 { (&s.grad * h.coef)? } else { s.grad.clone() };
        let k = TensorConsts::new(h, s.decays, s.step);
        let t = s.step as i32;
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        // A detached view of the master copy (shares storage, records no graph).
        let mut p = s.param.as_tensor().detach();
        if k.decay.is_some() {
            p = (p * (1.0 - h.lr * h.weight_decay))?;
        }
        let m = (&*s.exp_avg + ((&g - &*s.exp_avg)? * (1.0 - b1))?)?;
        let v = ((&*s.exp_avg_sq * b2)? + ((&g * (1.0 - b2))? * &g)?)?;
        let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, h.eps)?;
        let p = (p + (m.div(&denom)? * (-h.lr / bias1))?)?;
        s.param.set(&p)?;
        *s.exp_avg = m;
        *s.exp_avg_sq = v;
    }
    Ok(())
}

/// Checks what the fused paths assume: f32 everywhere, one shape per slot, one device.
fn check(slots: &[SlotUpdate]) -> Result<()> {
    for s in slots {
        let dims = s.param.dims();
        for (what, t) in [("gradient", &s.grad), ("exp_avg", &*s.exp_avg), ("exp_avg_sq", &*s.exp_avg_sq)] {
            if t.dtype() != DType::F32 || t.dims() != dims {
                bail!("fused AdamW: {what} is {:?} {:?}, the parameter f32 {dims:?}", t.dtype(), t.dims());
            }
            if !t.device().same_device(s.param.device()) {
                bail!("fused AdamW: {what} on another device than its parameter");
            }
        }
    }
    Ok(())
}

/// The composite's result, in one pass per tensor on the CPU and one launch on CUDA.
pub fn fused_update(slots: &mut [SlotUpdate], h: &StepHyper) -> Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    check(slots)?;
    let shared = SharedConsts::new(h);
    match slots[0].param.device() {
        Device::Cpu => slots.iter_mut().try_for_each(|s| cpu_update(s, h, &shared)),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::update(dev, slots, h, &shared),
        _ => composite_update(slots, h),
    }
}

/// Elements per parallel task on the CPU.
const CPU_CHUNK: usize = 1 << 14;

fn cpu_update(s: &mut SlotUpdate, h: &StepHyper, shared: &SharedConsts) -> Result<()> {
    let k = TensorConsts::new(h, s.decays, s.step);
    let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let (p, g, m, v) = (host(s.param.as_tensor())?, host(&s.grad)?, host(s.exp_avg)?, host(s.exp_avg_sq)?);
    let n = p.len();
    let (mut p2, mut m2, mut v2) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    p2.par_chunks_mut(CPU_CHUNK)
        .zip(m2.par_chunks_mut(CPU_CHUNK))
        .zip(v2.par_chunks_mut(CPU_CHUNK))
        .enumerate()
        .for_each(|(c, ((po, mo), vo))| {
            let at = c * CPU_CHUNK;
            for j in 0..po.len() {
                let i = at + j;
                (po[j], mo[j], vo[j]) = update_element(p[i], g[i], m[i], v[i], shared, &k);
            }
        });
    let shape = s.param.shape().clone();
    let dev = s.param.device().clone();
    s.param.set(&Tensor::from_vec(p2, shape.clone(), &dev)?)?;
    *s.exp_avg = Tensor::from_vec(m2, shape.clone(), &dev)?;
    *s.exp_avg_sq = Tensor::from_vec(v2, shape, &dev)?;
    Ok(())
}

/// The sum of the squares of every element of `tensors` (f32, on one device): the global
/// gradient norm squared, non-finite when any element is. On CUDA one launch, squares summed in
/// f64; on the CPU per tensor in f32 (`wide`: in f64, so that no square of a finite weight
/// overflows), as the step has always computed it.
pub fn sum_of_squares(tensors: &[&Tensor], wide: bool) -> Result<f64> {
    if tensors.is_empty() {
        return Ok(0.0);
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = tensors[0].device() {
        return cuda::sum_of_squares(dev, tensors);
    }
    let dt = if wide { DType::F64 } else { DType::F32 };
    let sq = tensors.iter().map(|g| g.to_dtype(dt)?.sqr()?.sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&sq, 0)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::{adamw_blocks, adamw_multi, f32_device_ptr, sumsq_multi, AdamWScalars, AdamWTensor};
    use candle_core::{CudaDevice, Storage};

    /// A contiguous f32 tensor's device address (valid while the tensor lives).
    fn ptr(t: &Tensor) -> Result<u64> {
        if !t.is_contiguous() {
            bail!("fused AdamW: tensors must be contiguous");
        }
        let (st, l) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*st else { bail!("fused AdamW: a tensor is not on the GPU") };
        Ok(f32_device_ptr(cs, l)?)
    }

    /// The table of (parameter, gradient, moments) addresses and block ranges.
    fn table(slots: &[SlotUpdate], h: &StepHyper, grads: &[Tensor]) -> Result<Vec<AdamWTensor>> {
        let mut first_block = 0i64;
        slots
            .iter()
            .zip(grads)
            .map(|(s, g)| {
                let k = TensorConsts::new(h, s.decays, s.step);
                let n = s.param.elem_count() as i64;
                let row = AdamWTensor {
                    p: ptr(s.param.as_tensor())?,
                    g: ptr(g)?,
                    m: ptr(s.exp_avg)?,
                    v: ptr(s.exp_avg_sq)?,
                    n,
                    first_block,
                    decay: k.decay.unwrap_or(1.0),
                    step: k.step,
                    inv_bias2: k.inv_bias2,
                    apply_decay: i32::from(k.decay.is_some()),
                };
                first_block += adamw_blocks(n);
                Ok(row)
            })
            .collect()
    }

    pub(super) fn update(
        dev: &CudaDevice,
        slots: &mut [SlotUpdate],
        h: &StepHyper,
        shared: &SharedConsts,
    ) -> Result<()> {
        // Contiguous gradients, alive until the launch is queued (the stream orders the rest).
        let grads: Vec<Tensor> = slots.iter().map(|s| s.grad.contiguous()).collect::<candle_core::Result<_>>()?;
        let rows = table(slots, h, &grads)?;
        let scalars = AdamWScalars {
            coef: shared.coef.unwrap_or(1.0),
            apply_coef: i32::from(shared.coef.is_some()),
            one_minus_b1: shared.one_minus_b1,
            b2: shared.b2,
            one_minus_b2: shared.one_minus_b2,
            eps: shared.eps,
        };
        adamw_multi(dev, &rows, &scalars)?;
        Ok(())
    }

    pub(super) fn sum_of_squares(dev: &CudaDevice, grads: &[&Tensor]) -> Result<f64> {
        let grads: Vec<Tensor> = grads.iter().map(|g| g.contiguous()).collect::<candle_core::Result<_>>()?;
        let mut first_block = 0i64;
        let rows = grads
            .iter()
            .map(|g| {
                if g.dtype() != DType::F32 {
                    bail!("fused sum of squares: tensors must be f32, got {:?}", g.dtype());
                }
                let n = g.elem_count() as i64;
                let row = AdamWTensor { g: ptr(g)?, n, first_block, ..Default::default() };
                first_block += adamw_blocks(n);
                Ok(row)
            })
            .collect::<Result<Vec<_>>>()?;
        // One f64 partial per block, summed here (the read is a synchronisation).
        Ok(sumsq_multi(dev, &rows)?.iter().sum())
    }
}
