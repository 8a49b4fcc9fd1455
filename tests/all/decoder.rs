//! PRS-Med mask decoder and modality classifier: PyTorch parity (fixture from
//! scripts/fixtures/gen_decoder.py), key-mask semantics, real-config shapes and parameter
//! count, gradient flow, checkpoint errors.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use prs::model::decoder::{unused_checkpoint_tensors, DecoderConfig, ModalityClassifier, PromptedMaskDecoder};
use prs::nn::ops::TrainingMode;
use prs::nn::param::{ParamBuilder, TrainedParams};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoder").join(name)
}

fn load(name: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(fixture(name), &Device::Cpu)?)
}

fn small_config() -> Result<DecoderConfig> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixture("config.json"))?)?)
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// max |a - b| / max |b|.
fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(max_abs(a, b)? / scale.max(1e-12))
}

struct Fixture {
    dec: PromptedMaskDecoder,
    cls: ModalityClassifier,
    io: HashMap<String, Tensor>,
}

fn fixture_model(train: bool) -> Result<(Fixture, TrainedParams)> {
    let cfg = small_config()?;
    let reg = TrainedParams::new();
    let vb = VarBuilder::from_tensors(load("decoder.safetensors")?, DType::F32, &Device::Cpu);
    let pb = ParamBuilder::from_checkpoint(vb, "decoder.safetensors", "mask_decoder", train, DType::F32, &reg);
    let dec = PromptedMaskDecoder::new(&pb, &cfg)?;
    let vb = VarBuilder::from_tensors(load("classifier.safetensors")?, DType::F32, &Device::Cpu);
    let pb = ParamBuilder::from_checkpoint(vb, "classifier.safetensors", "classifier", train, DType::F32, &reg);
    let cls = ModalityClassifier::new(&pb, cfg.dim, cfg.num_classes)?;
    Ok((Fixture { dec, cls, io: load("io.safetensors")? }, reg))
}

#[test]
fn parity_with_pytorch() -> Result<()> {
    // Frozen and trained builds take different matmul paths; both must match.
    for train in [false, true] {
        let (f, _) = fixture_model(train)?;
        let (img, prompt, mask) = (&f.io["image_feats"], &f.io["prompt_states"], &f.io["key_mask"]);
        let low = f.dec.forward_low_res(img, prompt, mask)?;
        let up = f.dec.forward(img, prompt, mask)?;
        let cls = f.cls.forward(img)?;
        assert_eq!(low.dims(), &[2, 1, 8, 8]);
        assert_eq!(up.dims(), &[2, 1, 128, 128]);
        let (e_low, e_up, e_cls) =
            (max_rel(&low, &f.io["low_res"])?, max_rel(&up, &f.io["logits"])?, max_rel(&cls, &f.io["class_logits"])?);
        println!("train={train}: max rel err low-res {e_low:.3e}, upsampled {e_up:.3e}, classifier {e_cls:.3e}");
        assert!(e_low <= 1e-4 && e_up <= 1e-4 && e_cls <= 1e-4, "{e_low} {e_up} {e_cls}");
    }
    Ok(())
}

/// The decoder runs in its image features' dtype (`model.mask_precision = "compute"`): f16
/// here, since candle's CPU convolution has no bf16 (a GPU runs bf16 through the same code).
/// The logits come out in f32, close to PyTorch's f32 ones; the gradients of a training
/// forward reach the f32 master weights, finite and close to the f32 run's.
#[test]
fn half_precision_runs_in_half_with_f32_logits_and_master_gradients() -> Result<()> {
    let (f, _) = fixture_model(false)?;
    let (img, prompt, mask) = (&f.io["image_feats"], &f.io["prompt_states"], &f.io["key_mask"]);
    let out = f.dec.forward_low_res(&img.to_dtype(DType::F16)?, &prompt.to_dtype(DType::BF16)?, mask)?;
    assert_eq!(out.dtype(), DType::F32);
    let e = max_rel(&out, &f.io["low_res"])?;
    println!("f16 decoder vs PyTorch f32: max rel err {e:.3e}");
    assert!(e < 2e-2, "{e}");

    let w = Tensor::randn(0f32, 1.0, (2, 1, 128, 128), &Device::Cpu)?;
    let grads_in = |dtype: DType| -> Result<(Vec<(String, Tensor)>, f32)> {
        let (f, reg) = fixture_model(true)?;
        let up = f.dec.forward(&img.to_dtype(dtype)?, &prompt.to_dtype(dtype)?, mask)?;
        assert_eq!(up.dtype(), DType::F32);
        let loss = (up * &w)?.mean_all()?;
        let grads = loss.backward()?;
        let mut out = vec![];
        for p in reg.weights().into_iter().filter(|p| p.group == "mask_decoder") {
            assert_eq!(p.var.dtype(), DType::F32, "{} is not an f32 master", p.key);
            let g = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {}", p.key));
            assert_eq!(g.dtype(), DType::F32);
            out.push((p.key.clone(), g.clone()));
        }
        Ok((out, loss.to_scalar::<f32>()?))
    };
    let (full, _) = grads_in(DType::F32)?;
    let (half, _) = grads_in(DType::F16)?;
    let mut worst = (1f32, String::new());
    for ((k, g32), (_, g16)) in full.iter().zip(&half) {
        let (a, b): (Vec<f32>, Vec<f32>) = (g32.flatten_all()?.to_vec1()?, g16.flatten_all()?.to_vec1()?);
        assert!(b.iter().all(|x| x.is_finite()), "non-finite f16 gradient for {k}");
        let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm(&a) < 1e-6 {
            continue; // the structurally dead biases before an InstanceNorm
        }
        let cos = dot / (norm(&a) * norm(&b)).max(1e-30);
        if cos < worst.0 {
            worst = (cos, k.clone());
        }
    }
    println!("lowest cosine between f16 and f32 gradients: {:.4} ({})", worst.0, worst.1);
    assert!(worst.0 > 0.99, "{worst:?}");
    Ok(())
}

#[test]
fn masked_positions_have_no_influence() -> Result<()> {
    let (f, _) = fixture_model(false)?;
    let (img, prompt, mask) = (&f.io["image_feats"], &f.io["prompt_states"], &f.io["key_mask"]);
    let base = f.dec.forward(img, prompt, mask)?;
    let noise = (Tensor::randn(0f32, 10.0, prompt.dims(), &Device::Cpu)? + 3.0)?;
    let keep = mask.unsqueeze(2)?.broadcast_as(prompt.shape())?;
    // Masked positions replaced by large noise: output unchanged.
    let changed = keep.where_cond_f(prompt, &noise)?;
    let diff = max_abs(&f.dec.forward(img, &changed, mask)?, &base)?;
    assert!(diff <= 1e-6, "masked positions changed the output by {diff}");
    // The same change at unmasked positions does change it (the test can fail).
    let changed = keep.where_cond_f(&noise, prompt)?;
    let diff = max_abs(&f.dec.forward(img, &changed, mask)?, &base)?;
    assert!(diff > 1e-3, "unmasked positions had no influence ({diff})");
    Ok(())
}

trait WhereF {
    fn where_cond_f(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor>;
}
impl WhereF for Tensor {
    /// `self` is a 0/1 float mask.
    fn where_cond_f(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        Ok(self.gt(0.5)?.where_cond(on_true, on_false)?)
    }
}

#[test]
fn fully_masked_sample_is_a_clear_error() -> Result<()> {
    let (f, _) = fixture_model(false)?;
    let mask = Tensor::new(&[[1f32, 1., 0., 0., 0., 0., 0.], [0.; 7]], &Device::Cpu)?;
    let err = f.dec.forward(&f.io["image_feats"], &f.io["prompt_states"], &mask).unwrap_err().to_string();
    assert!(err.contains("sample 1") && err.contains("key_mask"), "{err}");
    Ok(())
}

#[test]
fn gradients_reach_every_trained_weight_and_only_unmasked_prompt_positions() -> Result<()> {
    let (f, reg) = fixture_model(true)?;
    let (img, mask) = (&f.io["image_feats"], &f.io["key_mask"]);
    let prompt = Var::from_tensor(&f.io["prompt_states"])?;
    let loss = {
        let _train = TrainingMode::enter(7); // dropout on
        let up = f.dec.forward(img, prompt.as_tensor(), mask)?;
        let low = f.dec.forward_low_res(img, prompt.as_tensor(), mask)?;
        let w = Tensor::randn(0f32, 1.0, up.dims(), &Device::Cpu)?;
        let cls = f.cls.forward(img)?;
        ((up * w)?.mean_all()? + low.sqr()?.mean_all()? + cls.sqr()?.mean_all()?)?
    };
    let grads = loss.backward()?;

    // A bias added right before an InstanceNorm is removed by its mean subtraction (in
    // PyTorch as here): its gradient is zero up to rounding.
    let dead = |k: &str| k.starts_with("mask_generation.") && (k.ends_with("conv1.bias") || k.ends_with("conv2.bias"));
    let weights = reg.weights();
    assert_eq!(weights.len(), 68 + 2, "decoder tensors without ffn.norm1, plus the classifier");
    let mut live_min = f32::INFINITY;
    let mut dead_max = 0f32;
    for p in &weights {
        let g = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {}", p.key));
        let v: Vec<f32> = g.flatten_all()?.to_vec1()?;
        assert!(v.iter().all(|x| x.is_finite()), "non-finite gradient for {}", p.key);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if dead(&p.key) {
            dead_max = dead_max.max(norm);
        } else {
            assert!(norm > 0.0, "zero gradient for {}/{}", p.group, p.key);
            live_min = live_min.min(norm);
        }
    }
    println!("smallest live gradient norm {live_min:.3e}, largest structurally dead {dead_max:.3e}");
    assert!(dead_max < 1e-3 * live_min.max(1e-3));

    let g = grads.get(prompt.as_tensor()).expect("prompt states get a gradient");
    let row_norms: Vec<Vec<f32>> = g.sqr()?.sum(2)?.to_vec2()?;
    let m: Vec<Vec<f32>> = mask.to_vec2()?;
    for (b, (rows, mrow)) in row_norms.iter().zip(&m).enumerate() {
        for (t, (&n, &k)) in rows.iter().zip(mrow).enumerate() {
            if k > 0.5 {
                assert!(n > 0.0, "unmasked position ({b},{t}) has no gradient");
            } else {
                assert_eq!(n, 0.0, "masked position ({b},{t}) has a gradient");
            }
        }
    }
    Ok(())
}

#[test]
fn frozen_decoder_registers_nothing() -> Result<()> {
    let (f, reg) = fixture_model(false)?;
    assert!(reg.all().is_empty());
    let out = f.dec.forward(&f.io["image_feats"], &f.io["prompt_states"], &f.io["key_mask"])?;
    assert!(!out.track_op());
    Ok(())
}

#[test]
fn real_config_parameter_count() -> Result<()> {
    let cfg = DecoderConfig::default();
    let reg = TrainedParams::new();
    let pb = ParamBuilder::fresh(3, "mask_decoder", true, DType::F32, &Device::Cpu, &reg);
    PromptedMaskDecoder::new(&pb, &cfg)?;
    let used = reg.num_weight_elements();
    let unused: usize = unused_checkpoint_tensors(&cfg).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(used, 5_365_953);
    // The authors' count includes the unused ffn.norm1.
    assert_eq!(used + unused, 5_366_465);
    let pb = ParamBuilder::fresh(3, "classifier", true, DType::F32, &Device::Cpu, &reg);
    ModalityClassifier::new(&pb, cfg.dim, cfg.num_classes)?;
    assert_eq!(reg.group("classifier").iter().map(|p| p.var.elem_count()).sum::<usize>(), 256 * 6 + 6);
    Ok(())
}

#[test]
fn real_config_shapes() -> Result<()> {
    let cfg = DecoderConfig::default();
    let reg = TrainedParams::new();
    let pb = ParamBuilder::fresh(11, "mask_decoder", false, DType::F32, &Device::Cpu, &reg);
    let dec = PromptedMaskDecoder::new(&pb, &cfg)?;
    let cls = ModalityClassifier::new(&pb.pp("cls"), cfg.dim, cfg.num_classes)?;
    let img = Tensor::randn(0f32, 1.0, (1, 256, 64, 64), &Device::Cpu)?;
    let prompt = Tensor::randn(0f32, 1.0, (1, 12, 4096), &Device::Cpu)?.to_dtype(DType::BF16)?;
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]], &Device::Cpu)?;
    let low = dec.forward_low_res(&img, &prompt, &mask)?;
    assert_eq!(low.dims(), &[1, 1, 64, 64]);
    let up = prs::nn::upsample::upsample_bilinear_ac(&low, cfg.upsample)?;
    assert_eq!(up.dims(), &[1, 1, 1024, 1024]);
    assert_eq!(up.dtype(), DType::F32);
    let v: Vec<f32> = up.flatten_all()?.to_vec1()?;
    assert!(v.iter().all(|x| x.is_finite()));
    // Corners of the upsampled map are the corner logits (align_corners = true).
    let l: Vec<f32> = low.flatten_all()?.to_vec1()?;
    assert!((v[0] - l[0]).abs() < 1e-6 && (v[1024 * 1024 - 1] - l[64 * 64 - 1]).abs() < 1e-6);
    assert_eq!(cls.forward(&img)?.dims(), &[1, 6]);
    Ok(())
}

#[test]
fn missing_key_is_a_loading_error() -> Result<()> {
    let cfg = small_config()?;
    let mut tensors = load("decoder.safetensors")?;
    tensors.remove("encoder_layer.self_attn.in_proj_weight");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let pb = ParamBuilder::from_checkpoint(
        vb,
        "decoder.safetensors",
        "mask_decoder",
        true,
        DType::F32,
        &TrainedParams::new(),
    );
    let err = PromptedMaskDecoder::new(&pb, &cfg).unwrap_err().to_string();
    assert!(err.contains("encoder_layer.self_attn.in_proj_weight") && err.contains("decoder.safetensors"), "{err}");

    // ffn.norm1 is unused: a checkpoint without it loads.
    let mut tensors = load("decoder.safetensors")?;
    assert!(tensors.remove("ffn.norm1.weight").is_some() && tensors.remove("ffn.norm1.bias").is_some());
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let pb = ParamBuilder::from_checkpoint(
        vb,
        "decoder.safetensors",
        "mask_decoder",
        true,
        DType::F32,
        &TrainedParams::new(),
    );
    PromptedMaskDecoder::new(&pb, &cfg)?;

    // The classifier's key is `2.weight`.
    let mut tensors = load("classifier.safetensors")?;
    tensors.remove("2.weight");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let pb = ParamBuilder::from_checkpoint(vb, "cls.pth", "classifier", true, DType::F32, &TrainedParams::new());
    let err = ModalityClassifier::new(&pb, cfg.dim, cfg.num_classes).unwrap_err().to_string();
    assert!(err.contains("2.weight"), "{err}");
    Ok(())
}
