//! Depthwise k x k convolution (one filter per channel, TinySAM's MBConv, PatchMerging and local
//! convolutions) as one op per direction: the forward, the input gradient and the kernel
//! gradient each read and write their maps once. candle runs a grouped convolution one group at
//! a time; the composite of shifted views (`nn::conv::depthwise_conv2d_composite`, the
//! reference) takes k*k products and k*k - 1 sums, forward and backward, and its backward's
//! working set was the largest transient of a checkpointed TinySAM step.
//!
//! The CPU kernels below add the products in the composite's order (tap by tap, ky-major), so
//! in f32 the forward equals the composite bit for bit; the CUDA kernels (`kernels/depthwise.cu`)
//! use that order too. Math in f32 for f32/bf16/f16 storage, f64 for f64.

use anyhow::{ensure, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_kernel::{run_cpu, CpuKernel, Real};
use crate::kernels::DwGeom;

fn geometry(x: &[usize], w: &[usize], stride: usize, pad: usize) -> candle_core::Result<DwGeom> {
    let (&[b, c, h, wd], &[wc, 1, k, k2]) = (x, w) else {
        candle_core::bail!("depthwise conv: input {x:?} must be (B, C, H, W) and kernel {w:?} (C, 1, k, k)")
    };
    if wc != c || k != k2 || k == 0 || stride == 0 || pad >= k {
        candle_core::bail!("depthwise conv: kernel {w:?} for input {x:?}, stride {stride}, padding {pad}");
    }
    if h + 2 * pad < k || wd + 2 * pad < k {
        candle_core::bail!("depthwise conv: input {h}x{wd} smaller than kernel {k}");
    }
    let (ho, wo) = ((h + 2 * pad - k) / stride + 1, (wd + 2 * pad - k) / stride + 1);
    let i = |v: usize| v as i64;
    Ok(DwGeom { b: i(b), c: i(c), h: i(h), w: i(wd), ho: i(ho), wo: i(wo), k: i(k), stride: i(stride), pad: i(pad) })
}

/// Plain-old sizes of a geometry, for the CPU loops.
#[derive(Clone, Copy)]
struct Dims {
    c: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    k: usize,
    s: usize,
    p: usize,
}

impl From<DwGeom> for Dims {
    fn from(g: DwGeom) -> Self {
        let u = |v: i64| v as usize;
        Self { c: u(g.c), h: u(g.h), w: u(g.w), ho: u(g.ho), wo: u(g.wo), k: u(g.k), s: u(g.stride), p: u(g.pad) }
    }
}

impl Dims {
    /// The output columns whose tap `kx` reads inside the map: `ox * s + kx - p` in [0, w).
    fn cols(&self, kx: usize) -> std::ops::Range<usize> {
        let lo = if self.p > kx { (self.p - kx).div_ceil(self.s) } else { 0 };
        let hi = if self.w + self.p > kx { ((self.w - 1 + self.p - kx) / self.s + 1).min(self.wo) } else { 0 };
        lo..hi.max(lo)
    }

    /// The input row that output row `oy` reads through tap row `ky`, if inside the map.
    fn row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.s + ky).checked_sub(self.p).filter(|&iy| iy < self.h)
    }
}

/// y (one plane) = the convolution of plane `x` with the plane's kernel `wk` (k*k).
fn forward_plane<A: Real>(x: &[A], wk: &[A], y: &mut [A], d: Dims) {
    y.fill(A::default());
    for ky in 0..d.k {
        for kx in 0..d.k {
            let (wt, cols) = (wk[ky * d.k + kx], d.cols(kx));
            for oy in 0..d.ho {
                let Some(iy) = d.row(oy, ky) else { continue };
                let (src, dst) = (&x[iy * d.w..(iy + 1) * d.w], &mut y[oy * d.wo..(oy + 1) * d.wo]);
                for ox in cols.clone() {
                    dst[ox] = dst[ox] + src[ox * d.s + kx - d.p] * wt;
                }
            }
        }
    }
}

/// dx (one plane) from the plane's output gradient: each tap scatters `dy * w` back onto the
/// input position it read, taps in order, so every element sums in the CUDA gather's order.
fn input_grad_plane<A: Real>(dy: &[A], wk: &[A], dx: &mut [A], d: Dims) {
    dx.fill(A::default());
    for ky in 0..d.k {
        for kx in 0..d.k {
            let (wt, cols) = (wk[ky * d.k + kx], d.cols(kx));
            for oy in 0..d.ho {
                let Some(iy) = d.row(oy, ky) else { continue };
                let (src, dst) = (&dy[oy * d.wo..(oy + 1) * d.wo], &mut dx[iy * d.w..(iy + 1) * d.w]);
                for ox in cols.clone() {
                    let ix = ox * d.s + kx - d.p;
                    dst[ix] = dst[ix] + src[ox] * wt;
                }
            }
        }
    }
}

/// dw for one channel: per tap, the sum over the batch's planes of `dy * x` at the tap's shift
/// (rows in the arithmetic type, accumulated in f64).
fn weight_grad_channel<A: Real>(x: &[A], dy: &[A], c: usize, batch: usize, d: Dims) -> Vec<f64> {
    let mut out = vec![0f64; d.k * d.k];
    for ky in 0..d.k {
        for kx in 0..d.k {
            let cols = d.cols(kx);
            let mut total = 0f64;
            for b in 0..batch {
                let plane = b * d.c + c;
                let (xp, gp) = (&x[plane * d.h * d.w..], &dy[plane * d.ho * d.wo..]);
                for oy in 0..d.ho {
                    let Some(iy) = d.row(oy, ky) else { continue };
                    let mut row = A::default();
                    for ox in cols.clone() {
                        row = row + gp[oy * d.wo + ox] * xp[iy * d.w + ox * d.s + kx - d.p];
                    }
                    total += row.to_f64();
                }
            }
            out[ky * d.k + kx] = total;
        }
    }
    out
}

/// Which direction the CPU kernel computes, on which geometry.
enum Direction {
    Forward,
    InputGrad,
    WeightGrad,
}

struct CpuDepthwise(Direction, DwGeom);

impl CpuKernel for CpuDepthwise {
    fn run<A: Real>(&self, inputs: &[&[A]]) -> Vec<A> {
        let (a, b, g) = (inputs[0], inputs[1], self.1);
        match self.0 {
            Direction::Forward => cpu_forward(a, b, g),
            Direction::InputGrad => cpu_input_grad(a, b, g),
            Direction::WeightGrad => cpu_weight_grad(a, b, g),
        }
    }
}

fn cpu_forward<A: Real>(x: &[A], w: &[A], g: DwGeom) -> Vec<A> {
    let d = Dims::from(g);
    let (kk, plane_in, plane_out) = (d.k * d.k, d.h * d.w, d.ho * d.wo);
    let mut y = vec![A::default(); (g.b * g.c) as usize * plane_out];
    y.par_chunks_mut(plane_out).enumerate().for_each(|(p, yp)| {
        let c = p % d.c;
        forward_plane(&x[p * plane_in..(p + 1) * plane_in], &w[c * kk..(c + 1) * kk], yp, d);
    });
    y
}

fn cpu_input_grad<A: Real>(dy: &[A], w: &[A], g: DwGeom) -> Vec<A> {
    let d = Dims::from(g);
    let (kk, plane_in, plane_out) = (d.k * d.k, d.h * d.w, d.ho * d.wo);
    let mut dx = vec![A::default(); (g.b * g.c) as usize * plane_in];
    dx.par_chunks_mut(plane_in).enumerate().for_each(|(p, dxp)| {
        let c = p % d.c;
        input_grad_plane(&dy[p * plane_out..(p + 1) * plane_out], &w[c * kk..(c + 1) * kk], dxp, d);
    });
    dx
}

fn cpu_weight_grad<A: Real>(x: &[A], dy: &[A], g: DwGeom) -> Vec<A> {
    let d = Dims::from(g);
    let per_channel: Vec<Vec<f64>> =
        (0..d.c).into_par_iter().map(|c| weight_grad_channel(x, dy, c, g.b as usize, d)).collect();
    per_channel.into_iter().flatten().map(A::from_f64).collect()
}

/// The forward op on (x, w); its backward runs the two gradient ops below.
struct DepthwiseConv {
    stride: usize,
    pad: usize,
}

impl DepthwiseConv {
    fn geom(&self, xl: &Layout, wl: &Layout) -> candle_core::Result<DwGeom> {
        geometry(xl.dims(), wl.dims(), self.stride, self.pad)
    }
}

fn out_shape(g: DwGeom) -> Shape {
    Shape::from(vec![g.b as usize, g.c as usize, g.ho as usize, g.wo as usize])
}

fn in_shape(g: DwGeom) -> Shape {
    Shape::from(vec![g.b as usize, g.c as usize, g.h as usize, g.w as usize])
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geom(xl, wl)?;
        let y = run_cpu(self.name(), &[(x, xl), (w, wl)], &CpuDepthwise(Direction::Forward, g))?;
        Ok((y, out_shape(g)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let g = self.geom(xl, wl)?;
        Ok((crate::kernels::depthwise_fwd(x, xl, w, wl, g)?, out_shape(g)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = geometry(x.dims(), w.dims(), self.stride, self.pad)?;
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        let dx = if x.track_op() { Some(dy.apply_op2_no_bwd(w, &DepthwiseInputGrad(g))?) } else { None };
        let dw = if w.track_op() { Some(x.apply_op2_no_bwd(&dy, &DepthwiseWeightGrad(g))?) } else { None };
        Ok((dx, dw))
    }
}

/// (dy, w) -> dx.
struct DepthwiseInputGrad(DwGeom);

impl CustomOp2 for DepthwiseInputGrad {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        dyl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let dx = run_cpu(self.name(), &[(dy, dyl), (w, wl)], &CpuDepthwise(Direction::InputGrad, g))?;
        Ok((dx, in_shape(g)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::kernels::depthwise_bwd_input(dy, dyl, w, wl, self.0)?, in_shape(self.0)))
    }
}

/// (x, dy) -> dw, in x's dtype.
struct DepthwiseWeightGrad(DwGeom);

impl CustomOp2 for DepthwiseWeightGrad {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let dw = run_cpu(self.name(), &[(x, xl), (dy, dyl)], &CpuDepthwise(Direction::WeightGrad, g))?;
        Ok((dw, weight_shape(g)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::kernels::depthwise_bwd_weight(x, xl, dy, dyl, self.0)?, weight_shape(self.0)))
    }
}

fn weight_shape(g: DwGeom) -> Shape {
    Shape::from(vec![g.c as usize, 1, g.k as usize, g.k as usize])
}

/// Depthwise k x k convolution: `x` (B, C, H, W), `w` (C, 1, k, k) of `x`'s dtype, zero padding
/// `pad` (< k). One autograd node that keeps its inputs only; its backward computes the input
/// gradient only for a tracked input and the kernel gradient only for a tracked kernel.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    ensure!(x.dtype() == w.dtype(), "depthwise conv: input {:?} and kernel {:?} dtypes differ", x.dtype(), w.dtype());
    geometry(x.dims(), w.dims(), stride, pad)?;
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, DepthwiseConv { stride, pad })?)
}
