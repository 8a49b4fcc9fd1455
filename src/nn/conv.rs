//! Convolution helpers that keep the autograd graph lean: a depthwise convolution built from
//! shifted views (candle runs grouped convolutions one group at a time), a convolution of an
//! untracked input that differentiates the kernel only, and zero padding without dead gradients.

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

/// Depthwise k x k convolution (one filter per channel) as k*k shifted multiply-adds.
/// candle runs a grouped conv as one convolution per channel plus a concat (hundreds of tiny
/// kernels per layer and as many in backward); this is k*k broadcast ops on views. The
/// composite's ~2k^2 map-sized intermediates are not kept: the op keeps its output only
/// (`nn::checkpoint::with_backward2`) and its backward is written out
/// ([`depthwise_conv2d_backward`]).
/// `x`: (B,C,H,W), `w`: (C,1,k,k).
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    super::checkpoint::with_backward2(
        x,
        w,
        move |x, w| depthwise_conv2d_composite(x, w, stride, pad),
        move |x, w, dy, [need_x, need_w]| depthwise_conv2d_backward(x, w, dy, stride, pad, need_x, need_w),
    )
}

/// The gradients of [`depthwise_conv2d`], written out. candle's backward of the composite pads
/// every tap's gradient to the full map and sums the kernel's gradient with its strided
/// (unvectorised) reduction: 3x the forward's time. Here:
/// - dx is the transposed convolution: `dy` dilated by the stride (zeros between its values),
///   convolved with the flipped kernel, with padding k - 1 - pad;
/// - dw[c, t] sums dy * tap t over the batch and the map, with dy in the taps' flat layout.
fn depthwise_conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    stride: usize,
    pad: usize,
    need_x: bool,
    need_w: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (b, c, h, wd) = x.dims4()?;
    let k = w.dim(2)?;
    let s = stride;
    let dy = dy.to_dtype(x.dtype())?;
    let dx = if need_x {
        ensure!(pad < k, "depthwise conv backward: padding {pad} >= kernel {k}");
        let (ho, wo) = (dy.dim(2)?, dy.dim(3)?);
        // Input rows/columns past the last window (when (h + 2 pad - k) is not a multiple of
        // the stride) get zero gradient: extra zeros at the end of the dilated map.
        let (rh, rw) = ((h + 2 * pad - k) % s, (wd + 2 * pad - k) % s);
        let dilate = |t: Tensor, dim: usize, n: usize, extra: usize| -> Result<Tensor> {
            let t = if s > 1 {
                let mut dims = t.dims().to_vec();
                let spread = pad_zeros(&t.unsqueeze(dim + 1)?, dim + 1, 0, s - 1)?;
                dims[dim] = n * s;
                spread.reshape(dims)?.narrow(dim, 0, s * (n - 1) + 1)?
            } else {
                t
            };
            pad_zeros(&t, dim, 0, extra)
        };
        let dyd = dilate(dilate(dy.contiguous()?, 2, ho, rh)?, 3, wo, rw)?;
        let rev = Tensor::from_vec((0..k as u32).rev().collect::<Vec<_>>(), k, w.device())?;
        let wf = w.index_select(&rev, 2)?.index_select(&rev, 3)?;
        Some(depthwise_conv2d_composite(&dyd, &wf, 1, k - 1 - pad)?)
    } else {
        None
    };
    let dw = if need_w {
        let taps = Taps::new(x, k, stride, pad)?;
        let len = (taps.ho - 1) * taps.wq + taps.wo;
        let dyq = pad_zeros(&dy, 3, 0, taps.wq - taps.wo)?.reshape((b, c, taps.ho * taps.wq))?.narrow(2, 0, len)?;
        let per_tap = taps
            .taps
            .iter()
            .map(|tap| Ok(super::fused::sum_keepdims(&(tap * &dyq)?, &[0, 2])?))
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&per_tap, 2)?.reshape((c, 1, k, k))?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// The graph of [`depthwise_conv2d`]: every shifted product and partial sum is a node.
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
