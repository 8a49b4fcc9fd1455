//! Run configuration: a TOML file + flags + `--set section.key=value` overrides -> one resolved
//! struct, saved in every run folder.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::model::clip::ClipVisionConfig;
use crate::model::decoder::DecoderConfig;
use crate::model::mistral::MistralConfig;
pub use crate::model::prs_med::{Checkpointing, MaskPrecision};
use crate::model::tinysam::TinySamConfig;
use crate::nn::linear::LoraConfig;
pub use crate::nn::quant::BaseQuant;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    #[serde(default)]
    pub prompt: PromptSection,
    /// Architecture of the random base model written by `prs init` (tiny configs).
    #[serde(default)]
    pub init: Option<InitSection>,
    /// Training hyper-parameters (used by `prs finetune`).
    #[serde(default)]
    pub train: TrainSection,
    /// Dataset settings (used by `prs finetune` / `prs evaluate`).
    #[serde(default)]
    pub data: DataSection,
}

/// `prs finetune` settings. Defaults are the paper's (section 4 of the reference).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// `off`, `llm` (decoder layers only) or `all` (also TinySAM blocks); `true`/`false` of
    /// older configs mean `all`/`off`. The mask decoder's attention never keeps its scores.
    pub gradient_checkpointing: Checkpointing,
    /// Compute precision on the accelerator (CPU runs in f32).
    pub precision: Precision,
    pub learning_rate: f64,
    pub min_learning_rate: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub adam_eps: f64,
    pub adam_betas: [f64; 2],
    /// Global gradient-norm clip (0 = off).
    pub max_grad_norm: f64,
    pub num_epochs: u64,
    /// Stop after this many optimizer steps (0 = run all epochs).
    pub max_steps: u64,
    pub seed: u64,
    /// Evaluate every N optimizer steps (0 = at each epoch end).
    pub eval_every: u64,
    /// Save a checkpoint every N optimizer steps (0 = only at epoch ends).
    pub save_every: u64,
    /// Stop after this many evaluations without a better validation Dice (0 = never).
    pub early_stopping_patience: u64,
    /// Cap on validation samples per evaluation (0 = all).
    pub max_eval_samples: usize,
    pub seg_loss_weight: f64,
    pub lm_loss_weight: f64,
    pub cls_loss_weight: f64,
    /// The classifier loss is used for this many epochs (paper: 5).
    pub cls_loss_epochs: u64,
    /// "intended" (weighted BCE + weighted IoU) or "authors" (their unweighted BCE).
    pub loss_compat: crate::model::losses::LossCompat,
    /// TinySAM BatchNorm while training.
    pub batchnorm: BatchNormMode,
    /// Stop the run after this many consecutive skipped steps (non-finite, or a spike).
    pub max_consecutive_nonfinite: u32,
    /// Divergence guard (`train::guard`): a step whose loss or gradient norm is this many times
    /// its running level is skipped, and a running loss this many times its lowest stops the
    /// run. 0 turns the guard off.
    pub divergence_factor: f64,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            batch_size: 4,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: Checkpointing::Off,
            precision: Precision::Bf16,
            learning_rate: 1e-4,
            min_learning_rate: 1e-6,
            warmup_steps: 0,
            weight_decay: 1e-5,
            adam_eps: 1e-6,
            adam_betas: [0.9, 0.999],
            max_grad_norm: 1.0,
            num_epochs: 20,
            max_steps: 0,
            seed: 42,
            eval_every: 0,
            save_every: 0,
            early_stopping_patience: 0,
            max_eval_samples: 0,
            seg_loss_weight: 1.0,
            lm_loss_weight: 1.0,
            cls_loss_weight: 0.5,
            cls_loss_epochs: 5,
            loss_compat: Default::default(),
            batchnorm: BatchNormMode::Batch,
            max_consecutive_nonfinite: 3,
            divergence_factor: 10.0,
        }
    }
}

/// Compute precision of frozen weights and matmuls (trained tensors keep f32 masters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[serde(alias = "bfloat16")]
    #[value(alias = "bfloat16")]
    Bf16,
    #[serde(alias = "fp16", alias = "float16")]
    #[value(alias = "fp16", alias = "float16")]
    F16,
    #[serde(alias = "fp32", alias = "float32")]
    #[value(alias = "fp32", alias = "float32")]
    F32,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
            Self::F32 => DType::F32,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::F32 => "f32",
        }
    }

    /// Bytes per element of activations and frozen weights.
    pub fn bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }

    /// The dtype frozen weights compute in on `device`: this precision on an accelerator, f32 on
    /// the CPU (candle's CPU convolutions have no bf16).
    pub fn compute_dtype_on(self, device: &candle_core::Device) -> DType {
        if device.is_cpu() {
            DType::F32
        } else {
            self.dtype()
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// TinySAM's BatchNorm while training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BatchNormMode {
    /// Batch statistics, PyTorch's train mode.
    Batch,
    /// Running statistics: makes gradient accumulation exactly a large batch.
    Frozen,
}

/// What an image with an empty ground truth scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EmptyPolicy {
    /// NaN: excluded from the means and counted in `n_excluded`.
    #[default]
    #[value(alias = "nan")]
    Ignore,
    /// 1 when the prediction is empty too, 0 when something was predicted.
    #[value(alias = "1")]
    One,
    /// Always 0.
    #[value(alias = "0")]
    Zero,
}

impl std::str::FromStr for EmptyPolicy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        <Self as clap::ValueEnum>::from_str(s.trim(), true)
            .map_err(|_| anyhow::anyhow!("unknown empty-mask policy {s:?} (expected ignore, one or zero)"))
    }
}

impl std::fmt::Display for EmptyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ignore => "ignore",
            Self::One => "one",
            Self::Zero => "zero",
        })
    }
}

/// Dataset settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// The authors' layout (folder with annotations/) or a plain CSV.
    pub root: Option<String>,
    pub num_workers: usize,
    /// Batches prepared ahead of the training step.
    pub prefetch: usize,
    /// Hold-out fraction of train when the data has no `val` split.
    pub val_fraction: f64,
    pub skip_bad_rows: bool,
    /// What an image with an empty ground-truth mask scores in validation during training (the
    /// same choice as `prs evaluate --empty`).
    #[serde(default)]
    pub empty_masks: EmptyPolicy,
    /// Read every non-zero mask value as lesion (label masks with class ids). Off: masks must be
    /// binary (0/1, 0/255, a colour outline) and any other value set is reported.
    pub mask_nonzero_is_lesion: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            root: None,
            num_workers: 2,
            prefetch: 4,
            val_fraction: 0.05,
            skip_bad_rows: false,
            mask_nonzero_is_lesion: false,
            empty_masks: EmptyPolicy::Ignore,
        }
    }
}

/// Which weights, which parts train, and the dtype of frozen weights.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// LLaVA-Med folder or hub id (`microsoft/llava-med-v1.5-mistral-7b`).
    pub base: String,
    /// TinySAM weights: a `.pth`/`.safetensors` path, or `repo_id:file` on the hub.
    pub tinysam: String,
    /// A separate CLIP checkpoint (folder or hub id, keys `vision_model.*`) for base models that
    /// do not carry the tower; by default the tower inside the LLaVA-Med checkpoint is used, and
    /// failing that the hub id named by its `mm_vision_tower`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_tower: Option<String>,
    /// SAM input size (the mask is predicted at this resolution).
    #[serde(default = "default_sam_size")]
    pub sam_image_size: usize,
    /// Frozen weights and matmuls. CPU runs use f32.
    #[serde(default = "default_dtype")]
    pub compute_dtype: Precision,
    /// Storage of the frozen LLM projections (q, k, v, o, gate, up, down): `none`, `8bit` or
    /// `4bit`, quantised at load; embeddings, lm_head, norms, CLIP and everything trained stay
    /// in the compute dtype.
    #[serde(default)]
    pub base_quant: BaseQuant,
    pub lora: LoraConfig,
    #[serde(default)]
    pub trainable: TrainableSection,
    #[serde(default)]
    pub tinysam_arch: TinySamConfig,
    #[serde(default)]
    pub decoder: DecoderSection,
    #[serde(default = "default_num_classes")]
    pub num_modalities: usize,
    /// The mask branch (TinySAM, the mask decoder, the modality classifier): `compute` runs it
    /// in the compute dtype, as PyTorch's autocast does; `f32` keeps it in f32 (twice its
    /// activation memory, and slower on a GPU). Either way trained weights and AdamW state stay
    /// f32, and norm statistics, softmax and the mask logits are computed in f32.
    #[serde(default)]
    pub mask_precision: MaskPrecision,
}

fn default_sam_size() -> usize {
    1024
}
fn default_dtype() -> Precision {
    Precision::Bf16
}
fn default_num_classes() -> usize {
    6
}

/// What trains besides LoRA and the mask decoder (always trained).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainableSection {
    #[serde(default = "yes")]
    pub tinysam: bool,
    #[serde(default)]
    pub projector: bool,
}

fn yes() -> bool {
    true
}

impl Default for TrainableSection {
    fn default() -> Self {
        Self { tinysam: true, projector: false }
    }
}

/// Mask decoder widths; the LLM hidden size and token grid come from the other parts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderSection {
    pub prompt_hidden: usize,
    pub cross_heads: usize,
    pub self_heads: usize,
    pub ffn_dim: usize,
    #[serde(serialize_with = "crate::nn::linear::serialize_f32_short")]
    pub dropout: f32,
}

impl Default for DecoderSection {
    fn default() -> Self {
        let d = DecoderConfig::default();
        Self {
            prompt_hidden: d.prompt_hidden,
            cross_heads: d.cross_heads,
            self_heads: d.self_heads,
            ffn_dim: d.ffn_dim,
            dropout: d.dropout,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSection {
    /// Training text; `{question}` and `{answer}` are filled in, `<image>` marks the image.
    pub template: String,
}

impl Default for PromptSection {
    fn default() -> Self {
        Self { template: "<image>\n### User: {question} \n### Assistant: \n{answer}".into() }
    }
}

/// The base model `prs init` creates (random weights in the real layouts).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSection {
    pub llm: MistralConfig,
    pub vision: ClipVisionConfig,
    /// Std of the random base weights: ~1/sqrt(hidden) so a frozen random lm_head can express
    /// confident answers (the reference, section 8).
    pub weight_std: f64,
    /// Std of the LLM's decoder-layer projections (None: `weight_std`).
    #[serde(default)]
    pub llm_layer_std: Option<f64>,
    /// Std of the random CLIP position embedding (None: CLIP's own 0.02).
    #[serde(default)]
    pub vision_position_std: Option<f64>,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_seed() -> u64 {
    0
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text, &[]).with_context(|| format!("in config {}", path.display()))
    }

    /// Parses TOML text and applies `section.key=value` overrides (values in TOML syntax;
    /// a bare word is taken as a string).
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        let mut doc: toml::Table = toml::from_str(text)?;
        for o in overrides {
            apply_override(&mut doc, o).map_err(crate::exit::input)?;
        }
        let cfg: Config = toml::Value::Table(doc).try_into()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Range checks of every number, so a zero, negative or NaN value is one message naming
    /// the key before anything loads (and never a panic deep inside a step).
    pub fn validate(&self) -> Result<()> {
        self.check_values().map_err(crate::exit::input)
    }

    fn check_values(&self) -> Result<()> {
        let t = &self.train;
        let finite = |key: &str, v: f64, ok: bool, want: &str| -> Result<()> {
            ensure!(v.is_finite() && ok, "train.{key} = {v}: must be {want}");
            Ok(())
        };
        let at_least_one = |key: &str, v: u64| -> Result<()> {
            ensure!(v >= 1, "{key} = {v}: must be at least 1");
            Ok(())
        };
        at_least_one("train.batch_size", t.batch_size as u64)?;
        at_least_one("train.gradient_accumulation_steps", t.gradient_accumulation_steps as u64)?;
        at_least_one("train.num_epochs", t.num_epochs)?;
        at_least_one("train.max_consecutive_nonfinite", t.max_consecutive_nonfinite as u64)?;
        finite("learning_rate", t.learning_rate, t.learning_rate > 0.0, "a positive number")?;
        finite("min_learning_rate", t.min_learning_rate, t.min_learning_rate >= 0.0, ">= 0")?;
        finite("weight_decay", t.weight_decay, t.weight_decay >= 0.0, ">= 0")?;
        finite("adam_eps", t.adam_eps, t.adam_eps > 0.0, "a positive number")?;
        for (i, b) in t.adam_betas.iter().enumerate() {
            finite(&format!("adam_betas[{i}]"), *b, (0.0..1.0).contains(b), "in [0, 1)")?;
        }
        finite("max_grad_norm", t.max_grad_norm, t.max_grad_norm >= 0.0, ">= 0 (0 = no clipping)")?;
        for (key, w) in [
            ("seg_loss_weight", t.seg_loss_weight),
            ("lm_loss_weight", t.lm_loss_weight),
            ("cls_loss_weight", t.cls_loss_weight),
        ] {
            finite(key, w, w >= 0.0, ">= 0")?;
        }
        let f = t.divergence_factor;
        finite("divergence_factor", f, f == 0.0 || f > 1.0, "0 (off) or above 1")?;
        let d = &self.data;
        ensure!(
            d.val_fraction.is_finite() && (0.0..1.0).contains(&d.val_fraction),
            "data.val_fraction = {}: must be in [0, 1)",
            d.val_fraction
        );
        let m = &self.model;
        at_least_one("model.sam_image_size", m.sam_image_size as u64)?;
        at_least_one("model.num_modalities", m.num_modalities as u64)?;
        at_least_one("model.lora.r", m.lora.r as u64)?;
        ensure!(m.lora.alpha.is_finite(), "model.lora.alpha = {}: must be a finite number", m.lora.alpha);
        ensure!((0.0..1.0).contains(&m.lora.dropout), "model.lora.dropout = {}: must be in [0, 1)", m.lora.dropout);
        ensure!(
            (0.0..1.0).contains(&m.decoder.dropout),
            "model.decoder.dropout = {}: must be in [0, 1)",
            m.decoder.dropout
        );
        for (key, v) in [
            ("model.decoder.prompt_hidden", m.decoder.prompt_hidden),
            ("model.decoder.cross_heads", m.decoder.cross_heads),
            ("model.decoder.self_heads", m.decoder.self_heads),
            ("model.decoder.ffn_dim", m.decoder.ffn_dim),
        ] {
            at_least_one(key, v as u64)?;
        }
        Ok(())
    }
}

fn apply_override(doc: &mut toml::Table, o: &str) -> Result<()> {
    let Some((path, value)) = o.split_once('=') else { bail!("--set expects section.key=value, got `{o}`") };
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").unwrap(),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let keys: Vec<&str> = path.trim().split('.').collect();
    let mut cur = doc;
    for k in &keys[..keys.len() - 1] {
        cur = cur
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .with_context(|| format!("--set {o}: `{k}` is not a section"))?;
    }
    cur.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written configurations (`--emit-config`, run folders) read as they were written: f32
    /// fields keep their short decimal form and the text parses back to the same values.
    #[test]
    fn written_configs_keep_short_decimals_and_round_trip() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/prs-med-7b.toml");
        let cfg = Config::load(&path).unwrap();
        let text = cfg.to_toml().unwrap();
        assert!(text.contains("dropout = 0.05\n"), "{text}");
        assert!(!text.contains("0.0500000"), "{text}");
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back.model.lora, cfg.model.lora);
        assert_eq!(back.model.decoder.dropout, cfg.model.decoder.dropout);
    }
}
