//! Building PRS-Med from a configuration: base LLaVA-Med weights (folder or hub), TinySAM
//! weights, and optionally a trained checkpoint (ours or the authors' release).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::config::Config;
use crate::model::decoder::DecoderConfig;
use crate::model::llava::{CLIP_PREFIX, PROJECTOR_PREFIX};
use crate::model::prs_med::{Builders, LlavaMedConfig, PrsMed, PrsMedSpec};
use crate::nn::param::{ParamBuilder, TrainedParams};
use crate::weights::checkpoint::{Component, TrainedCheckpoint};
use crate::weights::hub::ModelSource;
use crate::weights::pth::open_pth;
use crate::weights::shards::{open_safetensors, open_safetensors_paths};

/// Whether trained parts become f32 `Var`s (training) or frozen compute-dtype tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Infer,
}

pub struct LoadOptions<'a> {
    pub device: Device,
    pub dtype: DType,
    pub mode: Mode,
    /// A trained checkpoint folder to start from.
    pub checkpoint: Option<&'a Path>,
    /// Seed of fresh (untrained) components.
    pub seed: u64,
}

/// Reads and checks LLaVA-Med's `config.json` from a model source.
pub fn read_llava_config(source: &ModelSource) -> Result<LlavaMedConfig> {
    let path = source.file("config.json")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: LlavaMedConfig = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    cfg.validate().with_context(|| format!("in {}", path.display()))?;
    Ok(cfg)
}

/// The architecture this configuration describes, given the base model's config.json.
pub fn spec_from(cfg: &Config, llava: &LlavaMedConfig, lora: &crate::nn::linear::LoraConfig) -> Result<PrsMedSpec> {
    let m = &cfg.model;
    // Before any weight is read (memory estimates use the spec too).
    lora.check(&crate::model::mistral::LORA_TARGETS)?;
    let mut tinysam = m.tinysam_arch.clone();
    tinysam.img_size = m.sam_image_size;
    // Four stages (the released TinySAM) downsample 16x; three stages 8x (a finer mask grid).
    let stride = tinysam.total_stride();
    if !m.sam_image_size.is_multiple_of(stride) {
        bail!("model.sam_image_size {} must be a multiple of TinySAM's total stride {stride}", m.sam_image_size);
    }
    let d = &m.decoder;
    let decoder = DecoderConfig {
        llm_hidden: llava.llm.hidden_size,
        prompt_hidden: d.prompt_hidden,
        dim: tinysam.out_chans,
        cross_heads: d.cross_heads,
        self_heads: d.self_heads,
        ffn_dim: d.ffn_dim,
        dropout: d.dropout,
        grid: m.sam_image_size / stride,
        upsample: stride,
        num_classes: m.num_modalities,
    };
    Ok(PrsMedSpec {
        llava: llava.clone(),
        lora: lora.clone(),
        tinysam,
        decoder,
        num_modalities: m.num_modalities,
        mask_precision: m.mask_precision,
    })
}

/// Resolves the TinySAM weights spec: a local `.pth`/`.safetensors` file, or `repo_id:file`.
pub fn tinysam_file(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    if let Some((repo, file)) = spec.rsplit_once(':') {
        if repo.contains('/') && !repo.starts_with('/') && !repo.starts_with('.') {
            return ModelSource::parse(repo)?.file(file);
        }
    }
    bail!("TinySAM weights `{spec}` not found (a .pth/.safetensors path, or `repo_id:file` on the hub)")
}

fn open_tinysam(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let vb = match path.extension().and_then(|e| e.to_str()) {
        Some("pth") | Some("pt") => open_pth(path, dtype, device)?,
        Some("safetensors") => open_safetensors_paths(&[path.to_path_buf()], dtype, device)?.vb,
        _ => bail!("{}: TinySAM weights must be .pth or .safetensors", path.display()),
    };
    Ok(vb.pp("image_encoder"))
}

/// Where the CLIP tower's weights come from (a VarBuilder rooted at `vision_model`).
fn clip_source(
    cfg: &Config,
    llava: &LlavaMedConfig,
    base: &VarBuilder<'static>,
    base_what: &str,
    dtype: DType,
    dev: &Device,
) -> Result<(VarBuilder<'static>, String)> {
    let separate = |spec: &str| -> Result<(VarBuilder<'static>, String)> {
        let src = ModelSource::parse(spec)?;
        let st = open_safetensors(&src, dtype, dev).with_context(|| format!("opening the CLIP tower {spec}"))?;
        Ok((st.vb.pp("vision_model"), src.describe()))
    };
    if let Some(spec) = &cfg.model.vision_tower {
        return separate(spec);
    }
    if base.contains_tensor(&format!("{CLIP_PREFIX}.embeddings.class_embedding")) {
        return Ok((base.pp(CLIP_PREFIX), base_what.to_string()));
    }
    separate(&llava.mm_vision_tower).with_context(|| {
        format!("{base_what} has no CLIP tower under `{CLIP_PREFIX}`; tried its mm_vision_tower instead")
    })
}

/// Builds the whole model.
pub fn load_prs_med(cfg: &Config, opts: &LoadOptions) -> Result<PrsMed> {
    let (dev, dtype) = (&opts.device, opts.dtype);
    let train = opts.mode == Mode::Train;
    let reg = TrainedParams::new();
    let ckpt = opts.checkpoint.map(TrainedCheckpoint::open).transpose()?;

    let source = ModelSource::parse(&cfg.model.base)?;
    let llava_cfg = read_llava_config(&source)?;
    let base = open_safetensors(&source, dtype, dev)?;
    let what = source.describe();
    let (clip_vb, clip_what) = clip_source(cfg, &llava_cfg, &base.vb, &what, dtype, dev)?;
    let frozen = |vb: VarBuilder<'static>, what: &str, group: &str| {
        ParamBuilder::from_checkpoint(vb, what, group, false, dtype, &reg)
    };

    // LoRA: from the checkpoint's adapter, else fresh (PEFT init) with the config's settings.
    let (lora_cfg, lora) = match &ckpt {
        Some(c) => {
            let (lcfg, src) = c.adapter(dtype, dev)?;
            (lcfg, ParamBuilder::from_checkpoint(src.vb, src.what, "lora", train, dtype, &reg))
        }
        None => (cfg.model.lora.clone(), ParamBuilder::fresh(opts.seed, "lora", train, dtype, dev, &reg)),
    };
    let spec = spec_from(cfg, &llava_cfg, &lora_cfg)?;

    // A trainable component: the checkpoint's copy when it has one, else `fallback`.
    let component =
        |c: Component, trains: bool, fallback: Option<(VarBuilder<'static>, String)>| -> Result<ParamBuilder> {
            let from_ckpt = match &ckpt {
                Some(k) => k.component(c, dtype, dev)?,
                None => None,
            };
            let t = train && trains;
            Ok(match (from_ckpt, fallback) {
                (Some(s), _) => ParamBuilder::from_checkpoint(s.vb, s.what, c.group(), t, dtype, &reg),
                (None, Some((vb, what))) => ParamBuilder::from_checkpoint(vb, what, c.group(), t, dtype, &reg),
                (None, None) => {
                    if !train && ckpt.is_some() {
                        bail!("checkpoint {} has no {:?} weights", opts.checkpoint.unwrap().display(), c);
                    }
                    ParamBuilder::fresh(opts.seed, c.group(), t, dtype, dev, &reg)
                }
            })
        };

    let tinysam_path = tinysam_file(&cfg.model.tinysam)?;
    let tinysam_vb = open_tinysam(&tinysam_path, dtype, dev)?;
    let tp = &cfg.model.trainable;
    let builders = Builders {
        // Only the LLM's projections are quantised (`Linear::new` reads them with `get_linear`);
        // CLIP, the projector and everything trained keep the compute dtype.
        llava: frozen(base.vb.clone(), &what, "llm").with_quant(cfg.model.base_quant),
        clip: frozen(clip_vb, &clip_what, "clip"),
        lora,
        projector: component(Component::MmProjector, tp.projector, Some((base.vb.pp(PROJECTOR_PREFIX), what.clone())))?,
        tinysam: component(
            Component::ImageEncoder,
            tp.tinysam,
            Some((tinysam_vb, tinysam_path.display().to_string())),
        )?,
        decoder: component(Component::MaskDecoder, true, None)?,
        classifier: component(Component::Classifier, true, None)?,
    };
    PrsMed::new(&builders, &spec)
}
