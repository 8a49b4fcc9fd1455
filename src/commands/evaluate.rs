//! `prs evaluate`: predictions over a dataset split, then scores.
//!
//! Predictions are written as `prs predict` writes them (OUT/predictions/<id>/prob.png,
//! result.json, ...); scoring then reads 8-bit probability PNGs, so `--pred-dir` scores any
//! folder of such maps (ours, another tool's, the authors' result folders) the same way. At
//! threshold 0.5 the 8-bit map gives exactly the in-memory mask (see `pipeline::masks::prob_to_u8`).
//! A prediction of another size than the ground truth is resized with OpenCV's nearest rule,
//! as the authors' protocol does.
//!
//! Standard metrics (`metrics::seg`): Dice, IoU, precision, recall at `--threshold` per image,
//! per-image mean/std/median and pooled values, per modality and overall, with the empty-GT
//! policy written into the outputs. `--protocol prsmed` adds the authors' 256-threshold
//! protocol (their CSV, one file per modality); `--hd95` adds HD95 (pixels, or mm with
//! `--spacing`); answers are parsed to position labels and compared with the `position` column.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::predict::GenArgs;
use crate::data::dataset::{load_mask_with, read_rows, DatasetOptions, MaskRule, Row, Split};
use crate::data::prepare::check_rows;
use crate::data::preprocess::load_image;
use crate::files::{self, write_atomic, write_png_atomic};
use crate::metrics::hd95::hd95;
use crate::metrics::position::PositionReport;
use crate::metrics::prsmed::{
    evaluate_u8_pair, load_gray_u8, resize_nearest_u8, summarize as prsmed_summary, PrsmedImage, PrsmedSummary, U8Pair,
    CSV_HEADER,
};
use crate::metrics::seg::SegSummary;
use crate::metrics::{
    parse_position, Confusion, EmptyPolicy, Hd95Summary, PositionConfusion, PositionLabel, SegAccumulator,
};
use crate::pipeline::load::{load_model, ModelArgs};
use crate::pipeline::predict::{
    finished, predict_items, progress, unique_ids, write_predictions_csv, Item, PredictOptions, PREDICTIONS_KIND,
};
use crate::report::overlay::overlay_compare;

#[derive(clap::Args, Debug)]
pub struct EvaluateArgs {
    /// Trained checkpoint (project folder or the authors' release); not needed with --pred-dir.
    #[arg(long, required_unless_present = "pred_dir")]
    pub checkpoint: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset in the authors' layout (DATA_ROOT/annotations/*.csv).
    #[arg(long)]
    pub data_root: PathBuf,
    /// Split to score: train, val or test (the `split` column).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Output folder for the scores (summary.json, summary.md, per_image.csv), the predictions
    /// and the worst cases' overlays.
    #[arg(long, default_value = "prs-eval")]
    pub out: PathBuf,
    /// Score existing probability PNGs instead of predicting: DIR/<id>/prob.png (ours), or
    /// DIR[/<modality>]/<mask file name | image stem>.png.
    #[arg(long)]
    pub pred_dir: Option<PathBuf>,
    /// Mask threshold on the probability.
    #[arg(long, default_value_t = 0.5, value_parser = super::args::unit_interval_f32)]
    pub threshold: f32,
    /// Score of an image with an empty ground truth: ignore (excluded from the means), one, zero.
    #[arg(long, value_enum, default_value_t = EmptyPolicy::Ignore)]
    pub empty: EmptyPolicy,
    /// standard, or prsmed (adds the authors' 256-threshold protocol).
    #[arg(long, default_value = "standard")]
    pub protocol: String,
    /// Also compute HD95.
    #[arg(long)]
    pub hd95: bool,
    /// Pixel spacing in mm as ROW,COL (HD95 in mm instead of pixels).
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub spacing: Option<Vec<f64>>,
    /// Overlays of this many worst cases by Dice.
    #[arg(long, default_value_t = 8)]
    pub worst: usize,
    /// Images per forward.
    #[arg(long, default_value_t = 4, value_parser = super::args::at_least_one)]
    pub batch_size: usize,
    #[command(flatten)]
    pub gen: GenArgs,
    /// Reuse finished predictions in OUT/predictions.
    #[arg(long)]
    pub resume: bool,
    /// Only the first N rows of the split.
    #[arg(long, value_parser = super::args::at_least_one)]
    pub limit: Option<usize>,
    /// Drop rows whose files are missing or unreadable (counted) instead of failing.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Read every non-zero ground-truth mask value as lesion (class-id label masks); by default
    /// masks must be binary and other values are reported.
    #[arg(long, alias = "mask_nonzero_is_lesion")]
    pub mask_nonzero_is_lesion: bool,
    /// Method name in the prsmed CSVs (default: the checkpoint or prediction folder name).
    #[arg(long)]
    pub method: Option<String>,
}

/// One scored image (a row of per_image.csv).
#[derive(Clone, Debug, Serialize)]
pub struct CaseRow {
    pub id: String,
    pub modality: String,
    pub dice: f64,
    pub iou: f64,
    pub precision: f64,
    pub recall: f64,
    pub empty_gt: bool,
    pub empty_pred: bool,
    pub tp: u64,
    pub fp: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
    pub hd95: Option<f64>,
    pub position_truth: Option<String>,
    pub position_pred: Option<String>,
    pub answer: Option<String>,
    pub image: String,
    pub mask: String,
    pub prediction: String,
}

/// Scores of one group (a modality, or all images).
#[derive(Clone, Debug, Serialize)]
pub struct GroupSummary {
    #[serde(flatten)]
    pub seg: SegSummary,
    pub hd95: Option<Hd95Summary>,
    /// Rows with both a `position` and an answer.
    pub position: Option<PositionReport>,
    pub prsmed: Option<PrsmedSummary>,
}

struct Scored {
    conf: Confusion,
    hd95: Option<f64>,
    prsmed: Option<PrsmedImage>,
}

/// Everything `score_case` needs besides the files.
#[derive(Clone, Copy)]
struct ScoreOpts {
    threshold: f32,
    hd95: bool,
    spacing: Option<[f64; 2]>,
    prsmed: bool,
}

/// The prediction resized to the ground truth's size (nearest, OpenCV's rule) and the
/// ground truth binarised as the dataset does.
fn load_pair(pred: &Path, gt: &Path, rule: MaskRule) -> Result<(Vec<u8>, Vec<bool>, usize, usize)> {
    let (p, ph, pw) = load_gray_u8(pred)?;
    let g = load_mask_with(gt, rule)?;
    let (gw, gh) = (g.width() as usize, g.height() as usize);
    let p = resize_nearest_u8(&p, ph, pw, gh, gw);
    Ok((p, g.as_raw().iter().map(|&v| v > 127).collect(), gh, gw))
}

fn score_case(pred: &Path, gt_path: &Path, rule: MaskRule, o: ScoreOpts) -> Result<Scored> {
    let (p, gt, h, w) = load_pair(pred, gt_path, rule)?;
    let prob: Vec<f32> = p.iter().map(|&v| v as f32 / 255.0).collect();
    let conf = Confusion::from_prob(&prob, &gt, o.threshold)?;
    let hd = o.hd95.then(|| {
        let pm: Vec<bool> = prob.iter().map(|&v| v >= o.threshold).collect();
        hd95(&pm, &gt, h, w, o.spacing)
    });
    let prsmed = if o.prsmed {
        // The authors' own reading of the ground truth (cv2 grey, > 0.5).
        let (g, gh, gw) = load_gray_u8(gt_path)?;
        Some(evaluate_u8_pair(&U8Pair { pred: &p, pred_hw: (h, w), gt: &g, gt_hw: (gh, gw) })?)
    } else {
        None
    };
    Ok(Scored { conf, hd95: hd, prsmed })
}

/// Where a case's probability map may be, in order of preference.
fn prediction_candidates(root: &Path, id: &str, row: &Row, data_root: &Path) -> Vec<PathBuf> {
    let mask_name = row.mask.file_name().map(PathBuf::from).unwrap_or_default();
    let stem = row.image.file_stem().map(|s| format!("{}.png", s.to_string_lossy())).unwrap_or_default();
    let mut c = vec![root.join(id).join("prob.png")];
    for dir in [root.join(&row.modality), root.to_path_buf()] {
        c.push(dir.join(&mask_name));
        c.push(dir.join(&stem));
    }
    if let Ok(rel) = row.mask.strip_prefix(data_root) {
        c.push(root.join(rel));
    }
    c
}

/// Rows of the split, checked (files decode, sizes agree).
fn split_rows(args: &EvaluateArgs) -> Result<Vec<Row>> {
    let split =
        Split::parse(&args.split).with_context(|| format!("--split {}: expected train, val or test", args.split))?;
    let opts = DatasetOptions {
        mask_rule: MaskRule::from_nonzero_is_lesion(args.mask_nonzero_is_lesion),
        ..Default::default()
    };
    let read = read_rows(&args.data_root, &opts)?;
    // Problems of rows we cannot place in a split are reported, not fatal (they may be train rows).
    let (fatal, other): (Vec<_>, Vec<_>) = read.problems.into_iter().partition(|p| p.fatal);
    if !other.is_empty() {
        tracing::warn!("{} dataset row(s) could not be read (any split); first: {}", other.len(), other[0]);
    }
    let mut rows: Vec<Row> = read.rows.into_iter().filter(|r| r.split == split).collect();
    if let Some(n) = args.limit {
        rows.truncate(n);
    }
    let checked = check_rows(rows, fatal, args.skip_bad_rows)?;
    if checked.skipped > 0 {
        tracing::warn!("skipped {} bad row(s) (--skip-bad-rows)", checked.skipped);
    }
    ensure!(!checked.rows.is_empty(), "no {} rows in {}", args.split, args.data_root.display());
    Ok(checked.rows)
}

/// The ownership marker of an evaluation folder (`files::OWNER_MARKER`).
pub const EVALUATION_KIND: &str = "evaluation";

pub fn run(args: &EvaluateArgs) -> Result<()> {
    let policy = args.empty;
    let prsmed = match args.protocol.as_str() {
        "standard" => false,
        "prsmed" => true,
        other => bail!("--protocol {other}: expected standard or prsmed"),
    };
    let spacing = match args.spacing.as_deref() {
        None => None,
        Some([r, c]) if *r > 0.0 && *c > 0.0 => Some([*r, *c]),
        Some(v) => bail!("--spacing expects two positive numbers ROW,COL (mm per pixel), got {v:?}"),
    };
    ensure!((0.0..=1.0).contains(&args.threshold), "--threshold must be in [0, 1], got {}", args.threshold);
    let rows = split_rows(args)?;
    let rels: Vec<PathBuf> =
        rows.iter().map(|r| r.mask.strip_prefix(&args.data_root).unwrap_or(&r.mask).to_path_buf()).collect();
    let ids = unique_ids(&rels);
    files::claim_output_root(&args.out, EVALUATION_KIND, "--out")?;
    let _lock = files::DirLock::acquire(&args.out, "output folder")?;

    // 1. Predictions (unless given).
    let mut timing = BTreeMap::new();
    let pred_root = match &args.pred_dir {
        Some(d) => {
            ensure!(d.is_dir(), "--pred-dir {} is not a folder", d.display());
            d.clone()
        }
        None => {
            let ckpt = args.checkpoint.as_ref().context("--checkpoint is needed unless --pred-dir is given")?;
            let root = args.out.join("predictions");
            files::claim_output_root(&root, PREDICTIONS_KIND, "--out")?;
            files::remove_stale_temporaries(&root)?;
            let loaded = load_model(ckpt, &args.model)?;
            timing.insert("load_s", loaded.load_secs);
            let items: Vec<Item> = rows
                .iter()
                .zip(&ids)
                .map(|(r, id)| Item { id: id.clone(), image: r.image.clone(), question: r.question.clone() })
                .collect();
            let dirs: Vec<PathBuf> = ids.iter().map(|id| root.join(id)).collect();
            let opts = PredictOptions {
                gen: args.gen.options(),
                threshold: args.threshold,
                save_logits: false,
                batch_size: args.batch_size,
                resume: args.resume,
                // Its own predictions folder, inside an evaluation folder it owns.
                overwrite: true,
                fail_fast: false,
            };
            let t0 = Instant::now();
            let report = predict_items(&loaded, &items, &dirs, &opts)?;
            let secs = t0.elapsed().as_secs_f64();
            write_predictions_csv(&root.join("predictions.csv"), report.results.iter().flatten())?;
            if let Some((i, e)) = report.failures.first() {
                bail!(
                    "{} test case(s) could not be predicted, so the split cannot be scored; the first, {}: {e}",
                    report.failures.len(),
                    items[*i].image.display()
                );
            }
            timing.insert("predict_s", secs);
            timing.insert("predict_images_per_s", items.len() as f64 / secs.max(1e-9));
            root
        }
    };

    // 2. Find every prediction (all missing ones reported at once).
    let mut preds = Vec::with_capacity(rows.len());
    let mut missing = Vec::new();
    for ((row, id), rel) in rows.iter().zip(&ids).zip(&rels) {
        let cands = prediction_candidates(&pred_root, id, row, &args.data_root);
        match cands.iter().find(|p| p.is_file()) {
            Some(p) => preds.push(p.clone()),
            None => missing.push(format!("{} (tried {})", rel.display(), cands[0].display())),
        }
    }
    if !missing.is_empty() {
        bail!(
            "{} of {} cases have no prediction in {}:\n  {}",
            missing.len(),
            rows.len(),
            pred_root.display(),
            missing.iter().take(5).cloned().collect::<Vec<_>>().join("\n  ")
        );
    }
    let answers: Vec<Option<String>> = ids.iter().map(|id| finished(&pred_root.join(id)).map(|r| r.answer)).collect();

    // 3. Score in parallel.
    let t0 = Instant::now();
    let o = ScoreOpts { threshold: args.threshold, hd95: args.hd95, spacing, prsmed };
    let pb = progress(rows.len(), "score");
    let scored: Vec<Scored> = rows
        .par_iter()
        .zip(&preds)
        .map(|(row, pred)| {
            let s = score_case(pred, &row.mask, row.mask_rule, o)
                .with_context(|| format!("scoring {} against {}", pred.display(), row.mask.display()));
            pb.inc(1);
            s
        })
        .collect::<Result<_>>()?;
    pb.finish_and_clear();
    timing.insert("score_s", t0.elapsed().as_secs_f64());

    // 4. Aggregate per modality and overall.
    let mut cases = Vec::with_capacity(rows.len());
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, ((row, s), answer)) in rows.iter().zip(&scored).zip(&answers).enumerate() {
        let sc = crate::metrics::ImageScores::from_confusion(&s.conf, policy);
        let truth = row.position.map(PositionLabel::from);
        let pred = answer.as_deref().map(parse_position);
        cases.push(CaseRow {
            id: ids[i].clone(),
            modality: row.modality.clone(),
            dice: sc.dice,
            iou: sc.iou,
            precision: sc.precision,
            recall: sc.recall,
            empty_gt: sc.empty_gt,
            empty_pred: sc.empty_pred,
            tp: s.conf.tp,
            fp: s.conf.fp,
            fn_: s.conf.fn_,
            hd95: s.hd95,
            position_truth: truth.map(|t| t.as_str().into()),
            position_pred: pred.map(|p| p.as_str().into()),
            answer: answer.clone(),
            image: row.image.display().to_string(),
            mask: row.mask.display().to_string(),
            prediction: preds[i].display().to_string(),
        });
        groups.entry(row.modality.clone()).or_default().push(i);
    }
    let summarize_group = |idx: &[usize]| -> GroupSummary {
        let mut acc = SegAccumulator::new(policy, args.threshold);
        let mut conf = PositionConfusion::new();
        for &i in idx {
            acc.push_confusion(&scored[i].conf);
            if let (Some(t), Some(a)) = (rows[i].position, &answers[i]) {
                conf.add(t.into(), parse_position(a));
            }
        }
        let hd: Option<Vec<f64>> = idx.iter().map(|&i| scored[i].hd95).collect();
        let pm: Option<Vec<PrsmedImage>> = idx.iter().map(|&i| scored[i].prsmed.clone()).collect();
        GroupSummary {
            seg: acc.summary(),
            hd95: hd.filter(|_| args.hd95).map(|v| Hd95Summary::of(&v)),
            position: (conf.total() > 0).then(|| conf.report()),
            prsmed: pm.filter(|_| prsmed).map(|v| prsmed_summary(&v)),
        }
    };
    let all: Vec<usize> = (0..rows.len()).collect();
    let overall = summarize_group(&all);
    let per_modality: BTreeMap<String, GroupSummary> =
        groups.iter().map(|(m, idx)| (m.clone(), summarize_group(idx))).collect();

    // 5. Outputs.
    let method = args.method.clone().unwrap_or_else(|| {
        let src = args.checkpoint.as_ref().filter(|_| args.pred_dir.is_none()).or(args.pred_dir.as_ref());
        src.and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "prs".into())
    });
    let settings = serde_json::json!({
        "data_root": args.data_root.display().to_string(),
        "split": args.split,
        "checkpoint": args.checkpoint.as_ref().map(|p| p.display().to_string()),
        "predictions": pred_root.display().to_string(),
        "threshold": args.threshold,
        "empty_policy": policy.to_string(),
        "protocol": args.protocol,
        "hd95_unit": if spacing.is_some() { "mm" } else { "px" },
        "spacing": spacing,
        "n_images": rows.len(),
        "method": method,
    });
    let summary = serde_json::json!({
        "settings": settings,
        "timing": timing,
        "overall": overall,
        "per_modality": per_modality,
        "per_case": cases,
    });
    write_atomic(&args.out.join("summary.json"), |f| Ok(serde_json::to_writer_pretty(f, &summary)?))?;
    write_per_image_csv(&args.out.join("per_image.csv"), &cases)?;
    let md = summary_markdown(&settings, &overall, &per_modality);
    write_atomic(&args.out.join("summary.md"), |f| Ok(std::io::Write::write_all(f, md.as_bytes())?))?;
    if prsmed {
        let dir = args.out.join("prsmed");
        std::fs::create_dir_all(&dir)?;
        for (m, g) in &per_modality {
            let row = g.prsmed.as_ref().expect("computed with --protocol prsmed").csv_row(&method);
            let text = format!("{CSV_HEADER}\n{row}\n");
            write_atomic(&dir.join(format!("{m}.csv")), |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))?;
        }
    }
    write_worst(&args.out.join("worst"), &rows, &preds, &cases, args.worst, args.threshold)?;
    print!("{md}");
    if let Some(ips) = timing.get("predict_images_per_s") {
        println!("\nprediction throughput: {ips:.2} images/s");
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else {
        format!("{v:.6}")
    }
}

fn write_per_image_csv(path: &Path, cases: &[CaseRow]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "id",
        "modality",
        "dice",
        "iou",
        "precision",
        "recall",
        "empty_gt",
        "empty_pred",
        "tp",
        "fp",
        "fn",
        "hd95",
        "position_truth",
        "position_pred",
        "answer",
        "image",
        "mask",
        "prediction",
    ])?;
    for c in cases {
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        w.write_record([
            c.id.clone(),
            c.modality.clone(),
            num(c.dice),
            num(c.iou),
            num(c.precision),
            num(c.recall),
            c.empty_gt.to_string(),
            c.empty_pred.to_string(),
            c.tp.to_string(),
            c.fp.to_string(),
            c.fn_.to_string(),
            c.hd95.map(num).unwrap_or_default(),
            o(&c.position_truth),
            o(&c.position_pred),
            o(&c.answer),
            c.image.clone(),
            c.mask.clone(),
            c.prediction.clone(),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("writing per_image.csv: {e}"))?;
    write_atomic(path, |f| Ok(std::io::Write::write_all(f, &bytes)?))
}

/// A readable report: one table of standard metrics, position confusion matrices, the
/// authors' protocol when computed.
pub fn summary_markdown(
    settings: &serde_json::Value,
    overall: &GroupSummary,
    per_modality: &BTreeMap<String, GroupSummary>,
) -> String {
    let f = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.4}") };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Evaluation: {} split `{}`\n",
        settings["method"].as_str().unwrap_or(""),
        settings["split"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "Threshold {}, empty-ground-truth policy `{}` ({} of {} images have an empty ground truth; {} excluded from the means).\n",
        overall.seg.threshold, overall.seg.policy, overall.seg.n_empty_gt, overall.seg.n_images, overall.seg.n_excluded
    );
    let rows: Vec<(&str, &GroupSummary)> =
        per_modality.iter().map(|(m, g)| (m.as_str(), g)).chain(std::iter::once(("**all**", overall))).collect();
    let hd = overall.hd95.is_some();
    let _ = write!(s, "| modality | n | Dice mean ± std | Dice median | IoU mean ± std | pooled Dice | pooled IoU | precision | recall |");
    if hd {
        let _ = write!(s, " HD95 median ({}) |", settings["hd95_unit"].as_str().unwrap_or("px"));
    }
    let _ = writeln!(s, " position acc |");
    let _ = writeln!(s, "|{}", "---|".repeat(if hd { 11 } else { 10 }));
    for (m, g) in &rows {
        let d = &g.seg;
        let _ = write!(
            s,
            "| {m} | {} | {} ± {} | {} | {} ± {} | {} | {} | {} | {} |",
            d.n_images,
            f(d.dice.mean),
            f(d.dice.std),
            f(d.dice.median),
            f(d.iou.mean),
            f(d.iou.std),
            f(d.pooled_dice),
            f(d.pooled_iou),
            f(d.precision.mean),
            f(d.recall.mean)
        );
        if let Some(h) = &g.hd95 {
            let _ = write!(s, " {} |", f(h.stats.median));
        }
        let acc = g.position.as_ref().map(|p| format!("{} ({}/{})", f(p.accuracy), p.correct, p.total));
        let _ = writeln!(s, " {} |", acc.unwrap_or_else(|| "-".into()));
    }
    for (m, g) in &rows {
        let Some(p) = &g.position else { continue };
        let _ = writeln!(s, "\n## Position confusion: {m} (rows: truth, columns: answer)\n");
        let labels: Vec<&str> = PositionLabel::ALL.iter().map(|l| l.as_str()).collect();
        let _ = writeln!(s, "| truth \\ answer | {} |", labels.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(labels.len() + 1));
        for (i, l) in labels.iter().enumerate() {
            let cells: Vec<String> = p.counts[i].iter().map(|c| c.to_string()).collect();
            let _ = writeln!(s, "| {l} | {} |", cells.join(" | "));
        }
    }
    if overall.prsmed.is_some() {
        let _ = writeln!(s, "\n## PRS-Med protocol (256 thresholds)\n");
        let _ = writeln!(s, "| modality | n | meanDic | meanIoU | maxDic | maxIoU | Sm | wFm | meanEm | mae |");
        let _ = writeln!(s, "|{}", "---|".repeat(10));
        for (m, g) in &rows {
            if let Some(p) = &g.prsmed {
                let _ = writeln!(
                    s,
                    "| {m} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    p.n_images,
                    f(p.meanDic),
                    f(p.meanIoU),
                    f(p.maxDic),
                    f(p.maxIoU),
                    f(p.Sm),
                    f(p.wFm),
                    f(p.meanEm),
                    f(p.mae)
                );
            }
        }
    }
    s
}

/// Overlays (prediction tinted red, ground truth contour green) of the `n` lowest-Dice cases.
fn write_worst(dir: &Path, rows: &[Row], preds: &[PathBuf], cases: &[CaseRow], n: usize, threshold: f32) -> Result<()> {
    let mut order: Vec<usize> = (0..cases.len()).filter(|&i| cases[i].dice.is_finite()).collect();
    order.sort_by(|&a, &b| cases[a].dice.total_cmp(&cases[b].dice).then(a.cmp(&b)));
    order.truncate(n);
    if order.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    order.par_iter().enumerate().try_for_each(|(rank, &i)| -> Result<()> {
        let img = load_image(&rows[i].image)?.into_rgb8();
        let (p, gt, h, w) = load_pair(&preds[i], &rows[i].mask, rows[i].mask_rule)?;
        ensure!((w as u32, h as u32) == img.dimensions(), "{}: image and mask sizes differ", rows[i].image.display());
        let pm: Vec<bool> = p.iter().map(|&v| v as f32 / 255.0 >= threshold).collect();
        let ov = overlay_compare(&img, &pm, &gt)?;
        write_png_atomic(&ov, &dir.join(format!("{:02}_{}.png", rank + 1, cases[i].id)))
    })
}
