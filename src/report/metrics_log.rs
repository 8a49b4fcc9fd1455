//! `RUN_DIR/metrics.jsonl`: one JSON object per line, one line per training log step or
//! evaluation. Each line goes to the file in a single write, so a killed run keeps every
//! finished line and at worst leaves one partial last line, which readers skip. Every line
//! also goes to `metrics.csv` and a TensorBoard event file beside it ([`super::tfevents`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::tfevents::Companions;

/// File name of the log inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// What a line describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A training step (or a window of steps ending at `step`).
    #[default]
    Train,
    /// A validation pass run after `step` optimizer steps.
    Eval,
    /// Any other kind a newer writer produced; kept so old readers do not drop the line.
    #[serde(other)]
    Other,
}

/// One line of the log. Every measurement is optional so train and eval lines share a type;
/// absent fields are not written. Non-finite floats are written as `null` (JSON has no NaN)
/// and read back as `None`. Fields this struct does not name survive a round trip in `extra`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub kind: Kind,
    /// Optimizer steps completed when the line was written.
    pub step: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Seconds since the run (first start) began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// Total training loss and its parts (segmentation, language model, modality classifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_seg: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_lm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_cls: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Global gradient norm before clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_mem_bytes: Option<u64>,
    /// Validation loss and its parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss_seg: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss_lm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss_cls: Option<f64>,
    /// Validation segmentation scores and answer position accuracy, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dice: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iou: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_acc: Option<f64>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Record {
    pub fn train(step: u64) -> Self {
        Self { kind: Kind::Train, step, ..Self::default() }
    }

    pub fn eval(step: u64) -> Self {
        Self { kind: Kind::Eval, step, ..Self::default() }
    }
}

/// Append-only writer for `RUN_DIR/metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    companions: Companions,
}

impl MetricsLog {
    /// Starts the log of a fresh run, discarding any log already in `run_dir`.
    pub fn create(run_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("creating run directory {}", run_dir.display()))?;
        let path = run_dir.join(METRICS_FILE);
        File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Self::append_to(path, Companions::create(run_dir, &[])?)
    }

    /// Reopens the log of a run resumed from the checkpoint taken after `step`: lines with a
    /// larger step (written after that checkpoint, so about to be redone) and unreadable lines
    /// are dropped, so the finished log equals that of an uninterrupted run. Kept lines are
    /// copied byte for byte; the rewrite is atomic (temp file + rename).
    pub fn resume(run_dir: &Path, step: u64) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        if !path.exists() {
            return Self::create(run_dir);
        }
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut kept = Vec::with_capacity(text.len());
        let mut dropped_bad = 0usize;
        for line in text.split(|&b| b == b'\n') {
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            match line_step(line) {
                Some(s) if s <= step => {
                    kept.extend_from_slice(line);
                    kept.push(b'\n');
                }
                Some(_) => {}
                None => dropped_bad += 1,
            }
        }
        if dropped_bad > 0 {
            tracing::warn!(
                "{}: dropped {dropped_bad} unreadable line(s) while resuming at step {step}",
                path.display()
            );
        }
        let mut tmp = tempfile::NamedTempFile::new_in(run_dir)
            .with_context(|| format!("creating a temp file in {}", run_dir.display()))?;
        tmp.write_all(&kept)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).with_context(|| format!("replacing {}", path.display()))?;
        // The CSV and event file are rewritten from the kept lines.
        let values: Vec<serde_json::Value> =
            kept.split(|&b| b == b'\n').filter_map(|l| serde_json::from_slice(l).ok()).collect();
        Self::append_to(path, Companions::create(run_dir, &values)?)
    }

    /// `create` for a fresh run, `resume(step)` for a resumed one.
    pub fn open(run_dir: &Path, resume_step: Option<u64>) -> Result<Self> {
        match resume_step {
            Some(step) => Self::resume(run_dir, step),
            None => Self::create(run_dir),
        }
    }

    fn append_to(path: PathBuf, companions: Companions) -> Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {} for appending", path.display()))?;
        Ok(Self { path, file, companions })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one record as one line.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let value = serde_json::to_value(record).context("serialising a metrics record")?;
        self.append_value(&value)
    }

    /// Writes an arbitrary JSON object as one line; it must carry an unsigned integer `step`
    /// so that resuming can truncate the log.
    pub fn append_value(&mut self, value: &serde_json::Value) -> Result<()> {
        if value.get("step").and_then(|s| s.as_u64()).is_none() {
            bail!("metrics line without an unsigned integer \"step\": {value}");
        }
        let mut line = serde_json::to_vec(value)?;
        line.push(b'\n');
        // One write of the whole line (File is unbuffered; O_APPEND keeps it in one piece).
        self.file.write_all(&line).with_context(|| format!("appending to {}", self.path.display()))?;
        self.file.flush()?;
        self.companions.append(value)
    }

    /// Forces written lines to disk (they already survive a killed process without this).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().with_context(|| format!("syncing {}", self.path.display()))?;
        self.companions.sync()
    }
}

/// The `step` of one log line, or None when the line is not a JSON object with one.
fn line_step(line: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get("step")?.as_u64()
}

/// Records of a log plus the number of lines that could not be parsed (typically the partial
/// last line of a killed run).
#[derive(Clone, Debug, Default)]
pub struct MetricsFile {
    pub records: Vec<Record>,
    pub skipped: usize,
}

/// Reads every parseable line of a metrics log; unparseable lines are counted, not fatal.
pub fn read_metrics_file(path: &Path) -> Result<MetricsFile> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = MetricsFile::default();
    for line in BufReader::new(file).split(b'\n') {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        match serde_json::from_slice::<Record>(&line) {
            Ok(r) => out.records.push(r),
            Err(_) => out.skipped += 1,
        }
    }
    Ok(out)
}

/// Reads a metrics log, warning on stderr about skipped lines.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let f = read_metrics_file(path)?;
    if f.skipped > 0 {
        tracing::warn!("{}: skipped {} unreadable line(s)", path.display(), f.skipped);
    }
    Ok(f.records)
}
