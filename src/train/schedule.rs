//! Learning-rate schedule per optimizer step.
//!
//! A pure function of the (0-based) optimizer step, so a resumed run only needs the step count.
//! Warm-up ramps linearly and reaches the peak on its last step (the first step never runs at
//! lr 0); the cosine part then goes from the peak to `min_lr`, reached at `total_steps` and kept
//! after it (as torch's `CosineAnnealingLR(T_max = total - warmup, eta_min)` chained after warm-up).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Cosine decay from `lr` to `min_lr` over the steps after warm-up.
    Cosine,
    /// `lr` after warm-up.
    Constant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    /// Peak learning rate (paper: 1e-4).
    pub lr: f64,
    /// Final learning rate of the cosine (paper: 1e-6).
    #[serde(default)]
    pub min_lr: f64,
    /// Linear warm-up steps (0 = none).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Total optimizer steps of the run, warm-up included.
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn cosine(lr: f64, min_lr: f64, warmup_steps: u64, total_steps: u64) -> Self {
        Self { kind: ScheduleKind::Cosine, lr, min_lr, warmup_steps, total_steps }
    }

    pub fn constant(lr: f64, warmup_steps: u64) -> Self {
        Self { kind: ScheduleKind::Constant, lr, min_lr: lr, warmup_steps, total_steps: warmup_steps }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("learning rate must be positive, got {}", self.lr);
        }
        if self.kind == ScheduleKind::Cosine {
            if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
                bail!("min_lr {} must be in [0, lr = {}]", self.min_lr, self.lr);
            }
            if self.total_steps <= self.warmup_steps {
                bail!(
                    "total optimizer steps {} must exceed the warm-up steps {} for a cosine schedule",
                    self.total_steps,
                    self.warmup_steps
                );
            }
        }
        Ok(())
    }

    /// Learning rate of the update with 0-based index `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => {
                if step >= self.total_steps {
                    return self.min_lr;
                }
                let progress = (step - self.warmup_steps) as f64 / (self.total_steps - self.warmup_steps) as f64;
                self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}
