//! From a dataset row to model inputs: decode, preprocess for CLIP and SAM, resize and
//! re-binarise the mask, tokenise the prompt. Runs in the loader's worker threads.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::{imageops::FilterType, GrayImage};
use rayon::prelude::*;
use tokenizers::Tokenizer;

use super::dataset::{load_mask_with, Problem, Row, ValidationError};
use super::preprocess::{clip_preprocess, load_image, sam_preprocess};
use crate::model::prs_med::ModelBatch;
use crate::tokenizer::{check_prompt_length, encode_prompt, PromptIds, PromptLimits};

/// One sample, ready to batch (tensors on the CPU).
pub struct PreparedSample {
    pub clip_pixels: Tensor,
    pub sam_pixels: Tensor,
    /// (1,S,S) 0/1 at the SAM resolution.
    pub mask: Option<Tensor>,
    pub prompt: PromptIds,
    pub class_id: u32,
    /// (width, height) of the original image.
    pub original_size: (u32, u32),
}

/// Everything a worker needs to prepare samples.
#[derive(Clone)]
pub struct SampleBuilder {
    pub tokenizer: Arc<Tokenizer>,
    pub template: String,
    pub clip_size: usize,
    pub sam_size: usize,
}

impl SampleBuilder {
    /// Prepares `row`; the answer is tokenised only when `with_answer` (training).
    pub fn prepare(&self, row: &Row, with_answer: bool) -> Result<PreparedSample> {
        let img = load_image(&row.image)?;
        let original_size = (img.width(), img.height());
        let clip_pixels = clip_preprocess(&img, self.clip_size)?;
        let sam_pixels = sam_preprocess(&img, self.sam_size)?;
        let mask = load_mask_with(&row.mask, row.mask_rule)?;
        ensure!(
            mask.dimensions() == original_size,
            "mask {} is {:?}, image {} is {:?}",
            row.mask.display(),
            mask.dimensions(),
            row.image.display(),
            original_size
        );
        let mask = Some(resize_mask(&mask, self.sam_size)?);
        let answer = with_answer.then_some(row.answer.as_str());
        let prompt = encode_prompt(&self.tokenizer, &self.template, &row.question, answer)
            .with_context(|| format!("tokenising {}:{}", row.csv.display(), row.line))?;
        Ok(PreparedSample { clip_pixels, sam_pixels, mask, prompt, class_id: row.class_id, original_size })
    }
}

/// Token counts of a row's training sequence, for the batch plan and the loss normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowTokens {
    /// Prompt text + answer (the image vectors not counted): the length bucketing key.
    pub text: usize,
    /// Supervised tokens: the answer and EOS.
    pub supervised: usize,
}

/// The rows that passed [`check_prompt_lengths`], with their token counts (parallel vectors).
#[derive(Debug)]
pub struct CheckedRows {
    pub rows: Vec<Row>,
    pub tokens: Vec<RowTokens>,
    /// The dropped rows (only with `skip_bad_rows`).
    pub dropped: Vec<Problem>,
}

/// Checks that every row's LLM input fits the model's positions
/// ([`crate::tokenizer::check_prompt_length`]; refused, never truncated): `with_answer` for
/// training sequences (prompt, image vectors, answer, EOS), else the inference prompt. Like
/// [`super::prepare::check_rows`], every over-long row is reported at once, naming CSV and row;
/// without `skip_bad_rows` any is an error, with it they are dropped. Tokenises each row once,
/// in parallel, and keeps the counts so that nobody tokenises again.
pub fn check_prompt_lengths(
    rows: Vec<Row>,
    builder: &SampleBuilder,
    limits: PromptLimits,
    with_answer: bool,
    skip_bad_rows: bool,
) -> Result<CheckedRows> {
    let verdicts: Vec<Result<RowTokens, String>> = rows
        .par_iter()
        .map(|r| {
            let answer = with_answer.then_some(r.answer.as_str());
            encode_prompt(&builder.tokenizer, &builder.template, &r.question, answer)
                .and_then(|p| {
                    check_prompt_length(&p, limits)?;
                    let answer = p.answer.len();
                    Ok(RowTokens { text: p.before_image.len() + p.after_image.len() + answer, supervised: answer + 1 })
                })
                .map_err(|e| format!("{e:#}"))
        })
        .collect();
    let mut checked = CheckedRows { rows: Vec::new(), tokens: Vec::new(), dropped: Vec::new() };
    for (row, verdict) in rows.into_iter().zip(verdicts) {
        match verdict {
            Ok(t) => {
                checked.rows.push(row);
                checked.tokens.push(t);
            }
            Err(message) => checked.dropped.push(Problem { csv: row.csv, line: row.line, message, fatal: false }),
        }
    }
    if !skip_bad_rows && !checked.dropped.is_empty() {
        return Err(ValidationError { problems: checked.dropped }.into());
    }
    Ok(checked)
}

/// Bilinear resize to `size` x `size`, then binarise at 0.5 (the authors' targets stayed soft).
pub fn resize_mask(mask: &GrayImage, size: usize) -> Result<Tensor> {
    let r = image::imageops::resize(mask, size as u32, size as u32, FilterType::Triangle);
    let v: Vec<f32> = r.as_raw().iter().map(|&p| if p >= 128 { 1.0 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(v, (1, size, size), &Device::Cpu)?)
}

/// Stacks prepared samples into a batch on `device`.
pub fn collate(samples: &[&PreparedSample], device: &Device) -> Result<ModelBatch> {
    ensure!(!samples.is_empty(), "empty batch");
    let stack = |f: &dyn Fn(&PreparedSample) -> Tensor| -> Result<Tensor> {
        let ts: Vec<Tensor> = samples.iter().map(|s| f(s)).collect();
        Ok(Tensor::stack(&ts, 0)?.to_device(device)?)
    };
    let clip_pixels = stack(&|s| s.clip_pixels.clone())?;
    let sam_pixels = stack(&|s| s.sam_pixels.clone())?;
    let masks = if samples.iter().all(|s| s.mask.is_some()) {
        Some(stack(&|s| s.mask.clone().expect("checked"))?)
    } else {
        None
    };
    let ids: Vec<u32> = samples.iter().map(|s| s.class_id).collect();
    let modality = Some(Tensor::new(ids.as_slice(), device)?);
    let prompts = samples.iter().map(|s| s.prompt.clone()).collect();
    Ok(ModelBatch { clip_pixels, sam_pixels, prompts, masks, modality })
}
