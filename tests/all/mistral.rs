//! Mistral decoder + LoRA: parity with HF transformers (fixture from scripts/fixtures/gen_mistral.py),
//! KV-cache generation equals the full forward, and gradients reach exactly the LoRA tensors.

use crate::common;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use common::{assert_grads_exactly_trained, fixture, rel_err};
use prs::model::mistral::{KvCache, Mistral, MistralConfig};
use prs::nn::linear::LoraConfig;
use prs::nn::param::{ParamBuilder, TrainedParams};

struct Fx {
    cfg: MistralConfig,
    lora: LoraConfig,
    base: VarBuilder<'static>,
    adapter: VarBuilder<'static>,
    expected: std::collections::HashMap<String, Tensor>,
}

fn load() -> Fx {
    let dev = Device::Cpu;
    let cfg: MistralConfig =
        serde_json::from_str(&std::fs::read_to_string(fixture("mistral/config.json")).unwrap()).unwrap();
    let ac: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("mistral/adapter_config.json")).unwrap()).unwrap();
    let lora = LoraConfig {
        r: ac["r"].as_u64().unwrap() as usize,
        alpha: ac["lora_alpha"].as_f64().unwrap(),
        dropout: 0.0,
        target_modules: ac["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect(),
    };
    let base = unsafe {
        VarBuilder::from_mmaped_safetensors(&[fixture("mistral/model.safetensors")], DType::F32, &dev).unwrap()
    };
    let adapter = unsafe {
        VarBuilder::from_mmaped_safetensors(&[fixture("mistral/adapter_model.safetensors")], DType::F32, &dev).unwrap()
    };
    let expected = candle_core::safetensors::load(fixture("mistral/expected.safetensors"), &dev).unwrap();
    Fx { cfg, lora, base, adapter, expected }
}

fn build(fx: &Fx, reg: &TrainedParams, with_adapter: bool) -> Mistral {
    build_adapter(fx, reg, with_adapter, true)
}

/// `trained`: the adapter as f32 `Var`s (training), else frozen tensors (inference).
fn build_adapter(fx: &Fx, reg: &TrainedParams, with_adapter: bool, trained: bool) -> Mistral {
    let pb = ParamBuilder::from_checkpoint(fx.base.clone(), "fixture model", "llm", false, DType::F32, reg);
    let lpb = if with_adapter {
        ParamBuilder::from_checkpoint(
            fx.adapter.pp("base_model.model"),
            "fixture adapter",
            "lora",
            trained,
            DType::F32,
            reg,
        )
    } else {
        ParamBuilder::fresh(7, "lora", true, DType::F32, &Device::Cpu, reg)
    };
    Mistral::new(&pb, &fx.cfg, Some((&lpb, &fx.lora))).unwrap()
}

#[test]
fn hidden_states_and_logits_match_hf_with_lora() {
    let fx = load();
    let reg = TrainedParams::new();
    let m = build(&fx, &reg, true);
    // 2 layers x 5 targeted projections x (A, B)
    assert_eq!(reg.weights().len(), 20);
    let e = &fx.expected;
    let pos = e["position_ids"].to_dtype(DType::U32).unwrap();
    let hidden = m.forward_embeds(&e["inputs_embeds"], Some(&e["attention_mask"]), &pos, None).unwrap();
    let logits = m.logits(&hidden).unwrap();
    let (eh, el) = (rel_err(&hidden, &e["hidden"]), rel_err(&logits, &e["logits"]));
    println!("mistral parity: hidden rel err {eh:.2e}, logits rel err {el:.2e}");
    assert!(eh <= 1e-4, "hidden rel err {eh}");
    assert!(el <= 1e-4, "logits rel err {el}");
}

#[test]
fn fresh_lora_is_a_no_op_until_trained() {
    // PEFT init: B = 0, so the adapted model equals the base model.
    let fx = load();
    let reg = TrainedParams::new();
    let with = build(&fx, &reg, false);
    let reg2 = TrainedParams::new();
    let pb = ParamBuilder::from_checkpoint(fx.base.clone(), "fixture model", "llm", false, DType::F32, &reg2);
    let without = Mistral::new(&pb, &fx.cfg, None).unwrap();
    assert_eq!(reg2.all().len(), 0);
    let e = &fx.expected;
    let pos = e["position_ids"].to_dtype(DType::U32).unwrap();
    let a = with.forward_embeds(&e["inputs_embeds"], Some(&e["attention_mask"]), &pos, None).unwrap();
    let b = without.forward_embeds(&e["inputs_embeds"], Some(&e["attention_mask"]), &pos, None).unwrap();
    assert_eq!(rel_err(&a, &b), 0.0);
    // A is kaiming-uniform, B zeros
    for p in reg.weights() {
        let abs = p.var.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        if p.key.contains("lora_B") {
            assert_eq!(abs, 0.0, "{}", p.key);
        } else {
            assert!(abs > 0.0, "{}", p.key);
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let fx = load();
    let reg = TrainedParams::new();
    let m = build(&fx, &reg, true);
    let x = fx.expected["inputs_embeds"].narrow(0, 0, 1).unwrap(); // (1,7,H)
    let pos = Tensor::arange(0u32, 7, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let full = m.forward_embeds(&x, None, &pos, None).unwrap();
    let mut cache = KvCache::new(fx.cfg.num_hidden_layers);
    let first =
        m.forward_embeds(&x.narrow(1, 0, 4).unwrap(), None, &pos.narrow(1, 0, 4).unwrap(), Some(&mut cache)).unwrap();
    assert_eq!(cache.len(), 4);
    let mut outs = vec![first];
    for t in 4..7 {
        let o = m
            .forward_embeds(&x.narrow(1, t, 1).unwrap(), None, &pos.narrow(1, t, 1).unwrap(), Some(&mut cache))
            .unwrap();
        outs.push(o);
    }
    let inc = Tensor::cat(&outs, 1).unwrap();
    let err = rel_err(&inc, &full);
    assert!(err < 1e-5, "incremental vs full rel err {err}");
}

#[test]
fn padding_does_not_change_valid_positions() {
    // Sample 2 is 5 tokens + 2 padding: its 5 valid positions equal a forward of the 5 alone.
    let fx = load();
    let reg = TrainedParams::new();
    let m = build(&fx, &reg, true);
    let e = &fx.expected;
    let pos = e["position_ids"].to_dtype(DType::U32).unwrap();
    let batch = m.forward_embeds(&e["inputs_embeds"], Some(&e["attention_mask"]), &pos, None).unwrap();
    let alone_in = e["inputs_embeds"].narrow(0, 1, 1).unwrap().narrow(1, 0, 5).unwrap();
    let alone =
        m.forward_embeds(&alone_in, None, &pos.narrow(0, 1, 1).unwrap().narrow(1, 0, 5).unwrap(), None).unwrap();
    let err = rel_err(&batch.narrow(0, 1, 1).unwrap().narrow(1, 0, 5).unwrap(), &alone);
    assert!(err < 1e-5, "{err}");
}

#[test]
fn gradients_reach_exactly_the_lora_tensors() {
    let fx = load();
    let reg = TrainedParams::new();
    let m = build(&fx, &reg, true);
    let e = &fx.expected;
    let pos = e["position_ids"].to_dtype(DType::U32).unwrap();
    let hidden = m.forward_embeds(&e["inputs_embeds"], Some(&e["attention_mask"]), &pos, None).unwrap();
    let logits = m.logits(&hidden).unwrap();
    let loss = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().mean_all().unwrap().neg().unwrap();
    let grads = loss.backward().unwrap();
    assert_grads_exactly_trained(&grads, &reg);
}

#[test]
fn merged_lora_matches_hf_and_the_separate_branch() {
    let fx = load();
    let e = &fx.expected;
    let pos = e["position_ids"].to_dtype(DType::U32).unwrap();
    let run = |m: &Mistral| m.forward_embeds(&e["inputs_embeds"], Some(&e["attention_mask"]), &pos, None).unwrap();
    let separate = build_adapter(&fx, &TrainedParams::new(), true, false);
    let mut merged = separate.clone();
    // 2 layers x 5 targeted projections.
    assert_eq!(merged.merge_lora().unwrap(), 10);
    assert!(merged.layers().iter().flat_map(|l| l.projections()).all(|p| p.lora().is_none()));
    assert_eq!(merged.merge_lora().unwrap(), 0, "merging twice");
    let (hs, hm) = (run(&separate), run(&merged));
    let (err_sep, err_hf) = (rel_err(&hm, &hs), rel_err(&hm, &e["hidden"]));
    println!("merged LoRA: hidden rel err {err_sep:.2e} against the separate branch, {err_hf:.2e} against HF");
    assert!(err_sep < 1e-5 && err_hf <= 1e-4, "{err_sep} {err_hf}");
    // The fixture's adapter is not a no-op, so the merge changed the weights.
    let base = build_adapter(&fx, &TrainedParams::new(), false, false);
    assert!(rel_err(&run(&base), &hs) > 1e-3);
    // A trained adapter keeps its branch (it must get gradients).
    let mut trained = build_adapter(&fx, &TrainedParams::new(), true, true);
    assert_eq!(trained.merge_lora().unwrap(), 0);
    assert!(trained.layers()[0].projections()[0].lora().is_some());
}

#[test]
fn kv_cache_buffers_equal_a_growing_cache() {
    // A cache with room for every position, one that runs out after 5 of 7 and continues by
    // concatenation, and one without capacity give bit-identical hidden states.
    let fx = load();
    let m = build(&fx, &TrainedParams::new(), true);
    let x = fx.expected["inputs_embeds"].narrow(0, 0, 1).unwrap(); // (1,7,H)
    let pos = Tensor::arange(0u32, 7, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let decode = |mut cache: KvCache| -> Vec<f32> {
        let mut outs = vec![m
            .forward_embeds(&x.narrow(1, 0, 3).unwrap(), None, &pos.narrow(1, 0, 3).unwrap(), Some(&mut cache))
            .unwrap()];
        for t in 3..7 {
            outs.push(
                m.forward_embeds(&x.narrow(1, t, 1).unwrap(), None, &pos.narrow(1, t, 1).unwrap(), Some(&mut cache))
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), 7);
        Tensor::cat(&outs, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let layers = fx.cfg.num_hidden_layers;
    let growing = decode(KvCache::new(layers));
    assert_eq!(decode(KvCache::with_capacity(layers, 7)), growing);
    assert_eq!(decode(KvCache::with_capacity(layers, 5)), growing);
    assert_eq!(decode(KvCache::with_capacity(layers, 64)), growing);
}
