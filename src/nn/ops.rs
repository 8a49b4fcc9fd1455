//! Differentiable versions of the ops candle fuses without a backward, plus the training-mode
//! switch and seeded dropout.
//!
//! Norms and softmax compute in f32 whatever the activation dtype (bf16/f16 would lose the
//! small differences they normalise) and cast back.

use std::cell::RefCell;

use anyhow::Result;
use candle_core::{DType, Tensor, D};

use super::consts::{add_const, mul_any};
use super::param::seed_for;

thread_local! {
    /// `Some(step_seed)` while a training forward runs on this thread.
    static TRAINING: RefCell<Option<u64>> = const { RefCell::new(None) };
}

/// While alive, forwards on this thread run in training mode (dropout on, BatchNorm batch
/// statistics) with dropout masks derived from `step_seed` and the call site, so that a
/// recomputation (gradient checkpointing) or a resumed run draws the same masks.
pub struct TrainingMode {
    prev: Option<u64>,
}

impl TrainingMode {
    pub fn enter(step_seed: u64) -> Self {
        Self::restore(Some(step_seed))
    }

    /// The mode a captured [`step_seed`] describes: training with that seed, or evaluation
    /// (None). Ops whose backward redraws the forward's dropout masks enter it there.
    pub fn restore(step_seed: Option<u64>) -> Self {
        let prev = TRAINING.with(|t| std::mem::replace(&mut *t.borrow_mut(), step_seed));
        Self { prev }
    }
}

impl Drop for TrainingMode {
    fn drop(&mut self) {
        TRAINING.with(|t| *t.borrow_mut() = self.prev);
    }
}

/// Evaluation mode inside a training region (validation during training).
pub struct EvalMode {
    prev: Option<u64>,
}

impl EvalMode {
    pub fn enter() -> Self {
        let prev = TRAINING.with(|t| t.borrow_mut().take());
        Self { prev }
    }
}

impl Drop for EvalMode {
    fn drop(&mut self) {
        TRAINING.with(|t| *t.borrow_mut() = self.prev);
    }
}

pub fn is_training() -> bool {
    TRAINING.with(|t| t.borrow().is_some())
}

/// The step seed of the current training region (None in eval mode); gradient checkpointing
/// captures it so a recomputation after the region ended draws the same dropout masks.
pub fn step_seed() -> Option<u64> {
    TRAINING.with(|t| *t.borrow())
}

/// Inverted dropout with a mask drawn from (step seed, call site) on the tensor's device
/// (`nn::dropout`); identity in eval mode.
pub fn dropout(x: &Tensor, p: f32, site: &str) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let Some(seed) = step_seed() else { return Ok(x.clone()) };
    super::dropout::dropout_seeded(x, p, seed_for(seed, site))
}

/// Softmax over the last dimension, computed in f32, with a backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    // The max is a constant shift: detaching it keeps the result and skips a backward.
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = add_const(&x, &m.neg()?)?.exp()?;
    let s = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok(s.to_dtype(dt)?)
}

/// RMSNorm as HF Mistral: normalise in f32, cast back, then scale by the weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let y = super::fused::rms_normalize(x, eps)?;
    mul_any(&y, &weight.to_dtype(x.dtype())?)
}

/// GELU with the exact erf form (PyTorch's default `nn.GELU()`); its backward holds no graph
/// (`nn::fused::gelu_erf`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    super::fused::gelu_erf(x)
}

/// CLIP's quick GELU: x * sigmoid(1.702 x).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}
