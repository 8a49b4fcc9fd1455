//! Times the parts of one tiny-model training step on the CPU (forward of each component,
//! then the full forward + backward), to see where a step's time goes.
//! Run: cargo run --release --example step_profile -- DIR_WITH_INIT_MODEL DATA_ROOT
use std::time::Instant;

use candle_core::{DType, Device};
use prs::data::prepare::{prepare, PrepareOptions};
use prs::data::sample::{collate, PreparedSample, SampleBuilder};
use prs::model::prs_med::LossWeights;
use prs::pipeline::build::{load_prs_med, LoadOptions, Mode};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = prs::config::Config::load("configs/tiny.toml".as_ref())?;
    cfg.model.base = args[1].clone();
    let m = load_prs_med(
        &cfg,
        &LoadOptions { device: Device::Cpu, dtype: DType::F32, mode: Mode::Train, checkpoint: None, seed: 1 },
    )?;
    let prep = prepare(args[2].as_ref(), &PrepareOptions::default())?;
    let tok = prs::tokenizer::load(cfg.model.base.as_ref())?;
    let b = SampleBuilder {
        tokenizer: tok.into(),
        template: cfg.prompt.template.clone(),
        clip_size: 112,
        sam_size: cfg.model.sam_image_size,
    };
    let t = Instant::now();
    let s: Vec<PreparedSample> =
        prep.train.iter().take(16).map(|r| b.prepare(r, true)).collect::<anyhow::Result<_>>()?;
    println!("prepare 16 samples: {:.3}s", t.elapsed().as_secs_f64());
    let items: Vec<&PreparedSample> = s.iter().collect();
    let mb = collate(&items, &Device::Cpu)?;
    let _tm = prs::nn::ops::TrainingMode::enter(1);
    for _ in 0..2 {
        let t = Instant::now();
        let mut x = m.tinysam.patch_embed(&mb.sam_pixels)?;
        let mut line = format!("tinysam: patch_embed {:.3}", t.elapsed().as_secs_f64());
        for l in 0..m.tinysam.num_stages() {
            let t = Instant::now();
            x = m.tinysam.forward_stage(l, &x)?;
            line += &format!("  stage{l} {:.3}", t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        let _ = m.tinysam.neck(&x)?;
        println!("{line}  neck {:.3}", t.elapsed().as_secs_f64());
    }
    for _ in 0..2 {
        let t = Instant::now();
        let img = m.encode_image(&mb.clip_pixels)?;
        let t1 = t.elapsed().as_secs_f64();
        let inp = m.llm_inputs(&mb.prompts, &img, true)?;
        let h = m.llm.forward_embeds(&inp.embeds, Some(&inp.key_valid), &inp.position_ids, None)?;
        let t2 = t.elapsed().as_secs_f64();
        let feats = m.tinysam.forward(&mb.sam_pixels)?;
        let t3 = t.elapsed().as_secs_f64();
        let mask = m.decoder.forward(&feats, &h, &inp.prompt_valid)?;
        let t4 = t.elapsed().as_secs_f64();
        let out = m.forward(&mb, true)?;
        let t5 = t.elapsed().as_secs_f64();
        let l = m.losses(&mb, &out, &LossWeights::default())?;
        let t6 = t.elapsed().as_secs_f64();
        let _g = l.total.backward()?;
        let t7 = t.elapsed().as_secs_f64();
        let _ = mask;
        println!(
            "clip+proj {:.3}  llm {:.3}  tinysam {:.3}  decoder {:.3}  | full forward {:.3}  losses {:.3}  backward {:.3}",
            t1, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6
        );
    }
    Ok(())
}
