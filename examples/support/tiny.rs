//! The tiny model for the benchmark examples: random base weights written in the real layouts
//! and an untrained project checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use prs::config::Config;
use prs::pipeline::build::{load_prs_med, LoadOptions, Mode};
use prs::weights::checkpoint::{save_checkpoint, CheckpointMeta};

/// The tiny base model and an (untrained) project checkpoint in `dir`.
pub fn tiny(dir: &Path) -> Result<(Config, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tok = std::env::var("PRS_TOKENIZER_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join(".cache/assets/tokenizer.model.v1"));
    let mut cfg = Config::load(&root.join("configs/tiny.toml"))?;
    cfg.model.base = dir.join("llava").display().to_string();
    cfg.model.tinysam = dir.join("tinysam.pth").display().to_string();
    let init = cfg.init.clone().context("tiny.toml has [init]")?;
    prs::commands::init::write_llava(&dir.join("llava"), &init, &tok, 8 << 20)
        .with_context(|| format!("tokenizer {} (run `make assets`)", tok.display()))?;
    prs::commands::init::write_tinysam(&dir.join("tinysam.pth"), &cfg, init.seed)?;
    let opts = LoadOptions { device: Device::Cpu, dtype: DType::F32, mode: Mode::Train, checkpoint: None, seed: 1 };
    let m = load_prs_med(&cfg, &opts)?;
    let ckpt = dir.join("ckpt");
    let meta = CheckpointMeta::new(&cfg.model.base, &cfg.model.tinysam, toml::to_string(&cfg.model)?);
    save_checkpoint(&ckpt, &m.trained, &m.spec.lora, meta)?;
    Ok((cfg, ckpt))
}
