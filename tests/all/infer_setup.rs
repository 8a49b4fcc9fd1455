//! Shared setup of tests/predict.rs and tests/evaluate.rs: the tiny model, a perturbed project
//! checkpoint, the same weights in the authors' release layout, a synthetic dataset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use prs::config::Config;
use prs::model::prs_med::PrsMed;
use prs::pipeline::build::{load_prs_med, LoadOptions, Mode};
use prs::weights::checkpoint::{save_checkpoint, CheckpointMeta};

use crate::common::tiny_model;

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub cfg: Config,
    /// The tiny configuration as a file (what `--config` takes).
    pub config_file: PathBuf,
    pub project: PathBuf,
    pub authors: PathBuf,
}

pub fn opts(mode: Mode, ckpt: Option<&Path>) -> LoadOptions<'_> {
    LoadOptions { device: Device::Cpu, dtype: DType::F32, mode, checkpoint: ckpt, seed: 3 }
}

/// Moves every trained tensor (LoRA B starts at zero), standing in for training.
pub fn perturb(m: &PrsMed) {
    for p in m.trained.weights() {
        let t = p.var.as_tensor();
        let noise = Tensor::randn(0f32, 0.05, t.shape(), t.device()).unwrap();
        p.var.set(&(t + noise).unwrap()).unwrap();
    }
}

/// A project checkpoint of a perturbed model; `extra` goes into its metadata.
pub fn project_checkpoint(cfg: &Config, dir: &Path, extra: Option<serde_json::Value>) -> PrsMed {
    let m = load_prs_med(cfg, &opts(Mode::Train, None)).unwrap();
    perturb(&m);
    let mut meta = CheckpointMeta::new(&cfg.model.base, &cfg.model.tinysam, toml::to_string(&cfg.model).unwrap());
    meta.step = 7;
    if let Some(serde_json::Value::Object(map)) = extra {
        meta.extra.extend(map);
    }
    save_checkpoint(dir, &m.trained, &m.spec.lora, meta).unwrap();
    m
}

/// The authors' release layout (lora_adapter/, image_encoder.pth, mask_decoder.pth, cls.pth)
/// of a perturbed model whose projector stays the base one (their release has none).
pub fn authors_checkpoint(cfg: &Config, rel: &Path) {
    use prs::files::write_atomic;
    use prs::weights::pth::write_pth_atomic;
    use prs::weights::shards::write_safetensors_atomic;
    let mut cfg = cfg.clone();
    cfg.model.trainable.projector = false;
    let m = load_prs_med(&cfg, &opts(Mode::Train, None)).unwrap();
    perturb(&m);
    std::fs::create_dir_all(rel.join("lora_adapter")).unwrap();
    let group = |g: &str| -> Vec<(String, Tensor)> {
        m.trained.group(g).into_iter().map(|p| (p.key.clone(), p.var.as_tensor().detach())).collect()
    };
    let lora: Vec<_> = group("lora").into_iter().map(|(k, t)| (format!("base_model.model.{k}"), t)).collect();
    write_safetensors_atomic(&rel.join("lora_adapter/adapter_model.safetensors"), &lora, None).unwrap();
    let ac = serde_json::json!({"peft_type": "LORA", "r": cfg.model.lora.r, "lora_alpha": cfg.model.lora.alpha,
        "lora_dropout": 0.05, "bias": "none", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]});
    write_atomic(&rel.join("lora_adapter/adapter_config.json"), |f| Ok(serde_json::to_writer(f, &ac)?)).unwrap();
    let enc = group("image_encoder");
    let mut enc_all: Vec<_> = enc.iter().map(|(k, t)| (format!("image_encoder.{k}"), t.clone())).collect();
    enc_all.extend(enc.iter().map(|(k, t)| (format!("sam.image_encoder.{k}"), t.clone())));
    write_pth_atomic(&rel.join("image_encoder.pth"), &enc_all).unwrap();
    write_pth_atomic(&rel.join("mask_decoder.pth"), &group("mask_decoder")).unwrap();
    write_pth_atomic(&rel.join("cls.pth"), &group("classifier")).unwrap();
}

pub fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let config_file = dir.path().join("tiny.toml");
    std::fs::write(&config_file, cfg.to_toml().unwrap()).unwrap();
    let project = dir.path().join("ckpt");
    project_checkpoint(&cfg, &project, None);
    let authors = dir.path().join("release");
    authors_checkpoint(&cfg, &authors);
    Setup { dir, cfg, config_file, project, authors }
}

/// A synthetic dataset in the authors' layout with `test` images per modality (three).
pub fn synth(dir: &Path, test: usize, size: u32) -> PathBuf {
    let out = dir.join("data");
    let cfg = prs::data::synth::SynthConfig { train: 1, val: 0, test, size, seed: 5 };
    prs::data::synth::generate(&out, &cfg, false).unwrap();
    out
}

/// Paths as strings for argument lists.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}
