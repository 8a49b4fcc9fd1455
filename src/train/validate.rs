//! Validation during training: loss, Dice/IoU at the model resolution (threshold 0.5), and
//! position accuracy of greedily generated answers. With several ranks each scores a share of
//! the rows and the sums are added up, so every rank holds the same result (and makes the same
//! best-checkpoint and early-stopping decisions).

use anyhow::Result;
use candle_core::{DType, Device};

use crate::config::Config;
use crate::data::dataset::Row;
use crate::data::sample::{collate, PreparedSample, SampleBuilder};
use crate::dist::{Collective, Op};
use crate::metrics::position::{parse_position, PositionLabel};
use crate::metrics::seg::{Confusion, ImageScores};
use crate::model::prs_med::{LossWeights, PrsMed};
use crate::nn::ops::EvalMode;
use crate::pipeline::generate::{generate_answers, GenerateOptions};
use crate::report::{MetricsLog, Record};

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub dice: f64,
    pub iou: f64,
    pub position_accuracy: f64,
    pub n: usize,
}

/// How validation generates its answers: greedy, up to 32 tokens.
const VALIDATION_ANSWERS: GenerateOptions =
    GenerateOptions { max_new_tokens: 32, temperature: 0.0, top_p: 1.0, seed: 0, stop_at_eos: true };

/// Validation over the first `train.max_eval_samples` rows (all when 0); rank r of W scores
/// rows r, r + W, ...
pub fn evaluate(
    model: &PrsMed,
    builder: &SampleBuilder,
    rows: &[Row],
    cfg: &Config,
    device: &Device,
    ranks: &dyn Collective,
) -> Result<EvalResult> {
    let _eval = EvalMode::enter();
    let n = if cfg.train.max_eval_samples > 0 { rows.len().min(cfg.train.max_eval_samples) } else { rows.len() };
    let mine: Vec<Row> = rows[..n].iter().skip(ranks.rank()).step_by(ranks.world()).cloned().collect();
    let weights = LossWeights { compat: cfg.train.loss_compat, ..Default::default() };
    let (mut loss, mut dice, mut iou, mut n_scored, mut correct) = (0f64, 0f64, 0f64, 0usize, 0usize);
    for chunk in mine.chunks(cfg.train.batch_size.max(1)) {
        let prepared: Vec<PreparedSample> = chunk.iter().map(|r| builder.prepare(r, true)).collect::<Result<_>>()?;
        let items: Vec<&PreparedSample> = prepared.iter().collect();
        let mb = collate(&items, device)?;
        // The image embeddings serve both the loss forward and the generated answers.
        let image = model.encode_image(&mb.clip_pixels)?;
        let out = model.forward_from_image(&mb, &image, true)?;
        let l = model.losses(&mb, &out, &weights)?;
        loss += l.total.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        let pred = out.mask_logits.ge(0f64)?.to_dtype(DType::U8)?.to_device(&Device::Cpu)?;
        let gt = mb.masks.as_ref().expect("prepared with masks").to_device(&Device::Cpu)?;
        for i in 0..chunk.len() {
            let p: Vec<bool> = pred.get(i)?.flatten_all()?.to_vec1::<u8>()?.into_iter().map(|v| v > 0).collect();
            let g: Vec<bool> = gt.get(i)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|v| v > 0.5).collect();
            let s = ImageScores::from_confusion(&Confusion::from_masks(&p, &g)?, cfg.data.empty_masks);
            // `ignore` scores an empty ground truth NaN: left out of the means, as evaluate does.
            if !s.dice.is_nan() {
                dice += s.dice;
                iou += s.iou;
                n_scored += 1;
            }
        }
        // Answers: greedy generation, one sample at a time (KV cache), from the prompt alone.
        for (i, (r, s)) in chunk.iter().zip(prepared.iter()).enumerate() {
            let mut prompt = s.prompt.clone();
            prompt.answer.clear();
            let ids = generate_answers(model, &[prompt], &image.narrow(0, i, 1)?, &VALIDATION_ANSWERS)?.remove(0);
            let text = builder.tokenizer.decode(&ids, true).map_err(|e| anyhow::anyhow!("decoding an answer: {e}"))?;
            let truth = r.position.map(PositionLabel::from);
            if truth.is_some_and(|t| t == parse_position(&text)) {
                correct += 1;
            }
        }
    }
    let sums = [loss, dice, iou, n_scored as f64, correct as f64];
    let [loss, dice, iou, n_scored, correct] = ranks.all_reduce_values(&sums, Op::Sum)?[..] else {
        anyhow::bail!("the ranks returned validation sums of another length")
    };
    let nf = n.max(1) as f64;
    Ok(EvalResult {
        loss: loss / nf,
        dice: dice / n_scored.max(1.0),
        iou: iou / n_scored.max(1.0),
        position_accuracy: correct / nf,
        n,
    })
}

pub fn log_eval(log: &mut MetricsLog, step: u64, epoch: u64, e: &EvalResult) -> Result<()> {
    log.append(&Record {
        epoch: Some(epoch),
        val_loss: Some(e.loss),
        dice: Some(e.dice),
        iou: Some(e.iou),
        position_acc: Some(e.position_accuracy),
        ..Record::eval(step)
    })
}
