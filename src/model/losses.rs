//! PRS-Med losses: structure loss on the mask logits, next-token cross-entropy on the answer,
//! modality cross-entropy. All in f32.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

use crate::nn::consts::{add_const, mul_const};

/// Which form of the segmentation BCE to use (see the reference, section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossCompat {
    /// PraNet's intended structure loss: boundary-weighted BCE + weighted IoU.
    #[default]
    Intended,
    /// The authors' code: an unweighted global-mean BCE (a legacy `reduce=` argument) + weighted IoU.
    Authors,
}

/// Box mean over a k x k window, stride 1, zero padding counted (avg_pool2d(k, 1, k/2) with
/// count_include_pad), as two matmuls with a band matrix (ones where |i - j| <= k/2): one op per
/// axis instead of a k-wide convolution (an im2col of k x the map). On a binary mask every window
/// sum is a small integer, so only the final division rounds.
pub fn box_mean(g: &Tensor, k: usize) -> Result<Tensor> {
    let (b, c, h, w) = g.dims4()?;
    let band = |n: usize| -> Result<Tensor> {
        let p = (k / 2) as i64;
        let v: Vec<f32> =
            (0..n * n).map(|i| if ((i / n) as i64 - (i % n) as i64).abs() <= p { 1.0 } else { 0.0 }).collect();
        Ok(Tensor::from_vec(v, (n, n), g.device())?.to_dtype(g.dtype())?)
    };
    let rows = g.reshape((b * c * h, w))?.matmul(&band(w)?)?.reshape((b * c, h, w))?;
    let both = band(h)?.broadcast_left(b * c)?.matmul(&rows)?;
    Ok((both / (k * k) as f64)?.reshape((b, c, h, w))?)
}

/// Structure loss of logits `p` (B,1,H,W) against a binary mask `g` (B,1,H,W): mean over the
/// batch of (weighted BCE + weighted IoU), w = 1 + 5 |box31(g) - g|.
pub fn structure_loss(p: &Tensor, g: &Tensor, compat: LossCompat) -> Result<Tensor> {
    Ok(structure_loss_per_image(p, g, compat)?.mean_all()?)
}

/// The structure loss of each image, (B,). The authors' variant uses each image's unweighted
/// mean BCE (their global mean over equally sized images is the mean of these).
pub fn structure_loss_per_image(p: &Tensor, g: &Tensor, compat: LossCompat) -> Result<Tensor> {
    if p.dims() != g.dims() {
        bail!("mask logits {:?} and target {:?} differ in shape", p.dims(), g.dims());
    }
    let p = p.to_dtype(DType::F32)?;
    let g = g.to_dtype(DType::F32)?.detach();
    let w = ((box_mean(&g, 31)? - &g)?.abs()? * 5.0)?.affine(1.0, 1.0)?;
    // Stable BCE with logits: max(p,0) - p g + log(1 + exp(-|p|)).
    let bce = ((p.relu()? - mul_const(&p, &g)?)? + (p.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let sum_hw = |t: &Tensor| -> Result<Tensor> { Ok(t.sum(D::Minus1)?.sum(D::Minus1)?.squeeze(1)?) };
    let bce_term = match compat {
        Compat::Intended => mul_const(&sum_hw(&mul_const(&bce, &w)?)?, &sum_hw(&w)?.recip()?)?,
        Compat::Authors => sum_hw(&bce)?.affine(1.0 / (p.dim(2)? * p.dim(3)?) as f64, 0.0)?,
    };
    let s = candle_nn::ops::sigmoid(&p)?;
    let wg = (&w * &g)?;
    let inter = sum_hw(&mul_const(&s, &wg)?)?;
    let union = add_const(&sum_hw(&mul_const(&s, &w)?)?, &sum_hw(&wg)?)?;
    let wiou = ((inter.affine(1.0, 1.0)? / (union - &inter)?.affine(1.0, 1.0)?)?.neg()? + 1.0)?;
    Ok((bce_term + wiou)?)
}

type Compat = LossCompat;

/// Mean cross-entropy of logits (N,V) against class ids (N) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, targets)?)
}

/// Summed cross-entropy (a scalar): callers divide by the number of targets of the whole
/// optimizer step, so that accumulated micro-batches equal one large batch.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = targets.dim(0)? as f64;
    Ok((cross_entropy(logits, targets)? * n)?)
}
