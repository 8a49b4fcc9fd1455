//! The attention softmax `softmax(scale * scores + mask)` over the last dimension, in f32,
//! returned in the scores' dtype, as one autograd node keeping only its output.
//! Composed, the scaled and masked copies, the f32 cast, the exponentials and the f32 result
//! cost about 24 bytes per score in bf16, half of the 7B model's predicted LLM activations.
//! Backward needs the output alone: `dx = scale * p * (g - sum(g * p))`.
//!
//! Two implementations of the same function:
//! - the composite, candle's own kernels over `BackendStorage` (about 9 launches forward), the
//!   CPU path and the reference;
//! - on CUDA, one kernel per direction (`kernels/fused.cu`) that also computes causal masking
//!   from indices, so no causal mask tensor exists. The composite materialises that mask
//!   (`causal_mask`), with the values the kernel adds, so both paths compute the same thing.

use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Div, Exp, ReduceOp, Sub};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use half::{bf16, f16};

use crate::kernels::{cuda_only, use_fused_kernel as use_kernel, CausalFill};

#[derive(Clone, Copy, Debug)]
struct MaskedSoftmax {
    scale: f64,
    /// Causal masking computed by the kernel (only with `kernel`).
    causal: Option<CausalFill>,
    /// Run the CUDA kernel (set only for CUDA tensors of a kernel dtype, feature `cuda`).
    kernel: bool,
}

/// The composite forward on one backend: `mask`, when present, broadcasts to the scores' shape.
fn softmax_forward<S: BackendStorage>(
    scale: f64,
    s: &S,
    l: &Layout,
    mask: Option<(&S, &Layout)>,
) -> candle_core::Result<(S, Shape)> {
    let shape = l.shape().clone();
    let last = shape.rank() - 1;
    let full = Layout::contiguous(&shape);
    let mut x = s.to_dtype(l, DType::F32)?;
    if scale != 1.0 {
        x = x.affine(&full, scale, 0.0)?;
    }
    if let Some((m, ml)) = mask {
        let m = m.to_dtype(ml, DType::F32)?;
        let ml = Layout::contiguous(ml.shape()).broadcast_as(&shape)?;
        x = x.binary_impl::<Add>(&m, &full, &ml)?;
    }
    let mut row_dims = shape.dims().to_vec();
    row_dims[last] = 1;
    let per_row = Layout::contiguous(row_dims).broadcast_as(&shape)?;
    // Subtracting the row maximum keeps exp finite; it cancels in the ratio.
    let max = x.reduce_op(ReduceOp::Max, &full, &[last])?;
    let e = x.binary_impl::<Sub>(&max, &full, &per_row)?.unary_impl::<Exp>(&full)?;
    let sum = e.reduce_op(ReduceOp::Sum, &full, &[last])?;
    let p = e.binary_impl::<Div>(&sum, &full, &per_row)?;
    Ok((p.to_dtype(&full, s.dtype())?, shape))
}

/// Gradient with respect to the scores, from the output `p` and its gradient `g`.
fn softmax_backward(op: &MaskedSoftmax, scores: &Tensor, p: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    if op.kernel && g.dtype() == p.dtype() {
        return p.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad { scale: op.scale });
    }
    let p = p.detach().to_dtype(DType::F32)?;
    let g = g.to_dtype(DType::F32)?;
    let dot = (&g * &p)?.sum_keepdim(D::Minus1)?;
    let dx = (g.broadcast_sub(&dot)? * p)?;
    let dx = if op.scale != 1.0 { (dx * op.scale)? } else { dx };
    dx.to_dtype(scores.dtype())
}

impl MaskedSoftmax {
    fn composite_only(&self) -> candle_core::Result<()> {
        if self.kernel || self.causal.is_some() {
            return cuda_only("scaled-softmax");
        }
        Ok(())
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.composite_only()?;
        softmax_forward(self.scale, s, l, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if !self.kernel {
            return softmax_forward(self.scale, s, l, None);
        }
        Ok((crate::kernels::softmax_fwd(s, l, None, self.scale as f32, self.causal)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(softmax_backward(self, x, res, grad)?))
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.composite_only()?;
        softmax_forward(self.scale, s, l, Some((m, ml)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if !self.kernel {
            return softmax_forward(self.scale, s, l, Some((m, ml)));
        }
        let y = crate::kernels::softmax_fwd(s, l, Some((m, ml)), self.scale as f32, self.causal)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The mask is a constant: no gradient.
        Ok((Some(softmax_backward(self, x, res, grad)?), None))
    }
}

/// The backward kernel as an op of (output, output gradient); only built for CUDA tensors.
struct SoftmaxGrad {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    scale: f64,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "scaled-softmax-grad"
    }

    kernel_only_forward!(two: "scaled-softmax-grad", |op: &Self, (p, pl), (g, gl)| -> candle_core::Result<_> {
        Ok((crate::kernels::softmax_bwd(p, pl, g, gl, op.scale as f32)?, Layout::shape(pl).clone()))
    });
}

/// The additive value of a causally hidden key: `mask_min(F32)` as `Mistral`'s mask stores it
/// in `dt` (a large negative; -inf in f16).
pub fn causal_fill(dt: DType) -> f32 {
    let v = mask_min(DType::F32) as f32;
    match dt {
        DType::BF16 => bf16::from_f32(v).to_f32(),
        DType::F16 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// The mask the kernel computes from indices, as a tensor in `dt`: `mask` (or 0) where key
/// `j <= i + past` for query `i` (the scores' second-to-last index), `fill` elsewhere. Its
/// shape is the broadcast of the mask's and (..., 1, Q, K).
fn causal_mask(scores: &Tensor, mask: Option<&Tensor>, past: usize, dt: DType, fill: f32) -> Result<Tensor> {
    let r = scores.rank();
    let (q, k) = (scores.dim(r - 2)?, scores.dim(r - 1)?);
    let dev = scores.device();
    let allowed: Vec<u8> = (0..q).flat_map(|i| (0..k).map(move |j| u8::from(j <= i + past))).collect();
    let mut dims = vec![1; r];
    dims[r - 2..].copy_from_slice(&[q, k]);
    let allowed = Tensor::from_vec(allowed, dims.clone(), dev)?;
    let shape = match mask {
        Some(m) => m.shape().broadcast_shape_binary_op(&Shape::from(dims), "causal mask")?,
        None => Shape::from(dims),
    };
    let keep = match mask {
        Some(m) => m.broadcast_as(&shape)?,
        None => Tensor::zeros((), dt, dev)?.broadcast_as(&shape)?,
    };
    let hidden = Tensor::new(fill, dev)?.to_dtype(dt)?.broadcast_as(&shape)?;
    Ok(allowed.broadcast_as(&shape)?.where_cond(&keep, &hidden)?)
}

fn softmax_impl(
    scores: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    causal_past: Option<usize>,
    allow_kernel: bool,
) -> Result<Tensor> {
    ensure!(causal_past.is_none() || scores.rank() >= 2, "causal softmax of scores {:?}", scores.dims());
    // The mask gets the scores' rank (leading size-1 dimensions); the op checks that it broadcasts.
    let mask = match mask {
        None => None,
        Some(m) => {
            ensure!(
                m.rank() <= scores.rank(),
                "mask {:?} has more dimensions than scores {:?}",
                m.dims(),
                scores.dims()
            );
            let mut dims = vec![1; scores.rank() - m.rank()];
            dims.extend_from_slice(m.dims());
            Some(m.reshape(dims)?.contiguous()?.detach())
        }
    };
    let fill = causal_fill(mask.as_ref().map_or(scores.dtype(), |m| m.dtype()));
    // The kernel's mask indexing covers ranks up to 5.
    let kernel = allow_kernel && use_kernel(scores) && (mask.is_none() || scores.rank() <= 5);
    let (scores, mask, causal) = if kernel {
        (scores.contiguous()?, mask, causal_past.map(|past| CausalFill { past, fill }))
    } else {
        let mask = match causal_past {
            Some(past) => {
                let dt = mask.as_ref().map_or(scores.dtype(), |m| m.dtype());
                Some(causal_mask(scores, mask.as_ref(), past, dt, fill)?)
            }
            None => mask,
        };
        (scores.clone(), mask, None)
    };
    let op = MaskedSoftmax { scale, causal, kernel };
    Ok(match mask {
        None => scores.apply_op1(op)?,
        Some(m) => scores.apply_op2(&m, op)?,
    })
}

/// `softmax(scale * scores + mask)` over the last dimension, in f32, returned in the scores'
/// dtype. `mask` (additive, never differentiated) broadcasts to the scores' shape, its
/// trailing dimensions aligned as in numpy; every row needs at least one finite entry.
pub fn scaled_masked_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    softmax_impl(scores, scale, mask, None, true)
}

/// `scaled_masked_softmax` with causal masking on top of `mask`: query `i` (the scores' index
/// along the second-to-last dimension) sees keys `j <= i + past`; hidden keys get the additive
/// value `mask_min(F32)` rounded to the mask's dtype (the scores' without a mask). On CUDA the
/// kernel computes this from indices; elsewhere the mask is built as a tensor.
pub fn scaled_masked_softmax_causal(scores: &Tensor, scale: f64, mask: Option<&Tensor>, past: usize) -> Result<Tensor> {
    softmax_impl(scores, scale, mask, Some(past), true)
}

/// The same function through candle's kernels on every device (the reference the CUDA kernel
/// is checked and timed against).
pub fn scaled_masked_softmax_composite(
    scores: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    causal_past: Option<usize>,
) -> Result<Tensor> {
    softmax_impl(scores, scale, mask, causal_past, false)
}

/// The gradient of the scores from the softmax output `p` and its gradient `g`, as the op's
/// backward computes it: the CUDA kernel for CUDA tensors of one kernel dtype unless
/// `composite`, candle's kernels otherwise. Lets the GPU check time the backward alone.
pub fn scaled_softmax_backward(p: &Tensor, g: &Tensor, scale: f64, composite: bool) -> Result<Tensor> {
    ensure!(p.dims() == g.dims(), "softmax backward: output {:?} vs gradient {:?}", p.dims(), g.dims());
    let op = MaskedSoftmax { scale, causal: None, kernel: !composite && use_kernel(p) };
    Ok(softmax_backward(&op, p, p, g)?)
}

/// Additive mask value that survives f16 (−inf would turn fully masked rows into NaN).
pub fn mask_min(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        _ => -1e30_f32 as f64,
    }
}
