//! Inference helpers shared by `prs predict` and `prs evaluate`: batched mask prediction with
//! KV-cached answer generation (greedy or temperature / top-p sampling with a seeded RNG), the
//! mask logits -> probability map at the original image size, and mask statistics.
//!
//! Upsampling choice: the (S,S) logits are resized to the original (H,W) with bilinear
//! interpolation, align_corners = false (candle's `upsample_bilinear2d`, the same sampling as
//! PyTorch's `F.interpolate`, which SAM uses to bring its masks back to the input size; no
//! antialiasing when shrinking), and the sigmoid is applied afterwards. Interpolating logits
//! rather than probabilities keeps boundaries sharp and makes `prob >= 0.5` the same set as
//! `logit >= 0` of the interpolated logits.
//!
//! Loading ([`load_model`]): the configuration comes from `--config`, else from the project
//! checkpoint's stored model section (`--base` overriding `model.base`); the authors' release
//! records none, so it needs `--config` or `--base` (then configs/prs-med-7b.toml applies).
//! The checkpoint is checked against the base (hidden size, layers, vocabulary) first, so a
//! mismatch is one clear message rather than a tensor-shape error deep in the loader.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::config::{Config, ModelSection, PromptSection};
use crate::model::load::{load_prs_med, read_llava_config, LoadOptions, Mode};
use crate::model::mistral::KvCache;
use crate::model::prs_med::{LlavaMedConfig, ModelBatch, PrsMed};
use crate::tokenizer::{self, EOS_ID, PAD_ID};
use crate::weights::checkpoint::{Component, TrainedCheckpoint, ADAPTER_FILE};
use crate::weights::hub::ModelSource;
use crate::weights::shards::read_safetensors_header;

/// How answers are generated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 keeps every token.
    pub top_p: f64,
    /// Every sample of a batch gets a sampler seeded with this, so an item's answer does not
    /// depend on which batch it landed in.
    pub seed: u64,
    /// Stop a row at EOS (always, except for benchmarks that need a fixed token count).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, seed: 0, stop_at_eos: true }
    }
}

impl GenerateOptions {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "--temperature must be >= 0 (0 = greedy), got {}",
            self.temperature
        );
        ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "--top-p must be in (0, 1], got {}", self.top_p);
        Ok(())
    }

    pub fn greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Temperature / top-p sampling from host logits with a seeded RNG.
pub struct Sampler {
    rng: StdRng,
    temperature: f64,
    top_p: f64,
}

impl Sampler {
    pub fn new(seed: u64, temperature: f64, top_p: f64) -> Self {
        Self { rng: StdRng::seed_from_u64(seed), temperature, top_p }
    }

    /// Draws one token id from `logits` (V). Greedy (first maximum) when the temperature is 0.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            let mut best = 0;
            for (i, &l) in logits.iter().enumerate() {
                if l > logits[best] {
                    best = i;
                }
            }
            best as u32
        };
        if self.temperature == 0.0 || logits.is_empty() {
            return argmax();
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l as f64 - max) / self.temperature).exp())).collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if !(total.is_finite() && total > 0.0) {
            return argmax();
        }
        // Highest first, ties by id, so the kept set is deterministic.
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut keep = probs.len();
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p.1 / total;
                // Smallest prefix whose mass reaches top_p (at least one token).
                if acc >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept = &probs[..keep];
        let mass: f64 = kept.iter().map(|p| p.1).sum();
        let mut u = self.rng.gen::<f64>() * mass;
        for &(id, p) in kept {
            if u < p {
                return id;
            }
            u -= p;
        }
        kept[keep - 1].0
    }
}

/// What one batch produced.
pub struct BatchOutput {
    /// (B,1,S,S) f32 mask logits at the SAM resolution.
    pub mask_logits: Tensor,
    /// Generated ids per sample, without EOS.
    pub answers: Vec<Vec<u32>>,
    /// Whether each sample stopped at EOS (else at `max_new_tokens`).
    pub hit_eos: Vec<bool>,
    /// Image encoders, prompt prefill and mask decoder, in seconds.
    pub encode_secs: f64,
    /// The token-by-token generation loop, in seconds.
    pub decode_secs: f64,
    /// Decoding steps run (each one LLM forward over one new token per row).
    pub decode_steps: usize,
}

/// TinySAM runs in f32 when it trains, else in the compute dtype (as `PrsMed::forward`).
fn tinysam_dtype(model: &PrsMed) -> DType {
    if model.trained.group("image_encoder").is_empty() {
        model.dtype()
    } else {
        DType::F32
    }
}

fn sync(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

/// Mask logits and answers for a batch (prompts right-padded; each row decodes from its own
/// length with its own position ids, padding keys masked, one shared KV cache).
pub fn predict_batch(model: &PrsMed, batch: &ModelBatch, opts: &GenerateOptions) -> Result<BatchOutput> {
    opts.validate()?;
    let dev = model.device().clone();
    let t0 = Instant::now();
    let image = model.encode_image(&batch.clip_pixels)?;
    let inp = model.llm_inputs(&batch.prompts, &image, false)?;
    let (b, t) = inp.key_valid.dims2()?;
    let n_image = image.dim(1)?;
    let lens: Vec<usize> = batch.prompts.iter().map(|p| p.before_image.len() + n_image + p.after_image.len()).collect();
    let padded = lens.iter().any(|&l| l != t);
    let mut valid = inp.key_valid.clone();
    let mut cache = KvCache::new(model.llm.config().num_hidden_layers);
    let hidden =
        model.llm.forward_embeds(&inp.embeds, padded.then_some(&valid), &inp.position_ids, Some(&mut cache))?;
    let feats = model.tinysam.forward(&batch.sam_pixels.to_dtype(tinysam_dtype(model))?)?;
    let mask_logits = model.decoder.forward(&feats, &hidden, &inp.prompt_valid)?.to_dtype(DType::F32)?;
    // Logits of each row's last real position.
    let h = hidden.dim(2)?;
    let last: Vec<u32> = lens.iter().enumerate().map(|(i, &l)| (i * t + l - 1) as u32).collect();
    let last = hidden.reshape((b * t, h))?.index_select(&Tensor::new(last.as_slice(), &dev)?, 0)?;
    let mut logits = model.llm.logits(&last)?;
    sync(&dev)?;
    let encode_secs = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut samplers: Vec<Sampler> = (0..b).map(|_| Sampler::new(opts.seed, opts.temperature, opts.top_p)).collect();
    let mut answers = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut hit_eos = vec![false; b];
    let mut steps = 0;
    for step in 0..opts.max_new_tokens {
        let next: Vec<u32> = if opts.greedy() {
            logits.argmax(D::Minus1)?.to_vec1::<u32>()?
        } else {
            let host = logits.to_vec2::<f32>()?;
            host.iter().zip(samplers.iter_mut()).map(|(l, s)| s.sample(l)).collect()
        };
        let mut feed = vec![PAD_ID; b];
        for i in 0..b {
            if done[i] {
                continue;
            }
            if next[i] == EOS_ID && opts.stop_at_eos {
                done[i] = true;
                hit_eos[i] = true;
                continue;
            }
            answers[i].push(next[i]);
            feed[i] = next[i];
        }
        if done.iter().all(|&d| d) || step + 1 == opts.max_new_tokens {
            break;
        }
        let ids = Tensor::from_vec(feed, (b, 1), &dev)?;
        let pos: Vec<u32> = lens.iter().map(|&l| (l + step) as u32).collect();
        let pos = Tensor::from_vec(pos, (b, 1), &dev)?;
        let key_valid = if padded {
            valid = Tensor::cat(&[&valid, &Tensor::ones((b, 1), valid.dtype(), &dev)?], 1)?;
            Some(&valid)
        } else {
            None
        };
        let e = model.llm.embed(&ids)?;
        let hs = model.llm.forward_embeds(&e, key_valid, &pos, Some(&mut cache))?;
        logits = model.llm.logits(&hs.squeeze(1)?)?;
        steps += 1;
    }
    sync(&dev)?;
    Ok(BatchOutput {
        mask_logits,
        answers,
        hit_eos,
        encode_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
        decode_steps: steps,
    })
}

/// Probability map (row-major, `height * width`) at the original image size from one sample's
/// logits (1,1,S,S), (1,S,S) or (S,S). See the module docs for the resampling.
pub fn prob_map(mask_logits: &Tensor, width: u32, height: u32) -> Result<Vec<f32>> {
    ensure!(width > 0 && height > 0, "cannot resize a mask to {width}x{height}");
    let l = mask_logits.to_dtype(DType::F32)?;
    let l = match l.rank() {
        2 => l.unsqueeze(0)?.unsqueeze(0)?,
        3 => l.unsqueeze(0)?,
        4 => l,
        r => bail!("mask logits of rank {r}: expected (1,1,S,S)"),
    };
    let (n, c, s_h, s_w) = l.dims4()?;
    ensure!(n == 1 && c == 1, "prob_map takes one single-channel mask, got {:?}", l.dims());
    let l = if (s_h, s_w) == (height as usize, width as usize) {
        l
    } else {
        l.upsample_bilinear2d(height as usize, width as usize, false)?
    };
    Ok(candle_nn::ops::sigmoid(&l)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
}

/// 8-bit probability: round(p * 255). At threshold 0.5 `level / 255 >= 0.5` is exactly
/// `p >= 0.5`, so scoring the saved PNG reproduces the in-memory mask.
pub fn prob_to_u8(prob: &[f32]) -> Vec<u8> {
    prob.iter().map(|&p| (p.clamp(0.0, 1.0) * 255.0).round() as u8).collect()
}

/// Inclusive pixel bounding box.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BBox {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

/// Statistics of the thresholded mask (`prob >= threshold`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaskStats {
    pub threshold: f32,
    pub width: u32,
    pub height: u32,
    pub empty: bool,
    pub area_px: u64,
    pub area_fraction: f64,
    pub bbox: Option<BBox>,
    /// (x, y) mean pixel coordinate of the mask.
    pub centroid: Option<[f64; 2]>,
    /// Mean probability over the mask's pixels.
    pub mean_prob_inside: Option<f64>,
}

/// One pass over the probability map.
pub fn mask_stats(prob: &[f32], width: u32, height: u32, threshold: f32) -> Result<MaskStats> {
    let (w, h) = (width as usize, height as usize);
    ensure!(prob.len() == w * h, "probability map has {} pixels, expected {w}x{h}", prob.len());
    let (mut n, mut sx, mut sy, mut sp) = (0u64, 0f64, 0f64, 0f64);
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (y, row) in prob.chunks_exact(w.max(1)).enumerate() {
        for (x, &p) in row.iter().enumerate() {
            if p >= threshold {
                n += 1;
                sx += x as f64;
                sy += y as f64;
                sp += p as f64;
                x0 = x0.min(x as u32);
                x1 = x1.max(x as u32);
                y0 = y0.min(y as u32);
                y1 = y1.max(y as u32);
            }
        }
    }
    let empty = n == 0;
    let nf = n as f64;
    Ok(MaskStats {
        threshold,
        width,
        height,
        empty,
        area_px: n,
        area_fraction: nf / (w * h).max(1) as f64,
        bbox: (!empty).then_some(BBox { x0, y0, x1, y1 }),
        centroid: (!empty).then(|| [sx / nf, sy / nf]),
        mean_prob_inside: (!empty).then(|| sp / nf),
    })
}

/// Binary mask (`prob >= threshold`).
pub fn threshold_mask(prob: &[f32], threshold: f32) -> Vec<bool> {
    prob.iter().map(|&p| p >= threshold).collect()
}

// ---- Loading a trained checkpoint for inference ----

/// The paper's configuration, used with `--base` for the authors' release (which records none).
pub const PAPER_CONFIG: &str = include_str!("../configs/prs-med-7b.toml");

/// Which model to run (shared with `prs evaluate`).
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Base LLaVA-Med model (folder or hub id); default: the one the checkpoint records.
    #[arg(long)]
    pub base: Option<String>,
    /// Configuration file; default: the model section stored in a project checkpoint. The
    /// authors' release records none: give this, or --base to use configs/prs-med-7b.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// TinySAM weights overriding the configuration's (the authors' release: its image_encoder.pth).
    #[arg(long)]
    pub tinysam: Option<String>,
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype (bf16, f16, f32); default: the configuration's on GPU, f32 on CPU.
    #[arg(long)]
    pub dtype: Option<String>,
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self { base: None, config: None, tinysam: None, device: "auto".into(), dtype: None }
    }
}

/// Where the prediction came from, recorded in every result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    pub base: String,
    pub checkpoint: String,
    pub checkpoint_format: String,
    pub checkpoint_step: Option<u64>,
    pub dtype: String,
    pub device: String,
}

/// A loaded model with everything needed to prepare its inputs.
pub struct Loaded {
    pub model: PrsMed,
    pub cfg: Config,
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
    pub load_secs: f64,
}

pub fn parse_device(s: &str) -> Result<Device> {
    let dev = match s {
        "auto" => Device::cuda_if_available(0)?,
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::new_cuda(n)?,
            None => bail!("--device `{other}`: expected auto, cpu, cuda or cuda:N"),
        },
    };
    // Keep freed blocks in the CUDA pool (release threshold raised): returning them to the
    // driver at each synchronisation and asking again costs time every step.
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        crate::memory::measure::pool::Pool::new(&dev)?;
    }
    Ok(dev)
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(crate::config::Precision::parse(s)?.dtype())
}

/// The configuration a checkpoint runs with (see [`ModelArgs`]).
pub fn resolve_config(ckpt: &TrainedCheckpoint, args: &ModelArgs) -> Result<Config> {
    let mut cfg = match (&args.config, ckpt) {
        (Some(path), _) => Config::load(path)?,
        (None, TrainedCheckpoint::Project { dir, meta }) => {
            let what = || format!("the model_config of checkpoint {}", dir.display());
            // Normally the TOML of `config.model`; a whole configuration is accepted too.
            let (model, prompt) = match toml::from_str::<ModelSection>(&meta.model_config) {
                Ok(m) => (m, None),
                Err(_) => {
                    let full = Config::parse(&meta.model_config, &[]).with_context(what)?;
                    (full.model, Some(full.prompt))
                }
            };
            let template = meta.extra.get("prompt_template").and_then(|v| v.as_str()).map(str::to_owned);
            let prompt = match (prompt, template) {
                (_, Some(t)) => PromptSection { template: t },
                (Some(p), None) => p,
                (None, None) => PromptSection::default(),
            };
            Config { model, prompt, init: None, train: Default::default(), data: Default::default() }
        }
        (None, TrainedCheckpoint::Authors { dir }) => {
            if args.base.is_none() {
                bail!(
                    "{} is the authors' PRS-Med release, which records no configuration: pass --config FILE \
                     (e.g. configs/prs-med-7b.toml), or --base MODEL to use the paper's settings \
                     (configs/prs-med-7b.toml)",
                    dir.display()
                );
            }
            Config::parse(PAPER_CONFIG, &[]).context("the built-in configs/prs-med-7b.toml")?
        }
    };
    if let Some(b) = &args.base {
        cfg.model.base = b.clone();
    }
    match (&args.tinysam, ckpt) {
        (Some(t), _) => cfg.model.tinysam = t.clone(),
        // Their image_encoder.pth holds the whole trained encoder under `image_encoder.*`.
        (None, TrainedCheckpoint::Authors { dir }) => {
            cfg.model.tinysam = dir.join("image_encoder.pth").display().to_string()
        }
        _ => {}
    }
    Ok(cfg)
}

/// The tokenizer of a base model (folder or hub id).
pub fn load_tokenizer(base: &str) -> Result<Tokenizer> {
    let src = ModelSource::parse(base)?;
    match &src {
        ModelSource::Local(dir) => tokenizer::load(dir),
        ModelSource::Hub(_) => {
            let f = if src.has("tokenizer.json") { src.file("tokenizer.json")? } else { src.file("tokenizer.model")? };
            tokenizer::load_path(&f)
        }
    }
}

/// Clear errors for a checkpoint trained on another base model, before any weight is read.
pub fn check_compat(ckpt: &TrainedCheckpoint, base: &str, llava: &LlavaMedConfig, tok: &Tokenizer) -> Result<()> {
    let (hidden, vocab, layers) = (llava.llm.hidden_size, llava.llm.vocab_size, llava.llm.num_hidden_layers);
    let mismatch = |what: &str, ck: usize, here: usize| {
        anyhow::anyhow!(
            "checkpoint {} does not fit base model {base}: it was trained with {what} {ck}, the base has {here} \
             (pass the base it was trained on with --base)",
            ckpt.dir().display()
        )
    };
    let tok_vocab = tok.get_vocab_size(true);
    if tok_vocab > vocab {
        bail!("base model {base}: its tokenizer has {tok_vocab} tokens but config.json says vocab_size {vocab}");
    }
    if let TrainedCheckpoint::Project { meta, .. } = ckpt {
        if let Some(b) = meta.extra.get("base_config") {
            for (key, here) in [("hidden_size", hidden), ("vocab_size", vocab), ("num_hidden_layers", layers)] {
                if let Some(ck) = b.get(key).and_then(|v| v.as_u64()) {
                    if ck as usize != here {
                        return Err(mismatch(key, ck as usize, here));
                    }
                }
            }
        }
    }
    let adapter = match ckpt {
        TrainedCheckpoint::Project { dir, .. } => dir.join(ADAPTER_FILE),
        TrainedCheckpoint::Authors { dir } => dir.join("lora_adapter").join(ADAPTER_FILE),
    };
    let header = read_safetensors_header(&adapter)?;
    for (name, (_, shape)) in &header.tensors {
        let Some(rest) = name.split("model.layers.").nth(1).filter(|_| !name.contains("vision_tower")) else {
            continue;
        };
        let layer: usize = rest.split('.').next().and_then(|i| i.parse().ok()).unwrap_or(0);
        if layer >= layers {
            return Err(mismatch("at least this many layers:", layer + 1, layers));
        }
        if name.ends_with("q_proj.lora_A.weight") && shape.len() == 2 && shape[1] != hidden {
            return Err(mismatch("hidden size", shape[1], hidden));
        }
    }
    if let TrainedCheckpoint::Project { dir, meta } = ckpt {
        if meta.components.contains(&Component::MaskDecoder) {
            let h = read_safetensors_header(&dir.join(Component::MaskDecoder.file()))?;
            if let Some((_, s)) = h.tensors.get("prompt_projection.0.weight") {
                if s.len() == 2 && s[1] != hidden {
                    return Err(mismatch("hidden size", s[1], hidden));
                }
            }
        }
    }
    Ok(())
}

/// Resolves the configuration, checks the checkpoint against the base, loads the model.
pub fn load_model(checkpoint: &Path, args: &ModelArgs) -> Result<Loaded> {
    let t0 = Instant::now();
    let ckpt = TrainedCheckpoint::open(checkpoint)?;
    let cfg = resolve_config(&ckpt, args)?;
    let source = ModelSource::parse(&cfg.model.base)?;
    let llava = read_llava_config(&source)?;
    let tokenizer = load_tokenizer(&cfg.model.base)?;
    check_compat(&ckpt, &cfg.model.base, &llava, &tokenizer)?;
    let device = parse_device(&args.device)?;
    let dtype = match &args.dtype {
        Some(d) => parse_dtype(d)?,
        None if device.is_cpu() => DType::F32,
        None => cfg.model.compute_dtype.dtype(),
    };
    let opts = LoadOptions { device: device.clone(), dtype, mode: Mode::Infer, checkpoint: Some(checkpoint), seed: 0 };
    let model = load_prs_med(&cfg, &opts)
        .with_context(|| format!("loading checkpoint {} on base {}", checkpoint.display(), cfg.model.base))?;
    let (format, step) = match &ckpt {
        TrainedCheckpoint::Project { meta, .. } => ("project", Some(meta.step)),
        TrainedCheckpoint::Authors { .. } => ("authors", None),
    };
    let info = ModelInfo {
        base: cfg.model.base.clone(),
        checkpoint: checkpoint.display().to_string(),
        checkpoint_format: format.into(),
        checkpoint_step: step,
        dtype: format!("{dtype:?}").to_lowercase(),
        device: match device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".into(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        },
    };
    Ok(Loaded { model, cfg, tokenizer, info, load_secs: t0.elapsed().as_secs_f64() })
}
