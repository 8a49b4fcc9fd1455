//! Dataset verification (`prs data check`, nnU-Net's `verify_dataset_integrity`): every row is
//! read and checked as training would ([`super::dataset::read_rows`] for the CSVs, columns,
//! splits and paths; [`check_row_files`] for decoding, sizes, binary masks and the position
//! rule), plus duplicate rows, for all splits, and every problem is listed with its file and
//! line. Then a summary per modality and split: rows, images, image sizes, lesion area
//! quantiles, empty masks. No model weights are read.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Result;
use image::GenericImageView;
use rayon::prelude::*;
use serde::Serialize;

use super::dataset::{binarise_mask_with, read_rows, DatasetOptions, Problem, Row};
use super::position::position_of_mask;
use super::preprocess::decode_image;

/// What checking one row's image and mask found.
#[derive(Clone, Debug, Default)]
pub struct RowCheck {
    /// Problems that make the row unusable (unreadable file, size mismatch, non-binary mask).
    pub errors: Vec<String>,
    /// The row's `position` label disagrees with the mask's by the authors' rule.
    pub mismatch: Option<String>,
    /// The mask has no lesion pixel.
    pub empty_mask: bool,
    /// Image width and height, when it decoded.
    pub size: Option<(u32, u32)>,
    /// Lesion pixels / all pixels of the binarised mask.
    pub lesion_fraction: Option<f64>,
}

impl RowCheck {
    /// The non-fatal findings as training reports them.
    pub fn warnings(&self, row: &Row) -> Vec<String> {
        self.mismatch.iter().cloned().chain(self.empty_mask.then(|| empty_mask(row))).collect()
    }
}

fn empty_mask(row: &Row) -> String {
    format!("mask {} is empty", row.mask.display())
}

/// Decodes and checks every row's files, in parallel.
pub fn check_row_files(rows: &[Row]) -> Vec<RowCheck> {
    rows.par_iter().map(check_files).collect()
}

fn check_files(row: &Row) -> RowCheck {
    let mut c = RowCheck::default();
    let image = decode_image(&row.image).map_err(|e| c.errors.push(format!("image: {e:#}"))).ok();
    let mask = decode_image(&row.mask).map_err(|e| c.errors.push(format!("mask: {e:#}"))).ok();
    c.size = image.as_ref().map(|i| i.dimensions());
    if let (Some(i), Some(m)) = (&image, &mask) {
        let ((iw, ih), (mw, mh)) = (i.dimensions(), m.dimensions());
        if (iw, ih) != (mw, mh) {
            c.errors.push(format!("image is {iw}x{ih} but mask is {mw}x{mh}"));
        }
    }
    if let Some(m) = &mask {
        match binarise_mask_with(m, row.mask_rule) {
            Err(e) => c.errors.push(format!("mask {} {e}", row.mask.display())),
            Ok(bin) => {
                let lesion = bin.as_raw().iter().filter(|&&v| v > 127).count();
                c.lesion_fraction = Some(lesion as f64 / bin.as_raw().len().max(1) as f64);
                match (position_of_mask(&bin), row.position) {
                    (None, _) => c.empty_mask = true,
                    (Some(p), Some(q)) if p != q => {
                        c.mismatch = Some(format!("position column says {q:?} but the mask's box gives {p:?}"))
                    }
                    _ => {}
                }
            }
        }
    }
    c
}

/// A problem with a file and a line, for the report and its JSON.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Finding {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl From<&Problem> for Finding {
    fn from(p: &Problem) -> Self {
        Self { file: p.csv.display().to_string(), line: p.line, message: p.message.clone() }
    }
}

/// One modality and split.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GroupSummary {
    pub modality: String,
    pub split: String,
    pub rows: usize,
    /// Distinct image files.
    pub images: usize,
    /// "WxH" -> rows.
    pub sizes: BTreeMap<String, usize>,
    pub empty_masks: usize,
    /// Lesion area as a fraction of the image: min, 25%, median, 75%, max (non-empty masks).
    pub lesion_area_quantiles: Option<[f64; 5]>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DataReport {
    pub source: String,
    /// Rows read from the CSVs (rows with problems in their CSV fields are not among them).
    pub rows: usize,
    /// Everything that would stop training (or drop a row with --skip-bad-rows), and rows
    /// whose position label disagrees with their mask.
    pub problems: Vec<Finding>,
    /// Not wrong, worth knowing: empty masks.
    pub warnings: Vec<Finding>,
    pub groups: Vec<GroupSummary>,
}

/// Checks a dataset (a folder in the authors' layout or a plain CSV). Errors only when it
/// cannot be read at all; everything else is in the report.
pub fn check_dataset(source: &Path, opts: &DatasetOptions) -> Result<DataReport> {
    let read = read_rows(source, opts)?;
    let checks = check_row_files(&read.rows);
    let mut problems: Vec<Finding> = read.problems.iter().map(Finding::from).collect();
    let mut warnings = vec![];
    let at = |r: &Row, message: String| Finding { file: r.csv.display().to_string(), line: r.line, message };
    let mut first: HashMap<(String, &str, &str), &Row> = HashMap::new();
    for (r, c) in read.rows.iter().zip(&checks) {
        problems.extend(c.errors.iter().map(|e| at(r, e.clone())));
        problems.extend(c.mismatch.iter().map(|m| at(r, m.clone())));
        if c.empty_mask {
            warnings.push(at(r, empty_mask(r)));
        }
        let key = (r.mask.display().to_string(), r.question.as_str(), r.answer.as_str());
        match first.get(&key) {
            Some(f) => problems
                .push(at(r, format!("duplicate of {}:{} (same mask, question and answer)", f.csv.display(), f.line))),
            None => {
                first.insert(key, r);
            }
        }
    }
    problems.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    Ok(DataReport {
        source: source.display().to_string(),
        rows: read.rows.len(),
        problems,
        warnings,
        groups: summarise(&read.rows, &checks),
    })
}

/// One group's summary while rows are added, with its lesion areas and image paths.
#[derive(Default)]
struct Acc<'a> {
    g: GroupSummary,
    areas: Vec<f64>,
    images: Vec<&'a Path>,
}

fn summarise(rows: &[Row], checks: &[RowCheck]) -> Vec<GroupSummary> {
    // Keyed by modality, then split in train/val/test order.
    let mut groups: BTreeMap<(String, u8), Acc> = BTreeMap::new();
    for (r, c) in rows.iter().zip(checks) {
        let acc = groups.entry((r.modality.clone(), r.split as u8)).or_default();
        let g = &mut acc.g;
        (g.modality, g.split) = (r.modality.clone(), r.split.to_string());
        g.rows += 1;
        if let Some((w, h)) = c.size {
            *g.sizes.entry(format!("{w}x{h}")).or_default() += 1;
        }
        g.empty_masks += usize::from(c.empty_mask);
        acc.images.push(&r.image);
        acc.areas.extend(c.lesion_fraction.filter(|&a| a > 0.0));
    }
    groups
        .into_values()
        .map(|Acc { mut g, mut areas, mut images }| {
            images.sort();
            images.dedup();
            g.images = images.len();
            areas.sort_by(f64::total_cmp);
            g.lesion_area_quantiles =
                (!areas.is_empty()).then(|| [0.0, 0.25, 0.5, 0.75, 1.0].map(|q| quantile(&areas, q)));
            g
        })
        .collect()
}

/// Linear-interpolated quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl DataReport {
    /// The summary table and the warnings (the problems go into the error: [`Self::problem_list`]).
    pub fn render(&self) -> String {
        let mut s = format!("dataset {}: {} rows\n", self.source, self.rows);
        s += &format!(
            "{:<24} {:<5} {:>5} {:>6} {:>6}  {:<28} lesion area % (min/25/50/75/max)\n",
            "modality", "split", "rows", "images", "empty", "image sizes (rows)"
        );
        for g in &self.groups {
            let mut sizes: Vec<String> = g.sizes.iter().map(|(k, n)| format!("{k} ({n})")).collect();
            if sizes.len() > 3 {
                let more = sizes.len() - 2;
                sizes.truncate(2);
                sizes.push(format!("+{more} more"));
            }
            let areas = match g.lesion_area_quantiles {
                Some(q) => q.iter().map(|a| format!("{:.1}", a * 100.0)).collect::<Vec<_>>().join("/"),
                None => "-".into(),
            };
            s += &format!(
                "{:<24} {:<5} {:>5} {:>6} {:>6}  {:<28} {areas}\n",
                g.modality,
                g.split,
                g.rows,
                g.images,
                g.empty_masks,
                sizes.join(", ")
            );
        }
        if !self.warnings.is_empty() {
            s += &format!("{} warning(s):\n{}", self.warnings.len(), list(&self.warnings));
        }
        s
    }

    /// Every problem, one per line, with its file and line.
    pub fn problem_list(&self) -> String {
        list(&self.problems)
    }
}

fn list(findings: &[Finding]) -> String {
    findings.iter().map(|f| format!("  {}:{}: {}\n", f.file, f.line, f.message)).collect()
}
