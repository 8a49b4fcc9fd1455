//! Batch plans and a prefetching loader.
//!
//! The plan of an epoch is a pure function of (seed, epoch, length keys): a seeded shuffle,
//! then length bucketing (sort by key inside windows of `bucket_batches` batches, so padding
//! stays small while order stays random), then a seeded shuffle of the batch order. A resumed
//! run rebuilds the plan and starts at batch k ([`BatchPlan::epoch_from`]).
//!
//! The loader hands single samples to N worker threads and keeps `prefetch` batches in
//! flight; each sample owns a one-slot result channel, so batches come out in planned order
//! whatever the number of workers, and memory stays bounded.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Result};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use super::dataset::Row;
use crate::hash::mix64;

/// Fisher-Yates driven by a SplitMix64 stream.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    for i in (1..items.len()).rev() {
        state = state.wrapping_add(1);
        let j = (mix64(state) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// How an epoch is cut into batches.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    pub batch_size: usize,
    /// Batches per sorting window; 1 disables bucketing, `usize::MAX` sorts the whole epoch.
    pub bucket_batches: usize,
    pub drop_last: bool,
    pub seed: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self { batch_size: 4, bucket_batches: 16, drop_last: false, seed: 0 }
    }
}

/// Batches of sample indices for any epoch.
#[derive(Clone, Debug)]
pub struct BatchPlan {
    cfg: PlanConfig,
    keys: Vec<usize>,
}

impl BatchPlan {
    /// `keys[i]` is the length key of sample i (e.g. its token count; all zeros for none).
    pub fn new(keys: Vec<usize>, cfg: PlanConfig) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.bucket_batches == 0 {
            return Err(anyhow!("batch_size and bucket_batches must be at least 1"));
        }
        Ok(Self { cfg, keys })
    }

    pub fn len_samples(&self) -> usize {
        self.keys.len()
    }

    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.keys.len(), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The batches of `epoch`, in the order they are consumed.
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let (b, seed) = (self.cfg.batch_size, mix64(self.cfg.seed) ^ mix64(epoch.wrapping_add(0x5EED)));
        let mut order: Vec<usize> = (0..self.keys.len()).collect();
        shuffle(&mut order, seed);
        let window = b.saturating_mul(self.cfg.bucket_batches);
        // Stable sort inside each window keeps the shuffled order among equal keys.
        for chunk in order.chunks_mut(window) {
            chunk.sort_by_key(|&i| self.keys[i]);
        }
        let mut batches: Vec<Vec<usize>> = order.chunks(b).map(<[usize]>::to_vec).collect();
        if self.cfg.drop_last && batches.last().is_some_and(|l| l.len() < b) {
            batches.pop();
        }
        shuffle(&mut batches, mix64(seed ^ 0x0BA7_C4E5));
        batches
    }

    /// Batches `start..` of `epoch`: what a run resumed at (epoch, start) consumes.
    pub fn epoch_from(&self, epoch: u64, start: usize) -> Vec<Vec<usize>> {
        let mut all = self.epoch(epoch);
        all.drain(..start.min(all.len()));
        all
    }
}

/// The micro-batches rank `rank` of `world` runs in an epoch of `n`, from `start` on.
/// Optimizer steps take groups of `group` micro-batches (aligned at multiples of `group`,
/// fewer at the epoch's end); in each group the rank takes positions rank, rank + world, ...
/// So W ranks with accumulation A run exactly the micro-batches of one rank with accumulation
/// W x A, step by step (a rank may have none in a short last group).
pub fn rank_share(n: usize, start: usize, group: usize, rank: usize, world: usize) -> Vec<usize> {
    let mut out = vec![];
    let mut at = start;
    while at < n {
        let end = (at - at % group + group).min(n);
        out.extend((at + rank..end).step_by(world));
        at = end;
    }
    out
}

/// Something a loader can hand to a transform; `location` goes into error messages.
pub trait Sample: Send + Sync + 'static {
    fn location(&self) -> String;
}

impl Sample for Row {
    fn location(&self) -> String {
        format!("row {} (image {}, mask {})", Row::location(self), self.image.display(), self.mask.display())
    }
}

/// One batch as delivered: its place in the plan, the sample indices, the transformed items.
#[derive(Debug)]
pub struct Batch<T> {
    pub index: usize,
    pub samples: Vec<usize>,
    pub items: Vec<T>,
}

#[derive(Clone, Debug)]
pub struct LoaderOptions {
    pub workers: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self { workers: 4, prefetch: 4 }
    }
}

struct Job<T> {
    sample: usize,
    reply: Sender<Result<T>>,
}

/// A batch in flight: its plan index, its sample indices, one reply per sample.
type InFlight<T> = (usize, Vec<usize>, Vec<Receiver<Result<T>>>);

/// Iterator over transformed batches in planned order. Dropping it stops the workers.
pub struct Loader<T: Send + 'static> {
    batches: std::vec::IntoIter<(usize, Vec<usize>)>,
    pending: VecDeque<InFlight<T>>,
    jobs: Option<Sender<Job<T>>>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    prefetch: usize,
}

impl<T: Send + 'static> Loader<T> {
    /// `batches` index into `samples` (e.g. `plan.epoch_from(e, k)`); `first_index` is the
    /// plan position of `batches[0]` (k when resuming), reported in [`Batch::index`].
    pub fn new<S, F>(
        samples: Arc<Vec<S>>,
        batches: Vec<Vec<usize>>,
        first_index: usize,
        transform: F,
        opts: &LoaderOptions,
    ) -> Result<Self>
    where
        S: Sample,
        F: Fn(&S) -> Result<T> + Send + Sync + 'static,
    {
        if let Some(&bad) = batches.iter().flatten().find(|&&i| i >= samples.len()) {
            return Err(anyhow!("batch plan refers to sample {bad} but there are {}", samples.len()));
        }
        let (tx, rx) = unbounded::<Job<T>>();
        let stop = Arc::new(AtomicBool::new(false));
        let transform = Arc::new(transform);
        let workers = (0..opts.workers.max(1))
            .map(|w| {
                let (rx, stop, samples, transform) = (rx.clone(), stop.clone(), samples.clone(), transform.clone());
                std::thread::Builder::new()
                    .name(format!("prs-loader-{w}"))
                    .spawn(move || {
                        for job in rx {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            let s = &samples[job.sample];
                            let out = match catch_unwind(AssertUnwindSafe(|| transform(s))) {
                                Ok(r) => r,
                                Err(p) => Err(anyhow!("transform panicked: {}", panic_text(&p))),
                            };
                            // The consumer may be gone; nothing to do then.
                            let _ = job.reply.send(out.map_err(|e| e.context(format!("loading {}", s.location()))));
                        }
                    })
                    .map_err(|e| anyhow!("spawning loader thread: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let batches: Vec<(usize, Vec<usize>)> =
            batches.into_iter().enumerate().map(|(i, b)| (first_index + i, b)).collect();
        let mut loader = Self {
            batches: batches.into_iter(),
            pending: VecDeque::new(),
            jobs: Some(tx),
            stop,
            workers,
            prefetch: opts.prefetch.max(1),
        };
        loader.refill();
        Ok(loader)
    }

    /// Queues batches until `prefetch` are in flight.
    fn refill(&mut self) {
        while self.pending.len() < self.prefetch {
            let Some((index, samples)) = self.batches.next() else {
                break;
            };
            let jobs = self.jobs.as_ref().expect("jobs sender lives as long as the loader");
            let replies = samples
                .iter()
                .map(|&sample| {
                    let (reply, rx) = bounded(1);
                    // Workers hold the receiving end until the loader drops, so this succeeds.
                    let _ = jobs.send(Job { sample, reply });
                    rx
                })
                .collect();
            self.pending.push_back((index, samples, replies));
        }
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
}

impl<T: Send + 'static> Iterator for Loader<T> {
    type Item = Result<Batch<T>>;

    fn next(&mut self) -> Option<Self::Item> {
        let (index, samples, replies) = self.pending.pop_front()?;
        self.refill();
        let mut items = Vec::with_capacity(replies.len());
        let mut first_err = None;
        for rx in replies {
            // Wait for every sample even after an error so none is left half-done.
            match rx.recv() {
                Ok(Ok(item)) => items.push(item),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => first_err = first_err.or(Some(anyhow!("loader worker exited early"))),
            }
        }
        Some(match first_err {
            Some(e) => Err(e.context(format!("batch {index}"))),
            None => Ok(Batch { index, samples, items }),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.pending.len() + self.batches.len();
        (n, Some(n))
    }
}

impl<T: Send + 'static> Drop for Loader<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
