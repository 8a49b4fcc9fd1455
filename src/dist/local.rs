//! Ranks as threads of one process sharing a hub: the in-process backend the tests train
//! with. Contributions are combined in rank order (rank 0 + rank 1 + ...), so a result is the
//! same on every rank and in every run. A rank whose handle is dropped (it returned an error
//! or panicked) makes the others' next collective fail instead of waiting for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;

use super::{Collective, Op};

#[derive(Clone)]
enum Payload {
    Tensor(Tensor),
    Values(Vec<f64>),
}

struct State {
    /// What the round in progress is (set by its first arrival).
    kind: Option<&'static str>,
    slots: Vec<Option<Payload>>,
    arrived: usize,
    /// The last completed round: its number and its result (or why it failed).
    done: Option<(u64, Result<Payload, String>)>,
    left: Vec<bool>,
}

struct Hub {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// One rank's handle on the hub.
pub struct LocalRank {
    hub: Arc<Hub>,
    rank: usize,
    round: AtomicU64,
}

/// `world` connected ranks; hand one to each thread.
pub fn ranks(world: usize, timeout: Duration) -> Vec<LocalRank> {
    let hub = Arc::new(Hub {
        world,
        timeout,
        state: Mutex::new(State {
            kind: None,
            slots: vec![None; world],
            arrived: 0,
            done: None,
            left: vec![false; world],
        }),
        cv: Condvar::new(),
    });
    (0..world).map(|rank| LocalRank { hub: hub.clone(), rank, round: AtomicU64::new(0) }).collect()
}

impl LocalRank {
    /// Contributes `mine` to this round; the last rank to arrive combines all contributions
    /// (in rank order) with `combine`, and every rank gets the result.
    fn exchange(
        &self,
        kind: &'static str,
        mine: Payload,
        combine: impl FnOnce(Vec<Payload>) -> Result<Payload>,
    ) -> Result<Payload> {
        let hub = &*self.hub;
        let round = self.round.fetch_add(1, Ordering::SeqCst);
        let mut st = hub.state.lock().map_err(|_| anyhow!("the collective hub is poisoned"))?;
        match st.kind {
            None => st.kind = Some(kind),
            Some(k) if k != kind => {
                bail!("rank {} reached {kind} while another rank is at {k}: the ranks took different paths", self.rank)
            }
            Some(_) => {}
        }
        st.slots[self.rank] = Some(mine);
        st.arrived += 1;
        if st.arrived == hub.world {
            let all: Vec<Payload> = st.slots.iter_mut().map(|s| s.take().expect("every rank arrived")).collect();
            let result = combine(all).map_err(|e| format!("{e:#}"));
            st.done = Some((round, result.clone()));
            st.arrived = 0;
            st.kind = None;
            hub.cv.notify_all();
            return result.map_err(|e| anyhow!(e));
        }
        let deadline = Instant::now() + hub.timeout;
        loop {
            if let Some((r, res)) = &st.done {
                if *r == round {
                    return res.clone().map_err(|e| anyhow!(e));
                }
            }
            if let Some(gone) = (0..hub.world).find(|&r| st.left[r] && st.slots[r].is_none()) {
                bail!("rank {gone} left the job (it stopped with an error) while rank {} waited in {kind}", self.rank);
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> =
                    (0..hub.world).filter(|&r| st.slots[r].is_none()).map(|r| r.to_string()).collect();
                bail!(
                    "rank(s) {} did not reach {kind} within {:.0} s (hung, or far behind); stopping the job",
                    missing.join(", "),
                    hub.timeout.as_secs_f64()
                );
            }
            st = hub.cv.wait_timeout(st, deadline - now).map_err(|_| anyhow!("the collective hub is poisoned"))?.0;
        }
    }
}

impl Drop for LocalRank {
    fn drop(&mut self) {
        if let Ok(mut st) = self.hub.state.lock() {
            st.left[self.rank] = true;
        }
        self.hub.cv.notify_all();
    }
}

fn tensor(p: Payload) -> Result<Tensor> {
    match p {
        Payload::Tensor(t) => Ok(t),
        Payload::Values(_) => bail!("a rank sent control values where a tensor was expected"),
    }
}

impl Collective for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.hub.world
    }

    fn all_reduce_sum(&self, bucket: &Tensor) -> Result<Tensor> {
        let out = self.exchange("all-reduce", Payload::Tensor(bucket.clone()), |all| {
            let mut it = all.into_iter().map(tensor);
            let mut acc = it.next().expect("world >= 1")?;
            for t in it {
                acc = (acc + t?)?;
            }
            Ok(Payload::Tensor(acc))
        })?;
        tensor(out)
    }

    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        let out = self
            .exchange("broadcast", Payload::Tensor(t.clone()), |all| Ok(all.into_iter().next().expect("world >= 1")))?;
        tensor(out)
    }

    fn all_reduce_values(&self, values: &[f64], op: Op) -> Result<Vec<f64>> {
        let kind = match op {
            Op::Sum => "control sum",
            Op::Min => "control min",
            Op::Max => "control max",
        };
        let out = self.exchange(kind, Payload::Values(values.to_vec()), |all| {
            let v: Vec<Vec<f64>> = all
                .into_iter()
                .map(|p| match p {
                    Payload::Values(v) => Ok(v),
                    Payload::Tensor(_) => bail!("a rank sent a tensor where control values were expected"),
                })
                .collect::<Result<_>>()?;
            Ok(Payload::Values(op.reduce(&v)?))
        })?;
        match out {
            Payload::Values(v) => Ok(v),
            Payload::Tensor(_) => bail!("control values expected"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sums_in_rank_order_and_a_missing_rank_fails_the_others() {
        let hub = ranks(3, Duration::from_secs(30));
        let out: Vec<(Vec<f32>, Vec<f64>)> = std::thread::scope(|s| {
            let hs: Vec<_> = hub
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let t = Tensor::new(&[c.rank() as f32 + 1.0, 0.5], &Device::Cpu).unwrap();
                        let sum = c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
                        let b = c.broadcast(&t).unwrap().to_vec1::<f32>().unwrap();
                        assert_eq!(b, vec![1.0, 0.5]);
                        let m = c.all_reduce_values(&[c.rank() as f64], Op::Max).unwrap();
                        c.barrier().unwrap();
                        (sum, m)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, m) in out {
            assert_eq!(sum, vec![6.0, 1.5]);
            assert_eq!(m, vec![2.0]);
        }
        // Rank 1 leaves; rank 0 is told instead of waiting out its timeout.
        let mut hub = ranks(2, Duration::from_secs(600));
        drop(hub.pop());
        let t0 = Instant::now();
        let e = hub[0].barrier().unwrap_err().to_string();
        assert!(e.contains("rank 1 left the job"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(60));
        // A rank that never arrives: the timeout names it.
        let hub = ranks(2, Duration::from_millis(200));
        let e = hub[1].barrier().unwrap_err().to_string();
        assert!(e.contains("rank(s) 0 did not reach"), "{e}");
    }
}
