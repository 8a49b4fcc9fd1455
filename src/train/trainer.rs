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
use crate::config::{BatchNormMode, Config, Precision, TrainSection};
use crate::data::dataset::Row;
use crate::data::loader::{BatchPlan, Loader, LoaderOptions, PlanConfig};
use crate::data::prepare::{prepare, PrepareOptions, ValSource};
use crate::data::sample::{check_prompt_lengths, collate, PreparedSample, SampleBuilder};
use crate::exit::InputError;
use crate::files;
use crate::metrics::position::{parse_position, PositionLabel};
use crate::metrics::seg::{Confusion, ImageScores};
use crate::model::prs_med::{LossNorm, LossWeights, ModelBatch, PrsMed};
use crate::nn::ops::EvalMode;
use crate::nn::param::seed_for;
use crate::pipeline::build::{load_prs_med, LoadOptions, Mode};
use crate::pipeline::generate::{generate_answers, GenerateOptions};
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
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub dice: f64,
    pub iou: f64,
    pub position_accuracy: f64,
    pub n: usize,
}

#[derive(Debug)]
pub struct TrainSummary {
    pub state: TrainerState,
    pub last_eval: Option<EvalResult>,
    pub first_eval: Option<EvalResult>,
    pub last_checkpoint: Option<PathBuf>,
    pub trained_parameters: usize,
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

    /// What a resumed run must share with the run it continues.
    fn plan_record(&self, tc: &TrainSection) -> PlanRecord {
        PlanRecord {
            train_rows: self.train_rows.len(),
            batch_size: tc.batch_size,
            gradient_accumulation_steps: tc.gradient_accumulation_steps,
            seed: tc.seed,
        }
    }

    /// The epoch's micro-batches from `start` on, prepared by worker threads.
    fn loader(&self, batches: &[Vec<usize>], start: usize, cfg: &Config) -> Result<Loader<PreparedSample>> {
        let builder = self.builder.clone();
        Loader::new(
            self.train_rows.clone(),
            batches[start..].to_vec(),
            start,
            move |r: &Row| builder.prepare(r, true),
            &LoaderOptions { workers: cfg.data.num_workers.max(1), prefetch: cfg.data.prefetch.max(1) },
        )
    }
}

/// Optimizer steps of the whole run: epochs x steps per epoch, capped by `max_steps`.
fn total_steps(tc: &TrainSection, micro_per_epoch: usize) -> u64 {
    let steps = micro_per_epoch.div_ceil(tc.gradient_accumulation_steps) as u64 * tc.num_epochs;
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
    // One process per run folder; nothing half-written left from a killed one.
    let _lock = if opts.dry_run { None } else { Some(open_run_folder(&run, opts.resume)?) };
    let dtype = tc.precision.compute_dtype_on(&opts.device);
    if opts.device.is_cpu() && tc.precision != Precision::F32 {
        tracing::info!("note: precision {} applies on a GPU; the CPU computes in f32", tc.precision);
    }

    // ---- data, and where the run stands ----
    let data = TrainData::load(&cfg)?;
    let micro_per_epoch = data.plan.batches_per_epoch();
    let accum = tc.gradient_accumulation_steps;
    let total_steps = total_steps(tc, micro_per_epoch);
    let Start { mut state, checkpoint: ckpt } =
        starting_point(&run, opts.resume, data.plan_record(tc), micro_per_epoch)?;

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
    if cfg.model.base_quant != crate::config::BaseQuant::None {
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
    tracing::info!(
        "plan: {} train / {} val rows ({:?}), {} micro-batches of {} per epoch, accumulation {} (effective batch {}), {} optimizer steps, {} trained parameters, compute {:?} on {:?}",
        data.train_rows.len(),
        data.val_rows.len(),
        data.val_source,
        micro_per_epoch,
        tc.batch_size,
        accum,
        tc.batch_size * accum,
        total_steps,
        n_trained,
        dtype,
        opts.device
    );
    if opts.dry_run {
        return Ok(TrainSummary {
            state,
            last_eval: None,
            first_eval: None,
            last_checkpoint: None,
            trained_parameters: n_trained,
        });
    }

    // ---- optimizer, schedule, logs ----
    let (mut optim, mut scaler) = build_optimizer(&model, tc, dtype, ckpt.as_deref())?;
    if let Some(c) = &ckpt {
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
    if !opts.resume {
        files::write_bytes_atomic(&run.config(), cfg.to_toml()?.as_bytes())?;
    }
    let mut log = MetricsLog::open(&run.0, opts.resume.then_some(state.step))?;
    let bar = if opts.progress { ProgressBar::new(total_steps) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
    )?);
    bar.set_position(state.step);
    let validate = |step: u64, epoch: u64, log: &mut MetricsLog| -> Result<EvalResult> {
        let e = evaluate(&model, &data.builder, &data.val_rows, &cfg, &opts.device)?;
        log_eval(log, step, epoch, &e)?;
        bar.suspend(|| {
            tracing::info!(
                "step {step}: val loss {:.4}  dice {:.3}  iou {:.3}  position acc {:.3}",
                e.loss,
                e.dice,
                e.iou,
                e.position_accuracy
            )
        });
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
        let mut loader = data.loader(&batches, bi, &cfg)?;
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
            // Micro-batches are collated one at a time, as the step consumes them.
            let micro = group.iter().map(|_| -> Result<(ModelBatch, u64)> {
                let batch = loader.next().context("data loader ended early")??;
                let items: Vec<&PreparedSample> = batch.items.iter().collect();
                Ok((collate(&items, &opts.device)?, seed_for(tc.seed, &format!("{epoch}/{}", batch.index))))
            });
            let mut stepper = Stepper {
                model: &model,
                optim: &mut optim,
                scaler: scaler.as_mut(),
                guard,
                bn_frozen: tc.batchnorm == BatchNormMode::Frozen,
            };
            let out = stepper.step(micro, norm, &weights, &mut state)?;
            bi += group.len();

            // A skipped step still counts: the schedule and the data move on.
            state.batch_in_epoch = bi;
            count_step(&mut state, &out, tc.max_consecutive_nonfinite, &run, &bar)?;
            let secs = t0.elapsed().as_secs_f64();
            log_step(&mut log, &state, epoch, &out, lr, secs, started, &opts.device)?;
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
                    bar.suspend(|| tracing::warn!("the last step was skipped. {}", saved_so_far(&run)));
                    break 'epochs;
                }
                continue;
            }
            let mut improved = false;
            if std::mem::take(&mut eval_pending) && !data.val_rows.is_empty() {
                let e = validate(state.step, epoch, &mut log)?;
                training_curves(&read_metrics(&run.metrics())?, &run.curves())?;
                improved = judge_evaluation(&mut state, &e, &bar);
                last_eval = Some(e);
            }
            if std::mem::take(&mut save_pending) || improved {
                let dir = run.checkpoint(state.step);
                save_training_checkpoint(&dir, &model, &optim, scaler.as_ref(), &state, &cfg)?;
                files::crash_point("checkpoint:written");
                // Pointers move only once the checkpoint is complete; pruning comes last.
                run.set_last(&dir)?;
                if improved {
                    run.set_best(&dir)?;
                }
                run.prune(KEEP_CHECKPOINTS)?;
                last_checkpoint = Some(dir);
            }
            if done {
                break 'epochs;
            }
            if tc.early_stopping_patience > 0 && state.evals_since_best >= tc.early_stopping_patience {
                bar.suspend(|| {
                    tracing::info!(
                        "early stopping: no better validation Dice in {} evaluations",
                        state.evals_since_best
                    )
                });
                break 'epochs;
            }
        }
    }
    bar.finish_and_clear();
    Ok(TrainSummary { state, last_eval, first_eval, last_checkpoint, trained_parameters: n_trained })
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
    bar: &ProgressBar,
) -> Result<()> {
    match &out.skipped {
        Some(why) => {
            state.skipped_steps += 1;
            state.consecutive_skipped += 1;
            bar.suspend(|| tracing::warn!("step {}: skipped ({why})", state.step + 1));
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
fn judge_evaluation(state: &mut TrainerState, e: &EvalResult, bar: &ProgressBar) -> bool {
    let finite = e.loss.is_finite() && e.dice.is_finite();
    if finite && state.best_dice.is_none_or(|b| e.dice > b) {
        state.best_dice = Some(e.dice);
        state.best_step = Some(state.step);
        state.evals_since_best = 0;
        return true;
    }
    if !finite {
        bar.suspend(|| tracing::warn!("step {}: validation is not finite; it cannot become `best`", state.step));
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

/// How validation generates its answers: greedy, up to 32 tokens.
const VALIDATION_ANSWERS: GenerateOptions =
    GenerateOptions { max_new_tokens: 32, temperature: 0.0, top_p: 1.0, seed: 0, stop_at_eos: true };

/// Validation: loss, Dice/IoU at the model resolution (threshold 0.5), and position accuracy
/// of greedily generated answers.
pub fn evaluate(
    model: &PrsMed,
    builder: &SampleBuilder,
    rows: &[Row],
    cfg: &Config,
    device: &Device,
) -> Result<EvalResult> {
    let _eval = EvalMode::enter();
    let n = if cfg.train.max_eval_samples > 0 { rows.len().min(cfg.train.max_eval_samples) } else { rows.len() };
    let rows = &rows[..n];
    let weights = LossWeights { compat: cfg.train.loss_compat, ..Default::default() };
    let (mut loss, mut dice, mut iou, mut n_scored, mut correct) = (0f64, 0f64, 0f64, 0usize, 0usize);
    for chunk in rows.chunks(cfg.train.batch_size.max(1)) {
        let prepared: Vec<PreparedSample> = chunk.iter().map(|r| builder.prepare(r, true)).collect::<Result<_>>()?;
        let items: Vec<&PreparedSample> = prepared.iter().collect();
        let mb = collate(&items, device)?;
        // The image embeddings serve both the loss forward and the generated answers.
        let image = model.encode_image(&mb.clip_pixels)?;
        let out = model.forward_from_image(&mb, &image, true)?;
        let l = model.losses(&mb, &out, &weights)?;
        loss += l.total.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        let pred = out.mask_logits.ge(0f64)?.to_dtype(DType::U8)?.to_device(&Device::Cpu)?;
        let gt = mb.masks.as_ref().expect("prepared with masks").to_device(&Device::Cpu)?;
        for i in 0..chunk.len() {
            let p: Vec<bool> = pred.get(i)?.flatten_all()?.to_vec1::<u8>()?.into_iter().map(|v| v > 0).collect();
            let g: Vec<bool> = gt.get(i)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|v| v > 0.5).collect();
            let s = ImageScores::from_confusion(&Confusion::from_masks(&p, &g)?, cfg.data.empty_masks);
            // `ignore` scores an empty ground truth NaN: left out of the means, as evaluate does.
            if !s.dice.is_nan() {
                dice += s.dice;
                iou += s.iou;
                n_scored += 1;
            }
        }
        // Answers: greedy generation, one sample at a time (KV cache), from the prompt alone.
        for (i, (r, s)) in chunk.iter().zip(prepared.iter()).enumerate() {
            let mut prompt = s.prompt.clone();
            prompt.answer.clear();
            let ids = generate_answers(model, &[prompt], &image.narrow(0, i, 1)?, &VALIDATION_ANSWERS)?.remove(0);
            let text = builder.tokenizer.decode(&ids, true).map_err(|e| anyhow::anyhow!("decoding an answer: {e}"))?;
            let truth = r.position.map(PositionLabel::from);
            if truth.is_some_and(|t| t == parse_position(&text)) {
                correct += 1;
            }
        }
    }
    let nf = n.max(1) as f64;
    Ok(EvalResult {
        loss: loss / nf,
        dice: dice / n_scored.max(1) as f64,
        iou: iou / n_scored.max(1) as f64,
        position_accuracy: correct as f64 / nf,
        n,
    })
}

fn log_eval(log: &mut MetricsLog, step: u64, epoch: u64, e: &EvalResult) -> Result<()> {
    log.append(&Record {
        epoch: Some(epoch),
        val_loss: Some(e.loss),
        dice: Some(e.dice),
        iou: Some(e.iou),
        position_acc: Some(e.position_accuracy),
        ..Record::eval(step)
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
        let bar = ProgressBar::hidden();
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
