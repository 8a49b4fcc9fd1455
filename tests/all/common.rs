//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::PathBuf;

use candle_core::{backprop::GradStore, DType, Device, Tensor};
use prs::nn::param::TrainedParams;

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// max |a - b| / max |b|: the relative error of `a` against the reference `b`.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
    let b = b.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
    let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12);
    diff / scale
}

/// Asserts the gradient store holds exactly the optimised trained tensors, each finite and
/// non-zero (nothing for frozen weights, constants or intermediates).
pub fn assert_grads_exactly_trained(grads: &GradStore, trained: &TrainedParams) {
    assert_grads_exactly_trained_except(grads, trained, |_| false)
}

/// As above; `zero_by_design(key)` names tensors whose gradient is mathematically zero (they
/// must still have a store entry, finite).
pub fn assert_grads_exactly_trained_except(
    grads: &GradStore,
    trained: &TrainedParams,
    zero_by_design: impl Fn(&str) -> bool,
) {
    let weights = trained.weights();
    let ids: HashSet<_> = weights.iter().map(|p| p.var.as_tensor().id()).collect();
    for p in &weights {
        let g = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {}/{}", p.group, p.key));
        let g = g.to_dtype(DType::F32).unwrap();
        let abs = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(abs.is_finite(), "non-finite gradient for {}/{}", p.group, p.key);
        if !zero_by_design(&p.key) {
            assert!(abs > 0.0, "zero gradient for {}/{}", p.group, p.key);
        }
    }
    let extra: Vec<_> = grads.get_ids().filter(|id| !ids.contains(id)).collect();
    for id in &extra {
        eprintln!("dead gradient of shape {:?}", grads.get_id(**id).unwrap().dims());
    }
    assert!(extra.is_empty(), "{} gradient(s) for tensors that are not trained (dead gradients)", extra.len());
}

/// Mistral v1's tokenizer.model (`make assets` downloads it; `make test` sets the variable).
pub fn tokenizer_model() -> PathBuf {
    if let Ok(p) = std::env::var("PRS_TOKENIZER_MODEL") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/assets/tokenizer.model.v1");
    assert!(p.exists(), "{} is missing: run `make assets` (or `make test`)", p.display());
    p
}

/// The tiny configuration with its base weights written by `prs init` into `dir`.
pub fn tiny_model(dir: &std::path::Path) -> prs::config::Config {
    let mut cfg =
        prs::config::Config::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml")).unwrap();
    cfg.model.base = dir.join("llava").display().to_string();
    cfg.model.tinysam = dir.join("tinysam.pth").display().to_string();
    let init = cfg.init.clone().unwrap();
    prs::commands::init::write_llava(&dir.join("llava"), &init, &tokenizer_model(), 1 << 20).unwrap();
    prs::commands::init::write_tinysam(&dir.join("tinysam.pth"), &cfg, init.seed).unwrap();
    cfg
}

/// The reference greedy decoder the tests hold `pipeline::generate` against: one sample, no
/// batching, no padding, the plainest KV-cached loop (stops at EOS or after `max_new_tokens`).
pub fn greedy_reference(
    m: &prs::model::prs_med::PrsMed,
    batch: &prs::model::prs_med::ModelBatch,
    max_new_tokens: usize,
) -> anyhow::Result<(Tensor, Vec<u32>)> {
    use prs::model::mistral::KvCache;
    anyhow::ensure!(batch.prompts.len() == 1, "greedy_reference takes one sample");
    let dev = m.device().clone();
    let image = m.encode_image(&batch.clip_pixels)?;
    let inp = m.llm_inputs(&batch.prompts, &image, false)?;
    let mut cache = KvCache::new(m.llm.config().num_hidden_layers);
    let hidden = m.llm.forward_embeds(&inp.embeds, None, &inp.position_ids, Some(&mut cache))?;
    let feats = m.tinysam.forward(&batch.sam_pixels.to_dtype(m.mask_dtype())?)?;
    let mask_logits = m.decoder.forward(&feats, &hidden, &inp.prompt_valid)?;
    let mut answer = vec![];
    let mut logits = m.llm.last_logits(&hidden)?;
    let mut pos = hidden.dim(1)? as u32;
    for _ in 0..max_new_tokens {
        let next = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?[0];
        if next == prs::tokenizer::EOS_ID {
            break;
        }
        answer.push(next);
        let e = m.llm.embed(&Tensor::new(&[[next]], &dev)?)?;
        let h = m.llm.forward_embeds(&e, None, &Tensor::new(&[[pos]], &dev)?, Some(&mut cache))?;
        logits = m.llm.last_logits(&h)?;
        pos += 1;
    }
    Ok((mask_logits, answer))
}
