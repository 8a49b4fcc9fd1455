//! `prs evaluate` end to end on the tiny model and a synthetic dataset: predictions + scores
//! from a project checkpoint and from the authors' layout, scores recomputed independently from
//! the written probability maps, `--pred-dir` on an authors'-style result folder, errors.

use crate::infer_setup;
use std::collections::BTreeMap;
use std::path::Path;

use clap::Parser;
use infer_setup::{s, setup, synth};
use prs::metrics::prsmed::CSV_HEADER;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    a: prs::commands::evaluate::EvaluateArgs,
}

fn evaluate(args: &[&str]) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(std::iter::once("prs").chain(args.iter().copied()))?;
    prs::commands::evaluate::run(&cli.a)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn grey(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().into_luma8().into_raw()
}

#[test]
fn evaluate_a_project_checkpoint_and_recompute_the_scores() {
    let st = setup();
    let data = synth(st.dir.path(), 2, 64);
    let out = st.dir.path().join("eval");
    evaluate(&[
        "--checkpoint",
        &s(&st.project),
        "--data-root",
        &s(&data),
        "--out",
        &s(&out),
        "--protocol",
        "prsmed",
        "--hd95",
        "--worst",
        "3",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "8",
    ])
    .unwrap();
    let sum = json(&out.join("summary.json"));
    assert_eq!(sum["settings"]["empty_policy"], "ignore");
    assert_eq!(sum["settings"]["threshold"], 0.5);
    let cases = sum["per_case"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    assert_eq!(sum["overall"]["n_images"], 6);
    let mods: Vec<&String> = sum["per_modality"].as_object().unwrap().keys().collect();
    assert_eq!(mods, ["brain_tumors_ct_scan", "lung_Xray", "skin_rgbimage"]);
    assert!(sum["timing"]["predict_images_per_s"].as_f64().unwrap() > 0.0);

    // Recompute every case from the written prob.png and the dataset's mask.
    let mut per_mod: BTreeMap<String, (Vec<f64>, [u64; 3])> = BTreeMap::new();
    let (mut correct, mut total) = (0u64, 0u64);
    for c in cases {
        let id = c["id"].as_str().unwrap();
        let pred_dir = out.join("predictions").join(id);
        assert_eq!(c["prediction"].as_str().unwrap(), pred_dir.join("prob.png").display().to_string());
        let p = grey(&pred_dir.join("prob.png"));
        // The saved binary mask is the thresholded map scored here.
        let m = grey(&pred_dir.join("mask.png"));
        assert!(p.iter().zip(&m).all(|(&a, &b)| (a >= 128) == (b == 255)));
        let g = grey(Path::new(c["mask"].as_str().unwrap()));
        let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
        for (&a, &b) in p.iter().zip(&g) {
            match (a >= 128, b > 127) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, true) => fn_ += 1,
                _ => {}
            }
        }
        assert!(tp + fn_ > 0, "synthetic masks are never empty");
        let dice = 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64;
        assert!((c["dice"].as_f64().unwrap() - dice).abs() < 1e-12, "{id}: dice {} vs {dice}", c["dice"]);
        let iou = tp as f64 / (tp + fp + fn_) as f64;
        assert!((c["iou"].as_f64().unwrap() - iou).abs() < 1e-12);
        assert!(c["hd95"].is_number() || c["hd95"].is_null(), "hd95 missing: {c}");
        // Position: the answer in result.json parsed, against the CSV's position.
        let answer = json(&pred_dir.join("result.json"))["answer"].as_str().unwrap().to_string();
        assert_eq!(c["answer"].as_str().unwrap(), answer);
        let pred = prs::metrics::parse_position(&answer).as_str();
        assert_eq!(c["position_pred"].as_str().unwrap(), pred);
        total += 1;
        correct += (c["position_truth"].as_str().unwrap() == pred) as u64;
        let e = per_mod.entry(c["modality"].as_str().unwrap().to_string()).or_default();
        e.0.push(dice);
        e.1[0] += tp;
        e.1[1] += fp;
        e.1[2] += fn_;
    }
    for (m, (dices, [tp, fp, fn_])) in &per_mod {
        let g = &sum["per_modality"][m];
        let mean = dices.iter().sum::<f64>() / dices.len() as f64;
        assert!((g["dice"]["mean"].as_f64().unwrap() - mean).abs() < 1e-12, "{m}");
        assert_eq!(g["dice"]["n"], dices.len());
        let pooled = 2.0 * *tp as f64 / (2 * tp + fp + fn_) as f64;
        assert!((g["pooled_dice"].as_f64().unwrap() - pooled).abs() < 1e-12, "{m}");
        assert!(g["hd95"]["stats"].is_object(), "{m}: no hd95");
        assert!(g["prsmed"]["meanDic"].is_number() || g["prsmed"]["meanDic"].is_null());
    }
    let pos = &sum["overall"]["position"];
    assert_eq!(pos["total"].as_u64().unwrap(), total);
    assert_eq!(pos["correct"].as_u64().unwrap(), correct);

    // Files: per_image.csv, summary.md, one prsmed CSV per modality, worst overlays.
    let csv = std::fs::read_to_string(out.join("per_image.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7);
    assert!(csv.starts_with("id,modality,dice,iou,precision,recall,empty_gt"));
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.contains("| **all** | 6 |") && md.contains("Position confusion") && md.contains("PRS-Med protocol"),
        "{md}"
    );
    for m in &mods {
        let text = std::fs::read_to_string(out.join("prsmed").join(format!("{m}.csv"))).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap(), CSV_HEADER);
        assert_eq!(lines.next().unwrap().split(',').count(), 15, "method + 13 values + trailing comma");
    }
    let worst: Vec<_> = std::fs::read_dir(out.join("worst")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(worst.len(), 3);
    assert!(out.join("predictions").join("predictions.csv").metadata().unwrap().len() > 0);

    // --resume reuses every prediction: the scores are identical.
    evaluate(&[
        "--checkpoint",
        &s(&st.project),
        "--data-root",
        &s(&data),
        "--out",
        &s(&out),
        "--resume",
        "--max-new-tokens",
        "8",
    ])
    .unwrap();
    let again = json(&out.join("summary.json"));
    assert_eq!(again["overall"]["dice"], sum["overall"]["dice"]);
}

#[test]
fn pred_dir_scores_an_authors_style_result_folder() {
    let st = setup();
    let data = synth(st.dir.path(), 2, 48);
    // Their results: <modality>/<mask file name>, here the ground truth itself at twice the size.
    let preds = st.dir.path().join("their_results");
    let rows = prs::data::dataset::read_rows(&data, &Default::default()).unwrap().rows;
    let test: Vec<_> = rows.iter().filter(|r| r.split == prs::data::dataset::Split::Test).collect();
    assert_eq!(test.len(), 6);
    for r in &test {
        let g = image::open(&r.mask).unwrap().into_luma8();
        let big = image::imageops::resize(&g, 96, 96, image::imageops::FilterType::Nearest);
        let d = preds.join(&r.modality);
        std::fs::create_dir_all(&d).unwrap();
        big.save(d.join(r.mask.file_name().unwrap())).unwrap();
    }
    let out = st.dir.path().join("scored");
    evaluate(&[
        "--pred-dir",
        &s(&preds),
        "--data-root",
        &s(&data),
        "--out",
        &s(&out),
        "--protocol",
        "prsmed",
        "--empty",
        "one",
        "--hd95",
        "--spacing",
        "0.5,0.5",
    ])
    .unwrap();
    let sum = json(&out.join("summary.json"));
    assert_eq!(sum["settings"]["empty_policy"], "one");
    assert_eq!(sum["settings"]["hd95_unit"], "mm");
    let o = &sum["overall"];
    assert_eq!(o["dice"]["mean"], 1.0);
    assert_eq!(o["pooled_iou"], 1.0);
    assert_eq!(o["hd95"]["stats"]["mean"], 0.0);
    assert_eq!(o["prsmed"]["maxDic"], 1.0);
    assert!(o["position"].is_null(), "no answers in a folder of PNGs");
    assert_eq!(sum["settings"]["method"], "their_results");

    // A missing prediction is named; nothing is scored.
    std::fs::remove_file(preds.join(&test[0].modality).join(test[0].mask.file_name().unwrap())).unwrap();
    let out2 = st.dir.path().join("scored2");
    let e = evaluate(&["--pred-dir", &s(&preds), "--data-root", &s(&data), "--out", &s(&out2)]).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("1 of 6 cases have no prediction"), "{e}");
    assert!(!out2.join("summary.json").exists());
}

#[test]
fn evaluate_the_authors_release_and_reject_bad_options() {
    let st = setup();
    let data = synth(st.dir.path(), 1, 64);
    let out = st.dir.path().join("ev");
    evaluate(&[
        "--checkpoint",
        &s(&st.authors),
        "--config",
        &s(&st.config_file),
        "--data-root",
        &s(&data),
        "--out",
        &s(&out),
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
    ])
    .unwrap();
    let sum = json(&out.join("summary.json"));
    assert_eq!(sum["overall"]["n_images"], 2);
    let r = json(&out.join("predictions").join(sum["per_case"][0]["id"].as_str().unwrap()).join("result.json"));
    assert_eq!(r["model"]["checkpoint_format"], "authors");

    let base = ["--checkpoint", &s(&st.project), "--data-root", &s(&data), "--out", &s(&out)].map(String::from);
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = base.iter().map(String::as_str).collect();
        a.extend_from_slice(extra);
        format!("{:#}", evaluate(&a).unwrap_err())
    };
    let e = with(&["--empty", "maybe"]);
    assert!(e.contains("--empty") && e.contains("ignore, one, zero"), "{e}");
    assert!(with(&["--protocol", "lisa"]).contains("expected standard or prsmed"));
    assert!(with(&["--split", "holdout"]).contains("expected train, val or test"));
    assert!(with(&["--spacing", "1,2,3"]).contains("--spacing"));
    let e = format!("{:#}", evaluate(&["--data-root", &s(&data)]).unwrap_err());
    assert!(e.contains("--checkpoint"), "{e}");
}
