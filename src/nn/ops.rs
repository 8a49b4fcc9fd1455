//! Differentiable versions of the ops candle fuses without a backward, plus the training-mode
//! switch and seeded dropout.
//!
//! Norms and softmax compute in f32 whatever the activation dtype (bf16/f16 would lose the
//! small differences they normalise) and cast back.

use std::cell::RefCell;

use anyhow::Result;
use candle_core::{DType, Tensor, D};

use super::consts::{add_const, mul_any, mul_const};
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
        let prev = TRAINING.with(|t| t.borrow_mut().replace(step_seed));
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

/// GELU with the exact erf form (PyTorch's default `nn.GELU()`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// CLIP's quick GELU: x * sigmoid(1.702 x).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// Rotary embedding tables for the given position ids (B, T): returns cos, sin of shape
/// (B, 1, T, head_dim) in `dtype`, in HF's non-interleaved (rotate_half) layout.
pub fn rope_tables(position_ids: &Tensor, head_dim: usize, theta: f64, dtype: DType) -> Result<(Tensor, Tensor)> {
    let dev = position_ids.device();
    let inv: Vec<f32> = (0..head_dim).step_by(2).map(|i| 1.0 / theta.powf(i as f64 / head_dim as f64) as f32).collect();
    let inv = Tensor::from_vec(inv, (1, 1, head_dim / 2), dev)?;
    let pos = position_ids.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // (B,T,1)
    let freqs = pos.broadcast_mul(&inv)?; // (B,T,D/2)
    let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?; // (B,T,D)
    let cos = emb.cos()?.unsqueeze(1)?.to_dtype(dtype)?;
    let sin = emb.sin()?.unsqueeze(1)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// q * cos + rotate_half(q) * sin for q of shape (B, H, T, D).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((mul_const(x, cos)? + mul_const(&rot, sin)?)?)
}
