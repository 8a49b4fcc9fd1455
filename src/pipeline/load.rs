//! Loading a trained model for inference, in one place: the configuration (from `--config`, else
//! the project checkpoint's stored model section, `--base` overriding `model.base`; the
//! authors' release records none, so it needs `--config` or `--base`, and then
//! configs/prs-med-7b.toml applies), the base model's tokenizer and config.json, a check of the
//! checkpoint against the base (hidden size, layers, vocabulary) before any weight is read, so
//! that a mismatch is one clear message rather than a tensor-shape error deep in the loader,
//! then the weights on the chosen device and dtype.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::device::{device_name, parse_device};
use crate::config::{BaseQuant, Config, ModelSection, Precision, PromptSection};
use crate::model::prs_med::{LlavaMedConfig, PrsMed};
use crate::pipeline::build::{load_prs_med, read_llava_config, LoadOptions, Mode};
use crate::tokenizer;
use crate::weights::checkpoint::{Component, TrainedCheckpoint, ADAPTER_FILE};
use crate::weights::hub::ModelSource;
use crate::weights::shards::read_safetensors_header;

/// The paper's configuration, used with `--base` for the authors' release (which records none).
pub const PAPER_CONFIG: &str = include_str!("../../configs/prs-med-7b.toml");

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
    /// Compute dtype; default: the configuration's on a GPU, f32 on the CPU.
    #[arg(long, value_enum)]
    pub dtype: Option<Precision>,
    #[command(flatten)]
    pub quant: BaseQuantArgs,
    /// Keep the LoRA adapter as a separate branch instead of folding it into the base weights at
    /// load (W + scale * B A in f32, stored in the compute dtype, as `prs export --merge-lora`
    /// does). Merging makes each decoding step about 40% fewer kernels; the separate branch keeps
    /// training's arithmetic. A quantised base always keeps it separate.
    #[arg(long)]
    pub no_merge_lora: bool,
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self {
            base: None,
            config: None,
            tinysam: None,
            device: "auto".into(),
            dtype: None,
            quant: BaseQuantArgs::default(),
            no_merge_lora: false,
        }
    }
}

/// `--base-quant` and the spellings PEFT users know (shared by finetune, predict, evaluate).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct BaseQuantArgs {
    /// Storage of the frozen LLM projections, quantised at load from the usual weights: none,
    /// 8bit (ggml Q8_0) or 4bit (ggml Q4_K); default: the configuration's `model.base_quant`.
    /// Adapters are the same whatever the base's storage.
    #[arg(long, alias = "base_quant", value_enum)]
    pub base_quant: Option<BaseQuant>,
    /// Same as --base-quant 4bit.
    #[arg(long = "load_in_4bit", alias = "load-in-4bit", conflicts_with_all = ["base_quant", "load_in_8bit"])]
    pub load_in_4bit: bool,
    /// Same as --base-quant 8bit.
    #[arg(long = "load_in_8bit", alias = "load-in-8bit", conflicts_with = "base_quant")]
    pub load_in_8bit: bool,
}

impl BaseQuantArgs {
    /// The storage the flags ask for, if any.
    pub fn get(&self) -> Option<BaseQuant> {
        match (self.base_quant, self.load_in_4bit, self.load_in_8bit) {
            (Some(q), _, _) => Some(q),
            (None, true, _) => Some(BaseQuant::Int4),
            (None, false, true) => Some(BaseQuant::Int8),
            _ => None,
        }
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
    /// How the LLM's adapter runs: `merged` into the base weights, `separate`, or `none` (a
    /// merged export carries none).
    #[serde(default)]
    pub lora: String,
}

/// A loaded model with everything needed to prepare its inputs.
pub struct Loaded {
    pub model: PrsMed,
    pub cfg: Config,
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
    pub load_secs: f64,
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
    if ckpt.is_merged() {
        // A merged export is its own base model and carries its whole image encoder.
        if args.base.is_some() {
            bail!(
                "{} is a merged export (the LoRA is folded into its own base weights): --base does not apply",
                ckpt.dir().display()
            );
        }
        cfg.model.base = ckpt.dir().display().to_string();
        cfg.model.vision_tower = None;
        cfg.model.tinysam = ckpt.dir().join(Component::ImageEncoder.file()).display().to_string();
    }
    if let Some(b) = &args.base {
        cfg.model.base = b.clone();
    }
    if let Some(q) = args.quant.get() {
        cfg.model.base_quant = q;
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

/// What the base model tells before any weight is read: its config.json and tokenizer.
pub struct BaseModel {
    pub llava: LlavaMedConfig,
    pub tokenizer: Tokenizer,
}

/// Opens a base model (folder or hub id) for its configuration and tokenizer.
pub fn open_base(base: &str) -> Result<BaseModel> {
    let llava = read_llava_config(&ModelSource::parse(base)?)?;
    Ok(BaseModel { llava, tokenizer: load_tokenizer(base)? })
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
        _ if ckpt.is_merged() => None,
        TrainedCheckpoint::Project { dir, .. } => Some(dir.join(ADAPTER_FILE)),
        TrainedCheckpoint::Authors { dir } => Some(dir.join("lora_adapter").join(ADAPTER_FILE)),
    };
    let header = match adapter {
        Some(a) => read_safetensors_header(&a)?,
        None => Default::default(),
    };
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
    let BaseModel { llava, tokenizer } = open_base(&cfg.model.base)?;
    check_compat(&ckpt, &cfg.model.base, &llava, &tokenizer)?;
    let device = parse_device(&args.device)?;
    let dtype = match args.dtype {
        Some(d) => d.dtype(),
        None if device.is_cpu() => DType::F32,
        None => cfg.model.compute_dtype.dtype(),
    };
    let opts = LoadOptions { device: device.clone(), dtype, mode: Mode::Infer, checkpoint: Some(checkpoint), seed: 0 };
    let mut model = load_prs_med(&cfg, &opts)
        .with_context(|| format!("loading checkpoint {} on base {}", checkpoint.display(), cfg.model.base))?;
    let lora = lora_for_inference(&mut model.llm, !args.no_merge_lora)?;
    let (format, step) = match &ckpt {
        TrainedCheckpoint::Project { meta, .. } if meta.is_merged() => ("merged", Some(meta.step)),
        TrainedCheckpoint::Project { meta, .. } => ("project", Some(meta.step)),
        TrainedCheckpoint::Authors { .. } => ("authors", None),
    };
    let info = ModelInfo {
        base: cfg.model.base.clone(),
        checkpoint: checkpoint.display().to_string(),
        checkpoint_format: format.into(),
        checkpoint_step: step,
        dtype: format!("{dtype:?}").to_lowercase(),
        device: device_name(&device),
        lora: lora.into(),
    };
    Ok(Loaded { model, cfg, tokenizer, info, load_secs: t0.elapsed().as_secs_f64() })
}

/// Merges the LLM's frozen adapters into its base weights when `merge` asks for it (see
/// [`ModelArgs::no_merge_lora`]) and says how the adapter runs.
pub fn lora_for_inference(llm: &mut crate::model::mistral::Mistral, merge: bool) -> Result<&'static str> {
    let merged = if merge { llm.merge_lora()? } else { 0 };
    let separate = llm.layers().iter().flat_map(|l| l.projections()).any(|p| p.lora().is_some());
    Ok(match (merged, separate) {
        (_, true) => "separate",
        (0, false) => "none",
        (_, false) => "merged",
    })
}
