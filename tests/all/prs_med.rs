//! The assembled model on the tiny configuration: shapes with padding, gradient flow from the
//! combined loss, checkpoint round trips in both layouts, loading errors.

use crate::common;
use candle_core::{DType, Device, Tensor};
use common::{assert_grads_exactly_trained_except, rel_err, tiny_model};
use prs::model::prs_med::{LossWeights, ModelBatch, PrsMed};
use prs::pipeline::build::{load_prs_med, LoadOptions, Mode};
use prs::tokenizer;
use prs::weights::checkpoint::{save_checkpoint, CheckpointMeta};

fn opts(mode: Mode, ckpt: Option<&std::path::Path>) -> LoadOptions<'_> {
    LoadOptions { device: Device::Cpu, dtype: DType::F32, mode, checkpoint: ckpt, seed: 3 }
}

/// Two samples with prompts of different lengths, random pixels, blob masks.
fn batch(m: &PrsMed, cfg: &prs::config::Config, dir: &std::path::Path) -> ModelBatch {
    let tok = tokenizer::load(&dir.join("llava")).unwrap();
    let qa = [
        ("Where is the tumour in this CT image?", "The tumour is at the top left of the image."),
        ("Where is the lesion?", "It is in the center."),
    ];
    let prompts: Vec<_> =
        qa.iter().map(|(q, a)| tokenizer::encode_prompt(&tok, &cfg.prompt.template, q, Some(a)).unwrap()).collect();
    assert_ne!(prompts[0].after_image.len(), prompts[1].after_image.len());
    let v = m.spec.llava.vision_config().unwrap();
    let s = cfg.model.sam_image_size;
    let dev = Device::Cpu;
    let clip_pixels = Tensor::randn(0f32, 1.0, (2, 3, v.image_size, v.image_size), &dev).unwrap();
    let sam_pixels = Tensor::randn(0f32, 1.0, (2, 3, s, s), &dev).unwrap();
    let masks = Tensor::randn(0f32, 1.0, (2, 1, s, s), &dev).unwrap().ge(1.0).unwrap().to_dtype(DType::F32).unwrap();
    let modality = Tensor::new(&[0u32, 4], &dev).unwrap();
    ModelBatch { clip_pixels, sam_pixels, prompts, masks: Some(masks), modality: Some(modality) }
}

#[test]
fn forward_shapes_and_gradients_reach_exactly_the_trained_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let m = load_prs_med(&cfg, &opts(Mode::Train, None)).unwrap();
    let b = batch(&m, &cfg, dir.path());
    // PEFT init has B = 0, so dL/dA = 0 at step 0 by design: check that, then move every
    // tensor so that each must receive a non-zero gradient.
    {
        let _train = prs::nn::ops::TrainingMode::enter(11);
        let out = m.forward(&b, true).unwrap();
        let grads = m.losses(&b, &out, &LossWeights::default()).unwrap().total.backward().unwrap();
        for p in m.trained.group("lora") {
            let g = grads.get(p.var.as_tensor()).expect("lora tensor without gradient");
            let abs = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(abs == 0.0, p.key.contains("lora_A"), "{}: |grad| = {abs}", p.key);
        }
    }
    // (TinyViT's MBConv also zero-initialises its last BatchNorm weight, silencing the branch
    // at init.) Perturbing every trained tensor stands for a first optimizer update.
    perturb(&m);
    let out = {
        let _train = prs::nn::ops::TrainingMode::enter(11);
        m.forward(&b, true).unwrap()
    };
    let s = cfg.model.sam_image_size;
    assert_eq!(out.mask_logits.dims(), &[2, 1, s, s]);
    assert_eq!(out.class_logits.dims(), &[2, 6]);
    // answer tokens + EOS of both samples are supervised
    let n_sup: usize = b.prompts.iter().map(|p| p.answer.len() + 1).sum();
    assert_eq!(out.answer_logits.as_ref().unwrap().dims(), &[n_sup, 32000]);
    let losses = m.losses(&b, &out, &LossWeights::default()).unwrap();
    for (name, l) in [("total", &losses.total), ("seg", &losses.seg), ("lm", &losses.lm), ("cls", &losses.cls)] {
        let v = l.to_scalar::<f32>().unwrap();
        assert!(v.is_finite() && v > 0.0, "{name} loss {v}");
    }
    let grads = losses.total.backward().unwrap();
    // The decoder's conv biases right before an InstanceNorm are cancelled by its mean
    // subtraction: zero gradient in exact arithmetic (the authors' layers, kept for their keys).
    let before_instance_norm =
        |k: &str| k.starts_with("mask_generation.") && (k.ends_with("conv1.bias") || k.ends_with("conv2.bias"));
    assert_grads_exactly_trained_except(&grads, &m.trained, before_instance_norm);
    // What trains: LoRA A/B on the config's modules of every layer, TinySAM, decoder, classifier, projector.
    let groups: std::collections::BTreeSet<_> = m.trained.weights().iter().map(|p| p.group.clone()).collect();
    let want: std::collections::BTreeSet<_> =
        ["classifier", "image_encoder", "lora", "mask_decoder", "mm_projector"].iter().map(|s| s.to_string()).collect();
    assert_eq!(groups, want);
    let layers = cfg.init.as_ref().unwrap().llm.num_hidden_layers;
    assert_eq!(m.trained.group("lora").len(), layers * cfg.model.lora.target_modules.len() * 2);
}

#[test]
fn inference_outputs_do_not_depend_on_padding() {
    // Sample 2 alone gives the same mask logits as inside the padded batch.
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let m = load_prs_med(&cfg, &opts(Mode::Infer, None)).unwrap();
    let b = batch(&m, &cfg, dir.path());
    let both = m.forward(&b, false).unwrap();
    let one = ModelBatch {
        clip_pixels: b.clip_pixels.narrow(0, 1, 1).unwrap(),
        sam_pixels: b.sam_pixels.narrow(0, 1, 1).unwrap(),
        prompts: vec![b.prompts[1].clone()],
        masks: None,
        modality: None,
    };
    let alone = m.forward(&one, false).unwrap();
    let err = rel_err(&both.mask_logits.narrow(0, 1, 1).unwrap(), &alone.mask_logits);
    assert!(err < 1e-4, "padding changed the mask: rel err {err}");
}

/// Makes every trained tensor non-trivial (LoRA B starts at zero) so round trips are meaningful.
fn perturb(m: &PrsMed) {
    for p in m.trained.weights() {
        let t = p.var.as_tensor();
        let noise = (Tensor::randn(0f32, 0.05, t.shape(), t.device()).unwrap()).to_dtype(t.dtype()).unwrap();
        p.var.set(&(t + noise).unwrap()).unwrap();
    }
}

#[test]
fn project_checkpoint_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let m = load_prs_med(&cfg, &opts(Mode::Train, None)).unwrap();
    perturb(&m);
    let ck = dir.path().join("ckpt");
    let meta = CheckpointMeta::new(&cfg.model.base, &cfg.model.tinysam, toml::to_string(&cfg.model).unwrap());
    save_checkpoint(&ck, &m.trained, &m.spec.lora, meta).unwrap();
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "image_encoder.safetensors",
        "mask_decoder.safetensors",
        "classifier.safetensors",
        "mm_projector.safetensors",
        "prs_checkpoint.json",
    ] {
        assert!(ck.join(f).exists(), "{f} missing");
    }
    // PEFT key names
    let names = prs::weights::shards::read_safetensors_header(&ck.join("adapter_model.safetensors")).unwrap();
    let keys: Vec<String> = names.tensors.keys().cloned().collect();
    assert!(keys.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()), "{keys:?}");

    let back = load_prs_med(&cfg, &opts(Mode::Train, Some(&ck))).unwrap();
    let (a, b) = (m.trained.all(), back.trained.all());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b.iter()) {
        assert_eq!((&x.group, &x.key), (&y.group, &y.key));
        let d = (x.var.as_tensor() - y.var.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{}/{} differs after reload", x.group, x.key);
    }
    // Inference from the checkpoint gives the trained model's outputs.
    let inf = load_prs_med(&cfg, &opts(Mode::Infer, Some(&ck))).unwrap();
    let bt = batch(&m, &cfg, dir.path());
    let y1 = m.forward(&bt, false).unwrap().mask_logits;
    let y2 = inf.forward(&bt, false).unwrap().mask_logits;
    // Same weights; trained vs frozen matmul paths may round differently.
    assert!(rel_err(&y2, &y1) < 1e-5, "{}", rel_err(&y2, &y1));
}

#[test]
fn authors_release_layout_loads_and_applies_the_adapter() {
    use prs::files::write_atomic;
    use prs::weights::pth::write_pth_atomic;
    use prs::weights::shards::write_safetensors_atomic;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_model(dir.path());
    // The authors' release has no projector: train it frozen for this comparison.
    cfg.model.trainable.projector = false;
    let m = load_prs_med(&cfg, &opts(Mode::Train, None)).unwrap();
    perturb(&m);
    let rel = dir.path().join("release");
    std::fs::create_dir_all(rel.join("lora_adapter")).unwrap();
    let group = |g: &str| -> Vec<(String, Tensor)> {
        m.trained.group(g).into_iter().map(|p| (p.key.clone(), p.var.as_tensor().detach())).collect()
    };
    let mut lora: Vec<_> = group("lora").into_iter().map(|(k, t)| (format!("base_model.model.{k}"), t)).collect();
    // inert CLIP LoRA keys, as in their adapters
    lora.push((
        "base_model.model.model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
            .into(),
        Tensor::zeros((8, 32), DType::F32, &Device::Cpu).unwrap(),
    ));
    write_safetensors_atomic(&rel.join("lora_adapter/adapter_model.safetensors"), &lora, None).unwrap();
    let l = &cfg.model.lora;
    let ac = serde_json::json!({"peft_type": "LORA", "r": l.r, "lora_alpha": l.alpha, "lora_dropout": 0.05, "bias": "none",
        "target_modules": l.target_modules, "task_type": "CAUSAL_LM"});
    write_atomic(&rel.join("lora_adapter/adapter_config.json"), |f| Ok(serde_json::to_writer(f, &ac)?)).unwrap();
    let enc = group("image_encoder");
    let mut enc_all: Vec<_> = enc.iter().map(|(k, t)| (format!("image_encoder.{k}"), t.clone())).collect();
    enc_all.extend(enc.iter().map(|(k, t)| (format!("sam.image_encoder.{k}"), t.clone())));
    write_pth_atomic(&rel.join("image_encoder.pth"), &enc_all).unwrap();
    write_pth_atomic(&rel.join("mask_decoder.pth"), &group("mask_decoder")).unwrap();
    write_pth_atomic(&rel.join("cls.pth"), &group("classifier")).unwrap();

    let loaded = load_prs_med(&cfg, &opts(Mode::Infer, Some(&rel))).unwrap();
    let bt = batch(&m, &cfg, dir.path());
    let want = m.forward(&bt, false).unwrap();
    let got = loaded.forward(&bt, false).unwrap();
    assert!(rel_err(&got.mask_logits, &want.mask_logits) < 1e-5, "{}", rel_err(&got.mask_logits, &want.mask_logits));
    // The adapter is really applied: without it the LLM states (hence the mask) differ.
    let plain = load_prs_med(&cfg, &opts(Mode::Infer, None)).unwrap();
    let image = plain.encode_image(&bt.clip_pixels).unwrap();
    let inp = plain.llm_inputs(&bt.prompts, &image, false).unwrap();
    let h0 = plain.llm.forward_embeds(&inp.embeds, Some(&inp.key_valid), &inp.position_ids, None).unwrap();
    let h1 = loaded.llm.forward_embeds(&inp.embeds, Some(&inp.key_valid), &inp.position_ids, None).unwrap();
    assert!(rel_err(&h1, &h0) > 1e-3, "adapter had no effect");
}

#[test]
fn a_missing_shard_and_a_missing_tensor_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let llava = dir.path().join("llava");
    let shard = std::fs::read_dir(&llava)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let err = format!("{:#}", load_prs_med(&cfg, &opts(Mode::Infer, None)).err().expect("must fail"));
    let name = shard.file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&name), "error does not name the missing shard {name}: {err}");
}

#[test]
fn a_separate_clip_checkpoint_replaces_the_embedded_tower() {
    use prs::weights::shards::write_sharded;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_model(dir.path());
    let combined = load_prs_med(&cfg, &opts(Mode::Infer, None)).unwrap();
    // Split the base folder into a LLaVA part without the tower and a CLIP-only checkpoint.
    let llava = dir.path().join("llava");
    let mut all = vec![];
    for e in std::fs::read_dir(&llava).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            all.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
            std::fs::remove_file(&p).unwrap();
        }
    }
    let prefix = format!("{}.", prs::model::llava::CLIP_PREFIX);
    let (clip, rest): (Vec<_>, Vec<_>) = all.into_iter().partition(|(k, _)| k.starts_with(&prefix));
    let clip: Vec<_> = clip.into_iter().map(|(k, t)| (format!("vision_model.{}", &k[prefix.len()..]), t)).collect();
    assert!(!clip.is_empty());
    write_sharded(&llava, &rest, 1 << 20, DType::F32).unwrap();
    let clip_dir = dir.path().join("clip");
    std::fs::create_dir_all(&clip_dir).unwrap();
    write_sharded(&clip_dir, &clip, 1 << 30, DType::F32).unwrap();

    let err = format!("{:#}", load_prs_med(&cfg, &opts(Mode::Infer, None)).err().expect("tower missing"));
    assert!(err.contains("no CLIP tower"), "{err}");
    cfg.model.vision_tower = Some(clip_dir.display().to_string());
    let split = load_prs_med(&cfg, &opts(Mode::Infer, None)).unwrap();
    let bt = batch(&combined, &cfg, dir.path());
    let a = combined.encode_image(&bt.clip_pixels).unwrap();
    let b = split.encode_image(&bt.clip_pixels).unwrap();
    assert_eq!(rel_err(&b, &a), 0.0);
}

#[test]
fn init_draws_each_part_at_its_configured_scale() {
    // `prs init`: embeddings and lm_head at `weight_std`, decoder layers at `llm_layer_std`,
    // CLIP's position embedding at `vision_position_std` (the tiny model's learnability rests on these).
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let init = cfg.init.clone().unwrap();
    let (layer_std, pos_std) = (init.llm_layer_std.unwrap(), init.vision_position_std.unwrap());
    assert!(layer_std != init.weight_std && pos_std != init.weight_std, "pick a config whose scales differ");
    let source = prs::weights::hub::ModelSource::parse(&cfg.model.base).unwrap();
    let st = prs::weights::shards::open_safetensors(&source, DType::F32, &Device::Cpu).unwrap();
    let std_of = |key: &str, shape: &[usize]| -> f64 {
        let t = st.vb.get(shape, key).unwrap().flatten_all().unwrap();
        let v = t.to_vec1::<f32>().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    let (h, vocab) = (init.llm.hidden_size, init.llm.vocab_size);
    let near =
        |got: f64, want: f64, what: &str| assert!((got / want - 1.0).abs() < 0.05, "{what}: std {got}, want {want}");
    near(std_of("lm_head.weight", &[vocab, h]), init.weight_std, "lm_head");
    near(std_of("model.embed_tokens.weight", &[vocab, h]), init.weight_std, "embed_tokens");
    let inter = init.llm.intermediate_size;
    near(std_of("model.layers.0.mlp.gate_proj.weight", &[inter, h]), layer_std, "gate_proj");
    near(std_of("model.layers.1.self_attn.q_proj.weight", &[h, h]), layer_std, "q_proj");
    let v = &init.vision;
    let n_pos = (v.image_size / v.patch_size).pow(2) + 1;
    let key = format!("{}.embeddings.position_embedding.weight", prs::model::llava::CLIP_PREFIX);
    near(std_of(&key, &[n_pos, v.hidden_size]), pos_std, "CLIP position embedding");
}

#[test]
fn decoder_grid_and_upsampling_follow_tinysam_stride() {
    // Three stages (the tiny config) downsample 8x, four (the released TinySAM) 16x: the decoder's
    // token grid and its logits' upsampling must follow, so the mask comes out at the input size.
    let tiny = prs::config::Config::parse(prs::commands::demo::TINY_CONFIG, &[]).unwrap();
    let tiny_spec = prs::pipeline::random::spec_for_config(&tiny).unwrap();
    assert_eq!(tiny_spec.tinysam.num_stages(), 3);
    assert_eq!((tiny_spec.decoder.grid, tiny_spec.decoder.upsample), (16, 8));
    let four = [
        "model.tinysam_arch.embed_dims=[16, 24, 32, 48]",
        "model.tinysam_arch.depths=[1, 1, 2, 1]",
        "model.tinysam_arch.num_heads=[1, 2, 2, 3]",
        "model.tinysam_arch.window_sizes=[7, 7, 7, 7]",
    ];
    let released = prs::config::Config::parse(prs::commands::demo::TINY_CONFIG, &four.map(String::from)).unwrap();
    let released_spec = prs::pipeline::random::spec_for_config(&released).unwrap();
    assert_eq!((released_spec.decoder.grid, released_spec.decoder.upsample), (8, 16));
    // A random three-stage encoder really yields the 16x16 grid the decoder is sized for.
    let m = prs::pipeline::random::random_prs_med(
        &tiny_spec,
        &prs::pipeline::random::RandomOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            mode: Mode::Infer,
            seed: 3,
            train_tinysam: false,
            train_projector: false,
            base_quant: Default::default(),
        },
    )
    .unwrap();
    let x = Tensor::zeros((1, 3, 128, 128), DType::F32, &Device::Cpu).unwrap();
    let feats = m.tinysam.forward(&x).unwrap();
    assert_eq!(feats.dims(), &[1, 32, 16, 16]);
    let bad =
        prs::config::Config::parse(prs::commands::demo::TINY_CONFIG, &["model.sam_image_size=124".into()]).unwrap();
    let err = format!("{:#}", prs::pipeline::random::spec_for_config(&bad).expect_err("124 is not a multiple of 8"));
    assert!(err.contains("sam_image_size 124") && err.contains("stride 8"), "{err}");
}

/// The whole model in half precision with the mask branch in it (`mask_precision = "compute"`,
/// f16 on the CPU, whose convolution has no bf16): TinySAM and the decoder run in f16, the
/// mask logits and losses are f32, every trained tensor gets a finite gradient on its f32
/// master, and the BatchNorm running statistics stay f32 and move. `mask_precision = "f32"`
/// keeps the branch in f32 inside the same half-precision model.
#[test]
fn a_half_precision_step_runs_the_mask_branch_in_half_with_f32_masters() {
    use prs::config::MaskPrecision;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_model(dir.path());
    let half = |cfg: &prs::config::Config| {
        let o = LoadOptions { dtype: DType::F16, ..opts(Mode::Train, None) };
        load_prs_med(cfg, &o).unwrap()
    };
    let m = half(&cfg);
    assert_eq!(m.mask_dtype(), DType::F16);
    perturb(&m);
    let b = batch(&m, &cfg, dir.path());
    let stats = |m: &PrsMed| -> Vec<Vec<f32>> {
        m.trained
            .group("image_encoder")
            .iter()
            .filter(|p| p.key.ends_with("running_mean"))
            .map(|p| {
                assert_eq!(p.var.dtype(), DType::F32);
                p.var.as_tensor().to_vec1::<f32>().unwrap()
            })
            .collect()
    };
    let before = stats(&m);
    let (out, grads) = {
        let _train = prs::nn::ops::TrainingMode::enter(11);
        let feats = m.tinysam.forward(&b.sam_pixels.to_dtype(m.mask_dtype()).unwrap()).unwrap();
        assert_eq!(feats.dtype(), DType::F16, "TinySAM ran in {:?}", feats.dtype());
        let out = m.forward(&b, true).unwrap();
        let losses = m.losses(&b, &out, &LossWeights::default()).unwrap();
        assert!(losses.total.to_scalar::<f32>().unwrap().is_finite());
        let grads = losses.total.backward().unwrap();
        (out, grads)
    };
    assert_eq!(out.mask_logits.dtype(), DType::F32);
    let before_instance_norm =
        |k: &str| k.starts_with("mask_generation.") && (k.ends_with("conv1.bias") || k.ends_with("conv2.bias"));
    assert_grads_exactly_trained_except(&grads, &m.trained, before_instance_norm);
    for p in m.trained.weights() {
        assert_eq!(p.var.dtype(), DType::F32, "{} is not an f32 master", p.key);
        let g = grads.get(p.var.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::F32, "{}", p.key);
        let finite = g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite());
        assert!(finite, "non-finite gradient for {}", p.key);
    }
    assert_ne!(stats(&m), before, "the BatchNorm running statistics did not move");

    cfg.model.mask_precision = MaskPrecision::F32;
    let m = half(&cfg);
    assert_eq!((m.dtype(), m.mask_dtype()), (DType::F16, DType::F32));
    let out = m.forward(&b, false).unwrap();
    assert_eq!(out.mask_logits.dtype(), DType::F32);
}
