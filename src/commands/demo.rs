//! `prs demo`: the whole pipeline on the embedded tiny configuration, on the CPU: random base
//! weights in the real layouts (`prs init`), a synthetic dataset (`prs synth-data`),
//! `prs finetune`, `prs evaluate` on the test split and `prs predict` on one test image.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

/// The embedded default configuration (configs/tiny.toml).
pub const TINY_CONFIG: &str = include_str!("../../configs/tiny.toml");

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Working folder (model, data, run, evaluation, prediction).
    #[arg(long, default_value = "demo")]
    pub out: PathBuf,
    /// Mistral v1 tokenizer.model (`make assets` downloads it).
    #[arg(long, env = "PRS_TOKENIZER_MODEL", default_value = ".cache/assets/tokenizer.model.v1")]
    pub tokenizer: PathBuf,
    /// Extra `section.key=value` overrides for the finetune step.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Images per modality in the synthetic training split.
    #[arg(long, default_value_t = 120)]
    pub train_images: usize,
    /// Where finetune, evaluate and predict run: cpu (default), auto, cuda or cuda:N. The
    /// documented results are CPU runs; a GPU rounds differently, and this small model's
    /// position answer depends on it (BENCHMARKS.md: 0.933 on the CPU, 0.700 on an H100).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Prints a subcommand's command line, as a user would type it, and runs it in this process.
fn step<A: clap::Args + clap::FromArgMatches>(args: &[String], run: impl FnOnce(&A) -> Result<()>) -> Result<()> {
    tracing::info!("\n$ prs {}", args.join(" "));
    // The subcommand's name stands where clap expects the program's.
    let matches = A::augment_args(clap::Command::new("prs")).try_get_matches_from(args)?;
    run(&A::from_arg_matches(&matches)?)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

pub fn run(a: &DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    if a.out.exists() {
        anyhow::bail!("{} exists: remove it or pick another --out", a.out.display());
    }
    std::fs::create_dir_all(&a.out)?;
    let base = a.out.join("base");
    let (model, tinysam, data, run, eval, pred) = (
        base.join("llava-med-tiny"),
        base.join("tinysam-tiny.pth"),
        a.out.join("data"),
        a.out.join("run"),
        a.out.join("eval"),
        a.out.join("predict"),
    );
    // The embedded config, pointed at this demo's folders.
    let config = a.out.join("tiny.toml");
    let sets = [format!("model.base={:?}", s(&model)), format!("model.tinysam={:?}", s(&tinysam))];
    let cfg = crate::config::Config::parse(TINY_CONFIG, &sets)?;
    std::fs::write(&config, cfg.to_toml()?)?;

    step(&["init".into(), "--config".into(), s(&config), "--tokenizer".into(), s(&a.tokenizer)], super::init::run)?;
    step(
        &[
            "synth-data".into(),
            "--out".into(),
            s(&data),
            "--train".into(),
            a.train_images.to_string(),
            "--val".into(),
            "10".into(),
            "--test".into(),
            "20".into(),
        ],
        super::synth_data::run,
    )?;
    let dev = ["--device".to_string(), a.device.clone()];
    let mut ft =
        vec!["finetune".into(), "--config".into(), s(&config), "--data-root".into(), s(&data), "--out".into(), s(&run)];
    ft.extend(dev.clone());
    for x in &a.set {
        ft.extend(["--set".to_string(), x.clone()]);
    }
    step(&ft, super::finetune::run)?;
    let best = run.join("best");
    step(
        &[
            "evaluate".into(),
            "--checkpoint".into(),
            s(&best),
            "--data-root".into(),
            s(&data),
            "--split".into(),
            "test".into(),
            "--out".into(),
            s(&eval),
            dev[0].clone(),
            dev[1].clone(),
        ],
        super::evaluate::run,
    )?;
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(eval.join("summary.json"))?)?;
    let dice = summary["overall"]["dice"]["mean"].as_f64().context("summary.json: no overall Dice")?;
    let pos = summary["overall"]["position"]["accuracy"].as_f64().context("summary.json: no position accuracy")?;
    // One test image through `prs predict`.
    let case = summary["per_case"][0].clone();
    let image = case["image"].as_str().context("summary.json: no case")?.to_string();
    step(
        &[
            "predict".into(),
            "--checkpoint".into(),
            s(&best),
            "--image".into(),
            image,
            "--question".into(),
            "Where is the lesion in this image?".into(),
            "--out".into(),
            s(&pred),
            dev[0].clone(),
            dev[1].clone(),
        ],
        super::predict::run,
    )?;
    println!(
        "\ndemo finished in {:.0} s: held-out test Dice {dice:.3} (target >= 0.85), position accuracy {pos:.3} (target >= 0.9)",
        t0.elapsed().as_secs_f64()
    );
    println!("look at: {}/curves.png, {}/worst/, {}/", run.display(), eval.display(), pred.display());
    Ok(())
}
