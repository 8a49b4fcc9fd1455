//! `prs finetune`: LoRA fine-tuning of PRS-Med. Flags override the config file; the training
//! memory guide's spellings (`--batch_size`, `--use_amp`, ...) are accepted as aliases.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::args::{at_least_one, positive};
use crate::config::{Checkpointing, Config, Precision};
use crate::dist::launch::{from_env, Launch};
use crate::dist::spawn::run_ranks;
use crate::exit::InputError;
use crate::model::losses::LossCompat;
use crate::pipeline::load::BaseQuantArgs;
use crate::train::state::RunDir;
use crate::train::trainer::{train, TrainOptions};

#[derive(clap::Args, Debug, Default)]
pub struct FinetuneArgs {
    /// Configuration file (configs/tiny.toml, configs/prs-med-7b.toml, or your own).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Dataset: the authors' layout (folder with annotations/) or a plain CSV.
    #[arg(long, alias = "data_root")]
    pub data_root: Option<String>,
    /// Run folder (config, metrics, checkpoints): new or empty. Default: runs/<timestamp>.
    #[arg(long, alias = "output_dir")]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// `section.key=value` overrides (repeatable), e.g. --set train.learning_rate=3e-4.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Images per micro-batch (train.batch_size).
    #[arg(long, alias = "batch_size", value_parser = at_least_one)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step (train.gradient_accumulation_steps).
    #[arg(long, alias = "gradient_accumulation_steps", value_parser = at_least_one)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Gradient checkpointing: off, llm (the LLM decoder layers: PyTorch's setting) or all (also
    /// TinySAM blocks). The bare flag means all, as it always did.
    #[arg(long, alias = "gradient_checkpointing", value_enum, num_args = 0..=1, default_missing_value = "all")]
    pub gradient_checkpointing: Option<Checkpointing>,
    #[command(flatten)]
    pub quant: BaseQuantArgs,
    /// Compute precision on a GPU (mixed precision is on by default there; the CPU uses f32).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Same as --precision f32.
    #[arg(long = "no-amp", alias = "no-use_amp", alias = "no_use_amp")]
    pub no_amp: bool,
    /// Mixed precision (the default on a GPU; accepted for the guide's command lines).
    #[arg(long = "use_amp", alias = "use-amp")]
    pub use_amp: bool,
    /// Peak learning rate of the cosine schedule (train.learning_rate).
    #[arg(long, alias = "learning_rate", alias = "lr", value_parser = positive)]
    pub learning_rate: Option<f64>,
    /// Passes over the training split (train.num_epochs).
    #[arg(long, alias = "num_epochs", value_parser = clap::value_parser!(u64).range(1..))]
    pub num_epochs: Option<u64>,
    /// SAM input (and mask) resolution.
    #[arg(long, alias = "image_size", value_parser = at_least_one)]
    pub image_size: Option<usize>,
    /// Threads preparing batches (data.num_workers).
    #[arg(long, alias = "num_workers")]
    pub num_workers: Option<usize>,
    /// auto (CUDA when built with it and a GPU is present), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Seed of initialisation, shuffling and dropout (train.seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many optimizer steps (0 = all epochs).
    #[arg(long, alias = "max_steps")]
    pub max_steps: Option<u64>,
    /// Drop rows that fail validation (reporting how many) instead of stopping.
    #[arg(long, alias = "skip_bad_rows")]
    pub skip_bad_rows: bool,
    /// Read every non-zero mask value as lesion (class-id label masks); by default masks must
    /// be binary and other values are reported.
    #[arg(long, alias = "mask_nonzero_is_lesion")]
    pub mask_nonzero_is_lesion: bool,
    /// Segmentation BCE: `intended` (weighted, default) or `authors` (their unweighted one).
    #[arg(long, alias = "loss_compat", value_enum)]
    pub loss_compat: Option<LossCompat>,
    /// Validate configuration, weights and the whole dataset, print the plan, and exit.
    #[arg(long, alias = "dry_run")]
    pub dry_run: bool,
    /// Accepted from the guide's command lines; has no effect here (see the notice).
    #[arg(long = "compile_model", alias = "compile-model", hide = true)]
    pub compile_model: bool,
    /// Data parallel on this machine: start N ranks of this command (one per GPU, cuda:0 to
    /// cuda:N-1, or N CPU processes with --device cpu). Under torchrun or srun leave it out:
    /// the ranks come from their environment (README, "Several GPUs").
    #[arg(long, alias = "nproc_per_node", value_parser = at_least_one)]
    pub nproc_per_node: Option<usize>,
}

use crate::pipeline::device::parse_device;

/// The configuration a run uses: file (or the resumed run's saved config), then `--set`, then
/// the flags, applied to the typed configuration; checked before anything loads.
pub fn resolve_config(args: &FinetuneArgs) -> Result<Config> {
    let path = match (&args.resume, &args.config) {
        (Some(run), _) => RunDir(run.clone()).config(),
        (None, Some(c)) => c.clone(),
        (None, None) => bail!("give --config FILE (or --resume RUN_DIR)"),
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| InputError(format!("reading config {}", path.display())))?;
    let mut cfg = Config::parse(&text, &args.set).with_context(|| format!("in config {}", path.display()))?;
    let (t, d) = (&mut cfg.train, &mut cfg.data);
    if let Some(v) = &args.data_root {
        d.root = Some(v.clone());
    }
    if let Some(v) = args.batch_size {
        t.batch_size = v;
    }
    if let Some(v) = args.gradient_accumulation_steps {
        t.gradient_accumulation_steps = v;
    }
    if let Some(v) = args.gradient_checkpointing {
        t.gradient_checkpointing = v;
    }
    if let Some(v) = args.precision {
        t.precision = v;
    }
    if args.no_amp {
        t.precision = Precision::F32;
    }
    if let Some(v) = args.learning_rate {
        t.learning_rate = v;
    }
    if let Some(v) = args.num_epochs {
        t.num_epochs = v;
    }
    if let Some(v) = args.num_workers {
        d.num_workers = v;
    }
    if let Some(v) = args.seed {
        t.seed = v;
    }
    if let Some(v) = args.max_steps {
        t.max_steps = v;
    }
    if args.skip_bad_rows {
        d.skip_bad_rows = true;
    }
    if args.mask_nonzero_is_lesion {
        d.mask_nonzero_is_lesion = true;
    }
    if let Some(v) = args.loss_compat {
        t.loss_compat = v;
    }
    if let Some(q) = args.quant.get() {
        cfg.model.base_quant = q;
    }
    if let Some(v) = args.image_size {
        cfg.model.sam_image_size = v;
    }
    cfg.validate().with_context(|| format!("in config {} with the command-line flags", path.display()))?;
    Ok(cfg)
}

pub fn run(args: &FinetuneArgs) -> Result<()> {
    // Which rank this is, checked before anything loads.
    let rank = match from_env(&|k| std::env::var(k).ok(), args.nproc_per_node)? {
        Launch::Spawn(n) => return run_ranks(n),
        Launch::Run(r) => r,
    };
    if args.compile_model && rank.rank == 0 {
        tracing::info!(
            "note: --compile_model has no effect: prs is compiled ahead of time (there is no torch.compile step)"
        );
    }
    if args.use_amp && args.no_amp {
        bail!("--use_amp and --no-amp contradict each other");
    }
    let cfg = resolve_config(args)?;
    if rank.rank == 0 {
        tracing::info!("resolved configuration:\n{}", cfg.to_toml()?);
    }
    if args.dry_run && rank.rank == 0 {
        // The whole dataset, every split, as `prs data check` sees it.
        let root = cfg.data.root.as_deref().context("no dataset: give --data-root (or data.root in the config)")?;
        let opts = crate::data::prepare::PrepareOptions::from_config(&cfg).dataset;
        super::data::check_and_report(std::path::Path::new(root), &opts, None, !cfg.data.skip_bad_rows)?;
    }
    let run_dir = match (&args.resume, &args.out) {
        (Some(r), _) => r.clone(),
        (None, Some(o)) => o.clone(),
        (None, None) => PathBuf::from("runs")
            .join(format!("{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs())),
    };
    let device = parse_device(&rank.device_flag(&args.device)?)?;
    if rank.world > 1 {
        tracing::info!("rank {} of {} on {}", rank.rank, rank.world, crate::pipeline::device::device_name(&device));
    }
    let ranks = if args.dry_run { crate::dist::single() } else { crate::dist::connect(&rank, &device)? };
    let summary = train(TrainOptions {
        cfg,
        run_dir: run_dir.clone(),
        device,
        resume: args.resume.is_some(),
        dry_run: args.dry_run,
        progress: crate::logging::progress_enabled(),
        ranks,
        poison_step: None,
    })?;
    if rank.rank > 0 {
        return Ok(());
    }
    if args.dry_run {
        println!("dry run: configuration, weights and dataset are valid");
        return Ok(());
    }
    println!(
        "finished: {} optimizer steps ({} skipped), best val Dice {} at step {}; run folder {}",
        summary.state.step,
        summary.state.skipped_steps,
        summary.state.best_dice.map(|d| format!("{d:.4}")).unwrap_or("-".into()),
        summary.state.best_step.map(|s| s.to_string()).unwrap_or("-".into()),
        run_dir.display()
    );
    if let Some(e) = &summary.last_eval {
        println!(
            "final validation: Dice {:.4}, IoU {:.4}, position accuracy {:.3} ({} samples)",
            e.dice, e.iou, e.position_accuracy, e.n
        );
    }
    Ok(())
}
