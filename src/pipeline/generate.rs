//! The one generation loop: batched mask prediction with KV-cached answer generation (greedy,
//! or temperature / top-p sampling with a seeded RNG). `prs predict`, `prs evaluate`, training
//! validation and `prs bench predict` all generate here.

use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_transformers::generation::LogitsProcessor;
use serde::{Deserialize, Serialize};

use crate::model::mistral::KvCache;
use crate::model::prs_med::{ModelBatch, PrsMed};
use crate::tokenizer::{PromptIds, EOS_ID, PAD_ID};

/// How answers are generated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 keeps every token.
    pub top_p: f64,
    /// Every sample of a batch gets a sampler seeded with this, so an item's answer does not
    /// depend on which batch it landed in.
    pub seed: u64,
    /// Stop a row at EOS (always, except for benchmarks that need a fixed token count).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, seed: 0, stop_at_eos: true }
    }
}

impl GenerateOptions {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "--temperature must be >= 0 (0 = greedy), got {}",
            self.temperature
        );
        ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "--top-p must be in (0, 1], got {}", self.top_p);
        Ok(())
    }

    pub fn greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// The sampler of one row: candle-transformers' logits processor (argmax at temperature 0,
/// else temperature with top-p below 1), seeded so that a row's draws do not depend on its batch.
pub fn sampler(opts: &GenerateOptions) -> LogitsProcessor {
    let temperature = (!opts.greedy()).then_some(opts.temperature);
    LogitsProcessor::new(opts.seed, temperature, (opts.top_p < 1.0).then_some(opts.top_p))
}

/// What one batch produced.
pub struct BatchOutput {
    /// (B,1,S,S) f32 mask logits at the SAM resolution.
    pub mask_logits: Tensor,
    /// Generated ids per sample, without EOS.
    pub answers: Vec<Vec<u32>>,
    /// Whether each sample stopped at EOS (else at `max_new_tokens`).
    pub hit_eos: Vec<bool>,
    /// Image encoders, prompt prefill and mask decoder, in seconds.
    pub encode_secs: f64,
    /// The token-by-token generation loop, in seconds.
    pub decode_secs: f64,
    /// Decoding steps run (each one LLM forward over one new token per row).
    pub decode_steps: usize,
}

fn sync(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

/// The state after the prompt prefill: what decoding continues from.
struct Prefill {
    /// (B,T,H) last hidden states over the right-padded prompts.
    hidden: Tensor,
    /// (B,T) prompt-only positions, for the mask decoder.
    prompt_valid: Tensor,
    /// (B,V) logits of each row's last real position.
    logits: Tensor,
    cache: KvCache,
    /// (B,T') valid keys so far.
    key_valid: Tensor,
    /// Each row's real length.
    lens: Vec<usize>,
    padded: bool,
}

/// Runs the LLM over `[prompt, image]` per row (right-padded, padding keys masked), filling a
/// fresh KV cache with room for `new_tokens` more positions.
fn prefill(model: &PrsMed, prompts: &[PromptIds], image: &Tensor, new_tokens: usize) -> Result<Prefill> {
    let dev = model.device();
    let inp = model.llm_inputs(prompts, image, false)?;
    let (b, t) = inp.key_valid.dims2()?;
    let n_image = image.dim(1)?;
    let lens: Vec<usize> = prompts.iter().map(|p| p.before_image.len() + n_image + p.after_image.len()).collect();
    let padded = lens.iter().any(|&l| l != t);
    let mut cache = KvCache::with_capacity(model.llm.config().num_hidden_layers, t + new_tokens);
    let hidden =
        model.llm.forward_embeds(&inp.embeds, padded.then_some(&inp.key_valid), &inp.position_ids, Some(&mut cache))?;
    let h = hidden.dim(2)?;
    let last: Vec<u32> = lens.iter().enumerate().map(|(i, &l)| (i * t + l - 1) as u32).collect();
    let last = hidden.reshape((b * t, h))?.index_select(&Tensor::new(last.as_slice(), dev)?, 0)?;
    let logits = model.llm.logits(&last)?;
    Ok(Prefill { hidden, prompt_valid: inp.prompt_valid, logits, cache, key_valid: inp.key_valid, lens, padded })
}

/// What the token-by-token loop produced.
struct Decoded {
    answers: Vec<Vec<u32>>,
    hit_eos: Vec<bool>,
    steps: usize,
}

/// Generates from a prefill: each row from its own length with its own position ids, one
/// shared KV cache.
fn decode(model: &PrsMed, pre: Prefill, opts: &GenerateOptions) -> Result<Decoded> {
    let dev = model.device();
    let Prefill { mut logits, mut cache, key_valid: mut valid, lens, padded, .. } = pre;
    let b = lens.len();
    let mut samplers: Vec<LogitsProcessor> = (0..b).map(|_| sampler(opts)).collect();
    let mut answers = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut hit_eos = vec![false; b];
    let mut steps = 0;
    for step in 0..opts.max_new_tokens {
        let next: Vec<u32> = if opts.greedy() {
            logits.argmax(D::Minus1)?.to_vec1::<u32>()?
        } else {
            let host = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            samplers.iter_mut().enumerate().map(|(i, s)| s.sample(&host.get(i)?)).collect::<candle_core::Result<_>>()?
        };
        let mut feed = vec![PAD_ID; b];
        for i in 0..b {
            if done[i] {
                continue;
            }
            if next[i] == EOS_ID && opts.stop_at_eos {
                done[i] = true;
                hit_eos[i] = true;
                continue;
            }
            answers[i].push(next[i]);
            feed[i] = next[i];
        }
        if done.iter().all(|&d| d) || step + 1 == opts.max_new_tokens {
            break;
        }
        let ids = Tensor::from_vec(feed, (b, 1), dev)?;
        let pos: Vec<u32> = lens.iter().map(|&l| (l + step) as u32).collect();
        let pos = Tensor::from_vec(pos, (b, 1), dev)?;
        let key_valid = if padded {
            valid = Tensor::cat(&[&valid, &Tensor::ones((b, 1), valid.dtype(), dev)?], 1)?;
            Some(&valid)
        } else {
            None
        };
        let e = model.llm.embed(&ids)?;
        let hs = model.llm.forward_embeds(&e, key_valid, &pos, Some(&mut cache))?;
        logits = model.llm.logits(&hs.squeeze(1)?)?;
        steps += 1;
    }
    Ok(Decoded { answers, hit_eos, steps })
}

/// Answers only, from image embeddings already computed ([`PrsMed::encode_image`]): training
/// validation generates from the embeddings of its loss forward instead of encoding again.
pub fn generate_answers(
    model: &PrsMed,
    prompts: &[PromptIds],
    image: &Tensor,
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    opts.validate()?;
    Ok(decode(model, prefill(model, prompts, image, opts.max_new_tokens)?, opts)?.answers)
}

/// Mask logits and answers for a batch (prompts right-padded).
pub fn predict_batch(model: &PrsMed, batch: &ModelBatch, opts: &GenerateOptions) -> Result<BatchOutput> {
    opts.validate()?;
    let dev = model.device().clone();
    let t0 = Instant::now();
    let image = model.encode_image(&batch.clip_pixels)?;
    let pre = prefill(model, &batch.prompts, &image, opts.max_new_tokens)?;
    let feats = model.tinysam.forward(&batch.sam_pixels.to_dtype(model.mask_dtype())?)?;
    let mask_logits = model.decoder.forward(&feats, &pre.hidden, &pre.prompt_valid)?.to_dtype(DType::F32)?;
    sync(&dev)?;
    let encode_secs = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let out = decode(model, pre, opts)?;
    sync(&dev)?;
    Ok(BatchOutput {
        mask_logits,
        answers: out.answers,
        hit_eos: out.hit_eos,
        encode_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
        decode_steps: out.steps,
    })
}
