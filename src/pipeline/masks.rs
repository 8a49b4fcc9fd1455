//! From mask logits to what a user sees: the probability map at the original image size, its
//! 8-bit form, the thresholded mask and its statistics.
//!
//! Upsampling choice: the (S,S) logits are resized to the original (H,W) with bilinear
//! interpolation, align_corners = false (candle's `upsample_bilinear2d`, the same sampling as
//! PyTorch's `F.interpolate`, which SAM uses to bring its masks back to the input size; no
//! antialiasing when shrinking), and the sigmoid is applied afterwards. Interpolating logits
//! rather than probabilities keeps boundaries sharp and makes `prob >= 0.5` the same set as
//! `logit >= 0` of the interpolated logits.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// Probability map (row-major, `height * width`) at the original image size from one sample's
/// logits (1,1,S,S), (1,S,S) or (S,S). See the module docs for the resampling.
pub fn prob_map(mask_logits: &Tensor, width: u32, height: u32) -> Result<Vec<f32>> {
    ensure!(width > 0 && height > 0, "cannot resize a mask to {width}x{height}");
    let l = mask_logits.to_dtype(DType::F32)?;
    let l = match l.rank() {
        2 => l.unsqueeze(0)?.unsqueeze(0)?,
        3 => l.unsqueeze(0)?,
        4 => l,
        r => bail!("mask logits of rank {r}: expected (1,1,S,S)"),
    };
    let (n, c, s_h, s_w) = l.dims4()?;
    ensure!(n == 1 && c == 1, "prob_map takes one single-channel mask, got {:?}", l.dims());
    let l = if (s_h, s_w) == (height as usize, width as usize) {
        l
    } else {
        l.upsample_bilinear2d(height as usize, width as usize, false)?
    };
    Ok(candle_nn::ops::sigmoid(&l)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
}

/// 8-bit probability: round(p * 255). At threshold 0.5 `level / 255 >= 0.5` is exactly
/// `p >= 0.5`, so scoring the saved PNG reproduces the in-memory mask.
pub fn prob_to_u8(prob: &[f32]) -> Vec<u8> {
    prob.iter().map(|&p| (p.clamp(0.0, 1.0) * 255.0).round() as u8).collect()
}

/// Inclusive pixel bounding box.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BBox {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

/// Statistics of the thresholded mask (`prob >= threshold`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaskStats {
    /// Written as given (0.8, not the f32's 0.800000011920929).
    #[serde(serialize_with = "crate::nn::linear::serialize_f32_short")]
    pub threshold: f32,
    pub width: u32,
    pub height: u32,
    pub empty: bool,
    pub area_px: u64,
    pub area_fraction: f64,
    pub bbox: Option<BBox>,
    /// (x, y) mean pixel coordinate of the mask.
    pub centroid: Option<[f64; 2]>,
    /// Mean probability over the mask's pixels.
    pub mean_prob_inside: Option<f64>,
}

/// One pass over the probability map.
pub fn mask_stats(prob: &[f32], width: u32, height: u32, threshold: f32) -> Result<MaskStats> {
    let (w, h) = (width as usize, height as usize);
    ensure!(prob.len() == w * h, "probability map has {} pixels, expected {w}x{h}", prob.len());
    let (mut n, mut sx, mut sy, mut sp) = (0u64, 0f64, 0f64, 0f64);
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (y, row) in prob.chunks_exact(w.max(1)).enumerate() {
        for (x, &p) in row.iter().enumerate() {
            if p >= threshold {
                n += 1;
                sx += x as f64;
                sy += y as f64;
                sp += p as f64;
                x0 = x0.min(x as u32);
                x1 = x1.max(x as u32);
                y0 = y0.min(y as u32);
                y1 = y1.max(y as u32);
            }
        }
    }
    let empty = n == 0;
    let nf = n as f64;
    Ok(MaskStats {
        threshold,
        width,
        height,
        empty,
        area_px: n,
        area_fraction: nf / (w * h).max(1) as f64,
        bbox: (!empty).then_some(BBox { x0, y0, x1, y1 }),
        centroid: (!empty).then(|| [sx / nf, sy / nf]),
        mean_prob_inside: (!empty).then(|| sp / nf),
    })
}

/// Binary mask (`prob >= threshold`).
pub fn threshold_mask(prob: &[f32], threshold: f32) -> Vec<bool> {
    prob.iter().map(|&p| p >= threshold).collect()
}
