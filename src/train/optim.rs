//! AdamW over the trained tensors (f32 master `Var`s), with PyTorch's semantics, parameter
//! groups without weight decay, global-norm clipping, non-finite step skipping, exact state
//! save/load, and a dynamic loss scaler for f16 compute.
//!
//! candle-nn's AdamW keeps its moments in the parameter dtype, has one group, no clipping and no
//! state I/O; this one keeps every moment in f32 and is checked against `torch.optim.AdamW`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::fused_adamw::{fused_update, sum_of_squares, SlotUpdate, StepHyper};
use crate::nn::param::TrainedParam;

/// Hyper-parameters; the defaults are the paper's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Learning rate of the next step (the trainer sets it from the schedule with `set_lr`).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Added to sqrt(v_hat), as PyTorch.
    pub eps: f64,
    /// Decoupled decay `p -= lr * wd * p`, only for tensors where `decays` is true.
    pub weight_decay: f64,
    /// Global L2 norm the gradients are clipped to (None = no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 1e-5, max_grad_norm: Some(1.0) }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            bail!("AdamW: invalid learning rate {}", self.lr);
        }
        for (n, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("AdamW: {n} must be in [0, 1), got {b}");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("AdamW: eps must be positive, got {}", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("AdamW: weight_decay must be >= 0, got {}", self.weight_decay);
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                bail!("AdamW: max_grad_norm must be positive, got {m}");
            }
        }
        Ok(())
    }
}

/// The parameter-group rule: weight decay applies to matrices and kernels only. Excluded are
/// tensors of rank <= 1 (biases, norm scales, per-channel scales), keys whose last segment ends
/// in `bias`, and any tensor inside a normalisation layer (a key segment containing `norm`, any
/// case: `input_layernorm.weight`, `norm1.weight`, `model.norm.weight`).
pub fn decays(key: &str, dims: &[usize]) -> bool {
    if dims.len() <= 1 {
        return false;
    }
    let segs: Vec<&str> = key.split('.').collect();
    if segs.last().is_some_and(|s| s.ends_with("bias")) {
        return false;
    }
    !segs.iter().any(|s| s.to_ascii_lowercase().contains("norm"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepStatus {
    /// Parameters and moments were updated.
    Applied,
    /// A gradient (or the global norm) was NaN or infinite: nothing was changed.
    SkippedNonFinite,
    /// The global norm was above the limit set with `set_norm_limit` (a spike far above the
    /// run's usual level): nothing was changed.
    SkippedSpike,
}

#[derive(Clone, Debug)]
pub struct StepReport {
    pub status: StepStatus,
    /// Global L2 norm of the (unscaled) gradients before clipping; non-finite when skipped.
    pub grad_norm: f64,
    /// Factor the gradients were multiplied by (1 when not clipped).
    pub clip_coef: f64,
    /// Trained tensors with no gradient in the store: left untouched, as PyTorch does.
    pub without_grad: usize,
}

impl StepReport {
    pub fn skipped(&self) -> bool {
        self.status != StepStatus::Applied
    }
}

/// State of one optimised tensor.
struct Slot {
    group: String,
    key: String,
    var: Var,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Updates applied to this tensor (PyTorch keeps the count per tensor: one that gets no
    /// gradient for a while keeps its own bias correction).
    step: u64,
}

impl Slot {
    fn name(&self) -> String {
        format!("{}/{}", self.group, self.key)
    }
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Applied (not skipped) optimizer steps.
    steps: u64,
    /// Skip a step whose gradient norm (before clipping) is above this.
    norm_limit: Option<f64>,
}

const PREFIX: &str = "adamw";

impl AdamW {
    /// One slot per optimised tensor (`TrainedParams::weights()`); moments start at zero.
    pub fn new(params: Vec<TrainedParam>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let mut slots = Vec::with_capacity(params.len());
        for p in params {
            if p.var.dtype() != DType::F32 {
                bail!(
                    "AdamW: trained tensor {}/{} is {:?}, expected an f32 master copy",
                    p.group,
                    p.key,
                    p.var.dtype()
                );
            }
            // Two storages: on CUDA the moments are updated in place.
            slots.push(Slot {
                decay: decays(&p.key, p.var.dims()),
                group: p.group,
                key: p.key,
                exp_avg: p.var.zeros_like()?.detach(),
                exp_avg_sq: p.var.zeros_like()?.detach(),
                var: p.var,
                step: 0,
            });
        }
        Ok(Self { cfg, slots, steps: 0, norm_limit: None })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Steps whose gradient norm (unscaled, before clipping) exceeds `limit` are skipped.
    pub fn set_norm_limit(&mut self, limit: Option<f64>) {
        self.norm_limit = limit;
    }

    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Applied optimizer steps (skipped ones are not counted).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// (group, key, decays) of every slot, in order.
    pub fn groups(&self) -> Vec<(String, String, bool)> {
        self.slots.iter().map(|s| (s.group.clone(), s.key.clone(), s.decay)).collect()
    }

    /// First and second moments of one tensor (on CUDA they share storage with the optimizer's,
    /// which the next step updates in place: copy them to keep them).
    pub fn moments(&self, group: &str, key: &str) -> Option<(Tensor, Tensor)> {
        self.slots.iter().find(|s| s.group == group && s.key == key).map(|s| (s.exp_avg.clone(), s.exp_avg_sq.clone()))
    }

    /// One update from the gradients in `grads` at the current learning rate.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepReport> {
        self.step_impl(grads, 1.0)
    }

    /// One update from gradients of a loss multiplied by `scaler.scale`: unscales (folded into
    /// the clipping factor), skips the step on overflow, and updates the scale.
    pub fn step_scaled(&mut self, grads: &GradStore, scaler: &mut LossScaler) -> Result<StepReport> {
        let report = self.step_impl(grads, 1.0 / scaler.scale)?;
        // Only overflow says the scale is too large; a gradient spike says nothing about it.
        scaler.update(report.status == StepStatus::SkippedNonFinite);
        Ok(report)
    }

    fn step_impl(&mut self, grads: &GradStore, inv_scale: f64) -> Result<StepReport> {
        let mut present: Vec<(usize, Tensor)> = Vec::with_capacity(self.slots.len());
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                if g.dims() != s.var.dims() {
                    bail!("AdamW: gradient of {} has shape {:?}, parameter {:?}", s.name(), g.dims(), s.var.dims());
                }
                present.push((i, g.to_dtype(DType::F32)?.detach()));
            }
        }
        if present.is_empty() {
            bail!("AdamW: no trained tensor received a gradient (is the graph cut?)");
        }
        let without_grad = self.slots.len() - present.len();

        // One host sync: the global norm, which is also the finiteness test (NaN or inf in any
        // gradient makes the sum of squares non-finite).
        let grads: Vec<&Tensor> = present.iter().map(|(_, g)| g).collect();
        let grad_norm = sum_of_squares(&grads, false)?.sqrt() * inv_scale;
        if !grad_norm.is_finite() {
            return Ok(StepReport { status: StepStatus::SkippedNonFinite, grad_norm, clip_coef: 1.0, without_grad });
        }
        if self.norm_limit.is_some_and(|limit| grad_norm > limit) {
            return Ok(StepReport { status: StepStatus::SkippedSpike, grad_norm, clip_coef: 1.0, without_grad });
        }
        // torch.nn.utils.clip_grad_norm_: coef = max / (norm + 1e-6), clamped to 1.
        let clip_coef = match self.cfg.max_grad_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        let hyper = StepHyper {
            lr: self.cfg.lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            coef: clip_coef * inv_scale,
        };
        let mut grads: Vec<Option<Tensor>> = vec![None; self.slots.len()];
        for (i, g) in present {
            grads[i] = Some(g);
        }
        let mut updates = Vec::with_capacity(grads.len());
        for (s, g) in self.slots.iter_mut().zip(grads) {
            if let Some(grad) = g {
                s.step += 1;
                updates.push(SlotUpdate {
                    param: &s.var,
                    grad,
                    exp_avg: &mut s.exp_avg,
                    exp_avg_sq: &mut s.exp_avg_sq,
                    decays: s.decay,
                    step: s.step,
                });
            }
        }
        fused_update(&mut updates, &hyper)?;
        self.steps += 1;
        Ok(StepReport { status: StepStatus::Applied, grad_norm, clip_coef, without_grad })
    }

    /// The state as named tensors (sharing storage with the optimizer's, see `moments`): `adamw/steps`, and per tensor `adamw/{group}/{key}/exp_avg`,
    /// `.../exp_avg_sq` (f32) and `.../step` (i64).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let dev = self.device();
        let mut m = HashMap::new();
        m.insert(format!("{PREFIX}/steps"), Tensor::new(&[self.steps as i64], &dev)?);
        for s in &self.slots {
            let n = s.name();
            m.insert(format!("{PREFIX}/{n}/exp_avg"), s.exp_avg.clone());
            m.insert(format!("{PREFIX}/{n}/exp_avg_sq"), s.exp_avg_sq.clone());
            m.insert(format!("{PREFIX}/{n}/step"), Tensor::new(&[s.step as i64], &dev)?);
        }
        Ok(m)
    }

    /// Restores the state from `state` (other prefixes, e.g. the loss scaler's, are ignored).
    /// Every tensor's moments must be present with its shape, and no moments may be left over
    /// for tensors this optimizer does not have. `what` names the source in errors.
    pub fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        let get = |name: &str| -> Result<&Tensor> {
            state
                .get(name)
                .with_context(|| format!("optimizer state {what} has no `{name}` (saved for other parameters?)"))
        };
        let count = |name: &str| -> Result<u64> {
            let v = get(name)?.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
            match v.as_slice() {
                [c] if *c >= 0 => Ok(*c as u64),
                _ => bail!("optimizer state {what}: `{name}` is not a step count"),
            }
        };
        let mut restored = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let n = s.name();
            let moment = |which: &str| -> Result<Tensor> {
                let name = format!("{PREFIX}/{n}/{which}");
                let t = get(&name)?;
                if t.dims() != s.var.dims() {
                    bail!(
                        "optimizer state {what}: `{name}` has shape {:?}, the parameter has {:?}",
                        t.dims(),
                        s.var.dims()
                    );
                }
                if t.dtype() != DType::F32 {
                    bail!("optimizer state {what}: `{name}` is {:?}, expected f32", t.dtype());
                }
                // A copy of its own: on CUDA the moments are updated in place.
                Ok(t.to_device(s.var.device())?.detach().copy()?)
            };
            let (m, v) = (moment("exp_avg")?, moment("exp_avg_sq")?);
            restored.push((m, v, count(&format!("{PREFIX}/{n}/step"))?));
        }
        let known: std::collections::HashSet<String> = self.slots.iter().map(|s| s.name()).collect();
        for k in state.keys() {
            let Some(rest) = k.strip_prefix(&format!("{PREFIX}/")) else {
                continue;
            };
            if rest == "steps" {
                continue;
            }
            let owner = rest.rsplit_once('/').map(|(o, _)| o).unwrap_or(rest);
            if !known.contains(owner) {
                bail!("optimizer state {what} has `{k}` but `{owner}` is not a trained tensor of this model");
            }
        }
        let steps = count(&format!("{PREFIX}/steps"))?;
        for (s, (m, v, step)) in self.slots.iter_mut().zip(restored) {
            s.exp_avg = m;
            s.exp_avg_sq = v;
            s.step = step;
        }
        self.steps = steps;
        Ok(())
    }

    pub fn save_state(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.state_tensors()?, path)
            .with_context(|| format!("writing optimizer state {}", path.display()))
    }

    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let state = candle_core::safetensors::load(path, &self.device())
            .with_context(|| format!("reading optimizer state {}", path.display()))?;
        self.load_state_tensors(&state, &path.display().to_string())
    }

    fn device(&self) -> Device {
        self.slots.first().map(|s| s.var.device().clone()).unwrap_or(Device::Cpu)
    }
}

/// Dynamic loss scaling for f16 compute (PyTorch `GradScaler` semantics): the loss is multiplied
/// by `scale` so small gradients survive f16; a step whose gradients overflow is skipped and the
/// scale divided by `factor`; after `growth_interval` good steps in a row it is multiplied by it.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_interval: u64,
    pub factor: f64,
    good_steps: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new(65536.0, 2000, 2.0)
    }
}

const SCALER: &str = "loss_scaler";

impl LossScaler {
    /// `factor` should be a power of two, so scaling and unscaling are exact.
    pub fn new(scale: f64, growth_interval: u64, factor: f64) -> Self {
        Self { scale, growth_interval, factor, good_steps: 0 }
    }

    /// Good steps since the last change of scale.
    pub fn good_steps(&self) -> u64 {
        self.good_steps
    }

    /// `loss * scale` in f32 (differentiable; 65536 itself overflows f16); backward of it gives
    /// gradients times `scale`.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        Ok((loss.to_dtype(DType::F32)? * self.scale)?)
    }

    /// Divides the gradients of `params` in `grads` by the scale, in place in the store, and
    /// returns whether any is non-finite (for trainers that inspect gradients before `step`).
    pub fn unscale(&self, grads: &mut GradStore, params: &[TrainedParam]) -> Result<bool> {
        let mut sums = Vec::new();
        for p in params {
            if let Some(g) = grads.remove(p.var.as_tensor()) {
                let g = (g.to_dtype(DType::F32)? * (1.0 / self.scale))?;
                sums.push(g.abs()?.sum_all()?);
                grads.insert(p.var.as_tensor(), g);
            }
        }
        if sums.is_empty() {
            return Ok(false);
        }
        let total = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()?;
        Ok(!total.is_finite())
    }

    /// Records the outcome of a step: halves (divides by `factor`) after an overflow, grows after
    /// `growth_interval` good steps.
    pub fn update(&mut self, overflowed: bool) {
        if overflowed {
            self.scale /= self.factor;
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= self.factor;
                self.good_steps = 0;
            }
        }
    }

    /// `loss_scaler/scale` (f64) and `loss_scaler/good_steps` (i64); merge with the optimizer's.
    pub fn state_tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        m.insert(format!("{SCALER}/scale"), Tensor::new(&[self.scale], device)?);
        m.insert(format!("{SCALER}/good_steps"), Tensor::new(&[self.good_steps as i64], device)?);
        Ok(m)
    }

    pub fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        let get = |n: &str| -> Result<Tensor> {
            let name = format!("{SCALER}/{n}");
            let t = state.get(&name).with_context(|| format!("loss-scaler state {what} has no `{name}`"))?;
            Ok(t.flatten_all()?)
        };
        let scale = get("scale")?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let good = get("good_steps")?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        match (scale.as_slice(), good.as_slice()) {
            ([s], [g]) if s.is_finite() && *s > 0.0 && *g >= 0 => {
                self.scale = *s;
                self.good_steps = *g as u64;
                Ok(())
            }
            _ => bail!("loss-scaler state {what} is malformed (scale {scale:?}, good_steps {good:?})"),
        }
    }
}
