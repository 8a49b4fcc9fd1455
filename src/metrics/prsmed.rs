//! The PRS-Med authors' segmentation protocol ("prsmed"), reproduced exactly.
//!
//! It is the polyp-segmentation evaluation toolbox as the authors ported it to Python
//! (`evaluation/segmentation/eval.py` + `eval_functions.py` of their repository):
//! * prediction: 8-bit grey map, resized to the GT size with `cv2.INTER_NEAREST`
//!   ([`resize_nearest_u8`]), then `/255` in f64; GT: `gt/255 > 0.5` (i.e. >= 128);
//! * 256 thresholds `np.linspace(1, 0, 256)`, foreground = `pred >= t`, all evaluated from one
//!   histogram pass per image ([`threshold_cut`] maps each threshold to the smallest 8-bit level
//!   that passes it, with the same f64 arithmetic as numpy, so the diagonal `k/255 >= t` cases
//!   agree bit for bit);
//! * per image and threshold: Dice = 2I/(|P|+|G|), IoU = I/(|P|+|G|-I), Sen = I/|G|,
//!   Spe = TN/(TN+FP), and ALL FOUR are 0 when I = 0 (their `Fmeasure_calu`, even both empty);
//!   E-measure (Fan et al. 2018) on the binarised map; S-measure (alpha = 0.5, region split at
//!   the GT centroid rounded half-to-even as `np.round`); weighted F-measure (beta^2 = 1,
//!   7x7 Gaussian sigma 5 with edge-replicate borders, nearest-foreground feature transform with
//!   scipy's tie rule); MAE;
//! * dataset: per threshold, mean over images; `meanX`/`maxX` = mean/max over thresholds;
//!   Sm, wFm, mae = mean over images.
//!
//! Degenerate cases keep the authors' numerics on purpose (documented, not "fixed"):
//! an empty GT gives wFm = NaN (mean over no foreground pixels); a full GT gives Spe = NaN
//! whenever I > 0 (0/0); a GT whose centroid rounds to row 0 or column 0 gives Sm = NaN (an
//! empty region block). NaN then propagates into the dataset value like `np.mean`/`np.max`.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::hd95::feature_transform;

pub const N_THRESHOLDS: usize = 256;

/// Their CSV header (`', '.join(['method', *metrics])`).
pub const CSV_HEADER: &str =
    "method, meanDic, meanIoU, wFm, Sm, meanEm, mae, maxEm, maxDic, maxIoU, meanSen, maxSen, meanSpe, maxSpe";

const EPS: f64 = f64::EPSILON; // np.finfo(np.float64).eps

/// `np.linspace(1, 0, 256)`: `j * (-1/255) + 1`, last element exactly 0.
pub fn thresholds() -> [f64; N_THRESHOLDS] {
    let step = -1.0f64 / 255.0;
    let mut t = [0.0; N_THRESHOLDS];
    for (j, v) in t.iter_mut().enumerate().take(N_THRESHOLDS - 1) {
        *v = j as f64 * step + 1.0;
    }
    t
}

/// 8-bit level `k` as the authors' float: `k / 255` in f64.
fn level(k: usize) -> f64 {
    k as f64 / 255.0
}

/// For each threshold, the smallest level `k` with `k/255 >= t` (256 when none).
pub fn threshold_cut() -> [usize; N_THRESHOLDS] {
    let t = thresholds();
    let mut cut = [256; N_THRESHOLDS];
    for (c, &tj) in cut.iter_mut().zip(&t) {
        *c = (0..256).find(|&k| level(k) >= tj).unwrap_or(256);
    }
    cut
}

/// `cv2.resize(src, (dw, dh), interpolation=cv2.INTER_NEAREST)` for one channel: destination
/// pixel x reads source `min(floor(x * (1 / (dw / sw))), sw - 1)` (OpenCV's f64 arithmetic;
/// top-left rule, not PIL's pixel-centre rule `floor((x + 0.5) * sw / dw)`).
pub fn resize_nearest_u8(src: &[u8], sh: usize, sw: usize, dh: usize, dw: usize) -> Vec<u8> {
    assert_eq!(src.len(), sh * sw, "resize_nearest_u8: src length != sh*sw");
    if (sh, sw) == (dh, dw) {
        return src.to_vec();
    }
    let ifx = 1.0 / (dw as f64 / sw as f64);
    let ify = 1.0 / (dh as f64 / sh as f64);
    let xs: Vec<usize> = (0..dw).map(|x| ((x as f64 * ifx).floor() as usize).min(sw - 1)).collect();
    let mut out = Vec::with_capacity(dh * dw);
    for y in 0..dh {
        let sy = ((y as f64 * ify).floor() as usize).min(sh - 1);
        let row = &src[sy * sw..(sy + 1) * sw];
        out.extend(xs.iter().map(|&sx| row[sx]));
    }
    out
}

/// Ground truth as the authors binarise it: `gt / 255 > 0.5`.
pub fn binarize_gt_u8(gt: &[u8]) -> Vec<bool> {
    gt.iter().map(|&v| level(v as usize) > 0.5).collect()
}

/// Reads an image as one 8-bit grey channel like `cv2.imread(path, 0)` for the files that occur
/// here: grey PNG/JPEG as is, 16-bit grey scaled by 1/256 with rounding, colour by
/// BT.601 luma `(4899 R + 9617 G + 1868 B + 8192) >> 14` (exact for R = G = B; a coloured
/// prediction may differ by one level from libpng/libjpeg's own conversion). Alpha is ignored.
pub fn load_gray_u8(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let img = image::open(path).with_context(|| format!("reading image {}", path.display()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = match img {
        image::DynamicImage::ImageLuma8(b) => b.into_raw(),
        image::DynamicImage::ImageLumaA8(b) => b.into_raw().chunks_exact(2).map(|p| p[0]).collect(),
        image::DynamicImage::ImageLuma16(b) => {
            b.into_raw().iter().map(|&v| ((v as u32 + 128) >> 8).min(255) as u8).collect()
        }
        other => other
            .to_rgb8()
            .into_raw()
            .chunks_exact(3)
            .map(|p| ((4899 * p[0] as u32 + 9617 * p[1] as u32 + 1868 * p[2] as u32 + 8192) >> 14) as u8)
            .collect(),
    };
    Ok((data, h, w))
}

/// Per-image results: five 256-point curves (threshold order 1 -> 0) and three scalars.
#[derive(Debug, Clone, Serialize)]
pub struct PrsmedImage {
    pub dice: Vec<f64>,
    pub iou: Vec<f64>,
    pub sen: Vec<f64>,
    pub spe: Vec<f64>,
    pub em: Vec<f64>,
    pub sm: f64,
    pub wfm: f64,
    pub mae: f64,
}

/// Histograms of the 8-bit prediction per GT class in the four S-measure region blocks.
struct Hists {
    /// `[block][gt as usize][level]`, blocks LT, RT, LB, RB as in their `divide`.
    blocks: [[[u64; 256]; 2]; 4],
    whole: [[u64; 256]; 2],
}

/// Evaluates one image whose prediction already has the GT size (`h` x `w`).
pub fn evaluate_image(pred: &[u8], gt: &[bool], h: usize, w: usize) -> Result<PrsmedImage> {
    ensure!(pred.len() == h * w, "prediction has {} pixels, expected {h}x{w}", pred.len());
    ensure!(gt.len() == h * w, "ground truth has {} pixels, expected {h}x{w}", gt.len());
    ensure!(h * w > 0, "empty image");
    let n = h * w;
    let n_fg: u64 = gt.iter().map(|&g| g as u64).sum();
    let (cx, cy) = centroid(gt, h, w, n_fg);
    let hists = histograms(pred, gt, h, w, cx, cy);
    let [hist_bg, hist_fg] = hists.whole;

    // Suffix sums: foreground pixels / predicted pixels at level >= k.
    let (mut tp_ge, mut p_ge) = ([0u64; 257], [0u64; 257]);
    for k in (0..256).rev() {
        tp_ge[k] = tp_ge[k + 1] + hist_fg[k];
        p_ge[k] = p_ge[k + 1] + hist_fg[k] + hist_bg[k];
    }
    let mut out = PrsmedImage {
        dice: Vec::with_capacity(N_THRESHOLDS),
        iou: Vec::with_capacity(N_THRESHOLDS),
        sen: Vec::with_capacity(N_THRESHOLDS),
        spe: Vec::with_capacity(N_THRESHOLDS),
        em: Vec::with_capacity(N_THRESHOLDS),
        sm: structure_measure(&hists, n, n_fg),
        wfm: weighted_f(pred, gt, h, w, n_fg),
        mae: {
            let s: f64 = (0..256).map(|k| hist_fg[k] as f64 * (1.0 - level(k)) + hist_bg[k] as f64 * level(k)).sum();
            s / n as f64
        },
    };
    for &k in threshold_cut().iter() {
        let (tp, p, g) = (tp_ge[k], p_ge[k], n_fg);
        let (fn_, fp) = (g - tp, p - tp);
        let tn = (n as u64 - p) - fn_;
        if tp == 0 {
            out.dice.push(0.0);
            out.iou.push(0.0);
            out.sen.push(0.0);
            out.spe.push(0.0);
        } else {
            out.dice.push((2 * tp) as f64 / (g + p) as f64);
            out.iou.push(tp as f64 / (fn_ + p) as f64);
            out.sen.push(tp as f64 / g as f64);
            out.spe.push(tn as f64 / (tn + fp) as f64); // NaN for a full GT, as theirs
        }
        out.em.push(enhanced_measure(tp, fp, fn_, tn, n));
    }
    Ok(out)
}

/// Their `centroid`: rounded (half-to-even) mean row/column of the foreground, or the image
/// centre `(h // 2, w // 2)` when there is none.
fn centroid(gt: &[bool], h: usize, w: usize, n_fg: u64) -> (usize, usize) {
    if n_fg == 0 {
        return (h / 2, w / 2);
    }
    let (mut sr, mut sc) = (0u64, 0u64);
    for (i, _) in gt.iter().enumerate().filter(|(_, &g)| g) {
        sr += (i / w) as u64;
        sc += (i % w) as u64;
    }
    let r = (sr as f64 / n_fg as f64).round_ties_even() as usize;
    let c = (sc as f64 / n_fg as f64).round_ties_even() as usize;
    (r, c)
}

fn histograms(pred: &[u8], gt: &[bool], h: usize, w: usize, cx: usize, cy: usize) -> Hists {
    let mut blocks = [[[0u64; 256]; 2]; 4];
    for r in 0..h {
        let top = r < cx;
        for c in 0..w {
            let i = r * w + c;
            // LT = [:x, :y], RT = [x:, :y], LB = [:x, y:], RB = [x:, y:]
            let b = match (top, c < cy) {
                (true, true) => 0,
                (false, true) => 1,
                (true, false) => 2,
                (false, false) => 3,
            };
            blocks[b][gt[i] as usize][pred[i] as usize] += 1;
        }
    }
    let mut whole = [[0u64; 256]; 2];
    for b in &blocks {
        for g in 0..2 {
            for k in 0..256 {
                whole[g][k] += b[g][k];
            }
        }
    }
    Hists { blocks, whole }
}

/// Mean and population std of `f(level)` over a histogram (NaN mean when empty).
fn hist_mean_std(hist: &[u64; 256], f: impl Fn(usize) -> f64) -> (f64, f64) {
    let n: u64 = hist.iter().sum();
    let mean = (0..256).filter(|&k| hist[k] > 0).map(|k| hist[k] as f64 * f(k)).sum::<f64>() / n as f64;
    let var = (0..256).filter(|&k| hist[k] > 0).map(|k| hist[k] as f64 * (f(k) - mean).powi(2)).sum::<f64>() / n as f64;
    (mean, var.sqrt())
}

/// S-measure with alpha = 0.5 (their `StructureMeasure`).
fn structure_measure(hs: &Hists, n: usize, n_fg: u64) -> f64 {
    let [bg, fg] = &hs.whole;
    let y = n_fg as f64 / n as f64;
    if n_fg == 0 || n_fg == n as u64 {
        let total: [u64; 256] = std::array::from_fn(|k| fg[k] + bg[k]);
        let (mean_pred, _) = hist_mean_std(&total, level);
        return if n_fg == 0 { 1.0 - mean_pred } else { mean_pred };
    }
    let object = |hist: &[u64; 256], f: &dyn Fn(usize) -> f64| {
        let (x, sigma) = hist_mean_std(hist, f);
        2.0 * x / (x * x + 1.0 + sigma + EPS)
    };
    let o_fg = object(fg, &level);
    let o_bg = object(bg, &|k| 1.0 - level(k));
    let s_object = y * o_fg + (1.0 - y) * o_bg;

    let mut s_region = 0.0;
    for b in &hs.blocks {
        let [bbg, bfg] = b;
        let nb: u64 = bbg.iter().chain(bfg.iter()).sum();
        let nf: u64 = bfg.iter().sum();
        let wgt = nb as f64 / n as f64;
        s_region += ssim_block(bbg, bfg, nb, nf) * wgt;
    }
    let q = 0.5 * s_object + 0.5 * s_region;
    if q < 0.0 {
        0.0
    } else {
        q
    }
}

/// Their `ssim` of one block from its per-class histograms (NaN for an empty block, as theirs).
fn ssim_block(bg: &[u64; 256], fg: &[u64; 256], nb: u64, nf: u64) -> f64 {
    let nbf = nb as f64;
    let x: f64 = (0..256).map(|k| (fg[k] + bg[k]) as f64 * level(k)).sum::<f64>() / nbf;
    let y = nf as f64 / nbf;
    let den = nbf - 1.0 + EPS;
    let (mut sxx, mut sxy) = (0.0, 0.0);
    for (g, hist) in [(0.0, bg), (1.0, fg)] {
        for k in (0..256).filter(|&k| hist[k] > 0) {
            let (dx, dy) = (level(k) - x, g - y);
            sxx += hist[k] as f64 * dx * dx;
            sxy += hist[k] as f64 * dx * dy;
        }
    }
    let syy = nf as f64 * (1.0 - y).powi(2) + (nb - nf) as f64 * y * y;
    let (sigma_x2, sigma_y2, sigma_xy) = (sxx / den, syy / den, sxy / den);
    let alpha = 4.0 * x * y * sigma_xy;
    let beta = (x * x + y * y) * (sigma_x2 + sigma_y2);
    if alpha != 0.0 {
        alpha / (beta + EPS)
    } else if beta == 0.0 {
        1.0
    } else {
        0.0
    }
}

/// Enhanced-alignment measure of a binary map from its four counts (each pixel's term depends
/// only on its (gt, pred) class).
fn enhanced_measure(tp: u64, fp: u64, fn_: u64, tn: u64, n: usize) -> f64 {
    let g = tp + fn_;
    let p = tp + fp;
    let nf = n as f64;
    let sum = if g == 0 {
        (n as u64 - p) as f64
    } else if g == n as u64 {
        p as f64
    } else {
        let (mu_p, mu_g) = (p as f64 / nf, g as f64 / nf);
        let term = |gv: f64, pv: f64| {
            let (ag, ap) = (gv - mu_g, pv - mu_p);
            let align = 2.0 * (ag * ap) / (ag * ag + ap * ap + EPS);
            (align + 1.0).powi(2) / 4.0
        };
        tp as f64 * term(1.0, 1.0)
            + fp as f64 * term(0.0, 1.0)
            + fn_ as f64 * term(1.0, 0.0)
            + tn as f64 * term(0.0, 0.0)
    };
    sum / (nf - 1.0 + EPS)
}

/// Weighted F-measure, beta^2 = 1 (their `original_WFb`).
fn weighted_f(pred: &[u8], gt: &[bool], h: usize, w: usize, n_fg: u64) -> f64 {
    if n_fg == 0 {
        return f64::NAN; // 1 - mean(Ew[gt == 1]) over no pixels
    }
    let n = h * w;
    let e: Vec<f64> = pred.iter().zip(gt).map(|(&p, &g)| (level(p as usize) - g as u8 as f64).abs()).collect();
    let ft = feature_transform(gt, h, w, [1.0, 1.0]);
    let et: Vec<f64> = (0..n).map(|i| if gt[i] { e[i] } else { e[ft.nearest[i] as usize] }).collect();
    let ea = gaussian7_nearest(&et, h, w);
    let decay = (1.0f64 - 0.5).ln() / 5.0;
    let (mut sum_fg, mut sum_bg) = (0.0, 0.0);
    for i in 0..n {
        if gt[i] {
            sum_fg += if ea[i] < e[i] { ea[i] } else { e[i] };
        } else {
            let b = 2.0 - (decay * ft.dist_sq[i].sqrt()).exp();
            sum_bg += e[i] * b;
        }
    }
    let tpw = n_fg as f64 - sum_fg;
    let fpw = sum_bg;
    let r = 1.0 - sum_fg / n_fg as f64;
    let p = tpw / (tpw + fpw + EPS);
    2.0 * r * p / (r + p + EPS)
}

/// `convolve(x, fspecial_gauss(7, 5), mode='nearest')`; the kernel is separable and symmetric,
/// so two 1-D passes with edge-replicated borders.
fn gaussian7_nearest(x: &[f64], h: usize, w: usize) -> Vec<f64> {
    let mut k1 = [0.0f64; 7];
    for (i, k) in k1.iter_mut().enumerate() {
        let d = i as f64 - 3.0;
        *k = (-(d * d) / (2.0 * 5.0 * 5.0)).exp();
    }
    let s: f64 = k1.iter().sum();
    k1.iter_mut().for_each(|k| *k /= s);
    let clamp = |v: isize, hi: usize| v.clamp(0, hi as isize - 1) as usize;
    let mut tmp = vec![0.0; h * w];
    for r in 0..h {
        for c in 0..w {
            tmp[r * w + c] = (0..7).map(|j| k1[j] * x[r * w + clamp(c as isize + j as isize - 3, w)]).sum();
        }
    }
    let mut out = vec![0.0; h * w];
    for r in 0..h {
        for c in 0..w {
            out[r * w + c] = (0..7).map(|i| k1[i] * tmp[clamp(r as isize + i as isize - 3, h) * w + c]).sum();
        }
    }
    out
}

/// One dataset item: 8-bit prediction (any size) and 8-bit ground truth.
#[derive(Debug, Clone, Copy)]
pub struct U8Pair<'a> {
    pub pred: &'a [u8],
    pub pred_hw: (usize, usize),
    pub gt: &'a [u8],
    pub gt_hw: (usize, usize),
}

/// Full per-image protocol: nearest resize to the GT size, binarise the GT, evaluate.
pub fn evaluate_u8_pair(p: &U8Pair<'_>) -> Result<PrsmedImage> {
    let ((ph, pw), (gh, gw)) = (p.pred_hw, p.gt_hw);
    ensure!(p.pred.len() == ph * pw, "prediction has {} pixels, expected {ph}x{pw}", p.pred.len());
    ensure!(p.gt.len() == gh * gw, "ground truth has {} pixels, expected {gh}x{gw}", p.gt.len());
    let pred = resize_nearest_u8(p.pred, ph, pw, gh, gw);
    evaluate_image(&pred, &binarize_gt_u8(p.gt), gh, gw)
}

/// Evaluates all images in parallel (results in input order).
pub fn evaluate_dataset(pairs: &[U8Pair<'_>]) -> Result<Vec<PrsmedImage>> {
    pairs
        .par_iter()
        .enumerate()
        .map(|(i, p)| evaluate_u8_pair(p).with_context(|| format!("prsmed: image {i}")))
        .collect()
}

/// Per-threshold means over images (their `np.mean(threshold_X, axis=0)`).
#[derive(Debug, Clone, Serialize)]
pub struct PrsmedCurves {
    pub dice: Vec<f64>,
    pub iou: Vec<f64>,
    pub sen: Vec<f64>,
    pub spe: Vec<f64>,
    pub em: Vec<f64>,
}

pub fn mean_curves(images: &[PrsmedImage]) -> PrsmedCurves {
    let col = |f: fn(&PrsmedImage) -> &Vec<f64>| -> Vec<f64> {
        (0..N_THRESHOLDS).map(|j| mean(images.iter().map(|im| f(im)[j]))).collect()
    };
    PrsmedCurves {
        dice: col(|i| &i.dice),
        iou: col(|i| &i.iou),
        sen: col(|i| &i.sen),
        spe: col(|i| &i.spe),
        em: col(|i| &i.em),
    }
}

fn mean(it: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = it.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    s / n as f64
}

/// `np.max`: NaN if any element is NaN.
fn nan_max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, |m, x| if m.is_nan() || x.is_nan() { f64::NAN } else { m.max(x) })
}

/// One row of their CSV.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[allow(non_snake_case)]
pub struct PrsmedSummary {
    pub n_images: usize,
    pub meanDic: f64,
    pub meanIoU: f64,
    pub wFm: f64,
    pub Sm: f64,
    pub meanEm: f64,
    pub mae: f64,
    pub maxEm: f64,
    pub maxDic: f64,
    pub maxIoU: f64,
    pub meanSen: f64,
    pub maxSen: f64,
    pub meanSpe: f64,
    pub maxSpe: f64,
}

pub fn summarize(images: &[PrsmedImage]) -> PrsmedSummary {
    let c = mean_curves(images);
    let avg = |v: &[f64]| mean(v.iter().copied());
    PrsmedSummary {
        n_images: images.len(),
        meanDic: avg(&c.dice),
        meanIoU: avg(&c.iou),
        wFm: mean(images.iter().map(|i| i.wfm)),
        Sm: mean(images.iter().map(|i| i.sm)),
        meanEm: avg(&c.em),
        mae: mean(images.iter().map(|i| i.mae)),
        maxEm: nan_max(&c.em),
        maxDic: nan_max(&c.dice),
        maxIoU: nan_max(&c.iou),
        meanSen: avg(&c.sen),
        maxSen: nan_max(&c.sen),
        meanSpe: avg(&c.spe),
        maxSpe: nan_max(&c.spe),
    }
}

impl PrsmedSummary {
    /// The 13 values in CSV header order.
    pub fn values(&self) -> [f64; 13] {
        [
            self.meanDic,
            self.meanIoU,
            self.wFm,
            self.Sm,
            self.meanEm,
            self.mae,
            self.maxEm,
            self.maxDic,
            self.maxIoU,
            self.meanSen,
            self.maxSen,
            self.meanSpe,
            self.maxSpe,
        ]
    }

    /// Their row format: `method,` then every value as `{:.4f},` (trailing comma included,
    /// NaN written `nan` like Python), no newline.
    pub fn csv_row(&self, method: &str) -> String {
        let mut s = format!("{method},");
        for v in self.values() {
            if v.is_nan() {
                s.push_str("nan,");
            } else if v.is_infinite() {
                s.push_str(if v > 0.0 { "inf," } else { "-inf," });
            } else {
                s.push_str(&format!("{v:.4},"));
            }
        }
        s
    }
}
