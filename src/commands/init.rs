//! `prs init`: random base weights in the real layouts, so every loader runs exactly as it does
//! with LLaVA-Med and TinySAM: a LLaVA-Med-style folder (config.json, sharded safetensors +
//! index, tokenizer.model) and a TinySAM `.pth` state dict under `image_encoder.*`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::config::{Config, InitSection};
use crate::files::{self, write_atomic};
use crate::model::clip::ClipVisionTower;
use crate::model::llava::Projector;
use crate::model::llava::{CLIP_PREFIX, PROJECTOR_PREFIX};
use crate::model::mistral::Mistral;
use crate::model::tinysam::TinySam;
use crate::nn::param::{init_tensor, seed_for, Init, ParamBuilder, TrainedParams};
use crate::pipeline::random::llava_config_from_init;
use crate::weights::pth::write_pth_atomic;
use crate::weights::shards::write_sharded;

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Configuration with an `[init]` section (e.g. configs/tiny.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder; defaults to the folder named by `model.base` in the config.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// SentencePiece tokenizer.model to ship with the model (Mistral v1's).
    #[arg(long, env = "PRS_TOKENIZER_MODEL", default_value = ".cache/assets/tokenizer.model.v1")]
    pub tokenizer: PathBuf,
    /// Largest shard in bytes (small by default so the index path is exercised).
    #[arg(long, default_value_t = 8 << 20)]
    pub max_shard_bytes: u64,
}

/// The ownership marker of a folder of random base weights (`files::OWNER_MARKER`).
pub const RANDOM_BASE_KIND: &str = "random-base";

pub fn run(args: &InitArgs) -> Result<()> {
    let cfg = Config::load(&args.config)?;
    let init = cfg.init.as_ref().with_context(|| format!("{} has no [init] section", args.config.display()))?;
    let llava_dir = args.out.clone().unwrap_or_else(|| PathBuf::from(&cfg.model.base));
    let tinysam_path = match &args.out {
        Some(o) => o.join("tinysam.pth"),
        None => PathBuf::from(&cfg.model.tinysam),
    };
    // Random weights must never land on a real model: the folder is new, empty or an earlier
    // `prs init` output, and a TinySAM file outside it is replaced only on such a re-run.
    let rerun = files::inspect_output(&llava_dir, RANDOM_BASE_KIND, None)? == files::Existing::Ours;
    if tinysam_path.exists() && !rerun {
        bail!(
            "{} exists and prs init did not write it: init writes random weights, so it refuses to replace \
             it; pass --out NEW_FOLDER",
            tinysam_path.display()
        );
    }
    files::claim_output_root(&llava_dir, RANDOM_BASE_KIND, "the base model folder")?;
    write_llava(&llava_dir, init, &args.tokenizer, args.max_shard_bytes)?;
    write_tinysam(&tinysam_path, &cfg, init.seed)?;
    println!("wrote base model {} and TinySAM weights {}", llava_dir.display(), tinysam_path.display());
    Ok(())
}

/// Every registered tensor, with ≥2-D weights redrawn from N(0, std) (see `InitSection`).
fn collect(reg: &TrainedParams, prefix: &str, std: Option<f64>, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut out = vec![];
    for p in reg.all() {
        let key = if prefix.is_empty() { p.key.clone() } else { format!("{prefix}.{}", p.key) };
        let t = p.var.as_tensor().clone();
        let t = match std {
            Some(s) if t.rank() >= 2 => {
                init_tensor(t.shape(), Init::Normal(s), seed_for(seed, &key), DType::F32, &Device::Cpu)?
            }
            _ => t,
        };
        out.push((key, t));
    }
    Ok(out)
}

/// Redraws the tensors whose key and shape `pick` selects from N(0, std).
fn redraw(tensors: &mut [(String, Tensor)], pick: impl Fn(&str, &Tensor) -> bool, std: f64, seed: u64) -> Result<()> {
    for (key, t) in tensors.iter_mut().filter(|(k, t)| pick(k, t)) {
        *t = init_tensor(t.shape(), Init::Normal(std), seed_for(seed, key), DType::F32, &Device::Cpu)?;
    }
    Ok(())
}

pub fn write_llava(dir: &Path, init: &InitSection, tokenizer: &Path, max_shard_bytes: u64) -> Result<()> {
    if !tokenizer.exists() {
        bail!("tokenizer {} not found (run `make assets`, or pass --tokenizer)", tokenizer.display());
    }
    let dev = Device::Cpu;
    let llava = llava_config_from_init(init, "prs-init/random-clip");
    llava.validate()?;
    // Build each part with trainable fresh builders: the registry then lists every tensor
    // under its checkpoint key.
    let fresh = |group: &str, reg: &TrainedParams| ParamBuilder::fresh(init.seed, group, true, DType::F32, &dev, reg);
    let (r_llm, r_clip, r_proj) = (TrainedParams::new(), TrainedParams::new(), TrainedParams::new());
    Mistral::new(&fresh("llm", &r_llm), &init.llm, None)?;
    ClipVisionTower::new(&fresh("clip", &r_clip), &init.vision, -1)?;
    Projector::new(&fresh("proj", &r_proj), init.vision.hidden_size, init.llm.hidden_size, "mlp2x_gelu")?;
    let mut tensors = collect(&r_llm, "", Some(init.weight_std), init.seed)?;
    if let Some(std) = init.llm_layer_std {
        redraw(&mut tensors, |k, t| k.starts_with("model.layers.") && t.rank() >= 2, std, init.seed)?;
    }
    let mut clip = collect(&r_clip, CLIP_PREFIX, None, init.seed)?;
    if let Some(std) = init.vision_position_std {
        redraw(&mut clip, |k, _| k.ends_with("position_embedding.weight"), std, init.seed)?;
    }
    tensors.extend(clip);
    tensors.extend(collect(&r_proj, PROJECTOR_PREFIX, Some(init.weight_std), init.seed)?);

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_sharded(dir, &tensors, max_shard_bytes, DType::F32)?;
    let mut cfg_json = serde_json::to_value(&llava)?;
    cfg_json["architectures"] = serde_json::json!(["LlavaMistralForCausalLM"]);
    cfg_json["model_type"] = serde_json::json!("llava_mistral");
    cfg_json["torch_dtype"] = serde_json::json!("float32");
    write_atomic(&dir.join("config.json"), |f| Ok(serde_json::to_writer_pretty(f, &cfg_json)?))?;
    let tok_cfg = serde_json::json!({
        "add_bos_token": true, "add_eos_token": false, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "legacy": true, "tokenizer_class": "LlamaTokenizer"
    });
    write_atomic(&dir.join("tokenizer_config.json"), |f| Ok(serde_json::to_writer_pretty(f, &tok_cfg)?))?;
    let bytes = std::fs::read(tokenizer).with_context(|| format!("reading {}", tokenizer.display()))?;
    write_atomic(&dir.join("tokenizer.model"), |f| Ok(std::io::Write::write_all(f, &bytes)?))?;
    Ok(())
}

pub fn write_tinysam(path: &Path, cfg: &Config, seed: u64) -> Result<()> {
    let mut arch = cfg.model.tinysam_arch.clone();
    arch.img_size = cfg.model.sam_image_size;
    let reg = TrainedParams::new();
    TinySam::new(&ParamBuilder::fresh(seed, "image_encoder", true, DType::F32, &Device::Cpu, &reg), &arch)?;
    let tensors = collect(&reg, "image_encoder", None, seed)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    write_pth_atomic(path, &tensors)
}
