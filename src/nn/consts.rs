//! Elementwise ops with a frozen (untracked) operand, whose backward touches only the tracked one.
//!
//! candle's binary-op backward inserts a gradient for BOTH operands even when one is a constant,
//! and keeps it in the `GradStore`: a frozen norm weight, a bias, a rope table or an attention
//! mask would each leave an activation-sized dead gradient behind. `add_any` / `mul_any` pick the
//! custom op whenever the right operand is untracked, so model code can use them everywhere.
//! When both are tracked and one broadcasts to the other, a second op sums the smaller one's
//! gradient on a fast path (candle's broadcast backward reduces element by element on CPU).

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::OnBackend;

#[derive(Clone, Copy)]
enum Kind {
    Add,
    Mul,
}

/// `x (op) c` with `c` broadcast to `x`'s shape and never differentiated.
struct ConstBinary {
    c: Tensor,
    kind: Kind,
}

impl ConstBinary {
    fn c_layout(&self, l: &Layout) -> candle_core::Result<Layout> {
        let (_, cl) = self.c.storage_and_layout();
        cl.broadcast_as(l.shape())
    }
}

impl ConstBinary {
    fn forward<S: OnBackend>(&self, s: &S, l: &Layout) -> candle_core::Result<(S, Shape)> {
        let cl = self.c_layout(l)?;
        let (cs, _) = self.c.storage_and_layout();
        let cs = S::of(&cs)?;
        let out = match self.kind {
            Kind::Add => s.binary_impl::<candle_core::op::Add>(cs, l, &cl)?,
            Kind::Mul => s.binary_impl::<candle_core::op::Mul>(cs, l, &cl)?,
        };
        Ok((out, l.shape().clone()))
    }
}

impl CustomOp1 for ConstBinary {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Add => "add-const",
            Kind::Mul => "mul-const",
        }
    }

    same_forward_on_every_backend!(|op: &Self, s, l| op.forward(s, l));

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(match self.kind {
            Kind::Add => grad.clone(),
            Kind::Mul => grad.broadcast_mul(&self.c)?,
        }))
    }
}

fn apply(x: &Tensor, c: &Tensor, kind: Kind) -> Result<Tensor> {
    if c.track_op() {
        // Its gradient would be dropped silently: callers must use `add_any`/`mul_any`.
        anyhow::bail!(
            "internal error: constant operand of {} is tracked by autograd",
            ConstBinary { c: c.clone(), kind }.name()
        );
    }
    let c = c.to_dtype(x.dtype())?;
    if x.track_op() {
        // The op's layouts need `c` broadcastable to x: check now for a clear error.
        let _ = c.broadcast_as(x.shape())?;
        Ok(x.apply_op1(ConstBinary { c, kind })?)
    } else {
        Ok(match kind {
            Kind::Add => x.broadcast_add(&c)?,
            Kind::Mul => x.broadcast_mul(&c)?,
        })
    }
}

/// `x (op) y` for a tracked `y` that broadcasts to the tracked `x`. candle's backward of a
/// broadcast sums `y`'s gradient with its strided (unvectorised) CPU reduction over the
/// leading dimensions (every trained bias and layer scale: 4% of a tiny training step); this
/// op sums it with `fused::sum_keepdims` (a matmul with ones, or a vectorised trailing sum).
fn tracked(x: &Tensor, y: &Tensor, kind: Kind) -> Result<Tensor> {
    let y = y.to_dtype(x.dtype())?;
    Ok(x.apply_op2(&y, TrackedBinary { kind })?)
}

struct TrackedBinary {
    kind: Kind,
}

fn tracked_fwd<S: BackendStorage>(
    kind: Kind,
    (x, xl): (&S, &Layout),
    (y, yl): (&S, &Layout),
) -> candle_core::Result<(S, Shape)> {
    let yl = yl.broadcast_as(xl.shape())?;
    let out = match kind {
        Kind::Add => x.binary_impl::<candle_core::op::Add>(y, xl, &yl)?,
        Kind::Mul => x.binary_impl::<candle_core::op::Mul>(y, xl, &yl)?,
    };
    Ok((out, xl.shape().clone()))
}

impl CustomOp2 for TrackedBinary {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Add => "add-broadcast",
            Kind::Mul => "mul-broadcast",
        }
    }

    same_forward_on_every_backend!(two: |op: &Self, x, y| tracked_fwd(op.kind, x, y));

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The dimensions `y` was broadcast along: the ones left of it, and its size-1 ones.
        let left = x.rank() - y.rank();
        let along: Vec<usize> =
            (0..x.rank()).filter(|&d| d < left || (y.dims()[d - left] == 1 && x.dims()[d] != 1)).collect();
        let (dx, dy_full) = match self.kind {
            Kind::Add => (grad.clone(), grad.clone()),
            Kind::Mul => (grad.broadcast_mul(y)?, (grad * x)?),
        };
        let dy = super::fused::sum_keepdims(&dy_full, &along)?.reshape(y.shape())?;
        Ok((Some(dx), Some(dy)))
    }
}

/// `x + c` for an untracked `c` broadcastable to `x` (c is cast to x's dtype).
pub fn add_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    apply(x, c, Kind::Add)
}

/// `x * c` for an untracked `c` broadcastable to `x` (c is cast to x's dtype).
pub fn mul_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    apply(x, c, Kind::Mul)
}

/// Adds an additive attention mask (0 / large negative) with no gradient for the mask.
pub fn masked_add(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    add_const(scores, mask)
}

/// `x + y` (broadcast either way): a plain op when both are tracked, `add_const` with the
/// untracked one as the constant otherwise, so no dead gradient is ever stored.
pub fn add_any(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    any(x, y, Kind::Add)
}

/// `x * y` (broadcast either way), same rule as `add_any`.
pub fn mul_any(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    any(x, y, Kind::Mul)
}

fn any(x: &Tensor, y: &Tensor, kind: Kind) -> Result<Tensor> {
    let plain = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        Ok(match kind {
            Kind::Add => a.broadcast_add(b)?,
            Kind::Mul => a.broadcast_mul(b)?,
        })
    };
    let broadcasts_to =
        |small: &Tensor, big: &Tensor| small.elem_count() < big.elem_count() && small.broadcast_as(big.shape()).is_ok();
    match (x.track_op(), y.track_op()) {
        (true, true) if broadcasts_to(y, x) => tracked(x, y, kind),
        (true, true) if broadcasts_to(x, y) => tracked(y, x, kind),
        (true, true) | (false, false) => plain(x, y),
        (true, false) => apply(x, y, kind),
        // The op broadcasts the constant to the tracked operand: that needs the tracked one to
        // have the full shape, else fall back to the plain op.
        (false, true) if x.shape().elem_count() <= y.shape().elem_count() => apply(y, x, kind),
        (false, true) => plain(x, y),
    }
}
