//! Trained checkpoints: the project's own folder format (PEFT-compatible adapter + one
//! safetensors file per trained component + `prs_checkpoint.json`) and the authors' PRS-Med
//! release layout (`lora_adapter/`, `image_encoder.pth`, `mask_decoder.pth`, `cls.pth`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::pth::open_pth;
use super::shards::{open_safetensors_paths, write_safetensors_atomic};
use crate::files;
use crate::nn::linear::LoraConfig;
use crate::nn::param::TrainedParams;

pub const META_FILE: &str = "prs_checkpoint.json";
/// `format` of a project checkpoint. A merged export (`prs export --merge-lora`) says
/// [`MERGED_FORMAT`]: the folder is its own base model, with the LoRA folded into it.
pub const PROJECT_FORMAT: &str = "prs-checkpoint";
pub const MERGED_FORMAT: &str = "prs-merged";
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT prefixes adapter keys with this (the model wrapper + the causal-LM wrapper).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// A trained component and its file in the project format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Lora,
    ImageEncoder,
    MaskDecoder,
    Classifier,
    MmProjector,
}

impl Component {
    pub const ALL: [Component; 5] = [
        Component::Lora,
        Component::ImageEncoder,
        Component::MaskDecoder,
        Component::Classifier,
        Component::MmProjector,
    ];

    /// The registry group of its trained tensors.
    pub fn group(self) -> &'static str {
        match self {
            Component::Lora => "lora",
            Component::ImageEncoder => "image_encoder",
            Component::MaskDecoder => "mask_decoder",
            Component::Classifier => "classifier",
            Component::MmProjector => "mm_projector",
        }
    }

    pub fn file(self) -> &'static str {
        match self {
            Component::Lora => ADAPTER_FILE,
            Component::ImageEncoder => "image_encoder.safetensors",
            Component::MaskDecoder => "mask_decoder.safetensors",
            Component::Classifier => "classifier.safetensors",
            Component::MmProjector => "mm_projector.safetensors",
        }
    }
}

/// `prs_checkpoint.json`: what a checkpoint folder holds and what it was trained from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    pub format: String,
    pub version: u32,
    /// Base LLaVA-Med model (folder or hub id) the adapter applies to.
    pub base_model: String,
    /// TinySAM weights the image encoder started from.
    pub tinysam: String,
    pub components: Vec<Component>,
    /// The model section of the resolved configuration (TOML text), so the checkpoint
    /// rebuilds the same architecture.
    pub model_config: String,
    #[serde(default)]
    pub step: u64,
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl CheckpointMeta {
    pub fn new(base_model: &str, tinysam: &str, model_config: String) -> Self {
        Self {
            format: PROJECT_FORMAT.into(),
            version: 1,
            base_model: base_model.into(),
            tinysam: tinysam.into(),
            components: vec![],
            model_config,
            step: 0,
            extra: BTreeMap::new(),
        }
    }

    /// A merged export: no adapter, the base model is the checkpoint folder itself.
    pub fn is_merged(&self) -> bool {
        self.format == MERGED_FORMAT
    }
}

/// PEFT's `adapter_config.json` (the fields we read and write).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default = "lora_type")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f32,
    pub target_modules: TargetModules,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// PEFT writes target modules as a list, or sometimes as a regex string.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

fn lora_type() -> String {
    "LORA".into()
}
fn none() -> String {
    "none".into()
}

impl AdapterConfig {
    pub fn from_lora(cfg: &LoraConfig, base: &str) -> Self {
        Self {
            peft_type: "LORA".into(),
            r: cfg.r,
            lora_alpha: cfg.alpha,
            lora_dropout: cfg.dropout,
            target_modules: TargetModules::List(cfg.target_modules.clone()),
            bias: "none".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base.into()),
            modules_to_save: None,
        }
    }

    /// The LoRA settings for the language model. The authors' adapters also list CLIP modules
    /// (inert there); only Mistral's projection names matter here.
    pub fn lora_config(&self, path: &Path) -> Result<LoraConfig> {
        if self.peft_type != "LORA" {
            bail!("{}: peft_type `{}` is not LORA", path.display(), self.peft_type);
        }
        if self.bias != "none" {
            bail!("{}: LoRA bias `{}` is not supported (only `none`)", path.display(), self.bias);
        }
        const MISTRAL: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
        let targets: Vec<String> = match &self.target_modules {
            TargetModules::List(v) => MISTRAL
                .iter()
                .filter(|m| v.iter().any(|t| t == *m || t.ends_with(&format!(".{m}"))))
                .map(|s| s.to_string())
                .collect(),
            TargetModules::Pattern(p) => MISTRAL.iter().filter(|m| p.contains(*m)).map(|s| s.to_string()).collect(),
        };
        if targets.is_empty() {
            bail!("{}: no Mistral projection among target_modules {:?}", path.display(), self.target_modules);
        }
        Ok(LoraConfig { r: self.r, alpha: self.lora_alpha, dropout: self.lora_dropout, target_modules: targets })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Which layout a trained checkpoint folder has.
#[derive(Clone, Debug)]
pub enum TrainedCheckpoint {
    /// The project's format (has `prs_checkpoint.json`).
    Project { dir: PathBuf, meta: CheckpointMeta },
    /// The authors' release (`lora_adapter/` + `.pth` files).
    Authors { dir: PathBuf },
}

/// A component's tensors: a VarBuilder rooted where the component's keys start, and a
/// description of the source for error messages.
pub struct ComponentSource {
    pub vb: VarBuilder<'static>,
    pub what: String,
}

impl TrainedCheckpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("checkpoint {} is not a folder", dir.display());
        }
        let meta_path = dir.join(META_FILE);
        if meta_path.exists() {
            let text =
                std::fs::read_to_string(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?;
            let meta: CheckpointMeta =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", meta_path.display()))?;
            if meta.format != PROJECT_FORMAT && !meta.is_merged() {
                bail!("{}: format `{}` is not a prs checkpoint", meta_path.display(), meta.format);
            }
            for c in &meta.components {
                let f = dir.join(c.file());
                if !f.exists() {
                    bail!("checkpoint {} lists {:?} but {} is missing", dir.display(), c, f.display());
                }
            }
            return Ok(Self::Project { dir: dir.into(), meta });
        }
        let authors = ["lora_adapter/adapter_model.safetensors", "mask_decoder.pth"];
        if authors.iter().all(|f| dir.join(f).exists()) {
            return Ok(Self::Authors { dir: dir.into() });
        }
        bail!(
            "{} is neither a prs checkpoint ({META_FILE}) nor the authors' PRS-Med release \
             (lora_adapter/adapter_model.safetensors, image_encoder.pth, mask_decoder.pth, cls.pth)",
            dir.display()
        )
    }

    pub fn dir(&self) -> &Path {
        match self {
            Self::Project { dir, .. } | Self::Authors { dir } => dir,
        }
    }

    /// Whether this is a merged export (its own base, no adapter).
    pub fn is_merged(&self) -> bool {
        matches!(self, Self::Project { meta, .. } if meta.is_merged())
    }

    /// LoRA settings and tensors, rooted at PEFT's `base_model.model`. A merged export has
    /// none: its LoRA targets no module, so the model is built without adapters.
    pub fn adapter(&self, dtype: DType, device: &Device) -> Result<(LoraConfig, ComponentSource)> {
        if self.is_merged() {
            let none = LoraConfig { r: 1, alpha: 1.0, dropout: 0.0, target_modules: vec![] };
            let vb = VarBuilder::zeros(dtype, device);
            return Ok((none, ComponentSource { vb, what: format!("{} (LoRA merged)", self.dir().display()) }));
        }
        let folder = match self {
            Self::Project { dir, .. } => dir.clone(),
            Self::Authors { dir } => dir.join("lora_adapter"),
        };
        let cfg_path = folder.join(ADAPTER_CONFIG);
        let lora = AdapterConfig::read(&cfg_path)?.lora_config(&cfg_path)?;
        let file = folder.join(ADAPTER_FILE);
        let st = open_safetensors_paths(std::slice::from_ref(&file), dtype, device)?;
        Ok((lora, ComponentSource { vb: st.vb.pp("base_model").pp("model"), what: file.display().to_string() }))
    }

    /// The tensors of a non-LoRA component, if the checkpoint has it.
    pub fn component(&self, c: Component, dtype: DType, device: &Device) -> Result<Option<ComponentSource>> {
        match self {
            Self::Project { dir, meta } => {
                if !meta.components.contains(&c) {
                    return Ok(None);
                }
                let file = dir.join(c.file());
                let st = open_safetensors_paths(std::slice::from_ref(&file), dtype, device)?;
                Ok(Some(ComponentSource { vb: st.vb, what: file.display().to_string() }))
            }
            Self::Authors { dir } => {
                let Some((_, file, prefixes)) = AUTHORS_FILES.iter().find(|(k, ..)| *k == c) else {
                    return Ok(None);
                };
                let path = dir.join(file);
                if !path.exists() {
                    bail!("the authors' checkpoint {} lacks {file}", dir.display());
                }
                let vb = open_pth(&path, dtype, device)?;
                let vb = match prefixes[0].trim_end_matches('.') {
                    "" => vb,
                    root => vb.pp(root),
                };
                Ok(Some(ComponentSource { vb, what: path.display().to_string() }))
            }
        }
    }

    /// The base model this checkpoint was trained on, if recorded.
    pub fn base_model(&self) -> Option<&str> {
        match self {
            Self::Project { meta, .. } => Some(&meta.base_model),
            Self::Authors { .. } => None,
        }
    }
}

/// Writes every trained tensor in the project format, into a temporary sibling folder that
/// replaces `dir` only when complete. Non-finite values are refused (nothing is written).
pub fn save_checkpoint(dir: &Path, trained: &TrainedParams, lora: &LoraConfig, meta: CheckpointMeta) -> Result<()> {
    save_checkpoint_with(dir, trained, lora, meta, |_| Ok(()))
}

/// `save_checkpoint`, with `extra` writing more files (optimizer and trainer state) into the
/// same temporary folder, so a checkpoint and its training state appear together or not at all.
pub fn save_checkpoint_with(
    dir: &Path,
    trained: &TrainedParams,
    lora: &LoraConfig,
    mut meta: CheckpointMeta,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    files::write_dir_atomic(dir, |tmp| {
        meta.components.clear();
        for c in Component::ALL {
            let params = trained.group(c.group());
            if params.is_empty() {
                continue;
            }
            let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(params.len());
            for p in &params {
                let t = p.var.as_tensor().detach();
                check_finite(&t, c.group(), &p.key)?;
                let key = if c == Component::Lora { format!("{PEFT_PREFIX}{}", p.key) } else { p.key.clone() };
                tensors.push((key, t));
            }
            let mut md = HashMap::new();
            md.insert("format".to_string(), "pt".to_string());
            write_safetensors_atomic(&tmp.join(c.file()), &tensors, Some(md))?;
            meta.components.push(c);
            files::crash_point("checkpoint:partial");
        }
        // A merged export has no adapter (transformers would try to load one it finds).
        if !meta.is_merged() {
            let ac = AdapterConfig::from_lora(lora, &meta.base_model);
            files::write_atomic(&tmp.join(ADAPTER_CONFIG), |f| Ok(serde_json::to_writer_pretty(f, &ac)?))?;
        }
        extra(tmp)?;
        files::write_atomic(&tmp.join(META_FILE), |f| Ok(serde_json::to_writer_pretty(f, &meta)?))
    })
    .with_context(|| format!("writing checkpoint {}", dir.display()))
}

/// The authors' release file of each component they ship, and the key prefixes its tensors
/// carry there (their image_encoder.pth holds the encoder twice: alone and inside `sam`).
pub const AUTHORS_FILES: [(Component, &str, &[&str]); 3] = [
    (Component::ImageEncoder, "image_encoder.pth", &["image_encoder.", "sam.image_encoder."]),
    (Component::MaskDecoder, "mask_decoder.pth", &[""]),
    (Component::Classifier, "cls.pth", &[""]),
];

/// Writes the trained tensors in the authors' release layout (`lora_adapter/` in PEFT's format,
/// `image_encoder.pth`, `mask_decoder.pth`, `cls.pth`) into the folder `dir`, which the caller
/// builds atomically. Their layout has no place for a trained projector: the caller checks.
pub fn save_authors(dir: &Path, trained: &TrainedParams, lora: &LoraConfig, base: &str) -> Result<()> {
    let group = |c: Component| -> Result<Vec<(String, Tensor)>> {
        let params = trained.group(c.group());
        if params.is_empty() {
            bail!("the model has no trained {:?} tensors to export", c);
        }
        params
            .iter()
            .map(|p| {
                let t = p.var.as_tensor().detach();
                check_finite(&t, c.group(), &p.key)?;
                Ok((p.key.clone(), t))
            })
            .collect()
    };
    let adapter_dir = dir.join("lora_adapter");
    std::fs::create_dir_all(&adapter_dir).with_context(|| format!("creating {}", adapter_dir.display()))?;
    let lora_t: Vec<(String, Tensor)> =
        group(Component::Lora)?.into_iter().map(|(k, t)| (format!("{PEFT_PREFIX}{k}"), t)).collect();
    let md: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_safetensors_atomic(&adapter_dir.join(ADAPTER_FILE), &lora_t, Some(md))?;
    let ac = AdapterConfig::from_lora(lora, base);
    files::write_atomic(&adapter_dir.join(ADAPTER_CONFIG), |f| Ok(serde_json::to_writer_pretty(f, &ac)?))?;
    for (c, file, prefixes) in AUTHORS_FILES {
        let tensors = group(c)?;
        let all: Vec<(String, Tensor)> = prefixes
            .iter()
            .flat_map(|pre| tensors.iter().map(move |(k, t)| (format!("{pre}{k}"), t.clone())))
            .collect();
        super::pth::write_pth_atomic(&dir.join(file), &all)?;
    }
    Ok(())
}

fn check_finite(t: &Tensor, group: &str, key: &str) -> Result<()> {
    let s = t.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    if !s.is_finite() {
        bail!("refusing to save non-finite values in {group}/{key}");
    }
    Ok(())
}
