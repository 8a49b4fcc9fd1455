//! Writing image embeddings into the token-embedding sequence (LLaVA's image-marker splice).
//!
//! `Tensor::cat` would do it, but its backward stores a gradient for every (untracked) text slice;
//! this op is over the image rows only: forward copies them into a copy of the text embeddings,
//! backward narrows the gradient back to the image rows.

use anyhow::{bail, Result};
use candle_core::{CustomOp1, Layout, Shape, Tensor};

use super::OnBackend;

struct SpliceRows {
    base: Tensor,
    offset: usize,
}

impl SpliceRows {
    fn forward<S: OnBackend>(&self, s: &S, l: &Layout) -> candle_core::Result<(S, Shape)> {
        let (b, t, h) = self.base.dims3()?;
        let (_, n, _) = l.shape().dims3()?;
        let (bs, bl) = self.base.storage_and_layout();
        let mut out = S::of(&bs)?.try_clone(bl)?;
        // One block of n*h elements per sample: rows -> base[:, offset..offset+n].
        s.copy2d(&mut out, b, n * h, n * h, t * h, l.start_offset(), self.offset * h)?;
        Ok((out, Shape::from((b, t, h))))
    }
}

impl CustomOp1 for SpliceRows {
    fn name(&self) -> &'static str {
        "splice-rows"
    }

    same_forward_on_every_backend!(|op: &Self, s, l| op.forward(s, l));

    fn bwd(&self, rows: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.narrow(1, self.offset, rows.dim(1)?)?))
    }
}

/// `base` (B,T,H) with rows `offset..offset+N` replaced by `rows` (B,N,H); only `rows` is
/// differentiated. `base` must not be tracked.
pub fn splice_rows(base: &Tensor, rows: &Tensor, offset: usize) -> Result<Tensor> {
    let (b, t, h) = base.dims3()?;
    let (rb, n, rh) = rows.dims3()?;
    if rb != b || rh != h || offset + n > t {
        bail!("splice: rows {:?} do not fit embeddings {:?} at offset {offset}", rows.dims(), base.dims());
    }
    if base.track_op() {
        bail!("internal error: splice base embeddings must not be tracked");
    }
    let base = base.contiguous()?;
    let rows = rows.to_dtype(base.dtype())?.contiguous()?;
    Ok(rows.apply_op1(SpliceRows { base, offset })?)
}
