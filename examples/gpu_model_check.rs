//! GPU check of the whole model (run by scripts/gpu_check.sh on a machine with a GPU): the tiny
//! PRS-Med, written by `prs init` and loaded on the CPU and on CUDA with the same seeds, must
//! agree on
//! 1. the loss parts and every trained tensor's gradient of one training step, in f32, with
//!    dropout on, with and without gradient checkpointing on the GPU;
//! 2. the updates of three AdamW steps (from weights moved off their initialisation);
//! 3. greedy prediction: the mask logits and the answer tokens;
//!
//! and, loosely, the bf16 loss on CUDA against the f32 CPU loss. Exits non-zero on a failure.
//!
//! Usage: gpu_model_check TOKENIZER_MODEL (Mistral's tokenizer.model). Needs `--features cuda` (a CPU build compares the CPU with itself).

use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, DType, Device, Tensor};
use prs::config::Config;
use prs::memory::measure::synthetic_batch;
use prs::memory::SeqShape;
use prs::model::prs_med::{LossWeights, ModelBatch, PrsMed};
use prs::nn::ops::TrainingMode;
use prs::pipeline::build::{load_prs_med, LoadOptions, Mode};
use prs::train::optim::{AdamW, AdamWConfig};

/// max |a - b| / max |b| (0 when both are zero); infinite when either holds a NaN or an
/// infinity (a max reduction can skip NaNs, a sum cannot).
fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    for t in [&a, &b] {
        if !t.abs()?.sum_all()?.to_scalar::<f64>()?.is_finite() {
            return Ok(f64::INFINITY);
        }
    }
    let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(if scale == 0.0 { diff } else { diff / scale })
}

struct Report {
    failures: usize,
}

impl Report {
    fn check(&mut self, what: &str, err: f64, tol: f64) {
        let ok = err <= tol;
        self.failures += usize::from(!ok);
        println!("{what:<60} rel {err:>9.2e} (tol {tol:.0e})  {}", if ok { "ok" } else { "FAIL" });
    }
}

fn load(cfg: &Config, device: &Device, dtype: DType) -> Result<PrsMed> {
    load_prs_med(cfg, &LoadOptions { device: device.clone(), dtype, mode: Mode::Train, checkpoint: None, seed: 0 })
}

fn batch_to(b: &ModelBatch, dev: &Device) -> Result<ModelBatch> {
    Ok(ModelBatch {
        clip_pixels: b.clip_pixels.to_device(dev)?,
        sam_pixels: b.sam_pixels.to_device(dev)?,
        prompts: b.prompts.clone(),
        masks: b.masks.as_ref().map(|m| m.to_device(dev)).transpose()?,
        modality: b.modality.as_ref().map(|m| m.to_device(dev)).transpose()?,
    })
}

/// One forward + backward in training mode: the loss parts (total, seg, lm, cls) and gradients.
fn step(m: &PrsMed, batch: &ModelBatch, seed: u64) -> Result<([Tensor; 4], GradStore)> {
    let _train = TrainingMode::enter(seed);
    let out = m.forward(batch, true)?;
    let l = m.losses(batch, &out, &LossWeights::default())?;
    let grads = m.backward(&l.total)?;
    Ok(([l.total, l.seg, l.lm, l.cls], grads))
}

/// Compares the loss parts and each trained tensor's gradient (GPU against CPU).
/// Returns the keys whose gradient is near zero (rounding noise on both devices).
fn compare_step(
    rep: &mut Report,
    tag: &str,
    cpu: &PrsMed,
    gpu: &PrsMed,
    bc: &ModelBatch,
    bg: &ModelBatch,
) -> Result<Vec<String>> {
    let (lc, gc) = step(cpu, bc, 7)?;
    let (lg, gg) = step(gpu, bg, 7)?;
    for (name, (a, b)) in ["total", "seg", "lm", "cls"].iter().zip(lg.iter().zip(&lc)) {
        rep.check(&format!("{tag}: loss {name}"), rel(a, b)?, 1e-4);
    }
    let (wc, wg) = (cpu.trained.weights(), gpu.trained.weights());
    let mut pairs = vec![];
    for (pc, pg) in wc.iter().zip(&wg) {
        let c = gc.get(pc.var.as_tensor()).with_context(|| format!("no CPU gradient for {}", pc.key))?;
        let g = gg.get(pg.var.as_tensor()).with_context(|| format!("no CUDA gradient for {}", pg.key))?;
        let top = c.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        pairs.push((format!("{}/{}", pg.group, pg.key), g.clone(), c.clone(), top));
    }
    // Gradients that are zero by design (a conv bias right before a training BatchNorm) are
    // rounding noise on both sides: those are held to an absolute bound instead, 1e-6 of the
    // largest gradient.
    let largest = pairs.iter().map(|p| p.3).fold(0.0, f64::max);
    let (mut worst, mut worst_abs, mut tiny) = ((0.0, String::new()), 0.0f64, vec![]);
    for (key, g, c, top) in &pairs {
        if *top < 1e-6 * largest && rel(g, c)?.is_finite() {
            tiny.push(key.clone());
            let d = (g.to_device(&Device::Cpu)?.to_dtype(DType::F64)? - c.to_dtype(DType::F64)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            worst_abs = worst_abs.max(d / largest);
        } else {
            let e = rel(g, c)?;
            if e >= worst.0 {
                worst = (e, key.clone());
            }
        }
    }
    rep.check(&format!("{tag}: {} gradients (worst {})", pairs.len() - tiny.len(), worst.1), worst.0, 2e-3);
    rep.check(&format!("{tag}: {} near-zero gradients, |diff| / largest gradient", tiny.len()), worst_abs, 1e-6);
    Ok(tiny)
}

fn main() -> Result<()> {
    let tokenizer = std::env::args().nth(1).context("usage: gpu_model_check TOKENIZER_MODEL")?;
    // Without CUDA (a CPU build) both sides run on the CPU: a check of this harness itself.
    let gpu_dev = Device::cuda_if_available(0)?;
    println!("comparing {gpu_dev:?} against the CPU");
    let dir = std::env::temp_dir().join(format!("prs-gpu-model-check-{}", std::process::id()));
    let mut cfg = Config::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.toml")))
        .or_else(|_| Config::load(std::path::Path::new("configs/tiny.toml")))?;
    cfg.model.base = dir.join("llava").display().to_string();
    cfg.model.tinysam = dir.join("tinysam.pth").display().to_string();
    // Dropout on (the tiny config has none), so that the device-side masks and their replay
    // under checkpointing are part of the comparison.
    cfg.model.lora.dropout = 0.1;
    cfg.model.decoder.dropout = 0.1;
    let init = cfg.init.clone().context("configs/tiny.toml has no [init]")?;
    prs::commands::init::write_llava(&dir.join("llava"), &init, std::path::Path::new(&tokenizer), 1 << 20)?;
    prs::commands::init::write_tinysam(&dir.join("tinysam.pth"), &cfg, init.seed)?;

    let mut rep = Report { failures: 0 };
    let cpu = load(&cfg, &Device::Cpu, DType::F32)?;
    let mut gpu = load(&cfg, &gpu_dev, DType::F32)?;
    // Moved off the initialisation (LoRA B = 0 and MBConv's zero BatchNorm weights silence
    // branches), the same on both, so that every tensor's gradient is exercised.
    for (pc, pg) in cpu.trained.weights().iter().zip(gpu.trained.weights()) {
        let moved = (pc.var.as_tensor() + 0.01)?;
        pc.var.set(&moved)?;
        pg.var.set(&moved.to_device(&gpu_dev)?)?;
    }
    let seq = SeqShape { before: 6, after: 20, answer: 10 };
    let bc = synthetic_batch(&cpu, 3, &seq, 1)?;
    let bg = batch_to(&bc, &gpu_dev)?;

    let near_zero = compare_step(&mut rep, "f32 step", &cpu, &gpu, &bc, &bg)?;
    gpu.set_gradient_checkpointing(true);
    compare_step(&mut rep, "f32 step, CUDA checkpointed", &cpu, &gpu, &bc, &bg)?;
    gpu.set_gradient_checkpointing(false);

    // Three optimizer steps on each device, then what they changed: the update, not the
    // weights (an update of lr-size would hide inside a tolerance on the weights). Tensors
    // whose gradient is rounding noise are left out: Adam normalises noise to a full step.
    let before: Vec<Tensor> =
        cpu.trained.weights().iter().map(|p| p.var.as_tensor().copy()).collect::<candle_core::Result<_>>()?;
    let adam = AdamWConfig { lr: 1e-3, ..AdamWConfig::default() };
    let mut oc = AdamW::new(cpu.trained.weights(), adam.clone())?;
    let mut og = AdamW::new(gpu.trained.weights(), adam)?;
    for s in 0..3 {
        oc.step(&step(&cpu, &bc, 100 + s)?.1)?;
        og.step(&step(&gpu, &bg, 100 + s)?.1)?;
    }
    let mut worst = (0.0, String::new());
    for ((pc, pg), w0) in cpu.trained.weights().iter().zip(&gpu.trained.weights()).zip(&before) {
        if near_zero.contains(&format!("{}/{}", pg.group, pg.key)) {
            continue;
        }
        let dc = (pc.var.as_tensor() - w0)?;
        let dg = (pg.var.as_tensor().to_device(&Device::Cpu)? - w0)?;
        let e = rel(&dg, &dc)?;
        if e >= worst.0 {
            worst = (e, format!("{}/{}", pg.group, pg.key));
        }
    }
    rep.check(
        &format!("updates of 3 AdamW steps, {} tensors (worst {})", before.len() - near_zero.len(), worst.1),
        worst.0,
        2e-2,
    );

    // Greedy prediction of one sample.
    let one = |b: &ModelBatch| -> Result<ModelBatch> {
        let mut p = b.prompts[0].clone();
        p.answer.clear();
        Ok(ModelBatch {
            clip_pixels: b.clip_pixels.narrow(0, 0, 1)?,
            sam_pixels: b.sam_pixels.narrow(0, 0, 1)?,
            prompts: vec![p],
            masks: None,
            modality: None,
        })
    };
    let greedy = prs::pipeline::generate::GenerateOptions { max_new_tokens: 12, ..Default::default() };
    let (c, g) = (
        prs::pipeline::generate::predict_batch(&cpu, &one(&bc)?, &greedy)?,
        prs::pipeline::generate::predict_batch(&gpu, &one(&bg)?, &greedy)?,
    );
    let (mc, tc, mg, tg) = (c.mask_logits, c.answers[0].clone(), g.mask_logits, g.answers[0].clone());
    rep.check("predict: mask logits", rel(&mg, &mc)?, 1e-3);
    let same = tc == tg;
    rep.check(&format!("predict: answer tokens {tg:?} vs CPU {tc:?}"), if same { 0.0 } else { 1.0 }, 0.0);

    // bf16 on the GPU: the production precision, against the f32 CPU loss (both as loaded).
    let gpu16 = load(&cfg, &gpu_dev, DType::BF16)?;
    let (l16, g16) = step(&gpu16, &bg, 7)?;
    let (l32, _) = step(&load(&cfg, &Device::Cpu, DType::F32)?, &bc, 7)?;
    rep.check("bf16 CUDA step: total loss vs f32 CPU", rel(&l16[0], &l32[0])?, 5e-2);
    let finite = gpu16.trained.weights().iter().all(|p| {
        g16.get(p.var.as_tensor())
            .and_then(|g| g.to_dtype(DType::F32).ok()?.abs().ok()?.sum_all().ok()?.to_scalar::<f32>().ok())
            .is_some_and(f32::is_finite)
    });
    rep.check("bf16 CUDA step: every trained tensor has a finite gradient", if finite { 0.0 } else { 1.0 }, 0.0);

    let _ = std::fs::remove_dir_all(&dir);
    if rep.failures > 0 {
        bail!("{} comparison(s) failed", rep.failures);
    }
    println!("CPU and CUDA agree");
    Ok(())
}
