//! Rotary position embedding (HF's non-interleaved `rotate_half` layout): the tables, the
//! composite reference, and one op that splits a projection's output into heads and rotates it
//! in one pass (`rope_heads`). The composite takes a layout copy, a negation, a concat, two
//! products and a sum, keeping about 4.5 copies of q and k per layer for backward; the op keeps
//! nothing (the rotation is linear: its backward needs only the tables), and its backward is one
//! pass too. The CPU kernel computes each element as the composite does (x cos + r sin, r the
//! negated or plain partner), so in f32 the two agree bit for bit; the CUDA kernels
//! (`kernels/fused.cu`) use the same operations.

use anyhow::{ensure, Result};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::consts::mul_const;
use super::cpu_kernel::{run_cpu, CpuKernel, Real};

/// Rotary embedding tables for the given position ids (B, T): returns cos, sin of shape
/// (B, 1, T, head_dim) in `dtype`, in HF's non-interleaved (rotate_half) layout.
pub fn rope_tables(position_ids: &Tensor, head_dim: usize, theta: f64, dtype: DType) -> Result<(Tensor, Tensor)> {
    let dev = position_ids.device();
    let inv: Vec<f32> = (0..head_dim).step_by(2).map(|i| 1.0 / theta.powf(i as f64 / head_dim as f64) as f32).collect();
    let inv = Tensor::from_vec(inv, (1, 1, head_dim / 2), dev)?;
    let pos = position_ids.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // (B,T,1)
    let freqs = pos.broadcast_mul(&inv)?; // (B,T,D/2)
    let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?; // (B,T,D)
    let cos = emb.cos()?.unsqueeze(1)?.to_dtype(dtype)?;
    let sin = emb.sin()?.unsqueeze(1)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// q * cos + rotate_half(q) * sin for q of shape (B, H, T, D): the reference of [`rope_heads`].
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((mul_const(x, cos)? + mul_const(&rot, sin)?)?)
}

/// Sizes of a head split: (B, T, H*D) rows <-> (B, H, T, D).
#[derive(Clone, Copy, Debug)]
struct Heads {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
}

impl Heads {
    /// From the projection's output layout and the tables' (B, 1, T, D).
    fn of(x: &[usize], table: &[usize], heads: usize) -> candle_core::Result<Self> {
        let (&[b, t, hd], &[tb, 1, tt, d]) = (x, table) else {
            candle_core::bail!("rope: input {x:?} must be (B, T, H*D) and tables {table:?} (B, 1, T, D)")
        };
        if heads == 0 || hd != heads * d || d % 2 != 0 || tb != b || tt != t {
            candle_core::bail!("rope: input {x:?} with tables {table:?} for {heads} heads");
        }
        Ok(Self { b, t, h: heads, d })
    }

    fn split_shape(&self) -> Shape {
        Shape::from(vec![self.b, self.h, self.t, self.d])
    }

    fn rows_shape(&self) -> Shape {
        Shape::from(vec![self.b, self.t, self.h * self.d])
    }
}

/// The CPU kernels, one (b, t) row of the projection at a time. `forward`: y[b,h,t,j] =
/// x[b,t,h*D+j] cos[b,t,j] + r sin[b,t,j] with r = -x[.., j+D/2] (j < D/2) or x[.., j-D/2].
/// Backward (the transpose): dx[b,t,h*D+j] = g[b,h,t,j] cos[b,t,j] + (g[.., j+D/2] sin[b,t,j+D/2]
/// for j < D/2, -g[.., j-D/2] sin[b,t,j-D/2] otherwise).
struct CpuRope {
    heads: Heads,
    forward: bool,
}

impl CpuKernel for CpuRope {
    fn run<A: Real>(&self, inputs: &[&[A]]) -> Vec<A> {
        let (src, cos, sin) = (inputs[0], inputs[1], inputs[2]);
        let Heads { b, t, h, d } = self.heads;
        let half = d / 2;
        let mut out = vec![A::default(); b * t * h * d];
        // Each output chunk is one (b, h) plane of the split layout (forward) or one (b, t) row
        // of the projection layout (backward).
        let forward = self.forward;
        let chunk = if forward { t * d } else { h * d };
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, dst)| {
            if forward {
                let (bi, hi) = (i / h, i % h);
                for ti in 0..t {
                    let row = &src[(bi * t + ti) * h * d + hi * d..][..d];
                    let (c, s) = (&cos[(bi * t + ti) * d..][..d], &sin[(bi * t + ti) * d..][..d]);
                    let y = &mut dst[ti * d..][..d];
                    for j in 0..d {
                        let r = if j < half { -row[j + half] } else { row[j - half] };
                        y[j] = row[j] * c[j] + r * s[j];
                    }
                }
            } else {
                let (bi, ti) = (i / t, i % t);
                let (c, s) = (&cos[(bi * t + ti) * d..][..d], &sin[(bi * t + ti) * d..][..d]);
                for hi in 0..h {
                    let g = &src[((bi * h + hi) * t + ti) * d..][..d];
                    let dx = &mut dst[hi * d..][..d];
                    for j in 0..d {
                        let r = if j < half { g[j + half] * s[j + half] } else { -(g[j - half] * s[j - half]) };
                        dx[j] = g[j] * c[j] + r;
                    }
                }
            }
        });
        out
    }
}

/// (x (B, T, H*D), cos, sin) -> the rotated heads (B, H, T, D).
struct RopeHeads {
    heads: usize,
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        c: &CpuStorage,
        cl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let heads = Heads::of(xl.dims(), cl.dims(), self.heads)?;
        let y = run_cpu(self.name(), &[(x, xl), (c, cl), (s, sl)], &CpuRope { heads, forward: true })?;
        Ok((y, heads.split_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        c: &candle_core::CudaStorage,
        cl: &Layout,
        s: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let hs = Heads::of(xl.dims(), cl.dims(), self.heads)?;
        let y = crate::kernels::rope_heads(true, (x, xl), (c, cl), (s, sl), [hs.b, hs.t, hs.h, hs.d])?;
        Ok((y, hs.split_shape()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(cos.dtype())?.contiguous()?;
        Ok((Some(g.apply_op3_no_bwd(cos, sin, &RopeHeadsGrad { heads: self.heads })?), None, None))
    }
}

/// (g (B, H, T, D), cos, sin) -> dx (B, T, H*D).
struct RopeHeadsGrad {
    heads: usize,
}

impl RopeHeadsGrad {
    fn sizes(&self, gl: &Layout, cl: &Layout) -> candle_core::Result<Heads> {
        let &[b, h, t, d] = gl.dims() else { candle_core::bail!("rope backward: gradient {:?}", gl.dims()) };
        if h != self.heads {
            candle_core::bail!("rope backward: gradient {:?} for {} heads", gl.dims(), self.heads);
        }
        Heads::of(&[b, t, h * d], cl.dims(), h)
    }
}

impl CustomOp3 for RopeHeadsGrad {
    fn name(&self) -> &'static str {
        "rope-heads-grad"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        c: &CpuStorage,
        cl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let heads = self.sizes(gl, cl)?;
        let dx = run_cpu(self.name(), &[(g, gl), (c, cl), (s, sl)], &CpuRope { heads, forward: false })?;
        Ok((dx, heads.rows_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        c: &candle_core::CudaStorage,
        cl: &Layout,
        s: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let hs = self.sizes(gl, cl)?;
        let dx = crate::kernels::rope_heads(false, (g, gl), (c, cl), (s, sl), [hs.b, hs.t, hs.h, hs.d])?;
        Ok((dx, hs.rows_shape()))
    }
}

/// A projection's output `x` (B, T, heads*D) split into heads and rotated: (B, heads, T, D),
/// equal to `apply_rope(x.reshape((B, T, heads, D)).transpose(1, 2), cos, sin)`. `cos`, `sin`:
/// [`rope_tables`] in `x`'s dtype. One node that keeps no activation.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    ensure!(
        x.dtype() == cos.dtype() && x.dtype() == sin.dtype(),
        "rope: input {:?} and tables {:?} dtypes differ",
        x.dtype(),
        cos.dtype()
    );
    Heads::of(x.dims(), cos.dims(), heads)?;
    ensure!(cos.dims() == sin.dims(), "rope: cos {:?} and sin {:?} differ", cos.dims(), sin.dims());
    Ok(x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, RopeHeads { heads })?)
}
