//! AdamW, clipping, skipping, state I/O, loss scaling and the learning-rate schedule.
//! Parity reference: torch.optim.AdamW + clip_grad_norm_ (scripts/fixtures/gen_optim.py).

use crate::common;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use common::{fixture, rel_err};
use prs::nn::param::{ParamKind, TrainedParam};
use prs::train::optim::{decays, AdamW, AdamWConfig, LossScaler, StepStatus};
use prs::train::schedule::{LrSchedule, ScheduleKind};
use serde_json::Value;

fn param(key: &str, t: &Tensor) -> TrainedParam {
    TrainedParam { group: "g".into(), key: key.into(), kind: ParamKind::Weight, var: Var::from_tensor(t).unwrap() }
}

fn seeded(dims: &[usize], seed: u64) -> Tensor {
    let shape = candle_core::Shape::from(dims.to_vec());
    prs::nn::param::init_tensor(&shape, prs::nn::param::Init::Normal(1.0), seed, DType::F32, &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn vec_of(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn adamw_matches_torch() {
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(fixture("optim/adamw.json")).unwrap()).unwrap();
    let c = &fx["config"];
    let f = |k: &str| c[k].as_f64().unwrap();
    let sched = LrSchedule::cosine(
        f("lr"),
        f("min_lr"),
        c["warmup_steps"].as_u64().unwrap(),
        c["total_steps"].as_u64().unwrap(),
    );
    sched.validate().unwrap();
    let cfg = AdamWConfig {
        lr: f("lr"),
        beta1: f("beta1"),
        beta2: f("beta2"),
        eps: f("eps"),
        weight_decay: f("weight_decay"),
        max_grad_norm: Some(f("max_grad_norm")),
    };
    let shapes: HashMap<String, Vec<usize>> = fx["shapes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
        .collect();
    let keys: Vec<String> = fx["initial"].as_object().unwrap().keys().cloned().collect();
    let params: Vec<TrainedParam> = keys
        .iter()
        .map(|k| param(k, &Tensor::from_vec(vec_of(&fx["initial"][k]), shapes[k].as_slice(), &Device::Cpu).unwrap()))
        .collect();
    let mut opt = AdamW::new(params.clone(), cfg).unwrap();
    // The parameter groups agree with the fixture's (built by rank in Python, by rule here).
    let mut decay: Vec<String> = opt.groups().into_iter().filter(|g| g.2).map(|g| g.1).collect();
    let mut want: Vec<String> = fx["decay"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect();
    decay.sort();
    want.sort();
    assert_eq!(decay, want);

    let mut worst = 0f32;
    for (step, s) in fx["steps"].as_array().unwrap().iter().enumerate() {
        let lr = sched.lr_at(step as u64);
        let want_lr = s["lr"].as_f64().unwrap();
        assert!((lr - want_lr).abs() <= 1e-12 * want_lr, "step {step}: lr {lr} vs {want_lr}");
        opt.set_lr(lr);
        let mut grads = GradStore::default();
        for p in &params {
            if let Some(g) = s["grads"].get(&p.key) {
                grads.insert(p.var.as_tensor(), Tensor::from_vec(vec_of(g), p.var.dims(), &Device::Cpu).unwrap());
            }
        }
        let r = opt.step(&grads).unwrap();
        assert_eq!(r.status, StepStatus::Applied);
        assert_eq!(r.without_grad, if step == 3 { 1 } else { 0 });
        let want_norm = s["grad_norm"].as_f64().unwrap();
        assert!(
            (r.grad_norm - want_norm).abs() <= 1e-6 * want_norm,
            "step {step}: norm {} vs {want_norm}",
            r.grad_norm
        );
        for p in &params {
            let want = Tensor::from_vec(vec_of(&s["params"][&p.key]), p.var.dims(), &Device::Cpu).unwrap();
            let e = rel_err(p.var.as_tensor(), &want);
            worst = worst.max(e);
            assert!(e < 1e-6, "step {step} {}: rel err {e}", p.key);
        }
    }
    println!("AdamW vs torch: max relative error over 6 steps {worst:e}");
    assert_eq!(opt.steps(), 6);
}

#[test]
fn group_rule_and_no_decay_on_1d() {
    assert!(decays("q_proj.lora_A.weight", &[4, 8]));
    assert!(!decays("layer.bias", &[4]));
    assert!(!decays("proj.bias", &[1, 4]));
    assert!(!decays("model.layers.0.input_layernorm.weight", &[1, 8]));
    assert!(!decays("mask_decoder.norm1.weight", &[8]));
    assert!(!decays("scale", &[]));

    // Zero gradients: the Adam term is exactly 0, so only decoupled decay moves a tensor.
    let tensors =
        [("w", vec![3, 4]), ("b", vec![4]), ("proj.bias", vec![1, 4]), ("input_layernorm.weight", vec![1, 4])];
    let params: Vec<TrainedParam> =
        tensors.iter().enumerate().map(|(i, (k, d))| param(k, &seeded(d, i as u64))).collect();
    let before: Vec<Tensor> = params.iter().map(|p| p.var.as_tensor().copy().unwrap()).collect();
    let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.5, max_grad_norm: None, ..Default::default() };
    let mut opt = AdamW::new(params.clone(), cfg).unwrap();
    let mut grads = GradStore::default();
    for p in &params {
        grads.insert(p.var.as_tensor(), p.var.zeros_like().unwrap());
    }
    assert_eq!(opt.step(&grads).unwrap().status, StepStatus::Applied);
    let decayed = (&before[0] * 0.95).unwrap();
    assert_eq!(bits(params[0].var.as_tensor()), bits(&decayed), "2-D weight must decay by 1 - lr*wd");
    for (p, b) in params.iter().zip(&before).skip(1) {
        assert_eq!(bits(p.var.as_tensor()), bits(b), "{} must not decay", p.key);
    }
}

#[test]
fn clipping_scales_gradients_and_reports_pre_clip_norm() {
    let run = |g1: Vec<f32>, g2: Vec<f32>, max: Option<f64>| {
        let params = vec![
            param("a", &Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap()),
            param("b", &Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap()),
        ];
        let mut opt = AdamW::new(params.clone(), AdamWConfig { max_grad_norm: max, ..Default::default() }).unwrap();
        let mut grads = GradStore::default();
        grads.insert(params[0].var.as_tensor(), Tensor::new(g1.as_slice(), &Device::Cpu).unwrap());
        grads.insert(params[1].var.as_tensor(), Tensor::new(g2.as_slice(), &Device::Cpu).unwrap());
        let r = opt.step(&grads).unwrap();
        let m = opt.moments("g", "b").unwrap().0.to_vec1::<f32>().unwrap();
        (r, m)
    };
    // |(3, 0, 0, 4)| = 5 > 1: gradients scaled by 1 / (5 + 1e-6); m = (1 - beta1) g after one step.
    let (r, m) = run(vec![3.0, 0.0], vec![0.0, 4.0], Some(1.0));
    assert!((r.grad_norm - 5.0).abs() < 1e-6, "norm {}", r.grad_norm);
    let coef = 1.0 / (5.0 + 1e-6);
    assert!((r.clip_coef - coef).abs() < 1e-12);
    assert!((m[1] as f64 - 0.1 * 4.0 * coef).abs() < 1e-7, "m {m:?}");
    // Below the threshold: unchanged.
    let (r, m) = run(vec![0.3, 0.0], vec![0.0, 0.4], Some(1.0));
    assert!((r.grad_norm - 0.5).abs() < 1e-6 && r.clip_coef == 1.0);
    assert!((m[1] - 0.04).abs() < 1e-8);
    // No clipping configured: norm still reported.
    let (r, m) = run(vec![3.0, 0.0], vec![0.0, 4.0], None);
    assert!((r.grad_norm - 5.0).abs() < 1e-6 && r.clip_coef == 1.0);
    assert!((m[1] - 0.4).abs() < 1e-7);
}

#[test]
fn non_finite_gradient_skips_the_step() {
    let params = vec![param("w", &seeded(&[3, 2], 1)), param("b", &seeded(&[2], 2))];
    let mut opt = AdamW::new(params.clone(), AdamWConfig { lr: 0.01, ..Default::default() }).unwrap();
    let grads_of = |scale: f32, poison: Option<f32>| {
        let mut g = GradStore::default();
        g.insert(params[0].var.as_tensor(), (seeded(&[3, 2], 3) * scale as f64).unwrap());
        let mut b = vec![0.5f32, -0.25];
        if let Some(v) = poison {
            b[1] = v;
        }
        g.insert(params[1].var.as_tensor(), Tensor::new(b.as_slice(), &Device::Cpu).unwrap());
        g
    };
    opt.step(&grads_of(1.0, None)).unwrap(); // non-zero moments first
    let snapshot = |opt: &AdamW| -> Vec<Vec<u32>> {
        let mut v: Vec<Vec<u32>> = params.iter().map(|p| bits(p.var.as_tensor())).collect();
        for p in &params {
            let (m, s) = opt.moments("g", &p.key).unwrap();
            v.push(bits(&m));
            v.push(bits(&s));
        }
        v
    };
    let before = snapshot(&opt);
    for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let r = opt.step(&grads_of(1.0, Some(poison))).unwrap();
        assert_eq!(r.status, StepStatus::SkippedNonFinite, "{poison}");
        assert!(r.skipped() && !r.grad_norm.is_finite());
        assert_eq!(snapshot(&opt), before, "parameters or moments changed by a skipped step ({poison})");
        assert_eq!(opt.steps(), 1);
    }
    assert_eq!(opt.step(&grads_of(1.0, None)).unwrap().status, StepStatus::Applied);
    assert_eq!(opt.steps(), 2);
    assert_ne!(snapshot(&opt), before);
}

/// Gradients of a small regression loss at the current parameter values (a real backward).
fn grads_at(w: &Var, b: &Var, step: u64) -> GradStore {
    let x = seeded(&[5, 4], 100 + step);
    let t = seeded(&[5, 3], 200 + step);
    let y = x.matmul(&w.as_tensor().t().unwrap()).unwrap().broadcast_add(b.as_tensor()).unwrap();
    let loss = (y - t).unwrap().sqr().unwrap().mean_all().unwrap();
    loss.backward().unwrap()
}

#[test]
fn state_save_load_continues_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let sched = LrSchedule::cosine(1e-2, 1e-4, 2, 6);
    let cfg = AdamWConfig { weight_decay: 0.1, max_grad_norm: Some(0.5), ..Default::default() };
    let new_params = |w: &Tensor, b: &Tensor| (param("w", w), param("b", b));
    let run = |opt: &mut AdamW, w: &Var, b: &Var, steps: std::ops::Range<u64>| {
        for s in steps {
            opt.set_lr(sched.lr_at(s));
            assert_eq!(opt.step(&grads_at(w, b, s)).unwrap().status, StepStatus::Applied);
        }
    };
    let (w0, b0) = (seeded(&[3, 4], 1), seeded(&[3], 2));

    let (pw, pb) = new_params(&w0, &b0);
    let mut full = AdamW::new(vec![pw.clone(), pb.clone()], cfg.clone()).unwrap();
    run(&mut full, &pw.var, &pb.var, 0..6);

    let (qw, qb) = new_params(&w0, &b0);
    let mut first = AdamW::new(vec![qw.clone(), qb.clone()], cfg.clone()).unwrap();
    run(&mut first, &qw.var, &qb.var, 0..3);
    let state = dir.path().join("optimizer.safetensors");
    let weights = dir.path().join("weights.safetensors");
    first.save_state(&state).unwrap();
    let w: HashMap<String, Tensor> =
        [("w".to_string(), qw.var.as_tensor().clone()), ("b".to_string(), qb.var.as_tensor().clone())].into();
    candle_core::safetensors::save(&w, &weights).unwrap();
    drop((first, qw, qb));

    let loaded = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let (rw, rb) = new_params(&loaded["w"], &loaded["b"]);
    let mut resumed = AdamW::new(vec![rw.clone(), rb.clone()], cfg.clone()).unwrap();
    resumed.load_state(&state).unwrap();
    assert_eq!(resumed.steps(), 3);
    run(&mut resumed, &rw.var, &rb.var, 3..6);

    assert_eq!(bits(rw.var.as_tensor()), bits(pw.var.as_tensor()));
    assert_eq!(bits(rb.var.as_tensor()), bits(pb.var.as_tensor()));
    for k in ["w", "b"] {
        let (m1, v1) = full.moments("g", k).unwrap();
        let (m2, v2) = resumed.moments("g", k).unwrap();
        assert_eq!((bits(&m1), bits(&v1)), (bits(&m2), bits(&v2)), "moments of {k}");
    }
    assert_eq!(resumed.steps(), 6);

    // Mismatched states are refused with the offending key named.
    let err = |params: Vec<TrainedParam>| -> String {
        let mut o = AdamW::new(params, cfg.clone()).unwrap();
        format!("{:#}", o.load_state(&state).unwrap_err())
    };
    let e = err(vec![param("w", &w0), param("c", &b0)]);
    assert!(e.contains("adamw/g/c/exp_avg"), "{e}");
    let e = err(vec![param("w", &seeded(&[4, 4], 1)), param("b", &b0)]);
    assert!(e.contains("adamw/g/w/exp_avg") && e.contains("shape"), "{e}");
    let e = err(vec![param("w", &w0)]);
    assert!(e.contains("g/b") && e.contains("not a trained tensor"), "{e}");
}

#[test]
fn loss_scaler_grows_halves_and_skips() {
    let mut s = LossScaler::new(1024.0, 3, 2.0);
    s.update(false);
    s.update(false);
    assert_eq!((s.scale, s.good_steps()), (1024.0, 2));
    s.update(false);
    assert_eq!((s.scale, s.good_steps()), (2048.0, 0));
    s.update(false);
    s.update(true);
    assert_eq!((s.scale, s.good_steps()), (1024.0, 0));

    // step_scaled on gradients times the scale == step on the true gradients, bit for bit
    // (the scale is a power of two), and the scaler counts the good step.
    let mk = || vec![param("w", &seeded(&[3, 4], 1)), param("b", &seeded(&[3], 2))];
    let (pa, pb) = (mk(), mk());
    let cfg = AdamWConfig { lr: 1e-2, max_grad_norm: Some(0.1), ..Default::default() };
    let (mut oa, mut ob) = (AdamW::new(pa.clone(), cfg.clone()).unwrap(), AdamW::new(pb.clone(), cfg).unwrap());
    let ga = grads_at(&pa[0].var, &pa[1].var, 0);
    let mut gb = GradStore::default();
    for (p, q) in pa.iter().zip(&pb) {
        gb.insert(q.var.as_tensor(), (ga.get(p.var.as_tensor()).unwrap() * s.scale).unwrap());
    }
    let ra = oa.step(&ga).unwrap();
    let rb = ob.step_scaled(&gb, &mut s).unwrap();
    assert_eq!(rb.status, StepStatus::Applied);
    assert!((ra.grad_norm - rb.grad_norm).abs() <= 1e-6 * ra.grad_norm);
    for (p, q) in pa.iter().zip(&pb) {
        assert_eq!(bits(p.var.as_tensor()), bits(q.var.as_tensor()), "{}", p.key);
    }
    assert_eq!((s.scale, s.good_steps()), (1024.0, 1));

    // Overflow: skipped, parameters unchanged, scale halved.
    let before = bits(pb[0].var.as_tensor());
    gb.insert(pb[1].var.as_tensor(), Tensor::new(&[f32::INFINITY, 0.0, 1.0], &Device::Cpu).unwrap());
    assert!(ob.step_scaled(&gb, &mut s).unwrap().skipped());
    assert_eq!(bits(pb[0].var.as_tensor()), before);
    assert_eq!((s.scale, s.good_steps()), (512.0, 0));

    // unscale: divides in place and reports the overflow.
    let mut g = GradStore::default();
    g.insert(pb[0].var.as_tensor(), (seeded(&[3, 4], 5) * 512.0).unwrap());
    assert!(!s.unscale(&mut g, &pb).unwrap());
    assert!(rel_err(g.get(pb[0].var.as_tensor()).unwrap(), &seeded(&[3, 4], 5)) == 0.0);
    g.insert(pb[1].var.as_tensor(), Tensor::new(&[f32::NAN, 0.0, 1.0], &Device::Cpu).unwrap());
    assert!(s.unscale(&mut g, &pb).unwrap());

    // State round trip.
    let st = s.state_tensors(&Device::Cpu).unwrap();
    let mut t = LossScaler::default();
    t.load_state_tensors(&st, "memory").unwrap();
    assert_eq!(t.scale, 512.0);
    assert_eq!(t.good_steps(), 0);
    assert!(t.load_state_tensors(&HashMap::new(), "empty").is_err());
}

#[test]
fn loss_scaling_rescues_f16_gradients() {
    // d/dw of 1e-4 * sum(w * x) with x = 1e-4 is 1e-8: below f16's smallest subnormal.
    let w = Var::from_tensor(&Tensor::ones(8, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let x = (Tensor::ones(8, DType::F16, &Device::Cpu).unwrap() * 1e-4).unwrap();
    // f16 compute, loss in f32 (as the trainer does).
    let loss = || {
        let s = (w.as_tensor().to_dtype(DType::F16).unwrap() * &x).unwrap().sum_all().unwrap();
        (s.to_dtype(DType::F32).unwrap() * 1e-4).unwrap()
    };
    let plain = loss().backward().unwrap();
    let g = plain.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert!(g.iter().all(|v| *v == 0.0), "expected f16 underflow, got {g:?}");
    let s = LossScaler::default();
    let mut scaled = s.scale_loss(&loss()).unwrap().backward().unwrap();
    let p = vec![TrainedParam { group: "g".into(), key: "w".into(), kind: ParamKind::Weight, var: w.clone() }];
    assert!(!s.unscale(&mut scaled, &p).unwrap());
    let g = scaled.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert!(g.iter().all(|v| (v - 1e-8).abs() < 1e-9), "{g:?}");
}

#[test]
fn schedule_values() {
    let s = LrSchedule::cosine(1e-4, 1e-6, 10, 110);
    s.validate().unwrap();
    assert!((s.lr_at(0) - 1e-5).abs() < 1e-18, "warm-up starts at lr / warmup");
    assert!((s.lr_at(4) - 5e-5).abs() < 1e-18);
    assert_eq!(s.lr_at(9), 1e-4, "warm-up ends at lr");
    assert_eq!(s.lr_at(10), 1e-4, "cosine starts at lr");
    assert!((s.lr_at(60) - (1e-4 + 1e-6) / 2.0).abs() < 1e-15, "half-way is the mean");
    assert_eq!(s.lr_at(110), 1e-6, "cosine ends at min_lr");
    assert_eq!(s.lr_at(1000), 1e-6);
    assert!(s.lr_at(109) > 1e-6 && s.lr_at(109) < 1.05e-6);
    let lrs: Vec<f64> = (10..=110).map(|i| s.lr_at(i)).collect();
    assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "cosine must not increase");

    let no_warm = LrSchedule::cosine(1e-4, 1e-6, 0, 100);
    assert_eq!(no_warm.lr_at(0), 1e-4);
    let c = LrSchedule::constant(3e-4, 4);
    assert_eq!(c.kind, ScheduleKind::Constant);
    assert!((c.lr_at(0) - 7.5e-5).abs() < 1e-18);
    assert_eq!(c.lr_at(3), 3e-4);
    assert_eq!(c.lr_at(12345), 3e-4);
    assert!(LrSchedule::cosine(1e-4, 1e-6, 10, 10).validate().is_err());
    assert!(LrSchedule::cosine(1e-4, 1e-3, 0, 10).validate().is_err());
    // Config files name the kind in lowercase.
    let parsed: LrSchedule =
        serde_json::from_str(r#"{"kind":"cosine","lr":1e-4,"min_lr":1e-6,"warmup_steps":0,"total_steps":5}"#).unwrap();
    assert_eq!(parsed, LrSchedule::cosine(1e-4, 1e-6, 0, 5));
}

/// The fused update (one pass per tensor on the CPU, one launch on CUDA) against the composite
/// it replaces: bit for bit, over tensors that decay and that do not, with and without a
/// gradient factor, at the first and a later step, with zeros and negative values in the state.
#[test]
fn fused_adamw_equals_the_composite_bit_for_bit() {
    use prs::train::fused_adamw::{composite_update, fused_update, sum_of_squares, SlotUpdate, StepHyper};
    let shapes: [&[usize]; 4] = [&[16, 40], &[40], &[3, 5, 7], &[70_000]];
    for (coef, step) in [(1.0, 1u64), (0.37, 1), (1.0, 9), (2.5e-3, 1000)] {
        let h = StepHyper { lr: 3e-4, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.05, coef };
        let mk = |seed: u64| -> Vec<(Var, Tensor, Tensor, Tensor, bool)> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, dims)| {
                    let s = seed + 10 * i as u64;
                    // The first moment starts at exactly zero in places (a fresh optimizer).
                    let m = (seeded(dims, s + 2) * 0.01).unwrap().relu().unwrap();
                    let v = (seeded(dims, s + 3).sqr().unwrap() * 1e-4).unwrap();
                    (Var::from_tensor(&seeded(dims, s)).unwrap(), seeded(dims, s + 1), m, v, i % 2 == 0)
                })
                .collect()
        };
        let run = |fused: bool| -> Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> {
            let mut state = mk(7);
            let mut updates: Vec<SlotUpdate> = state
                .iter_mut()
                .map(|(p, g, m, v, decays)| SlotUpdate {
                    param: p,
                    grad: g.clone(),
                    exp_avg: m,
                    exp_avg_sq: v,
                    decays: *decays,
                    step,
                })
                .collect();
            if fused {
                fused_update(&mut updates, &h).unwrap();
            } else {
                composite_update(&mut updates, &h).unwrap();
            }
            drop(updates);
            state.iter().map(|(p, _, m, v, _)| (bits(p.as_tensor()), bits(m), bits(v))).collect()
        };
        let (fused, composite) = (run(true), run(false));
        let before = mk(7);
        for (i, (f, c)) in fused.iter().zip(&composite).enumerate() {
            assert_eq!(f, c, "tensor {i} (coef {coef}, step {step})");
            assert_ne!(f.0, bits(before[i].0.as_tensor()), "tensor {i} did not move");
        }
    }
    // The norm's sum of squares, against the plain sum.
    let g = [seeded(&[300], 1), seeded(&[5, 9], 2)];
    let want: f64 =
        g.iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).map(|x| (x as f64).powi(2)).sum();
    let got = sum_of_squares(&[&g[0], &g[1]], false).unwrap();
    let wide = sum_of_squares(&[&g[0], &g[1]], true).unwrap();
    assert!((wide - want).abs() <= 1e-12 * want, "{wide} vs {want}");
    let huge = Tensor::new(&[3e30f32], &Device::Cpu).unwrap();
    let sq = sum_of_squares(&[&huge], true).unwrap();
    assert!((sq / 9e60 - 1.0).abs() < 1e-6, "a finite weight's square overflowed: {sq}");
    assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
    let nan = Tensor::new(&[1f32, f32::NAN], &Device::Cpu).unwrap();
    assert!(!sum_of_squares(&[&g[0], &nan], false).unwrap().is_finite());
}
