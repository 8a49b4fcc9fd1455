//! The training loop of `prs finetune`, top to bottom: data, model, optimizer, then epochs of
//! micro-batches grouped into optimizer steps, with evaluation, checkpoints and exact resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};

use super::guard::DivergenceGuard;
use super::optim::{AdamW, AdamWConfig, LossScaler};
use super::schedule::LrSchedule;
use super::state::{PlanRecord, RunDir, TrainerState, OPTIMIZER_FILE};
use super::step::{StepOutcome, Stepper};
pub use super::validate::EvalResult;
use super::validate::{evaluate, log_eval};
use crate::config::{BatchNormMode, Config, Precision, TrainSection};
use crate::data::dataset::Row;
use crate::data::loader::{rank_share, BatchPlan, Loader, LoaderOptions, PlanConfig};
use crate::data::prepare::{prepare, PrepareOptions, ValSource};
use crate::data::sample::{check_prompt_lengths, collate, PreparedSample, SampleBuilder};
use crate::dist::Collective;
use crate::exit::InputError;
use crate::files;
use crate::model::prs_med::{LossNorm, LossWeights, ModelBatch, PrsMed};
use crate::nn::param::seed_for;
use crate::pipeline::build::{load_prs_med, LoadOptions, Mode};
use crate::pipeline::load::open_base;
use crate::report::{read_metrics, training_curves, MetricsLog, Record};
use crate::weights::checkpoint::{save_checkpoint_with, CheckpointMeta};

pub struct TrainOptions {
    pub cfg: Config,
    pub run_dir: PathBuf,
    pub device: Device,
    /// Continue the run in `run_dir` from its `last` checkpoint.
    pub resume: bool,
    /// Validate everything, print the plan, train nothing.
    pub dry_run: bool,
    /// Show a progress bar (off in tests).
    pub progress: bool,
    /// The other ranks of a data-parallel job ([`crate::dist::single`] for one process).
    /// Rank 0 alone writes the run folder; every rank trains.
    pub ranks: Arc<dyn Collective>,
    /// Test hook: this rank's loss is NaN at this optimizer step (1-based).
    pub poison_step: Option<u64>,
}

#[derive(Debug)]
pub struct TrainSummary {
    pub state: TrainerState,
    pub last_eval: Option<EvalResult>,
    pub first_eval: Option<EvalResult>,
    pub last_checkpoint: Option<PathBuf>,
    pub trained_parameters: usize,
    /// The trained tensors (weights and buffers) as the run ended, by `group/key`.
    pub trained: Vec<(String, candle_core::Tensor)>,
}

/// The data side of a run: the checked rows, how they are prepared, and the batch plan.
struct TrainData {
    builder: SampleBuilder,
    train_rows: Arc<Vec<Row>>,
    val_rows: Vec<Row>,
    val_source: ValSource,
    plan: BatchPlan,
    /// Supervised tokens (answer + EOS) per training row, for the loss normalisation.
    supervised: Vec<usize>,
}

impl TrainData {
    /// Reads and checks the dataset (every bad row named at once), opens the base's tokenizer,
    /// refuses over-long prompts and plans the batches.
    fn load(cfg: &Config) -> Result<Self> {
        let root = cfg.data.root.as_deref().context("no dataset: give --data-root (or data.root in the config)")?;
        let prep = prepare(Path::new(root), &PrepareOptions::from_config(cfg))?;
        if prep.skipped > 0 {
            tracing::warn!("skipped {} bad rows (--skip-bad-rows)", prep.skipped);
        }
        for w in prep.warnings.iter().take(5) {
            tracing::warn!("{}:{}: {}", w.csv.display(), w.line, w.message);
        }
        ensure!(!prep.train.is_empty(), "no training rows in {root}");
        let base = open_base(&cfg.model.base)?;
        let builder = SampleBuilder {
            tokenizer: Arc::new(base.tokenizer),
            template: cfg.prompt.template.clone(),
            clip_size: base.llava.vision_config()?.image_size,
            sam_size: cfg.model.sam_image_size,
        };
        // Over-long prompts are refused (or dropped with --skip-bad-rows) here, naming the rows.
        let limits = base.llava.prompt_limits()?;
        let skip = cfg.data.skip_bad_rows;
        let train = check_prompt_lengths(prep.train, &builder, limits, true, skip)?;
        let val = check_prompt_lengths(prep.val, &builder, limits, true, skip)?;
        let dropped = train.dropped.len() + val.dropped.len();
        if dropped > 0 {
            tracing::warn!("skipped {dropped} rows whose prompt is too long (--skip-bad-rows)");
        }
        let tc = &cfg.train;
        let plan = BatchPlan::new(
            train.tokens.iter().map(|t| t.text).collect(),
            PlanConfig { batch_size: tc.batch_size, bucket_batches: 8, drop_last: false, seed: tc.seed },
        )?;
        Ok(Self {
            builder,
            supervised: train.tokens.iter().map(|t| t.supervised).collect(),
            train_rows: Arc::new(train.rows),
            val_rows: val.rows,
            val_source: prep.val_source,
            plan,
        })
    }

    /// What a resumed run must share with the run it continues: `accum` counts the
    /// micro-batches of a step over all ranks, so a run may resume on another number of ranks.
    fn plan_record(&self, tc: &TrainSection, accum: usize) -> PlanRecord {
        PlanRecord {
            train_rows: self.train_rows.len(),
            batch_size: tc.batch_size,
            gradient_accumulation_steps: accum,
            seed: tc.seed,
        }
    }

    /// The epoch's micro-batches `mine` (indices into `batches`), prepared by worker threads;
    /// a batch's `index` is its position in `mine`.
    fn loader(&self, batches: &[Vec<usize>], mine: &[usize], cfg: &Config) -> Result<Loader<PreparedSample>> {
        let builder = self.builder.clone();
        Loader::new(
            self.train_rows.clone(),
            mine.iter().map(|&i| batches[i].clone()).collect(),
            0,
            move |r: &Row| builder.prepare(r, true),
            &LoaderOptions { workers: cfg.data.num_workers.max(1), prefetch: cfg.data.prefetch.max(1) },
        )
    }
}

/// Optimizer steps of the whole run: epochs x steps per epoch (of `accum` micro-batches over
/// all ranks), capped by `max_steps`.
fn total_steps(tc: &TrainSection, micro_per_epoch: usize, accum: usize) -> u64 {
    let steps = micro_per_epoch.div_ceil(accum) as u64 * tc.num_epochs;
    if tc.max_steps > 0 {
        steps.min(tc.max_steps)
    } else {
        steps
    }
}

/// Where the run starts: a fresh state, or the `last` checkpoint's, refused when the data or
/// the batch plan changed since it was saved.
fn starting_point(run: &RunDir, resume: bool, record: PlanRecord, micro_per_epoch: usize) -> Result<Start> {
    let mut start = Start { state: TrainerState::default(), checkpoint: None };
    if resume {
        let last = run.last()?;
        start.state = TrainerState::read(&last)?;
        if let Some(p) = &start.state.plan {
            p.check_resume(&record).with_context(|| format!("resuming {}", run.0.display()))?;
        }
        ensure!(
            start.state.batch_in_epoch <= micro_per_epoch,
            "{} is at micro-batch {} of an epoch that now has {micro_per_epoch}: the dataset or the batch plan \
             changed since it was saved; resume with the run's own data and settings",
            last.display(),
            start.state.batch_in_epoch
        );
        start.checkpoint = Some(last);
    }
    start.state.plan = Some(record);
    Ok(start)
}

struct Start {
    state: TrainerState,
    checkpoint: Option<PathBuf>,
}

/// AdamW over the trained weights (and the f16 loss scaler), restored from a checkpoint's
/// optimizer file when resuming.
fn build_optimizer(
    model: &PrsMed,
    tc: &TrainSection,
    dtype: DType,
    checkpoint: Option<&Path>,
) -> Result<(AdamW, Option<LossScaler>)> {
    let [beta1, beta2] = tc.adam_betas;
    let mut optim = AdamW::new(
        model.trained.weights(),
        AdamWConfig {
            lr: tc.learning_rate,
            beta1,
            beta2,
            eps: tc.adam_eps,
            weight_decay: tc.weight_decay,
            max_grad_norm: (tc.max_grad_norm > 0.0).then_some(tc.max_grad_norm),
        },
    )?;
    let mut scaler = (dtype == DType::F16).then(LossScaler::default);
    if let Some(c) = checkpoint {
        let file = c.join(OPTIMIZER_FILE);
        let st = candle_core::safetensors::load(&file, model.device())
            .with_context(|| format!("reading {}", file.display()))?;
        optim.load_state_tensors(&st, &c.display().to_string())?;
        if let Some(s) = scaler.as_mut() {
            s.load_state_tensors(&st, &c.display().to_string())?;
        }
    }
    Ok((optim, scaler))
}

pub fn train(opts: TrainOptions) -> Result<TrainSummary> {
    let cfg = opts.cfg.clone();
    cfg.validate()?;
    let tc = &cfg.train;
    let run = RunDir(opts.run_dir.clone());
    let ranks = &*opts.ranks;
    let main = ranks.is_main();
    // One process per run folder (rank 0's); nothing half-written left from a killed one.
    let _lock = if opts.dry_run || !main { None } else { Some(open_run_folder(&run, opts.resume)?) };
    let dtype = tc.precision.compute_dtype_on(&opts.device);
    if main && opts.device.is_cpu() && tc.precision != Precision::F32 {
        tracing::info!("note: precision {} applies on a GPU; the CPU computes in f32", tc.precision);
    }

    // ---- data, and where the run stands ----
    let data = TrainData::load(&cfg)?;
    let micro_per_epoch = data.plan.batches_per_epoch();
    // Micro-batches per optimizer step, over all ranks.
    let accum = tc.gradient_accumulation_steps * ranks.world();
    let total_steps = total_steps(tc, micro_per_epoch, accum);
    let Start { mut state, checkpoint: ckpt } =
        starting_point(&run, opts.resume, data.plan_record(tc, accum), micro_per_epoch)?;

    // ---- model ----
    let load = LoadOptions {
        device: opts.device.clone(),
        dtype,
        mode: Mode::Train,
        checkpoint: ckpt.as_deref(),
        seed: tc.seed,
    };
    let mut model = load_prs_med(&cfg, &load)?;
    model.set_checkpointing(tc.gradient_checkpointing);
    // Every rank starts from rank 0's trained weights and buffers.
    crate::dist::broadcast_vars(ranks, &model.trained.all().into_iter().map(|p| p.var).collect::<Vec<_>>())?;
    if main && cfg.model.base_quant != crate::config::BaseQuant::None {
        let q = model.llm.quant_summary();
        tracing::info!(
            "base LLM: {} projections stored {} ({:.1} MB){}",
            q.quantized,
            cfg.model.base_quant,
            q.bytes as f64 / 1e6,
            if q.dense > 0 {
                format!(", {} kept dense (in-features not a multiple of the block)", q.dense)
            } else {
                String::new()
            }
        );
    }
    let n_trained = model.trained.num_weight_elements();
    let world = match ranks.world() {
        1 => String::new(),
        w => format!(" x {w} ranks"),
    };
    if main {
        tracing::info!(
            "plan: {} train / {} val rows ({:?}), {} micro-batches of {} per epoch, accumulation {}{world} \
             (effective batch {}), {} optimizer steps, {} trained parameters, compute {:?} on {:?}",
            data.train_rows.len(),
            data.val_rows.len(),
            data.val_source,
            micro_per_epoch,
            tc.batch_size,
            tc.gradient_accumulation_steps,
            tc.batch_size * accum,
            total_steps,
            n_trained,
            dtype,
            opts.device
        );
    }
    if opts.dry_run {
        return Ok(TrainSummary {
            state,
            last_eval: None,
            first_eval: None,
            last_checkpoint: None,
            trained_parameters: n_trained,
            trained: vec![],
        });
    }

    // ---- optimizer, schedule, logs ----
    let (mut optim, mut scaler) = build_optimizer(&model, tc, dtype, ckpt.as_deref())?;
    if let Some(c) = ckpt.as_ref().filter(|_| main) {
        tracing::info!(
            "resumed from {} at step {} (epoch {}, batch {})",
            c.display(),
            state.step,
            state.epoch,
            state.batch_in_epoch
        );
    }
    let schedule = LrSchedule::cosine(tc.learning_rate, tc.min_learning_rate, tc.warmup_steps, total_steps);
    schedule.validate()?;
    let guard = DivergenceGuard { factor: tc.divergence_factor };
    if !opts.resume && main {
        files::write_bytes_atomic(&run.config(), cfg.to_toml()?.as_bytes())?;
    }
    // Rank 0 alone logs, draws and saves.
    let mut log = if main { Some(MetricsLog::open(&run.0, opts.resume.then_some(state.step))?) } else { None };
    let bar = if opts.progress && main { ProgressBar::new(total_steps) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
    )?);
    bar.set_position(state.step);
    let con = Console { bar: bar.clone(), silent: !main };
    let validate = |step: u64, epoch: u64, log: &mut Option<MetricsLog>| -> Result<EvalResult> {
        let e = evaluate(&model, &data.builder, &data.val_rows, &cfg, &opts.device, ranks)?;
        if let Some(log) = log {
            log_eval(log, step, epoch, &e)?;
        }
        con.say(format!(
            "step {step}: val loss {:.4}  dice {:.3}  iou {:.3}  position acc {:.3}",
            e.loss, e.dice, e.iou, e.position_accuracy
        ));
        Ok(e)
    };

    let first_eval = if state.step == 0 && !data.val_rows.is_empty() { Some(validate(0, 0, &mut log)?) } else { None };
    let mut last_eval = None;
    let started = Instant::now();
    let mut last_checkpoint = ckpt.clone();
    // Evaluations and saves that fell on a skipped step wait for the next applied one.
    let (mut eval_pending, mut save_pending) = (false, false);

    'epochs: while state.epoch < tc.num_epochs && state.step < total_steps {
        let epoch = state.epoch;
        let batches = data.plan.epoch(epoch);
        let mut bi = state.batch_in_epoch;
        let (rank, world) = (ranks.rank(), ranks.world());
        let mine = rank_share(batches.len(), bi, accum, rank, world);
        let mut loader = data.loader(&batches, &mine, &cfg)?;
        let weights = LossWeights {
            seg: tc.seg_loss_weight,
            lm: tc.lm_loss_weight,
            cls: if epoch < tc.cls_loss_epochs { tc.cls_loss_weight } else { 0.0 },
            compat: tc.loss_compat,
        };
        while bi < batches.len() {
            // ---- one optimizer step: the next `accum` micro-batches (fewer at the epoch's end) ----
            let group = &batches[bi..(bi - bi % accum + accum).min(batches.len())];
            let t0 = Instant::now();
            let lr = schedule.lr_at(state.step);
            optim.set_lr(lr);
            let norm = LossNorm {
                images: group.iter().map(|b| b.len()).sum(),
                tokens: group.iter().flatten().map(|&i| data.supervised[i]).sum(),
            };
            // This rank's share of the group (rank_share's), collated one at a time as the step
            // consumes them; the dropout seed follows the micro-batch's place in the plan.
            let micro = (bi + rank..bi + group.len()).step_by(world).map(|_| -> Result<(ModelBatch, u64)> {
                let batch = loader.next().context("data loader ended early")??;
                let items: Vec<&PreparedSample> = batch.items.iter().collect();
                Ok((collate(&items, &opts.device)?, seed_for(tc.seed, &format!("{epoch}/{}", mine[batch.index]))))
            });
            let mut stepper = Stepper {
                model: &model,
                optim: &mut optim,
                scaler: scaler.as_mut(),
                guard,
                bn_frozen: tc.batchnorm == BatchNormMode::Frozen,
                ranks,
                poison: opts.poison_step == Some(state.step + 1),
            };
            let out = stepper.step(micro, norm, &weights, &mut state)?;
            bi += group.len();

            // A skipped step still counts: the schedule and the data move on.
            state.batch_in_epoch = bi;
            count_step(&mut state, &out, tc.max_consecutive_nonfinite, &run, &con)?;
            let secs = t0.elapsed().as_secs_f64();
            if let Some(log) = log.as_mut() {
                log_step(log, &state, epoch, &out, lr, secs, started, &opts.device)?;
            }
            bar.set_position(state.step);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.1} samples/s",
                out.parts[0],
                lr,
                out.images as f64 / secs
            ));
            let diverged =
                out.exploded.clone().or_else(|| out.skipped.is_none().then(|| guard.diverged(&state)).flatten());
            if let Some(why) = diverged {
                bail!(
                    "training diverged at step {}: {why}; stopping before anything more is saved. {} Lower the \
                     learning rate (--learning-rate) and resume, or set train.divergence_factor = 0 to turn \
                     this check off",
                    state.step,
                    saved_so_far(&run)
                );
            }

            // ---- what falls due after it ----
            let epoch_end = bi >= batches.len();
            if epoch_end {
                state.epoch += 1;
                state.batch_in_epoch = 0;
            }
            let done = state.step >= total_steps;
            eval_pending |= if tc.eval_every > 0 { state.step % tc.eval_every == 0 } else { epoch_end } || done;
            save_pending |= tc.save_every > 0 && state.step % tc.save_every == 0 || epoch_end || done;
            if out.skipped.is_some() {
                // The weights are those of the last applied step: nothing new to judge or save.
                if done {
                    con.warn(format!("the last step was skipped. {}", saved_so_far(&run)));
                    break 'epochs;
                }
                continue;
            }
            let mut improved = false;
            if std::mem::take(&mut eval_pending) && !data.val_rows.is_empty() {
                let e = validate(state.step, epoch, &mut log)?;
                if main {
                    training_curves(&read_metrics(&run.metrics())?, &run.curves())?;
                }
                improved = judge_evaluation(&mut state, &e, &con);
                last_eval = Some(e);
            }
            if std::mem::take(&mut save_pending) || improved {
                let dir = run.checkpoint(state.step);
                if main {
                    save_training_checkpoint(&dir, &model, &optim, scaler.as_ref(), &state, &cfg)?;
                    files::crash_point("checkpoint:written");
                    // Pointers move only once the checkpoint is complete; pruning comes last.
                    run.set_last(&dir)?;
                    if improved {
                        run.set_best(&dir)?;
                    }
                    run.prune(KEEP_CHECKPOINTS)?;
                }
                last_checkpoint = Some(dir);
            }
            if done {
                break 'epochs;
            }
            if tc.early_stopping_patience > 0 && state.evals_since_best >= tc.early_stopping_patience {
                con.say(format!("early stopping: no better validation Dice in {} evaluations", state.evals_since_best));
                break 'epochs;
            }
        }
    }
    bar.finish_and_clear();
    let trained = model
        .trained
        .all()
        .into_iter()
        .map(|p| (format!("{}/{}", p.group, p.key), p.var.as_tensor().clone()))
        .collect();
    Ok(TrainSummary { state, last_eval, first_eval, last_checkpoint, trained_parameters: n_trained, trained })
}

/// One line of `metrics.jsonl` for a finished optimizer step.
#[allow(clippy::too_many_arguments)]
fn log_step(
    log: &mut MetricsLog,
    state: &TrainerState,
    epoch: u64,
    out: &StepOutcome,
    lr: f64,
    secs: f64,
    started: Instant,
    device: &Device,
) -> Result<()> {
    log.append(&Record {
        epoch: Some(epoch),
        loss: Some(out.parts[0]),
        loss_seg: Some(out.parts[1]),
        loss_lm: Some(out.parts[2]),
        loss_cls: Some(out.parts[3]),
        lr: Some(lr),
        grad_norm: out.grad_norm,
        samples_per_s: Some(out.images as f64 / secs),
        tokens_per_s: Some(out.tokens as f64 / secs),
        peak_mem_bytes: crate::pipeline::device::peak_memory_bytes(device),
        elapsed_s: Some(started.elapsed().as_secs_f64()),
        ..Record::train(state.step)
    })
}

/// Counts a finished optimizer step; a skipped one is reported, and too many in a row stop
/// the run, naming the checkpoints that are safe.
fn count_step(
    state: &mut TrainerState,
    out: &StepOutcome,
    max_skipped: u32,
    run: &RunDir,
    con: &Console,
) -> Result<()> {
    match &out.skipped {
        Some(why) => {
            state.skipped_steps += 1;
            state.consecutive_skipped += 1;
            con.warn(format!("step {}: skipped ({why})", state.step + 1));
            if state.consecutive_skipped >= max_skipped {
                bail!(
                    "{} consecutive steps were skipped (last: {why}); stopping. {} Lower the learning rate, use \
                     bf16 instead of f16, or check the data",
                    state.consecutive_skipped,
                    saved_so_far(run)
                );
            }
        }
        None => state.consecutive_skipped = 0,
    }
    state.step += 1;
    state.samples_seen += out.images as u64;
    Ok(())
}

/// Whether an evaluation is the run's best so far (only a finite one can be); updates the
/// early-stopping count.
fn judge_evaluation(state: &mut TrainerState, e: &EvalResult, con: &Console) -> bool {
    let finite = e.loss.is_finite() && e.dice.is_finite();
    if finite && state.best_dice.is_none_or(|b| e.dice > b) {
        state.best_dice = Some(e.dice);
        state.best_step = Some(state.step);
        state.evals_since_best = 0;
        return true;
    }
    if !finite {
        con.warn(format!("step {}: validation is not finite; it cannot become `best`", state.step));
    }
    state.evals_since_best += 1;
    false
}

/// Step checkpoints kept besides the ones `last` and `best` name.
const KEEP_CHECKPOINTS: usize = 3;

/// Locks the run folder for this process, makes sure a new run starts in a folder that holds
/// nothing else, and removes what a killed run left half-written.
fn open_run_folder(run: &RunDir, resume: bool) -> Result<files::DirLock> {
    if !resume {
        if let files::Existing::Foreign(found) = files::inspect_output(&run.0, RUN_KIND, None)? {
            if !run.has_run() {
                bail!(InputError(format!(
                    "--out {} already exists and is not a prs run folder (it holds {}); give a new or empty folder",
                    run.0.display(),
                    found.join(", ")
                )));
            }
        }
    }
    let lock = files::DirLock::acquire(&run.0, "run folder")?;
    if !resume {
        ensure!(
            !run.has_run(),
            InputError(format!(
                "{} already holds a run; use --resume {} or another --out",
                run.0.display(),
                run.0.display()
            ))
        );
        files::mark_output(&run.0, RUN_KIND)?;
    }
    let removed = run.remove_stale_temporaries()?;
    if removed > 0 {
        tracing::info!(
            "removed {removed} half-written temporary file(s) left by an interrupted run in {}",
            run.0.display()
        );
    }
    Ok(lock)
}

/// The marker of a run folder (see `files::OWNER_MARKER`).
pub const RUN_KIND: &str = "run";

/// "The newest checkpoint is X and the best Y." for messages that stop a run.
fn saved_so_far(run: &RunDir) -> String {
    match (run.last().ok(), run.best_target()) {
        (None, _) => "No checkpoint was saved yet.".into(),
        (Some(l), None) => format!("The newest checkpoint is {}.", l.display()),
        (Some(l), Some(b)) => format!("The newest checkpoint is {} and the best {}.", l.display(), b.display()),
    }
}

/// Where the run's messages go: the log (stderr), above the progress bar; nowhere on ranks
/// other than 0.
struct Console {
    bar: ProgressBar,
    silent: bool,
}

impl Console {
    fn say(&self, msg: String) {
        if !self.silent {
            self.bar.suspend(|| tracing::info!("{msg}"));
        }
    }

    fn warn(&self, msg: String) {
        if !self.silent {
            self.bar.suspend(|| tracing::warn!("{msg}"));
        }
    }
}

fn save_training_checkpoint(
    dir: &Path,
    model: &PrsMed,
    optim: &AdamW,
    scaler: Option<&LossScaler>,
    state: &TrainerState,
    cfg: &Config,
) -> Result<()> {
    let mut meta = CheckpointMeta::new(&cfg.model.base, &cfg.model.tinysam, toml::to_string(&cfg.model)?);
    meta.step = state.step;
    meta.extra.insert("prompt_template".into(), serde_json::json!(cfg.prompt.template));
    let llm = &model.spec.llava.llm;
    meta.extra.insert(
        "base_config".into(),
        serde_json::json!({"hidden_size": llm.hidden_size, "vocab_size": llm.vocab_size, "num_hidden_layers": llm.num_hidden_layers}),
    );
    save_checkpoint_with(dir, &model.trained, &model.spec.lora, meta, |tmp| {
        let mut st = optim.state_tensors()?;
        if let Some(s) = scaler {
            st.extend(s.state_tensors(model.device())?);
        }
        candle_core::safetensors::save(&st, tmp.join(OPTIMIZER_FILE))?;
        state.write(tmp)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(loss: f64, dice: f64) -> EvalResult {
        EvalResult { loss, dice, iou: 0.0, position_accuracy: 0.0, n: 1 }
    }

    #[test]
    fn only_a_finite_evaluation_can_become_best() {
        let bar = Console { bar: ProgressBar::hidden(), silent: false };
        let mut s = TrainerState::default();
        assert!(!judge_evaluation(&mut s, &eval(f64::NAN, 0.9), &bar), "NaN loss");
        assert!(!judge_evaluation(&mut s, &eval(0.5, f64::NAN), &bar), "NaN Dice");
        assert_eq!((s.best_dice, s.evals_since_best), (None, 2));
        assert!(judge_evaluation(&mut s, &eval(0.5, 0.4), &bar));
        assert!(!judge_evaluation(&mut s, &eval(0.4, 0.3), &bar));
        assert!(!judge_evaluation(&mut s, &eval(f64::INFINITY, 0.99), &bar), "a diverged model's lucky Dice");
        assert!(judge_evaluation(&mut s, &eval(0.3, 0.5), &bar));
        assert_eq!((s.best_dice, s.evals_since_best), (Some(0.5), 0));
    }
}
