//! `prs profile-memory`: predicted and measured peak memory of a training step over batch
//! sizes, precisions and gradient checkpointing; recommends the fastest configuration that fits
//! and can write it as a finetune config.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::args::{at_least_one, unit_interval};
use crate::config::{BaseQuant, Checkpointing, Config};
use crate::data::dataset::{read_rows, DatasetOptions};
use crate::memory::estimate::{
    estimate, DeviceKind, Estimate, EstimateInput, CPU_PROCESS_BYTES, CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES,
};
use crate::memory::measure::{spawn_trial, trial_main, Outcome, TrialSpec};
use crate::memory::search::{recommend, sweep, Row, Setting, SweepOptions};
use crate::memory::{gb, parse_bytes, Precision, SeqShape};
use crate::model::prs_med::PrsMedSpec;
use crate::pipeline::random::spec_for_config;
use crate::tokenizer;

#[derive(clap::Args, Debug)]
pub struct ProfileMemoryArgs {
    /// Model/training configuration (TOML).
    #[arg(long, required_unless_present = "trial")]
    pub config: Option<PathBuf>,
    /// cpu, cuda or cuda:N (default: cuda:0 when built with CUDA, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Memory the step may use, e.g. 24GiB (default: the device's total memory).
    #[arg(long, alias = "gpu_memory", alias = "memory")]
    pub gpu_memory: Option<String>,
    /// Batch sizes to try, e.g. 1,2,4,8 (default: search by doubling, then bisection).
    #[arg(
        long,
        alias = "batch_sizes",
        alias = "batch-size",
        alias = "batch_size",
        value_delimiter = ',',
        value_parser = at_least_one
    )]
    pub batch_sizes: Option<Vec<usize>>,
    /// Largest batch the search tries (default: the effective batch).
    #[arg(long, alias = "max_batch", value_parser = at_least_one)]
    pub max_batch: Option<usize>,
    /// Precisions, e.g. bf16,f32 (default: the config's model.compute_dtype).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub precision: Option<Vec<Precision>>,
    /// Gradient checkpointing settings to try, e.g. off,llm,all (llm: the LLM decoder layers;
    /// all: also TinySAM blocks; on = all, both = off,all).
    #[arg(long, default_value = "off,llm,all")]
    pub checkpointing: String,
    /// Storages of the frozen LLM projections to try, e.g. none,8bit,4bit (default: all three
    /// with --gpu-memory, so the recommendation can quantise; else the config's model.base_quant).
    #[arg(long, alias = "base_quant", value_delimiter = ',', value_enum)]
    pub base_quant: Option<Vec<BaseQuant>>,
    /// Samples per optimizer step (batch x gradient accumulation) to keep.
    #[arg(long, alias = "effective_batch", default_value_t = 8, value_parser = at_least_one)]
    pub effective_batch: usize,
    /// Worst-case LLM sequence length (image tokens included); default: image tokens + 64.
    #[arg(long, alias = "seq_len", conflicts_with = "data_root", value_parser = at_least_one)]
    pub seq_len: Option<usize>,
    /// Dataset whose longest tokenised training sample sets the sequence length.
    #[arg(long, alias = "data_root", alias = "data")]
    pub data_root: Option<PathBuf>,
    /// Run a real training step per row in a child process (the default).
    #[arg(long, conflicts_with = "predict_only")]
    pub measure: bool,
    /// Only the analytic prediction (no trials).
    #[arg(long, alias = "predict_only")]
    pub predict_only: bool,
    /// Fraction of the memory kept free.
    #[arg(long, alias = "safety_margin", default_value_t = 0.1, value_parser = unit_interval)]
    pub safety_margin: f64,
    /// Training steps per trial (the time is the last one's).
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    pub steps: usize,
    /// Seed of the trials' random weights and batches.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the recommended configuration as a finetune config.
    #[arg(long, alias = "emit_config")]
    pub emit_config: Option<PathBuf>,
    /// Internal: run one trial (JSON spec) and print its result line.
    #[arg(long, hide = true)]
    pub trial: Option<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    config: String,
    device: String,
    budget_bytes: u64,
    safety_margin: f64,
    effective_batch: usize,
    seq_len: usize,
    seq: SeqShape,
    seq_source: String,
    mode: &'static str,
    context_bytes: u64,
    rows: &'a [Row],
    recommended: Option<&'a Row>,
    breakdown: Option<&'a Estimate>,
    emitted_config: Option<String>,
}

fn default_device() -> String {
    if cfg!(feature = "cuda") { "cuda:0" } else { "cpu" }.to_string()
}

fn total_memory(device: &str) -> Result<u64> {
    if device == "cpu" {
        let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let kb = text
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .context("no MemTotal in /proc/meminfo")?;
        return Ok(kb * 1024);
    }
    #[cfg(feature = "cuda")]
    {
        let dev = crate::pipeline::device::parse_device(device)?;
        let (_, total) = dev.as_cuda_device()?.cuda_stream().context().mem_get_info()?;
        return Ok(total as u64);
    }
    #[allow(unreachable_code)]
    {
        bail!("device `{device}` needs a build with --features cuda (or give --gpu-memory)")
    }
}

/// The longest tokenised training sample of a dataset (prompt + answer), as a token layout.
fn worst_case_seq(cfg: &Config, root: &Path) -> Result<SeqShape> {
    let base = Path::new(&cfg.model.base);
    let tok = if base.is_dir() {
        tokenizer::load(base)?
    } else {
        let src = crate::weights::hub::ModelSource::parse(&cfg.model.base)?;
        tokenizer::load_path(&src.file("tokenizer.model")?)?
    };
    let rows = read_rows(root, &DatasetOptions::default())?.rows;
    if rows.is_empty() {
        bail!("{}: no readable rows", root.display());
    }
    let mut worst: Option<SeqShape> = None;
    for r in &rows {
        let p = tokenizer::encode_prompt(&tok, &cfg.prompt.template, &r.question, Some(&r.answer))
            .with_context(|| format!("tokenising {}", r.location()))?;
        let s = SeqShape { before: p.before_image.len(), after: p.after_image.len(), answer: p.answer.len() };
        if worst.is_none_or(|w| s.total(0) > w.total(0)) {
            worst = Some(s);
        }
    }
    Ok(worst.expect("rows is not empty"))
}

fn checkpointing_list(s: &str) -> Result<Vec<Checkpointing>> {
    let mut out = vec![];
    for w in s.split(',').map(|w| w.trim().to_ascii_lowercase()) {
        if w == "both" {
            out.extend([Checkpointing::Off, Checkpointing::All]);
            continue;
        }
        match <Checkpointing as clap::ValueEnum>::from_str(&w, true) {
            Ok(c) => out.push(c),
            Err(_) => bail!("--checkpointing expects a list of off, llm, all (on = all, both = off,all), got `{w}`"),
        }
    }
    out.dedup();
    Ok(out)
}

/// The config with the recommended row written into `[train]` and `model.compute_dtype`.
pub fn emitted_config(cfg: &Config, row: &Row) -> Result<Config> {
    let mut out = cfg.clone();
    let s = row.setting;
    out.model.compute_dtype = s.precision;
    out.model.base_quant = s.base_quant;
    let t = &mut out.train;
    t.batch_size = row.batch;
    t.gradient_accumulation_steps = row.accumulation;
    t.gradient_checkpointing = s.checkpointing;
    t.precision = s.precision;
    Ok(out)
}

/// The plain message when no row fits: the budget, and the smallest setting tried.
fn nothing_fits(rows: &[Row], opts: &SweepOptions) -> String {
    let mut msg = format!(
        "nothing fits: no setting keeps the effective batch {} within {:.2} GB ({:.2} GB less the {:.0}% margin)",
        opts.effective_batch,
        gb(opts.limit()),
        gb(opts.budget_bytes),
        opts.margin * 100.0
    );
    if let Some(r) = rows.iter().min_by_key(|r| r.measured_bytes.unwrap_or(r.predicted_bytes)) {
        let s = r.setting;
        msg += &format!(
            "; the smallest tried, batch {} {} base {} checkpointing {}, needs {:.2} GB",
            r.batch,
            s.precision,
            s.base_quant,
            s.checkpointing,
            gb(r.measured_bytes.unwrap_or(r.predicted_bytes))
        );
    }
    msg
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
}

pub fn print_table(rows: &[Row]) {
    println!(
        "{:>5} {:>5} {:>5} {:>5} {:>5} {:>10} {:>10} {:>8} {:>8} {:>9}  fits?",
        "batch", "accum", "prec", "quant", "ckpt", "pred GB", "meas GB", "error%", "step s", "samples/s"
    );
    for r in rows {
        println!(
            "{:>5} {:>5} {:>5} {:>5} {:>5} {:>10.3} {:>10} {:>8} {:>8} {:>9}  {}{}",
            r.batch,
            r.accumulation,
            r.setting.precision.as_str(),
            r.setting.base_quant.as_str(),
            r.setting.checkpointing.as_str(),
            gb(r.predicted_bytes),
            fmt_opt(r.measured_bytes.map(gb), 3),
            fmt_opt(r.error_pct, 1),
            fmt_opt(r.step_seconds, 3),
            fmt_opt(r.samples_per_s, 2),
            if r.fits { "yes" } else { "no" },
            r.note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default(),
        );
    }
}

pub fn run(args: &ProfileMemoryArgs) -> Result<()> {
    if let Some(json) = &args.trial {
        return trial_main(json);
    }
    let device = args.device.clone().unwrap_or_else(default_device);
    let measure = !args.predict_only;
    // Trials and the memory query need the device; the analytic prediction for a given
    // --gpu-memory does not (a CPU build may plan a GPU run).
    if measure || args.gpu_memory.is_none() {
        crate::pipeline::device::check_built_for(&device)
            .map_err(|e| anyhow::anyhow!("{e}; --predict-only with --gpu-memory SIZE predicts without the device"))?;
    }
    let path = args.config.as_ref().context("--config is required")?;
    let cfg = Config::load(path)?;
    let spec: PrsMedSpec = spec_for_config(&cfg)?;
    let kind = if device == "cpu" { DeviceKind::Cpu } else { DeviceKind::Cuda };
    let budget = match &args.gpu_memory {
        Some(s) => parse_bytes(s)?,
        None => total_memory(&device)?,
    };
    let precisions: Vec<Precision> = match &args.precision {
        Some(list) => list.clone(),
        None => vec![cfg.model.compute_dtype],
    };
    let image_tokens = spec.llava.vision_config()?.num_patches();
    let (seq, seq_source) = match (&args.data_root, args.seq_len) {
        (Some(root), _) => (worst_case_seq(&cfg, root)?, format!("longest sample of {}", root.display())),
        (None, Some(n)) => (SeqShape::from_total(n, image_tokens)?, "--seq-len".to_string()),
        (None, None) => (SeqShape::from_total(image_tokens + 64, image_tokens)?, "default (image + 64)".to_string()),
    };
    if !(0.0..1.0).contains(&args.safety_margin) {
        bail!("--safety-margin must be in [0, 1)");
    }
    let exe = std::env::current_exe().context("locating the prs binary for trials")?;
    let config_toml = cfg.to_toml()?;
    let trial = |batch: usize, set: Setting, steps: usize| TrialSpec {
        config_toml: config_toml.clone(),
        device: device.clone(),
        batch,
        precision: set.precision,
        base_quant: set.base_quant,
        checkpointing: set.checkpointing,
        seq,
        steps,
        seed: args.seed,
    };
    // Context overhead: a child that stops before building the model (batch 0) measures it.
    let context_bytes = if measure {
        let base = Setting { precision: precisions[0], base_quant: BaseQuant::None, checkpointing: Checkpointing::Off };
        match spawn_trial(&exe, &trial(0, base, 0))? {
            Outcome::Measured(r) => r.baseline_bytes,
            Outcome::DoesNotFit { reason } => bail!("the baseline trial failed: {reason}"),
        }
    } else {
        match kind {
            DeviceKind::Cpu => CPU_PROCESS_BYTES,
            DeviceKind::Cuda => CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES,
        }
    };
    let quants = match (&args.base_quant, &args.gpu_memory) {
        (Some(list), _) => list.clone(),
        (None, Some(_)) => vec![BaseQuant::None, BaseQuant::Int8, BaseQuant::Int4],
        (None, None) => vec![cfg.model.base_quant],
    };
    let opts = SweepOptions {
        precisions,
        quants,
        checkpointing: checkpointing_list(&args.checkpointing)?,
        batch_sizes: args.batch_sizes.clone(),
        max_batch: args.max_batch.unwrap_or(args.effective_batch),
        effective_batch: args.effective_batch,
        budget_bytes: budget,
        margin: args.safety_margin,
        measure,
    };
    let tp = &cfg.model.trainable;
    let predict = |batch: usize, set: Setting| {
        estimate(&EstimateInput {
            spec: &spec,
            train_tinysam: tp.tinysam,
            train_projector: tp.projector,
            batch,
            seq,
            precision: set.precision,
            base_quant: set.base_quant,
            checkpointing: set.checkpointing,
            device: kind,
            context_bytes,
        })
    };
    let quiet = args.json;
    let rows = sweep(
        &opts,
        predict,
        |b, set| spawn_trial(&exe, &trial(b, set, args.steps)),
        |r| {
            if !quiet {
                tracing::info!(
                    "batch {} {} base {} checkpointing {}: predicted {:.3} GB{}{}",
                    r.batch,
                    r.setting.precision,
                    r.setting.base_quant,
                    r.setting.checkpointing,
                    gb(r.predicted_bytes),
                    r.measured_bytes.map(|m| format!(", measured {:.3} GB", gb(m))).unwrap_or_default(),
                    if r.fits { "" } else { " - does not fit" }
                )
            }
        },
    )?;
    let rec = recommend(&rows, &opts);
    let rec_row = rec.map(|i| &rows[i]);
    let mut emitted = None;
    if let (Some(file), Some(r)) = (&args.emit_config, rec_row) {
        let text = emitted_config(&cfg, r)?.to_toml()?;
        std::fs::write(file, &text).with_context(|| format!("writing {}", file.display()))?;
        emitted = Some(file.display().to_string());
    } else if args.emit_config.is_some() {
        bail!("{}: nothing to emit", nothing_fits(&rows, &opts));
    }
    let report = Report {
        config: path.display().to_string(),
        device: device.clone(),
        budget_bytes: budget,
        safety_margin: args.safety_margin,
        effective_batch: args.effective_batch,
        seq_len: seq.total(image_tokens),
        seq,
        seq_source,
        mode: if measure { "measure" } else { "predict-only" },
        context_bytes,
        rows: &rows,
        recommended: rec_row,
        breakdown: rec_row.and_then(|r| r.estimate.as_ref()),
        emitted_config: emitted.clone(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} on {device}: budget {:.2} GB, safety margin {:.0}%, sequence {} ({}), effective batch {}",
        path.display(),
        gb(budget),
        args.safety_margin * 100.0,
        report.seq_len,
        report.seq_source,
        args.effective_batch
    );
    print_table(&rows);
    match rec_row {
        Some(r) => {
            println!(
                "\nrecommended: batch {} x accumulation {} ({}, base {}, checkpointing {})",
                r.batch, r.accumulation, r.setting.precision, r.setting.base_quant, r.setting.checkpointing
            );
            if let Some(e) = &r.estimate {
                println!("predicted breakdown (peak phase: {}):", e.peak_phase);
                for it in &e.items {
                    println!("  {:<70} {:>9.3} GB", it.name, gb(it.bytes));
                }
                println!("  {:<70} {:>9.3} GB", "total (peak)", gb(e.peak_bytes));
                let phases: Vec<String> = e.phase_peaks.iter().map(|(p, b)| format!("{p} {:.3}", gb(*b))).collect();
                println!("predicted peak of each phase, GB: {}", phases.join("; "));
            }
            if let Some(f) = &emitted {
                println!("wrote {f}");
            }
        }
        None => println!("\n{}", nothing_fits(&rows, &opts)),
    }
    Ok(())
}
