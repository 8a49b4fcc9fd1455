//! Overlays for predictions and evaluation reports: the image with a mask tinted and its
//! contour drawn. Text (the answer) is not rendered: it would need a font dependency, and the
//! answer is in `result.json` beside every overlay.

use anyhow::{ensure, Result};
use image::RgbImage;

/// Colours used by [`overlay_mask`] and [`overlay_compare`].
pub const PRED_COLOUR: [u8; 3] = [255, 40, 40];
pub const GT_COLOUR: [u8; 3] = [40, 220, 40];

/// Contour thickness growing with the image (1 px up to 256 px, then one more per 256 px).
fn thickness(w: u32, h: u32) -> usize {
    (w.max(h) as usize / 256).max(1)
}

/// Pixels of `mask` within `t` pixels (Chebyshev) of a background pixel or the image border:
/// the inner boundary, `t` pixels thick.
pub fn contour(mask: &[bool], w: usize, h: usize, t: usize) -> Vec<bool> {
    assert_eq!(mask.len(), w * h, "contour: mask length != w*h");
    // A 4-neighbour boundary first, then dilated by t-1 inside the mask.
    let at = |x: isize, y: isize| {
        x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h && mask[y as usize * w + x as usize]
    };
    let mut edge: Vec<bool> = (0..w * h)
        .map(|i| {
            let (x, y) = ((i % w) as isize, (i / w) as isize);
            mask[i] && !(at(x - 1, y) && at(x + 1, y) && at(x, y - 1) && at(x, y + 1))
        })
        .collect();
    for _ in 1..t {
        let prev = edge.clone();
        let on = |x: isize, y: isize| {
            x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h && prev[y as usize * w + x as usize]
        };
        for i in 0..w * h {
            if mask[i] && !prev[i] {
                let (x, y) = ((i % w) as isize, (i / w) as isize);
                edge[i] = on(x - 1, y) || on(x + 1, y) || on(x, y - 1) || on(x, y + 1);
            }
        }
    }
    edge
}

fn blend(px: &mut [u8], c: [u8; 3], alpha: f32) {
    for k in 0..3 {
        px[k] = (px[k] as f32 * (1.0 - alpha) + c[k] as f32 * alpha).round() as u8;
    }
}

/// The image with `mask` tinted (`alpha` of `colour`) and its contour drawn in `colour`.
pub fn overlay_mask(img: &RgbImage, mask: &[bool], colour: [u8; 3], alpha: f32) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    ensure!(mask.len() == (w * h) as usize, "overlay: mask has {} pixels, image is {w}x{h}", mask.len());
    let edge = contour(mask, w as usize, h as usize, thickness(w, h));
    let mut out = img.clone();
    for (i, px) in out.as_mut().chunks_exact_mut(3).enumerate() {
        if edge[i] {
            px.copy_from_slice(&colour);
        } else if mask[i] {
            blend(px, colour, alpha);
        }
    }
    Ok(out)
}

/// Prediction tinted with its contour ([`PRED_COLOUR`]) and the ground truth's contour
/// ([`GT_COLOUR`]) on top: for the worst cases of an evaluation.
pub fn overlay_compare(img: &RgbImage, pred: &[bool], gt: &[bool]) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    ensure!(gt.len() == (w * h) as usize, "overlay: ground truth has {} pixels, image is {w}x{h}", gt.len());
    let mut out = overlay_mask(img, pred, PRED_COLOUR, 0.35)?;
    let edge = contour(gt, w as usize, h as usize, thickness(w, h));
    for (px, _) in out.as_mut().chunks_exact_mut(3).zip(&edge).filter(|(_, &e)| e) {
        px.copy_from_slice(&GT_COLOUR);
    }
    Ok(out)
}
