//! Convolution helpers that keep the autograd graph lean: a dense convolution whose backward is
//! GEMMs only, a convolution of an untracked input that differentiates the kernel only, zero
//! padding without dead gradients, and the depthwise convolution built from shifted views (the
//! reference of `nn::depthwise`).

use anyhow::{ensure, Context, Result};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::consts::mul_any;
use super::linear::trained_matmul;

/// The k*k inputs of a k x k convolution with this stride and padding, as flat shifted views.
///
/// The zero-padded map is split into stride x stride phases (a free view for stride 1), each
/// flattened to (B, C, Hq*Wq). Tap (ky, kx) is then one contiguous run per channel of its phase:
/// element i*Wq + j (j < Wo) is padded input (s*i + ky, s*j + kx); columns j >= Wo wrap around
/// and are cut by [`Taps::unflatten`]. Contiguous runs keep candle's CPU binary ops vectorised.
struct Taps {
    taps: Vec<Tensor>,
    ho: usize,
    wo: usize,
    wq: usize,
}

impl Taps {
    fn new(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let s = stride;
        ensure!(h + 2 * pad >= k && w + 2 * pad >= k, "conv: input {h}x{w} smaller than kernel {k}");
        let (ho, wo) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
        let e = (k - 1) / s;
        let (hq, wq) = (ho + e, wo + e);
        let fit = |x: Tensor, dim: usize, full: usize| -> Result<Tensor> {
            // Left zero padding, then trailing rows that no tap reads are cut or zeros appended.
            let x = if pad + x.dim(dim)? > full { x.narrow(dim, 0, full - pad)? } else { x };
            let right = full - pad - x.dim(dim)?;
            pad_zeros(&x, dim, pad, right)
        };
        let xp = fit(fit(x.clone(), 2, s * hq)?, 3, s * wq)?.reshape((b, c, hq, s, wq, s))?;
        let mut phases = Vec::with_capacity(s * s);
        for ry in 0..s {
            for rx in 0..s {
                phases.push(xp.narrow(3, ry, 1)?.narrow(5, rx, 1)?.reshape((b, c, hq * wq))?);
            }
        }
        let len = (ho - 1) * wq + wo;
        let mut taps = Vec::with_capacity(k * k);
        for ky in 0..k {
            for kx in 0..k {
                let phase = &phases[(ky % s) * s + kx % s];
                taps.push(phase.narrow(2, (ky / s) * wq + kx / s, len)?);
            }
        }
        Ok(Self { taps, ho, wo, wq })
    }

    /// A (B, C, len) map in tap layout -> (B, C, Ho, Wo).
    fn unflatten(&self, y: &Tensor) -> Result<Tensor> {
        let (b, c, _) = y.dims3()?;
        let y = pad_zeros(y, 2, 0, self.wq - self.wo)?.reshape((b, c, self.ho, self.wq))?;
        Ok(y.narrow(3, 0, self.wo)?.contiguous()?)
    }
}

/// Depthwise k x k convolution as k*k shifted multiply-adds on views, every product and partial
/// sum a node: the reference of `nn::depthwise::depthwise_conv2d`, which the model uses.
pub fn depthwise_conv2d_composite(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let c = x.dim(1)?;
    let k = w.dim(2)?;
    let taps = Taps::new(x, k, stride, pad)?;
    let w = w.reshape((c, k * k))?;
    let mut acc: Option<Tensor> = None;
    for (t, tap) in taps.taps.iter().enumerate() {
        let y = mul_any(tap, &w.narrow(1, t, 1)?.reshape((1, c, 1))?)?;
        acc = Some(match acc {
            None => y,
            Some(a) => (a + y)?,
        });
    }
    taps.unflatten(&acc.context("depthwise conv: empty kernel")?)
}

/// Dense convolution of an untracked input (the image) with a trained kernel, as im2col and
/// `trained_matmul`: candle's conv2d backward would also compute and store an image-sized
/// gradient for the input. `x`: (B,Cin,H,W), `w`: (Cout,Cin,k,k).
pub fn conv2d_const_input(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let (b, cin, _, _) = x.dims4()?;
    let (cout, _, k, _) = w.dims4()?;
    let taps = Taps::new(x, k, stride, pad)?;
    let (ho, wo) = (taps.ho, taps.wo);
    let cols =
        taps.taps.iter().map(|t| taps.unflatten(t)?.unsqueeze(2).map_err(Into::into)).collect::<Result<Vec<_>>>()?;
    // (B,Cin,k*k,Ho,Wo) -> rows (B*Ho*Wo) of features ordered as the kernel's (Cin, ky, kx).
    let cols = Tensor::cat(&cols, 2)?.permute((0, 3, 4, 1, 2))?.reshape((b * ho * wo, cin * k * k))?;
    let y = trained_matmul(&cols, &w.reshape((cout, cin * k * k))?)?;
    Ok(y.reshape((b, ho, wo, cout))?.permute((0, 3, 1, 2))?.contiguous()?)
}

/// Dense convolution (groups 1) whose backward runs on GEMMs only. The forward is candle's
/// (im2col and a matmul); candle's backward takes the input gradient through
/// `conv_transpose2d`, a direct loop on the CPU and a naive kernel on CUDA. Here the input
/// gradient is a forward convolution too: `dy` dilated by the stride, with the kernel flipped
/// and its channel axes swapped, padding k - 1 - pad (any padding). The kernel gradient is candle's own
/// formula (a convolution of the input by `dy`, an im2col and a matmul). One node that keeps
/// its inputs; gradients only for tracked inputs. `x`: (B,Cin,H,W), `w`: (Cout,Cin,k,k).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let k = w.dim(2)?;
    ensure!(w.dim(3)? == k, "conv2d: kernel {:?} is not square", w.dims());
    super::checkpoint::with_backward2(
        x,
        w,
        move |x, w| Ok(x.conv2d(w, pad, stride, 1, 1)?),
        move |x, w, dy, [need_x, need_w]| conv2d_backward(x, w, dy, stride, pad, need_x, need_w),
    )
}

fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    stride: usize,
    pad: usize,
    need_x: bool,
    need_w: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (_, _, h, wd) = x.dims4()?;
    let k = w.dim(2)?;
    let dy = dy.to_dtype(x.dtype())?;
    let dx = if need_x {
        let (ho, wo) = (dy.dim(2)?, dy.dim(3)?);
        // Input rows/columns past the last window (when h + 2 pad - k is not a multiple of the
        // stride) get zero gradient: extra zeros at the end of the dilated map.
        let (rh, rw) = ((h + 2 * pad - k) % stride, (wd + 2 * pad - k) % stride);
        let dyd = dilate(&dilate(&dy.contiguous()?, 2, stride, ho, rh)?, 3, stride, wo, rw)?;
        let wf = if k > 1 {
            let rev = Tensor::from_vec((0..k as u32).rev().collect::<Vec<_>>(), k, w.device())?;
            w.index_select(&rev, 2)?.index_select(&rev, 3)?
        } else {
            w.clone()
        };
        // Padding k - 1 - pad; a padding past k - 1 (the decoder's padded 1x1) crops instead.
        let dx = dyd.conv2d(&wf.transpose(0, 1)?.contiguous()?, (k - 1).saturating_sub(pad), 1, 1, 1)?;
        let crop = pad.saturating_sub(k - 1);
        Some(if crop > 0 { dx.narrow(2, crop, h)?.narrow(3, crop, wd)?.contiguous()? } else { dx })
    } else {
        None
    };
    let dw = if need_w {
        let g = x.transpose(0, 1)?.conv2d(&dy.transpose(0, 1)?, pad, 1, stride, 1)?.transpose(0, 1)?;
        Some(g.narrow(2, 0, k)?.narrow(3, 0, k)?.contiguous()?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// `t` with `stride - 1` zeros between its `n` entries along `dim`, then `extra` zeros at the end.
fn dilate(t: &Tensor, dim: usize, stride: usize, n: usize, extra: usize) -> Result<Tensor> {
    let t = if stride > 1 {
        let mut dims = t.dims().to_vec();
        let spread = pad_zeros(&t.unsqueeze(dim + 1)?, dim + 1, 0, stride - 1)?;
        dims[dim] = n * stride;
        spread.reshape(dims)?.narrow(dim, 0, stride * (n - 1) + 1)?
    } else {
        t.clone()
    };
    pad_zeros(&t, dim, 0, extra)
}

/// Zero padding whose backward is a narrow of the gradient (`Tensor::pad_with_zeros` concats
/// constant zero blocks, and candle stores a dead gradient for each of them).
struct PadZeros {
    dim: usize,
    left: usize,
    right: usize,
}

impl PadZeros {
    /// (rows, src row length, dst row length, dst offset, out shape) for a contiguous input.
    fn plan(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, usize, Shape)> {
        if !l.is_contiguous() {
            candle_core::bail!("pad: input must be contiguous");
        }
        let dims = l.dims();
        let inner: usize = dims[self.dim + 1..].iter().product();
        let rows: usize = dims[..self.dim].iter().product();
        let n = dims[self.dim];
        let mut out = dims.to_vec();
        out[self.dim] = n + self.left + self.right;
        Ok((rows, n * inner, out[self.dim] * inner, self.left * inner, Shape::from(out)))
    }

    fn fwd<S>(&self, s: &S, l: &Layout) -> candle_core::Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let (rows, src_len, dst_len, dst_off, shape) = self.plan(l)?;
        let mut dst = s.device().zeros_impl(&shape, s.dtype())?;
        s.copy2d(&mut dst, rows, src_len, src_len, dst_len, l.start_offset(), dst_off)?;
        Ok((dst, shape))
    }
}

impl CustomOp1 for PadZeros {
    fn name(&self) -> &'static str {
        "pad-zeros"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd(s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.fwd(s, l)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.narrow(self.dim, self.left, arg.dim(self.dim)?)?))
    }
}

/// `x` with `left`/`right` zeros along `dim`; the backward narrows the gradient.
pub fn pad_zeros(x: &Tensor, dim: usize, left: usize, right: usize) -> Result<Tensor> {
    if left == 0 && right == 0 {
        return Ok(x.clone());
    }
    // apply_op1 records the op only for a tracked input.
    Ok(x.contiguous()?.apply_op1(PadZeros { dim, left, right })?)
}
