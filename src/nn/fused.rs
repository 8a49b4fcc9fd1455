//! Fused ops with their own backward. Composed from tensor ops, each of these keeps every
//! intermediate for backward; as one autograd node it keeps only its output (its inputs are kept
//! by whatever produced them) and backward recomputes what it needs from the inputs.
//!
//! - Attention softmax `softmax(scale * scores + mask)`: `nn::softmax`, re-exported here.
//! - RMS normalisation `x / sqrt(mean(x^2) + eps)` (Mistral).
//! - Affine normalisation with statistics over chosen dimensions: training BatchNorm (TinySAM)
//!   and LayerNorm (decoder, TinySAM, CLIP); frozen affine parameters get no gradient entry.
//! - The gated MLP product `silu(gate) * up` (Mistral).
//!
//! Each forward is written once over candle's `BackendStorage` operations (the composite: the
//! CPU path and the reference). The softmax, RMS normalisation and the SiLU gate also have one
//! CUDA kernel per direction (`kernels/fused.cu`, f32 math), used for CUDA tensors; the
//! `*_composite` functions keep candle's kernels on every device for the GPU check.

use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::cpu::erf::erf_f32;
use candle_core::op::{Add, Div, GeluErf, Mul, ReduceOp, Silu, Sqr, Sqrt, Sub};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::kernels::use_fused_kernel as use_kernel;

#[derive(Clone, Copy)]
struct RmsNormalize {
    eps: f64,
    /// Run the CUDA kernels (set only for contiguous CUDA tensors of a kernel dtype).
    kernel: bool,
}

/// `x / sqrt(mean(x^2) + eps)` over the last dimension in f32, cast back to `x`'s dtype.
fn rms_forward<S: BackendStorage>(eps: f64, s: &S, l: &Layout) -> candle_core::Result<(S, Shape)> {
    let shape = l.shape().clone();
    let last = shape.rank() - 1;
    let h = shape.dims()[last];
    let full = Layout::contiguous(&shape);
    let mut row_dims = shape.dims().to_vec();
    row_dims[last] = 1;
    let rows = Layout::contiguous(row_dims);
    let per_row = rows.broadcast_as(&shape)?;
    let x = s.to_dtype(l, DType::F32)?;
    let sum = x.unary_impl::<Sqr>(&full)?.reduce_op(ReduceOp::Sum, &full, &[last])?;
    let rms = sum.affine(&rows, 1.0 / h as f64, eps)?.unary_impl::<Sqrt>(&rows)?;
    let y = x.binary_impl::<Div>(&rms, &full, &per_row)?;
    Ok((y.to_dtype(&full, s.dtype())?, shape))
}

impl CustomOp1 for RmsNormalize {
    fn name(&self) -> &'static str {
        "rms-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        rms_forward(self.eps, s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if !self.kernel {
            return rms_forward(self.eps, s, l);
        }
        Ok((crate::kernels::rms_fwd(s, l, self.eps)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if self.kernel && grad.dtype() == x.dtype() {
            return Ok(Some(x.detach().apply_op2_no_bwd(&grad.contiguous()?, self)?));
        }
        // y = x * r with r = (mean(x^2) + eps)^-1/2: dx = r * (g - y * mean(g * y)).
        let x32 = x.detach().to_dtype(DType::F32)?;
        let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let y = x32.broadcast_mul(&r)?;
        let g = grad.to_dtype(DType::F32)?;
        let gy = (&g * &y)?.mean_keepdim(D::Minus1)?;
        let dx = g.broadcast_sub(&y.broadcast_mul(&gy)?)?.broadcast_mul(&r)?;
        Ok(Some(dx.to_dtype(x.dtype())?))
    }
}

/// The backward kernel, as an op of (x, output gradient).
impl CustomOp2 for RmsNormalize {
    fn name(&self) -> &'static str {
        "rms-normalize-grad"
    }

    kernel_only_forward!(two: "rms-normalize-grad", |op: &Self, (x, xl), (g, gl)| -> candle_core::Result<_> {
        Ok((crate::kernels::rms_bwd(x, xl, g, gl, op.eps)?, Layout::shape(xl).clone()))
    });
}

/// RMS normalisation over the last dimension, in f32, returned in `x`'s dtype (HF Mistral's
/// `RMSNorm` before its weight). One kernel per direction on CUDA.
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if use_kernel(x) {
        return Ok(x.contiguous()?.apply_op1(RmsNormalize { eps, kernel: true })?);
    }
    rms_normalize_composite(x, eps)
}

/// `rms_normalize` through candle's kernels on every device (the CPU path; the reference the
/// CUDA kernels are checked and timed against).
pub fn rms_normalize_composite(x: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.apply_op1(RmsNormalize { eps, kernel: false })?)
}

/// Where a reduction over `dims` (sorted, deduplicated) of a tensor of dimensions `d` splits:
/// the trailing run `dims[k..]` covers the last dimensions, `dims[..k]` the rest. For a
/// non-empty run, also the shape with the run merged into one dimension (reduced at axis `k`'s
/// position `dims[k]`) and the shape after reducing it (size 1 along the run).
struct TrailingRun {
    k: usize,
    merged: Option<(Vec<usize>, usize, Vec<usize>)>,
}

fn trailing_run(d: &[usize], dims: &[usize]) -> TrailingRun {
    let mut k = dims.len();
    while k > 0 && dims[k - 1] == d.len() - (dims.len() - k) - 1 {
        k -= 1;
    }
    let merged = (k < dims.len()).then(|| {
        let lead = &d[..dims[k]];
        let merged: Vec<usize> = lead.iter().copied().chain([d[dims[k]..].iter().product()]).collect();
        let mut partial = d.to_vec();
        dims[k..].iter().for_each(|&i| partial[i] = 1);
        (merged, lead.len(), partial)
    });
    TrailingRun { k, merged }
}

/// Sum over `dims` of a contiguous `shape`, kept as size-1 dimensions. Candle's CPU reduction
/// is vectorised only over trailing dimensions; over leading or middle ones it does index
/// arithmetic per element, 10x slower (BatchNorm's (N, H, W) of an (N, C, H, W) map was a
/// third of a tiny training step). So the trailing run is reduced first as one merged
/// dimension, then the rest on the much smaller result.
fn reduce_sum_keepdim<S: BackendStorage>(s: &S, shape: &Shape, dims: &[usize]) -> candle_core::Result<S> {
    let TrailingRun { k, merged } = trailing_run(shape.dims(), dims);
    let Some((merged, axis, partial)) = merged else {
        return s.reduce_op(ReduceOp::Sum, &Layout::contiguous(shape), dims);
    };
    let s = s.reduce_op(ReduceOp::Sum, &Layout::contiguous(merged), &[axis])?;
    if k == 0 {
        return Ok(s);
    }
    s.reduce_op(ReduceOp::Sum, &Layout::contiguous(partial), &dims[..k])
}

/// `t.sum_keepdim(dims)` on fast paths; differentiable. A trailing run of `dims` is one
/// vectorised reduction of the merged dimensions (see [`reduce_sum_keepdim`]); a leading run
/// (a bias gradient summed over batch and tokens) is a matmul with a row of ones; anything
/// else falls back to candle.
pub fn sum_keepdims(t: &Tensor, dims: &[usize]) -> candle_core::Result<Tensor> {
    let mut dims = dims.to_vec();
    dims.sort_unstable();
    dims.dedup();
    let TrailingRun { k, merged } = trailing_run(t.dims(), &dims);
    let t = match merged {
        Some((merged, axis, partial)) => t.reshape(merged)?.sum_keepdim(axis)?.reshape(partial)?,
        None => t.clone(),
    };
    let rest = &dims[..k];
    if rest.is_empty() {
        return Ok(t);
    }
    if rest.iter().enumerate().all(|(i, &v)| i == v) {
        let dt = t.dims().to_vec();
        let (p, r): (usize, usize) = (dt[..k].iter().product(), dt[k..].iter().product());
        // Half-precision inputs sum in f32 (a matmul would accumulate in their dtype on CPU).
        let acc = if t.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let ones = Tensor::ones((1, p), acc, t.device())?;
        let mut out = dt.clone();
        out[..k].iter_mut().for_each(|v| *v = 1);
        return ones.matmul(&t.reshape((p, r))?.to_dtype(acc)?)?.reshape(out)?.to_dtype(t.dtype());
    }
    t.sum_keepdim(rest)
}

/// `t.mean_keepdim(dims)` on candle's fast path.
pub fn mean_keepdims(t: &Tensor, dims: &[usize]) -> candle_core::Result<Tensor> {
    let n: usize = dims.iter().map(|&d| t.dims()[d]).product();
    sum_keepdims(t, dims)? / n as f64
}

struct AffineNorm {
    eps: f64,
    /// Dimensions the statistics are taken over (BatchNorm: N, H, W; LayerNorm: the last).
    reduce: Vec<usize>,
}

/// `(x - mean) / sqrt(var + eps) * w + b` computed in f32 with the mean and (biased) variance
/// over `reduce`, returned in `x`'s dtype; `w` and `b` have `x`'s rank and broadcast to it.
/// The op keeps only its input for backward (which recomputes the statistics, as PyTorch's
/// BatchNorm keeps its input): in half precision nothing f32 outlives the op.
fn affine_norm_forward<S: BackendStorage>(
    eps: f64,
    reduce: &[usize],
    (x, xl): (&S, &Layout),
    (w, wl): (&S, &Layout),
    (b, bl): (&S, &Layout),
) -> candle_core::Result<(S, Shape)> {
    let shape = xl.shape().clone();
    let out_dtype = x.dtype();
    let count: usize = reduce.iter().map(|&d| shape.dims()[d]).product();
    let full = Layout::contiguous(&shape);
    let mut stat_dims = shape.dims().to_vec();
    reduce.iter().for_each(|&d| stat_dims[d] = 1);
    let stats = Layout::contiguous(stat_dims);
    let per_stat = stats.broadcast_as(&shape)?;
    let x = x.to_dtype(xl, DType::F32)?;
    let mean = reduce_sum_keepdim(&x, &shape, reduce)?.affine(&stats, 1.0 / count as f64, 0.0)?;
    let xc = x.binary_impl::<Sub>(&mean, &full, &per_stat)?;
    let var = reduce_sum_keepdim(&xc.unary_impl::<Sqr>(&full)?, &shape, reduce)?;
    let std = var.affine(&stats, 1.0 / count as f64, eps)?.unary_impl::<Sqrt>(&stats)?;
    let xhat = xc.binary_impl::<Div>(&std, &full, &per_stat)?;
    let param = |(p, pl): (&S, &Layout)| -> candle_core::Result<(S, Layout)> {
        Ok((p.to_dtype(pl, DType::F32)?, Layout::contiguous(pl.shape()).broadcast_as(&shape)?))
    };
    let ((w, wl), (b, bl)) = (param((w, wl))?, param((b, bl))?);
    let y = xhat.binary_impl::<Mul>(&w, &full, &wl)?.binary_impl::<Add>(&b, &full, &bl)?;
    let y = if out_dtype == DType::F32 { y } else { y.to_dtype(&full, out_dtype)? };
    Ok((y, shape))
}

impl CustomOp3 for AffineNorm {
    fn name(&self) -> &'static str {
        "affine-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        affine_norm_forward(self.eps, &self.reduce, (x, xl), (w, wl), (b, bl))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        affine_norm_forward(self.eps, &self.reduce, (x, xl), (w, wl), (b, bl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Recompute the statistics from x. Over the statistics' dimensions (n values), with
        // xc = x - mean and x_hat = xc * rstd:
        // dx = rstd * (g' - mean(g') - x_hat * mean(g' * x_hat)), g' = g * w, and
        // dgamma / dbeta sum g * x_hat / g over the dimensions the parameters broadcast along.
        let red = self.reduce.clone();
        let x = x.detach().to_dtype(DType::F32)?;
        let xc = x.broadcast_sub(&mean_keepdims(&x, &red)?)?;
        drop(x);
        let rstd = mean_keepdims(&xc.sqr()?, &red)?.affine(1.0, self.eps)?.sqrt()?.recip()?;
        let g = grad.to_dtype(DType::F32)?;
        let w32 = w.detach().to_dtype(DType::F32)?;
        let param_sum = |t: Tensor, p: &Tensor| -> candle_core::Result<Tensor> {
            let along: Vec<usize> = (0..t.rank()).filter(|&d| p.dims()[d] == 1 && t.dims()[d] != 1).collect();
            sum_keepdims(&t, &along)?.to_dtype(p.dtype())
        };
        let db = b.track_op().then(|| param_sum(g.clone(), b)).transpose()?;
        if red.iter().all(|&d| w.dims()[d] == 1) {
            // BatchNorm: w is constant over the statistics' dimensions, so the means factor
            // into per-statistic coefficients and dx = A g + B xc + C: A = w rstd,
            // B = -w rstd^3 mean(g xc), C = -w rstd mean(g). Two map-sized temporaries at a time
            // besides xc, instead of the general form's half dozen.
            let n: usize = red.iter().map(|&d| xc.dims()[d]).product();
            let sum_gxc = sum_keepdims(&(&g * &xc)?, &red)?;
            let mean_g = mean_keepdims(&g, &red)?;
            let a = w32.broadcast_mul(&rstd)?;
            let b_coef = (a.broadcast_mul(&rstd.sqr()?)?.broadcast_mul(&sum_gxc)? * (-1.0 / n as f64))?;
            let c = (a.broadcast_mul(&mean_g)? * -1.0)?;
            let dx = g.broadcast_mul(&a)?.broadcast_add(&c)?;
            drop(g);
            let dx = (dx + xc.broadcast_mul(&b_coef)?)?.to_dtype(grad.dtype())?;
            // sum(g x_hat) = rstd sum(g xc), per statistic; summed further where w also
            // broadcasts along a dimension the statistics keep.
            let dw = w.track_op().then(|| param_sum(sum_gxc.broadcast_mul(&rstd)?, w)).transpose()?;
            return Ok((Some(dx), dw, db));
        }
        let xhat = xc.broadcast_mul(&rstd)?;
        drop(xc);
        let gw = g.broadcast_mul(&w32)?; // gradient with respect to x_hat
        let inner = gw
            .broadcast_sub(&mean_keepdims(&gw, &red)?)?
            .broadcast_sub(&xhat.broadcast_mul(&mean_keepdims(&(&gw * &xhat)?, &red)?)?)?;
        let dx = inner.broadcast_mul(&rstd)?.to_dtype(grad.dtype())?;
        // Frozen (untracked) affine parameters get no gradient entry.
        let dw = w.track_op().then(|| param_sum((&g * &xhat)?, w)).transpose()?;
        Ok((Some(dx), dw, db))
    }
}

/// Training-mode BatchNorm of `x` (N, C, H, W) with batch statistics computed in f32, the
/// output in `x`'s dtype; `w` and `b` (1, C, 1, 1). Keeps only its input for backward (which
/// its producer keeps anyway).
pub fn batch_norm_train(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(1)?;
    ensure!(
        w.dims() == [1, c, 1, 1] && b.dims() == [1, c, 1, 1],
        "batchnorm: weight {:?} / bias {:?} for {c} channels",
        w.dims(),
        b.dims()
    );
    ensure!(x.elem_count() > c, "batchnorm: training needs more than one value per channel");
    let op = AffineNorm { eps, reduce: vec![0, 2, 3] };
    Ok(x.apply_op3(&w.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?, op)?)
}

/// LayerNorm over the last dimension of `x`, statistics in f32, the output in `x`'s dtype, with
/// `w` and `b` of that dimension's size. Keeps only its input for backward.
pub fn layer_norm_fused(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(D::Minus1)?;
    ensure!(
        w.elem_count() == h && b.elem_count() == h,
        "layernorm: weight {:?} / bias {:?} for width {h}",
        w.dims(),
        b.dims()
    );
    let mut dims = vec![1; x.rank()];
    dims[x.rank() - 1] = h;
    let op = AffineNorm { eps, reduce: vec![x.rank() - 1] };
    let (w, b) = (w.to_dtype(DType::F32)?.reshape(dims.clone())?, b.to_dtype(DType::F32)?.reshape(dims)?);
    Ok(x.apply_op3(&w, &b, op)?)
}

#[derive(Clone, Copy)]
struct SiluMul {
    /// Run the CUDA kernels (set only for contiguous CUDA tensors of a kernel dtype).
    kernel: bool,
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        silu_mul_forward((g, gl), (u, ul))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if !self.kernel {
            return silu_mul_forward((g, gl), (u, ul));
        }
        Ok((crate::kernels::silu_mul_fwd(g, gl, u, ul)?, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.kernel && grad.dtype() == gate.dtype() {
            // One (2, ...) result: d_gate, then d_up; both halves are views.
            let both = gate.detach().apply_op3_no_bwd(&up.detach(), &grad.contiguous()?, self)?;
            return Ok((Some(both.get(0)?), Some(both.get(1)?)));
        }
        // silu(a) = a * s(a); silu'(a) = s(a) * (1 + a * (1 - s(a))), computed in f32.
        let a = gate.detach().to_dtype(DType::F32)?;
        let sig = candle_nn::ops::sigmoid(&a)?;
        let silu = (&a * &sig)?;
        let dsilu = (&sig * ((&a * (1.0 - &sig)?)? + 1.0)?)?;
        let g = grad.to_dtype(DType::F32)?;
        let u = up.detach().to_dtype(DType::F32)?;
        let d_gate = (&g * u)?.mul(&dsilu)?.to_dtype(gate.dtype())?;
        let d_up = (g * silu)?.to_dtype(up.dtype())?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// The backward kernel, as an op of (gate, up, output gradient) -> (2, ...).
impl CustomOp3 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul-grad"
    }

    kernel_only_forward!(three: "silu-mul-grad", |_: &Self, (a, al), (u, ul), (g, gl)| -> candle_core::Result<_> {
        let mut dims = vec![2];
        dims.extend_from_slice(Layout::dims(al));
        Ok((crate::kernels::silu_mul_bwd(a, al, u, ul, g, gl)?, Shape::from(dims)))
    });
}

fn silu_mul_forward<S: BackendStorage>(
    (g, gl): (&S, &Layout),
    (u, ul): (&S, &Layout),
) -> candle_core::Result<(S, Shape)> {
    let shape = gl.shape().clone();
    let full = Layout::contiguous(&shape);
    let out = g.unary_impl::<Silu>(gl)?.binary_impl::<Mul>(u, &full, ul)?;
    Ok((out, shape))
}

/// `silu(gate) * up` (Mistral's gated MLP) as one node: keeps the product only, its backward
/// recomputes the activation from `gate`. One kernel per direction on CUDA (math in f32).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    silu_mul_impl(gate, up, true)
}

/// `silu_mul` through candle's kernels on every device (the CPU path; the reference the CUDA
/// kernels are checked and timed against).
pub fn silu_mul_composite(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    silu_mul_impl(gate, up, false)
}

fn silu_mul_impl(gate: &Tensor, up: &Tensor, allow_kernel: bool) -> Result<Tensor> {
    ensure!(
        gate.dims() == up.dims() && gate.dtype() == up.dtype(),
        "silu_mul: gate {:?} {:?} vs up {:?} {:?}",
        gate.dims(),
        gate.dtype(),
        up.dims(),
        up.dtype()
    );
    if allow_kernel && use_kernel(gate) {
        return Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul { kernel: true })?);
    }
    Ok(gate.apply_op2(up, SiluMul { kernel: false })?)
}

/// GELU (erf form) whose backward leaves no autograd history. candle's backward of `gelu_erf`
/// builds the derivative from tracked ops on the input, so the gradient it passes on keeps
/// about ten input-sized temporaries alive as history: in a TinySAM MBConv block that was the
/// largest part of the backward's working set (`examples/peak_probe`, session 12). Forward:
/// candle's kernel. Backward: one pass (a CUDA kernel; on the CPU in f32 candle's formula op
/// for op, so bit for bit its values), else candle's formula on untracked tensors.
#[derive(Clone, Copy)]
struct GeluErfOp {
    kernel: bool,
}

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    same_forward_on_every_backend!(|_: &Self, s, l: &Layout| -> candle_core::Result<_> {
        Ok((BackendStorage::unary_impl::<GeluErf>(s, l)?, l.shape().clone()))
    });

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (x, grad) = (x.detach(), grad.detach());
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && grad.dtype() == DType::F32;
        if (self.kernel && grad.dtype() == x.dtype()) || cpu_f32 {
            return Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, self)?));
        }
        // d/dx gelu_erf(x) = 0.5 + 0.398942 e^(-x^2/2) x + 0.5 erf(x/sqrt(2)), as candle writes it.
        let neg_half_square = (x.sqr()?.neg()? / 2.)?;
        let scaled_exp_arg = (0.398942 * neg_half_square.exp()? * &x)?;
        let erf_scaled_sqrt = (0.5 * (&x / 2f64.sqrt())?.erf()?)?;
        let derivative = (0.5 + scaled_exp_arg + erf_scaled_sqrt)?;
        Ok(Some((grad * derivative)?))
    }
}

/// The backward as one pass, an op of (input, output gradient) -> input gradient: the CUDA
/// kernel, or on the CPU (f32) candle's formula op for op in one loop, so that it equals
/// candle's composite bit for bit.
impl CustomOp2 for GeluErfOp {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((x0, x1)), Some((g0, g1))) = (xl.contiguous_offsets(), gl.contiguous_offsets()) else {
            candle_core::bail!("gelu-erf-grad: inputs must be contiguous")
        };
        let (xs, gs) = (&x.as_slice::<f32>()?[x0..x1], &g.as_slice::<f32>()?[g0..g1]);
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(1 << 14).zip(xs.par_chunks(1 << 14).zip(gs.par_chunks(1 << 14))).for_each(|(d, (x, g))| {
            for ((d, &v), &g) in d.iter_mut().zip(x).zip(g) {
                // candle's affine is `v * mul + add`; `t / c` is affine(1 / c, 0), `c + t` affine(1, c).
                let neg_half_square = -(v * v) * 0.5 + 0.0;
                let scaled_exp_arg = (neg_half_square.exp() * 0.398942 + 0.0) * v;
                let erf_scaled_sqrt = erf_f32(v * (1.0 / 2f64.sqrt()) as f32 + 0.0) * 0.5 + 0.0;
                *d = g * ((scaled_exp_arg * 1.0 + 0.5) + erf_scaled_sqrt);
            }
        });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::kernels::gelu_erf_bwd(x, xl, g, gl)?, xl.shape().clone()))
    }
}

/// `gelu_erf(x)` (PyTorch's exact GELU). For a tracked input one node whose backward returns an
/// untracked gradient (one kernel on CUDA); untracked inputs take candle's op as is.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(x.gelu_erf()?);
    }
    let kernel = use_kernel(x);
    let x = if kernel { x.contiguous()? } else { x.clone() };
    Ok(x.apply_op1(GeluErfOp { kernel })?)
}
