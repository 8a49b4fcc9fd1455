//! Wall time per phase of a training step (`prs bench train --phases`): the model calls
//! [`mark`] at the end of each part of its forward; while a [`PhaseTimer`] is active on this
//! thread, `mark` synchronises the device (CUDA runs asynchronously) and adds the time since
//! the previous mark to that phase. Inactive, `mark` does nothing.

use std::cell::{Cell, RefCell};
use std::time::Instant;

use candle_core::Device;

struct State {
    last: Instant,
    totals: Vec<(&'static str, f64)>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
    static PART: Cell<BackwardPart> = const { Cell::new(BackwardPart::Other) };
}

/// The part of the model whose backward runs now (`PrsMed::backward_staged` runs them one at a
/// time), so that the backward's phases and its checkpoint recomputations are named per part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackwardPart {
    Llm,
    TinySam,
    /// A backward that is not staged by part (tests, the one-pass `PrsMed::backward`).
    Other,
}

impl BackwardPart {
    /// The phase of this part's backward outside its checkpoint recomputations.
    pub fn backward_phase(self) -> &'static str {
        match self {
            Self::Llm => "LLM backward (outside recomputations)",
            Self::TinySam => "TinySAM backward (outside recomputations)",
            Self::Other => "backward (outside recomputations)",
        }
    }

    /// The phase of this part's checkpoint recomputations with their backward.
    pub fn recomputation_phase(self) -> &'static str {
        match self {
            Self::Llm => "LLM recomputation + its backward",
            Self::TinySam => "TinySAM recomputation + its backward",
            Self::Other => "checkpoint recomputation + its backward",
        }
    }

    /// The part whose backward runs on this thread.
    pub fn current() -> Self {
        PART.with(|p| p.get())
    }

    /// Names this thread's backward as this part's until the guard drops.
    pub fn enter(self) -> BackwardPartGuard {
        BackwardPartGuard(PART.with(|p| p.replace(self)))
    }
}

pub struct BackwardPartGuard(BackwardPart);

impl Drop for BackwardPartGuard {
    fn drop(&mut self) {
        PART.with(|p| p.set(self.0));
    }
}

/// Ends the phase `name` here (no-op unless a [`PhaseTimer`] is active).
pub fn mark(device: &Device, name: &'static str) {
    let active = STATE.with(|s| s.borrow().is_some());
    if !active {
        return;
    }
    let _ = device.synchronize();
    STATE.with(|s| {
        if let Some(st) = s.borrow_mut().as_mut() {
            let dt = st.last.elapsed().as_secs_f64();
            match st.totals.iter_mut().find(|(n, _)| *n == name) {
                Some((_, t)) => *t += dt,
                None => st.totals.push((name, dt)),
            }
            st.last = Instant::now();
        }
    });
}

/// Collects phase times on this thread until dropped or [`PhaseTimer::finish`]ed.
pub struct PhaseTimer;

impl PhaseTimer {
    pub fn start(device: &Device) -> Self {
        let _ = device.synchronize();
        STATE.with(|s| *s.borrow_mut() = Some(State { last: Instant::now(), totals: vec![] }));
        PhaseTimer
    }

    /// The phases in first-seen order, seconds each.
    pub fn finish(self) -> Vec<(&'static str, f64)> {
        STATE.with(|s| s.borrow_mut().take()).map(|st| st.totals).unwrap_or_default()
    }
}

impl Drop for PhaseTimer {
    fn drop(&mut self) {
        STATE.with(|s| *s.borrow_mut() = None);
    }
}
