//! `prs export`: a trained checkpoint (ours or the authors' release) as
//! - a merged model folder: the LoRA folded into the base weights (W + scale * B A in f32,
//!   stored in each tensor's own dtype), in the base's layout (sharded safetensors + index +
//!   config.json + tokenizer files, CLIP tower and projector included, the base's key names),
//!   with the TinySAM, decoder and classifier files of the project format beside it and a
//!   `prs_checkpoint.json` saying `prs-merged`, so `prs predict --checkpoint` loads it as its
//!   own base with no adapter;
//! - the authors' release layout (`lora_adapter/`, `image_encoder.pth`, `mask_decoder.pth`,
//!   `cls.pth`), which their code and ours both read.
//!
//! The output appears complete or not at all (built in a temporary sibling, then renamed), and
//! only where nothing of the user's is: a new or empty folder, or an earlier export of the
//! same kind with `--overwrite`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::build::{load_prs_med, read_llava_config, LoadOptions, Mode};
use super::load::{check_compat, load_tokenizer, resolve_config, ModelArgs};
use crate::config::Config;
use crate::exit::InputError;
use crate::files::{self, Existing};
use crate::model::llava::{CLIP_PREFIX, PROJECTOR_PREFIX};
use crate::model::prs_med::PrsMed;
use crate::weights::checkpoint::{
    save_authors, save_checkpoint_with, CheckpointMeta, Component, TrainedCheckpoint, MERGED_FORMAT,
};
use crate::weights::hub::ModelSource;
use crate::weights::shards::{open_safetensors, write_sharded_planned, PlannedTensor, SafetensorsFiles};

/// What `prs export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// The LoRA merged into a complete model folder (what `--merge-lora` asks for).
    Merged,
    /// The authors' PRS-Med release layout.
    Authors,
}

impl ExportFormat {
    /// The ownership marker of an export folder of this kind (`files::OWNER_MARKER`).
    pub fn kind(self) -> &'static str {
        match self {
            Self::Merged => "prs-export-merged",
            Self::Authors => "prs-export-authors",
        }
    }
}

/// Files of a base model folder besides its weights, copied when the base has them.
const BASE_FILES: [&str; 7] = [
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
];

pub struct ExportOptions<'a> {
    pub checkpoint: &'a Path,
    pub out: &'a Path,
    pub format: ExportFormat,
    pub overwrite: bool,
    /// --base / --config / --tinysam as `prs predict` takes them (the device is always the CPU).
    pub model: ModelArgs,
}

/// A checkpoint loaded with every component in the trained registry (f32), ready to export.
pub struct ForExport {
    pub ckpt: TrainedCheckpoint,
    pub cfg: Config,
    pub model: PrsMed,
}

/// Loads `checkpoint` with TinySAM and the projector in the registry too, so every tensor an
/// export writes is there in f32, whether or not the run trained it. The frozen base is read
/// in its stored dtype (bf16 for LLaVA-Med: about 15 GB of host memory for the 7B model).
pub fn load_for_export(checkpoint: &Path, args: &ModelArgs) -> Result<ForExport> {
    let ckpt = TrainedCheckpoint::open(checkpoint)?;
    if ckpt.is_merged() {
        bail!("{} is already a merged export: export the checkpoint it was made from", checkpoint.display());
    }
    let mut cfg = resolve_config(&ckpt, args)?;
    let source = ModelSource::parse(&cfg.model.base)?;
    let llava = read_llava_config(&source)?;
    check_compat(&ckpt, &cfg.model.base, &llava, &load_tokenizer(&cfg.model.base)?)?;
    let base = open_safetensors(&source, DType::F32, &Device::Cpu)?;
    let dtype = match base.entry("model.embed_tokens.weight").map(|e| e.dtype.as_str()) {
        Some("BF16") => DType::BF16,
        Some("F16") => DType::F16,
        _ => DType::F32,
    };
    cfg.model.trainable.tinysam = true;
    cfg.model.trainable.projector = true;
    let opts = LoadOptions { device: Device::Cpu, dtype, mode: Mode::Train, checkpoint: Some(checkpoint), seed: 0 };
    let model = load_prs_med(&cfg, &opts)
        .with_context(|| format!("loading checkpoint {} on base {}", checkpoint.display(), cfg.model.base))?;
    Ok(ForExport { ckpt, cfg, model })
}

/// Refuses an `--out` that holds anything but an earlier export of this kind (and that too
/// without `--overwrite`).
fn check_out(out: &Path, format: ExportFormat, overwrite: bool) -> Result<()> {
    match files::inspect_output(out, format.kind(), None)? {
        Existing::Absent | Existing::Empty => Ok(()),
        Existing::Ours if overwrite => Ok(()),
        Existing::Ours => {
            bail!(InputError(format!(
                "--out {} holds an earlier export; pass --overwrite to replace it",
                out.display()
            )))
        }
        Existing::Foreign(found) => bail!(InputError(format!(
            "--out {} already exists and was not written by prs export (it holds {}); give a new or empty \
             folder so that nothing of yours is overwritten",
            out.display(),
            found.join(", ")
        ))),
    }
}

/// Writes the export; returns the output folder.
pub fn export(opts: &ExportOptions) -> Result<PathBuf> {
    check_out(opts.out, opts.format, opts.overwrite)?;
    let ForExport { ckpt, cfg, model } = load_for_export(opts.checkpoint, &opts.model)?;
    let kind = opts.format.kind();
    match opts.format {
        ExportFormat::Authors => {
            if let TrainedCheckpoint::Project { meta, .. } = &ckpt {
                if meta.components.contains(&Component::MmProjector) {
                    bail!(
                        "checkpoint {} trained the mm_projector, and the authors' layout has no file for it \
                         (their code keeps the base's projector): use --merge-lora, which writes it into the \
                         model folder",
                        ckpt.dir().display()
                    );
                }
            }
            files::write_dir_atomic(opts.out, |tmp| {
                save_authors(tmp, &model.trained, &model.spec.lora, &cfg.model.base)?;
                files::mark_output(tmp, kind)
            })?;
        }
        ExportFormat::Merged => write_merged(opts.out, &ckpt, &cfg, &model, kind)?,
    }
    Ok(opts.out.to_path_buf())
}

fn write_merged(out: &Path, ckpt: &TrainedCheckpoint, cfg: &Config, model: &PrsMed, kind: &str) -> Result<()> {
    let source = ModelSource::parse(&cfg.model.base)?;
    let base = open_safetensors(&source, DType::F32, &Device::Cpu)?;
    if cfg.model.vision_tower.is_some() || !base.names().any(|n| n.starts_with(CLIP_PREFIX)) {
        bail!(
            "base {} keeps its CLIP tower outside its weights (model.vision_tower / mm_vision_tower); a merged \
             export copies the base's own files, so it needs the tower inside them under `{CLIP_PREFIX}`",
            source.describe()
        );
    }
    let replaced = replacements(model, &base)?;
    let plan: Vec<PlannedTensor> = base
        .names()
        .map(|n| {
            let e = base.entry(n).expect("listed");
            Ok(PlannedTensor { name: n.to_string(), dims: e.shape.clone(), dtype: st_dtype(&e.dtype, n)? })
        })
        .collect::<Result<_>>()?;
    // Shards no larger than the base's largest, so the split matches the base's.
    let max_shard = match base.index {
        Some(_) => base.files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).max().unwrap_or(u64::MAX),
        None => u64::MAX,
    };
    let scale = model.spec.lora.scale();
    let fetch = |i: usize| -> Result<Tensor> {
        let p = &plan[i];
        let t = match replaced.get(&p.name) {
            // In f32: W + scale * B A.
            Some(New::Lora { a, b }) => {
                let w = base.vb.get_unchecked_dtype(&p.name, DType::F32)?;
                crate::nn::linear::lora_merged(&w, a.as_tensor(), b.as_tensor(), scale)?
            }
            Some(New::Trained(v)) => v.as_tensor().clone(),
            None => base.vb.get_unchecked_dtype(&p.name, DType::F32)?,
        };
        Ok(t.to_dtype(p.dtype)?)
    };

    let trained = model.trained.only(&[
        Component::ImageEncoder.group(),
        Component::MaskDecoder.group(),
        Component::Classifier.group(),
    ]);
    let mut meta = CheckpointMeta::new(&cfg.model.base, &cfg.model.tinysam, toml::to_string(&cfg.model)?);
    meta.format = MERGED_FORMAT.into();
    if let TrainedCheckpoint::Project { meta: m, .. } = ckpt {
        meta.step = m.step;
        meta.extra = m.extra.clone();
    }
    meta.extra.insert("prompt_template".into(), cfg.prompt.template.clone().into());
    meta.extra.insert("merged_from".into(), ckpt.dir().display().to_string().into());
    save_checkpoint_with(out, &trained, &model.spec.lora, meta, |tmp| {
        write_sharded_planned(tmp, &plan, max_shard, fetch)?;
        for f in BASE_FILES.iter().filter(|f| source.has(f)) {
            let from = source.file(f)?;
            std::fs::copy(&from, tmp.join(f)).with_context(|| format!("copying {}", from.display()))?;
        }
        files::mark_output(tmp, kind)
    })
}

/// Where a base tensor's new value comes from.
enum New {
    Lora { a: Var, b: Var },
    Trained(Var),
}

/// The base tensors a merged export changes: every LoRA-adapted projection, and the projector
/// (the checkpoint's when it trained one, else the base's own, unchanged).
fn replacements(model: &PrsMed, base: &SafetensorsFiles) -> Result<HashMap<String, New>> {
    let mut out = HashMap::new();
    let reg = &model.trained;
    for p in reg.group(Component::Lora.group()) {
        let Some(stem) = p.key.strip_suffix(".lora_A.weight") else { continue };
        let b = reg
            .get(Component::Lora.group(), &format!("{stem}.lora_B.weight"))
            .with_context(|| format!("the adapter has {} but no {stem}.lora_B.weight", p.key))?;
        out.insert(format!("{stem}.weight"), New::Lora { a: p.var.clone(), b });
    }
    for p in reg.group(Component::MmProjector.group()) {
        out.insert(format!("{PROJECTOR_PREFIX}.{}", p.key), New::Trained(p.var.clone()));
    }
    if let Some(missing) = out.keys().find(|k| base.entry(k).is_none()) {
        bail!("the base model has no tensor `{missing}` for the trained weights to go into ({})", base.describe());
    }
    Ok(out)
}

fn st_dtype(name: &str, tensor: &str) -> Result<DType> {
    Ok(match name {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F64" => DType::F64,
        other => bail!("base tensor `{tensor}` is stored as {other}, which a merged export does not write"),
    })
}
