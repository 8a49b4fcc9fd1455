//! `prs profile-memory` on the tiny model (CPU): analytic parameter counts against the built
//! model, the batch search, predicted vs measured peak RSS over a small sweep (within 15%),
//! an injected allocation failure, the worst-case length from a dataset, and the emitted
//! finetune config.

use crate::common;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use prs::config::Config;
use prs::memory::estimate::param_counts;
use prs::memory::measure::INJECT_OOM_ENV;
use prs::memory::search::search_batches;
use prs::memory::{parse_bytes, SeqShape};
use prs::nn::param::ParamKind;
use prs::pipeline::build::Mode;
use prs::pipeline::random::{random_prs_med, spec_for_config, RandomOptions};
use serde_json::Value;

fn tiny_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml")
}

/// Runs `prs profile-memory ARGS --json` and returns the report.
fn profile(args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prs"));
    cmd.arg("profile-memory").args(args).arg("--json").env_remove(INJECT_OOM_ENV);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "prs profile-memory failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn rows(report: &Value) -> &Vec<Value> {
    report["rows"].as_array().unwrap()
}

fn print_rows(title: &str, report: &Value) {
    println!("{title}");
    println!("batch accum prec quant ckpt   pred MB   meas MB  error%  step s  fits  note");
    for r in rows(report) {
        let mb = |v: &Value| v.as_f64().map(|x| format!("{:9.1}", x / 1e6)).unwrap_or_else(|| "        -".into());
        println!(
            "{:5} {:5} {:4} {:5} {:4} {} {} {:>7} {:>7} {:5} {}",
            r["batch"],
            r["accumulation"],
            r["precision"].as_str().unwrap(),
            r["base_quant"].as_str().unwrap(),
            r["checkpointing"].as_str().unwrap(),
            mb(&r["predicted_bytes"]),
            mb(&r["measured_bytes"]),
            r["error_pct"].as_f64().map(|e| format!("{e:.1}")).unwrap_or("-".into()),
            r["step_seconds"].as_f64().map(|e| format!("{e:.2}")).unwrap_or("-".into()),
            r["fits"],
            r["note"].as_str().unwrap_or(""),
        );
    }
}

#[test]
fn analytic_parameter_counts_match_the_built_model() {
    let cfg = Config::load(&tiny_config()).unwrap();
    let spec = spec_for_config(&cfg).unwrap();
    let m = random_prs_med(&spec, &RandomOptions::from_config(&cfg, Device::Cpu, DType::F32, Mode::Train, 0)).unwrap();
    let count = |group: &str, kind: ParamKind| -> u64 {
        m.trained.group(group).iter().filter(|p| p.kind == kind).map(|p| p.var.elem_count() as u64).sum()
    };
    let pc = param_counts(&spec).unwrap();
    assert_eq!(pc.lora, count("lora", ParamKind::Weight));
    assert_eq!(pc.tinysam, count("image_encoder", ParamKind::Weight));
    assert_eq!(pc.tinysam_buffers, count("image_encoder", ParamKind::Buffer));
    assert_eq!(pc.decoder, count("mask_decoder", ParamKind::Weight));
    assert_eq!(pc.classifier, count("classifier", ParamKind::Weight));
    assert_eq!(pc.projector, count("mm_projector", ParamKind::Weight));
    // Frozen parts are not registered: the LLM count is checked against the shapes directly.
    let l = &spec.llava.llm;
    let (h, i, v) = (l.hidden_size as u64, l.intermediate_size as u64, l.vocab_size as u64);
    let kv = (l.num_key_value_heads * l.head_dim()) as u64;
    assert_eq!(pc.llm, 2 * v * h + l.num_hidden_layers as u64 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h);

    // The 7B spec needs no files, and its trained count is PRS-Med's ~25M.
    let big = Config::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/prs-med-7b.toml")).unwrap();
    let pc7 = param_counts(&spec_for_config(&big).unwrap()).unwrap();
    assert!((7_000_000_000..7_400_000_000).contains(&pc7.llm), "{}", pc7.llm);
    assert_eq!(pc7.lora, 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024)));
    let trained = pc7.lora + pc7.tinysam + pc7.decoder + pc7.classifier;
    assert!((20_000_000..30_000_000).contains(&trained), "{trained}");
}

#[test]
fn batch_search_doubles_then_bisects_and_explicit_lists_continue_after_failures() {
    let fits_up_to = |k: usize| move |b: usize| -> anyhow::Result<bool> { Ok(b <= k) };
    assert_eq!(search_batches(None, 64, fits_up_to(5)).unwrap(), vec![1, 2, 4, 8, 6, 5]);
    assert_eq!(search_batches(None, 64, fits_up_to(8)).unwrap(), vec![1, 2, 4, 8, 16, 12, 10, 9]);
    assert_eq!(search_batches(None, 6, fits_up_to(100)).unwrap(), vec![1, 2, 4, 6]);
    assert_eq!(search_batches(None, 8, fits_up_to(0)).unwrap(), vec![1]);
    assert_eq!(search_batches(Some(&[1, 4, 2, 8]), 8, fits_up_to(1)).unwrap(), vec![1, 4, 2, 8]);
    assert_eq!(parse_bytes("24GiB").unwrap(), 24 << 30);
    assert_eq!(parse_bytes("80GB").unwrap(), 80_000_000_000);
    assert_eq!(parse_bytes("1.5e9").unwrap(), 1_500_000_000);
    assert_eq!(parse_bytes("2.5e3MB").unwrap(), 2_500_000_000);
    let bare = parse_bytes("80").unwrap_err().to_string();
    assert!(bare.contains("no unit") && bare.contains("80GB"), "{bare}");
    assert!(parse_bytes("12XB").is_err() && parse_bytes("GB").is_err() && parse_bytes("-3GB").is_err());
    assert!(parse_bytes("12 parsecs").is_err());
    let s = SeqShape::from_total(640, 576).unwrap();
    assert_eq!(s.total(576), 640);
    assert!(SeqShape::from_total(579, 576).is_err());
}

#[test]
fn tiny_sweep_predictions_within_15_percent_and_emitted_config_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("finetune.toml");
    let cfg_path = tiny_config();
    let report = profile(
        &[
            "--config",
            cfg_path.to_str().unwrap(),
            "--device",
            "cpu",
            "--batch-sizes",
            "1,2,4",
            "--precision",
            "f32",
            "--checkpointing",
            "both",
            "--effective_batch", // the underscore alias
            "4",
            "--emit-config",
            out.to_str().unwrap(),
        ],
        &[],
    );
    print_rows("tiny sweep (CPU peak RSS, VmHWM)", &report);
    let rs = rows(&report);
    assert_eq!(rs.len(), 6);
    for r in rs {
        let pred = r["predicted_bytes"].as_f64().unwrap();
        let meas = r["measured_bytes"].as_f64().expect("every row is measured");
        let err = r["error_pct"].as_f64().unwrap();
        assert!(((pred - meas) / meas * 100.0 - err).abs() < 1e-6);
        assert!(err.abs() <= 15.0, "batch {} checkpointing {}: error {err:.1}%", r["batch"], r["checkpointing"]);
        assert!(r["fits"].as_bool().unwrap());
        assert!(r["samples_per_s"].as_f64().unwrap() > 0.0);
    }
    // More samples cost more memory, measured and predicted alike.
    for ck in ["off", "all"] {
        let m: Vec<f64> = rs
            .iter()
            .filter(|r| r["checkpointing"].as_str() == Some(ck))
            .map(|r| r["measured_bytes"].as_f64().unwrap())
            .collect();
        assert!(m.windows(2).all(|w| w[1] > w[0]), "{m:?}");
    }
    let rec = &report["recommended"];
    let (b, acc) = (rec["batch"].as_u64().unwrap(), rec["accumulation"].as_u64().unwrap());
    assert_eq!(b * acc, 4, "the recommendation keeps the effective batch");
    // The recommended row is the fastest of those that keep it.
    let best = rs
        .iter()
        .filter(|r| r["batch"].as_u64().unwrap() * r["accumulation"].as_u64().unwrap() == 4)
        .map(|r| r["samples_per_s"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert_eq!(rec["samples_per_s"].as_f64().unwrap(), best);
    let items = report["breakdown"]["items"].as_array().unwrap();
    let sum: u64 = items.iter().map(|i| i["bytes"].as_u64().unwrap()).sum();
    assert_eq!(sum, rec["predicted_bytes"].as_u64().unwrap(), "the breakdown adds up to the prediction");

    // The emitted file is a valid config carrying the recommendation.
    let emitted = Config::load(&out).unwrap();
    let t = &emitted.train;
    assert_eq!(t.batch_size as u64, b);
    assert_eq!(t.gradient_accumulation_steps as u64, acc);
    assert_eq!(Some(t.gradient_checkpointing.as_str()), rec["checkpointing"].as_str());
    assert_eq!(t.precision, prs::config::Precision::F32);
    assert_eq!(emitted.model.compute_dtype, prs::config::Precision::F32);
    let orig = Config::load(&cfg_path).unwrap();
    assert_eq!(emitted.model.lora, orig.model.lora);
    assert_eq!(emitted.model.base, orig.model.base);
}

#[test]
fn injected_allocation_failure_is_does_not_fit_and_the_search_continues() {
    let cfg_path = tiny_config();
    // Trials with batch > 2 lose their address-space headroom: a real allocation failure.
    let report = profile(
        &["--config", cfg_path.to_str().unwrap(), "--device", "cpu", "--max-batch", "8", "--checkpointing", "both"],
        &[(INJECT_OOM_ENV, "2")],
    );
    print_rows("search with an injected allocation failure above batch 2", &report);
    let got: Vec<(u64, &str, bool)> = rows(&report)
        .iter()
        .map(|r| (r["batch"].as_u64().unwrap(), r["checkpointing"].as_str().unwrap(), r["fits"].as_bool().unwrap()))
        .collect();
    // Doubling 1, 2, 4 (fails), bisection 3 (fails); then the checkpointing search runs too.
    let want = |ck| vec![(1, ck, true), (2, ck, true), (4, ck, false), (3, ck, false)];
    assert_eq!(got, [want("off"), want("all")].concat());
    for r in rows(&report).iter().filter(|r| !r["fits"].as_bool().unwrap()) {
        let note = r["note"].as_str().unwrap();
        assert!(note.starts_with("does not fit") && note.contains("memory allocation"), "{note}");
        assert!(r["measured_bytes"].is_null());
    }
    let rec = &report["recommended"];
    assert!(rec["batch"].as_u64().unwrap() <= 2);
}

#[test]
fn worst_case_length_comes_from_the_longest_tokenised_sample() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_model(dir.path()); // base folder with a tokenizer
    let cfg_path = dir.path().join("tiny.toml");
    std::fs::write(&cfg_path, cfg.to_toml().unwrap()).unwrap();
    let data = dir.path().join("data");
    let synth = prs::data::synth::SynthConfig { train: 2, val: 1, test: 1, size: 64, seed: 3 };
    prs::data::synth::generate(&data, &synth, false).unwrap();
    let report = profile(
        &["--config", cfg_path.to_str().unwrap(), "--data-root", data.to_str().unwrap(), "--predict-only"],
        &[],
    );
    // The same length, tokenised here row by row.
    let tok = prs::tokenizer::load(Path::new(&cfg.model.base)).unwrap();
    let rows_ = prs::data::dataset::read_rows(&data, &Default::default()).unwrap().rows;
    let longest = rows_
        .iter()
        .map(|r| {
            let p = prs::tokenizer::encode_prompt(&tok, &cfg.prompt.template, &r.question, Some(&r.answer)).unwrap();
            p.before_image.len() + p.after_image.len() + p.answer.len() + 1
        })
        .max()
        .unwrap();
    let image = spec_for_config(&cfg).unwrap().llava.vision_config().unwrap().num_patches();
    assert_eq!(report["seq_len"].as_u64().unwrap() as usize, longest + image);
    assert_eq!(report["mode"], "predict-only");
    assert!(rows(&report).iter().all(|r| r["measured_bytes"].is_null()));
}

/// The analytic table for the 7B configuration (printed; no trials).
#[test]
fn prs_med_7b_prediction_table() {
    let cfg_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/prs-med-7b.toml");
    let report = profile(
        &[
            "--config",
            cfg_path.to_str().unwrap(),
            "--device",
            "cuda:0",
            "--gpu-memory",
            "80GB",
            "--predict-only",
            "--seq-len",
            "640",
            "--batch-sizes",
            "1,4,8",
            "--precision",
            "bf16",
        ],
        &[],
    );
    print_rows("PRS-Med 7B, bf16, sequence 640 (analytic)", &report);
    let rs = rows(&report);
    let pred = |b: u64, ck: &str| {
        rs.iter().find(|r| r["batch"].as_u64() == Some(b) && r["checkpointing"].as_str() == Some(ck)).unwrap()
            ["predicted_bytes"]
            .as_f64()
            .unwrap()
    };
    for b in [1, 4, 8] {
        assert!(pred(b, "all") < pred(b, "off"), "checkpointing saves memory at batch {b}");
    }
    // Frozen bf16 weights alone are ~15 GB.
    assert!(pred(1, "all") > 15e9);
}

#[test]
fn emitted_config_runs_in_finetune() {
    // profile-memory --emit-config -> prs finetune --config (a dry run validates everything
    // finetune needs: config, weights, dataset, and prints the plan with the emitted batch).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("emitted.toml");
    profile(
        &[
            "--config",
            tiny_config().to_str().unwrap(),
            "--device",
            "cpu",
            "--batch-sizes",
            "1,2",
            "--precision",
            "f32",
            "--checkpointing",
            "off",
            "--effective-batch",
            "2",
            "--predict-only",
            "--emit-config",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let base = common::tiny_model(dir.path());
    let data = dir.path().join("data");
    prs::data::synth::generate(
        &data,
        &prs::data::synth::SynthConfig { train: 4, val: 2, test: 1, size: 64, seed: 1 },
        false,
    )
    .unwrap();
    let args = prs::commands::finetune::FinetuneArgs {
        config: Some(out.clone()),
        data_root: Some(data.display().to_string()),
        set: vec![format!("model.base={:?}", base.model.base), format!("model.tinysam={:?}", base.model.tinysam)],
        dry_run: true,
        out: Some(dir.path().join("run")),
        device: "cpu".into(),
        ..Default::default()
    };
    let cfg = prs::commands::finetune::resolve_config(&args).unwrap();
    let emitted = Config::load(&out).unwrap();
    assert_eq!(cfg.train.batch_size, emitted.train.batch_size);
    assert_eq!(cfg.train.gradient_accumulation_steps, emitted.train.gradient_accumulation_steps);
    prs::commands::finetune::run(&args).unwrap();
}

#[test]
fn phase_timer_attributes_a_training_step_to_its_parts() {
    use prs::memory::measure::{synthetic_batch, train_step};
    use prs::train::optim::{AdamW, AdamWConfig};
    let cfg = Config::load(&tiny_config()).unwrap();
    let spec = spec_for_config(&cfg).unwrap();
    let mut m =
        random_prs_med(&spec, &RandomOptions::from_config(&cfg, Device::Cpu, DType::F32, Mode::Train, 0)).unwrap();
    m.set_gradient_checkpointing(true);
    let batch = synthetic_batch(&m, 2, &SeqShape { before: 3, after: 10, answer: 6 }, 1).unwrap();
    let mut opt = AdamW::new(m.trained.weights(), AdamWConfig::default()).unwrap();
    // Inactive: marks record nothing and cost nothing.
    train_step(&m, &batch, &mut opt, None, 0).unwrap();
    let timer = prs::phases::PhaseTimer::start(&Device::Cpu);
    let t0 = std::time::Instant::now();
    train_step(&m, &batch, &mut opt, None, 1).unwrap();
    let wall = t0.elapsed().as_secs_f64();
    let phases = timer.finish();
    let names: Vec<&str> = phases.iter().map(|p| p.0).collect();
    for want in [
        "CLIP + projector",
        "LLM forward",
        "TinySAM forward",
        "mask decoder forward",
        "losses",
        // The staged backward, one part at a time, recomputations named per part.
        "backward: losses, LM head, decoder, classifier",
        "LLM backward (outside recomputations)",
        "LLM recomputation + its backward",
        "TinySAM backward (outside recomputations)",
        "TinySAM recomputation + its backward",
        "AdamW",
    ] {
        assert!(names.contains(&want), "no phase `{want}` in {names:?}");
    }
    let total: f64 = phases.iter().map(|p| p.1).sum();
    assert!(phases.iter().all(|p| p.1 >= 0.0));
    assert!(total <= wall && total > 0.5 * wall, "phases sum to {total} s of a {wall} s step");
    assert!(prs::phases::PhaseTimer::start(&Device::Cpu).finish().is_empty(), "a new timer starts empty");
}
