//! The run log in the two other forms people open: `metrics.csv` (one row per log line, a
//! fixed set of columns) and a TensorBoard event file (`events.out.tfevents.*`).
//!
//! An event file is a sequence of records: u64 length, masked crc32c of the length bytes,
//! the bytes of an `Event` protobuf, masked crc32c of those bytes (all little-endian). The
//! first event carries `file_version`; each later one a step's scalars as
//! `Event{wall_time=1 double, step=2 int64, summary=5 Summary{value=1 Value{tag=1, simple_value=2 float}}}`.
//! The few protobuf fields needed are encoded here by hand.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub const CSV_FILE: &str = "metrics.csv";
/// Prefix of the event file's name (TensorBoard finds files by "tfevents" in the name).
pub const EVENTS_PREFIX: &str = "events.out.tfevents.";

/// Columns of `metrics.csv`: `Record`'s named fields, in its order.
pub const CSV_COLUMNS: [&str; 20] = [
    "kind",
    "step",
    "epoch",
    "elapsed_s",
    "loss",
    "loss_seg",
    "loss_lm",
    "loss_cls",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "samples_per_s",
    "peak_mem_bytes",
    "val_loss",
    "val_loss_seg",
    "val_loss_lm",
    "val_loss_cls",
    "dice",
    "iou",
    "position_acc",
];

/// crc32c (Castagnoli, reflected polynomial 0x82f63b78), table-driven.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masking of a crc (so that crcs of crcs stay well distributed).
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u64, wire: u64) {
    varint(out, (field << 3) | wire);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// An `Event` with wall time and step, and either the file version or scalar values.
pub fn event_bytes(wall_time: f64, step: u64, version: Option<&str>, scalars: &[(String, f32)]) -> Vec<u8> {
    let mut e = Vec::new();
    key(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut e, 2, 0);
    varint(&mut e, step);
    if let Some(v) = version {
        bytes_field(&mut e, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            key(&mut v, 2, 5);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        bytes_field(&mut e, 5, &summary);
    }
    e
}

/// One TFRecord framing `data`.
pub fn record_bytes(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

/// The numeric fields of a log line as TensorBoard scalars, tagged `<kind>/<field>`.
pub fn scalars_of(value: &serde_json::Value) -> Vec<(String, f32)> {
    let Some(obj) = value.as_object() else { return vec![] };
    let kind = obj.get("kind").and_then(|k| k.as_str()).unwrap_or("train");
    obj.iter()
        .filter(|(k, _)| *k != "step")
        .filter_map(|(k, v)| v.as_f64().map(|x| (format!("{kind}/{k}"), x as f32)))
        .collect()
}

/// One `metrics.csv` row of a log line (empty cells for absent fields).
pub fn csv_row(value: &serde_json::Value) -> String {
    let cells: Vec<String> = CSV_COLUMNS
        .iter()
        .map(|c| match value.get(*c) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => String::new(),
        })
        .collect();
    format!("{}\n", cells.join(","))
}

/// The CSV and event-file companions of `metrics.jsonl`, appended line by line.
#[derive(Debug)]
pub struct Companions {
    csv: File,
    events: File,
    events_path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Companions {
    /// Starts both files afresh in `run_dir` (an earlier event file is removed), then writes
    /// the lines `kept` (a resumed run's surviving log) into them.
    pub fn create(run_dir: &Path, kept: &[serde_json::Value]) -> Result<Self> {
        for e in std::fs::read_dir(run_dir).with_context(|| format!("reading {}", run_dir.display()))? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with(EVENTS_PREFIX) {
                std::fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        let csv_path = run_dir.join(CSV_FILE);
        let mut csv = File::create(&csv_path).with_context(|| format!("creating {}", csv_path.display()))?;
        csv.write_all(format!("{}\n", CSV_COLUMNS.join(",")).as_bytes())?;
        let wall = now();
        let events_path = run_dir.join(format!("{EVENTS_PREFIX}{}.prs", wall as u64));
        let mut events = File::create(&events_path).with_context(|| format!("creating {}", events_path.display()))?;
        events.write_all(&record_bytes(&event_bytes(wall, 0, Some("brain.Event:2"), &[])))?;
        let mut me = Self { csv, events, events_path };
        for v in kept {
            me.append(v)?;
        }
        Ok(me)
    }

    pub fn events_path(&self) -> &Path {
        &self.events_path
    }

    /// Appends one log line to both (each in one write).
    pub fn append(&mut self, value: &serde_json::Value) -> Result<()> {
        self.csv.write_all(csv_row(value).as_bytes()).context("appending to metrics.csv")?;
        let step = value.get("step").and_then(|s| s.as_u64()).unwrap_or(0);
        let scalars = scalars_of(value);
        if !scalars.is_empty() {
            let rec = record_bytes(&event_bytes(now(), step, None, &scalars));
            self.events.write_all(&rec).with_context(|| format!("appending to {}", self.events_path.display()))?;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.csv.sync_data()?;
        Ok(self.events.sync_data()?)
    }
}
