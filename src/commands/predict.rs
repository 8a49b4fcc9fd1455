//! `prs predict`: mask + answer for one image (`--image`) or many (`--images DIR`,
//! `--input list.csv`), written at the original image resolution.
//!
//! Per input a prediction folder (see `pipeline::predict` for its files and the rules that
//! keep a user's files safe); `--resume` skips items whose folder is complete. Batch mode adds
//! `predictions.csv` (and `failures.csv` when some inputs could not be predicted); a batch
//! `--out` must be new, empty, or an earlier `prs predict` output.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::args::{at_least_one, non_negative, positive, unit_interval_f32};
use crate::data::dataset::image_candidates;
use crate::data::preprocess::load_image;
use crate::files;
use crate::pipeline::generate::GenerateOptions;
use crate::pipeline::load::{load_model, ModelArgs};
use crate::pipeline::predict::{
    check_targets, path_id, predict_items, unique_ids, unique_safe_ids, write_failures_csv, write_predictions_csv,
    Item, ItemResult, PredictOptions, PREDICTIONS_KIND,
};

/// Answer generation flags.
#[derive(clap::Args, Debug, Clone)]
pub struct GenArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    pub top_p: f64,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub max_new_tokens: usize,
    /// Sampling seed (with --temperature above 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl GenArgs {
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop_at_eos: true,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// Trained checkpoint: a project checkpoint folder or the authors' release layout.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// One image (PNG or JPEG).
    #[arg(long, required_unless_present_any = ["images", "input"], conflicts_with_all = ["images", "input"])]
    pub image: Option<PathBuf>,
    /// A folder of images (one prediction folder per image).
    #[arg(long, conflicts_with = "input")]
    pub images: Option<PathBuf>,
    /// A CSV of inputs: `image` (relative to the CSV) or the authors' `image_path` column,
    /// `question` (or `description`), optional `id` and `split`.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// The question (for --input: used where the CSV has none).
    #[arg(long)]
    pub question: Option<String>,
    /// With --input: only rows of this split.
    #[arg(long)]
    pub split: Option<String>,
    /// Output folder (single image: the prediction folder itself): new, empty, or an earlier
    /// prs predict output.
    #[arg(long, default_value = "prs-predict")]
    pub out: PathBuf,
    #[command(flatten)]
    pub gen: GenArgs,
    /// Mask threshold on the probability.
    #[arg(long, default_value_t = 0.5, value_parser = unit_interval_f32)]
    pub threshold: f32,
    /// Also write the model-resolution logits (mask_logits.safetensors, f32 (1,1,S,S)).
    #[arg(long)]
    pub save_logits: bool,
    /// Skip inputs whose prediction folder is complete.
    #[arg(long)]
    pub resume: bool,
    /// Replace earlier predictions of prs in the output (never anything else).
    #[arg(long)]
    pub overwrite: bool,
    /// Stop at the first input that cannot be predicted (default: report it, go on, and exit
    /// non-zero at the end).
    #[arg(long)]
    pub fail_fast: bool,
    /// Images per forward in batch mode.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub batch_size: usize,
}

const IMAGE_EXTS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

fn items_from_dir(dir: &Path, question: &str) -> Result<Vec<Item>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading --images {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| IMAGE_EXTS.iter().any(|x| e.eq_ignore_ascii_case(x))))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "no images ({}) in {}", IMAGE_EXTS.join(", "), dir.display());
    let names: Vec<PathBuf> = files.iter().map(|f| PathBuf::from(f.file_name().unwrap())).collect();
    Ok(unique_ids(&names)
        .into_iter()
        .zip(files)
        .map(|(id, image)| Item { id, image, question: question.to_string() })
        .collect())
}

/// Inputs from a CSV (see `--input`).
pub fn items_from_csv(csv_path: &Path, question: Option<&str>, split: Option<&str>) -> Result<Vec<Item>> {
    let mut r = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(csv_path)
        .with_context(|| format!("opening --input {}", csv_path.display()))?;
    let headers: Vec<String> = r.headers()?.iter().map(|h| h.trim_start_matches('\u{feff}').to_lowercase()).collect();
    let col = |n: &str| headers.iter().position(|h| h == n);
    let dir = csv_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    // The authors' CSVs live in DATA_ROOT/annotations and name paths relative to DATA_ROOT.
    let root = if dir.file_name().is_some_and(|n| n == "annotations") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.clone()
    };
    let (img_col, authors) = match (col("image"), col("image_path")) {
        (Some(c), _) => (c, false),
        (None, Some(c)) => (c, true),
        _ => bail!("{}: needs an `image` or `image_path` column (columns: {})", csv_path.display(), headers.join(",")),
    };
    let q_col = col("question").or(col("description"));
    let (id_col, split_col) = (col("id"), col("split"));
    let mut rows = vec![];
    for (k, rec) in r.records().enumerate() {
        let line = k + 2;
        let rec = rec.with_context(|| format!("{}:{line}", csv_path.display()))?;
        let get = |c: Option<usize>| c.and_then(|c| rec.get(c)).unwrap_or("").to_string();
        if let (Some(want), Some(_)) = (split, split_col) {
            if get(split_col) != want {
                continue;
            }
        }
        let rel = PathBuf::from(get(Some(img_col)).replace('\\', "/"));
        ensure!(!rel.as_os_str().is_empty(), "{}:{line}: empty image path", csv_path.display());
        let base = if authors { &root } else { &dir };
        let direct = base.join(&rel);
        let image = if (authors && rel.to_string_lossy().contains("_masks")) || !direct.is_file() {
            image_candidates(&rel).into_iter().map(|p| base.join(p)).find(|p| p.is_file()).unwrap_or(direct)
        } else {
            direct
        };
        let q = Some(get(q_col)).filter(|q| !q.trim().is_empty()).or(question.map(str::to_owned));
        let Some(q) = q.filter(|q| !q.trim().is_empty()) else {
            bail!("{}:{line}: empty question (and no --question given)", csv_path.display());
        };
        // The id names the prediction folder: the CSV's, else one made from the image path.
        let id = Some(get(id_col)).filter(|id| !id.trim().is_empty()).unwrap_or_else(|| path_id(&rel));
        rows.push((id, image, q));
    }
    ensure!(
        !rows.is_empty(),
        "{}: no inputs{}",
        csv_path.display(),
        split.map(|s| format!(" in split {s}")).unwrap_or_default()
    );
    let ids = unique_safe_ids(&rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>());
    Ok(rows.into_iter().zip(ids).map(|((_, image, question), id)| Item { id, image, question }).collect())
}

/// Cheap checks before the model is loaded: the question and the image files.
fn check_inputs(items: &[Item]) -> Result<()> {
    for it in items {
        ensure!(!it.question.trim().is_empty(), "empty question for {}", it.image.display());
        ensure!(it.image.is_file(), "cannot load image {}: no such file", it.image.display());
    }
    Ok(())
}

pub fn run(args: &PredictArgs) -> Result<()> {
    let question = args.question.clone().unwrap_or_default();
    let opts = PredictOptions {
        gen: args.gen.options(),
        threshold: args.threshold,
        save_logits: args.save_logits,
        batch_size: args.batch_size,
        resume: args.resume,
        overwrite: args.overwrite,
        fail_fast: args.fail_fast,
    };
    opts.gen.validate()?;
    if let Some(image) = &args.image {
        ensure!(!question.trim().is_empty(), "empty question: pass --question \"...\"");
        // Decode once up front: an unreadable or unsupported image fails before the model loads.
        load_image(image)?;
        let item = Item { id: "prediction".into(), image: image.clone(), question };
        let dirs = [args.out.clone()];
        check_targets(&dirs, &PredictOptions { resume: false, ..opts.clone() })?;
        let loaded = load_model(&args.checkpoint, &args.model)?;
        let single = PredictOptions { resume: false, fail_fast: true, ..opts };
        let r = predict_items(&loaded, &[item], &dirs, &single)?;
        let r = r.results.into_iter().next().flatten().context("no prediction was made")?;
        println!("{}", serde_json::to_string_pretty(&r)?);
        println!("wrote {}", args.out.display());
        return Ok(());
    }
    let items = match (&args.images, &args.input) {
        (Some(dir), _) => {
            ensure!(!question.trim().is_empty(), "empty question: pass --question \"...\" for --images");
            items_from_dir(dir, &question)?
        }
        (None, Some(csv)) => items_from_csv(csv, args.question.as_deref(), args.split.as_deref())?,
        _ => bail!("give --image, --images or --input"),
    };
    check_inputs(&items)?;
    files::claim_output_root(&args.out, PREDICTIONS_KIND, "--out")?;
    // One process per output folder; then what a killed run left half-written can go.
    let _lock = files::DirLock::acquire(&args.out, "output folder")?;
    files::remove_stale_temporaries(&args.out)?;
    let dirs: Vec<PathBuf> = items.iter().map(|it| args.out.join(&it.id)).collect();
    check_targets(&dirs, &opts)?;
    let loaded = load_model(&args.checkpoint, &args.model)?;
    let report = predict_items(&loaded, &items, &dirs, &opts)?;
    write_predictions_csv(&args.out.join("predictions.csv"), report.results.iter().flatten())?;
    let failures_csv = args.out.join("failures.csv");
    if report.failures.is_empty() {
        // A failures.csv of an earlier run would now describe inputs that have succeeded.
        if failures_csv.exists() {
            std::fs::remove_file(&failures_csv).with_context(|| format!("removing {}", failures_csv.display()))?;
        }
    } else {
        write_failures_csv(&failures_csv, &items, &report.failures)?;
    }
    let done: Vec<&ItemResult> = report.results.iter().flatten().collect();
    let empty = done.iter().filter(|r| r.mask.empty).count();
    println!(
        "{} of {} inputs predicted in {} ({} written now, {} kept from an earlier run; {empty} with an empty mask)",
        done.len(),
        items.len(),
        args.out.display(),
        report.written,
        report.kept
    );
    if !report.failures.is_empty() {
        let first = &report.failures[0];
        bail!(
            "{} input(s) could not be predicted (listed in {}); the first, `{}`: {}",
            report.failures.len(),
            failures_csv.display(),
            items[first.0].id,
            first.1
        );
    }
    Ok(())
}
