//! PRS-Med with random weights and no files: every part comes from `ParamBuilder::fresh`, frozen
//! parts frozen and trained parts trained as in `load_prs_med`. Memory profiling and benchmarks
//! need only the shapes, so the 7B can be swept without a download.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use super::build::{read_llava_config, spec_from, Mode};
use crate::config::{BaseQuant, Config, InitSection};
use crate::model::clip::ClipVisionConfig;
use crate::model::mistral::MistralConfig;
use crate::model::prs_med::{Builders, LlavaMedConfig, PrsMed, PrsMedSpec};
use crate::nn::param::{ParamBuilder, TrainedParams};
use crate::weights::hub::ModelSource;

/// The hub id of LLaVA-Med v1.5 (Mistral-7B + CLIP ViT-L/14-336).
pub const LLAVA_MED_7B: &str = "microsoft/llava-med-v1.5-mistral-7b";
const CLIP_L_336: &str = "openai/clip-vit-large-patch14-336";

pub struct RandomOptions {
    pub device: Device,
    pub dtype: DType,
    pub mode: Mode,
    pub seed: u64,
    /// Whether TinySAM / the projector train (config `model.trainable`); LoRA, the decoder and
    /// the classifier always train in `Mode::Train`.
    pub train_tinysam: bool,
    pub train_projector: bool,
    /// Storage of the frozen LLM projections (config `model.base_quant`).
    pub base_quant: BaseQuant,
}

impl RandomOptions {
    pub fn from_config(cfg: &Config, device: Device, dtype: DType, mode: Mode, seed: u64) -> Self {
        let t = &cfg.model.trainable;
        let (train_tinysam, train_projector) = (t.tinysam, t.projector);
        Self { device, dtype, mode, seed, train_tinysam, train_projector, base_quant: cfg.model.base_quant }
    }
}

/// The LLaVA-Med config of the random base model an `[init]` section describes (what `prs init`
/// writes as config.json), with `vision_tower` as its CLIP name.
pub fn llava_config_from_init(init: &InitSection, vision_tower: &str) -> LlavaMedConfig {
    LlavaMedConfig {
        llm: init.llm.clone(),
        mm_vision_tower: vision_tower.into(),
        mm_hidden_size: init.vision.hidden_size,
        mm_projector_type: "mlp2x_gelu".into(),
        mm_vision_select_layer: -2,
        mm_vision_select_feature: "patch".into(),
        image_aspect_ratio: "pad".into(),
        mm_vision_config: Some(init.vision.clone()),
    }
}

/// LLaVA-Med's config for a base model, without reading any weights: the `[init]` section of a
/// tiny config, the built-in LLaVA-Med v1.5 7B (Mistral-7B + CLIP ViT-L/14-336) for its hub id,
/// else the `config.json` of a local base folder.
pub fn llava_config_for(cfg: &Config) -> Result<LlavaMedConfig> {
    let llava = if let Some(init) = &cfg.init {
        llava_config_from_init(init, CLIP_L_336)
    } else if cfg.model.base.trim_end_matches('/') == LLAVA_MED_7B {
        LlavaMedConfig {
            llm: MistralConfig::mistral_7b(),
            mm_vision_tower: CLIP_L_336.into(),
            mm_hidden_size: ClipVisionConfig::default().hidden_size,
            mm_projector_type: "mlp2x_gelu".into(),
            mm_vision_select_layer: -2,
            mm_vision_select_feature: "patch".into(),
            image_aspect_ratio: "pad".into(),
            mm_vision_config: None,
        }
    } else if std::path::Path::new(&cfg.model.base).join("config.json").is_file() {
        read_llava_config(&ModelSource::parse(&cfg.model.base)?)?
    } else {
        bail!(
            "cannot tell the architecture of base `{}` without files: use `{LLAVA_MED_7B}`, a local \
             folder with config.json, or a config with an [init] section",
            cfg.model.base
        )
    };
    llava.validate()?;
    Ok(llava)
}

/// The architecture of a configuration, from the config alone (see [`llava_config_for`]).
pub fn spec_for_config(cfg: &Config) -> Result<PrsMedSpec> {
    spec_from(cfg, &llava_config_for(cfg)?, &cfg.model.lora)
}

/// The whole model with random weights (fresh initialisation of every tensor).
pub fn random_prs_med(spec: &PrsMedSpec, opts: &RandomOptions) -> Result<PrsMed> {
    let (dev, dtype, seed) = (&opts.device, opts.dtype, opts.seed);
    let train = opts.mode == Mode::Train;
    let reg = TrainedParams::new();
    // Distinct seeds per part so that no two parts share random streams.
    let fresh = |k: u64, group: &str, t: bool| ParamBuilder::fresh(seed.wrapping_add(k), group, t, dtype, dev, &reg);
    // The frozen LLM and CLIP (99% of a 7B model) come from the device RNG: the host RNG would
    // take minutes per build. Trained parts stay seeded.
    let frozen = |group: &str| ParamBuilder::device_random(group, false, dtype, dev, &reg);
    let builders = Builders {
        llava: frozen("llm").with_quant(opts.base_quant),
        clip: frozen("clip"),
        lora: fresh(2, "lora", train),
        projector: fresh(3, "mm_projector", train && opts.train_projector),
        tinysam: fresh(4, "image_encoder", train && opts.train_tinysam),
        decoder: fresh(5, "mask_decoder", train),
        classifier: fresh(6, "classifier", train),
    };
    PrsMed::new(&builders, spec)
}
