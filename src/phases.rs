//! Wall time per phase of a training step (`prs bench train --phases`): the model calls
//! [`mark`] at the end of each part of its forward; while a [`PhaseTimer`] is active on this
//! thread, `mark` synchronises the device (CUDA runs asynchronously) and adds the time since
//! the previous mark to that phase. Inactive, `mark` does nothing.

use std::cell::RefCell;
use std::time::Instant;

use candle_core::Device;

struct State {
    last: Instant,
    totals: Vec<(&'static str, f64)>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
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
