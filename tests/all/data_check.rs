//! `prs data check` on the synthetic dataset and on a corrupted copy of it: a clean dataset
//! passes with a summary per modality and split; every corruption (truncated image, non-binary
//! mask, wrong size, wrong position label, duplicate row, missing column) is listed with its
//! file and line, all at once, and the command exits non-zero.

use std::path::{Path, PathBuf};
use std::process::Command;

use prs::data::check::check_dataset;
use prs::data::dataset::{read_rows, DatasetOptions, Position};
use prs::data::synth::{generate, SynthConfig};

use crate::common::tokenizer_model;

fn prs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_prs"));
    c.env("PRS_TOKENIZER_MODEL", tokenizer_model()).env_remove("RUST_BACKTRACE");
    c
}

fn synth(dir: &Path) -> PathBuf {
    let out = dir.join("data");
    generate(&out, &SynthConfig { train: 3, val: 1, test: 1, size: 64, seed: 9 }, false).unwrap();
    out
}

#[test]
fn a_clean_dataset_passes_with_a_summary_per_modality_and_split() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let r = check_dataset(&data, &DatasetOptions::default()).unwrap();
    assert!(r.problems.is_empty() && r.warnings.is_empty(), "{:?} {:?}", r.problems, r.warnings);
    assert_eq!(r.rows, 15);
    assert_eq!(r.groups.len(), 9, "3 modalities x 3 splits");
    for g in &r.groups {
        let n = if g.split == "train" { 3 } else { 1 };
        assert_eq!((g.rows, g.images, g.empty_masks), (n, n, 0), "{g:?}");
        assert_eq!(g.sizes.get("64x64"), Some(&n), "{g:?}");
        let q = g.lesion_area_quantiles.unwrap();
        assert!(q[0] > 0.0 && q.windows(2).all(|w| w[0] <= w[1]) && q[4] < 1.0, "{q:?}");
    }
    let json = dir.path().join("report.json");
    let out = prs().args(["data", "check", "--data-root"]).arg(&data).arg("--json").arg(&json).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("lung_Xray") && stdout.contains("passed"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["groups"].as_array().unwrap().len(), 9);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
}

#[test]
fn every_problem_of_a_corrupted_copy_is_listed_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let rows = read_rows(&data, &DatasetOptions::default()).unwrap().rows;
    let csv = rows[0].csv.clone();
    let mine: Vec<_> = rows.iter().filter(|r| r.csv == csv).collect();
    assert!(mine.len() >= 5);
    let (trunc, grey, small, relabel, dup) = (mine[0], mine[1], mine[2], mine[3], mine[4]);
    // A truncated image.
    let bytes = std::fs::read(&trunc.image).unwrap();
    std::fs::write(&trunc.image, &bytes[..bytes.len() / 2]).unwrap();
    // A 0/128 mask.
    let (w, h) = image::image_dimensions(&grey.mask).unwrap();
    image::GrayImage::from_fn(w, h, |x, _| image::Luma([if x < w / 2 { 0 } else { 128 }])).save(&grey.mask).unwrap();
    // An image of another size than its mask.
    image::RgbImage::new(32, 32).save(&small.image).unwrap();
    // A position label the mask's box contradicts, and a duplicated row.
    let mut reader = csv::ReaderBuilder::new().from_path(&csv).unwrap();
    let header = reader.headers().unwrap().clone();
    let mut records: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    let pos_col = header.iter().position(|h| h == "position").unwrap();
    let idx = |line: usize| records.iter().position(|r| r.position().unwrap().line() as usize == line).unwrap();
    let wrong = Position::ALL.iter().find(|p| Some(**p) != relabel.position).unwrap();
    let (i, d) = (idx(relabel.line), idx(dup.line));
    let mut edited: Vec<String> = records[i].iter().map(String::from).collect();
    edited[pos_col] = wrong.label().to_string();
    records[i] = csv::StringRecord::from(edited);
    records.push(records[d].clone());
    let dup_line = records.len() + 1;
    let mut wr = csv::Writer::from_path(&csv).unwrap();
    wr.write_record(&header).unwrap();
    records.iter().for_each(|r| wr.write_record(r).unwrap());
    wr.flush().unwrap();
    // A second CSV without the split column.
    let extra = data.join("annotations/extra.csv");
    std::fs::write(&extra, "image_path,image_name,question,answer,position\n").unwrap();

    let r = check_dataset(&data, &DatasetOptions::default()).unwrap();
    let has = |file: &Path, line: usize, what: &str| {
        r.problems.iter().any(|p| p.file == file.display().to_string() && p.line == line && p.message.contains(what))
    };
    let expected = [
        (&csv, trunc.line, "image"),
        (&csv, grey.line, "not a binary mask"),
        (&csv, small.line, "image is 32x32 but mask is"),
        (&csv, relabel.line, "position column says"),
        (&csv, dup_line, &format!("duplicate of {}:{}", csv.display(), dup.line)),
        (&extra, 1, "missing column `split`"),
    ];
    for (file, line, what) in &expected {
        assert!(has(file, *line, what), "no problem `{what}` at {}:{line}; found {:#?}", file.display(), r.problems);
    }
    assert_eq!(r.problems.len(), expected.len(), "{:#?}", r.problems);

    let out = prs().args(["data", "check", "--data-root"]).arg(&data).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "bad input");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("6 problem(s)"), "{err}");
    for (file, line, _) in &expected {
        assert!(err.contains(&format!("{}:{line}:", file.display())), "{err}");
    }
    // `finetune --dry-run` runs the same check (training alone only warns about a position
    // label, and never reads the test split), before any weight is read.
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml");
    let out = prs()
        .args(["finetune", "--dry-run", "--quiet", "--config"])
        .arg(&conf)
        .arg("--data-root")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("6 problem(s)"), "{err}");
    assert!(err.contains(&format!("{}:{}: position column says", csv.display(), relabel.line)), "{err}");
}
