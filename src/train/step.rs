//! One optimizer step, the same everywhere: `prs finetune`, `prs bench train` and the trial
//! steps of `prs profile-memory` all call [`Stepper::step`], so what is timed and measured is
//! what trains. A step runs the micro-batches of one accumulation group forward and backward
//! (their gradients summed), checks the losses and the gradient norm against the divergence
//! guard, and applies AdamW; a step that is not applied changes nothing (BatchNorm running
//! statistics included).
//!
//! Data parallel: each rank runs its share of the group's micro-batches; then the ranks agree
//! on the losses (one small all-reduce: a non-finite loss anywhere skips the step everywhere)
//! and sum their gradients in one bucketed all-reduce, so AdamW sees the same gradients, and
//! makes the same decisions, on every rank. With one process both are no-ops.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::guard::DivergenceGuard;
use super::optim::{AdamW, LossScaler, StepStatus};
use super::state::TrainerState;
use crate::dist::{all_reduce_step, Collective, Op};
use crate::model::prs_med::{LossNorm, LossWeights, Losses, ModelBatch, PrsMed};
use crate::model::tinysam::FrozenBatchNormStats;
use crate::nn::ops::TrainingMode;
use crate::nn::param::ParamKind;

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepOutcome {
    /// total, seg, lm, cls losses of the step.
    pub parts: [f64; 4],
    /// Global gradient norm before clipping (None when no gradient was computed).
    pub grad_norm: Option<f64>,
    /// Why the update was not applied (non-finite values, or a spike the guard rejected).
    pub skipped: Option<String>,
    /// Why the run must stop: the applied update made the weights explode.
    pub exploded: Option<String>,
    pub images: usize,
    /// Prompt + answer + EOS tokens of every sample.
    pub tokens: usize,
}

/// What one micro-batch contributes to an optimizer step.
pub struct MicroStep {
    /// Gradients of the (normalised) loss; None when the loss was not finite.
    pub grads: Option<GradStore>,
    /// total, seg, lm, cls (each already divided by the step's `norm`).
    pub parts: [f64; 4],
}

/// The model and optimizer a step changes, and how.
pub struct Stepper<'a> {
    pub model: &'a PrsMed,
    pub optim: &'a mut AdamW,
    pub scaler: Option<&'a mut LossScaler>,
    pub guard: DivergenceGuard,
    /// TinySAM BatchNorm uses its running statistics (`train.batchnorm = "frozen"`).
    pub bn_frozen: bool,
    /// The other ranks ([`crate::dist::Single`] for one process).
    pub ranks: &'a dyn Collective,
    /// Test hook: this rank's loss is NaN in this step (the ranks must agree to skip it).
    pub poison: bool,
}

impl Stepper<'_> {
    /// One optimizer step over `micro` (each micro-batch with its dropout seed, produced one at
    /// a time so that only one micro-batch's activations are alive). `norm` counts the images
    /// and supervised tokens of the whole group (on every rank, whatever its share); the guard
    /// reads and updates `state`.
    pub fn step(
        &mut self,
        micro: impl IntoIterator<Item = Result<(ModelBatch, u64)>>,
        norm: LossNorm,
        weights: &LossWeights,
        state: &mut TrainerState,
    ) -> Result<StepOutcome> {
        // BatchNorm running statistics change in the forward: keep them to undo a skipped step.
        let buffers = snapshot_buffers(self.model)?;
        let mut out = StepOutcome {
            parts: [0.0; 4],
            grad_norm: None,
            skipped: None,
            exploded: None,
            images: norm.images,
            tokens: 0,
        };
        let mut grads: Option<GradStore> = None;
        for mb in micro {
            let (mb, seed) = mb?;
            out.tokens += mb
                .prompts
                .iter()
                .map(|p| p.before_image.len() + p.after_image.len() + p.answer.len() + 1)
                .sum::<usize>();
            let mut m = micro_backward(self.model, &mb, weights, norm, self.scaler.as_deref(), seed, self.bn_frozen)?;
            if self.poison {
                m = MicroStep { grads: None, parts: [f64::NAN; 4] };
            }
            for (p, v) in out.parts.iter_mut().zip(m.parts) {
                *p += v;
            }
            match (m.grads, grads.as_mut()) {
                (None, _) => {
                    out.skipped = Some(format!(
                        "non-finite loss: seg {:.4} lm {:.4} cls {:.4}",
                        m.parts[1], m.parts[2], m.parts[3]
                    ))
                }
                (Some(g), Some(acc)) => acc.extend(g)?,
                (Some(g), None) => grads = Some(g),
            }
        }
        if self.ranks.world() > 1 {
            // The group's losses are the sums of the ranks' shares; a non-finite one anywhere
            // skips the step everywhere.
            let mine = [out.parts.as_slice(), &[out.skipped.is_some() as u8 as f64, out.tokens as f64]].concat();
            let all = self.ranks.all_reduce_values(&mine, Op::Sum)?;
            out.parts.copy_from_slice(&all[..4]);
            out.tokens = all[5] as usize;
            if all[4] > 0.0 && out.skipped.is_none() {
                out.skipped = Some(format!("non-finite loss on {} other rank(s)", all[4]));
            }
        }
        if out.skipped.is_none() {
            out.skipped = self.guard.loss_spike(state, out.parts[0]);
        }
        if out.skipped.is_none() {
            let (vars, bufs) = trained_vars(self.model);
            let g = all_reduce_step(self.ranks, grads, &vars, &bufs)?;
            self.optim.set_norm_limit(self.guard.grad_norm_limit(state));
            let report = match self.scaler.as_deref_mut() {
                Some(s) => self.optim.step_scaled(&g, s)?,
                None => self.optim.step(&g)?,
            };
            crate::phases::mark(self.model.device(), "AdamW");
            out.grad_norm = Some(report.grad_norm);
            out.skipped = match report.status {
                StepStatus::Applied => None,
                StepStatus::SkippedNonFinite => Some("non-finite gradient".into()),
                StepStatus::SkippedSpike => {
                    let level = state.grad_norm_level.unwrap_or(f64::NAN);
                    Some(format!(
                        "gradient norm {:.4} is {:.0}x its running level {level:.4}",
                        report.grad_norm,
                        report.grad_norm / level
                    ))
                }
            };
        }
        match &out.skipped {
            Some(_) => restore_buffers(&buffers)?,
            None => {
                // A pass over every trained weight: only when the guard is on (bench and the
                // profile-memory trials run with it off).
                let weight_norm = if self.guard.factor > 0.0 { Some(global_norm(self.model)?) } else { None };
                out.exploded = weight_norm.and_then(|w| self.guard.weight_jump(state, w));
                self.guard.update(state, out.parts[0], out.grad_norm.unwrap_or(0.0), weight_norm);
            }
        }
        Ok(out)
    }
}

/// Forward + backward of one micro-batch in training mode. Losses are sums divided by the
/// whole step's counts (`norm`), so summing the gradients of a step's micro-batches equals the
/// gradient of one large batch.
pub fn micro_backward(
    model: &PrsMed,
    mb: &ModelBatch,
    weights: &LossWeights,
    norm: LossNorm,
    scaler: Option<&LossScaler>,
    step_seed: u64,
    bn_frozen: bool,
) -> Result<MicroStep> {
    let _train = TrainingMode::enter(step_seed);
    let _bn = bn_frozen.then(FrozenBatchNormStats::enter);
    let mark = |name| crate::phases::mark(model.device(), name);
    let (out, cuts) = model.forward_staged(mb)?;
    let l = model.losses_normed(mb, &out, weights, Some(norm))?;
    drop(out);
    // One read (one synchronisation) for the four values.
    let read = Tensor::stack(&[&l.total, &l.seg, &l.lm, &l.cls], 0)?.to_vec1::<f32>()?;
    let parts: [f64; 4] = std::array::from_fn(|i| read[i] as f64);
    mark("losses");
    if !parts[0].is_finite() {
        return Ok(MicroStep { grads: None, parts });
    }
    // Only the total may hold the graph from here on (see `PrsMed::backward_staged`).
    let Losses { total, seg, lm, cls } = l;
    drop((seg, lm, cls));
    let loss = match scaler {
        Some(s) => s.scale_loss(&total)?,
        None => total.clone(),
    };
    drop(total);
    let g = model.backward_staged(loss, cuts)?;
    mark("backward: merging gradients");
    Ok(MicroStep { grads: Some(g), parts })
}

/// L2 norm of all trained weights (one host read; on CUDA one launch), in f64 so that squares
/// of large but finite f32 weights do not overflow.
fn global_norm(model: &PrsMed) -> Result<f64> {
    let weights = model.trained.weights();
    let tensors: Vec<&Tensor> = weights.iter().map(|p| p.var.as_tensor()).collect();
    Ok(crate::train::fused_adamw::sum_of_squares(&tensors, true)?.sqrt())
}

/// The trained weights and the BatchNorm running buffers, in the model's fixed order.
fn trained_vars(model: &PrsMed) -> (Vec<Var>, Vec<Var>) {
    let all = model.trained.all();
    let pick = |k: ParamKind| all.iter().filter(|p| p.kind == k).map(|p| p.var.clone()).collect();
    (pick(ParamKind::Weight), pick(ParamKind::Buffer))
}

fn snapshot_buffers(model: &PrsMed) -> Result<Vec<(Var, Tensor)>> {
    model
        .trained
        .all()
        .into_iter()
        .filter(|p| p.kind == ParamKind::Buffer)
        .map(|p| Ok((p.var.clone(), p.var.as_tensor().copy()?)))
        .collect()
}

fn restore_buffers(saved: &[(Var, Tensor)]) -> Result<()> {
    for (v, t) in saved {
        v.set(t)?;
    }
    Ok(())
}
