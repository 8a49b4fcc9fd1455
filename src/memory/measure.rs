//! Measured peaks: one trial = one child process (`prs profile-memory --trial JSON`) that builds
//! the model with random weights, runs real training steps (forward, backward, AdamW) on a
//! synthetic batch of the worst-case length, and prints one JSON line. A crash, an
//! out-of-memory error or any non-zero exit means "does not fit"; the next trial starts clean.
//!
//! CPU: the peak is the process's peak resident set (VmHWM in /proc/self/status), reset with
//! `echo 5 > /proc/self/clear_refs` after the model, optimizer and batch exist, so it covers the
//! steps only (the load peak is reported apart). The child fixes glibc's mmap threshold so
//! that freed tensors go back to the kernel at once, which makes RSS track live tensor bytes
//! as the CUDA pool does (with the default dynamic threshold freed blocks stay resident).
//! CUDA: the default memory pool's used high-water mark (reset before the steps; candle
//! allocates every tensor from it) plus what lies outside the pool (context, cuBLAS workspaces)
//! from cuMemGetInfo.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{Precision, SeqShape};
use crate::config::{BaseQuant, Checkpointing, Config};
use crate::model::prs_med::{LossNorm, LossWeights, ModelBatch, PrsMed};
use crate::pipeline::build::Mode;
use crate::pipeline::random::{random_prs_med, spec_for_config, RandomOptions};
use crate::tokenizer::{PromptIds, BOS_ID};
use crate::train::guard::DivergenceGuard;
use crate::train::optim::{AdamW, AdamWConfig, LossScaler};
use crate::train::state::TrainerState;
use crate::train::step::Stepper;

/// Env var for tests: trials with a batch above this value lose their address-space headroom
/// right before the steps, so their next large allocation fails for real (CPU).
pub const INJECT_OOM_ENV: &str = "PRS_PROFILE_INJECT_OOM_ABOVE_BATCH";
/// Prefix of the result line a trial prints on stdout.
pub const RESULT_PREFIX: &str = "PRS_TRIAL_RESULT ";

/// What one trial runs (serialised onto the child's command line).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrialSpec {
    /// The resolved configuration, as TOML text.
    pub config_toml: String,
    /// "cpu", "cuda" or "cuda:N".
    pub device: String,
    pub batch: usize,
    pub precision: Precision,
    #[serde(default)]
    pub base_quant: BaseQuant,
    pub checkpointing: Checkpointing,
    pub seq: SeqShape,
    /// Training steps; the peak covers all, the time is the last one's.
    pub steps: usize,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrialResult {
    /// Peak during the steps, including `baseline_bytes` (bytes).
    pub peak_bytes: u64,
    /// Before the model existed: the idle process (CPU RSS) or the context + workspaces
    /// outside the pool (CUDA).
    pub baseline_bytes: u64,
    /// Resident after model, optimizer and batch were built.
    pub loaded_bytes: u64,
    /// Peak while loading (CPU: VmHWM before the reset).
    pub load_peak_bytes: u64,
    /// "vmhwm" or "cuda-pool".
    pub source: String,
    /// False when clear_refs could not reset VmHWM (the peak then includes loading).
    pub reset_ok: bool,
    pub step_seconds: f64,
    pub samples_per_s: f64,
    pub loss: f64,
    pub seq_len: usize,
}

use crate::pipeline::device::{parse_device, reset_peak_rss, rss, status_kb};

/// Makes large frees return memory to the kernel at once (a fixed threshold also turns off
/// glibc's dynamic one, which would otherwise keep freed tensors in the heap).
fn fix_malloc_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

/// Takes away this process's address-space headroom: the next large allocation fails.
fn inject_oom() {
    // Start the thread pool first, so that what fails is a tensor allocation, not a thread.
    rayon::broadcast(|_| ());
    #[cfg(target_os = "linux")]
    unsafe {
        let vm = status_kb("VmSize:").unwrap_or(0) as libc::rlim_t;
        let lim = libc::rlimit { rlim_cur: vm + (1 << 20), rlim_max: libc::RLIM_INFINITY };
        libc::setrlimit(libc::RLIMIT_AS, &lim);
    }
}

/// A synthetic batch of `seq`-shaped samples: random pixels, blob masks, token ids.
pub fn synthetic_batch(m: &PrsMed, batch: usize, seq: &SeqShape, seed: u64) -> Result<ModelBatch> {
    let dev = m.device();
    let v = m.spec.llava.vision_config()?;
    let s = m.spec.tinysam.img_size;
    let vocab = m.spec.llava.llm.vocab_size as u32;
    let id = |i: usize| 3 + ((i as u64 * 7919 + seed) % (vocab as u64 - 3)) as u32;
    let prompts = (0..batch)
        .map(|k| PromptIds {
            before_image: std::iter::once(BOS_ID).chain((1..seq.before).map(|i| id(i + k))).collect(),
            after_image: (0..seq.after).map(|i| id(1000 + i + k)).collect(),
            answer: (0..seq.answer).map(|i| id(2000 + i + k)).collect(),
        })
        .collect();
    let clip_pixels = Tensor::randn(0f32, 1.0, (batch, 3, v.image_size, v.image_size), dev)?;
    let sam_pixels = Tensor::randn(0f32, 1.0, (batch, 3, s, s), dev)?;
    let masks = Tensor::randn(0f32, 1.0, (batch, 1, s, s), dev)?.ge(0.5)?.to_dtype(DType::F32)?;
    let ids: Vec<u32> = (0..batch).map(|i| (i % m.spec.num_modalities) as u32).collect();
    let modality = Tensor::new(ids.as_slice(), dev)?;
    Ok(ModelBatch { clip_pixels, sam_pixels, prompts, masks: Some(masks), modality: Some(modality) })
}

/// One full training step on `batch` (forward, losses, backward, AdamW), exactly as `prs
/// finetune` runs it ([`Stepper::step`], one micro-batch, the divergence guard off); returns
/// the loss. Gradient checkpointing is whatever `m` was set to.
pub fn train_step(
    m: &PrsMed,
    batch: &ModelBatch,
    opt: &mut AdamW,
    scaler: Option<&mut LossScaler>,
    seed: u64,
) -> Result<f64> {
    let mut stepper = Stepper {
        model: m,
        optim: opt,
        scaler,
        guard: DivergenceGuard { factor: 0.0 },
        bn_frozen: false,
        ranks: &crate::dist::Single,
        poison: false,
    };
    let out = stepper.step(
        [Ok((batch.clone(), seed))],
        LossNorm::of(batch),
        &LossWeights::default(),
        &mut TrainerState::default(),
    )?;
    Ok(out.parts[0])
}

fn is_oom(e: &anyhow::Error) -> bool {
    crate::exit::is_out_of_memory(&format!("{e:#}"))
}

/// The child side: runs the trial and prints the result line. Errors exit non-zero.
pub fn run_trial(spec: &TrialSpec) -> Result<TrialResult> {
    fix_malloc_thresholds();
    let (baseline_rss, _) = rss();
    let device = parse_device(&spec.device)?;
    #[cfg(feature = "cuda")]
    let pool = if device.is_cuda() { Some(crate::pipeline::device::pool::Pool::new(&device)?) } else { None };
    if spec.batch == 0 {
        // Baseline only: the idle process, or the context and workspaces outside the pool.
        #[allow(unused_mut)]
        let mut base = baseline_rss;
        #[cfg(feature = "cuda")]
        if let Some(p) = &pool {
            base = p.outside()?;
        }
        return Ok(TrialResult {
            peak_bytes: base,
            baseline_bytes: base,
            loaded_bytes: base,
            load_peak_bytes: base,
            source: if device.is_cuda() { "cuda-pool" } else { "vmhwm" }.into(),
            reset_ok: true,
            step_seconds: 0.0,
            samples_per_s: 0.0,
            loss: 0.0,
            seq_len: 0,
        });
    }
    let cfg = Config::parse(&spec.config_toml, &[]).context("trial config")?;
    let mspec = spec_for_config(&cfg)?;
    let dtype = spec.precision.dtype();
    let mut opts = RandomOptions::from_config(&cfg, device.clone(), dtype, Mode::Train, spec.seed);
    opts.base_quant = spec.base_quant;
    let mut m = random_prs_med(&mspec, &opts)?;
    m.set_checkpointing(spec.checkpointing);
    let mut opt = AdamW::new(m.trained.weights(), AdamWConfig::default())?;
    let mut scaler = (spec.precision == Precision::F16).then(LossScaler::default);
    let batch = synthetic_batch(&m, spec.batch, &spec.seq, spec.seed)?;
    device.synchronize()?;
    #[cfg(feature = "cuda")]
    let baseline_cuda = match &pool {
        Some(p) => Some(p.outside()?),
        None => None,
    };
    let (loaded, load_peak) = rss();
    if std::env::var(INJECT_OOM_ENV).ok().and_then(|v| v.parse::<usize>().ok()).is_some_and(|k| spec.batch > k) {
        inject_oom();
    }
    let reset_ok = reset_peak_rss();
    #[cfg(feature = "cuda")]
    if let Some(p) = &pool {
        p.reset_high()?;
    }
    let (mut secs, mut loss) = (0.0, 0.0);
    for step in 0..spec.steps.max(1) {
        let t0 = Instant::now();
        loss = train_step(&m, &batch, &mut opt, scaler.as_mut(), spec.seed.wrapping_add(step as u64))?;
        device.synchronize()?;
        secs = t0.elapsed().as_secs_f64();
    }
    let (_, hwm) = rss();
    #[allow(unused_mut)]
    let mut r = TrialResult {
        peak_bytes: hwm,
        baseline_bytes: baseline_rss,
        loaded_bytes: loaded,
        load_peak_bytes: load_peak,
        source: "vmhwm".into(),
        reset_ok,
        step_seconds: secs,
        samples_per_s: spec.batch as f64 / secs.max(1e-9),
        loss,
        seq_len: spec.seq.total(m.image_tokens()?),
    };
    #[cfg(feature = "cuda")]
    if let (Some(p), Some(base)) = (&pool, baseline_cuda) {
        r.peak_bytes = p.used_high()? + base;
        r.baseline_bytes = base;
        r.loaded_bytes = p.used_now()? + base;
        r.load_peak_bytes = 0;
        r.source = "cuda-pool".into();
        r.reset_ok = true;
    }
    Ok(r)
}

/// The child's entry point: prints `RESULT_PREFIX` + JSON on success.
pub fn trial_main(json: &str) -> Result<()> {
    let spec: TrialSpec = serde_json::from_str(json).context("parsing the trial spec")?;
    match run_trial(&spec) {
        Ok(r) => {
            println!("{RESULT_PREFIX}{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Err(e) if is_oom(&e) => Err(e.context("trial ran out of memory")),
        Err(e) => Err(e),
    }
}

/// How a trial ended.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Measured(TrialResult),
    /// Crash, out-of-memory or non-zero exit: does not fit.
    DoesNotFit {
        reason: String,
    },
}

/// The parent side: runs `exe profile-memory --trial JSON` and reads its result line.
pub fn spawn_trial(exe: &Path, spec: &TrialSpec) -> Result<Outcome> {
    let json = serde_json::to_string(spec)?;
    let out = Command::new(exe)
        .args(["profile-memory", "--trial", &json])
        .output()
        .with_context(|| format!("starting trial process {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        if let Some(line) = stdout.lines().find_map(|l| l.strip_prefix(RESULT_PREFIX)) {
            return Ok(Outcome::Measured(serde_json::from_str(line).context("parsing a trial result")?));
        }
    }
    // The most telling line: an allocation failure, a panic or an error, else the last one.
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let key = |l: &&str| {
        let l = l.to_ascii_lowercase();
        l.contains("memory allocation")
            || l.contains("out of memory")
            || l.starts_with("error")
            || l.contains("panicked")
    };
    let last = lines.iter().copied().find(key).or(lines.last().copied()).unwrap_or("").to_string();
    let how = match out.status.code() {
        Some(c) => format!("exit code {c}"),
        None => {
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                format!("killed by signal {}", out.status.signal().unwrap_or(0))
            }
            #[cfg(not(unix))]
            {
                "killed".to_string()
            }
        }
    };
    let kind = if stderr.to_ascii_lowercase().contains("memory") { "out of memory, " } else { "" };
    Ok(Outcome::DoesNotFit { reason: format!("{kind}{how}: {last}") })
}
