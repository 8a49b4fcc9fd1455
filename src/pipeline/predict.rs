//! The predict engine behind `prs predict` and `prs evaluate`: inputs (image + question) to
//! prediction folders, batched through the one generation loop, each folder written under a
//! temporary name and renamed when complete.
//!
//! A folder holds `mask.png` (0/255), `prob.png` (8-bit probability), `overlay.png`,
//! `result.json` and, when asked, `mask_logits.safetensors` ((1,1,S,S) f32). Outputs never
//! destroy what prs did not write: a prediction folder is replaced only when it holds nothing
//! but an earlier prediction and `overwrite` is set (see `files`). Ids become single safe folder
//! names, unique within a run.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::generate::{predict_batch, GenerateOptions};
use super::load::{Loaded, ModelInfo};
use super::masks::{mask_stats, prob_map, prob_to_u8, threshold_mask, MaskStats};
use crate::data::preprocess::{clip_preprocess, load_image, sam_preprocess, to_rgb};
use crate::files::{self, write_atomic, write_png_atomic, Existing};
use crate::metrics::{parse_position, position_from_mask};
use crate::model::prs_med::ModelBatch;
use crate::report::overlay::{overlay_mask, PRED_COLOUR};
use crate::tokenizer::{check_prompt_length, encode_prompt, PromptIds};
use crate::weights::shards::write_safetensors_atomic;

/// One input.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// Folder name of its prediction (unique within a run).
    pub id: String,
    pub image: PathBuf,
    pub question: String,
}

/// Timings of one prediction, in seconds. Batched work is split evenly over the batch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    pub load_s: f64,
    pub encode_s: f64,
    pub decode_s: f64,
    pub generated_tokens: usize,
    pub decode_per_token_s: Option<f64>,
    pub batch_size: usize,
}

/// `result.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ItemResult {
    pub id: String,
    pub image: String,
    pub question: String,
    pub answer: String,
    pub answer_ids: Vec<u32>,
    pub stopped_at_eos: bool,
    /// The answer parsed to a position label ("none" when it names none).
    pub position: String,
    /// The position rule applied to the predicted mask.
    pub mask_position: String,
    #[serde(flatten)]
    pub mask: MaskStats,
    pub model: ModelInfo,
    pub generation: GenerateOptions,
    pub timings: Timings,
}

/// What `predict_items` does besides generating.
#[derive(Clone, Debug)]
pub struct PredictOptions {
    pub gen: GenerateOptions,
    pub threshold: f32,
    pub save_logits: bool,
    pub batch_size: usize,
    /// Keep complete earlier predictions.
    pub resume: bool,
    /// Replace earlier predictions (of prs: anything else is always refused).
    pub overwrite: bool,
    /// Stop at the first input that fails instead of reporting it and going on.
    pub fail_fast: bool,
}

/// What `predict_items` did, in input order.
pub struct PredictReport {
    /// None for the inputs that failed.
    pub results: Vec<Option<ItemResult>>,
    /// (input index, what went wrong).
    pub failures: Vec<(usize, String)>,
    /// Predictions written by this run.
    pub written: usize,
    /// Complete earlier predictions kept (`resume`).
    pub kept: usize,
}

/// One input ready for the model: its tensors and the original image (outputs are drawn at its
/// resolution).
pub struct Prepared {
    clip: Tensor,
    sam: Tensor,
    prompt: PromptIds,
    pub image: RgbImage,
}

/// Prepares a decoded image and its question; `what` names the input in errors.
pub fn prepare_image(loaded: &Loaded, img: DynamicImage, question: &str, what: &str) -> Result<Prepared> {
    let img = to_rgb(img);
    let clip_size = loaded.model.spec.llava.vision_config()?.image_size;
    let clip = clip_preprocess(&img, clip_size)?;
    let sam = sam_preprocess(&img, loaded.cfg.model.sam_image_size)?;
    let prompt = encode_prompt(&loaded.tokenizer, &loaded.cfg.prompt.template, question, None)
        .with_context(|| format!("question for {what}"))?;
    check_prompt_length(&prompt, loaded.model.prompt_limits()?).with_context(|| format!("question for {what}"))?;
    Ok(Prepared { clip, sam, prompt, image: img.into_rgb8() })
}

fn prepare(loaded: &Loaded, item: &Item) -> Result<Prepared> {
    prepare_image(loaded, load_image(&item.image)?, &item.question, &item.image.display().to_string())
}

/// What a prediction's result names besides the model's output.
#[derive(Clone, Debug)]
pub struct ItemMeta {
    pub id: String,
    /// The image as the result names it (a path, or an upload's file name).
    pub image: String,
    pub question: String,
    pub threshold: f32,
}

/// One input predicted, in memory.
pub struct Prediction {
    pub result: ItemResult,
    /// Probability per pixel of the original image, row-major.
    pub prob: Vec<f32>,
    /// The model-resolution mask logits (1,1,S,S), on the model's device.
    pub logits: Tensor,
}

/// Runs the model once on a batch of prepared inputs (one generation loop for all of them).
pub fn predict_prepared(
    loaded: &Loaded,
    inputs: &[(&Prepared, ItemMeta)],
    gen: &GenerateOptions,
) -> Result<Vec<Prediction>> {
    ensure!(!inputs.is_empty(), "no inputs to predict");
    let dev = loaded.model.device().clone();
    let stack = |f: fn(&Prepared) -> &Tensor| -> Result<Tensor> {
        let ts: Vec<&Tensor> = inputs.iter().map(|(p, _)| f(p)).collect();
        Ok(Tensor::stack(&ts, 0)?.to_device(&dev)?)
    };
    let batch = ModelBatch {
        clip_pixels: stack(|p| &p.clip)?,
        sam_pixels: stack(|p| &p.sam)?,
        prompts: inputs.iter().map(|(p, _)| p.prompt.clone()).collect(),
        masks: None,
        modality: None,
    };
    let out = predict_batch(&loaded.model, &batch, gen)?;
    let n = inputs.len();
    let mut predictions = Vec::with_capacity(n);
    for (k, (p, meta)) in inputs.iter().enumerate() {
        let (w, h) = p.image.dimensions();
        let logits = out.mask_logits.narrow(0, k, 1)?;
        let prob = prob_map(&logits, w, h)?;
        let stats = mask_stats(&prob, w, h, meta.threshold)?;
        let mask = threshold_mask(&prob, meta.threshold);
        let ids = &out.answers[k];
        let answer = loaded.tokenizer.decode(ids, true).map_err(|e| anyhow::anyhow!("decoding the answer: {e}"))?;
        let result = ItemResult {
            id: meta.id.clone(),
            image: meta.image.clone(),
            question: meta.question.clone(),
            position: parse_position(&answer).as_str().into(),
            mask_position: position_from_mask(&mask, h as usize, w as usize).0.as_str().into(),
            answer,
            answer_ids: ids.clone(),
            stopped_at_eos: out.hit_eos[k],
            mask: stats,
            model: loaded.info.clone(),
            generation: gen.clone(),
            timings: Timings {
                load_s: loaded.load_secs,
                encode_s: out.encode_secs / n as f64,
                decode_s: out.decode_secs / n as f64,
                generated_tokens: ids.len(),
                decode_per_token_s: (out.decode_steps > 0).then(|| out.decode_secs / out.decode_steps as f64),
                batch_size: n,
            },
        };
        predictions.push(Prediction { result, prob, logits });
    }
    Ok(predictions)
}

/// The pictures of a prediction: the mask (0/255), the 8-bit probability and the overlay.
pub struct Rendered {
    pub mask: GrayImage,
    pub prob: GrayImage,
    pub overlay: RgbImage,
}

/// Draws a prediction at the image's resolution with `threshold`.
pub fn render(image: &RgbImage, prob: &[f32], threshold: f32) -> Result<Rendered> {
    let (w, h) = image.dimensions();
    let mask = threshold_mask(prob, threshold);
    let mask_u8: Vec<u8> = mask.iter().map(|&m| if m { 255 } else { 0 }).collect();
    let grey = |v: Vec<u8>| GrayImage::from_raw(w, h, v).context("probability map and image sizes differ");
    Ok(Rendered {
        mask: grey(mask_u8)?,
        prob: grey(prob_to_u8(prob))?,
        overlay: overlay_mask(image, &mask, PRED_COLOUR, 0.4)?,
    })
}

/// The files a prediction folder may hold (besides the ownership marker).
pub const PREDICTION_FILES: [&str; 5] =
    ["mask.png", "prob.png", "overlay.png", "result.json", "mask_logits.safetensors"];
/// Ownership markers (`files::OWNER_MARKER`) of a prediction folder and of a folder of them.
pub const PREDICTION_KIND: &str = "prediction";
pub const PREDICTIONS_KIND: &str = "predictions";

/// The folder `out/id` is complete (its result.json parses).
pub fn finished(dir: &Path) -> Option<ItemResult> {
    let text = std::fs::read_to_string(dir.join("result.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Checks every target folder before the model loads: which are complete earlier predictions
/// to keep (`resume`), and refuses (all at once) any that would replace what must not be.
pub fn check_targets(dirs: &[PathBuf], opts: &PredictOptions) -> Result<Vec<bool>> {
    let mut keep = vec![false; dirs.len()];
    let mut refused = vec![];
    for (i, dir) in dirs.iter().enumerate() {
        match files::inspect_output(dir, PREDICTION_KIND, Some(&PREDICTION_FILES))? {
            Existing::Absent | Existing::Empty => {}
            Existing::Ours if opts.resume && finished(dir).is_some() => keep[i] = true,
            Existing::Ours if opts.overwrite || opts.resume => {}
            Existing::Ours => refused.push(format!(
                "{} holds an earlier prediction: pass --overwrite to replace it, or --resume to keep it",
                dir.display()
            )),
            Existing::Foreign(found) => refused.push(format!(
                "{} exists and holds files prs predict did not write ({}): choose another --out",
                dir.display(),
                found.join(", ")
            )),
        }
    }
    if !refused.is_empty() {
        bail!(
            "{} output folder(s) refused, nothing was written:\n  {}{}",
            refused.len(),
            refused.iter().take(5).cloned().collect::<Vec<_>>().join("\n  "),
            if refused.len() > 5 { format!("\n  ... and {} more", refused.len() - 5) } else { String::new() }
        );
    }
    Ok(keep)
}

/// Writes an item's files into a temporary sibling folder and renames it to `dir`.
fn write_item(dir: &Path, image: &RgbImage, prob: &[f32], logits: Option<&Tensor>, res: &ItemResult) -> Result<()> {
    write_prediction_dir(dir, image, prob, logits, res, &[])
}

/// A prediction folder (see the module's notes), with `extra` files (name, bytes) beside the
/// usual ones: `prs serve --save-dir` keeps the upload there.
pub fn write_prediction_dir(
    dir: &Path,
    image: &RgbImage,
    prob: &[f32],
    logits: Option<&Tensor>,
    res: &ItemResult,
    extra: &[(&str, &[u8])],
) -> Result<()> {
    files::write_dir_atomic(dir, |tmp| {
        for (name, bytes) in extra {
            files::write_bytes_atomic(&tmp.join(name), bytes)?;
        }
        let pictures = render(image, prob, res.mask.threshold)?;
        write_png_atomic(&pictures.mask, &tmp.join("mask.png"))?;
        write_png_atomic(&pictures.prob, &tmp.join("prob.png"))?;
        write_png_atomic(&pictures.overlay, &tmp.join("overlay.png"))?;
        if let Some(l) = logits {
            write_safetensors_atomic(&tmp.join("mask_logits.safetensors"), &[("mask_logits".into(), l.clone())], None)?;
        }
        write_atomic(&tmp.join("result.json"), |f| Ok(serde_json::to_writer_pretty(f, res)?))?;
        files::mark_output(tmp, PREDICTION_KIND)
    })
}

/// A progress bar on stderr (hidden when stderr is not a terminal, and with -q).
pub fn progress(len: usize, msg: &str) -> ProgressBar {
    let pb = if crate::logging::progress_enabled() { ProgressBar::new(len as u64) } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// Predicts every item into `dirs[i]` (batched, model loaded once). An input that cannot be
/// prepared (unreadable image, over-long question) is reported in the returned failures and
/// the rest go on, unless `fail_fast`.
pub fn predict_items(
    loaded: &Loaded,
    items: &[Item],
    dirs: &[PathBuf],
    opts: &PredictOptions,
) -> Result<PredictReport> {
    ensure!(items.len() == dirs.len(), "{} items for {} folders", items.len(), dirs.len());
    ensure!(opts.batch_size > 0, "--batch-size must be at least 1");
    ensure!((0.0..=1.0).contains(&opts.threshold), "--threshold must be in [0, 1], got {}", opts.threshold);
    opts.gen.validate()?;
    let keep = check_targets(dirs, opts)?;
    let mut report = PredictReport {
        results: dirs.iter().zip(&keep).map(|(d, &k)| if k { finished(d) } else { None }).collect(),
        failures: vec![],
        written: 0,
        kept: keep.iter().filter(|&&k| k).count(),
    };
    let todo: Vec<usize> = (0..items.len()).filter(|&i| !keep[i]).collect();
    let pb = progress(items.len(), "predict");
    pb.inc(report.kept as u64);
    for chunk in todo.chunks(opts.batch_size) {
        let mut ready = Vec::with_capacity(chunk.len());
        for (&i, p) in chunk.iter().zip(chunk.par_iter().map(|&i| prepare(loaded, &items[i])).collect::<Vec<_>>()) {
            match p {
                Ok(p) => ready.push((i, p)),
                Err(e) if opts.fail_fast => return Err(e.context(format!("input `{}`", items[i].id))),
                Err(e) => {
                    pb.suspend(|| tracing::warn!("skipped input `{}`: {e:#}", items[i].id));
                    report.failures.push((i, format!("{e:#}")));
                    pb.inc(1);
                }
            }
        }
        if ready.is_empty() {
            continue;
        }
        let inputs: Vec<(&Prepared, ItemMeta)> = ready
            .iter()
            .map(|(i, p)| {
                let it = &items[*i];
                let meta = ItemMeta {
                    id: it.id.clone(),
                    image: it.image.display().to_string(),
                    question: it.question.clone(),
                    threshold: opts.threshold,
                };
                (p, meta)
            })
            .collect();
        let predictions = predict_prepared(loaded, &inputs, &opts.gen)?;
        for ((i, p), pred) in ready.iter().zip(predictions) {
            let l = if opts.save_logits { Some(pred.logits.to_device(&Device::Cpu)?) } else { None };
            write_item(&dirs[*i], &p.image, &pred.prob, l.as_ref(), &pred.result)?;
            report.results[*i] = Some(pred.result);
            report.written += 1;
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    Ok(report)
}

/// `failures.csv`: the inputs that could not be predicted and why.
pub fn write_failures_csv(path: &Path, items: &[Item], failures: &[(usize, String)]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["id", "image", "error"])?;
    for (i, e) in failures {
        w.write_record([items[*i].id.as_str(), &items[*i].image.display().to_string(), e.as_str()])?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("writing failures.csv: {e}"))?;
    files::write_bytes_atomic(path, &bytes)
}

/// `predictions.csv`: one row per input, in input order.
pub fn write_predictions_csv<'a>(path: &Path, results: impl IntoIterator<Item = &'a ItemResult>) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "id",
        "image",
        "question",
        "answer",
        "position",
        "mask_position",
        "empty",
        "area_px",
        "area_fraction",
        "bbox_x0",
        "bbox_y0",
        "bbox_x1",
        "bbox_y1",
        "centroid_x",
        "centroid_y",
        "mean_prob_inside",
    ])?;
    let opt = |v: Option<String>| v.unwrap_or_default();
    for r in results {
        let m = &r.mask;
        let b = m.bbox;
        w.write_record([
            r.id.clone(),
            r.image.clone(),
            r.question.clone(),
            r.answer.clone(),
            r.position.clone(),
            r.mask_position.clone(),
            m.empty.to_string(),
            m.area_px.to_string(),
            format!("{:.6}", m.area_fraction),
            opt(b.map(|b| b.x0.to_string())),
            opt(b.map(|b| b.y0.to_string())),
            opt(b.map(|b| b.x1.to_string())),
            opt(b.map(|b| b.y1.to_string())),
            opt(m.centroid.map(|c| format!("{:.2}", c[0]))),
            opt(m.centroid.map(|c| format!("{:.2}", c[1]))),
            opt(m.mean_prob_inside.map(|p| format!("{p:.4}"))),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("writing predictions.csv: {e}"))?;
    write_atomic(path, |f| Ok(std::io::Write::write_all(f, &bytes)?))
}

/// Longest folder name an id becomes (filesystems allow 255 bytes; room for "-N" and temps).
const MAX_ID_CHARS: usize = 100;

/// One safe folder name from a user-given id: letters, digits, `-`, `_` and `.` are kept, any
/// other character (a path separator among them) becomes `_`; no leading dot, never empty, at
/// most 100 characters. So `../x` or `/etc` can never name a folder outside `--out`.
pub fn safe_id(raw: &str) -> String {
    let mut id: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .take(MAX_ID_CHARS)
        .collect();
    while id.starts_with('.') {
        id.replace_range(..1, "_");
    }
    if id.is_empty() {
        id.push_str("input");
    }
    id
}

/// Safe ids, made unique within the run: a repeated id (compared without case, as macOS and
/// Windows filesystems do) gets "-2", "-3", ...
pub fn unique_safe_ids(raw: &[String]) -> Vec<String> {
    let mut taken = std::collections::HashSet::<String>::new();
    raw.iter()
        .map(|r| {
            let base = safe_id(r);
            let mut id = base.clone();
            let mut n = 1;
            while !taken.insert(id.to_lowercase()) {
                n += 1;
                id = format!("{base}-{n}");
            }
            id
        })
        .collect()
}

/// The raw id of a relative path: its components without the extension ("a/b/c.png" ->
/// "a__b__c"); [`unique_safe_ids`] makes it a folder name.
pub fn path_id(path: &Path) -> String {
    path.with_extension("")
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("__")
}

/// Folder-safe ids from relative paths, unique within the run.
pub fn unique_ids(paths: &[PathBuf]) -> Vec<String> {
    unique_safe_ids(&paths.iter().map(|p| path_id(p)).collect::<Vec<_>>())
}
