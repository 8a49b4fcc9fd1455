//! `prs bench train|predict`: timing of the model with random weights built directly on the
//! device (no download), for comparing with the PyTorch reference in the GPU notes.

use std::time::Instant;

use anyhow::Result;

use super::args::{at_least_one, positive};
use crate::config::{Checkpointing, Config};
use crate::launches::LaunchCounts;
use crate::memory::measure::{synthetic_batch, train_step};
use crate::memory::{Precision, SeqShape};
use crate::pipeline::build::Mode;
use crate::pipeline::generate::{predict_batch, GenerateOptions};
use crate::pipeline::load::BaseQuantArgs;
use crate::pipeline::random::{random_prs_med, spec_for_config, RandomOptions};
use crate::train::optim::{AdamW, AdamWConfig, LossScaler};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// `train` (forward + backward + AdamW step) or `predict` (mask + answer).
    #[arg(value_enum)]
    pub what: BenchWhat,
    /// Model configuration (TOML), e.g. configs/tiny.toml; its weights are random.
    #[arg(long)]
    pub config: std::path::PathBuf,
    /// Random weights built on the device (the only mode: no checkpoint is read).
    #[arg(long, default_value_t = true)]
    pub random_weights: bool,
    /// Images per step.
    #[arg(long, alias = "batch_size", default_value_t = 1, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Gradient checkpointing: off, llm (the LLM decoder layers: PyTorch's reference setting) or
    /// all (also TinySAM blocks); the bare flag means all.
    #[arg(long, alias = "gradient_checkpointing", value_enum, default_value_t = Checkpointing::Off, num_args = 0..=1, default_missing_value = "all")]
    pub gradient_checkpointing: Checkpointing,
    #[command(flatten)]
    pub quant: BaseQuantArgs,
    /// `predict`: keep the LoRA branch separate instead of merging it into the base weights
    /// (what `prs predict --no-merge-lora` runs).
    #[arg(long)]
    pub no_merge_lora: bool,
    /// LLM sequence length (BOS + image tokens + prompt + answer + EOS).
    #[arg(long, default_value_t = 640, value_parser = at_least_one)]
    pub seq_len: usize,
    /// Compute precision (a CPU computes in f32 whatever this says).
    #[arg(long, value_enum, default_value_t = Precision::Bf16)]
    pub precision: Precision,
    /// auto (CUDA when built with it and a GPU is present), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Untimed steps first (kernel selection, allocator warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps (the report is their mean).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub steps: usize,
    /// New tokens for `predict`.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub max_new_tokens: usize,
    /// `train`: also time each phase of the step (the device is synchronised between phases,
    /// so the total is a little slower than without).
    #[arg(long)]
    pub phases: bool,
    /// The card's dense bf16 matmul rate in TFLOP/s, for the utilisation column
    /// (764 = measured on an H100 SXM in the GPU notes).
    #[arg(long, default_value_t = 764.0, value_parser = positive)]
    pub peak_tflops: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchWhat {
    Train,
    Predict,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Weights of the LLM's matmuls (attention and MLP projections of every layer, and the head).
fn llm_matmul_weights(c: &crate::model::mistral::MistralConfig) -> f64 {
    let hd = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
    let (h, q, kv) = (c.hidden_size, c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let layer = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size;
    (c.num_hidden_layers * layer + c.vocab_size * h) as f64
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let device = crate::pipeline::device::parse_device(&a.device)?;
    let mut cfg = Config::load(&a.config)?;
    if let Some(q) = a.quant.get() {
        cfg.model.base_quant = q;
    }
    let dtype = a.precision.compute_dtype_on(&device);
    let spec = spec_for_config(&cfg)?;
    let t0 = Instant::now();
    let mode = if a.what == BenchWhat::Train { Mode::Train } else { Mode::Infer };
    let mut m = random_prs_med(&spec, &RandomOptions::from_config(&cfg, device.clone(), dtype, mode, 0))?;
    tracing::info!(
        "built {} with random weights on {:?} in {:.1} s",
        a.config.display(),
        device,
        t0.elapsed().as_secs_f64()
    );
    let n_img = m.image_tokens()?;
    let seq = SeqShape::from_total(a.seq_len, n_img)?;
    match a.what {
        BenchWhat::Train => {
            m.set_checkpointing(a.gradient_checkpointing);
            let batch = synthetic_batch(&m, a.batch_size, &seq, 1)?;
            let mut opt = AdamW::new(m.trained.weights(), AdamWConfig::default())?;
            let mut scaler = (dtype == Precision::F16.dtype()).then(LossScaler::default);
            device.synchronize()?;
            crate::pipeline::device::reset_peak_memory(&device);
            let mut times = vec![];
            let mut counts_from = None;
            for i in 0..a.warmup + a.steps {
                if i == a.warmup {
                    counts_from = LaunchCounts::read();
                }
                let t = Instant::now();
                train_step(&m, &batch, &mut opt, scaler.as_mut(), i as u64)?;
                device.synchronize()?;
                if i >= a.warmup {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            let counts = counts_from.zip(LaunchCounts::read()).map(|(from, to)| to.since(&from));
            let timed: f64 = times.iter().sum();
            if a.phases {
                let timer = crate::phases::PhaseTimer::start(&device);
                for i in 0..a.steps {
                    train_step(&m, &batch, &mut opt, scaler.as_mut(), (a.warmup + a.steps + i) as u64)?;
                }
                let phases = timer.finish();
                let total: f64 = phases.iter().map(|p| p.1).sum();
                println!("phases (mean of {} synchronised steps, {:.3} s per step):", a.steps, total / a.steps as f64);
                for (name, secs) in &phases {
                    println!("  {name:<48} {:>8.3} s {:>6.1}%", secs / a.steps as f64, 100.0 * secs / total);
                }
            }
            let step = median(times);
            let tokens = (a.batch_size * a.seq_len) as f64;
            // LLM forward + activation backward (frozen weights need no weight gradient):
            // 2 + 2 FLOPs per weight of its matmuls per token.
            let flops = 4.0 * llm_matmul_weights(&spec.llava.llm) * tokens;
            println!(
                "train: batch {} seq {} ckpt {} base {}: step {:.3} s (median of {}), {:.2} samples/s, {:.0} tokens/s, LLM {:.1} TFLOP/s = {:.1}% of {} TFLOP/s, peak {:.2} GB ({})",
                a.batch_size,
                a.seq_len,
                a.gradient_checkpointing,
                cfg.model.base_quant,
                step,
                a.steps,
                a.batch_size as f64 / step,
                tokens / step,
                flops / step / 1e12,
                100.0 * flops / step / 1e12 / a.peak_tflops,
                a.peak_tflops,
                crate::pipeline::device::peak_memory_bytes(&device).unwrap_or(0) as f64 / 1e9,
                if device.is_cuda() { "CUDA pool high-water mark + context" } else { "peak RSS" }
            );
            print_counts(counts.map(|c| c.summary(a.steps as u64, "step", timed)));
        }
        BenchWhat::Predict => {
            let lora = crate::pipeline::load::lora_for_inference(&mut m.llm, !a.no_merge_lora)?;
            let mut batch = synthetic_batch(&m, 1, &seq, 1)?;
            batch.prompts[0].answer.clear();
            let gen = GenerateOptions { max_new_tokens: a.max_new_tokens, stop_at_eos: false, ..Default::default() };
            let mut times = vec![];
            for i in 0..a.warmup + a.steps {
                let t = Instant::now();
                let out = predict_batch(&m, &batch, &gen)?;
                device.synchronize()?;
                if i >= a.warmup {
                    times.push((
                        t.elapsed().as_secs_f64(),
                        out.encode_secs,
                        out.decode_secs / out.decode_steps.max(1) as f64,
                    ));
                }
            }
            // Per generated token: the counts of a run with all tokens less those of a run with
            // one (same prompt, so the same encoding and prefill).
            let counted = |tokens: usize| -> Result<Option<LaunchCounts>> {
                let from = LaunchCounts::read();
                let g = GenerateOptions { max_new_tokens: tokens, ..gen.clone() };
                predict_batch(&m, &batch, &g)?;
                device.synchronize()?;
                Ok(from.zip(LaunchCounts::read()).map(|(f, t)| t.since(&f)))
            };
            let (one, all) = match LaunchCounts::read() {
                Some(_) => (counted(1)?, counted(a.max_new_tokens)?),
                None => (None, None),
            };
            let total = median(times.iter().map(|t| t.0).collect());
            let enc = median(times.iter().map(|t| t.1).collect());
            let per_tok = median(times.iter().map(|t| t.2).collect());
            println!(
                "predict: mask + {}-token answer {:.3} s (median of {}): encode {:.3} s, {:.1} ms/token (LoRA {lora})",
                a.max_new_tokens,
                total,
                a.steps,
                enc,
                per_tok * 1e3
            );
            let tokens = a.max_new_tokens.saturating_sub(1) as u64;
            print_counts(
                one.zip(all)
                    .filter(|_| tokens > 0)
                    .map(|(o, l)| l.since(&o).summary(tokens, "token", per_tok * tokens as f64)),
            );
        }
    }
    Ok(())
}

/// The launch counters' line, or how to get one.
fn print_counts(line: Option<String>) {
    match line {
        Some(l) => println!("{l}"),
        None => {
            tracing::info!("kernel launch counts: preload libprs_launch_counter.so (`make launch-counter`) to see them")
        }
    }
}
