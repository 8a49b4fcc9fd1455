//! The one model of `prs serve` and its queue: handlers prepare inputs (decode, resize,
//! tokenise) on their own threads and hand them to a bounded queue; one worker thread runs the
//! model. Requests that wait together with the same generation options go through the model as
//! one batch (up to `max_batch`); a full queue is refused at once rather than held.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use image::RgbImage;
use tokio::sync::oneshot;

use crate::pipeline::generate::GenerateOptions;
use crate::pipeline::load::Loaded;
use crate::pipeline::predict::{predict_prepared, ItemMeta, ItemResult, Prediction, Prepared};

/// What the worker adds to a prediction: how long it waited and with how many it ran.
#[derive(Clone, Copy, Debug)]
pub struct RunInfo {
    pub queue_s: f64,
    pub model_s: f64,
    pub batch_size: usize,
}

/// A request done: its result and probability map, its image back (the pictures are drawn on
/// it), and how it ran. No device tensor leaves the model thread.
pub struct Done {
    pub result: ItemResult,
    pub prob: Vec<f32>,
    pub image: RgbImage,
    pub run: RunInfo,
}

pub type Reply = Result<Done, String>;

/// One prepared request.
pub struct Job {
    pub prepared: Prepared,
    pub meta: ItemMeta,
    pub gen: GenerateOptions,
    pub queued_at: Instant,
    pub reply: oneshot::Sender<Reply>,
}

/// Why a job was not queued.
pub enum Refused {
    /// The queue is full: retry after about this many seconds.
    Full { retry_after_s: u64 },
    /// The worker has stopped (the server is shutting down).
    Stopped,
}

/// Counters the health and info endpoints show.
#[derive(Default)]
pub struct Stats {
    pub predicted: AtomicU64,
    pub batches: AtomicU64,
    pub refused_full: AtomicU64,
    pub running: AtomicUsize,
    /// Running mean of one batch's model time, in milliseconds (for Retry-After).
    pub batch_ms: AtomicU64,
}

/// The handlers' side of the queue.
#[derive(Clone)]
pub struct Queue {
    tx: Sender<Job>,
    max_batch: usize,
    pub stats: Arc<Stats>,
}

impl Queue {
    /// Queues a job, or refuses it at once when `capacity` jobs already wait.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.stats.refused_full.fetch_add(1, Ordering::Relaxed);
                Err(Refused::Full { retry_after_s: self.retry_after_s() })
            }
            Err(TrySendError::Disconnected(_)) => Err(Refused::Stopped),
        }
    }

    /// Jobs waiting (not counting the batch in the model).
    pub fn waiting(&self) -> usize {
        self.tx.len()
    }

    pub fn capacity(&self) -> usize {
        self.tx.capacity().unwrap_or(0)
    }

    /// About when the queue will have room: the batches ahead times a batch's mean time.
    pub fn retry_after_s(&self) -> u64 {
        let batch_ms = self.stats.batch_ms.load(Ordering::Relaxed).max(100);
        let batches_ahead = (self.waiting() / self.max_batch + 1) as u64;
        (batch_ms * batches_ahead).div_ceil(1000).max(1)
    }
}

/// Starts the worker thread; it stops when every `Queue` is dropped and the queue is empty.
pub fn start(loaded: Arc<Loaded>, capacity: usize, max_batch: usize) -> (Queue, JoinHandle<()>) {
    let (tx, rx) = bounded(capacity);
    let stats = Arc::new(Stats::default());
    let max_batch = max_batch.max(1);
    let worker_stats = stats.clone();
    let handle = std::thread::Builder::new()
        .name("prs-serve-model".into())
        .spawn(move || run(&loaded, &rx, max_batch, &worker_stats))
        .expect("spawning the model thread");
    (Queue { tx, max_batch, stats }, handle)
}

fn run(loaded: &Loaded, rx: &Receiver<Job>, max_batch: usize, stats: &Stats) {
    // Jobs taken off the queue but not yet run: at most `max_batch`, so the queue's bound holds.
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(job) => pending.push_back(job),
                Err(_) => return,
            }
        }
        while pending.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => pending.push_back(job),
                Err(_) => break,
            }
        }
        // A client that has gone needs no answer.
        pending.retain(|j| !j.reply.is_closed());
        let Some(first) = pending.front() else { continue };
        let gen = first.gen.clone();
        let mut batch = vec![];
        let mut rest = VecDeque::new();
        for job in pending.drain(..) {
            if job.gen == gen && batch.len() < max_batch {
                batch.push(job);
            } else {
                rest.push_back(job);
            }
        }
        pending = rest;
        run_batch(loaded, batch, &gen, stats);
    }
}

/// One model call for `batch`; every job gets its own reply, an error (or a panic inside the
/// model) included, so that no request waits forever and the worker lives on.
fn run_batch(loaded: &Loaded, batch: Vec<Job>, gen: &GenerateOptions, stats: &Stats) {
    let start = Instant::now();
    stats.running.store(batch.len(), Ordering::Relaxed);
    let inputs: Vec<(&Prepared, ItemMeta)> = batch.iter().map(|j| (&j.prepared, j.meta.clone())).collect();
    let outcome = catch_unwind(AssertUnwindSafe(|| predict_prepared(loaded, &inputs, gen)));
    let model_s = start.elapsed().as_secs_f64();
    stats.running.store(0, Ordering::Relaxed);
    let n = batch.len();
    let batches = stats.batches.fetch_add(1, Ordering::Relaxed) + 1;
    let mean = stats.batch_ms.load(Ordering::Relaxed) as f64;
    let mean = mean + (model_s * 1000.0 - mean) / batches.min(20) as f64;
    stats.batch_ms.store(mean.round() as u64, Ordering::Relaxed);
    let predictions = match outcome {
        Ok(Ok(predictions)) => {
            stats.predicted.fetch_add(n as u64, Ordering::Relaxed);
            Ok(predictions)
        }
        Ok(Err(e)) => Err(format!("the model failed: {e:#}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!("the model panicked on a batch of {n}: {msg}");
            Err(format!("the model panicked: {msg}"))
        }
    };
    let mut predictions = predictions.map(|p| p.into_iter());
    for job in batch {
        let reply = match &mut predictions {
            Ok(it) => {
                let Prediction { result, prob, logits } = it.next().expect("one prediction per input");
                drop(logits);
                let queue_s = start.saturating_duration_since(job.queued_at).as_secs_f64();
                let run = RunInfo { queue_s, model_s, batch_size: n };
                Ok(Done { result, prob, image: job.prepared.image, run })
            }
            Err(msg) => Err(msg.clone()),
        };
        // The client may have gone meanwhile; then nobody reads the reply.
        let _ = job.reply.send(reply);
    }
}
