//! Dataset rows: reading the authors' PosMed layout or a plain CSV (positions: [`super::position`])
//! and binarising masks. Checking every row's files and the train/val split: [`super::prepare`].
//!
//! Authors' layout (`DATA_ROOT/annotations/*.csv`):
//! `image_path,image_name,question,answer,position,split`, or the older
//! `image_path,image_name,split,description,position`. In the older files the authors' loader
//! uses `description` as the prompt and the `position` sentence as the answer, so we do the
//! same; an empty description falls back to [`DatasetOptions::default_question`].
//! `image_path` is the MASK path relative to `DATA_ROOT`; see [`image_candidates`].
//!
//! Plain layout: one CSV with `image,mask,question,answer` and optional
//! `position,modality,split` columns, paths relative to the CSV's folder.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::{DynamicImage, GenericImageView, GrayImage};

use super::preprocess::decode_image;
use crate::exit::InputError;

pub use super::position::{position_and_nearness, position_of_mask, Position};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn parse(s: &str) -> Option<Split> {
        match s.trim().to_lowercase().as_str() {
            "train" | "training" => Some(Split::Train),
            "val" | "valid" | "validation" | "dev" => Some(Split::Val),
            "test" | "testing" => Some(Split::Test),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One annotated sample. `line` is the 1-based line of the record in `csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub csv: PathBuf,
    pub line: usize,
    pub image: PathBuf,
    pub mask: PathBuf,
    pub question: String,
    pub answer: String,
    pub position: Option<Position>,
    pub modality: String,
    pub class_id: u32,
    pub split: Split,
    /// How this row's mask is read (from [`DatasetOptions::mask_rule`]), so every later reader
    /// of the mask (validation, the loader's workers, evaluation) applies the same rule.
    pub mask_rule: MaskRule,
}

impl Row {
    /// "file.csv:12", the location every message about this row carries.
    pub fn location(&self) -> String {
        format!("{}:{}", self.csv.display(), self.line)
    }
}

/// The paper's six modalities and their classifier ids.
pub const MODALITIES: [(&str, u32); 6] = [
    ("brain_tumors_ct_scan", 0),
    ("breast_tumors_ct_scan", 1),
    ("lung_CT", 2),
    ("lung_Xray", 3),
    ("skin_rgbimage", 4),
    ("polyp_endoscopy", 5),
];

/// Classifier id of a modality name: an exact entry of `extra` first, then the built-in names
/// matched by substring (brain, breast, lung + ct, lung + xray, skin/isic, polyp).
pub fn modality_class(name: &str, extra: &BTreeMap<String, u32>) -> Option<u32> {
    if let Some(&id) = extra.get(name) {
        return Some(id);
    }
    let n = name.to_lowercase();
    let lung = n.contains("lung") || n.contains("chest");
    if n.contains("brain") {
        Some(0)
    } else if n.contains("breast") {
        Some(1)
    } else if lung && ["xray", "x_ray", "x-ray", "cxr"].iter().any(|k| n.contains(k)) {
        Some(3)
    } else if lung && n.contains("ct") {
        Some(2)
    } else if n.contains("skin") || n.contains("isic") {
        Some(4)
    } else if n.contains("polyp") {
        Some(5)
    } else {
        None
    }
}

/// Image paths to try for a mask path of the authors' layout, in order: `_masks` folders
/// become `_images`, `_Segmentation` leaves the file stem, then .png, .jpg, .jpeg and the
/// mask's own extension.
pub fn image_candidates(mask: &Path) -> Vec<PathBuf> {
    let dir: PathBuf = mask
        .parent()
        .map(|d| {
            d.components()
                .map(|c| match c {
                    Component::Normal(s) => s.to_string_lossy().replace("_masks", "_images").into(),
                    other => other.as_os_str().to_owned(),
                })
                .collect()
        })
        .unwrap_or_default();
    let stem = mask.file_stem().map(|s| s.to_string_lossy().replace("_Segmentation", "")).unwrap_or_default();
    let own = mask.extension().map(|e| e.to_string_lossy().into_owned());
    let mut out: Vec<PathBuf> = Vec::new();
    for ext in ["png", "jpg", "jpeg"].into_iter().map(str::to_owned).chain(own) {
        let p = dir.join(format!("{stem}.{ext}"));
        if !out.contains(&p) && p != mask {
            out.push(p);
        }
    }
    out
}

/// Options for reading rows.
#[derive(Clone, Debug)]
pub struct DatasetOptions {
    /// Exact modality name -> class id, consulted before the built-in names.
    pub modality_map: BTreeMap<String, u32>,
    /// Question used where an older-format row has an empty description.
    pub default_question: String,
    /// How masks are read (`data.mask_nonzero_is_lesion`).
    pub mask_rule: MaskRule,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            modality_map: BTreeMap::new(),
            default_question: "Where is the lesion located in this image? Please segment it.".into(),
            mask_rule: MaskRule::Binary,
        }
    }
}

/// A problem with one row (or, for `line == 1`, a CSV header). `fatal` problems (missing
/// columns, unreadable CSVs) cannot be skipped.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub csv: PathBuf,
    pub line: usize,
    pub message: String,
    pub fatal: bool,
}

impl Problem {
    pub(crate) fn row(csv: &Path, line: usize, message: impl Into<String>) -> Self {
        Self { csv: csv.to_owned(), line, message: message.into(), fatal: false }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.csv.display(), self.line, self.message)
    }
}

/// Every problem found, returned as one error.
#[derive(Debug)]
pub struct ValidationError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: std::collections::HashSet<_> = self.problems.iter().map(|p| (&p.csv, p.line)).collect();
        write!(f, "dataset check failed: {} problem(s) in {} row(s)/header(s)", self.problems.len(), rows.len())?;
        if self.problems.iter().all(|p| !p.fatal) {
            write!(f, " (skip_bad_rows / --skip-bad-rows drops these rows)")?;
        }
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationError {}

/// Rows read from a dataset, plus the problems met while reading.
#[derive(Debug, Default)]
pub struct ReadRows {
    pub rows: Vec<Row>,
    pub problems: Vec<Problem>,
}

/// Reads a dataset: a directory is the authors' layout (`DIR/annotations/*.csv`), a file is a
/// plain CSV. Errors when a CSV cannot be opened; row and header problems are collected.
pub fn read_rows(source: &Path, opts: &DatasetOptions) -> Result<ReadRows> {
    let mut out = ReadRows::default();
    if source.is_dir() {
        let ann = source.join("annotations");
        let mut csvs: Vec<PathBuf> = std::fs::read_dir(&ann)
            .with_context(|| InputError(format!("reading {} (expected the authors' layout)", ann.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")))
            .collect();
        csvs.sort();
        if csvs.is_empty() {
            bail!(InputError(format!("no *.csv files in {}", ann.display())));
        }
        for csv in csvs {
            read_csv(&csv, source, Layout::Authors, opts, &mut out)?;
        }
    } else {
        let root = source.parent().unwrap_or(Path::new(".")).to_owned();
        read_csv(source, &root, Layout::Plain, opts, &mut out)?;
    }
    Ok(out)
}

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Authors,
    Plain,
}

fn read_csv(csv: &Path, root: &Path, layout: Layout, opts: &DatasetOptions, out: &mut ReadRows) -> Result<()> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_path(csv)
        .with_context(|| format!("opening {}", csv.display()))?;
    let names: Vec<String> = reader
        .headers()
        .with_context(|| format!("reading the header of {}", csv.display()))?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_lowercase())
        .collect();
    let headers: HashMap<&str, usize> = names.iter().enumerate().map(|(i, h)| (h.as_str(), i)).collect();
    let n_fields = names.len();
    let col = |name: &str| headers.get(name).copied();
    // The older authors' files carry `description` in place of `question`/`answer`.
    let older = layout == Layout::Authors && col("answer").is_none() && col("description").is_some();
    let required: &[&str] = match (layout, older) {
        (Layout::Plain, _) => &["image", "mask", "question", "answer"],
        (Layout::Authors, false) => &["image_path", "question", "answer", "split"],
        (Layout::Authors, true) => &["image_path", "description", "position", "split"],
    };
    let missing: Vec<&str> = required.iter().copied().filter(|c| col(c).is_none()).collect();
    if !missing.is_empty() {
        for c in missing {
            out.problems.push(Problem {
                csv: csv.to_owned(),
                line: 1,
                message: format!("missing column `{c}` (columns: {})", names.join(",")),
                fatal: true,
            });
        }
        return Ok(());
    }
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
                out.problems.push(Problem::row(csv, line, format!("unreadable record: {e}")));
                continue;
            }
        };
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        if record.iter().all(str::is_empty) {
            continue;
        }
        if record.len() != n_fields {
            out.problems.push(Problem::row(csv, line, format!("expected {n_fields} fields, found {}", record.len())));
            continue;
        }
        let get = |name: &str| col(name).map(|i| record[i].to_string()).unwrap_or_default();
        match parse_row(csv, line, root, layout, older, &get, opts) {
            Ok(row) => out.rows.push(row),
            Err(msgs) => out.problems.extend(msgs.into_iter().map(|m| Problem::row(csv, line, m))),
        }
    }
    Ok(())
}

/// Turns one record into a row, or every problem it has.
fn parse_row(
    csv: &Path,
    line: usize,
    root: &Path,
    layout: Layout,
    older: bool,
    get: &dyn Fn(&str) -> String,
    opts: &DatasetOptions,
) -> std::result::Result<Row, Vec<String>> {
    let mut errs = Vec::new();
    let rel = |s: String| PathBuf::from(s.replace('\\', "/"));
    let (question, answer, position_text) = if older {
        let q = get("description");
        let q = if q.is_empty() { opts.default_question.clone() } else { q };
        (q, get("position"), get("position"))
    } else {
        (get("question"), get("answer"), get("position"))
    };
    if question.is_empty() {
        errs.push("empty question".to_string());
    }
    if answer.is_empty() {
        errs.push("empty answer".to_string());
    }
    let split_text = get("split");
    let split =
        if split_text.is_empty() && layout == Layout::Plain { Some(Split::Train) } else { Split::parse(&split_text) };
    if split.is_none() {
        errs.push(format!("split {split_text:?} is not train, val or test"));
    }
    let (mask_rel, image) = match layout {
        Layout::Authors => {
            let mask_rel = rel(get("image_path"));
            let tried = image_candidates(&mask_rel);
            let found = tried.iter().map(|p| root.join(p)).find(|p| p.is_file());
            if found.is_none() && !mask_rel.as_os_str().is_empty() {
                let list: Vec<_> = tried.iter().map(|p| root.join(p).display().to_string()).collect();
                errs.push(format!("image not found for mask {}; tried {}", mask_rel.display(), list.join(", ")));
            }
            (mask_rel, found.unwrap_or_default())
        }
        Layout::Plain => {
            let image = rel(get("image"));
            if image.as_os_str().is_empty() {
                errs.push("empty image path".to_string());
            } else if !root.join(&image).is_file() {
                errs.push(format!("image not found: {}", root.join(&image).display()));
            }
            (rel(get("mask")), root.join(image))
        }
    };
    if mask_rel.as_os_str().is_empty() {
        errs.push("empty mask path".to_string());
    }
    let first_component = |p: &Path| p.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned());
    let modality = match layout {
        Layout::Authors => first_component(&mask_rel).unwrap_or_default(),
        Layout::Plain => {
            let m = get("modality");
            if m.is_empty() {
                first_component(&rel(get("image"))).unwrap_or_default()
            } else {
                m
            }
        }
    };
    let class_id = modality_class(&modality, &opts.modality_map);
    if class_id.is_none() {
        errs.push(format!(
            "unknown modality {modality:?} (known: brain/breast/lung_CT/lung_Xray/skin/polyp; \
             give a modality mapping for others)"
        ));
    }
    let position = if position_text.is_empty() { Position::parse(&answer) } else { Position::parse(&position_text) };
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Row {
        csv: csv.to_owned(),
        line,
        image,
        mask: root.join(mask_rel),
        question,
        answer,
        position,
        modality,
        class_id: class_id.unwrap(),
        split: split.unwrap(),
        mask_rule: opts.mask_rule,
    })
}

/// How mask values are read as lesion or background.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MaskRule {
    /// Binary masks only (see [`binarise_mask_with`]); any other value set is an error, so a
    /// class-id or 0/128 mask is never silently read as all background or all lesion.
    #[default]
    Binary,
    /// Every non-zero value is lesion (label masks with class ids 1, 2, 3...):
    /// `data.mask_nonzero_is_lesion` / `--mask-nonzero-is-lesion`.
    NonZero,
}

impl MaskRule {
    /// The rule the `mask_nonzero_is_lesion` setting asks for.
    pub fn from_nonzero_is_lesion(nonzero: bool) -> Self {
        if nonzero {
            MaskRule::NonZero
        } else {
            MaskRule::Binary
        }
    }
}

/// Why a mask cannot be read. Messages follow the file name ("mask X has values ...").
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MaskError {
    #[error(
        "has values {values}: not a binary mask (expected 0/1, 0/255 or a colour outline on black; if \
         non-zero values are class ids, set data.mask_nonzero_is_lesion = true or pass \
         --mask-nonzero-is-lesion to count every non-zero value as lesion)"
    )]
    NotBinary { values: String },
    #[error(
        "is not binary: {percent:.0}% of pixels are mid-grey, values {values} (is this an image rather than a mask?)"
    )]
    LooksLikeImage { percent: f64, values: String },
    #[error(
        "has {distinct} distinct values {values}: not a label mask (mask_nonzero_is_lesion counts every \
         non-zero value as lesion, so it needs a lossless mask of a few label values; is this an image or a \
         JPEG mask?)"
    )]
    NotLabels { distinct: usize, values: String },
}

/// Most distinct values a label mask may have under [`MaskRule::NonZero`]; more means a photo or
/// lossy compression noise, which that rule would turn into lesion.
pub const MAX_LABEL_VALUES: usize = 64;

/// One channel of the mask at its stored depth (colour: the channel maximum, so a red outline
/// on black is foreground; alpha ignored) and the full-scale value (255 or 65535).
fn mask_levels(mask: &DynamicImage) -> (Vec<u16>, u16) {
    fn max_of(raw: &[u8], step: usize) -> Vec<u16> {
        raw.chunks_exact(step).map(|p| p[0].max(p[1]).max(p[2]) as u16).collect()
    }
    fn max_of16(raw: &[u16], step: usize) -> Vec<u16> {
        raw.chunks_exact(step).map(|p| p[0].max(p[1]).max(p[2])).collect()
    }
    match mask {
        DynamicImage::ImageLuma8(g) => (g.as_raw().iter().map(|&v| v as u16).collect(), 255),
        DynamicImage::ImageLumaA8(g) => (g.as_raw().chunks_exact(2).map(|p| p[0] as u16).collect(), 255),
        DynamicImage::ImageRgb8(c) => (max_of(c.as_raw(), 3), 255),
        DynamicImage::ImageRgba8(c) => (max_of(c.as_raw(), 4), 255),
        DynamicImage::ImageLuma16(g) => (g.as_raw().clone(), u16::MAX),
        DynamicImage::ImageLumaA16(g) => (g.as_raw().chunks_exact(2).map(|p| p[0]).collect(), u16::MAX),
        DynamicImage::ImageRgb16(c) => (max_of16(c.as_raw(), 3), u16::MAX),
        DynamicImage::ImageRgba16(c) => (max_of16(c.as_raw(), 4), u16::MAX),
        other => (max_of(other.to_rgb8().as_raw(), 3), 255),
    }
}

/// "{0, 1, 2, 3}", or the first and last few with the count when there are many.
fn format_values(distinct: &[u16]) -> String {
    let list = |v: &[u16]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ");
    if distinct.len() <= 12 {
        format!("{{{}}}", list(distinct))
    } else {
        let n = distinct.len();
        format!("{{{}, ..., {}}} ({n} distinct)", list(&distinct[..6]), list(&distinct[n - 3..]))
    }
}

/// [`binarise_mask_with`] under the default [`MaskRule::Binary`].
pub fn binarise_mask(mask: &DynamicImage) -> std::result::Result<GrayImage, MaskError> {
    binarise_mask_with(mask, MaskRule::Binary)
}

/// Brings a decoded mask to one 0/255 channel. Colour masks take the channel maximum; 16-bit
/// masks are read at 16 bits (a 16-bit 0/1 mask is not rounded away).
///
/// [`MaskRule::Binary`] accepts, with F the full scale (255, or 65535 for 16-bit files):
/// - exactly {0, 1} or {0, F} (either may be absent);
/// - a soft version of 0/F, as anti-aliasing or JPEG leave it: some pixel near F (> 7F/8) and
///   at most a quarter of the pixels mid-grey (F/8..7F/8), thresholded at F/2. (Small non-zero
///   values in such a mask, e.g. {0, 1, 255}, are background: they cannot be told from JPEG
///   noise by their values.)
///
/// Anything else is an error listing the values: class ids ({0, 1, 2, 3}), a 0/128 mask, or a
/// photograph (more than a quarter of its pixels mid-grey in more than 16 distinct values, the
/// typical swapped image/mask path).
/// [`MaskRule::NonZero`] makes every non-zero value lesion; it refuses masks with more than
/// [`MAX_LABEL_VALUES`] distinct values (photos, lossy files), whose noise would become lesion.
pub fn binarise_mask_with(mask: &DynamicImage, rule: MaskRule) -> std::result::Result<GrayImage, MaskError> {
    let (w, h) = mask.dimensions();
    let (levels, full) = mask_levels(mask);
    let mut hist = vec![0usize; full as usize + 1];
    levels.iter().for_each(|&v| hist[v as usize] += 1);
    let distinct: Vec<u16> = (0..=full).filter(|&v| hist[v as usize] > 0).collect();
    let only = |set: &[u16]| distinct.iter().all(|v| set.contains(v));
    let (f, n) = (full as u32 + 1, levels.len().max(1));
    let foreground: Box<dyn Fn(u16) -> bool> = match rule {
        MaskRule::NonZero => {
            if distinct.len() > MAX_LABEL_VALUES {
                return Err(MaskError::NotLabels { distinct: distinct.len(), values: format_values(&distinct) });
            }
            Box::new(|v| v > 0)
        }
        MaskRule::Binary if only(&[0, 1]) => Box::new(|v| v == 1),
        MaskRule::Binary if only(&[0, full]) => Box::new(move |v| v == full),
        MaskRule::Binary => {
            let is_mid = |v: u16| (f..7 * f).contains(&(8 * v as u32));
            let mid: usize = distinct.iter().filter(|&&v| is_mid(v)).map(|&v| hist[v as usize]).sum();
            // Many mid-grey pixels of many values: a photograph; of a few values: label levels.
            if mid * 4 > n && distinct.len() > 16 {
                let percent = 100.0 * mid as f64 / n as f64;
                return Err(MaskError::LooksLikeImage { percent, values: format_values(&distinct) });
            }
            if mid * 4 > n || !distinct.iter().any(|&v| 8 * v as u32 >= 7 * f) {
                return Err(MaskError::NotBinary { values: format_values(&distinct) });
            }
            Box::new(move |v| 2 * v as u32 >= f)
        }
    };
    let raw = levels.iter().map(|&v| if foreground(v) { 255 } else { 0 }).collect();
    Ok(GrayImage::from_raw(w, h, raw).expect("one value per pixel"))
}

/// Decodes and binarises a mask file under [`MaskRule::Binary`] (see [`binarise_mask_with`]).
pub fn load_mask(path: &Path) -> Result<GrayImage> {
    load_mask_with(path, MaskRule::Binary)
}

/// Decodes and binarises a mask file; errors name the file.
pub fn load_mask_with(path: &Path, rule: MaskRule) -> Result<GrayImage> {
    let img = decode_image(path)?;
    binarise_mask_with(&img, rule).map_err(|e| anyhow::anyhow!("mask {} {e}", path.display()))
}
