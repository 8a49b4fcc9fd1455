//! Bilinear upsampling by an integer factor with `align_corners = true` (the mask head's last
//! step, 64x64 -> 1024x1024 logits), differentiable.
//!
//! candle's `upsample_bilinear2d` has no backward, so this module provides:
//! - `MaskUpsample`, a `CustomOp1` with a CPU kernel (f32/f16/bf16 computed in f32, f64 in
//!   f64) whose backward is a second op, `MaskUpsampleGrad` (the exact adjoint, written as a
//!   gather: every low-resolution pixel sums the weighted gradients of its output footprint,
//!   so no scatter or atomics are needed). On CUDA both run `kernels/mask_upsample.cu`
//!   (`crate::kernels`), which repeats the CPU arithmetic exactly.
//! - `upsample_bilinear_ac_composite`, the same linear map as two small matmuls,
//!   Y = Ry X Rx^T, device-agnostic and differentiable through ordinary ops.
//! - `upsample_bilinear_ac_wide`, `upsample_sigmoid`, `upsample_mask`: the same upsampling with
//!   an epilogue fused into the pass (f32 logits, probabilities, a u8 mask), one op each with a
//!   CPU reference and the CUDA kernel.
//!
//! Index/weight formula, per axis, for an input size `n` and output size `m = n * f`:
//! `scale = (n - 1) / (m - 1)` (0 when `m == 1`), `src = dst * scale`, `i0 = floor(src)`,
//! `i1 = min(i0 + 1, n - 1)`, `w1 = src - i0`, `w0 = 1 - w1`; the output is
//! `wy0 (wx0 X[y0,x0] + wx1 X[y0,x1]) + wy1 (wx0 X[y1,x0] + wx1 X[y1,x1])`. Corners map to
//! corners exactly, as PyTorch's `F.interpolate(..., mode="bilinear", align_corners=True)`.

use std::ops::{Add, Mul};

use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::linear::frozen_matmul;
pub use crate::kernels::Epilogue;
use crate::kernels::{
    bwd_smem_bytes, upsample_bwd_plan, upsample_fwd_plan, UpsampleBwdPlan, UpsampleDims, UpsampleFwdPlan, BWD_MAX_TILE,
    BWD_SMEM_LIMIT,
};

/// Whether the CUDA kernels are compiled in (build.rs builds them with the `cuda` feature).
const CUDA_KERNEL_BUILT: bool = cfg!(feature = "cuda");

/// Interpolation taps of one axis, per output index.
#[derive(Clone, Debug)]
struct Taps {
    i0: Vec<usize>,
    i1: Vec<usize>,
    w1: Vec<f64>,
    /// Per input index: the contiguous range of output indices that read it.
    footprint: Vec<(usize, usize)>,
}

impl Taps {
    fn new(n_in: usize, n_out: usize) -> Self {
        let scale = if n_out > 1 { (n_in as f64 - 1.0) / (n_out as f64 - 1.0) } else { 0.0 };
        let mut i0 = Vec::with_capacity(n_out);
        let mut i1 = Vec::with_capacity(n_out);
        let mut w1 = Vec::with_capacity(n_out);
        for d in 0..n_out {
            let src = d as f64 * scale;
            let lo = (src.floor() as usize).min(n_in - 1);
            i0.push(lo);
            i1.push((lo + 1).min(n_in - 1));
            w1.push(src - lo as f64);
        }
        // i0 and i1 are non-decreasing, so {d : i0[d] == s or i1[d] == s} is one range.
        let footprint = (0..n_in)
            .map(|s| {
                let start = i1.partition_point(|&v| v < s);
                let end = i0.partition_point(|&v| v <= s);
                (start, end.max(start))
            })
            .collect();
        Self { i0, i1, w1, footprint }
    }

    /// Weight of input index `s` in output index `d` (both taps may coincide at the edge).
    fn weight(&self, d: usize, s: usize) -> f64 {
        let mut w = 0.0;
        if self.i0[d] == s {
            w += 1.0 - self.w1[d];
        }
        if self.i1[d] == s {
            w += self.w1[d];
        }
        w
    }

    /// Dense (n_out, n_in) interpolation matrix, row-major.
    fn matrix(&self, n_in: usize) -> Vec<f64> {
        let n_out = self.i0.len();
        let mut m = vec![0.0; n_out * n_in];
        for d in 0..n_out {
            m[d * n_in + self.i0[d]] += 1.0 - self.w1[d];
            m[d * n_in + self.i1[d]] += self.w1[d];
        }
        m
    }
}

/// Accumulation type of the CPU kernels.
trait Real: Copy + Send + Sync + Add<Output = Self> + Mul<Output = Self> {
    const ZERO: Self;
    fn of(v: f64) -> Self;
}
impl Real for f32 {
    const ZERO: Self = 0.0;
    fn of(v: f64) -> Self {
        v as f32
    }
}
impl Real for f64 {
    const ZERO: Self = 0.0;
    fn of(v: f64) -> Self {
        v
    }
}

/// Plane geometry: `planes` = B*C low-res (h, w) images, upsampled by `f`.
#[derive(Clone, Copy, Debug)]
struct Geom {
    planes: usize,
    h: usize,
    w: usize,
    f: usize,
}

impl Geom {
    fn ho(&self) -> usize {
        self.h * self.f
    }
    fn wo(&self) -> usize {
        self.w * self.f
    }
}

impl Geom {
    fn dims(&self) -> UpsampleDims {
        UpsampleDims { planes: self.planes, h: self.h, w: self.w, factor: self.f }
    }

    /// The backward kernel's launches. Its tile (low-res columns per block) is the widest up to
    /// `BWD_MAX_TILE` whose column sums fit a block's shared memory, from the CPU taps; None
    /// when not even one column's do.
    fn grad_plan(&self, dtype: DType) -> candle_core::Result<Option<UpsampleBwdPlan>> {
        let fp = Taps::new(self.w, self.wo()).footprint;
        let mut tile = self.w.min(BWD_MAX_TILE);
        loop {
            let span = fp.chunks(tile).map(|t| t[t.len() - 1].1 - t[0].0).max().unwrap_or(0);
            if bwd_smem_bytes(dtype, span) <= BWD_SMEM_LIMIT {
                return upsample_bwd_plan(self.dims(), dtype, tile, span).map(Some);
            }
            if tile == 1 {
                return Ok(None);
            }
            tile /= 2;
        }
    }
}

/// The CUDA launches of the upsampling kernels for a (b, c, h, w) input upsampled by `factor`,
/// exactly as a GPU gets them: the forward's with `epilogue`, and the backward's (None where
/// the composite takes over). The kernels' CPU emulation (`tests/kernel_emu`) runs these.
pub fn kernel_plans(
    (b, c, h, w): (usize, usize, usize, usize),
    factor: usize,
    dtype: DType,
    epilogue: Epilogue,
) -> Result<(UpsampleFwdPlan, Option<UpsampleBwdPlan>)> {
    let g = Geom { planes: b * c, h, w, f: factor };
    Ok((upsample_fwd_plan(g.dims(), dtype, epilogue)?, g.grad_plan(dtype)?))
}

fn upsample_kernel<T: Real>(src: &[T], g: Geom) -> Vec<T> {
    let (h, w, ho, wo) = (g.h, g.w, g.ho(), g.wo());
    let ty = Taps::new(h, ho);
    let tx = Taps::new(w, wo);
    let (wx0, wx1): (Vec<T>, Vec<T>) = tx.w1.iter().map(|&b| (T::of(1.0 - b), T::of(b))).unzip();
    let mut dst = vec![T::ZERO; g.planes * ho * wo];
    dst.par_chunks_mut(wo).enumerate().for_each(|(r, out)| {
        let (p, oy) = (r / ho, r % ho);
        let plane = &src[p * h * w..(p + 1) * h * w];
        let r0 = &plane[ty.i0[oy] * w..(ty.i0[oy] + 1) * w];
        let r1 = &plane[ty.i1[oy] * w..(ty.i1[oy] + 1) * w];
        let (a0, a1) = (T::of(1.0 - ty.w1[oy]), T::of(ty.w1[oy]));
        for ox in 0..wo {
            let (x0, x1) = (tx.i0[ox], tx.i1[ox]);
            let top = wx0[ox] * r0[x0] + wx1[ox] * r0[x1];
            let bot = wx0[ox] * r1[x0] + wx1[ox] * r1[x1];
            out[ox] = a0 * top + a1 * bot;
        }
    });
    dst
}

/// The adjoint: `grad` (planes, h*f, w*f) -> (planes, h, w). One low-res row at a time: first
/// the vertical gather into a full-width scratch row, then the horizontal gather.
fn upsample_grad_kernel<T: Real>(grad: &[T], g: Geom) -> Vec<T> {
    let (h, w, ho, wo) = (g.h, g.w, g.ho(), g.wo());
    let ty = Taps::new(h, ho);
    let tx = Taps::new(w, wo);
    let mut dst = vec![T::ZERO; g.planes * h * w];
    dst.par_chunks_mut(w).enumerate().for_each_init(
        || vec![T::ZERO; wo],
        |row, (r, out)| {
            let (p, y) = (r / h, r % h);
            let plane = &grad[p * ho * wo..(p + 1) * ho * wo];
            row.iter_mut().for_each(|v| *v = T::ZERO);
            let (s, e) = ty.footprint[y];
            for oy in s..e {
                let wy = T::of(ty.weight(oy, y));
                let gr = &plane[oy * wo..(oy + 1) * wo];
                for (acc, &v) in row.iter_mut().zip(gr) {
                    *acc = *acc + wy * v;
                }
            }
            for (x, o) in out.iter_mut().enumerate() {
                let (s, e) = tx.footprint[x];
                let mut acc = T::ZERO;
                for (ox, &r) in (s..e).zip(&row[s..e]) {
                    acc = acc + T::of(tx.weight(ox, x)) * r;
                }
                *o = acc;
            }
        },
    );
    dst
}

/// Runs `k` on a contiguous CPU storage, in f32 for the half types.
fn run_cpu(
    s: &CpuStorage,
    l: &Layout,
    g: Geom,
    k32: fn(&[f32], Geom) -> Vec<f32>,
    k64: fn(&[f64], Geom) -> Vec<f64>,
) -> candle_core::Result<CpuStorage> {
    let Some((o0, o1)) = l.contiguous_offsets() else { candle_core::bail!("mask upsample: input must be contiguous") };
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(k32(&v[o0..o1], g)),
        CpuStorage::F64(v) => CpuStorage::F64(k64(&v[o0..o1], g)),
        CpuStorage::F16(v) => {
            let x: Vec<f32> = v[o0..o1].par_iter().map(|v| v.to_f32()).collect();
            CpuStorage::F16(k32(&x, g).into_par_iter().map(f16::from_f32).collect())
        }
        CpuStorage::BF16(v) => {
            let x: Vec<f32> = v[o0..o1].par_iter().map(|v| v.to_f32()).collect();
            CpuStorage::BF16(k32(&x, g).into_par_iter().map(bf16::from_f32).collect())
        }
        other => candle_core::bail!("mask upsample: unsupported dtype {:?}", other.dtype()),
    })
}

/// Forward op: (B, C, H, W) -> (B, C, H*f, W*f).
#[derive(Clone, Copy, Debug)]
pub struct MaskUpsample {
    pub factor: usize,
}

impl MaskUpsample {
    fn geom(&self, l: &Layout) -> candle_core::Result<Geom> {
        let (b, c, h, w) = l.shape().dims4()?;
        Ok(Geom { planes: b * c, h, w, f: self.factor })
    }
}

impl CustomOp1 for MaskUpsample {
    fn name(&self) -> &'static str {
        "mask-upsample-bilinear-ac"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geom(l)?;
        let (b, c, _, _) = l.shape().dims4()?;
        let out = run_cpu(s, l, g, upsample_kernel::<f32>, upsample_kernel::<f64>)?;
        Ok((out, Shape::from((b, c, g.ho(), g.wo()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        // On the GPU the plain upsampling is the logits epilogue of the fused kernel.
        MaskUpsampleEpilogue { factor: self.factor, epilogue: Epilogue::Logits }.cuda_fwd(s, l)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        upsample_bilinear_ac_backward(grad, self.factor).map(Some).map_err(candle_core::Error::wrap)
    }
}

/// Backward op (the adjoint): (B, C, H*f, W*f) -> (B, C, H, W). Its own backward is the
/// forward upsampling, so second derivatives work too.
#[derive(Clone, Copy, Debug)]
pub struct MaskUpsampleGrad {
    pub factor: usize,
}

impl MaskUpsampleGrad {
    fn geom(&self, l: &Layout) -> candle_core::Result<Geom> {
        let (b, c, ho, wo) = l.shape().dims4()?;
        if ho % self.factor != 0 || wo % self.factor != 0 {
            candle_core::bail!("mask upsample grad: {ho}x{wo} is not a multiple of factor {}", self.factor);
        }
        Ok(Geom { planes: b * c, h: ho / self.factor, w: wo / self.factor, f: self.factor })
    }
}

impl CustomOp1 for MaskUpsampleGrad {
    fn name(&self) -> &'static str {
        "mask-upsample-bilinear-ac-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geom(l)?;
        let (b, c, _, _) = l.shape().dims4()?;
        let out = run_cpu(s, l, g, upsample_grad_kernel::<f32>, upsample_grad_kernel::<f64>)?;
        Ok((out, Shape::from((b, c, g.h, g.w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let g = self.geom(l)?;
        let (b, c, _, _) = l.shape().dims4()?;
        let Some(plan) = g.grad_plan(s.dtype())? else {
            candle_core::bail!("mask upsample grad kernel: factor {} is too large for its shared memory", self.factor)
        };
        let out = crate::kernels::upsample_bwd(s, l, g.dims(), &plan)?;
        Ok((out, Shape::from((b, c, g.h, g.w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        upsample_bilinear_ac(grad, self.factor).map(Some).map_err(candle_core::Error::wrap)
    }
}

fn check_input(x: &Tensor, factor: usize) -> Result<()> {
    if x.rank() != 4 {
        bail!("bilinear upsampling expects (B, C, H, W), got {:?}", x.dims());
    }
    if factor == 0 {
        bail!("bilinear upsampling factor must be >= 1");
    }
    if x.dims().contains(&0) {
        bail!("bilinear upsampling of an empty tensor {:?}", x.dims());
    }
    Ok(())
}

fn use_custom_op(device: &Device) -> bool {
    match device {
        Device::Cpu => true,
        Device::Cuda(_) => CUDA_KERNEL_BUILT,
        _ => false,
    }
}

/// The backward kernel keeps one tile's column sums in shared memory; very large factors fall
/// back to the composite.
#[cfg(feature = "cuda")]
fn use_grad_op(grad: &Tensor, factor: usize) -> bool {
    if !use_custom_op(grad.device()) {
        return false;
    }
    // Anything but a valid CUDA input goes to the op, which reports shape errors itself.
    let Ok((b, c, ho, wo)) = grad.dims4() else { return true };
    if !grad.device().is_cuda() || ho % factor != 0 || wo % factor != 0 {
        return true;
    }
    let g = Geom { planes: b * c, h: ho / factor, w: wo / factor, f: factor };
    matches!(g.grad_plan(grad.dtype()), Ok(Some(_)))
}

#[cfg(not(feature = "cuda"))]
fn use_grad_op(grad: &Tensor, _factor: usize) -> bool {
    use_custom_op(grad.device())
}

/// x16-style bilinear upsampling with align_corners = true: (B, C, H, W) -> (B, C, H*f, W*f).
/// The custom op on CPU (and on CUDA once its kernel exists), the matmul composite elsewhere.
pub fn upsample_bilinear_ac(x: &Tensor, factor: usize) -> Result<Tensor> {
    check_input(x, factor)?;
    if factor == 1 {
        return Ok(x.clone());
    }
    if use_custom_op(x.device()) {
        Ok(x.contiguous()?.apply_op1(MaskUpsample { factor })?)
    } else {
        upsample_bilinear_ac_composite(x, factor)
    }
}

/// The adjoint of `upsample_bilinear_ac` (its backward): (B, C, H*f, W*f) -> (B, C, H, W).
pub fn upsample_bilinear_ac_backward(grad: &Tensor, factor: usize) -> Result<Tensor> {
    check_input(grad, factor)?;
    if factor == 1 {
        return Ok(grad.clone());
    }
    if use_grad_op(grad, factor) {
        Ok(grad.contiguous()?.apply_op1(MaskUpsampleGrad { factor })?)
    } else {
        let (_, _, ho, wo) = grad.dims4()?;
        if ho % factor != 0 || wo % factor != 0 {
            bail!("upsample backward: {ho}x{wo} is not a multiple of factor {factor}");
        }
        // dX = Ry^T dY Rx.
        let dt = grad.dtype();
        let g = grad.to_dtype(acc_dtype(dt))?;
        let ry = interp_matrix(ho / factor, factor, g.dtype(), g.device())?.t()?.contiguous()?;
        let rx = interp_matrix(wo / factor, factor, g.dtype(), g.device())?.t()?.contiguous()?;
        Ok(separable(&g, &ry, &rx)?.to_dtype(dt)?)
    }
}

/// (n*f, n) interpolation matrix of one axis (rows sum to 1), as used by the composite path.
pub fn interp_matrix(n: usize, factor: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let taps = Taps::new(n, n * factor);
    let m = Tensor::from_vec(taps.matrix(n), (n * factor, n), &Device::Cpu)?;
    Ok(m.to_dtype(dtype)?.to_device(device)?)
}

fn acc_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `ry @ x @ rx^T` over the last two dims, vertical pass first so that only tensors at most
/// 1/f of the output size are transposed; the constant matrices get no gradient.
fn separable(x: &Tensor, ry: &Tensor, rx: &Tensor) -> Result<Tensor> {
    let xt = x.transpose(2, 3)?.contiguous()?; // (B, C, W, H)
    let v = frozen_matmul(&xt, ry)?; // (B, C, W, Ho)
    let vt = v.transpose(2, 3)?.contiguous()?; // (B, C, Ho, W)
    frozen_matmul(&vt, rx) // (B, C, Ho, Wo)
}

/// The same map as `upsample_bilinear_ac` written as Y = Ry X Rx^T with ordinary candle ops
/// (computed in f32, or f64 for f64 input): works on every device and differentiates through
/// candle's autograd.
pub fn upsample_bilinear_ac_composite(x: &Tensor, factor: usize) -> Result<Tensor> {
    check_input(x, factor)?;
    let (_, _, h, w) = x.dims4()?;
    let dt = x.dtype();
    let x = x.to_dtype(acc_dtype(dt))?;
    let ry = interp_matrix(h, factor, x.dtype(), x.device())?;
    let rx = interp_matrix(w, factor, x.dtype(), x.device())?;
    Ok(separable(&x, &ry, &rx)?.to_dtype(dt)?)
}

fn sigmoid32(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

fn sigmoid64(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// f32 values (computed in f32) stored as `dt`.
fn store_f32(v: Vec<f32>, dt: DType) -> candle_core::Result<CpuStorage> {
    Ok(match dt {
        DType::F32 => CpuStorage::F32(v),
        DType::F16 => CpuStorage::F16(v.into_par_iter().map(f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_par_iter().map(bf16::from_f32).collect()),
        other => candle_core::bail!("mask upsample: unsupported dtype {other:?}"),
    })
}

/// Upsampling followed by an elementwise epilogue: the CPU reference of the fused CUDA kernels.
/// Differentiable for the logit epilogues; the sigmoid and mask outputs are inference-only.
#[derive(Clone, Copy, Debug)]
pub struct MaskUpsampleEpilogue {
    pub factor: usize,
    pub epilogue: Epilogue,
}

impl CustomOp1 for MaskUpsampleEpilogue {
    fn name(&self) -> &'static str {
        "mask-upsample-bilinear-ac-epilogue"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = MaskUpsample { factor: self.factor }.geom(l)?;
        let (b, c, _, _) = l.shape().dims4()?;
        let Some((o0, o1)) = l.contiguous_offsets() else {
            candle_core::bail!("mask upsample: input must be contiguous")
        };
        let dt = s.dtype();
        // Interpolate exactly as `MaskUpsample` does (f32, f64 for f64), then apply the epilogue
        // to the unrounded value.
        let out = if let CpuStorage::F64(v) = s {
            let y = upsample_kernel::<f64>(&v[o0..o1], g);
            match self.epilogue {
                Epilogue::Logits | Epilogue::LogitsWide => CpuStorage::F64(y),
                Epilogue::Sigmoid => CpuStorage::F64(y.into_par_iter().map(sigmoid64).collect()),
                Epilogue::Threshold(t) => {
                    CpuStorage::U8(y.into_par_iter().map(|v| u8::from(sigmoid64(v) >= t as f64)).collect())
                }
            }
        } else {
            let x: Vec<f32> = match s {
                CpuStorage::F32(v) => v[o0..o1].to_vec(),
                CpuStorage::F16(v) => v[o0..o1].par_iter().map(|v| v.to_f32()).collect(),
                CpuStorage::BF16(v) => v[o0..o1].par_iter().map(|v| v.to_f32()).collect(),
                other => candle_core::bail!("mask upsample: unsupported dtype {:?}", other.dtype()),
            };
            let y = upsample_kernel::<f32>(&x, g);
            match self.epilogue {
                Epilogue::Logits => store_f32(y, dt)?,
                Epilogue::LogitsWide => CpuStorage::F32(y),
                Epilogue::Sigmoid => store_f32(y.into_par_iter().map(sigmoid32).collect(), dt)?,
                Epilogue::Threshold(t) => {
                    CpuStorage::U8(y.into_par_iter().map(|v| u8::from(sigmoid32(v) >= t)).collect())
                }
            }
        };
        Ok((out, Shape::from((b, c, g.ho(), g.wo()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let g = MaskUpsample { factor: self.factor }.geom(l)?;
        let (b, c, _, _) = l.shape().dims4()?;
        let out = crate::kernels::upsample_fwd(s, l, g.dims(), self.epilogue)?;
        Ok((out, Shape::from((b, c, g.ho(), g.wo()))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match self.epilogue {
            Epilogue::Logits | Epilogue::LogitsWide => upsample_bilinear_ac_backward(grad, self.factor)
                .and_then(|g| Ok(g.to_dtype(arg.dtype())?))
                .map(Some)
                .map_err(candle_core::Error::wrap),
            _ => Err(candle_core::Error::BackwardNotSupported { op: "mask upsample sigmoid/threshold" }),
        }
    }
}

fn upsample_with(x: &Tensor, factor: usize, epilogue: Epilogue) -> Result<Tensor> {
    check_input(x, factor)?;
    if use_custom_op(x.device()) {
        return Ok(x.contiguous()?.apply_op1(MaskUpsampleEpilogue { factor, epilogue })?);
    }
    let dt = x.dtype();
    let y = upsample_bilinear_ac_composite(&x.to_dtype(acc_dtype(dt))?, factor)?;
    Ok(match epilogue {
        Epilogue::Logits => y.to_dtype(dt)?,
        Epilogue::LogitsWide => y,
        Epilogue::Sigmoid => candle_nn::ops::sigmoid(&y)?.to_dtype(dt)?,
        Epilogue::Threshold(t) => candle_nn::ops::sigmoid(&y)?.ge(t as f64)?,
    })
}

/// `upsample_bilinear_ac` with f32 output for half-precision input (one pass on CUDA, no
/// separate cast); differentiable, the gradient comes back in the input dtype.
pub fn upsample_bilinear_ac_wide(x: &Tensor, factor: usize) -> Result<Tensor> {
    upsample_with(x, factor, Epilogue::LogitsWide)
}

/// sigmoid of the upsampled logits, in the input dtype (inference).
pub fn upsample_sigmoid(x: &Tensor, factor: usize) -> Result<Tensor> {
    upsample_with(x, factor, Epilogue::Sigmoid)
}

/// u8 mask `sigmoid(upsampled logits) >= threshold` (inference).
pub fn upsample_mask(x: &Tensor, factor: usize, threshold: f32) -> Result<Tensor> {
    upsample_with(x, factor, Epilogue::Threshold(threshold))
}
