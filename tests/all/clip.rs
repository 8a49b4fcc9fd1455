//! CLIP vision tower and LLaVA projector against HF transformers (fixtures from
//! scripts/fixtures/gen_clip.py).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use prs::model::clip::{ClipVisionConfig, ClipVisionTower};
use prs::model::llava::{image_token_count, Projector, ProjectorKind};
use prs::nn::{ParamBuilder, TrainedParams};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip").join(name)
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

fn small_cfg() -> ClipVisionConfig {
    ClipVisionConfig {
        hidden_size: 32,
        intermediate_size: 96,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        image_size: 56,
        patch_size: 14,
        layer_norm_eps: 1e-5,
        hidden_act: "quick_gelu".into(),
    }
}

fn builder(tensors: HashMap<String, Tensor>, dtype: DType) -> ParamBuilder<'static> {
    let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
    ParamBuilder::from_checkpoint(vb, "clip fixture", "clip", false, dtype, &TrainedParams::new())
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / scale
}

#[test]
fn clip_parity_select_minus_two() {
    let io = load("clip_io.safetensors");
    let pb = builder(load("clip_weights.safetensors"), DType::F32).pp("vision_model");
    let tower = ClipVisionTower::new(&pb, &small_cfg(), -2).unwrap();
    assert_eq!(tower.num_layers_run(), 2);
    let out = tower.forward(&io["pixels"]).unwrap();
    assert_eq!(out.dims(), &[2, 16, 32]);
    let e = rel_err(&out, &io["hs_m2"]);
    println!("clip hidden_states[-2] max relative error: {e:.3e}");
    assert!(e <= 1e-4, "relative error {e}");
}

#[test]
fn clip_select_layer_indexing_matches_hf() {
    let io = load("clip_io.safetensors");
    let pb = builder(load("clip_weights.safetensors"), DType::F32).pp("vision_model");
    for (sel, key, n) in [(-1i64, "hs_m1", 3usize), (1, "hs_1", 1), (3, "hs_m1", 3), (-3, "hs_1", 1)] {
        let tower = ClipVisionTower::new(&pb, &small_cfg(), sel).unwrap();
        assert_eq!(tower.num_layers_run(), n, "select {sel}");
        let e = rel_err(&tower.forward(&io["pixels"]).unwrap(), &io[key]);
        println!("clip select {sel} vs {key}: max relative error {e:.3e}");
        assert!(e <= 1e-4, "select {sel}: relative error {e}");
    }
    for bad in [4i64, -5] {
        let err = ClipVisionTower::new(&pb, &small_cfg(), bad).unwrap_err();
        assert!(format!("{err:#}").contains("out of range"), "{err:#}");
    }
}

#[test]
fn clip_layers_after_the_selected_one_are_not_read() {
    let io = load("clip_io.safetensors");
    let mut w = load("clip_weights.safetensors");
    let before = w.len();
    w.retain(|k, _| !k.contains("encoder.layers.2.") && !k.contains("post_layernorm"));
    assert!(w.len() < before);
    let pb = builder(w, DType::F32).pp("vision_model");
    let tower = ClipVisionTower::new(&pb, &small_cfg(), -2).unwrap();
    let e = rel_err(&tower.forward(&io["pixels"]).unwrap(), &io["hs_m2"]);
    assert!(e <= 1e-4, "relative error {e}");
    // The same checkpoint cannot serve the last layer: the error names the tensor.
    let err = ClipVisionTower::new(&pb, &small_cfg(), -1).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("vision_model.encoder.layers.2.self_attn.q_proj.weight"), "{msg}");
}

#[test]
fn clip_missing_class_embedding_is_an_error() {
    let mut w = load("clip_weights.safetensors");
    w.remove("vision_model.embeddings.class_embedding").unwrap();
    let pb = builder(w, DType::F32).pp("vision_model");
    let err = ClipVisionTower::new(&pb, &small_cfg(), -2).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("missing tensor `vision_model.embeddings.class_embedding`"), "{msg}");
}

#[test]
fn clip_mis_shaped_position_embedding_is_an_error() {
    let mut cfg = small_cfg();
    cfg.image_size = 70; // 25 patches + CLS, but the checkpoint has 17 positions
    let pb = builder(load("clip_weights.safetensors"), DType::F32).pp("vision_model");
    let err = ClipVisionTower::new(&pb, &cfg, -2).unwrap_err();
    assert!(format!("{err:#}").contains("position_embedding.weight"), "{err:#}");
}

#[test]
fn clip_computes_in_the_builder_dtype() {
    let io = load("clip_io.safetensors");
    let pb = builder(load("clip_weights.safetensors"), DType::BF16).pp("vision_model");
    let tower = ClipVisionTower::new(&pb, &small_cfg(), -2).unwrap();
    let out = tower.forward(&io["pixels"]).unwrap(); // f32 pixels in
    assert_eq!(out.dtype(), DType::BF16);
    let e = rel_err(&out, &io["hs_m2"]);
    println!("clip bf16 vs f32 reference: max relative error {e:.3e}");
    assert!(e <= 5e-2, "bf16 relative error {e}");
    let wrong = Tensor::zeros((1, 3, 42, 42), DType::F32, &Device::Cpu).unwrap();
    assert!(tower.forward(&wrong).is_err());
}

#[test]
fn clip_medium_config_shapes_and_gradients() {
    let cfg = ClipVisionConfig {
        hidden_size: 128,
        intermediate_size: 512,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        image_size: 112,
        patch_size: 14,
        ..Default::default()
    };
    let reg = TrainedParams::new();
    let pb = ParamBuilder::fresh(3, "clip", true, DType::F32, &Device::Cpu, &reg);
    let tower = ClipVisionTower::new(&pb, &cfg, -2).unwrap();
    assert_eq!(tower.num_layers_run(), 3);
    assert!(reg.get("clip", "encoder.layers.2.mlp.fc2.weight").is_some());
    assert!(reg.get("clip", "encoder.layers.3.mlp.fc2.weight").is_none());
    let px = Tensor::randn(0f32, 1.0, (2, 3, 112, 112), &Device::Cpu).unwrap();
    let out = tower.forward(&px).unwrap();
    assert_eq!(out.dims(), &[2, 64, 128]);
    assert_eq!(image_token_count(&cfg), 64);
    // Trainable when asked: every parameter that reaches the output gets a gradient.
    let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for key in [
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "encoder.layers.0.self_attn.q_proj.weight",
        "pre_layrnorm.weight",
    ] {
        let v = reg.get("clip", key).unwrap();
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {key}"));
        let n = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(n > 0.0, "zero gradient for {key}");
    }
}

#[test]
fn clip_config_defaults_and_hf_json() {
    let d = ClipVisionConfig::default();
    assert_eq!(
        (d.hidden_size, d.intermediate_size, d.num_hidden_layers, d.num_attention_heads, d.image_size, d.patch_size),
        (1024, 4096, 24, 16, 336, 14)
    );
    assert_eq!(d.hidden_act, "quick_gelu");
    assert_eq!(image_token_count(&d), 576);
    assert_eq!(d.layers_for_select(-2).unwrap(), 23);
    let json = r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 28, "patch_size": 14, "projection_dim": 768, "model_type": "clip_vision_model"}"#;
    let c: ClipVisionConfig = serde_json::from_str(json).unwrap();
    assert_eq!((c.hidden_size, c.num_patches(), c.layer_norm_eps), (64, 4, 1e-5));
    let mut bad = small_cfg();
    bad.hidden_act = "relu".into();
    let pb = builder(load("clip_weights.safetensors"), DType::F32).pp("vision_model");
    assert!(format!("{:#}", ClipVisionTower::new(&pb, &bad, -2).unwrap_err()).contains("hidden_act"));
}

#[test]
fn projector_mlp2x_gelu_parity() {
    let io = load("clip_io.safetensors");
    let pb = builder(load("clip_weights.safetensors"), DType::F32).pp("model").pp("mm_projector");
    let proj = Projector::new(&pb, 32, 40, "mlp2x_gelu").unwrap();
    assert_eq!(proj.kind(), ProjectorKind::MlpGelu { depth: 2 });
    let out = proj.forward(&io["hs_m2"]).unwrap();
    assert_eq!(out.dims(), &[2, 16, 40]);
    let e = rel_err(&out, &io["proj_out"]);
    println!("projector max relative error: {e:.3e}");
    assert!(e <= 1e-5, "relative error {e}");
    // Wrong dims are caught at load time.
    assert!(Projector::new(&pb, 32, 48, "mlp2x_gelu").is_err());
}

#[test]
fn projector_kinds() {
    assert_eq!(ProjectorKind::parse("linear").unwrap(), ProjectorKind::Linear);
    assert_eq!(ProjectorKind::parse("mlp3x_gelu").unwrap(), ProjectorKind::MlpGelu { depth: 3 });
    for bad in ["qformer", "mlp2x_relu", "mlpx_gelu", "mlp0x_gelu"] {
        let err = ProjectorKind::parse(bad).unwrap_err();
        assert!(err.to_string().contains("unsupported mm_projector_type"), "{err}");
    }
    // "linear": one Linear whose keys sit directly under the projector prefix.
    let w = Tensor::randn(0f32, 1.0, (6, 4), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, 6, &Device::Cpu).unwrap();
    let pb = builder(HashMap::from([("weight".to_string(), w.clone()), ("bias".to_string(), b.clone())]), DType::F32);
    let proj = Projector::new(&pb, 4, 6, "linear").unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 4), &Device::Cpu).unwrap();
    let want = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
    assert!(rel_err(&proj.forward(&x).unwrap(), &want) < 1e-6);
    assert!(Projector::new(&pb, 4, 6, "identity").is_err());
}
