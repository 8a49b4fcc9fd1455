//! Divergence detection beyond NaN and infinity. A run can go bad with finite numbers: a loss
//! spike on one batch, or weights that grow until every loss is huge. Both are caught by
//! comparing each step with the run's own running levels (exponential moving averages kept in
//! [`TrainerState`], so a resumed run judges exactly as the uninterrupted one):
//! - a step whose loss, or whose gradient norm before clipping, is `factor` times above its
//!   running level is skipped, like a non-finite step (the batch is passed over, the weights
//!   are untouched, nothing is saved), and too many in a row stop the run;
//! - a running loss level that has risen to `factor` times its lowest value, or an update that
//!   makes the trained weights' norm jump to `factor` times its running level, stops the run
//!   before another checkpoint is written, so the good ones stay on disk.

use super::state::TrainerState;

/// Weight of the newest step in the running levels (about the last 20 steps count).
const EMA_WEIGHT: f64 = 0.1;
/// Applied steps before the levels are trusted.
const WARMUP_STEPS: u64 = 10;

/// The rule; `factor == 0` turns every check off.
#[derive(Clone, Copy, Debug)]
pub struct DivergenceGuard {
    pub factor: f64,
}

impl DivergenceGuard {
    fn armed(&self, state: &TrainerState) -> bool {
        self.factor > 0.0 && state.applied_steps >= WARMUP_STEPS
    }

    /// Why this step's loss is a spike, if it is one.
    pub fn loss_spike(&self, state: &TrainerState, loss: f64) -> Option<String> {
        let level = state.loss_level.filter(|_| self.armed(state))?;
        (loss > self.factor * level).then(|| {
            format!("loss {loss:.4} is {:.0}x its running level {level:.4}", loss / level.max(f64::MIN_POSITIVE))
        })
    }

    /// The gradient norm above which the optimizer skips the step.
    pub fn grad_norm_limit(&self, state: &TrainerState) -> Option<f64> {
        state.grad_norm_level.filter(|_| self.armed(state)).map(|level| self.factor * level)
    }

    /// Why the weights after an update count as exploded (their norm `factor` times its running
    /// level), if they do. Judged before `update` folds the new norm in.
    pub fn weight_jump(&self, state: &TrainerState, weight_norm: f64) -> Option<String> {
        if !weight_norm.is_finite() {
            return Some(format!("the trained weights' norm is {weight_norm} after the update"));
        }
        let level = state.weight_norm_level.filter(|_| self.armed(state))?;
        (weight_norm > self.factor * level).then(|| {
            format!(
                "the trained weights' norm jumped to {weight_norm:.4}, {:.0}x its running level {level:.4}",
                weight_norm / level
            )
        })
    }

    /// Folds an applied step into the running levels.
    /// `weight_norm` is None when the guard is off (it is not computed then).
    pub fn update(&self, state: &mut TrainerState, loss: f64, grad_norm: f64, weight_norm: Option<f64>) {
        let ema = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + EMA_WEIGHT * (new - o)));
        state.loss_level = ema(state.loss_level, loss);
        state.grad_norm_level = ema(state.grad_norm_level, grad_norm);
        if let Some(w) = weight_norm {
            state.weight_norm_level = ema(state.weight_norm_level, w);
        }
        state.applied_steps += 1;
        if state.applied_steps >= WARMUP_STEPS {
            let level = state.loss_level.unwrap_or(loss);
            state.lowest_loss_level = Some(state.lowest_loss_level.unwrap_or(f64::INFINITY).min(level));
        }
    }

    /// Why the run has diverged (its loss level far above its lowest), if it has.
    pub fn diverged(&self, state: &TrainerState) -> Option<String> {
        let (level, lowest) = (state.loss_level?, state.lowest_loss_level?);
        (self.armed(state) && level > self.factor * lowest).then(|| {
            format!("the running loss has risen to {level:.4}, {:.0}x its lowest level {lowest:.4}", level / lowest)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warmed(guard: &DivergenceGuard, loss: f64) -> TrainerState {
        let mut s = TrainerState::default();
        for _ in 0..WARMUP_STEPS {
            guard.update(&mut s, loss, 1.0, Some(3.0));
        }
        s
    }

    #[test]
    fn spikes_are_judged_against_the_running_level_after_warm_up() {
        let g = DivergenceGuard { factor: 10.0 };
        let mut cold = TrainerState::default();
        g.update(&mut cold, 1.0, 1.0, Some(3.0));
        assert_eq!(g.weight_jump(&cold, 1e6), None, "no judgement before the warm-up");
        assert_eq!(g.loss_spike(&cold, 100.0), None, "no judgement before the warm-up");
        let s = warmed(&g, 1.0);
        assert_eq!(g.loss_spike(&s, 9.0), None);
        assert!(g.loss_spike(&s, 11.0).is_some());
        assert_eq!(g.grad_norm_limit(&s), Some(10.0));
        assert_eq!(g.weight_jump(&s, 29.0), None);
        assert!(g.weight_jump(&s, 31.0).is_some());
        assert!(g.weight_jump(&s, f64::INFINITY).is_some());
        let off = DivergenceGuard { factor: 0.0 };
        assert_eq!(off.loss_spike(&warmed(&off, 1.0), 1e9), None);
        assert_eq!(off.grad_norm_limit(&warmed(&off, 1.0)), None);
    }

    #[test]
    fn a_slow_rise_of_the_loss_level_is_divergence() {
        let g = DivergenceGuard { factor: 10.0 };
        let mut s = warmed(&g, 1.0);
        let mut loss = 1.0;
        let mut stopped_at = None;
        for step in 0..200 {
            // Each step 8% above the last: never a 10x spike, but a run going nowhere good.
            loss *= 1.08;
            assert_eq!(g.loss_spike(&s, loss), None);
            g.update(&mut s, loss, 1.0, Some(3.0));
            if g.diverged(&s).is_some() {
                stopped_at = Some(step);
                break;
            }
        }
        assert!(stopped_at.is_some_and(|s| s > 20), "stopped at {stopped_at:?}");
        // A falling loss never trips it.
        let mut s = warmed(&g, 5.0);
        for k in 0..100 {
            g.update(&mut s, 5.0 / (1.0 + k as f64), 1.0, Some(3.0));
            assert_eq!(g.diverged(&s), None);
        }
    }
}
