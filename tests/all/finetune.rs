//! `prs finetune` on the tiny model: accumulation equals the large batch, checkpointing gives
//! the same gradients, SIGKILL + resume equals the uninterrupted run bit for bit, non-finite
//! steps stop the run cleanly, bad data is reported with file and row, the guide's flags parse.

use crate::common;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use common::{rel_err, tiny_model};
use prs::config::Config;
use prs::data::prepare::{prepare, PrepareOptions};
use prs::data::sample::{collate, PreparedSample, SampleBuilder};
use prs::model::prs_med::{LossNorm, LossWeights, PrsMed};
use prs::pipeline::build::{load_prs_med, LoadOptions, Mode};
use prs::train::optim::{AdamW, AdamWConfig};
use prs::train::step::micro_backward;

pub fn synth(dir: &Path, n_train: usize) -> PathBuf {
    let data = dir.join("data");
    let cfg = prs::data::synth::SynthConfig { train: n_train, val: 2, test: 1, size: 64, seed: 5 };
    prs::data::synth::generate(&data, &cfg, false).unwrap();
    data
}

fn model(cfg: &Config) -> PrsMed {
    load_prs_med(
        cfg,
        &LoadOptions { device: Device::Cpu, dtype: DType::F32, mode: Mode::Train, checkpoint: None, seed: 9 },
    )
    .unwrap()
}

fn samples(cfg: &Config, data: &Path, n: usize) -> Vec<PreparedSample> {
    let prep = prepare(data, &PrepareOptions::default()).unwrap();
    let tok = prs::tokenizer::load(Path::new(&cfg.model.base)).unwrap();
    let b = SampleBuilder {
        tokenizer: tok.into(),
        template: cfg.prompt.template.clone(),
        clip_size: 112,
        sam_size: cfg.model.sam_image_size,
    };
    prep.train.iter().take(n).map(|r| b.prepare(r, true).unwrap()).collect()
}

fn params(m: &PrsMed) -> Vec<(String, Tensor)> {
    m.trained.all().into_iter().map(|p| (format!("{}/{}", p.group, p.key), p.var.as_tensor().copy().unwrap())).collect()
}

/// The accumulated gradient of one optimizer step over `groups` (micro-batches of sample
/// indices), from the same start, and the parameters after the AdamW step.
fn one_step(
    cfg: &Config,
    s: &[PreparedSample],
    groups: &[Vec<usize>],
) -> (Vec<(String, Tensor)>, Vec<(String, Tensor)>) {
    let m = model(cfg);
    let w = LossWeights::default();
    let all: Vec<usize> = groups.iter().flatten().copied().collect();
    let norm = LossNorm { images: all.len(), tokens: all.iter().map(|&i| s[i].prompt.answer.len() + 1).sum() };
    let mut acc: Option<candle_core::backprop::GradStore> = None;
    for g in groups {
        let items: Vec<&PreparedSample> = g.iter().map(|&i| &s[i]).collect();
        let mb = collate(&items, &Device::Cpu).unwrap();
        let step = micro_backward(&m, &mb, &w, norm, None, 77, true).unwrap();
        let grads = step.grads.expect("finite");
        match acc.as_mut() {
            Some(a) => a.extend(grads).unwrap(),
            None => acc = Some(grads),
        }
    }
    let acc = acc.unwrap();
    let grads = m
        .trained
        .weights()
        .iter()
        .map(|p| (format!("{}/{}", p.group, p.key), acc.get(p.var.as_tensor()).unwrap().copy().unwrap()))
        .collect();
    let mut opt = AdamW::new(m.trained.weights(), AdamWConfig { lr: 1e-3, ..Default::default() }).unwrap();
    opt.step(&acc).unwrap();
    (grads, params(&m))
}

/// The decoder's conv biases right before an InstanceNorm have a zero gradient in exact
/// arithmetic (what is left is rounding noise).
fn zero_by_design(k: &str) -> bool {
    k.contains("mask_generation.") && (k.ends_with("conv1.bias") || k.ends_with("conv2.bias"))
}

#[test]
fn accumulation_of_4x2_equals_batch_8() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let data = synth(dir.path(), 4);
    let s = samples(&cfg, &data, 8);
    let (g_big, p_big) = one_step(&cfg, &s, &[(0..8).collect()]);
    let (g_acc, p_acc) = one_step(&cfg, &s, &[(0..4).collect(), (4..8).collect()]);
    let mut worst = 0f32;
    for ((ka, a), (kb, b)) in g_big.iter().zip(g_acc.iter()) {
        assert_eq!(ka, kb);
        if !zero_by_design(ka) {
            worst = worst.max(rel_err(b, a));
        }
    }
    println!("batch 8 vs 4x2: worst relative gradient difference {worst:.2e}");
    assert!(worst < 1e-5, "accumulated gradient differs from the large batch: {worst}");
    // The update: AdamW's first step is lr * g/|g| per element, so elements whose gradient is
    // at rounding level may flip; all others agree to float precision.
    let mut moved_same = 0usize;
    let mut total = 0usize;
    for ((_, a), (_, b)) in p_big.iter().zip(p_acc.iter()) {
        let d: Vec<f32> = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        total += d.len();
        moved_same += d.iter().filter(|&&x| x < 1e-6).count();
    }
    println!("parameters updated identically (|diff| < 1e-6): {moved_same} of {total}");
    assert!(moved_same as f64 >= 0.999 * total as f64, "{moved_same} of {total}");
}

#[test]
fn gradient_checkpointing_gives_identical_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let data = synth(dir.path(), 2);
    let s = samples(&cfg, &data, 3);
    let items: Vec<&PreparedSample> = s.iter().collect();
    let mb = collate(&items, &Device::Cpu).unwrap();
    let grads = |ckpt: prs::config::Checkpointing| {
        let mut m = model(&cfg);
        // Moved from init (LoRA B = 0 and MBConv's zero BatchNorm weight silence branches),
        // deterministically, so that every tensor has a gradient.
        for p in m.trained.weights() {
            p.var.set(&(p.var.as_tensor() + 0.01).unwrap()).unwrap();
        }
        m.set_checkpointing(ckpt);
        let norm = LossNorm { images: 3, tokens: s.iter().map(|x| x.prompt.answer.len() + 1).sum() };
        let g = micro_backward(&m, &mb, &LossWeights::default(), norm, None, 5, false).unwrap().grads.unwrap();
        common::assert_grads_exactly_trained_except(&g, &m.trained, zero_by_design);
        m.trained.weights().iter().map(|p| g.get(p.var.as_tensor()).unwrap().copy().unwrap()).collect::<Vec<_>>()
    };
    use prs::config::Checkpointing::{All, Llm, Off};
    let a = grads(Off);
    for mode in [All, Llm] {
        let b = grads(mode);
        let worst = a.iter().zip(b.iter()).map(|(x, y)| rel_err(y, x)).fold(0f32, f32::max);
        println!("checkpointing {mode} vs off: worst relative gradient difference {worst:.2e}");
        assert!(worst <= 1e-6, "{mode}: {worst}");
    }
}

pub fn prs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_prs"));
    c.env("PRS_TOKENIZER_MODEL", common::tokenizer_model());
    c
}

/// `prs finetune --quiet --config CONF --out OUT`, waited for.
fn finetune(conf: &Path, out: &Path) -> std::process::Output {
    prs().args(["finetune", "--quiet", "--config"]).arg(conf).arg("--out").arg(out).output().unwrap()
}

/// A small finetune config file pointing at the test's model and data.
pub fn write_config(dir: &Path, cfg: &Config, data: &Path, extra: &str) -> PathBuf {
    let mut c = cfg.clone();
    c.data.root = Some(data.display().to_string());
    c.data.num_workers = 2;
    c.train.batch_size = 4;
    c.train.num_epochs = 3;
    c.train.eval_every = 4;
    c.train.save_every = 2;
    c.train.max_eval_samples = 2;
    c.train.warmup_steps = 2;
    let text = format!("{}\n", c.to_toml().unwrap());
    let text = prs::config::Config::parse(&text, &extra.split_whitespace().map(String::from).collect::<Vec<_>>())
        .unwrap()
        .to_toml()
        .unwrap();
    let p = dir.join("ft.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn checkpoint_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut out = vec![];
    for f in [
        "adapter_model.safetensors",
        "image_encoder.safetensors",
        "mask_decoder.safetensors",
        "classifier.safetensors",
        "mm_projector.safetensors",
    ] {
        let mut t: Vec<_> = candle_core::safetensors::load(dir.join(f), &Device::Cpu).unwrap().into_iter().collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(t.into_iter().map(|(k, v)| (format!("{f}/{k}"), v)));
    }
    out
}

#[test]
fn sigkill_and_resume_equal_the_uninterrupted_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let data = synth(dir.path(), 4);
    let conf = write_config(dir.path(), &cfg, &data, "train.max_steps=10");
    let full = assert_kill_and_resume_equal_the_full_run(dir.path(), &conf);
    check_predict_and_evaluate(dir.path(), &full, &data);
}

/// Runs `conf` uninterrupted into DIR/full, and again into DIR/cut killed (SIGKILL) once a
/// mid-run checkpoint exists, then resumed; asserts both end with the same tensors bit for bit
/// and the same metrics steps. Returns the full run's folder.
pub fn assert_kill_and_resume_equal_the_full_run(dir: &Path, conf: &Path) -> PathBuf {
    let (conf, full) = (conf.to_path_buf(), dir.join("full"));
    let st = prs().args(["finetune", "--quiet", "--config"]).arg(&conf).arg("--out").arg(&full).status().unwrap();
    assert!(st.success());

    // Same run, killed once its step-4 checkpoint exists (mid-epoch: 3 steps per epoch).
    let cut = dir.join("cut");
    let mut child = prs()
        .args(["finetune", "--quiet", "--config"])
        .arg(&conf)
        .arg("--out")
        .arg(&cut)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let last = std::fs::read_to_string(cut.join("last")).unwrap_or_default();
        if last.contains("step-0000004") || last.contains("step-0000005") || last.contains("step-0000006") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let st = prs().args(["finetune", "--quiet", "--resume"]).arg(&cut).status().unwrap();
    assert!(st.success());

    let last = |run: &Path| run.join(std::fs::read_to_string(run.join("last")).unwrap().trim());
    let (a, b) = (checkpoint_tensors(&last(&full)), checkpoint_tensors(&last(&cut)));
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(b.iter()) {
        assert_eq!(ka, kb);
        let d = (ta - tb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{ka} differs after resume");
    }
    // The metrics log of the resumed run equals the uninterrupted one's step for step.
    let steps = |run: &Path| -> Vec<u64> {
        prs::report::read_metrics(&run.join("metrics.jsonl")).unwrap().iter().map(|r| r.step).collect()
    };
    assert_eq!(steps(&full), steps(&cut));
    assert!(last(&full).join("optimizer.safetensors").exists());
    assert!(full.join("curves.png").exists() && full.join("best").join("prs_checkpoint.json").exists());
    full
}

/// A finetune checkpoint feeds `prs predict` and `prs evaluate` directly.
fn check_predict_and_evaluate(dir: &Path, full: &Path, data: &Path) {
    let image =
        std::fs::read_dir(data.join("brain_tumors_ct_scan/test_images")).unwrap().next().unwrap().unwrap().path();
    let pred = dir.join("pred");
    let st = prs()
        .args(["predict", "--checkpoint"])
        .arg(full.join("best"))
        .arg("--image")
        .arg(&image)
        .args(["--question", "Where is the tumor?", "--out"])
        .arg(&pred)
        .status()
        .unwrap();
    assert!(st.success());
    for f in ["mask.png", "prob.png", "overlay.png", "result.json"] {
        assert!(pred.join(f).exists(), "predict wrote no {f}");
    }
    let eval = dir.join("eval");
    let st = prs()
        .args(["evaluate", "--checkpoint"])
        .arg(full.join("best"))
        .arg("--data-root")
        .arg(data)
        .args(["--split", "test", "--out"])
        .arg(&eval)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(eval.join("summary.json").exists() && eval.join("per_image.csv").exists());
}

#[test]
fn non_finite_steps_are_skipped_and_three_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let data = synth(dir.path(), 4);
    // An absurd learning rate blows the weights up to inf after the first update.
    let conf = write_config(
        dir.path(),
        &cfg,
        &data,
        "train.learning_rate=1e30 train.warmup_steps=0 train.max_grad_norm=0.0 train.save_every=1",
    );
    // Not -q: a skipped step is a warning on stderr.
    let out =
        prs().args(["finetune", "--config"]).arg(&conf).arg("--out").arg(dir.path().join("run")).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("consecutive steps were skipped") && err.contains("non-finite"), "{err}");
    assert!(err.lines().any(|l| l.starts_with("warning: step ") && l.contains(": skipped (")), "{err}");
    // A skipped step saves and prunes nothing: only step 1 (applied) was written.
    if let Ok(rd) = std::fs::read_dir(dir.path().join("run/checkpoints")) {
        let names: Vec<String> = rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().all(|n| n == "step-0000001"), "{names:?}");
    }
    // No checkpoint holds a non-finite value.
    if let Ok(rd) = std::fs::read_dir(dir.path().join("run/checkpoints")) {
        for e in rd {
            for (k, t) in checkpoint_tensors(&e.unwrap().path()) {
                let s = t.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(s.is_finite(), "{k} is not finite in a checkpoint");
            }
        }
    }
}

#[test]
fn bad_rows_are_all_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let data = synth(dir.path(), 3);
    // Break two rows: a missing image and an empty answer.
    let csv = std::fs::read_dir(data.join("annotations")).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let first_mask = lines[1].split(',').next().unwrap().to_string();
    std::fs::remove_file(data.join(first_mask.replace("_masks", "_images")).with_extension("png")).ok();
    std::fs::remove_file(
        data.join(first_mask.replace("_masks", "_images").replace("_Segmentation", "")).with_extension("jpg"),
    )
    .ok();
    let conf = write_config(dir.path(), &cfg, &data, "");
    let out = prs()
        .args(["finetune", "--dry-run", "--quiet", "--config"])
        .arg(&conf)
        .arg("--out")
        .arg(dir.path().join("r"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let name = csv.file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&format!("{name}:2")), "error does not name {name}:2: {err}");
    // --skip-bad-rows goes on and says how many were dropped.
    let out = prs()
        .args(["finetune", "--dry-run", "--skip-bad-rows", "--config"])
        .arg(&conf)
        .arg("--out")
        .arg(dir.path().join("r2"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A warning (stderr), which -q would leave out.
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: skipped 1 bad rows"));
    lines.truncate(1);
    let _ = lines;
}

#[test]
fn the_memory_guides_flag_spellings_parse() {
    let cli = prs::cli::Cli::try_parse_from([
        "prs",
        "finetune",
        "--config",
        "c.toml",
        "--data_root",
        "d",
        "--batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--gradient_checkpointing",
        "--use_amp",
        "--learning_rate",
        "1e-4",
        "--num_epochs",
        "3",
        "--image_size",
        "1024",
        "--num_workers",
        "4",
        "--compile_model",
    ])
    .unwrap();
    let prs::cli::Command::Finetune(a) = cli.command else { panic!("not finetune") };
    assert_eq!(
        (a.batch_size, a.gradient_accumulation_steps, a.num_epochs, a.image_size),
        (Some(4), Some(2), Some(3), Some(1024))
    );
    assert!(a.gradient_checkpointing == Some(prs::config::Checkpointing::All) && a.use_amp && a.compile_model);
    let cli = prs::cli::Cli::try_parse_from(["prs", "finetune", "--config", "c.toml", "--no-use_amp"]).unwrap();
    let prs::cli::Command::Finetune(a) = cli.command else { panic!() };
    assert!(a.no_amp);
}

#[test]
fn the_tiny_model_learns() {
    // A shortened demo: the loss falls and validation Dice rises well above the untrained value.
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let data = dir.path().join("data");
    prs::data::synth::generate(
        &data,
        &prs::data::synth::SynthConfig { train: 24, val: 4, test: 1, size: 96, seed: 2 },
        false,
    )
    .unwrap();
    let mut c = cfg.clone();
    c.data.root = Some(data.display().to_string());
    c.train.batch_size = 8;
    c.train.max_steps = 60;
    c.train.num_epochs = 100;
    c.train.eval_every = 60;
    c.train.warmup_steps = 3;
    c.train.max_eval_samples = 12;
    let summary = prs::train::trainer::train(prs::train::trainer::TrainOptions {
        cfg: c,
        run_dir: dir.path().join("run"),
        device: Device::Cpu,
        resume: false,
        dry_run: false,
        progress: false,
        ranks: prs::dist::single(),
        poison_step: None,
    })
    .unwrap();
    let records = prs::report::read_metrics(&dir.path().join("run/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = records.iter().filter_map(|r| r.loss).collect();
    let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    let (d0, d1) = (summary.first_eval.unwrap().dice, summary.last_eval.unwrap().dice);
    println!("train loss {first:.3} -> {last:.3}; val Dice {d0:.3} -> {d1:.3}");
    assert!(last < 0.75 * first, "loss did not fall: {first} -> {last}");
    assert!(d1 > d0 + 0.1 && d1 > 1.5 * d0, "Dice did not rise: {d0} -> {d1}");
}

#[test]
fn the_demo_runs_every_stage_on_the_cpu_and_refuses_an_existing_folder() {
    // `prs demo` end to end, shortened through its `--set` overrides: init, synth-data,
    // finetune, evaluate and predict, each leaving its files.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let sets = ["train.max_steps=2", "train.warmup_steps=0", "train.eval_every=2", "train.max_eval_samples=4"];
    let mut cmd = prs();
    cmd.args(["demo", "--out", out.to_str().unwrap(), "--train-images", "2"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let res = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&res.stderr));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("compute F32 on Cpu"), "the demo's default device is the CPU:\n{stderr}");
    let last = stdout.lines().rev().find(|l| l.starts_with("demo finished")).expect("a final line");
    assert!(last.contains("held-out test Dice") && last.contains("position accuracy"), "{last}");
    for f in ["tiny.toml", "run/curves.png", "run/metrics.jsonl", "run/best", "eval/summary.json", "eval/summary.md"] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    // The trainer's log in the forms people open: a CSV and a TensorBoard event file.
    assert!(std::fs::read_to_string(out.join("run/metrics.csv")).unwrap().lines().count() > 1);
    let events = std::fs::read_dir(out.join("run")).unwrap().filter_map(|e| e.ok()).find(|e| {
        e.file_name().to_string_lossy().starts_with("events.out.tfevents.") && e.metadata().unwrap().len() > 100
    });
    assert!(events.is_some(), "no TensorBoard event file with records in the run folder");
    let overlays = walk(&out.join("predict")).into_iter().filter(|p| p.ends_with("overlay.png")).count();
    assert_eq!(overlays, 1, "one predicted image");
    // A second run into the same folder stops before touching it.
    let again = prs().args(["demo", "--out", out.to_str().unwrap()]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains(&format!("{} exists", out.display())));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The step checkpoint a pointer names, checked to be complete: metadata, trainer state,
/// optimizer state and every tensor file load.
fn assert_loadable(run: &Path, pointer: &str) -> u64 {
    let dir = match pointer {
        "last" => run.join(std::fs::read_to_string(run.join("last")).unwrap().trim()),
        _ => run.join(pointer),
    };
    prs::weights::checkpoint::TrainedCheckpoint::open(&dir).unwrap_or_else(|e| panic!("{pointer}: {e:#}"));
    let state = prs::train::state::TrainerState::read(&dir).unwrap();
    candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu).unwrap();
    assert!(!checkpoint_tensors(&dir).is_empty());
    state.step
}

fn temporaries(run: &Path) -> Vec<String> {
    [run.to_path_buf(), run.join("checkpoints")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && (n.contains(".tmp") || n.contains(".old-")))
        .collect()
}

#[test]
fn a_kill_between_any_two_filesystem_operations_leaves_loadable_best_and_last() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let data = synth(dir.path(), 4);
    let conf = write_config(dir.path(), &cfg, &data, "train.max_steps=7 train.save_every=1 train.eval_every=2");
    let full = dir.path().join("full");
    assert!(finetune(&conf, &full).status.success());
    let final_tensors = checkpoint_tensors(&full.join(std::fs::read_to_string(full.join("last")).unwrap().trim()));
    for point in [
        "checkpoint:partial@12",
        "checkpoint:written@3",
        "last:written@3",
        "best:linked@2",
        "best:switched@2",
        "prune:moved@1",
    ] {
        let run = dir.path().join(point.replace([':', '@'], "_"));
        let st = prs()
            .args(["finetune", "--quiet", "--config"])
            .arg(&conf)
            .arg("--out")
            .arg(&run)
            .env("PRS_CRASH_AT", point)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(st.signal(), Some(9), "{point}: the run was not killed there ({st:?})");
        let step = assert_loadable(&run, "last");
        assert!(step >= 1, "{point}");
        if run.join("best").is_symlink() {
            assert_loadable(&run, "best");
        }
        // Resuming removes what the kill left half-written and ends where the full run ends.
        let st = prs().args(["finetune", "--quiet", "--resume"]).arg(&run).stdout(std::process::Stdio::null()).status();
        assert!(st.unwrap().success(), "{point}: resume failed");
        assert!(temporaries(&run).is_empty(), "{point}: {:?}", temporaries(&run));
        assert_loadable(&run, "best");
        let resumed = checkpoint_tensors(&run.join(std::fs::read_to_string(run.join("last")).unwrap().trim()));
        for ((ka, ta), (_, tb)) in final_tensors.iter().zip(&resumed) {
            let d =
                (ta - tb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "{point}: {ka} differs from the uninterrupted run");
        }
    }
    // A changed batch plan is refused on resume, with the reason (never a panic).
    let out = prs().args(["finetune", "--quiet", "--resume"]).arg(&full).args(["--batch-size", "2"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("different batch plan") && err.contains("batch size 4 -> 2"), "{err}");
}

#[test]
fn one_process_per_run_folder_and_never_into_a_foreign_folder() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let data = synth(dir.path(), 4);
    let conf = write_config(dir.path(), &cfg, &data, "train.max_steps=1 train.warmup_steps=0");
    let run = dir.path().join("run");
    let lock = prs::files::DirLock::acquire(&run, "run folder").unwrap();
    let out = finetune(&conf, &run);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("in use by another prs process") && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(lock);
    assert!(finetune(&conf, &run).status.success());
    // A second new run into the same folder is refused (it holds a run).
    let out = finetune(&conf, &run);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a run"));
    // A folder of the user's files is never a run folder.
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("config.toml"), "mine").unwrap();
    let out = finetune(&conf, &docs);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not a prs run folder"), "{err}");
    assert_eq!(std::fs::read_to_string(docs.join("config.toml")).unwrap(), "mine");
    assert_eq!(std::fs::read_dir(&docs).unwrap().count(), 1);
}

#[test]
fn the_divergence_guard_skips_spikes_without_saving_and_keeps_the_good_checkpoints() {
    // A healthy run, then a resume with a learning rate 300x too high: the first update wrecks
    // the weights with finite values (not 10x their norm: Adam's steps stay small), and the
    // guard must skip what follows, save nothing for it, and stop with the good checkpoints
    // still on disk.
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let data = synth(dir.path(), 4);
    let conf = write_config(dir.path(), &cfg, &data, "train.max_steps=12 train.num_epochs=8 train.save_every=1");
    let run = dir.path().join("run");
    assert!(finetune(&conf, &run).status.success());
    let best_before = assert_loadable(&run, "best");
    let out =
        prs().args(["finetune", "--learning-rate", "1", "--max-steps", "24", "--resume"]).arg(&run).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stderr.contains("consecutive steps were skipped") && stderr.contains("its running level"), "{stderr}");
    assert!(stderr.contains("The newest checkpoint is") && stderr.contains("and the best"), "{stderr}");
    // Skipped steps are warnings on stderr (not -q, which leaves them out).
    let skipped: Vec<u64> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("warning: step ").filter(|l| l.contains(": skipped (")))
        .map(|l| l.split(':').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(skipped.len(), 3, "{stderr}");
    for s in &skipped {
        assert!(!run.join(format!("checkpoints/step-{s:07}")).exists(), "skipped step {s} was saved");
    }
    let last = assert_loadable(&run, "last");
    assert!(last < skipped[0], "last {last} is not before the skipped steps {skipped:?}");
    assert_eq!(assert_loadable(&run, "best"), best_before, "the best checkpoint moved or went");
}
