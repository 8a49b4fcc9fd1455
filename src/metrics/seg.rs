//! Standard (MONAI / nnU-Net style) overlap metrics at one threshold.
//!
//! * A pixel is predicted foreground when `prob >= threshold` (MONAI `AsDiscrete(threshold=..)`).
//! * Per image: Dice = 2TP/(|P|+|G|), IoU = TP/(|P|+|G|-TP), precision = TP/|P|, recall = TP/|G|.
//! * Empty ground truth is decided by an explicit [`EmptyPolicy`] applied to all four metrics;
//!   with a non-empty ground truth and an empty prediction every metric is 0 (precision's 0/0
//!   is taken as 0: nothing was found).
//! * Beside the per-image means (gIoU in LISA's terms) the accumulator keeps pooled counts over
//!   ALL images: pooled Dice = 2ΣTP/(Σ|P|+Σ|G|), pooled IoU = ΣTP/Σ|P∪G| (LISA's cIoU).

use anyhow::{ensure, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use crate::config::EmptyPolicy;

/// Pixel counts of one image (or, summed, of a dataset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    pub tp: u64,
    pub fp: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
    pub tn: u64,
}

impl Confusion {
    /// Counts for `prob >= threshold` against `gt`.
    pub fn from_prob(prob: &[f32], gt: &[bool], threshold: f32) -> Result<Self> {
        ensure!(prob.len() == gt.len(), "prediction has {} pixels, ground truth {}", prob.len(), gt.len());
        Ok(Self::count(prob.iter().zip(gt).map(|(&p, &g)| (p >= threshold, g))))
    }

    /// Counts for a binary prediction.
    pub fn from_masks(pred: &[bool], gt: &[bool]) -> Result<Self> {
        ensure!(pred.len() == gt.len(), "prediction has {} pixels, ground truth {}", pred.len(), gt.len());
        Ok(Self::count(pred.iter().copied().zip(gt.iter().copied())))
    }

    fn count(pairs: impl Iterator<Item = (bool, bool)>) -> Self {
        let mut c = [0u64; 4]; // index = 2*pred + gt
        for (p, g) in pairs {
            c[(p as usize) << 1 | g as usize] += 1;
        }
        Self { tn: c[0], fn_: c[1], fp: c[2], tp: c[3] }
    }

    pub fn pred_count(&self) -> u64 {
        self.tp + self.fp
    }
    pub fn gt_count(&self) -> u64 {
        self.tp + self.fn_
    }
    pub fn union(&self) -> u64 {
        self.tp + self.fp + self.fn_
    }

    pub fn add(&mut self, o: &Confusion) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
        self.tn += o.tn;
    }
}

/// Per-image scores (NaN where the policy says "ignore").
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ImageScores {
    pub dice: f64,
    pub iou: f64,
    pub precision: f64,
    pub recall: f64,
    pub empty_gt: bool,
    pub empty_pred: bool,
}

impl ImageScores {
    pub fn from_confusion(c: &Confusion, policy: EmptyPolicy) -> Self {
        let (p, g, tp) = (c.pred_count(), c.gt_count(), c.tp);
        let (empty_gt, empty_pred) = (g == 0, p == 0);
        let ratio = |num: u64, den: u64| {
            if den == 0 {
                0.0
            } else {
                num as f64 / den as f64
            }
        };
        let (dice, iou, precision, recall) = if empty_gt {
            let v = match policy {
                EmptyPolicy::Ignore => f64::NAN,
                EmptyPolicy::One => (p == 0) as u8 as f64,
                EmptyPolicy::Zero => 0.0,
            };
            (v, v, v, v)
        } else {
            (ratio(2 * tp, p + g), ratio(tp, c.union()), ratio(tp, p), ratio(tp, g))
        };
        Self { dice, iou, precision, recall, empty_gt, empty_pred }
    }
}

/// One image's probability map and ground truth for [`evaluate_batch`].
#[derive(Debug, Clone, Copy)]
pub struct SegPair<'a> {
    pub prob: &'a [f32],
    pub gt: &'a [bool],
}

/// mean / std (population, ddof = 0, as `np.std`) / median (mean of the middle two for even n)
/// over the finite values; `n` is how many were used.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub mean: f64,
    pub std: f64,
    pub median: f64,
    pub n: usize,
}

impl Stats {
    /// Non-finite values (NaN from `EmptyPolicy::Ignore`, inf from HD95) are skipped.
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        let n = v.len();
        if n == 0 {
            return Self { mean: f64::NAN, std: f64::NAN, median: f64::NAN, n: 0 };
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64).sqrt();
        let mid = n / 2;
        let (_, &mut hi, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
        let median = if n % 2 == 1 {
            hi
        } else {
            // The lower middle is the largest of the (already partitioned) left part.
            let lo = v[..mid].iter().copied().fold(f64::NEG_INFINITY, f64::max);
            0.5 * (lo + hi)
        };
        Self { mean, std, median, n }
    }
}

/// Dataset summary; `policy` and `threshold` are written out so results say how they were made.
#[derive(Debug, Clone, Serialize)]
pub struct SegSummary {
    pub policy: EmptyPolicy,
    pub threshold: f32,
    pub n_images: usize,
    /// Images whose ground truth is empty (whatever the policy).
    pub n_empty_gt: usize,
    /// Images left out of the per-image means (empty GT under `Ignore`).
    pub n_excluded: usize,
    pub dice: Stats,
    pub iou: Stats,
    pub precision: Stats,
    pub recall: Stats,
    /// 2ΣTP / (Σ|P| + Σ|G|) over all images.
    pub pooled_dice: f64,
    /// ΣTP / Σ|P ∪ G| over all images (cIoU).
    pub pooled_iou: f64,
    pub pooled: Confusion,
}

/// Streaming accumulator (training-time validation pushes one image at a time).
#[derive(Debug, Clone)]
pub struct SegAccumulator {
    policy: EmptyPolicy,
    threshold: f32,
    scores: Vec<ImageScores>,
    pooled: Confusion,
}

impl SegAccumulator {
    pub fn new(policy: EmptyPolicy, threshold: f32) -> Self {
        Self { policy, threshold, scores: Vec::new(), pooled: Confusion::default() }
    }

    /// Scores one image, stores it, and returns its scores.
    pub fn push_prob(&mut self, prob: &[f32], gt: &[bool]) -> Result<ImageScores> {
        let c = Confusion::from_prob(prob, gt, self.threshold)?;
        Ok(self.push_confusion(&c))
    }

    pub fn push_confusion(&mut self, c: &Confusion) -> ImageScores {
        let s = ImageScores::from_confusion(c, self.policy);
        self.scores.push(s);
        self.pooled.add(c);
        s
    }

    pub fn merge(&mut self, other: SegAccumulator) {
        self.scores.extend(other.scores);
        self.pooled.add(&other.pooled);
    }

    pub fn scores(&self) -> &[ImageScores] {
        &self.scores
    }

    pub fn summary(&self) -> SegSummary {
        let col = |f: fn(&ImageScores) -> f64| Stats::of(&self.scores.iter().map(f).collect::<Vec<_>>());
        let n_empty_gt = self.scores.iter().filter(|s| s.empty_gt).count();
        let p = &self.pooled;
        let pooled_dice = pooled_ratio(2 * p.tp, p.pred_count() + p.gt_count(), self.policy);
        let pooled_iou = pooled_ratio(p.tp, p.union(), self.policy);
        SegSummary {
            policy: self.policy,
            threshold: self.threshold,
            n_images: self.scores.len(),
            n_empty_gt,
            n_excluded: self.scores.iter().filter(|s| s.dice.is_nan()).count(),
            dice: col(|s| s.dice),
            iou: col(|s| s.iou),
            precision: col(|s| s.precision),
            recall: col(|s| s.recall),
            pooled_dice,
            pooled_iou,
            pooled: *p,
        }
    }
}

/// Pooled ratio; when every image is empty in both masks the policy decides.
fn pooled_ratio(num: u64, den: u64, policy: EmptyPolicy) -> f64 {
    if den > 0 {
        return num as f64 / den as f64;
    }
    match policy {
        EmptyPolicy::Ignore => f64::NAN,
        EmptyPolicy::One => 1.0,
        EmptyPolicy::Zero => 0.0,
    }
}

/// Scores many images in parallel; returns per-image scores (input order) and the summary.
pub fn evaluate_batch(
    pairs: &[SegPair<'_>],
    threshold: f32,
    policy: EmptyPolicy,
) -> Result<(Vec<ImageScores>, SegSummary)> {
    let confs: Vec<Confusion> = pairs
        .par_iter()
        .enumerate()
        .map(|(i, p)| Confusion::from_prob(p.prob, p.gt, threshold).map_err(|e| e.context(format!("image {i}"))))
        .collect::<Result<_>>()?;
    let mut acc = SegAccumulator::new(policy, threshold);
    for c in &confs {
        acc.push_confusion(c);
    }
    Ok((acc.scores.clone(), acc.summary()))
}

/// Binary mask from a float mask (e.g. a ground truth stored as 0/1 or 0/255 floats).
pub fn mask_from_f32(values: &[f32], threshold: f32) -> Vec<bool> {
    values.iter().map(|&v| v > threshold).collect()
}
