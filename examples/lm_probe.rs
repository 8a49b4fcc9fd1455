//! Diagnostic for tuning the tiny configuration: trains only the language path (CLIP ->
//! projector -> LoRA Mistral, LM loss) on a dataset, about 4x faster than a full step, and
//! prints the validation LM loss, the same loss with each image swapped for another one
//! (the gap is how much the answers use the image) and greedy position accuracy.
//! `PRS_PROBE_ORACLE=1` adds the true position class as a constant to every image token:
//! if the loss then drops but not without it, the LLM can route image information and the
//! vision features are what lacks position. `=lesion` marks the image tokens the mask covers
//! (no position); `=lesion_col` / `=lesion_row` also give those tokens their column's / row's
//! side. The oracles enter the losses only: greedy accuracy is measured without them, so with
//! an oracle compare the validation loss, not the accuracy.
//! `PRS_PROBE_TF=1` also prints the teacher-forced accuracy on the position words.
//! `PRS_PROBE_POSW=W` weighs the position words W times in the training loss.
//! `PRS_PROBE_LINEAR=1` instead fits a linear classifier of the position on the frozen CLIP
//! features (all tokens, flattened): high validation accuracy means the features carry the
//! position linearly and the LLM path is what fails to read it.
//! Run: cargo run --release --example lm_probe -- CONFIG DATA_ROOT STEPS [KEY=VALUE ...]
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use prs::data::prepare::{prepare, PrepareOptions};
use prs::data::sample::{collate, PreparedSample, SampleBuilder};
use prs::metrics::position::parse_position;
use prs::pipeline::build::{load_prs_med, LoadOptions, Mode};
use prs::train::optim::{AdamW, AdamWConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1])?;
    let steps: usize = args[3].parse()?;
    let cfg = prs::config::Config::parse(&text, &args[4..])?;
    let dev = Device::Cpu;
    let oracle = std::env::var("PRS_PROBE_ORACLE").ok();
    let m = load_prs_med(
        &cfg,
        &LoadOptions { device: dev.clone(), dtype: DType::F32, mode: Mode::Train, checkpoint: None, seed: 1 },
    )?;
    let prep = prepare(args[2].as_ref(), &PrepareOptions::default())?;
    let tok = prs::tokenizer::load(cfg.model.base.as_ref())?;
    let clip = m.spec.llava.vision_config()?.image_size;
    let b = SampleBuilder {
        tokenizer: tok.into(),
        template: cfg.prompt.template.clone(),
        clip_size: clip,
        sam_size: cfg.model.sam_image_size,
    };
    let train: Vec<PreparedSample> = prep.train.iter().map(|r| b.prepare(r, true)).collect::<anyhow::Result<_>>()?;
    let val_rows = &prep.val;
    let val: Vec<PreparedSample> =
        val_rows.iter().take(40).map(|r| b.prepare(r, true)).collect::<anyhow::Result<_>>()?;
    let params: Vec<_> =
        m.trained.weights().into_iter().filter(|p| p.group == "lora" || p.group == "mm_projector").collect();
    let n: usize = params.iter().map(|p| p.var.elem_count()).sum();
    println!("trained tensors {} ({n} values), train {} val {}", params.len(), train.len(), val.len());
    let tc = &cfg.train;
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            lr: tc.learning_rate,
            max_grad_norm: Some(tc.max_grad_norm),
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let bs = tc.batch_size;
    // Cosine without warm-up; `lr_at(step)` for the 1-based step ends at the minimum.
    let schedule = prs::train::schedule::LrSchedule::cosine(tc.learning_rate, tc.min_learning_rate, 0, steps as u64);
    let t0 = Instant::now();
    let lm_loss = |mb: &prs::model::prs_med::ModelBatch| -> anyhow::Result<Tensor> {
        let mut img = m.encode_image(&mb.clip_pixels)?;
        if let Some(kind) = oracle.as_deref() {
            let (bb, n, hd) = img.dims3()?;
            let v = oracle_offsets(kind, mb, &b, (bb, n, hd))?;
            img = (img + Tensor::from_vec(v, (bb, n, hd), &dev)?)?;
        }
        let inp = m.llm_inputs(&mb.prompts, &img, true)?;
        let h = m.llm.forward_embeds(&inp.embeds, Some(&inp.key_valid), &inp.position_ids, None)?;
        let (bb, t, hd) = h.dims3()?;
        let rows = Tensor::new(inp.lm_rows.as_slice(), &dev)?;
        let logits = m.llm.logits(&h.reshape((bb * t, hd))?.index_select(&rows, 0)?)?;
        let targets = Tensor::new(inp.lm_targets.as_slice(), &dev)?;
        if std::env::var("PRS_PROBE_TF").is_ok() {
            // Teacher-forced accuracy on the position words.
            let pred = logits.argmax(1)?.to_vec1::<u32>()?;
            let (mut n, mut ok) = (0, 0);
            for (p, t) in pred.iter().zip(&inp.lm_targets) {
                let w = b.tokenizer.decode(&[*t], true).map_err(anyhow::Error::msg)?;
                if ["top", "bottom", "left", "right", "center"].contains(&w.trim()) {
                    n += 1;
                    ok += (p == t) as usize;
                }
            }
            println!("teacher-forced position-word accuracy {ok}/{n}");
        }
        // PRS_PROBE_POSW=W: position words weigh W in the loss (the others 1).
        let posw: f32 = std::env::var("PRS_PROBE_POSW").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
        if posw == 1.0 {
            return Ok(candle_nn::loss::cross_entropy(&logits, &targets)?);
        }
        let w: Vec<f32> = inp
            .lm_targets
            .iter()
            .map(|t| {
                let w = b.tokenizer.decode(&[*t], true).unwrap_or_default();
                if ["top", "bottom", "left", "right", "center"].contains(&w.trim()) {
                    posw
                } else {
                    1.0
                }
            })
            .collect();
        let wsum: f32 = w.iter().sum();
        let logp = candle_nn::ops::log_softmax(&logits, 1)?;
        let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
        let w = Tensor::new(w.as_slice(), &dev)?;
        Ok(((picked * w)?.sum_all()? * (-1.0 / wsum as f64))?)
    };
    if std::env::var("PRS_PROBE_LINEAR").is_ok() {
        return linear_probe(&m, &b, &train, &val, steps);
    }
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = 12345u64;
    for step in 1..=steps {
        if (step - 1) * bs % train.len() < bs {
            for i in (1..order.len()).rev() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (rng >> 33) as usize % (i + 1));
            }
        }
        let items: Vec<&PreparedSample> = (0..bs).map(|k| &train[order[((step - 1) * bs + k) % train.len()]]).collect();
        let mb = collate(&items, &dev)?;
        opt.set_lr(schedule.lr_at(step as u64));
        let l = {
            let _t = prs::nn::ops::TrainingMode::enter(step as u64);
            lm_loss(&mb)?
        };
        let g = l.backward()?;
        let rep = opt.step(&g)?;
        if step % 25 == 0 || step == steps {
            let _e = prs::nn::ops::EvalMode::enter();
            let items: Vec<&PreparedSample> = val.iter().collect();
            let vb = collate(&items, &dev)?;
            let vl = lm_loss(&vb)?.to_scalar::<f32>()?;
            let n = vb.clip_pixels.dim(0)?;
            let rolled = Tensor::cat(&[vb.clip_pixels.narrow(0, 1, n - 1)?, vb.clip_pixels.narrow(0, 0, 1)?], 0)?;
            let shuffled = prs::model::prs_med::ModelBatch { clip_pixels: rolled, ..vb };
            let vs = lm_loss(&shuffled)?.to_scalar::<f32>()?;
            let mut correct = 0;
            let mut example = String::new();
            if step % 100 == 0 || step == steps {
                for s in &val {
                    let mut one = collate(&[s], &dev)?;
                    one.prompts[0].answer.clear();
                    let greedy = prs::pipeline::generate::GenerateOptions { max_new_tokens: 24, ..Default::default() };
                    let ids = prs::pipeline::generate::predict_batch(&m, &one, &greedy)?.answers.remove(0);
                    let text = b.tokenizer.decode(&ids, true).map_err(anyhow::Error::msg)?;
                    let truth =
                        parse_position(&b.tokenizer.decode(&s.prompt.answer, true).map_err(anyhow::Error::msg)?);
                    if parse_position(&text) == truth {
                        correct += 1;
                    }
                    example = text;
                }
            }
            println!(
                "step {step} train {:.3} val {vl:.3} wrong-image {vs:.3} pos_acc {:.3} gnorm {:.2} t {:.0}s | {example}",
                l.to_scalar::<f32>()?,
                correct as f64 / val.len() as f64,
                rep.grad_norm,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// What `PRS_PROBE_ORACLE=kind` adds to the (B, N, H) image embeddings, flattened. Every
/// kind sets at most two channels per token to +-3.
fn oracle_offsets(
    kind: &str,
    mb: &prs::model::prs_med::ModelBatch,
    b: &SampleBuilder,
    (bb, n, hd): (usize, usize, usize),
) -> anyhow::Result<Vec<f32>> {
    let mut v = vec![0f32; bb * n * hd];
    if !kind.starts_with("lesion") {
        // The true class, read from the answer, on every token.
        for (i, p) in mb.prompts.iter().enumerate() {
            let text = b.tokenizer.decode(&p.answer, true).map_err(anyhow::Error::msg)?;
            let c = parse_position(&text) as usize;
            for k in 0..n {
                v[(i * n + k) * hd + c] = 3.0;
            }
        }
        return Ok(v);
    }
    // Mask coverage per token of the g x g CLIP grid: (B,1,S,S) -> (B, g*g).
    let g = (n as f64).sqrt() as usize;
    let masks = mb.masks.as_ref().expect("training batch has masks");
    let cover = masks.avg_pool2d(masks.dim(2)? / g)?.flatten_from(1)?.to_vec2::<f32>()?;
    let side = |x: usize| if x < g / 2 { -3.0 } else { 3.0 };
    for (i, row) in cover.iter().enumerate() {
        for (k, _) in row.iter().enumerate().filter(|(_, &c)| c > 0.25) {
            let t = (i * n + k) * hd;
            v[t] = 3.0;
            match kind {
                "lesion_col" => v[t + 1] = side(k % g),
                "lesion_row" => v[t + 1] = side(k / g),
                _ => {}
            }
        }
    }
    Ok(v)
}

/// Softmax regression of the position class on the standardised, flattened CLIP features.
fn linear_probe(
    m: &prs::model::prs_med::PrsMed,
    b: &SampleBuilder,
    train: &[PreparedSample],
    val: &[PreparedSample],
    steps: usize,
) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let feats = |set: &[PreparedSample]| -> anyhow::Result<(Tensor, Tensor)> {
        let mut xs = vec![];
        let mut ys = vec![];
        for chunk in set.chunks(32) {
            let items: Vec<&PreparedSample> = chunk.iter().collect();
            let mb = collate(&items, &dev)?;
            xs.push(m.clip.forward(&mb.clip_pixels)?.flatten_from(1)?);
            for s in chunk {
                let text = b.tokenizer.decode(&s.prompt.answer, true).map_err(anyhow::Error::msg)?;
                ys.push(parse_position(&text) as u32);
            }
        }
        Ok((Tensor::cat(&xs, 0)?, Tensor::new(ys.as_slice(), &dev)?))
    };
    let (xt, yt) = feats(train)?;
    let (xv, yv) = feats(val)?;
    let mean = xt.mean_keepdim(0)?;
    let std = (xt.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
    let norm = |x: &Tensor| -> anyhow::Result<Tensor> { Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?) };
    let (xt, xv) = (norm(&xt)?, norm(&xv)?);
    let d = xt.dim(1)?;
    let w = candle_core::Var::zeros((d, 6), DType::F32, &dev)?;
    let bias = candle_core::Var::zeros(6, DType::F32, &dev)?;
    let params = candle_nn::ParamsAdamW { lr: 1e-3, weight_decay: 1e-2, ..Default::default() };
    let mut opt = <candle_nn::AdamW as candle_nn::Optimizer>::new(vec![w.clone(), bias.clone()], params)?;
    let acc = |x: &Tensor, y: &Tensor| -> anyhow::Result<f64> {
        let pred = x.matmul(w.as_tensor())?.broadcast_add(bias.as_tensor())?.argmax(1)?;
        let ok = pred.eq(y)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        Ok(ok as f64 / y.dim(0)? as f64)
    };
    println!("linear probe on {d} CLIP feature values: {} train, {} val samples", yt.dim(0)?, yv.dim(0)?);
    for step in 1..=steps {
        let logits = xt.matmul(w.as_tensor())?.broadcast_add(bias.as_tensor())?;
        let loss = candle_nn::loss::cross_entropy(&logits, &yt)?;
        candle_nn::Optimizer::backward_step(&mut opt, &loss)?;
        if step % 100 == 0 || step == steps {
            println!(
                "step {step} loss {:.3} train acc {:.3} val acc {:.3}",
                loss.to_scalar::<f32>()?,
                acc(&xt, &yt)?,
                acc(&xv, &yv)?
            );
        }
    }
    Ok(())
}
