//! Batch-size search per (precision, checkpointing) and the recommendation.
//!
//! Without an explicit list, batch sizes double from 1 until one does not fit (or the cap is
//! reached), then bisect between the last fit and the first failure: the largest batch that
//! fits is found in O(log) trials, each of which is a full training step.

use anyhow::Result;
use serde::Serialize;

use super::estimate::Estimate;
use super::measure::{Outcome, TrialResult};
use super::Precision;
use crate::config::{BaseQuant, Checkpointing};

/// What a row varies besides the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Setting {
    pub precision: Precision,
    pub base_quant: BaseQuant,
    pub checkpointing: Checkpointing,
}

/// One measured or predicted configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub batch: usize,
    /// ceil(effective batch / batch).
    pub accumulation: usize,
    #[serde(flatten)]
    pub setting: Setting,
    pub predicted_bytes: u64,
    pub measured_bytes: Option<u64>,
    /// (predicted - measured) / measured, in percent.
    pub error_pct: Option<f64>,
    pub step_seconds: Option<f64>,
    pub samples_per_s: Option<f64>,
    pub fits: bool,
    /// Why it does not fit / was not measured.
    pub note: Option<String>,
    #[serde(skip)]
    pub estimate: Option<Estimate>,
    #[serde(skip)]
    pub trial: Option<TrialResult>,
}

impl Row {
    /// batch x accumulation equals the requested effective batch.
    pub fn keeps_effective(&self, effective: usize) -> bool {
        self.batch * self.accumulation == effective
    }
}

pub struct SweepOptions {
    pub precisions: Vec<Precision>,
    pub quants: Vec<BaseQuant>,
    pub checkpointing: Vec<Checkpointing>,
    /// Explicit batch sizes (all are tried, in order); None = search.
    pub batch_sizes: Option<Vec<usize>>,
    /// Largest batch the search tries.
    pub max_batch: usize,
    pub effective_batch: usize,
    /// Memory available to the step (bytes) and the safety margin (fraction kept free).
    pub budget_bytes: u64,
    pub margin: f64,
    /// Run trials (else predictions decide what fits).
    pub measure: bool,
}

impl SweepOptions {
    pub fn limit(&self) -> u64 {
        (self.budget_bytes as f64 * (1.0 - self.margin)) as u64
    }
}

/// Batch sizes to try: `probe(batch)` says whether it fits. Explicit sizes are all tried;
/// otherwise doubling, then bisection. Returns the batches tried, in order.
pub fn search_batches(
    explicit: Option<&[usize]>,
    max_batch: usize,
    mut probe: impl FnMut(usize) -> Result<bool>,
) -> Result<Vec<usize>> {
    let mut tried = vec![];
    if let Some(list) = explicit {
        for &b in list {
            probe(b)?;
            tried.push(b);
        }
        return Ok(tried);
    }
    let max_batch = max_batch.max(1);
    let (mut lo, mut hi) = (0usize, None::<usize>);
    let mut b = 1;
    loop {
        tried.push(b);
        if probe(b)? {
            lo = b;
            if b >= max_batch {
                break;
            }
            b = (b * 2).min(max_batch);
        } else {
            hi = Some(b);
            break;
        }
    }
    if let Some(mut hi) = hi {
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            tried.push(mid);
            if probe(mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    Ok(tried)
}

impl SweepOptions {
    /// Every setting, precision outermost, then quantisation, then checkpointing.
    pub fn settings(&self) -> Vec<Setting> {
        let mut out = vec![];
        for &precision in &self.precisions {
            for &base_quant in &self.quants {
                for &checkpointing in &self.checkpointing {
                    out.push(Setting { precision, base_quant, checkpointing });
                }
            }
        }
        out
    }
}

/// All rows: for each setting, the batch search with `predict` (always) and `measure` (when
/// `opts.measure`) deciding what fits.
pub fn sweep(
    opts: &SweepOptions,
    mut predict: impl FnMut(usize, Setting) -> Result<Estimate>,
    mut measure: impl FnMut(usize, Setting) -> Result<Outcome>,
    mut on_row: impl FnMut(&Row),
) -> Result<Vec<Row>> {
    let limit = opts.limit();
    let mut rows = vec![];
    for set in opts.settings() {
        search_batches(opts.batch_sizes.as_deref(), opts.max_batch, |b| {
            let est = predict(b, set)?;
            let mut row = Row {
                batch: b,
                accumulation: opts.effective_batch.div_ceil(b).max(1),
                setting: set,
                predicted_bytes: est.peak_bytes,
                measured_bytes: None,
                error_pct: None,
                step_seconds: None,
                samples_per_s: None,
                fits: est.peak_bytes <= limit,
                note: None,
                estimate: Some(est),
                trial: None,
            };
            if opts.measure {
                match measure(b, set)? {
                    Outcome::Measured(r) => {
                        row.measured_bytes = Some(r.peak_bytes);
                        row.error_pct =
                            Some((row.predicted_bytes as f64 - r.peak_bytes as f64) / r.peak_bytes as f64 * 100.0);
                        row.step_seconds = Some(r.step_seconds);
                        row.samples_per_s = Some(r.samples_per_s);
                        row.fits = r.peak_bytes <= limit;
                        if !row.fits {
                            row.note = Some("over the budget after the safety margin".into());
                        }
                        row.trial = Some(r);
                    }
                    Outcome::DoesNotFit { reason } => {
                        row.fits = false;
                        row.note = Some(format!("does not fit ({reason})"));
                    }
                }
            } else if !row.fits {
                row.note = Some("predicted over the budget after the safety margin".into());
            }
            let fits = row.fits;
            on_row(&row);
            rows.push(row);
            Ok(fits)
        })?;
    }
    Ok(rows)
}

/// Index of the recommended row: among rows that fit and keep the effective batch, the
/// highest measured samples/s; without measurements, the least checkpointing (recomputing the
/// LLM layers costs about a third more compute, the vision parts a little more), then the
/// least quantisation (dequantising reads each weight once more per matmul, small next to a
/// matmul over hundreds of tokens), then the largest batch, then the precision listed first.
pub fn recommend(rows: &[Row], opts: &SweepOptions) -> Option<usize> {
    let ok = |r: &Row| r.fits && r.keeps_effective(opts.effective_batch);
    if opts.measure {
        rows.iter()
            .enumerate()
            .filter(|(_, r)| ok(r) && r.samples_per_s.is_some())
            .max_by(|a, b| a.1.samples_per_s.partial_cmp(&b.1.samples_per_s).unwrap_or(std::cmp::Ordering::Equal))
            .map(|(i, _)| i)
    } else {
        let rank = |r: &Row| {
            let s = r.setting;
            let p = opts.precisions.iter().position(|&q| q == s.precision).unwrap_or(0);
            let ck = match s.checkpointing {
                Checkpointing::Off => 2,
                Checkpointing::Llm => 1,
                Checkpointing::All => 0,
            };
            let q = match s.base_quant {
                BaseQuant::None => 2,
                BaseQuant::Int8 => 1,
                BaseQuant::Int4 => 0,
            };
            (ck, q, r.batch, usize::MAX - p)
        };
        rows.iter().enumerate().filter(|(_, r)| ok(r)).max_by_key(|(_, r)| rank(r)).map(|(i, _)| i)
    }
}
