//! Inference benchmark on the tiny model (CPU): `prs predict` latency (load, encode, generate
//! per token) and `prs evaluate` throughput (images/s) on a synthetic test split.
//!
//!     PRS_TOKENIZER_MODEL=.cache/assets/tokenizer.model.v1 cargo run --release --example bench_infer
//!
//! Options (environment): BENCH_TOKENS (generated tokens per answer, default 32), BENCH_RUNS
//! (predict repetitions, default 5), BENCH_IMAGES (test images per modality, three modalities,
//! default 10), BENCH_BATCH (evaluate batch size, default 4).

use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use clap::Parser;
use prs::data::preprocess::{clip_preprocess, load_image, sam_preprocess};
use prs::model::prs_med::ModelBatch;
use prs::pipeline::generate::{predict_batch, GenerateOptions};
use prs::pipeline::load::{load_model, ModelArgs};

#[path = "support/tiny.rs"]
mod tiny;
use tiny::tiny;

#[derive(Parser)]
struct EvalCli {
    #[command(flatten)]
    a: prs::commands::evaluate::EvaluateArgs,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let tokens = env_usize("BENCH_TOKENS", 32);
    let runs = env_usize("BENCH_RUNS", 5).max(1);
    let per_mod = env_usize("BENCH_IMAGES", 10).max(1);
    let batch = env_usize("BENCH_BATCH", 4).max(1);
    let dir = tempfile::tempdir()?;
    let (cfg, ckpt) = tiny(dir.path())?;
    let data = dir.path().join("data");
    let synth = prs::data::synth::SynthConfig { train: 1, val: 0, test: per_mod, size: 128, seed: 0 };
    prs::data::synth::generate(&data, &synth, false)?;

    // predict: load once per run (cold files are warm after the first), then one image.
    let args = ModelArgs { device: "cpu".into(), ..Default::default() };
    let image = data.join("brain_tumors_ct_scan/test_images/0.png");
    let (mut load, mut enc, mut per_tok) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let loaded = load_model(&ckpt, &args)?;
        load.push(loaded.load_secs);
        let img = load_image(&image)?;
        let clip = loaded.model.spec.llava.vision_config()?.image_size;
        let prompt = prs::tokenizer::encode_prompt(
            &loaded.tokenizer,
            &cfg.prompt.template,
            "Where is the tumor located in this brain CT scan?",
            None,
        )?;
        let b = ModelBatch {
            clip_pixels: Tensor::stack(&[clip_preprocess(&img, clip)?], 0)?,
            sam_pixels: Tensor::stack(&[sam_preprocess(&img, cfg.model.sam_image_size)?], 0)?,
            prompts: vec![prompt],
            masks: None,
            modality: None,
        };
        // A fixed answer length (no EOS stop) so per-token times compare across runs.
        let g = GenerateOptions { max_new_tokens: tokens, stop_at_eos: false, ..Default::default() };
        let out = predict_batch(&loaded.model, &b, &g)?;
        enc.push(out.encode_secs);
        per_tok.push(out.decode_secs / out.decode_steps.max(1) as f64);
    }
    println!("predict (tiny model, CPU, median of {runs}):");
    println!("  load      {:8.2} ms", 1e3 * median(load));
    println!("  encode    {:8.2} ms  (CLIP + prompt prefill + TinySAM + mask decoder)", 1e3 * median(enc));
    println!("  generate  {:8.3} ms/token  ({tokens} tokens, KV cache, greedy)", 1e3 * median(per_tok));

    // evaluate: predictions + scoring over the synthetic test split.
    let out = dir.path().join("eval");
    let n = 3 * per_mod;
    let cli = EvalCli::try_parse_from([
        "prs",
        "--checkpoint",
        &ckpt.display().to_string(),
        "--device",
        "cpu",
        "--data-root",
        &data.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--batch-size",
        &batch.to_string(),
        "--max-new-tokens",
        "16",
        "--worst",
        "0",
    ])?;
    let t0 = Instant::now();
    prs::commands::evaluate::run(&cli.a)?;
    let total = t0.elapsed().as_secs_f64();
    let sum: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json"))?)?;
    println!("evaluate (tiny model, CPU, {n} images of 128x128, batch {batch}, up to 16 answer tokens):");
    println!("  predictions {:8.2} images/s", sum["timing"]["predict_images_per_s"].as_f64().unwrap_or(f64::NAN));
    println!("  end to end  {:8.2} images/s  (load, predict, score, reports)", n as f64 / total);
    Ok(())
}
