//! A training set from dataset rows: every row's files checked up front (all problems reported
//! at once, before any GPU time is spent) and the train/val split.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};

use super::check::check_row_files;
use super::dataset::{read_rows, DatasetOptions, MaskRule, Problem, Row, Split, ValidationError};
use crate::hash::{mix64, str_hash};

/// What checking rows found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Rows that passed (all of them unless `skip_bad_rows`).
    pub rows: Vec<Row>,
    /// Number of rows dropped by `skip_bad_rows`.
    pub skipped: usize,
    /// The problems of the dropped rows.
    pub dropped: Vec<Problem>,
    /// Non-fatal findings: empty masks, a `position` that disagrees with the mask.
    pub warnings: Vec<Problem>,
}

/// Checks that every row's image and mask exist, decode and agree in size, and that the mask
/// is binarisable; decodes in parallel. `earlier` are problems from [`read_rows`] to report
/// together. Without `skip_bad_rows` any problem is an error listing all of them; with it,
/// bad rows are dropped and counted (fatal header problems still fail).
pub fn check_rows(rows: Vec<Row>, earlier: Vec<Problem>, skip_bad_rows: bool) -> Result<Checked> {
    check_indexed(rows, earlier, skip_bad_rows).map(|(c, _)| c)
}

/// [`check_rows`] plus the input index of every kept row.
fn check_indexed(rows: Vec<Row>, earlier: Vec<Problem>, skip_bad_rows: bool) -> Result<(Checked, Vec<usize>)> {
    let outcomes = check_row_files(&rows);
    let mut problems = earlier;
    let mut checked = Checked::default();
    let mut kept = Vec::new();
    for (i, (row, c)) in rows.into_iter().zip(outcomes).enumerate() {
        checked.warnings.extend(c.warnings(&row).into_iter().map(|w| Problem::row(&row.csv, row.line, w)));
        let errs = c.errors;
        if errs.is_empty() {
            checked.rows.push(row);
            kept.push(i);
        } else {
            problems.extend(errs.into_iter().map(|e| Problem::row(&row.csv, row.line, e)));
        }
    }
    problems.sort_by(|a, b| (&a.csv, a.line).cmp(&(&b.csv, b.line)));
    if problems.iter().any(|p| p.fatal) || (!skip_bad_rows && !problems.is_empty()) {
        return Err(ValidationError { problems }.into());
    }
    let mut bad: Vec<_> = problems.iter().map(|p| (&p.csv, p.line)).collect();
    bad.dedup();
    checked.skipped = bad.len();
    checked.dropped = problems;
    Ok((checked, kept))
}

/// Where the validation rows came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValSource {
    /// The CSVs' `val` rows.
    Csv,
    /// A seeded hold-out of the train rows.
    HeldOut,
}

/// Train and validation rows: the `val` rows when any exist, otherwise a hold-out of about
/// `val_fraction` of the train rows. The hold-out works per mask file (all questions about one
/// image land on the same side, so nothing leaks) and ranks images by a hash of (seed, path),
/// so it is deterministic, independent of row order, and never overlaps train.
pub fn train_val(rows: &[Row], val_fraction: f64, seed: u64) -> (Vec<Row>, Vec<Row>, ValSource) {
    let train: Vec<Row> = rows.iter().filter(|r| r.split == Split::Train).cloned().collect();
    let val: Vec<Row> = rows.iter().filter(|r| r.split == Split::Val).cloned().collect();
    if !val.is_empty() {
        return (train, val, ValSource::Csv);
    }
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in train.iter().enumerate() {
        groups.entry(r.mask.to_string_lossy().into_owned()).or_default().push(i);
    }
    let mut ranked: Vec<(u64, Vec<usize>)> =
        groups.into_iter().map(|(k, idx)| (mix64(str_hash(&k) ^ mix64(seed)), idx)).collect();
    ranked.sort();
    let want = ((train.len() as f64) * val_fraction.clamp(0.0, 1.0)).round() as usize;
    let mut held = vec![false; train.len()];
    let mut taken = 0;
    for (_, idx) in ranked {
        if taken >= want {
            break;
        }
        taken += idx.len();
        idx.into_iter().for_each(|i| held[i] = true);
    }
    let (v, t): (Vec<_>, Vec<_>) = train.into_iter().zip(held).partition(|(_, h)| *h);
    (t.into_iter().map(|(r, _)| r).collect(), v.into_iter().map(|(r, _)| r).collect(), ValSource::HeldOut)
}

/// Options for [`prepare`].
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub dataset: DatasetOptions,
    pub skip_bad_rows: bool,
    /// Hold-out fraction when the CSVs have no `val` rows.
    pub val_fraction: f64,
    pub seed: u64,
}

impl PrepareOptions {
    /// The options a run's configuration asks for (`data.*`, and `train.seed` for the hold-out).
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            dataset: DatasetOptions {
                mask_rule: MaskRule::from_nonzero_is_lesion(cfg.data.mask_nonzero_is_lesion),
                ..Default::default()
            },
            skip_bad_rows: cfg.data.skip_bad_rows,
            val_fraction: cfg.data.val_fraction,
            seed: cfg.train.seed,
        }
    }
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self { dataset: DatasetOptions::default(), skip_bad_rows: false, val_fraction: 0.05, seed: 0 }
    }
}

/// Checked train and validation rows, ready for training.
#[derive(Debug)]
pub struct Prepared {
    pub train: Vec<Row>,
    pub val: Vec<Row>,
    pub val_source: ValSource,
    /// Rows dropped by `skip_bad_rows` (reading and file problems together).
    pub skipped: usize,
    pub dropped: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

/// Everything `prs finetune` needs before training: read, pick train/val, check both splits
/// (test rows are not decoded). All problems come back in one [`ValidationError`].
pub fn prepare(source: &Path, opts: &PrepareOptions) -> Result<Prepared> {
    let read = read_rows(source, &opts.dataset)?;
    let (train, val, val_source) = train_val(&read.rows, opts.val_fraction, opts.seed);
    let n_train = train.len();
    let mut all = train;
    all.extend(val);
    let (checked, kept) = check_indexed(all, read.problems, opts.skip_bad_rows)?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (row, i) in checked.rows.into_iter().zip(kept) {
        if i < n_train {
            train.push(row)
        } else {
            val.push(row)
        }
    }
    if train.is_empty() {
        bail!("no train rows left in {}", source.display());
    }
    Ok(Prepared {
        train,
        val,
        val_source,
        skipped: checked.skipped,
        dropped: checked.dropped,
        warnings: checked.warnings,
    })
}
