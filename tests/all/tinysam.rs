//! TinySAM image encoder against mobile_sam's TinyViT (scripts/fixtures/gen_tinysam.py): eval and
//! train-mode parity from safetensors and from the `.pth`, BatchNorm running statistics, gradients,
//! freezing, key errors, and the real TinyViT-5M shapes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use prs::model::tinysam::{KeepRunningStats, TinySam, TinySamConfig};
use prs::nn::ops::TrainingMode;
use prs::nn::param::{ParamBuilder, ParamKind, TrainedParams};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tinysam").join(name)
}

fn config() -> TinySamConfig {
    serde_json::from_str(&std::fs::read_to_string(fixture("config.json")).unwrap()).unwrap()
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap()
}

/// max |a - b| / max |b|: the relative error of `a` against the reference `b`.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12);
    diff / scale
}

fn safetensors_vb() -> VarBuilder<'static> {
    unsafe { VarBuilder::from_mmaped_safetensors(&[fixture("image_encoder.safetensors")], DType::F32, &Device::Cpu) }
        .unwrap()
        .pp("image_encoder")
}

fn build(vb: VarBuilder<'static>, train: bool, reg: &TrainedParams) -> Result<TinySam> {
    let pb = ParamBuilder::from_checkpoint(vb, "tinysam fixture", "image_encoder", train, DType::F32, reg);
    TinySam::new(&pb, &config())
}

#[test]
fn eval_parity_safetensors_frozen_and_trainable() {
    let exp = expected();
    for train in [false, true] {
        let reg = TrainedParams::new();
        let model = build(safetensors_vb(), train, &reg).unwrap();
        let out = model.forward(&exp["input"]).unwrap();
        let err = rel_err(&out, &exp["eval_out"]);
        println!("eval parity (safetensors, train={train}): max rel err {err:.3e}");
        assert!(err <= 1e-4, "eval output differs from PyTorch: {err}");
    }
}

#[test]
fn eval_parity_pth() {
    let exp = expected();
    let vb = VarBuilder::from_pth(fixture("image_encoder.pth"), DType::F32, &Device::Cpu).unwrap().pp("image_encoder");
    let model = build(vb, false, &TrainedParams::new()).unwrap();
    let out = model.forward(&exp["input"]).unwrap();
    let err = rel_err(&out, &exp["eval_out"]);
    println!("eval parity (.pth): max rel err {err:.3e}");
    assert!(err <= 1e-4, "eval output differs from PyTorch: {err}");
}

#[test]
fn train_mode_parity_running_stats_and_gradients() {
    let exp = expected();
    let reg = TrainedParams::new();
    let model = build(safetensors_vb(), true, &reg).unwrap();
    let out = {
        let _t = TrainingMode::enter(1);
        model.forward(&exp["input"]).unwrap()
    };
    let err = rel_err(&out, &exp["train_out"]);
    println!("train-mode parity: max rel err {err:.3e}");
    assert!(err <= 1e-4, "train-mode output differs from PyTorch: {err}");

    // Running statistics: one momentum step with the unbiased batch variance, every BatchNorm.
    let buffers: Vec<_> = reg.all().into_iter().filter(|p| p.kind == ParamKind::Buffer).collect();
    let n_ref = exp.keys().filter(|k| k.starts_with("running.")).count();
    assert_eq!(buffers.len(), n_ref, "every BatchNorm running statistic is a registered buffer");
    let mut worst = 0f32;
    for p in &buffers {
        let want = &exp[&format!("running.image_encoder.{}", p.key)];
        worst = worst.max(rel_err(p.var.as_tensor(), want));
    }
    println!("running stats after one train step: max rel err {worst:.3e} over {} buffers", buffers.len());
    assert!(worst <= 1e-4, "running statistics differ from PyTorch: {worst}");

    // Gradients of sum(out * probe), compared with PyTorch for a few tensors; every weight gets
    // a finite non-zero gradient and buffers get none.
    let grads = prs::nn::mul_const(&out, &exp["probe"]).unwrap().sum_all().unwrap().backward().unwrap();
    for (k, want) in exp.iter().filter(|(k, _)| k.starts_with("grad.image_encoder.")) {
        let key = k.trim_start_matches("grad.image_encoder.");
        let var = reg.get("image_encoder", key).unwrap_or_else(|| panic!("{key} not registered"));
        let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {key}"));
        let e = rel_err(got, want);
        println!("grad {key}: max rel err {e:.3e}");
        assert!(e <= 1e-3, "gradient of {key} differs from PyTorch: {e}");
    }
    let weights = reg.weights();
    let ids: HashSet<_> = weights.iter().map(|p| p.var.as_tensor().id()).collect();
    for p in &weights {
        let g = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {}", p.key));
        let s = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s.is_finite() && s > 0.0, "gradient of {} is {s}", p.key);
    }
    for p in &buffers {
        assert!(grads.get(p.var.as_tensor()).is_none(), "buffer {} got a gradient", p.key);
    }
    let extra: Vec<_> =
        grads.get_ids().filter(|id| !ids.contains(id)).map(|id| grads.get_id(*id).unwrap().dims().to_vec()).collect();
    println!("{} weights with gradients, {} other gradient entries: {:?}", weights.len(), extra.len(), extra);
    assert!(extra.is_empty(), "dead gradients stored for {} non-trained tensors", extra.len());
}

#[test]
fn keep_running_stats_guard_normalises_identically_without_updating() {
    let exp = expected();
    let reg = TrainedParams::new();
    let model = build(safetensors_vb(), true, &reg).unwrap();
    let before: Vec<Tensor> = reg
        .group("image_encoder")
        .iter()
        .filter(|p| p.kind == ParamKind::Buffer)
        .map(|p| p.var.as_tensor().copy().unwrap())
        .collect();
    let out = {
        let _t = TrainingMode::enter(1);
        let _k = KeepRunningStats::enter();
        model.forward(&exp["input"]).unwrap()
    };
    assert!(rel_err(&out, &exp["train_out"]) <= 1e-4);
    let after: Vec<Tensor> =
        reg.all().iter().filter(|p| p.kind == ParamKind::Buffer).map(|p| p.var.as_tensor().clone()).collect();
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(rel_err(a, b), 0.0, "running statistics changed under KeepRunningStats");
    }
}

#[test]
fn frozen_encoder_registers_nothing_and_uses_running_stats_in_training() {
    let exp = expected();
    let reg = TrainedParams::new();
    let model = build(safetensors_vb(), false, &reg).unwrap();
    assert!(reg.all().is_empty(), "a frozen encoder registers no tensors");
    let out = {
        let _t = TrainingMode::enter(1);
        model.forward(&exp["input"]).unwrap()
    };
    assert!(!out.track_op(), "frozen encoder output is not tracked");
    let err = rel_err(&out, &exp["eval_out"]);
    assert!(err <= 1e-4, "frozen BatchNorm must use running statistics: {err}");
}

fn tensors_with(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> VarBuilder<'static> {
    let mut ts = candle_core::safetensors::load(fixture("image_encoder.safetensors"), &Device::Cpu).unwrap();
    edit(&mut ts);
    VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu).pp("image_encoder")
}

#[test]
fn missing_and_misshaped_keys_are_named() {
    let key = "image_encoder.layers.1.blocks.0.attn.qkv.weight";
    let vb = tensors_with(|ts| {
        ts.remove(key);
    });
    let err = format!("{:#}", build(vb, false, &TrainedParams::new()).unwrap_err());
    println!("{err}");
    assert!(err.contains("missing") && err.contains(key), "{err}");

    let key = "image_encoder.layers.2.blocks.1.local_conv.bn.running_var";
    let vb = tensors_with(|ts| {
        ts.insert(key.to_string(), Tensor::ones(7, DType::F32, &Device::Cpu).unwrap());
    });
    let err = format!("{:#}", build(vb, true, &TrainedParams::new()).unwrap_err());
    println!("{err}");
    assert!(err.contains(key) && err.contains("shape"), "{err}");
}

#[test]
fn real_config_shape_and_parameter_count() {
    let cfg = TinySamConfig::default();
    assert_eq!(cfg, TinySamConfig::tinyvit_5m());
    let dev = Device::Cpu;

    // Counted from mobile_sam's TinyViT(img_size=1024, embed_dims [64,128,160,320], ...) without the
    // unused classifier (`norm_head`, `head`: 321,640 more give the 6,065,532 of the checkpoint).
    let reg = TrainedParams::new();
    TinySam::new(&ParamBuilder::fresh(0, "image_encoder", true, DType::F32, &dev, &reg), &cfg).unwrap();
    let n = reg.num_weight_elements();
    let n_buf: usize = reg.all().iter().filter(|p| p.kind == ParamKind::Buffer).map(|p| p.var.elem_count()).sum();
    println!("TinyViT-5M trained parameters: {n} (+ {n_buf} running-statistics values)");
    assert_eq!(n, 5_743_892);

    let reg = TrainedParams::new();
    let model = TinySam::new(&ParamBuilder::fresh(0, "image_encoder", false, DType::F32, &dev, &reg), &cfg).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 3, 1024, 1024), &dev).unwrap();
    let t = Instant::now();
    let y = model.forward(&x).unwrap();
    println!("TinyViT-5M forward at 1024 px on CPU: {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(y.dims(), &[1, 256, 64, 64]);
    let s = y.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(s.is_finite() && s > 0.0);
}
